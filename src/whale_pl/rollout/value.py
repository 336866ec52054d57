"""Policy evaluation in imagination against the simulator (docs/method.md, "Evaluation").

For every evaluation policy (training families and held-out OOD families) and every start state:

- **real**: the policy acts in Meta-World for ``horizon`` steps from the start state; its return
  ``Σ_t γ^t r_t``; the frames, actions and states are kept (context frame, open-loop actions, true
  per-step error).
- **open-loop**: the dynamics model imagines from the real first frame with the recorded actions.
- **closed-loop**: the same scripted policy (same seed, so the same noise) acts on the state the
  model's state head predicts for each imagined frame (the real start state for frame 0).

Everything runs on the model's clock (``frame_stride`` of its data_spec, k): a step is one decision
held for k recorded steps (``action_repeat * k`` simulator steps), its reward the sum over them,
exactly as the datamodule composes actions and sums rewards for stride-k clips.

Imagined return ``Σ_t γ^t r̂_t`` from the reward head (``reward_BT[:, t]`` is the reward of the
transition into imagined frame t+1, i.e. of action t). Per policy, returns are averaged over tasks
and start states. :mod:`whale_pl.rollout.value_metrics` gives the figures.

For a policy optimiser: :meth:`WorldModel.imagine_closed_loop` / :meth:`WorldModel.imagine_open_loop`
return the rollout ids, and :meth:`WorldModel.step_uncertainty` the per-step uncertainty of each
imagined step (``score_BH`` aligned with ``reward_BT``), so ``r − λ·u`` is one line
(:func:`penalised_reward`).
"""

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
from whale_pl.lit.checkpoint import load_module, read_checkpoint
from whale_pl.data.frames import frames_to_unit
from whale_pl.rollout.retracing import retracing_uncertainty
from whale_pl.rollout.value_metrics import value_figures

PolicyFn = Callable[[int, np.ndarray], np.ndarray]  # (step, states [B, S] raw) -> raw actions [B, A]


# --------------------------------------------------------------------------------------------
# the world model in imagination
# --------------------------------------------------------------------------------------------
class WorldModel:
    """A trained dynamics stage (``DynamicsModule``) seen as a simulator of token frames."""

    def __init__(self, module: torch.nn.Module, steps: int | None = None, temperature: float | None = None) -> None:
        self.module = module.eval()
        self.model = module.model
        hp = module.hparams
        self.normaliser = ActionNormaliser.from_data_spec(hp["data_spec"])
        self.frame_stride = self.normaliser.base  # recorded steps per model step (the model's clock)
        self.steps = int(steps or module.sampling.maskgit_steps)
        self.temperature = float(module.sampling.temperature if temperature is None else temperature)
        self.z_fn = module.z_fn()
        tok = module.tokenizer.model
        V = self.model.codebook_size
        with torch.no_grad():
            ids = torch.arange(V, device=self.device).view(1, 1, V, 1)
            self.codebook_VC = tok.embed(ids).reshape(V, -1).float()

    @classmethod
    def load(cls, ckpt_path: str | Path, device: str = "cpu", **kw) -> "WorldModel":
        from whale_pl.lit.dynamics_module import DynamicsModule

        path = Path(ckpt_path)
        if not path.is_file():
            raise FileNotFoundError(f"dynamics checkpoint not found: {path}")
        return cls(load_module(path, DynamicsModule, map_location=device), **kw)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def uses_behavior(self) -> bool:
        return self.model.uses_behavior

    @torch.no_grad()
    def tokenize(self, frames_BTHWC_uint8: np.ndarray) -> torch.Tensor:
        f = torch.as_tensor(np.ascontiguousarray(frames_BTHWC_uint8), device=self.device)
        return self.module.tokenize(rearrange(f, "b t h w c -> b t c h w"))

    @torch.no_grad()
    def decode(self, ids_BThw: torch.Tensor) -> torch.Tensor:
        """Token frames -> float frames in [-1, 1], [B, T, 3, H, W]."""
        return self.module.tokenizer.model.decode(ids_BThw).float()

    @torch.no_grad()
    def imagine_open_loop(self, context_ids_BChw: torch.Tensor, actions_raw_BTA: np.ndarray,
                          horizon: int, composed: bool = False) -> dict[str, torch.Tensor]:
        """Replay raw actions, one per model step: decisions each held ``frame_stride`` recorded
        steps (the simulator's ``action_repeat``), or with ``composed`` actions already composed
        over the ``frame_stride`` recorded steps of a dataset episode. Returns the model's
        ``imagine`` dict plus ``actions_norm_BTA``."""
        n = self.normaliser
        norm = n.normalise(actions_raw_BTA, n.base) if composed else n.normalise_held(actions_raw_BTA)
        act = torch.as_tensor(norm, device=self.device)
        out = self.model.imagine(context_ids_BChw, act, self.z_fn, horizon=horizon, steps=self.steps,
                                 temperature=self.temperature)
        out["actions_norm_BTA"] = act
        return out

    @torch.no_grad()
    def imagine_closed_loop(self, context_ids_B1hw: torch.Tensor, state0_BS: np.ndarray, policy_fn: PolicyFn,
                            horizon: int) -> dict[str, torch.Tensor]:
        """The policy acts on the state the model predicts: ``policy_fn(t, states)`` gives the raw
        actions at frame t from the real state (t = 0) or the state head's prediction of imagined
        frame t (t > 0); each is held for one model step (``frame_stride`` recorded steps).
        Returns ``ids_BThw``, ``reward_BT``, ``success_BT``, ``state_BTS`` (imagined frames 1..H),
        ``actions_raw_BTA`` and ``actions_norm_BTA`` (the H actions taken)."""
        if self.model.state_head is None:
            raise ValueError("closed-loop evaluation needs a dynamics model with a state head (data with state)")
        if context_ids_B1hw.shape[1] != 1:
            raise ValueError("closed-loop rollouts start from one real frame")
        raw: list[np.ndarray] = []
        norm: list[torch.Tensor] = []

        def act_fn(t: int, so_far: dict[str, torch.Tensor]) -> torch.Tensor:
            state = state0_BS if t == 0 else so_far["state_BTS"][:, -1].float().cpu().numpy()
            raw.append(np.asarray(policy_fn(t, np.asarray(state, dtype=np.float32)), dtype=np.float32))
            norm.append(torch.as_tensor(self.normaliser.normalise_held(raw[-1]), device=self.device))
            return norm[-1]

        out = self.model.imagine(context_ids_B1hw, None, self.z_fn, horizon=horizon, steps=self.steps,
                                 temperature=self.temperature, act_fn=act_fn)
        return {
            "ids_BThw": out["ids_BThw"],
            **{k: out[k].float() for k in ("reward_BT", "success_BT", "state_BTS")},
            "actions_raw_BTA": torch.as_tensor(np.stack(raw, 1)),
            "actions_norm_BTA": torch.stack(norm, 1),
        }

    @torch.no_grad()
    def step_uncertainty(self, context_ids_BChw: torch.Tensor, imagined_ids_BThw: torch.Tensor,
                         actions_norm_BTA: torch.Tensor, K: int = 3, weight: float = 0.5) -> dict[str, torch.Tensor]:
        """Retracing uncertainty of every imagined frame, aligned with ``reward_BT``: column t is the
        uncertainty of imagined frame t+1 (the step of action t). Steps with a single anchor (the
        first) have disagreement 0. ``score_BH``, ``disagreement_BH``, ``entropy_BH``."""
        ids = torch.cat([context_ids_BChw, imagined_ids_BThw], 1)
        C = context_ids_BChw.shape[1]
        return retracing_uncertainty(self.model, ids, actions_norm_BTA, self.normaliser, first=C, K=K,
                                     codebook_VC=self.codebook_VC, z_fn=self.z_fn, weight=weight)


def frame_stride_of(ckpt_path: str | Path) -> int:
    """The clock of a dynamics checkpoint: recorded steps per model step (``data_spec["frame_stride"]``;
    1 for checkpoints from before the key existed)."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"dynamics checkpoint not found: {path}")
    hp = read_checkpoint(path).get("hyper_parameters") or {}
    return int((hp.get("data_spec") or {}).get("frame_stride", 1))


def discounted_return(rewards_BT: np.ndarray | torch.Tensor, discount: float) -> np.ndarray:
    """``Σ_t γ^t r_t`` over the last axis."""
    r = np.asarray(rewards_BT.detach().cpu() if torch.is_tensor(rewards_BT) else rewards_BT, dtype=np.float64)
    return (r * discount ** np.arange(r.shape[-1])).sum(-1)


def penalised_reward(reward_BT: torch.Tensor, uncertainty_BT: torch.Tensor, lam: float) -> torch.Tensor:
    """MOPO-style reward for offline model-based policy optimisation: r − λ·u, per imagined step."""
    if reward_BT.shape != uncertainty_BT.shape:
        raise ValueError(f"reward {tuple(reward_BT.shape)} and uncertainty {tuple(uncertainty_BT.shape)} differ")
    return reward_BT - lam * uncertainty_BT


# --------------------------------------------------------------------------------------------
# real rollouts in the simulator
# --------------------------------------------------------------------------------------------
@dataclass
class EvalSet:
    """Which policies, from which start states, for how long."""

    tasks: list[str]
    train_policies: list[str]
    ood_policies: list[str]
    starts: int = 2
    horizon: int = 32
    discount: float = 0.99
    size: int = 64
    camera: str = "corner2"
    action_repeat: int = 1  # simulator steps per recorded step, as the dataset was collected
    frame_stride: int = 1  # recorded steps per model step: each decision is held that long (the model's clock)
    seed: int = 20_000  # start states: disjoint from the collector's episode seeds by construction
    policies: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.policies = list(self.train_policies) + list(self.ood_policies)
        if not self.policies or not self.tasks:
            raise ValueError(f"an evaluation set needs tasks and policies, got {self.tasks} / {self.policies}")
        if self.starts < 1 or self.horizon < 2 or not 0 < self.discount <= 1 or self.frame_stride < 1:
            raise ValueError(f"starts ({self.starts}) >= 1, horizon ({self.horizon}) >= 2, discount "
                             f"({self.discount}) in (0, 1], frame_stride ({self.frame_stride}) >= 1 expected")

    @classmethod
    def from_data_config(cls, path: str | Path, **kw) -> "EvalSet":
        """Tasks, policies, frame size and camera of a Meta-World dataset config (stages/<scale>/data.yaml).
        Pass ``frame_stride`` (:func:`frame_stride_of` the checkpoint) for a model on a coarser clock."""
        from whale_pl.data.metaworld import CollectConfig

        c = CollectConfig.from_yaml(path)
        if not c.ood_policies:
            raise ValueError(f"{path}: no ood_policies: the OOD value gap needs held-out policy families")
        return cls(tasks=list(c.tasks), train_policies=list(c.train_policies), ood_policies=list(c.ood_policies),
                   size=c.size, camera=c.camera, action_repeat=c.action_repeat, **kw)

    def start_seed(self, task: str, i: int) -> int:
        """The same start state (task variation, env seed, policy noise seed) for every policy."""
        ss = np.random.SeedSequence([self.seed, zlib.crc32(task.encode()), i])
        return int(ss.generate_state(1, np.uint32)[0])

    def split_of(self, policy: str) -> str:
        """Which split a policy belongs to: "ood" (a held-out family) or "train"."""
        return "ood" if policy in self.ood_policies else "train"


@dataclass
class RealRollouts:
    """Real episodes of every (task, policy, start), in one flat batch."""

    task: list[str]
    policy: list[str]
    seed: list[int]
    frames: np.ndarray  # uint8 [B, H, h, w, 3]: frame t before action t
    actions: np.ndarray  # float32 [B, H, A] raw
    rewards: np.ndarray  # float32 [B, H]
    state: np.ndarray  # float32 [B, H, S]
    seconds: float
    frame_stride: int = 1  # recorded steps per decision (EvalSet.frame_stride)


def collect_real(ev: EvalSet, progress: bool = True) -> RealRollouts:
    """Run every policy from every start state in Meta-World (rendering in this process)."""
    from whale_pl.data.metaworld import MetaWorldEnv, rollout

    t0 = time.time()
    rows: dict[str, list] = {k: [] for k in ("task", "policy", "seed", "frames", "actions", "rewards", "state")}
    total = len(ev.tasks) * len(ev.policies) * ev.starts
    bar = tqdm(total=total, desc="real rollouts", disable=not progress, leave=False)
    for task in ev.tasks:
        env = MetaWorldEnv(task, ev.size, ev.camera)
        try:
            for pol in ev.policies:
                for i in range(ev.starts):
                    seed = ev.start_seed(task, i)
                    ep = rollout(env, pol, seed, ev.horizon, ev.action_repeat * ev.frame_stride)
                    for k, v in (("task", task), ("policy", pol), ("seed", seed), ("frames", ep.frames),
                                 ("actions", ep.actions), ("rewards", ep.rewards), ("state", ep.state)):
                        rows[k].append(v)
                    bar.update(1)
        finally:
            env.close()
    bar.close()
    return RealRollouts(task=rows["task"], policy=rows["policy"], seed=rows["seed"],
                        frames=np.stack(rows["frames"]), actions=np.stack(rows["actions"]),
                        rewards=np.stack(rows["rewards"]), state=np.stack(rows["state"]),
                        seconds=time.time() - t0, frame_stride=ev.frame_stride)


def scripted_policy_fn(real: RealRollouts, index: Sequence[int]) -> PolicyFn:
    """Fresh instances of the rollouts' policies (same task, same seed -> same noise), batched."""
    from whale_pl.data.policies import parse_policy

    pols = []
    for i in index:
        p = parse_policy(real.policy[i])
        p.reset(real.task[i], np.random.default_rng(real.seed[i]))
        pols.append(p)

    def act(t: int, states_BS: np.ndarray) -> np.ndarray:
        return np.stack([p.act(s.astype(np.float64)) for p, s in zip(pols, states_BS)])

    return act


# --------------------------------------------------------------------------------------------
# value figures of one world model
# --------------------------------------------------------------------------------------------
def per_policy(values_B: np.ndarray, real: RealRollouts, policies: Sequence[str]) -> np.ndarray:
    """Mean of ``values_B`` over each policy's episodes, in the order of ``policies``."""
    pol = np.asarray(real.policy)
    return np.array([values_B[pol == p].mean() for p in policies])


def _chunks(n: int, size: int) -> list[np.ndarray]:
    return [np.arange(i, min(n, i + size)) for i in range(0, n, size)]


@torch.no_grad()
def evaluate_values(wm: WorldModel, real: RealRollouts, ev: EvalSet, modes: Sequence[str] = ("open_loop", "closed_loop"),
                    batch_size: int = 32, progress: bool = True) -> dict:
    """Real and imagined returns per policy, and value gap / Spearman / Pearson / regret@1 over all
    policies, the training-family ones and the OOD ones, for each mode. Keeps the open-loop
    rollouts (``_rollouts``) for the uncertainty evaluation."""
    if real.frame_stride != wm.frame_stride:
        raise ValueError(f"the real rollouts hold each decision {real.frame_stride} recorded step(s) but the world "
                         f"model steps {wm.frame_stride} at a time (its data_spec frame_stride): build the EvalSet "
                         f"with frame_stride=frame_stride_of(<checkpoint>)")
    B, H = real.actions.shape[:2]
    v_real = discounted_return(real.rewards, ev.discount)
    out: dict = {"policies": list(ev.policies), "split": [ev.split_of(p) for p in ev.policies],
                 "real_return": per_policy(v_real, real, ev.policies).tolist(), "discount": ev.discount,
                 "horizon": H, "episodes": B}
    for mode in modes:
        t0 = time.time()
        v_hat = np.zeros(B)
        ids_all = []
        for idx in tqdm(_chunks(B, batch_size), desc=f"imagine {mode}", disable=not progress, leave=False):
            ctx = wm.tokenize(real.frames[idx, :1])
            if mode == "open_loop":
                o = wm.imagine_open_loop(ctx, real.actions[idx], H)
            elif mode == "closed_loop":
                o = wm.imagine_closed_loop(ctx, real.state[idx, 0], scripted_policy_fn(real, idx), H)
            else:
                raise ValueError(f"unknown mode {mode!r}; expected open_loop or closed_loop")
            v_hat[idx] = discounted_return(o["reward_BT"], ev.discount)
            ids_all.append((ctx, o["ids_BThw"], o["actions_norm_BTA"]))
        res = {"imagined_return": per_policy(v_hat, real, ev.policies).tolist(), "seconds": time.time() - t0}
        vr, vi = np.array(out["real_return"]), np.array(res["imagined_return"])
        split = np.array(out["split"])
        for name, sel in (("all", np.ones(len(vr), bool)), ("train", split == "train"), ("ood", split == "ood")):
            res[name] = value_figures(vr[sel], vi[sel]) if sel.sum() >= 2 and np.ptp(vr[sel]) > 0 else None
        out[mode] = res
        if mode == "open_loop":
            out["_rollouts"] = ids_all
    return out


# --------------------------------------------------------------------------------------------
# uncertainty against the true per-step error, on the open-loop rollouts
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_uncertainty(wm: WorldModel, real: RealRollouts, rollouts: list, K: int = 3,
                         ensemble: Sequence[WorldModel] | None = None, weight: float = 0.5,
                         progress: bool = True) -> dict:
    """Per-step uncertainty (retracing on ``wm``; the ensemble's disagreement when given) against the
    true error of imagined frame n = 1..H-1 against real frame n: pixel MSE of the decoded frame and
    the share of wrong tokens. Quality (Spearman, AUROC with bad = error above the median) over the
    steps that have >= 2 retracing anchors (n >= 2), the same steps for both methods. Wall-clock
    seconds of each method's uncertainty computation give the cost ratio."""
    from whale_pl.rollout.ensemble import ensemble_uncertainty
    from whale_pl.rollout.value_metrics import uncertainty_quality

    parts = ("score", "disagreement", "entropy")
    acc: dict[str, list] = {k: [] for k in ["mse", "token_err"] + [f"retracing_{p}" for p in parts]
                            + ([f"ensemble_{p}" for p in parts] if ensemble else [])}
    secs = {"retracing": 0.0, "ensemble": 0.0}
    start = 0
    for ctx, imag, acts in tqdm(rollouts, desc="uncertainty", disable=not progress, leave=False):
        b = ctx.shape[0]
        idx = np.arange(start, start + b)
        start += b
        H = imag.shape[1]
        ids = torch.cat([ctx, imag[:, : H - 1]], 1)  # frames 0..H-1; frames 1..H-1 have a real twin
        real_f = torch.as_tensor(real.frames[idx, 1:H], device=wm.device)
        real_unit = frames_to_unit(rearrange(real_f, "b t h w c -> b t c h w"))
        acc["mse"].append(((wm.decode(ids[:, 1:]) - real_unit) ** 2).mean(dim=(2, 3, 4)).cpu())
        acc["token_err"].append((wm.tokenize(real.frames[idx, 1:H]) != ids[:, 1:]).float().mean(dim=(2, 3)).cpu())
        t0 = time.perf_counter()
        u = retracing_uncertainty(wm.model, ids, acts, wm.normaliser, first=1, K=K, codebook_VC=wm.codebook_VC,
                                  z_fn=wm.z_fn, weight=weight)
        secs["retracing"] += time.perf_counter() - t0
        for p in parts:
            acc[f"retracing_{p}"].append(u[f"{p}_BH"].cpu())
        if ensemble:
            t0 = time.perf_counter()
            e = ensemble_uncertainty([m.model for m in ensemble], ids, acts, first=1, codebook_VC=wm.codebook_VC,
                                     z_fns=[m.z_fn for m in ensemble], weight=weight)
            secs["ensemble"] += time.perf_counter() - t0
            for p in parts:
                acc[f"ensemble_{p}"].append(e[f"{p}_BH"].cpu())
    cat = {k: torch.cat(v).numpy() for k, v in acc.items()}  # each [B, H-1]: column j = frame j+1
    sel = (slice(None), slice(1, None))  # frames n >= 2
    out: dict = {"K": K, "ensemble_size": len(ensemble) if ensemble else 0, "steps_scored": int(cat["mse"][sel].size),
                 "seconds": secs, "per_step": {k: v.tolist() for k, v in cat.items()}}
    for target in ("mse", "token_err"):
        e = cat[target][sel].ravel()
        out[f"quality_vs_{target}"] = {k: uncertainty_quality(v[sel].ravel(), e) for k, v in cat.items()
                                       if k not in ("mse", "token_err")}
    if ensemble:
        out["cost_ratio_ensemble_over_retracing"] = secs["ensemble"] / max(secs["retracing"], 1e-9)
    return out


def value_metrics_for_checkpoint(ckpt_path: str, data_config: str = "stages/demo/data.yaml", starts: int = 1,
                                 horizon: int = 24, discount: float = 0.99, mode: str = "open_loop",
                                 device: str = "cpu") -> dict[str, float]:
    """The evaluation callback's value hook (docs/contracts.md): flat floats of one mode."""
    wm = WorldModel.load(ckpt_path, device)
    ev = EvalSet.from_data_config(data_config, starts=starts, horizon=horizon, discount=discount,
                                  frame_stride=wm.frame_stride)
    res = evaluate_values(wm, collect_real(ev, progress=False), ev, modes=(mode,), progress=False)[mode]
    flat: dict[str, float] = {}
    for split in ("all", "ood", "train"):
        pre = "" if split == "all" else f"{split}_"
        for k, v in (res[split] or {}).items():
            flat[pre + (f"return_{k}" if k in ("spearman", "pearson") else k)] = float(v)
    return flat
