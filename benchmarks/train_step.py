"""Training throughput of a stage's LightningModule on random batches of the documented shapes.

Builds the module from the ``model`` section of ``stages/<scale>/<stage>.yaml`` and trains it with a
real Lightning Trainer (the YAML's precision and gradient clipping) on random batches laid out as in
docs/contracts.md (batch size and clip length from the YAML's ``data`` section unless given), then
prints training clips/s over the timed steps and peak memory (CUDA: max allocated; CPU: peak RSS).

    python benchmarks/train_step.py                                  # tokenizer, demo
    python benchmarks/train_step.py --stage dynamics                 # on runs/demo's trained stages
    python benchmarks/train_step.py --stage dynamics --scale whale_st --fresh
    python benchmarks/train_step.py --stage dynamics --tokens-vs-frames   # real data: token shards vs frames

Behavior and dynamics need the earlier stages' checkpoints. The YAML's paths are used when those
files exist (the data_spec then comes from the tokenizer checkpoint, as in a real run); otherwise,
or with ``--fresh``, untrained earlier stages are built from their stage YAMLs, fitted one step on
the same random batches and saved to a temporary directory (their speed is not what is measured).

``--tokens-vs-frames`` (behavior, dynamics): the YAML's own datamodule on the real dataset (it must be
collected), once reading the token shards (built first into a temporary folder with the tokenizer, two
worker processes) and once the frames, tokenised in the step; ``--rounds`` alternating fits of the same
module, so both see the same machine load. Prints clips/s and tokens/s of each and their ratio last.
"""

from __future__ import annotations

import argparse
import importlib
import resource
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import yaml
from torch.utils.data import DataLoader, IterableDataset

from whale_pl.lit.checkpoint import read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
METAWORLD_ACTIONS = {"names": ["dx", "dy", "dz", "gripper"], "sum_dims": [0, 1, 2], "rot_dims": [], "gripper_index": 3}
OXE_ACTIONS = {"names": ["dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"], "sum_dims": [0, 1, 2],
               "rot_dims": [3, 4, 5], "gripper_index": 6}


def import_path(path: str):
    """The class (or function) a dotted ``class_path`` names."""
    mod, _, name = path.rpartition(".")
    return getattr(importlib.import_module(mod), name)


def data_spec_for(cfg: dict, frame_size: list[int]) -> dict:
    """A data_spec as the datamodule would give it, for the YAML's kind of data."""
    data = cfg.get("data", {})
    metaworld = "MetaWorld" in data.get("class_path", "MetaWorld")
    space = METAWORLD_ACTIONS if metaworld else OXE_ACTIONS
    a = len(space["names"])
    fams = ["expert", "noise"]
    return {
        "frame_size": list(frame_size), "action_dim": a, "action_space": space,
        "action_mean": [0.0] * a, "action_std": [1.0] * a, "state_dim": 39 if metaworld else 0,
        "families": fams, "policies": ["expert", "noise_0.1"], "ood_policies": [],
        "datasets": [{"name": "random", "action_mean": [0.0] * a, "action_std": [1.0] * a, "weight": 1.0}],
    }


class RandomClips(IterableDataset):
    """Endless random batches with the contract's keys, dtypes and shapes."""

    def __init__(self, spec: dict, batch_size: int, clip_len: int) -> None:
        self.spec, self.B, self.T = spec, batch_size, clip_len

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        B, T = self.B, self.T
        H, W = self.spec["frame_size"]
        A, S = self.spec["action_dim"], self.spec["state_dim"]
        while True:
            yield {
                "frames": torch.randint(0, 256, (B, T, 3, H, W), dtype=torch.uint8, generator=g),
                "actions": torch.randn(B, T, A, generator=g), "actions_raw": torch.randn(B, T, A, generator=g),
                "rewards": torch.rand(B, T, generator=g), "success": (torch.rand(B, T, generator=g) > 0.9).float(),
                "state": torch.randn(B, T, S, generator=g), "is_first": torch.zeros(B, T, dtype=torch.bool),
                "family": torch.randint(0, 2, (B,), generator=g), "policy": torch.randint(0, 2, (B,), generator=g),
                "ood": torch.zeros(B, dtype=torch.bool), "stride": torch.ones(B, dtype=torch.long),
                "dataset": torch.zeros(B, dtype=torch.long), "episode": torch.arange(B), "start": torch.zeros(B, dtype=torch.long),
            }


class RandomDataModule(L.LightningDataModule):
    """A datamodule over ``RandomClips`` with the data_spec attributes the stage modules read."""

    def __init__(self, spec: dict, batch_size: int, clip_len: int) -> None:
        super().__init__()
        self.data_spec = spec
        self.families, self.policies, self.ood_policies = spec["families"], spec["policies"], spec["ood_policies"]
        self.state_dim = spec["state_dim"]
        self._ds = RandomClips(spec, batch_size, clip_len)

    def train_dataloader(self):
        """The endless random batches (already batched)."""
        return DataLoader(self._ds, batch_size=None, num_workers=0)


class StepTimer(L.Callback):
    """Wall-clock seconds of the training steps after ``warmup`` untimed ones."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.t0, self.timed, self.frames = warmup, None, 0, 0

    def _sync(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        """Start the clock at the first timed step."""
        if trainer.global_step == self.warmup:
            self._sync()
            self.t0 = time.perf_counter()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        """Count the timed steps and the frames of their clips."""
        if self.t0 is not None:
            self.timed += 1
            self.frames += batch["actions"].shape[0] * batch["actions"].shape[1]

    def on_train_end(self, trainer, pl_module):
        """Stop the clock."""
        self._sync()
        self.seconds = time.perf_counter() - self.t0


def _trainer(max_steps: int, precision: str, clip, callbacks=()) -> L.Trainer:
    return L.Trainer(
        accelerator="auto", devices=1, precision=precision, gradient_clip_val=clip, max_steps=max_steps,
        limit_val_batches=0, logger=False, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=False, callbacks=list(callbacks),
    )


def earlier_stages(stage: str, scale: str, init_args: dict, spec: dict, B: int, T: int, precision: str,
                   fresh: bool, tmp: Path) -> tuple[dict, dict]:
    """Checkpoint paths of the stages before ``stage`` (set into ``init_args``) and the data_spec to use.
    Trained checkpoints named by the YAML are used when present (their data_spec wins); else
    untrained ones are built from the stage YAMLs, one step on random batches, saved under ``tmp``."""
    wanted = {"tokenizer": [], "behavior": ["tokenizer"], "dynamics": ["tokenizer", "behavior"]}[stage]
    if stage == "dynamics" and init_args.get("use_behavior", True) is False:
        wanted = ["tokenizer"]
    init_args = dict(init_args)
    tok = init_args.get("tokenizer_ckpt")
    if wanted and not fresh and all(init_args.get(f"{w}_ckpt") and (ROOT / init_args[f"{w}_ckpt"]).is_file()
                                    for w in wanted):
        ck = read_checkpoint(ROOT / tok)
        spec = dict(ck["hyper_parameters"]["data_spec"])
        for w in wanted:
            init_args[f"{w}_ckpt"] = str(ROOT / init_args[f"{w}_ckpt"])
        print(f"earlier stages: trained checkpoints {', '.join(init_args[f'{w}_ckpt'] for w in wanted)}")
        return init_args, spec
    made: dict[str, str] = {}
    for w in wanted:
        cfg = yaml.safe_load((ROOT / "stages" / scale / f"{w}.yaml").read_text())["model"]
        args = {**cfg.get("init_args", {}), **{f"{k}_ckpt": v for k, v in made.items()}}
        module = import_path(cfg["class_path"])(**args)
        tr = _trainer(1, precision, None)
        tr.fit(module, RandomDataModule(spec, B, T))
        path = tmp / f"{w}.ckpt"
        tr.save_checkpoint(str(path))
        made[w] = str(path)
        print(f"earlier stages: untrained {w} from stages/{scale}/{w}.yaml -> {path}")
    init_args.update({f"{k}_ckpt": v for k, v in made.items()})
    return init_args, spec


def data_module(cfg: dict, tokens: str | None):
    """The YAML's datamodule on its real dataset, reading ``tokens`` (a token folder) or frames (None)."""
    data = cfg["data"]
    return import_path(data["class_path"])(**{**data.get("init_args", {}), "tokens": tokens})


def token_folder(dm, tokenizer_ckpt: str, tmp: Path) -> Path:
    """Token shards of the datamodule's directories, built with the tokenizer into ``tmp/tokens``."""
    from whale_pl.data.tokens import build_tokens

    t0 = time.perf_counter()
    for p in dm.dir_paths:
        build_tokens(p, tmp / "tokens" / Path(p).name, tokenizer_ckpt, workers=2)
    print(f"token shards built in {time.perf_counter() - t0:.1f}s")
    return tmp / "tokens"


def tokens_vs_frames(a, cfg: dict, module, B: int, precision: str, clip, tmp: Path) -> None:
    """Alternate fits of ``module`` on the token shards and on the frames; print each one's throughput."""
    frames_dm = data_module(cfg, None)
    grid = module.tokenizer.model.grid_hw()
    dms = {"frames (tokenised in the step)": frames_dm,
           "token shards": data_module(cfg, str(token_folder(frames_dm, module.hparams.tokenizer_ckpt, tmp)))}
    secs, steps, frames = ({k: 0.0 for k in dms} for _ in range(3))
    for _ in range(a.rounds):
        for name, dm in dms.items():
            timer = StepTimer(a.warmup)
            _trainer(a.warmup + a.steps, precision, clip, [timer]).fit(module, dm)
            secs[name] += timer.seconds
            steps[name] += timer.timed
            frames[name] += timer.frames
    rate = {k: steps[k] * B / secs[k] for k in dms}
    for k in dms:  # tokens/s counts the clips' real frames (retracing batches are shorter)
        print(f"{k}: {steps[k]:.0f} steps in {secs[k]:.1f}s = {secs[k] / steps[k]:.3f} s/step, {rate[k]:.2f} clips/s, "
              f"{frames[k] * grid[0] * grid[1] / secs[k]:.0f} tokens/s")
    ratio = rate["token shards"] / rate["frames (tokenised in the step)"]
    print(f"train_step_{a.stage}_{a.scale}_tokens_vs_frames: {ratio:.2f}x")


def parse_set(items: list[str]) -> dict:
    """``--set key=value ...`` -> {key: YAML-parsed value}; ``group.key=value`` sets a field of a group (``net``)."""
    out: dict = {}
    for it in items:
        if "=" not in it:
            raise SystemExit(f"--set expects key=value, got {it!r}")
        k, v = it.split("=", 1)
        *groups, name = k.split(".")
        d = out
        for g in groups:
            d = d.setdefault(g, {})
        d[name] = yaml.safe_load(v)
    return out


def main(argv: list[str] | None = None) -> None:
    """Build the stage module and its earlier stages, train the timed steps, print clips/s last."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", default="tokenizer", choices=["tokenizer", "behavior", "dynamics"])
    p.add_argument("--scale", default="demo", choices=["demo", "whale_st", "whale_x"])
    p.add_argument("--batch-size", type=int, help="default: the YAML's data.init_args.batch_size")
    p.add_argument("--clip-len", type=int, help="default: the YAML's data.init_args.clip_len")
    p.add_argument("--steps", type=int, default=8, help="timed training steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--precision", help="default: the YAML's trainer.precision")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override model init_args")
    p.add_argument("--fresh", action="store_true", help="untrained earlier stages even if trained ones exist")
    p.add_argument("--tokens-vs-frames", action="store_true", help="real data: token shards against frames")
    p.add_argument("--rounds", type=int, default=3, help="alternations of --tokens-vs-frames")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg_path = ROOT / "stages" / a.scale / f"{a.stage}.yaml"
    if not cfg_path.is_file():
        raise SystemExit(f"no config {cfg_path}")
    cfg = yaml.safe_load(cfg_path.read_text())
    model_cfg, data_args, trainer_cfg = cfg["model"], cfg.get("data", {}).get("init_args", {}), cfg.get("trainer", {})
    init_args = dict(model_cfg.get("init_args", {}))
    for k, v in parse_set(a.set).items():
        init_args[k] = {**init_args.get(k, {}), **v} if isinstance(v, dict) else v
    frame_size = (init_args.get("net") or {}).get("frame_size")
    if frame_size is None:
        data_yaml = data_args.get("config")
        size = yaml.safe_load((ROOT / data_yaml).read_text())["size"] if data_yaml else 64
        frame_size = [size, size]
    spec = data_spec_for(cfg, frame_size)
    if a.tokens_vs_frames:  # the earlier stages are made on the real data's spec (the clock the fit checks)
        spec = dict(data_module(cfg, None).data_spec)
    B = a.batch_size or data_args.get("batch_size", 8)
    T = a.clip_len or data_args.get("clip_len", 16)
    precision = a.precision or trainer_cfg.get("precision", "32-true")
    tmp = tempfile.TemporaryDirectory(prefix="whale_train_step_")
    init_args, spec = earlier_stages(a.stage, a.scale, init_args, spec, B, T, precision, a.fresh, Path(tmp.name))
    cls = import_path(model_cfg["class_path"])
    module = cls(**init_args)
    if a.tokens_vs_frames:
        tokens_vs_frames(a, cfg, module, B, precision, trainer_cfg.get("gradient_clip_val"), Path(tmp.name))
        return tmp.cleanup()
    n_params = sum(p.numel() for p in module.parameters() if p.requires_grad)
    timer = StepTimer(a.warmup)
    trainer = _trainer(a.warmup + a.steps, precision, trainer_cfg.get("gradient_clip_val"), [timer])
    trainer.fit(module, RandomDataModule(spec, B, T))
    tmp.cleanup()
    clips_s = timer.timed * B / timer.seconds
    if torch.cuda.is_available():
        mem = f"peak CUDA memory allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    else:
        mem = f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
    print(f"{a.stage} {a.scale}: {n_params / 1e6:.1f}M trainable params, batch {B}x{T} frames {frame_size[0]}x{frame_size[1]}, "
          f"precision {trainer.precision}, threads {torch.get_num_threads()}, device {trainer.strategy.root_device}")
    print(f"{timer.timed} steps in {timer.seconds:.1f}s = {timer.seconds / timer.timed:.3f} s/step; {mem}")
    print(f"train_step_{a.stage}_{a.scale}: {clips_s:.2f} clips/s")


if __name__ == "__main__":
    main(sys.argv[1:])
