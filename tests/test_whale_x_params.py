"""The three Whale-X stage models, built from stages/whale_x/*.yaml on the meta device (no memory,
no checkpoints), hold 414M parameters in total (within 10 %), as the paper's Whale-X does."""

import inspect
from pathlib import Path

import pytest
import torch
import yaml

from whale_pl.models.behavior import BehaviorModel
from whale_pl.models.dynamics import DynamicsModel
from whale_pl.models.tokenizer import VideoTokenizer

STAGES = Path(__file__).resolve().parents[1] / "stages" / "whale_x"
OXE_ACTION_DIM = 7  # 7-D end-effector deltas (docs/method.md, Scales)


def _init_args(stage: str) -> dict:
    path = STAGES / f"{stage}.yaml"
    args = yaml.safe_load(path.read_text())["model"]["init_args"]
    return {**args, **args.get("net", {})}  # the architecture is the net: group


def _kwargs_for(cls, args: dict, **fixed) -> dict:
    names = set(inspect.signature(cls.__init__).parameters) - {"self"}
    kw = {k: v for k, v in args.items() if k in names}
    kw.update({k: v for k, v in fixed.items() if k in names})
    return kw


def _count(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_whale_x_total_is_414m():
    with torch.device("meta"):
        tok = VideoTokenizer(**_kwargs_for(VideoTokenizer, _init_args("tokenizer")))
        h, w = tok.grid_hw()
        beh_args = _init_args("behavior")
        beh = BehaviorModel(**_kwargs_for(BehaviorModel, beh_args, code_dim=tok.code_dim,
                                          action_dim=OXE_ACTION_DIM, grid_tokens=h * w))
        dyn_args = _init_args("dynamics")
        dyn = DynamicsModel(
            codebook_size=tok.codebook_size, grid_hw=(h, w), action_dim=OXE_ACTION_DIM,
            behavior_dim=beh.z_dim if dyn_args.get("use_behavior", True) else 0, state_dim=0,
            **{k: dyn_args[k] for k in ("dim", "depth", "heads", "max_frames", "max_stride")
               if k in dyn_args},
        )
    counts = {"tokenizer": _count(tok), "behavior": _count(beh), "dynamics": _count(dyn)}
    total = sum(counts.values())
    assert total == pytest.approx(414e6, rel=0.10), f"{counts} -> {total / 1e6:.1f}M, expected 414M +- 10%"
    # the dynamics model is the bulk of a world model, as in the paper's scaling
    assert counts["dynamics"] > counts["tokenizer"] and counts["dynamics"] > counts["behavior"], counts
