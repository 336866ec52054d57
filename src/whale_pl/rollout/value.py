"""Policy evaluation in imagination against the simulator, open and closed loop (docs/method.md, "Value
evaluation"); a model step is one decision held for the model's ``frame_stride`` recorded steps."""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from tqdm import tqdm

from whale_pl.data.actions import ActionNormaliser
from whale_pl.data.frames import frames_to_unit
from whale_pl.data.policies import ood_split, parse_policy
from whale_pl.lit.checkpoint import load_module, read_checkpoint
from whale_pl.lit.dynamics_module import DynamicsModule
from whale_pl.metrics.video import PSNR_CAP_DB, video_psnr_ssim
from whale_pl.rollout.retracing import ensemble_uncertainty, retracing_uncertainty
from whale_pl.rollout.value_metrics import split_masks, task_scale, uncertainty_intervals, value_stat

PolicyFn = Callable[[int, np.ndarray], np.ndarray]  # (step, states [B, S] raw) -> raw actions [B, A]


def _frames_BTCHW(frames_BThwc: np.ndarray, device: torch.device) -> torch.Tensor:
    return rearrange(torch.as_tensor(np.ascontiguousarray(frames_BThwc), device=device), "b t h w c -> b t c h w")


class WorldModel:
    """A trained dynamics stage (``DynamicsModule``) seen as a simulator of token frames."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module, self.model, self.z_fn = module.eval(), module.model, module.z_fn()
        self.normaliser = ActionNormaliser.from_data_spec(module.hparams["data_spec"])
        self.frame_stride = self.normaliser.base  # recorded steps per model step (the model's clock)
        self.steps, self.temperature = int(module.sampling.maskgit_steps), float(module.sampling.temperature)
        V = self.model.codebook_size
        with torch.no_grad():
            ids = torch.arange(V, device=self.device).view(1, 1, V, 1)
            self.codebook_VE = module.tokenizer.model.embed(ids).reshape(V, -1).float()

    @classmethod
    def load(cls, ckpt_path: str | Path, device: str = "cpu") -> "WorldModel":
        """The world model of a dynamics checkpoint."""
        return cls(load_module(ckpt_path, DynamicsModule, map_location=device))

    @property
    def device(self) -> torch.device:
        """Where the model's weights are."""
        return next(self.model.parameters()).device

    @property
    def uses_behavior(self) -> bool:
        """Whether the model is behavior-conditioned."""
        return self.model.uses_behavior

    @torch.no_grad()
    def tokenize(self, frames_BTHWC_uint8: np.ndarray) -> torch.Tensor:
        """uint8 frames [B, T, H, W, 3] -> token ids [B, T, h, w]."""
        return self.module.tokenize(_frames_BTCHW(frames_BTHWC_uint8, self.device))

    @torch.no_grad()
    def decode(self, ids_BThw: torch.Tensor) -> torch.Tensor:
        """Token frames -> float frames in [-1, 1], [B, T, 3, H, W]."""
        return self.module.tokenizer.model.decode(ids_BThw).float()

    @torch.no_grad()
    def imagine_open_loop(self, context_ids_BThw: torch.Tensor, actions_raw_BTA: np.ndarray,
                          horizon: int, composed: bool = False) -> dict[str, torch.Tensor]:
        """Replay raw actions, one per model step, held ``frame_stride`` recorded steps or ``composed`` over them
        (a dataset episode): the model's ``imagine`` dict plus ``actions_norm_BTA``."""
        n = self.normaliser
        norm = n.normalise(actions_raw_BTA, n.base) if composed else n.normalise_held(actions_raw_BTA)
        act = torch.as_tensor(norm, device=self.device)
        out = self.model.imagine(context_ids_BThw, act, self.z_fn, horizon=horizon, steps=self.steps,
                                 temperature=self.temperature)
        out["actions_norm_BTA"] = act
        return out

    @torch.no_grad()
    def imagine_closed_loop(self, context_ids_B1hw: torch.Tensor, state0_BP: np.ndarray, policy_fn: PolicyFn,
                            horizon: int) -> dict[str, torch.Tensor]:
        """``policy_fn(t, states)`` acts on the real state (t = 0), then on the state head's prediction of imagined
        frame t, each action held one model step: ``ids_BThw``, ``reward_BT``, ``success_BT``, ``state_BTP``, ..."""
        if self.model.state_head is None:
            raise ValueError("closed-loop evaluation needs a dynamics model with a state head (data with state)")
        norm: list[torch.Tensor] = []

        def act_fn(t: int, so_far: dict[str, torch.Tensor]) -> torch.Tensor:
            """The policy's action at step t from the real state (t = 0) or the predicted one."""
            state = state0_BP if t == 0 else so_far["state_BTP"][:, -1].float().cpu().numpy()
            raw = np.asarray(policy_fn(t, np.asarray(state, dtype=np.float32)), dtype=np.float32)
            norm.append(torch.as_tensor(self.normaliser.normalise_held(raw), device=self.device))
            return norm[-1]

        out = self.model.imagine(context_ids_B1hw, None, self.z_fn, horizon=horizon, steps=self.steps,
                                 temperature=self.temperature, act_fn=act_fn)
        return {"ids_BThw": out["ids_BThw"], **{k: out[k].float() for k in ("reward_BT", "success_BT", "state_BTP")},
                "actions_norm_BTA": torch.stack(norm, 1)}

    @torch.no_grad()
    def step_uncertainty(self, context_ids_BThw: torch.Tensor, imagined_ids_BThw: torch.Tensor,
                         actions_norm_BTA: torch.Tensor, K: int = 3, weight: float = 0.5) -> dict[str, torch.Tensor]:
        """Retracing uncertainty of every imagined frame, aligned with ``reward_BT``: ``score_BT``, ..."""
        ids = torch.cat([context_ids_BThw, imagined_ids_BThw], 1)
        return retracing_uncertainty(self.model, ids, actions_norm_BTA, self.normaliser, context_ids_BThw.shape[1],
                                     K=K, codebook_VE=self.codebook_VE, z_fn=self.z_fn, weight=weight)


def frame_stride_of(ckpt_path: str | Path) -> int:
    """The clock of a dynamics checkpoint: recorded steps per model step (data_spec ``frame_stride``, else 1)."""
    hp = read_checkpoint(ckpt_path).get("hyper_parameters") or {}
    return int((hp.get("data_spec") or {}).get("frame_stride", 1))


def discounted_return(rewards_BT: np.ndarray | torch.Tensor, discount: float) -> np.ndarray:
    """``Σ_t γ^t r_t`` over the last axis."""
    r = np.asarray(rewards_BT.detach().cpu() if torch.is_tensor(rewards_BT) else rewards_BT, dtype=np.float64)
    return (r * discount ** np.arange(r.shape[-1])).sum(-1)


def start_seeds(base: int, task: str, n: int) -> list[int]:
    """The first n start states of a task (task variation, env seed, policy noise seed) from a seed base."""
    return [int(np.random.SeedSequence([base, zlib.crc32(task.encode()), i]).generate_state(1, np.uint32)[0])
            for i in range(n)]


@dataclass
class EvalSet:
    """Which policies (by split), from which start states, for how long."""

    tasks: list[str]
    splits: dict[str, list[str]]  # split name -> its policies (disjoint), e.g. val (training families), ood_params
    starts: int = 5
    horizon: int = 32
    discount: float = 0.99
    size: int = 64
    camera: str = "corner2"
    action_repeat: int = 1  # simulator steps per recorded step, as the dataset was collected
    frame_stride: int = 1  # recorded steps per model step: each decision is held that long
    seed: int = 20_000  # start states: disjoint from the collector's episode seeds by construction
    policies: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.splits = {k: list(v) for k, v in self.splits.items() if v}
        self.policies = [p for v in self.splits.values() for p in v]  # tasks, disjoint policies: CollectConfig
        if self.starts < 1 or self.horizon < 2 or not 0 < self.discount <= 1 or self.frame_stride < 1:
            raise ValueError(f"starts ({self.starts}) >= 1, horizon ({self.horizon}) >= 2, discount "
                             f"({self.discount}) in (0, 1], frame_stride ({self.frame_stride}) >= 1 expected")

    @classmethod
    def from_data_config(cls, path: str | Path, **kw) -> "EvalSet":
        """Tasks, policies by split (``val``, then :func:`ood_split`), size and camera of a Meta-World data config."""
        from whale_pl.data.metaworld import CollectConfig

        c = CollectConfig.from_yaml(path)
        splits: dict[str, list[str]] = {"val": list(c.train_policies), "ood_params": [], "ood_families": []}
        for p in c.ood_policies:
            splits[ood_split(p, c.train_policies)].append(p)
        return cls(tasks=list(c.tasks), splits=splits, size=c.size, camera=c.camera, action_repeat=c.action_repeat,
                   **kw)

    def split_of(self, policy: str) -> str:
        """The split a policy belongs to."""
        return next(k for k, v in self.splits.items() if policy in v)


@dataclass
class RealRollouts:
    """Real episodes of every (task, policy, start), task-major, in one flat batch (frame t before action t)."""

    task: list[str]
    policy: list[str]
    seed: list[int]
    frames: np.ndarray  # uint8 [B, H, h, w, 3]
    actions: np.ndarray  # float32 [B, H, A] raw
    rewards: np.ndarray  # float32 [B, H]
    state: np.ndarray  # float32 [B, H, S]
    seconds: float
    grid_shape: tuple[int, int, int] = (0, 0, 0)  # (tasks T, policies P, starts K): B = T * P * K

    def grid(self, x_B: np.ndarray) -> np.ndarray:
        """Per-episode values [B, ...] as [T, P, K, ...]."""
        x = np.asarray(x_B)
        return x.reshape(*self.grid_shape, *x.shape[1:])


def collect_real(ev: EvalSet, progress: bool = True) -> RealRollouts:
    """Run every policy from every start state in Meta-World (rendering in this process)."""
    from whale_pl.data.metaworld import MetaWorldEnv, rollout

    t0, keys, eps = time.time(), [], []
    bar = tqdm(total=len(ev.tasks) * len(ev.policies) * ev.starts, desc="real rollouts", disable=not progress,
               leave=False)
    for task in ev.tasks:
        env = MetaWorldEnv(task, ev.size, ev.camera)
        try:
            for pol in ev.policies:
                for seed in start_seeds(ev.seed, task, ev.starts):  # the same start states for every policy
                    keys.append((task, pol, seed))
                    eps.append(rollout(env, pol, seed, ev.horizon, ev.action_repeat * ev.frame_stride))
                    bar.update(1)
        finally:
            env.close()
    bar.close()
    task, policy, seed = (list(x) for x in zip(*keys))
    arrays = (np.stack([getattr(e, k) for e in eps]) for k in ("frames", "actions", "rewards", "state"))
    return RealRollouts(task, policy, seed, *arrays, seconds=time.time() - t0,
                        grid_shape=(len(ev.tasks), len(ev.policies), ev.starts))


def scripted_policy_fn(real: RealRollouts, index: Sequence[int]) -> PolicyFn:
    """Fresh instances of the rollouts' policies (same task, same seed -> same noise), batched."""
    pols = [parse_policy(real.policy[i]) for i in index]
    for p, i in zip(pols, index):
        p.reset(real.task[i], np.random.default_rng(real.seed[i]))
    return lambda t, states_BP: np.stack([p.act(s.astype(np.float64)) for p, s in zip(pols, states_BP)])


@torch.no_grad()
def evaluate_values(wm: WorldModel, real: RealRollouts, ev: EvalSet, modes: Sequence[str],
                    progress: bool = True) -> dict:
    """Real and, per mode, imagined returns (``real_TPK``, ``<mode>.imagined_TPK``) of every episode, and the
    open-loop rollouts (``_rollouts``: context ids, imagined ids, normalised actions per batch)."""
    B, H = real.actions.shape[:2]
    out: dict = {"tasks": list(ev.tasks), "policies": list(ev.policies), "split": [ev.split_of(p) for p in ev.policies],
                 "real_TPK": real.grid(discounted_return(real.rewards, ev.discount)).tolist(),
                 "discount": ev.discount, "horizon": H, "episodes": B}
    for mode in modes:
        t0, v_hat, ids_all = time.time(), np.zeros(B), []
        for i in tqdm(range(0, B, 32), desc=f"imagine {mode}", disable=not progress, leave=False):
            idx = np.arange(i, min(B, i + 32))
            ctx = wm.tokenize(real.frames[idx, :1])
            if mode == "open_loop":
                o = wm.imagine_open_loop(ctx, real.actions[idx], H)
            else:
                o = wm.imagine_closed_loop(ctx, real.state[idx, 0], scripted_policy_fn(real, idx), H)
            v_hat[idx] = discounted_return(o["reward_BT"], ev.discount)
            ids_all.append((ctx, o["ids_BThw"], o["actions_norm_BTA"]))
        out[mode] = {"imagined_TPK": real.grid(v_hat).tolist(), "seconds": time.time() - t0}
        if mode == "open_loop":
            out["_rollouts"] = ids_all
    return out


@torch.no_grad()
def rollout_errors(wm: WorldModel, real: RealRollouts, rollouts: list,
                   baselines: bool = False) -> dict[str, np.ndarray]:
    """Imagined frames n = 1..H-1 of the open-loop rollouts against their real twins, [B, H-1]: ``mse``, ``token_err``,
    ``psnr``, ``ssim``; ``baselines`` adds ``copy_*`` (the last real frame held) and ``recon_*`` (the tokenizer)."""
    acc: dict[str, list] = {}
    start = 0
    for ctx, imag, _ in rollouts:
        idx, start = np.arange(start, start + len(ctx)), start + len(ctx)
        ids, real_u8 = imag[:, :-1], real.frames[idx, 1:imag.shape[1]]
        real_f, real_ids = _frames_BTCHW(real_u8, wm.device), wm.tokenize(real_u8)
        fakes = {"": wm.decode(ids)}
        if baselines:
            fakes["copy_"] = _frames_BTCHW(real.frames[idx, :1], wm.device).expand_as(real_f)
            fakes["recon_"] = wm.decode(real_ids)
        for pre, fake in fakes.items():
            sc = video_psnr_ssim(real_f, fake)
            acc.setdefault(f"{pre}psnr", []).append(sc["psnr"].clamp(max=PSNR_CAP_DB).cpu())
            acc.setdefault(f"{pre}ssim", []).append(sc["ssim"].cpu())
        acc.setdefault("mse", []).append(((fakes[""] - frames_to_unit(real_f)) ** 2).mean(dim=(2, 3, 4)).cpu())
        acc.setdefault("token_err", []).append((real_ids != ids).float().mean(dim=(2, 3)).cpu())
    return {k: torch.cat(v).double().numpy() for k, v in acc.items()}


@torch.no_grad()
def uncertainty_summary(wm: WorldModel, rollouts: list, errors: dict, K: int, members: list[WorldModel]) -> dict:
    """Seconds and ``uncertainty_intervals`` of retracing and of the ensemble of ``members`` against MSE and token
    error over imagined frames n >= 2 (>= 2 anchors)."""
    methods = {
        "retracing": lambda ids, acts: retracing_uncertainty(wm.model, ids, acts, wm.normaliser, first=1, K=K,
                                                             codebook_VE=wm.codebook_VE, z_fn=wm.z_fn),
        "ensemble": lambda ids, acts: ensemble_uncertainty([e.model for e in members], ids, acts, first=1,
                                                           codebook_VE=wm.codebook_VE, z_fns=[e.z_fn for e in members]),
    }
    acc: dict[str, list] = {m: [] for m in methods}
    secs = dict.fromkeys(methods, 0.0)
    for ctx, imag, acts in tqdm(rollouts, desc="uncertainty", leave=False):
        ids = torch.cat([ctx, imag[:, : imag.shape[1] - 1]], 1)  # frames 0..H-1; frames 1..H-1 have a real twin
        for m, uncertainty in methods.items():
            t0 = time.perf_counter()
            score_BT = uncertainty(ids, acts)["score_BT"]
            secs[m] += time.perf_counter() - t0
            acc[m].append(score_BT.cpu())
    scores = {m: torch.cat(v).double().numpy()[:, 1:] for m, v in acc.items()}
    return {"K": K, "seconds": secs,
            **{t: uncertainty_intervals(scores, errors[t][:, 1:]) for t in ("mse", "token_err")}}


def value_metrics_for_checkpoint(ckpt_path: str, data_config: str = "stages/demo/data.yaml", starts: int = 1,
                                 horizon: int = 24) -> dict[str, float]:
    """The evaluation callback's value hook: defined open-loop figures ``<split>_<figure>``, splits and ``all``."""
    wm = WorldModel.load(ckpt_path)
    ev = EvalSet.from_data_config(data_config, starts=starts, horizon=horizon, frame_stride=wm.frame_stride)
    res = evaluate_values(wm, collect_real(ev, progress=False), ev, modes=("open_loop",), progress=False)
    real, imag = np.array(res["real_TPK"]), np.array(res["open_loop"]["imagined_TPK"])[None]
    scale_T = task_scale(real)
    out = {f"{name}_{k}": float(v) for name, sel in split_masks(res["split"]).items()
           for k, v in value_stat(real[:, sel], imag[:, :, sel], scale_T).items()}
    return {k: v for k, v in out.items() if np.isfinite(v)}


if __name__ == "__main__":  # the evaluation callback's child process: argv = checkpoint, keyword arguments (JSON)
    import json
    import sys

    print(json.dumps(value_metrics_for_checkpoint(sys.argv[1], **json.loads(sys.argv[2]))))
