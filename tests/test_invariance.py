"""Refactors move nothing measured: each pipeline config's seed-0 initial weights, a 20-step loss
trace on tiny shapes, and seeded open- and closed-loop imagination are compared with
``tests/reference/invariance.json``, written once from the code before a refactor:

    WHALE_WRITE_REFERENCE=1 .venv/bin/python -m pytest tests/test_invariance.py -m "slow or not slow"

A config's weights are hashed tensor by tensor (sha256 of the bytes) after the stage module is built
by LightningCLI from the config itself (its ``seed_everything``), on earlier stages built the same
way. Old checkpoints (``tests/reference/ckpt_v0``, written by the code the reference was made with)
must still load through every entry point that reads a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml

REF_DIR = Path(__file__).parent / "reference"
REF = REF_DIR / "invariance.json"
OLD_CKPTS = REF_DIR / "ckpt_v0"
WRITE = os.environ.get("WHALE_WRITE_REFERENCE") == "1"
ROOT = Path(__file__).resolve().parents[1]
STAGES = ("tokenizer", "behavior", "dynamics")
FROZEN = ("tokenizer.", "behavior.")
# model arguments that shrink a demo config to tiny shapes (the config's switches stay as they are)
TINY = {
    "tokenizer": {"frame_size": [32, 32], "dim": 32, "enc_depth": 1, "dec_depth": 1, "heads": 2,
                  "codebook_size": 32, "code_dim": 8, "warmup_steps": 2},
    "behavior": {"expect_codebook_size": 32, "z_dim": 4, "dim": 16, "depth": 1, "heads": 2,
                 "decoder_hidden": 16, "warmup_steps": 2, "probe_t_min": 2},
    "dynamics": {"dim": 32, "depth": 1, "heads": 2, "max_frames": 8, "warmup_steps": 2,
                 "maskgit_steps": 2, "rollout_horizon": 2, "rollout_batches": 1},
}
TINY_DATA = {  # stages 2 and 3 on one clock (every 2nd frame of the 24-frame tiny episodes), from token shards
    "tokenizer": {"clip_len": 4},
    "behavior": {"clip_len": 6, "frame_stride": 2, "retrace_clip_len": 3, "tokens": "tokens"},
    "dynamics": {"clip_len": 6, "val_clip_len": 6, "frame_stride": 2, "retrace_clip_len": 3, "tokens": "tokens"},
}


def _arg_path(stage: str, key: str) -> str:
    """Where a (flat) argument lives in the stage module's arguments: itself, or inside its group."""
    import importlib
    import inspect
    from dataclasses import fields

    cls = getattr(importlib.import_module(f"whale_pl.lit.{stage}_module"), f"{stage.capitalize()}Module")
    if key in inspect.signature(cls.__init__).parameters:
        return key
    for group, dc in getattr(cls, "GROUPS", {}).items():
        if key in {f.name for f in fields(dc)}:
            return f"{group}.{key}"
    raise KeyError(f"{cls.__name__} has no argument {key!r}")


def model_flags(stage: str, args: dict) -> list[str]:
    """Command-line overrides of a stage module's arguments."""
    out = []
    for k, v in args.items():
        value = json.dumps(v) if isinstance(v, (list, dict, bool)) or v is None else str(v)
        out += [f"--model.init_args.{_arg_path(stage, k)}", value]
    return out


def build(config: Path, flags: list[str]):
    """The (model, datamodule) that ``whale fit --config config flags`` would train, not run."""
    from whale_pl.cli import lightning_cli

    cli = lightning_cli(["--config", str(config), "--trainer.logger", "false", *flags], run=False)
    return cli.model, cli.datamodule


def tensor_digests(module: torch.nn.Module) -> dict[str, str]:
    """sha256 (first 16 hex) of each of the stage's own tensors (frozen earlier stages excluded)."""
    out = {}
    for k, t in sorted(module.state_dict().items()):
        if k.startswith(FROZEN):
            continue
        t = t.detach().cpu().contiguous()
        h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        out[k] = h.hexdigest()[:16]
    return out


def save_ckpt(module: L.LightningModule, path: Path, data_spec: dict | None = None) -> Path:
    """A checkpoint as Lightning writes one (the module's own save hook included), without a fit."""
    if data_spec is not None:
        module.hparams["data_spec"] = data_spec
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": L.__version__}
    module.on_save_checkpoint(ckpt)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def spec_for(scale: str, frame_size) -> dict:
    """A data_spec like the scale's datamodule gives (Meta-World: 4-D actions with state; OXE: 7-D)."""
    oxe = scale.startswith("whale_x")
    A = 7 if oxe else 4
    return {"frame_size": list(frame_size), "action_dim": A, "action_space": "ee_delta_7" if oxe else "metaworld_xyz_grip",
            "action_mean": [0.0] * A, "action_std": [1.0] * A, "state_dim": 0 if oxe else 39, "frame_stride": 1}


def config_digests(scale: str, tmp: Path) -> dict[str, dict[str, str]]:
    """Seed-0 initial tensors of each stage of one scale, each built on the earlier ones."""
    ckpts: dict[str, Path] = {}
    out = {}
    for stage in STAGES:
        flags = []
        if stage != "tokenizer":
            flags += model_flags(stage, {"tokenizer_ckpt": str(ckpts["tokenizer"])})
        if stage == "dynamics":
            flags += model_flags(stage, {"behavior_ckpt": str(ckpts["behavior"])})
        flags += model_flags(stage, {"init_from": None}) if stage_has_init_from(scale, stage) else []
        module, _ = build(ROOT / "stages" / scale / f"{stage}.yaml", flags)
        out[stage] = tensor_digests(module)
        spec = spec_for(scale, module.model.frame_size) if stage == "tokenizer" else None
        ckpts[stage] = save_ckpt(module, tmp / scale / f"{stage}.ckpt", spec)
        del module
    return out


def stage_has_init_from(scale: str, stage: str) -> bool:
    import yaml

    cfg = yaml.safe_load((ROOT / "stages" / scale / f"{stage}.yaml").read_text())
    return bool(cfg["model"]["init_args"].get("init_from"))


def save_without_machine_paths(src: Path, dst: Path) -> None:
    """Copy a checkpoint, its callbacks' saved paths (ModelCheckpoint's dirpath, best path) made relative to
    the run folder, so the committed fixture names no folder of the machine that wrote it."""
    root = str(src.parents[1]) + "/"

    def rel(x):
        if isinstance(x, str):
            return x.replace(root, "")
        if isinstance(x, dict):
            return {rel(k): rel(v) for k, v in x.items()}
        return type(x)(rel(v) for v in x) if isinstance(x, (list, tuple)) else x

    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    ckpt["callbacks"] = rel(ckpt.get("callbacks", {}))
    torch.save(ckpt, dst)


class LossTrace(L.Callback):
    """The training loss of every step."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))


def tiny_fit(stage: str, data_yaml: Path, ckpts: dict[str, Path], out: Path) -> tuple[list[float], Path]:
    """20 steps of the demo config of ``stage`` at tiny shapes on the tiny dataset; its loss trace
    and the checkpoint Lightning writes."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    args = dict(TINY[stage])
    if stage != "tokenizer":
        args["tokenizer_ckpt"] = str(ckpts["tokenizer"])
    if stage == "dynamics":
        args["behavior_ckpt"] = str(ckpts["behavior"])
    data = {"config": str(data_yaml), "batch_size": 2, "num_workers": 0, "steps_per_epoch": 20, "val_steps": 1,
            **TINY_DATA[stage]}
    flags = model_flags(stage, args) + [x for k, v in data.items() for x in (f"--data.init_args.{k}", str(v))]
    module, dm = build(ROOT / "stages" / "demo" / f"{stage}.yaml", flags)
    trace = LossTrace()
    L.Trainer(accelerator="cpu", max_steps=20, logger=False, enable_progress_bar=False, enable_model_summary=False,
              num_sanity_val_steps=0, limit_val_batches=0, precision="32-true", deterministic=True,
              callbacks=[trace, ModelCheckpoint(dirpath=out / stage, filename="last")]).fit(module, dm)
    return trace.losses, out / stage / "last.ckpt"


def imagination(dyn_ckpt: Path) -> dict:
    """Seeded open-loop (sampled) and closed-loop (greedy) rollouts of a tiny dynamics checkpoint."""
    from whale_pl.rollout.value import WorldModel

    wm = WorldModel.load(dyn_ckpt)
    m = wm.model
    g = torch.Generator().manual_seed(0)
    B, hh, ww = 2, *m.grid_hw
    ctx = torch.randint(0, m.codebook_size, (B, 2, hh, ww), generator=g)
    acts = torch.randn(B, 5, m.action_dim, generator=g)
    out = m.imagine(ctx, acts, wm.z_fn, horizon=4, steps=2, temperature=1.0, generator=torch.Generator().manual_seed(1))
    state0 = np.random.default_rng(0).normal(size=(B, m.state_dim)).astype(np.float32)

    def policy(t: int, states: np.ndarray) -> np.ndarray:
        return np.tanh(states[:, : m.action_dim] + 0.1 * t).astype(np.float32)

    closed = wm.imagine_closed_loop(ctx[:, :1], state0, policy, horizon=4)
    return {
        "open_ids": _digest(out["ids_BThw"]), "open_reward": out["reward_BT"].flatten().tolist(),
        "open_success": out["success_BT"].flatten().tolist(),
        "closed_ids": _digest(closed["ids_BThw"]), "closed_reward": closed["reward_BT"].flatten().tolist(),
        "closed_state": closed["state_BTP"][..., :4].flatten().tolist(),
    }


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


def _reference() -> dict:
    if WRITE:
        return json.loads(REF.read_text()) if REF.exists() else {}
    if not REF.exists():
        pytest.fail(f"{REF} is missing: write it with WHALE_WRITE_REFERENCE=1 (module docstring)")
    return json.loads(REF.read_text())


def _record(key: str, value) -> None:
    ref = json.loads(REF.read_text()) if REF.exists() else {}
    ref[key] = value
    REF.parent.mkdir(parents=True, exist_ok=True)
    REF.write_text(json.dumps(ref, indent=1, sort_keys=True) + "\n")


def _compare_digests(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), f"{what}: tensor names differ: {sorted(set(got) ^ set(want))[:10]}"
    moved = [k for k in want if got[k] != want[k]]
    assert not moved, f"{what}: seed-0 initial tensors differ from the reference: {moved[:10]}"


@pytest.mark.parametrize("scale", [
    "demo", "whale_st",
    pytest.param("whale_x", marks=pytest.mark.slow), pytest.param("whale_x_finetune", marks=pytest.mark.slow),
])
def test_seed0_initial_weights_of_every_pipeline_config(scale, tmp_path):
    ref = _reference()
    got = config_digests(scale, tmp_path)
    if WRITE:
        _record(f"init/{scale}", got)
        return
    for stage in STAGES:
        _compare_digests(got[stage], ref[f"init/{scale}"][stage], f"stages/{scale}/{stage}.yaml")


@pytest.fixture(scope="module")
def tiny_pipeline(tiny_data_yaml, tmp_path_factory):
    """The demo configs of the three stages, 20 steps each at tiny shapes (stages 2 and 3 on the token shards
    built after stage 1): loss traces and checkpoints.
    Run from their own folder, so the checkpoints name each other by relative paths (``tokenizer/last.ckpt``)."""
    from whale_pl.data.tokens import build_tokens

    out = tmp_path_factory.mktemp("invariance")
    traces, ckpts = {}, {}
    here = os.getcwd()
    os.chdir(out)
    try:
        for stage in STAGES:
            traces[stage], ckpts[stage] = tiny_fit(stage, tiny_data_yaml, ckpts, Path("."))
            if stage == "tokenizer":
                source = Path(yaml.safe_load(tiny_data_yaml.read_text())["out"])
                build_tokens(source, Path("tokens") / source.name, ckpts["tokenizer"])
    finally:
        os.chdir(here)
    return traces, {k: out / v for k, v in ckpts.items()}


def test_twenty_step_loss_traces_of_the_demo_configs(tiny_pipeline):
    traces, ckpts = tiny_pipeline
    if WRITE:
        _record("trace", traces)
        OLD_CKPTS.mkdir(parents=True, exist_ok=True)
        for stage, p in ckpts.items():
            save_without_machine_paths(p, OLD_CKPTS / f"{stage}.ckpt")
        return
    ref = _reference()["trace"]
    for stage in STAGES:
        assert len(traces[stage]) == 20, (stage, len(traces[stage]))
        np.testing.assert_allclose(traces[stage], ref[stage], rtol=1e-5, atol=1e-6, err_msg=f"{stage} loss trace")


def test_seeded_open_and_closed_loop_imagination(tiny_pipeline, monkeypatch):
    _, ckpts = tiny_pipeline
    monkeypatch.chdir(ckpts["dynamics"].parents[1])
    torch.manual_seed(0)
    got = imagination(ckpts["dynamics"])
    if WRITE:
        _record("imagine", got)
        return
    want = _reference()["imagine"]
    assert got["open_ids"] == want["open_ids"], "open-loop imagined ids differ from the reference"
    assert got["closed_ids"] == want["closed_ids"], "closed-loop imagined ids differ from the reference"
    for k in ("open_reward", "open_success", "closed_reward", "closed_state"):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_checkpoints_of_the_reference_code_still_load(tmp_path, monkeypatch):
    """Stage hand-off, ``init_from`` and the evaluation's loader read checkpoints that the code of the
    reference wrote, and the old world model imagines exactly what it did then."""
    from whale_pl.lit.behavior_module import BehaviorModule
    from whale_pl.lit.dynamics_module import DynamicsModule
    from whale_pl.lit.handoff import load_frozen
    from whale_pl.lit.init_from import init_from_checkpoint
    from whale_pl.lit.tokenizer_module import TokenizerModule

    for stage in STAGES:
        (tmp_path / stage).mkdir()
        shutil.copy(OLD_CKPTS / f"{stage}.ckpt", tmp_path / stage / "last.ckpt")
    monkeypatch.chdir(tmp_path)
    tok = load_frozen("tokenizer/last.ckpt", TokenizerModule)
    beh = load_frozen("behavior/last.ckpt", BehaviorModule)
    dyn = load_frozen("dynamics/last.ckpt", DynamicsModule)
    assert tok.model.codebook_size == 32 and beh.model.z_dim == 4 and dyn.model.uses_behavior
    # a fresh dynamics module of the same config starts from the old weights (fine-tuning)
    torch.manual_seed(1)
    fresh = DynamicsModule(**{k: v for k, v in dyn.hparams.items() if k not in ("tokenizer_sha256", "behavior_sha256")})
    assert init_from_checkpoint(fresh, "dynamics/last.ckpt") > 0
    for k, v in dyn.model.state_dict().items():
        assert torch.equal(fresh.model.state_dict()[k], v), k
    torch.manual_seed(0)
    got = imagination(Path("dynamics/last.ckpt"))
    want = _reference()["imagine_v0"] if not WRITE else got
    if WRITE:
        _record("imagine_v0", got)
    assert got["open_ids"] == want["open_ids"] and got["closed_ids"] == want["closed_ids"]
