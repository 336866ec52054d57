"""Meta-World behavior datasets: rollouts of the policy families in ``policies.py`` into shards, one env per
spawned worker (built there, never pickled), rendered by ``mujoco.Renderer`` (shadows, multisampling and
reflections off), frames upright; each episode seeded from (config seed, task, policy, split, index) and
written in job order, so a config gives the same bytes whatever the number of workers (docs/contracts.md)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from whale_pl.data.episode import METAWORLD_ACTION_SPACE, Episode
from whale_pl.data.ownership import claim, config_hash, ownership
from whale_pl.data.policies import parse_policy
from whale_pl.data.shards import ShardError, ShardWriter, read_manifest, verify_dataset
from whale_pl.data.workers import map_ordered

log = logging.getLogger(__name__)
SPLIT_CODE = {"train": 0, "val": 1, "ood": 2}
STATE_DIM = 39
KIND = "whale-data metaworld"
# every Meta-World v3 model has these cameras and a 640 x 480 offscreen framebuffer (checked in the tests)
CAMERAS = ("topview", "corner", "corner2", "corner3", "corner4", "behindGripper", "gripperPOV")
MAX_SIZE = 480
MAY_BE_ZERO = ("val_episodes_per_policy", "ood_episodes_per_policy", "seed")  # every other int field is >= 1


@dataclass
class CollectConfig:
    """What to collect. ``out`` and ``workers`` do not change the data; everything else does."""

    tasks: list[str]
    train_policies: list[str]
    ood_policies: list[str] = field(default_factory=list)
    episodes_per_policy: int = 4
    val_episodes_per_policy: int = 1
    ood_episodes_per_policy: int = 2
    max_steps: int = 120
    action_repeat: int = 1
    size: int = 64
    camera: str = "corner2"
    seed: int = 0
    episodes_per_shard: int = 16
    out: str = "data_shards/metaworld/demo"
    workers: int = 2
    name: str = "metaworld"

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "CollectConfig":
        """A config from a dataset YAML; ``overrides`` that are not None replace its keys."""
        import yaml

        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"dataset config {p} does not exist")
        d = yaml.safe_load(p.read_text()) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{p}: unknown keys {unknown}; valid keys: {sorted(known)}")
        d.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**d)

    def __post_init__(self) -> None:
        """Refuse, before any work, a value a user wrote wrong, naming the key, the value and what is valid."""
        import metaworld

        for f in dataclasses.fields(self):
            k, v = f.name, getattr(self, f.name)
            if f.type == "list[str]":
                if isinstance(v, str):  # `tasks: push-v3` would otherwise be read as ['p', 'u', ...]
                    raise ValueError(f"{k} must be a list of names, got the string {v!r} (write [{v}])")
                if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
                    raise ValueError(f"{k} must be a list of names, got {v!r}")
                setattr(self, k, list(v))
            elif f.type == "int" and (isinstance(v, bool) or not isinstance(v, int)):
                raise ValueError(f"{k} must be an integer, got {v!r}")
            elif f.type == "int" and v < (low := 0 if k in MAY_BE_ZERO else 1):
                raise ValueError(f"{k} must be >= {low}, got {v}")
            elif f.type == "str" and not isinstance(v, str):
                raise ValueError(f"{k} must be a string, got {v!r}")
        if not self.tasks or not self.train_policies:
            raise ValueError("tasks and train_policies must each name at least one")
        bad = sorted(set(self.tasks) - set(metaworld.ALL_V3_ENVIRONMENTS))
        if bad:
            raise ValueError(f"unknown Meta-World task(s) {bad}; valid tasks: {sorted(metaworld.ALL_V3_ENVIRONMENTS)}")
        names = self.train_policies + self.ood_policies
        for n in names:
            parse_policy(n)  # raises PolicyNameError listing the valid forms
        if len(set(names)) != len(names):
            both = sorted(set(self.train_policies) & set(self.ood_policies))
            raise ValueError(f"policies {both} are both training and OOD policies" if both else
                             "a policy is listed twice")
        if self.size > MAX_SIZE:
            raise ValueError(f"size {self.size} > {MAX_SIZE}: Meta-World renders at most {MAX_SIZE} x {MAX_SIZE} "
                             "(its 640 x 480 offscreen framebuffer)")
        if self.camera not in CAMERAS:
            raise ValueError(f"unknown camera {self.camera!r}; valid cameras: {list(CAMERAS)}")
        if self.max_steps * self.action_repeat > 500:
            raise ValueError(f"max_steps {self.max_steps} x action_repeat {self.action_repeat} = "
                             f"{self.max_steps * self.action_repeat} simulator steps > 500, Meta-World's episode limit")

    def data_json(self) -> dict:
        """The fields that determine the data (stored in the manifest, compared on reuse)."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("out", "workers")}
        if d["action_repeat"] == 1:  # datasets collected before the option existed stay valid
            d.pop("action_repeat")
        return d


@dataclass(frozen=True)
class Job:
    """One episode to collect: its task, policy, split, index within them, and seed."""
    task: str
    policy: str
    split: str
    episode: int
    seed: int


def episode_seed(base: int, task: str, policy: str, split: str, idx: int) -> int:
    """The seed of one episode, from (config seed, task, policy, split, index) only."""
    ss = np.random.SeedSequence([base, zlib.crc32(task.encode()), zlib.crc32(policy.encode()), SPLIT_CODE[split], idx])
    return int(ss.generate_state(1, np.uint32)[0])


def make_jobs(cfg: CollectConfig) -> list[Job]:
    """All episodes to collect, grouped by task (so a worker rarely rebuilds its env)."""
    jobs = []
    for task in cfg.tasks:
        groups = [(p, "train", cfg.episodes_per_policy) for p in cfg.train_policies]
        groups += [(p, "val", cfg.val_episodes_per_policy) for p in cfg.train_policies]
        groups += [(p, "ood", cfg.ood_episodes_per_policy) for p in cfg.ood_policies]
        for pol, split, n in groups:
            for i in range(n):
                jobs.append(Job(task, pol, split, i, episode_seed(cfg.seed, task, pol, split, i)))
    return jobs


class MetaWorldEnv:
    """One Meta-World task with a fast offscreen renderer. Build it in the process that renders."""

    def __init__(self, task: str, size: int, camera: str):
        os.environ.setdefault("MUJOCO_GL", "egl")
        os.environ.setdefault("LP_NUM_THREADS", "0")  # llvmpipe rasterises in this thread: one worker per core
        import metaworld
        import mujoco

        self.task, self.size, self.camera = task, size, camera
        self.mt = metaworld.MT1(task, seed=0)
        self.env = self.mt.train_classes[task]()
        m = self.env.model
        m.vis.quality.shadowsize = 0
        m.vis.quality.offsamples = 0
        m.mat_reflectance[:] = 0
        self.renderer = mujoco.Renderer(m, size, size)
        self.control_hz = float(1.0 / self.env.dt)

    def render(self) -> np.ndarray:
        """The current frame, upright, uint8 [size, size, 3]."""
        self.renderer.update_scene(self.env.data, camera=self.camera)
        return np.ascontiguousarray(self.renderer.render()[::-1])  # rows come out bottom-up

    def reset(self, seed: int) -> np.ndarray:
        """Reset to the task variation and randomness of ``seed``; returns the first observation."""
        self.env.set_task(self.mt.train_tasks[seed % len(self.mt.train_tasks)])
        self.env.seed(seed)
        obs, _ = self.env.reset()
        # Meta-World moves its goal-marker sites only in step(): without this, frame 0 shows the
        # previous episode's goal and an episode's bytes would depend on what the worker ran before.
        import mujoco

        for site in self.env._target_site_config:
            self.env._set_pos_site(*site)
        mujoco.mj_forward(self.env.model, self.env.data)
        return obs

    def step_held(self, action: np.ndarray, repeat: int) -> tuple[np.ndarray, float, list[bool]]:
        """Hold one action ``repeat`` simulator steps: the last observation, the summed reward, each step's success."""
        r_sum, successes = 0.0, []
        for _ in range(repeat):
            obs, r, _term, _trunc, info = self.env.step(np.asarray(action, np.float32))
            r_sum += float(r)
            successes.append(bool(info["success"]))
        return obs, r_sum, successes

    def close(self) -> None:
        """Free the renderer and the simulator."""
        self.renderer.close()
        self.env.close()


def rollout(env: MetaWorldEnv, policy_name: str, seed: int, max_steps: int, action_repeat: int = 1) -> Episode:
    """One episode of ``max_steps`` decisions: frames[t] and state[t] before actions[t]. Each action is
    held for ``action_repeat`` simulator steps; rewards[t] sums their rewards, success[t] is the last one's."""
    pol = parse_policy(policy_name)
    obs = env.reset(seed)
    pol.reset(env.task, np.random.default_rng(seed))
    T = max_steps
    frames = np.empty((T, env.size, env.size, 3), np.uint8)
    actions, state = np.empty((T, 4), np.float32), np.empty((T, STATE_DIM), np.float32)
    rewards, success = np.empty(T, np.float32), np.empty(T, np.float32)
    for t in range(T):
        frames[t] = env.render()
        state[t] = obs
        a = pol.act(obs)
        actions[t] = a
        obs, rewards[t], successes = env.step_held(a, action_repeat)
        success[t] = float(successes[-1])
    idx = np.arange(T)
    return Episode(frames=frames, actions=actions, rewards=rewards, success=success,
                   is_first=idx == 0, is_last=idx == T - 1, is_terminal=np.zeros(T, bool), state=state,
                   language=env.task.removesuffix("-v3").replace("-", " "),
                   meta={"source": "metaworld", "task": env.task, "policy": pol.descriptor(),
                         "action_space": METAWORLD_ACTION_SPACE.to_json(),
                         "control_hz": env.control_hz / action_repeat, "action_repeat": action_repeat,
                         "camera": env.camera, "seed": seed})


def _quiet_worker() -> None:
    import warnings

    warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high")  # the experts' gains, harmless


_env: MetaWorldEnv | None = None  # a worker process's env, kept while its jobs stay on one task


def _rollout_chunk(args: tuple[CollectConfig, list[Job]]) -> list[Episode]:
    """Roll out a chunk of jobs in a worker process (rebuilding its env only when the task changes)."""
    global _env
    cfg, chunk = args
    out = []
    for job in chunk:
        if _env is None or _env.task != job.task:
            if _env is not None:
                _env.close()
            _env = MetaWorldEnv(job.task, cfg.size, cfg.camera)
        ep = rollout(_env, job.policy, job.seed, cfg.max_steps, cfg.action_repeat)
        ep.meta.update({"split": job.split, "episode_id": f"{job.task}/{job.policy}/{job.split}/{job.episode}"})
        out.append(ep)
    return out


def iter_collect(cfg: CollectConfig, jobs: list[Job]) -> Iterator[Episode]:
    """Run the jobs in ``cfg.workers`` spawned processes, 8 jobs of one task at a time; yield episodes in job order."""
    groups = [list(g) for _, g in itertools.groupby(jobs, key=lambda j: j.task)]  # chunks never straddle tasks
    chunks = [(cfg, g[i:i + 8]) for g in groups for i in range(0, len(g), 8)]
    for episodes in map_ordered(_rollout_chunk, chunks, max(1, min(cfg.workers, len(chunks))), _quiet_worker):
        yield from episodes


def dataset_status(cfg: CollectConfig) -> tuple[str, str]:
    """('complete'|'absent'|'incomplete'|'different'|'foreign', one line on what ``cfg.out`` holds); 'incomplete':
    a damaged collection of this config (its marker says so), 'different': another config's, 'foreign': the rest."""
    out = Path(cfg.out)
    want = json.loads(json.dumps(cfg.data_json()))
    state, what = ownership(out, KIND, want)
    if state == "empty":
        return "absent", what
    try:
        m = verify_dataset(out)
    except ShardError as e:
        if state == "ours":
            return "incomplete", f"{out}: interrupted or damaged collection of this config ({e})"
        return ("different" if state == "other_config" else "foreign"), f"{what}; it fails verification: {e}"
    have = m.get("extra", {}).get("collect_config")
    if have == want:  # (datasets collected before the marker existed have none)
        return "complete", "ok"
    if have is None:
        return "foreign", f"{what}; its dataset was not collected by {KIND}"
    return "different", f"{out} was collected with another config (hash {config_hash(have)} != {config_hash(want)})"


def ensure_collected(cfg: CollectConfig, overwrite: bool = False, progress: bool = True) -> dict:
    """Collect ``cfg`` into ``cfg.out`` unless verified shards of this exact config are there; returns the manifest.
    An interrupted collection of this config is redone; anything else is replaced only with ``overwrite``."""
    from tqdm import tqdm

    state, why = dataset_status(cfg)
    if state == "complete":
        return read_manifest(cfg.out)
    if state in ("different", "foreign") and not overwrite:
        raise ShardError(f"{why}; pass --overwrite to replace it, or choose another out dir")
    if state == "incomplete":
        log.warning("re-collecting: %s", why)
    jobs = make_jobs(cfg)
    claim(cfg.out, KIND, cfg.data_json())  # before the first shard: an interrupted run is resumable as ours
    bar = tqdm(total=len(jobs), desc=f"collect {cfg.name}", unit="ep", disable=not progress, dynamic_ncols=True)
    with ShardWriter(cfg.out, episodes_per_shard=cfg.episodes_per_shard,
                     extra={"collect_config": cfg.data_json(), "expected_frames": len(jobs) * cfg.max_steps}) as w:
        for ep in iter_collect(cfg, jobs):
            w.write(ep)
            bar.update(1)
    bar.close()
    return read_manifest(cfg.out)
