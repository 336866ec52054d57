"""Whale-X pretraining on an OXE mixture and fine-tuning on a few in-domain demonstrations, at tiny
size on the real BridgeData sample (../shared/data/oxe).

The real converter builds a pretraining mixture (BridgeData + an RT-1-layout dataset) and a few
in-domain demonstrations (6 BridgeData episodes of the held-out split, which pretraining never
trained on: ``--max-episodes``). Three tiny stages are pretrained for a few steps; then each stage is
fine-tuned through LightningCLI with the ``stages/whale_x_finetune`` configs (tiny overrides),
starting from its pretrained checkpoint (``init_from``). Checked: every fine-tune starts from exactly
the pretrained weights (which beat a from-scratch model on the in-domain batch), the in-domain loss
falls, the optimiser and step counter start fresh, and the hand-off runs through the *fine-tuned*
earlier stages.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from einops import rearrange

from whale_pl.data.oxe.cli import main as oxe_main
from whale_pl.data.shards import ShardWriter, iter_episodes
from test_oxe_mixture import read_mixture  # noqa: E402  (tests/ is on sys.path under pytest)
from whale_pl.lit.handoff import HandoffError
from whale_pl.lit.init_from import init_from_checkpoint

from test_oxe_fixtures import rt1_dataset  # noqa: E402  (tests/ is on sys.path under pytest)

ROOT = Path(__file__).resolve().parents[1]
BRIDGE = ROOT.parent / "shared" / "data" / "oxe" / "bridge_dataset" / "1.0.0"
pytestmark = pytest.mark.skipif(not BRIDGE.is_dir(), reason=f"real OXE sample data absent: {BRIDGE}")

TINY_TOK = dict(frame_size=[32, 32], patch_size=8, dim=32, enc_depth=1, dec_depth=1, heads=2, codebook_size=32,
                code_dim=8)
TINY_BEH = dict(net=dict(z_dim=4, dim=16, depth=1, heads=2, decoder_hidden=16))
# the Whale-X dynamics config's change weight, at tiny size
_XDYN = yaml.safe_load((ROOT / "stages" / "whale_x" / "dynamics.yaml").read_text())["model"]["init_args"]
TINY_DYN = dict(net=dict(dim=32, depth=1, heads=2, change_weight=_XDYN["net"]["change_weight"]),
                sampling=dict(maskgit_steps=2, rollout_horizon=3, rollout_batches=1))
QUIET = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
             enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0)
PRETRAIN_STEPS = {"tokenizer": 40, "behavior": 10, "dynamics": 40}
FINETUNE_STEPS = 15
STAGES = ("tokenizer", "behavior", "dynamics")


# ------------------------------------------------------------------------------------------------ data
@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    """A pretraining mixture and a few in-domain demonstrations, both from the real converter."""
    tmp = tmp_path_factory.mktemp("oxe")
    root = tmp / "rlds"
    rt1_dataset(root, n_files=1, per_file=4)                       # root/fractal20220817_data/0.1.0 (train only)
    (root / "bridge_dataset").mkdir()
    os.symlink(BRIDGE, root / "bridge_dataset" / "1.0.0")          # the real sample, read in place
    common = ["--size", "32", "-q", "--workers", "1"]
    assert oxe_main(["--root", str(root), "--datasets", "bridge_dataset,fractal20220817_data",
                     "--split", "train,val", "--out", str(tmp / "oxe"), *common]) == 0
    assert oxe_main(["--src", str(BRIDGE), "--split", "val", "--max-episodes", "6",
                     "--out", str(tmp / "demos"), *common]) == 0
    # the fine-tuning dataset: the same demonstrations as its train and its val split
    with ShardWriter(tmp / "finetune") as w:
        for ep in iter_episodes(tmp / "demos"):
            for split in ("train", "val"):
                ep.meta["split"] = split
                w.write(ep)
    return {"mixture": tmp / "oxe", "demos": tmp / "demos", "finetune": tmp / "finetune"}


def _clip_dm(dirs, weights=None, clip_len=6, **kw):
    from whale_pl.data.datamodule import ClipDataModule

    kw = dict(dict(batch_size=4, num_workers=0, steps_per_epoch=50, val_steps=1), **kw)
    return ClipDataModule(dirs=[str(d) for d in dirs], weights=weights, clip_len=clip_len, **kw)


def _demo_dm(shards, clip_len=6, **kw):
    return _clip_dm([shards["finetune"]], clip_len=clip_len, **kw)


@pytest.fixture(scope="module")
def demo_batch(shards) -> dict:
    """A fixed batch of in-domain clips (the first validation batch: same clips every time)."""
    dm = _demo_dm(shards, batch_size=8)
    dm.setup("fit")
    return next(iter(dm.val_dataloader()))


def test_converter_keeps_first_episodes_and_mixture_splits(shards):
    """``--max-episodes`` keeps the first N episodes byte for byte; a mixture converts the held-out
    splits each dataset has, and validation draws only from those."""
    from whale_pl.data.shards import iter_tar_samples, read_manifest

    demos = read_manifest(shards["demos"])
    assert demos["episodes"] == 6 and set(demos["splits"]) == {"val"}
    mix = json.loads((shards["mixture"] / "mixture.json").read_text())
    assert [(d["name"], d["splits"]) for d in mix["datasets"]] == [("bridge_dataset", ["train", "val"]),
                                                                   ("fractal20220817_data", ["train"])]
    full = read_manifest(shards["mixture"] / "bridge_dataset")
    assert full["splits"]["val"]["episodes"] == 25

    def val_samples(d, m):
        return [s for sh in m["shards"] if sh["split"] == "val" for s in iter_tar_samples(Path(d) / sh["name"])]

    few, every = val_samples(shards["demos"], demos), val_samples(shards["mixture"] / "bridge_dataset", full)
    assert [s["__key__"] for s in few] == [f"val-00000-{i:06d}" for i in range(6)]
    for a, b in zip(few, every[:6]):
        assert a["__key__"] == b["__key__"] and a["frames.npz"] == b["frames.npz"] and a["steps.npz"] == b["steps.npz"]

    dirs, weights = read_mixture(shards["mixture"])
    dm = _clip_dm(dirs, weights, val_steps=4)
    dm.setup("fit")
    assert {int(i) for b in dm.val_dataloader() for i in b["dataset"]} == {0}           # bridge only
    assert {int(i) for b in dm.train_dataloader() for i in b["dataset"]} == {0, 1}


# ------------------------------------------------------------------------------------------------ pretraining
@pytest.fixture(scope="module")
def pretrained(shards, tmp_path_factory) -> dict[str, Path]:
    """Tiny stages pretrained for a few steps on the mixture (real Trainer fits)."""
    from whale_pl.lit.behavior_module import BehaviorModule
    from whale_pl.lit.dynamics_module import DynamicsModule
    from whale_pl.lit.tokenizer_module import TokenizerModule

    out = tmp_path_factory.mktemp("pretrained")
    dirs, weights = read_mixture(shards["mixture"])
    ckpts = {s: out / f"{s}.ckpt" for s in STAGES}

    def fit(stage, module, clip_len):
        trainer = L.Trainer(max_steps=PRETRAIN_STEPS[stage], **QUIET)
        trainer.fit(module, _clip_dm(dirs, weights, clip_len=clip_len))
        trainer.save_checkpoint(ckpts[stage])

    torch.manual_seed(0)
    fit("tokenizer", TokenizerModule(net=TINY_TOK, optim=dict(lr=3e-3, warmup_steps=1)), clip_len=4)
    fit("behavior", BehaviorModule(tokenizer_ckpt=str(ckpts["tokenizer"]), **TINY_BEH,
                                   optim=dict(lr=3e-3, warmup_steps=1), probe_t_min=2), clip_len=6)
    fit("dynamics", DynamicsModule(tokenizer_ckpt=str(ckpts["tokenizer"]), behavior_ckpt=str(ckpts["behavior"]),
                                   **TINY_DYN, optim=dict(lr=3e-3, warmup_steps=1)), clip_len=6)
    return ckpts


# ------------------------------------------------------------------------------------------------ fine-tuning
def in_domain_loss(stage: str, module: L.LightningModule, batch: dict) -> float:
    """The stage's loss on a fixed batch, in eval mode (no dropout, no EMA/codebook update)."""
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            if stage == "tokenizer":
                x = batch["frames"].float() / 127.5 - 1
                return float(F.mse_loss(module.model.decode(module.model.encode(x)).float(), x))
            if stage == "behavior":
                codes = module.batch_codes({"frames": batch["frames"]})
                out = module.model.loss(codes, batch["actions"], beta=float(module.hparams.beta), sample=False)
                return float(out.loss)
            ids = module.tokenize(batch["frames"])
            z = module.behavior_z(ids, batch["actions"].float())
            logits = module.model.teacher_forced(ids, batch["actions"].float(), z, batch["stride"]).float()
            return float(F.cross_entropy(rearrange(logits, "b t h w v -> (b t h w) v"), ids[:, 1:].reshape(-1)))
    finally:
        module.train(was)


class Probe(L.Callback):
    """Records the module's own weights and its in-domain loss when training starts and ends."""

    def __init__(self, stage: str, batch: dict) -> None:
        self.stage, self.batch = stage, batch

    def on_train_start(self, trainer, pl_module):
        skip = tuple(f"{name}." for name in pl_module.FROZEN)  # the module's own weights, not the frozen stages'
        self.start = {k: v.detach().clone() for k, v in pl_module.state_dict().items() if not k.startswith(skip)}
        self.loss_start = in_domain_loss(self.stage, pl_module, self.batch)

    def on_train_end(self, trainer, pl_module):
        self.loss_end = in_domain_loss(self.stage, pl_module, self.batch)


def _finetune_cli(stage: str, run_root: Path, shards, pretrained, batch, tiny: dict, extra: list[str],
                  ckpt_path: Path | None = None):
    """`whale fit --config stages/whale_x_finetune/<stage>.yaml` with tiny overrides, with a Probe."""
    from whale_pl.cli import lightning_cli

    model = [a for k, v in tiny.items() for a in (  # a group's fields one by one, so the config's others stay
        [x for f, w in v.items() for x in (f"--model.init_args.{k}.{f}", json.dumps(w))] if isinstance(v, dict)
        else [f"--model.init_args.{k}", json.dumps(v)])]
    cli = lightning_cli([
        "--config", str(ROOT / "stages" / "whale_x_finetune" / f"{stage}.yaml"), *model,
        "--model.init_args.init_from", str(pretrained[stage]),
        "--model.init_args.optim.lr", "3e-3", "--model.init_args.optim.warmup_steps", "1",
        "--data.init_args.dirs", json.dumps([str(shards["finetune"])]),
        "--data.init_args.clip_len", "4" if stage == "tokenizer" else "6",
        "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
        "--data.init_args.steps_per_epoch", str(FINETUNE_STEPS), "--data.init_args.val_steps", "1",
        "--data.init_args.pin_memory", "false",
        "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.max_steps", str(FINETUNE_STEPS),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.num_sanity_val_steps", "0", "--trainer.logger.init_args.save_dir", str(run_root), *extra,
    ], run=False)
    probe = Probe(stage, batch)
    cli.trainer.callbacks.append(probe)
    cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=ckpt_path)
    return run_root / stage / "checkpoints", probe, cli.model


@pytest.fixture(scope="module")
def finetuned(shards, pretrained, demo_batch, tmp_path_factory):
    run_root = tmp_path_factory.mktemp("runs_whale_x_finetune")
    torch.manual_seed(0)
    out = {}
    ck, probe, _ = _finetune_cli("tokenizer", run_root, shards, pretrained, demo_batch, dict(net=TINY_TOK), [])
    out["tokenizer"] = (ck, probe)
    tok = ["--model.init_args.tokenizer_ckpt", str(ck / "best.ckpt"), "--model.init_args.expect_codebook_size", "32"]
    ck, probe, _ = _finetune_cli("behavior", run_root, shards, pretrained, demo_batch,
                                 dict(TINY_BEH, probe_t_min=2), tok)
    out["behavior"] = (ck, probe)
    ck, probe, _ = _finetune_cli("dynamics", run_root, shards, pretrained, demo_batch, TINY_DYN,
                                 ["--model.init_args.tokenizer_ckpt", str(out["tokenizer"][0] / "best.ckpt"),
                                  "--model.init_args.behavior_ckpt", str(ck / "best.ckpt"),
                                  "--data.init_args.retrace_prob", "0.0"])
    out["dynamics"] = (ck, probe)
    return out


def _scratch_loss(stage: str, pretrained: dict, finetuned: dict, batch: dict) -> float:
    """The in-domain loss of the same architecture without init_from (same seed, same frozen stages)."""
    from whale_pl.lit.behavior_module import BehaviorModule
    from whale_pl.lit.dynamics_module import DynamicsModule
    from whale_pl.lit.tokenizer_module import TokenizerModule

    torch.manual_seed(0)
    tok = str(finetuned["tokenizer"][0] / "best.ckpt")
    if stage == "tokenizer":
        m = TokenizerModule(net=TINY_TOK)
    elif stage == "behavior":
        m = BehaviorModule(tokenizer_ckpt=tok, **TINY_BEH)
    else:
        m = DynamicsModule(tokenizer_ckpt=tok, behavior_ckpt=str(finetuned["behavior"][0] / "best.ckpt"), **TINY_DYN)
    return in_domain_loss(stage, m, batch)


@pytest.mark.parametrize("stage", STAGES)
def test_finetune_starts_from_pretrained_weights_and_lowers_in_domain_loss(stage, pretrained, finetuned, demo_batch):
    ckpts, probe = finetuned[stage]
    raw = torch.load(pretrained[stage], map_location="cpu", weights_only=True)
    theirs = {k: v for k, v in raw["state_dict"].items() if not k.startswith(("tokenizer.", "behavior."))}
    # step 0 of the fine-tune holds exactly the pretrained weights and buffers (codebook, EMA state included)
    assert probe.start.keys() == theirs.keys() and len(theirs) > 5
    for k, v in theirs.items():
        assert torch.equal(probe.start[k], v), f"{stage}: {k} at fine-tune step 0 differs from the pretrained one"
    scratch = _scratch_loss(stage, pretrained, finetuned, demo_batch)
    print(f"{stage}: in-domain loss scratch {scratch:.4f}, pretrained {probe.loss_start:.4f}, "
          f"fine-tuned {probe.loss_end:.4f}")
    if stage != "behavior":  # the behavior loss's KL term makes a scratch comparison uninformative at 10 steps
        assert probe.loss_start < 0.9 * scratch, (stage, probe.loss_start, scratch)
    assert probe.loss_end < probe.loss_start, (stage, probe.loss_start, probe.loss_end)
    # weights only: a new optimiser and schedule from step 0, not a resume of the pretraining run
    last = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == FINETUNE_STEPS
    assert last["lr_schedulers"][0]["last_epoch"] == FINETUNE_STEPS
    assert {int(s["step"]) for s in last["optimizer_states"][0]["state"].values()} == {FINETUNE_STEPS}
    assert last["hyper_parameters"]["init_from"] == str(pretrained[stage])


def test_interrupted_finetune_resumes_from_its_own_checkpoint(shards, pretrained, finetuned, demo_batch, tmp_path):
    """A resumed fine-tune (``--ckpt_path last.ckpt``, as ``make`` does) continues from that checkpoint:
    the restore runs after ``init_from`` and wins."""
    ckpts, _ = finetuned["tokenizer"]
    last = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    pre = torch.load(pretrained["tokenizer"], map_location="cpu", weights_only=True)["state_dict"]
    _, probe, _ = _finetune_cli("tokenizer", tmp_path, shards, pretrained, demo_batch, dict(net=TINY_TOK),
                                ["--trainer.max_steps", str(FINETUNE_STEPS + 3)], ckpt_path=ckpts / "last.ckpt")
    assert all(torch.equal(probe.start[k], v) for k, v in last["state_dict"].items())
    assert not all(torch.equal(probe.start[k], v) for k, v in pre.items())


def test_finetuned_stages_hand_off_the_finetuned_earlier_stages(pretrained, finetuned):
    from whale_pl.lit.behavior_module import BehaviorModule
    from whale_pl.lit.handoff import fingerprint as tokenizer_fingerprint
    from whale_pl.lit.dynamics_module import DynamicsModule
    from whale_pl.lit.handoff import load_frozen
    from whale_pl.lit.tokenizer_module import TokenizerModule

    tok_ft = load_frozen(finetuned["tokenizer"][0] / "best.ckpt", TokenizerModule)
    tok_pre = load_frozen(pretrained["tokenizer"], TokenizerModule)
    assert tokenizer_fingerprint(tok_ft) != tokenizer_fingerprint(tok_pre)   # fine-tuning changed the tokenizer
    beh_ft = load_frozen(finetuned["behavior"][0] / "best.ckpt", BehaviorModule)
    assert beh_ft.hparams.tokenizer_sha256 == tokenizer_fingerprint(tok_ft)
    dyn_ft = load_frozen(finetuned["dynamics"][0] / "best.ckpt", DynamicsModule)
    assert dyn_ft.hparams.tokenizer_sha256 == tokenizer_fingerprint(tok_ft)
    assert dyn_ft.hparams.behavior_sha256 == tokenizer_fingerprint(beh_ft.model)
    assert dyn_ft.hparams.behavior_sha256 != tokenizer_fingerprint(load_frozen(pretrained["behavior"],
                                                                               BehaviorModule).model)


def test_init_from_names_the_path_and_the_mismatch(pretrained, tmp_path):
    from whale_pl.lit.dynamics_module import DynamicsModule
    from whale_pl.lit.tokenizer_module import TokenizerModule

    tok = str(pretrained["tokenizer"])
    with pytest.raises(HandoffError, match=r"'.*tokenizer\.ckpt'.*codebook_size 32 in the checkpoint != 64 here"):
        init_from_checkpoint(TokenizerModule(net=dict(TINY_TOK, codebook_size=64)), tok)
    with pytest.raises(HandoffError, match=r"hyper-parameter dim 32 in the checkpoint != 48 here.*shape mismatch"):
        init_from_checkpoint(TokenizerModule(net=dict(TINY_TOK, dim=48)), tok)
    with pytest.raises(HandoffError, match=re.escape(f"'{pretrained['behavior']}' holds a "
                                                      "whale_pl.lit.behavior_module.BehaviorModule, not a "
                                                      "whale_pl.lit.tokenizer_module.TokenizerModule")):
        init_from_checkpoint(TokenizerModule(net=TINY_TOK), pretrained["behavior"])
    with pytest.raises(HandoffError, match=r"'.*nothing\.ckpt' does not exist"):
        init_from_checkpoint(TokenizerModule(net=TINY_TOK), tmp_path / "nothing.ckpt")
    off = DynamicsModule(tokenizer_ckpt=tok, use_behavior=False, **TINY_DYN)
    with pytest.raises(HandoffError, match=r"'.*dynamics\.ckpt'.*behavior_dim 4 in the checkpoint != 0 here"):
        init_from_checkpoint(off, pretrained["dynamics"])


def test_finetune_configs_match_whale_x_and_pretraining_uses_the_oxe_mixture():
    """The fine-tune configs keep the pretrained architecture, start from runs/whale_x checkpoints,
    hand off the fine-tuned earlier stages, use a smaller lr and fewer steps; the Whale-X pretraining
    configs all read the same OXE mixture (every registered dataset, the registry's weights)."""
    import jsonargparse

    from whale_pl.data.oxe.registry import DEFAULT_MIXTURE_WEIGHTS, REGISTRY

    names = [n for n in REGISTRY if n != "bridge"]  # "bridge" is the older copy of bridge_dataset
    for stage in STAGES:
        text_ft = (ROOT / "stages" / "whale_x_finetune" / f"{stage}.yaml").read_text()
        assert "/work" not in text_ft and "/tmp" not in text_ft
        pre, ft = yaml.safe_load((ROOT / "stages" / "whale_x" / f"{stage}.yaml").read_text()), yaml.safe_load(text_ft)
        assert pre["model"]["class_path"] == ft["model"]["class_path"]
        mp, mf = pre["model"]["init_args"], ft["model"]["init_args"]
        assert mf["init_from"] == f"runs/whale_x/{stage}/checkpoints/best.ckpt"
        for k in ("tokenizer_ckpt", "behavior_ckpt"):
            if k in mf:
                assert mf[k] == f"runs/whale_x_finetune/{k.split('_')[0]}/checkpoints/best.ckpt"
        assert mf["net"] == mp["net"], stage  # the architecture: the net: group
        arch = set(mp) - {"net", "optim", "sampling", "kl_warmup_steps", "tokenizer_ckpt", "behavior_ckpt"}
        assert {k: mf.get(k) for k in arch} == {k: mp[k] for k in arch}, stage
        assert mf["optim"]["lr"] <= mp["optim"]["lr"] / 5
        assert ft["trainer"]["max_steps"] <= pre["trainer"]["max_steps"] / 20
        assert ft["trainer"]["logger"]["init_args"]["save_dir"] == "runs/whale_x_finetune"
        for section in ("model", "data"):
            mod, _, cls = ft[section]["class_path"].rpartition(".")
            parser = jsonargparse.ArgumentParser()
            parser.add_class_arguments(getattr(__import__(mod, fromlist=[cls]), cls), section)
            parser.parse_object({section: ft[section]["init_args"]})
        data = pre["data"]["init_args"]
        assert data["dirs"] == [f"data_shards/oxe/{n}" for n in names], stage
        assert data["weights"] == [DEFAULT_MIXTURE_WEIGHTS.get(n, 1.0) for n in names], stage
