"""Clips from episode shards (or their token shards): ``ClipDataModule`` and ``MetaWorldDataModule``
(batch layout, reader split, epochs and action normalisation: docs/contracts.md, "Batches")."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from whale_pl.data.episode import ActionSpace, Episode, load_npz
from whale_pl.data.shards import ShardError, iter_episodes, iter_shard_episodes, iter_tar_samples, verify_dataset
from whale_pl.data.tokens import read_token_manifest

log = logging.getLogger(__name__)
CLIPS_PER_EPISODE = 8  # clips cut from each decoded episode before it leaves the pool
POOL_SIZE = 16  # decoded episodes a reader keeps per directory


class _DirInfo:
    """One dataset directory as the clip stream sees it: manifest, reader, normalisation, episode indices."""

    def __init__(self, path: str, manifest: dict, index: int):
        self.path, self.m, self.index, self.name = path, manifest, index, Path(path).name
        self.space = ActionSpace.from_json(manifest["action_space"])
        mask, st = self.space.normalised_mask, manifest["action_stats"]  # the gripper stays raw
        std = np.asarray(st["std"], np.float64)
        self.mean = np.where(mask, np.asarray(st["mean"], np.float32), 0.0).astype(np.float32)
        self.std = np.where(mask & np.isfinite(std) & (std > 1e-6), std, 1.0).astype(np.float32)  # constant: unscaled
        first = np.cumsum([0] + [len(sh["keys"]) for sh in manifest["shards"]])  # index of each shard's first episode
        self.shard_offset = {sh["name"]: int(n) for sh, n in zip(manifest["shards"], first)}

    def shards(self, splits: Sequence[str]) -> list[dict]:
        """The manifest's shards of ``splits``."""
        return [s for s in self.m["shards"] if s["split"] in splits]


class ClipStream(IterableDataset):
    """Endless weighted clip stream cut into exactly ``steps`` batches per rank per epoch."""

    def __init__(self, dm: "ClipDataModule", dirs: list[_DirInfo], weights: list[float], train: bool):
        """The train or the validation stream of ``dm`` (its settings copied: workers get no datamodule)."""
        super().__init__()
        self.dirs, self.p = dirs, np.asarray(weights, np.float64) / np.sum(weights)
        self.splits = ("train",) if train else tuple(dm.val_splits)
        self.clip_len, self.steps = (dm.clip_len, dm.steps_per_epoch) if train else (dm.val_clip_len, dm.val_steps)
        self.retrace_strides, self.retrace_prob = (dm.retrace_strides, dm.retrace_prob) if train else ([], 0.0)
        self.retrace_clip_len = dm.retrace_clip_len
        self.seed, self.fixed_seed, self.epoch = dm.seed if train else dm.seed + 7919, not train, 0
        spec = dm.data_spec
        self.frame_stride, self.batch_size, self.state_dim = dm.frame_stride, dm.batch_size, spec["state_dim"]
        self.rank, self.world_size = dm._rank, dm._world
        self.families, self.policies, self.ood_policies = spec["families"], spec["policies"], set(spec["ood_policies"])

    def __len__(self) -> int:
        return self.steps

    def _episodes(self, d: _DirInfo, reader: int, n_readers: int, rng: np.random.Generator) -> Iterator[tuple]:
        """(episode index, episode) of this reader's share of ``d``, endlessly, each pass in a new shard order."""
        shards = d.shards(self.splits)
        if len(shards) >= n_readers:
            mine, keys = shards[reader::n_readers], None
        else:
            all_keys = [(s["name"], k) for s in shards for k in s["keys"]]
            own = all_keys[reader::n_readers]
            if not own:
                raise ShardError(f"{d.path}: split(s) {list(self.splits)} hold {len(all_keys)} episodes, fewer than "
                                 f"the {n_readers} readers (world_size x num_workers); use fewer workers or more data")
            names = {s for s, _ in own}
            mine, keys = [s for s in shards if s["name"] in names], {k for _, k in own}
        usable, skipped = 0, 0
        need = self.clip_len * self.frame_stride
        while True:
            for j in rng.permutation(len(mine)):
                sh = mine[j]
                sel = None if keys is None else {k for k in sh["keys"] if k in keys}
                for key, ep in iter_shard_episodes(d.path, sh, d.m, keys=sel):
                    if len(ep) < need:
                        skipped += 1
                        if skipped == 1 or skipped % 1000 == 0:
                            log.warning("%s: %d episode(s) shorter than clip_len*frame_stride=%d skipped (e.g. %s/%s, "
                                        "%d frames)", d.path, skipped, need, sh["name"], key, len(ep))
                        continue
                    usable += 1
                    yield d.shard_offset[sh["name"]] + sh["keys"].index(key), ep
            if usable == 0:
                raise ShardError(f"{d.path}: no episode of split(s) {list(self.splits)} read by reader "
                                 f"{reader}/{n_readers} has the {need} frames a clip needs (clip_len={self.clip_len}, "
                                 f"frame_stride={self.frame_stride})")

    def _clip(self, d: _DirInfo, ep_idx: int, ep: Episode, rng: np.random.Generator, m: int, T: int) -> dict[str, Any]:
        """T frames (or ids) every m * frame_stride recorded steps, m lowered to a stride that fits a short episode."""
        t_ep = len(ep)
        if T * m * self.frame_stride > t_ep:
            ok = [s for s in self.retrace_strides if T * s * self.frame_stride <= t_ep]
            m = max(ok) if ok else 1
        k = m * self.frame_stride  # underlying steps between clip frames
        start = int(rng.integers(0, t_ep - T * k + 1))
        idx = start + k * np.arange(T)
        if k == 1:
            a_raw = ep.actions[idx]
            rew = ep.rewards[idx]
            suc = ep.success[idx]
        else:
            win = idx[:, None] + np.arange(k)[None, :]  # [T, k] underlying steps of each clip step
            a_raw = d.space.compose(ep.actions[win]).astype(np.float32)
            rew = ep.rewards[win].sum(1)
            suc = ep.success[win[:, -1]]
        a = (a_raw - k * d.mean) / d.std  # the gripper's mean 0, std 1: it stays raw
        state = ep.state[idx] if self.state_dim and ep.state is not None else np.zeros((T, self.state_dim), np.float32)
        pol = ep.meta.get("policy") or {}
        pname = pol.get("name", "unknown")
        fam = pol.get("family", pname)
        pixels = ("frames", ep.frames) if ep.ids is None else ("ids", ep.ids)
        return {pixels[0]: pixels[1][start:start + T * k:k], "actions": a.astype(np.float32),
                "actions_raw": a_raw.astype(np.float32),
                "rewards": rew.astype(np.float32), "success": suc.astype(np.float32), "state": state,
                "is_first": ep.is_first[idx], "family": self.families.index(fam), "policy": self.policies.index(pname),
                "ood": pname in self.ood_policies or ep.meta.get("split") == "ood", "stride": m,
                "dataset": d.index, "episode": ep_idx, "start": start}

    @staticmethod
    def _collate(clips: list[dict]) -> dict[str, torch.Tensor]:
        """Clips -> a batch; frames are copied once, [T, H, W, 3] -> [T, 3, H, W], into shared memory in a worker."""
        if "ids" in clips[0]:
            out = {"ids": torch.from_numpy(np.stack([c["ids"] for c in clips])).long()}
        else:
            t_, h, w, c3 = clips[0]["frames"].shape
            frames = torch.empty((len(clips), t_, c3, h, w), dtype=torch.uint8)
            if get_worker_info() is not None:
                frames.share_memory_()  # filled in place: no extra copy when the batch crosses to the main process
            f_np = frames.numpy()
            for i, c in enumerate(clips):
                f_np[i] = c["frames"].transpose(0, 3, 1, 2)
            out = {"frames": frames}
        for k in ("actions", "actions_raw", "rewards", "success", "state", "is_first"):
            out[k] = torch.from_numpy(np.stack([c[k] for c in clips]))
        for k in ("family", "policy", "stride", "dataset", "episode", "start"):
            out[k] = torch.tensor([c[k] for c in clips], dtype=torch.int64)
        out["ood"] = torch.tensor([c["ood"] for c in clips], dtype=torch.bool)
        return out

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        wi = get_worker_info()
        wid, nw = (wi.id, wi.num_workers) if wi is not None else (0, 1)
        reader, n_readers = self.rank * nw + wid, self.world_size * nw
        my_steps = self.steps // nw + (1 if wid < self.steps % nw else 0)
        if my_steps == 0:
            return
        seeds = [self.seed, self.epoch, self.rank, wid]  # the epoch stays 0 for validation (its loader never moves it)
        rng = np.random.default_rng(seeds)
        sources = [self._episodes(d, reader, n_readers, np.random.default_rng([*seeds, d.index])) for d in self.dirs]
        pools: list[list[list]] = [[] for _ in self.dirs]  # per dir: [ep_idx, episode, clips left]
        cum_p = np.minimum(np.cumsum(self.p), 1.0)
        cum_p[-1] = 1.0
        for _ in range(my_steps):
            clips = []
            m, T = 1, self.clip_len
            if self.retrace_strides and rng.random() < self.retrace_prob:
                m, T = int(rng.choice(self.retrace_strides)), self.retrace_clip_len
            for _b in range(self.batch_size):
                di = 0 if len(self.dirs) == 1 else int(np.searchsorted(cum_p, rng.random(), side="right"))
                pool = pools[di]
                while len(pool) < POOL_SIZE:
                    ep_idx, ep = next(sources[di])
                    pool.append([ep_idx, ep, CLIPS_PER_EPISODE])
                j = int(rng.integers(len(pool)))
                entry = pool[j]
                clips.append(self._clip(self.dirs[di], entry[0], entry[1], rng, m, T))
                entry[2] -= 1
                if entry[2] <= 0:
                    pool.pop(j)
            yield self._collate(clips)


class _EpochLoader(DataLoader):
    """A DataLoader that advances its train stream's epoch on every pass after the first (for fresh workers)."""

    def __iter__(self):
        ds = self.dataset
        if not ds.fixed_seed:
            ds.epoch += 1 if getattr(ds, "_iterated", False) else 0
            ds._iterated = True
        return super().__iter__()


class ClipDataModule(L.LightningDataModule):
    """Random clips from one or more shard directories (their token shards with ``tokens``), for every stage."""

    def __init__(self, dirs: list[str] | str, weights: list[float] | None = None, clip_len: int = 16,
                 frame_stride: int = 1, retrace_strides: list[int] | None = None, retrace_prob: float = 0.0,
                 batch_size: int = 8, num_workers: int = 2, steps_per_epoch: int = 100, val_steps: int = 10,
                 val_splits: list[str] | None = None, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, pin_memory: bool = False,
                 val_clip_len: int | None = None, retrace_clip_len: int | None = None, tokens: str | None = None):
        super().__init__()
        self.dir_paths = [dirs] if isinstance(dirs, (str, Path)) else [str(d) for d in dirs]
        self.tokens = None if tokens is None else str(tokens)
        names = [Path(p).name for p in self.dir_paths]
        if self.tokens is not None and len(set(names)) < len(names):
            raise ValueError(f"tokens: the dataset directories' names {names} must differ (each names its token "
                             f"dataset under {self.tokens})")
        self.weights = list(weights) if weights is not None else [1.0] * len(self.dir_paths)
        if not self.dir_paths or len(self.weights) != len(self.dir_paths) or min(self.weights) < 0 \
                or sum(self.weights) <= 0:
            raise ValueError(f"weights {self.weights} must be >= 0, not all 0, one per directory {self.dir_paths}")
        self.clip_len, self.frame_stride, self.batch_size = int(clip_len), int(frame_stride), int(batch_size)
        self.val_clip_len = self.clip_len if val_clip_len is None else int(val_clip_len)
        self.retrace_clip_len = self.clip_len if retrace_clip_len is None else int(retrace_clip_len)
        self.retrace_strides, self.retrace_prob = [int(s) for s in (retrace_strides or [])], float(retrace_prob)
        for name, v in (("clip_len", self.clip_len), ("val_clip_len", self.val_clip_len), ("batch_size", batch_size),
                        ("frame_stride", frame_stride), ("retrace_clip_len", self.retrace_clip_len),
                        ("retrace_strides", min(self.retrace_strides, default=1))):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if not 0.0 <= self.retrace_prob <= 1.0 or self.retrace_clip_len > self.clip_len:
            raise ValueError(f"retrace_prob must be in [0, 1] (got {retrace_prob}) and retrace_clip_len <= clip_len "
                             f"(got {self.retrace_clip_len} > {self.clip_len})")
        self.num_workers, self.pin_memory = int(num_workers), pin_memory
        self.steps_per_epoch, self.val_steps = int(steps_per_epoch), int(val_steps)
        self.val_splits = list(val_splits or ["val"])
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self._dirs: list[_DirInfo] | None = None
        self._verified: dict[str, dict] = {}  # manifests prepare_data already verified, by directory
        self._train_ds: ClipStream | None = None

    @property
    def token_info(self) -> list[dict]:
        """The ``tokens`` section (tokenizer, source, grid, encoding) of each token dataset; [] for frames."""
        return [] if self.tokens is None else [dict(d.m["tokens"], dir=d.path) for d in self._load()]

    def _read(self, i: int, p: str) -> _DirInfo:
        if self.tokens is None:
            return _DirInfo(p, self._verified.get(p) or verify_dataset(p), i)
        t = Path(self.tokens) / Path(p).name
        return _DirInfo(str(t), read_token_manifest(t, source_dir=p), i)

    def _load(self) -> list[_DirInfo]:
        if self._dirs is None:
            dirs = [self._read(i, p) for i, p in enumerate(self.dir_paths)]
            ref = dirs[0]
            for d in dirs[1:]:
                for k in ("frame_size", "action_dim"):
                    if d.m[k] != ref.m[k]:
                        raise ShardError(f"{d.path}: {k} {d.m[k]} differs from {ref.path}'s {ref.m[k]}; "
                                         "datasets mixed in one ClipDataModule must agree")
            self._dirs = dirs
        return self._dirs

    @property
    def data_spec(self) -> dict:
        """What a model trained on these batches depends on; stored in every stage checkpoint."""
        dirs = self._load()
        d0, state_dims = dirs[0], {d.m["state_dim"] for d in dirs}
        return {
            "frame_size": list(d0.m["frame_size"]),
            "action_dim": int(d0.m["action_dim"]),
            "action_space": d0.m["action_space"],
            "action_mean": [float(x) for x in d0.mean],
            "action_std": [float(x) for x in d0.std],
            "state_dim": state_dims.pop() if len(state_dims) == 1 else 0,  # none served when directories differ
            "frame_stride": self.frame_stride,
            "retrace_strides": list(self.retrace_strides) if self.retrace_prob > 0 else [],
            "families": sorted({f for d in dirs for f in d.m["families"]}),
            "policies": sorted({p for d in dirs for p in d.m["policies"]}),
            "ood_policies": sorted({n for d in dirs for n, p in d.m["policies"].items()
                                    if set(p["splits"]) == {"ood"}}),  # policies seen only in the ood split
            "datasets": [{"name": d.name, "action_mean": [float(x) for x in d.mean],
                          "action_std": [float(x) for x in d.std], "weight": float(w)}
                         for d, w in zip(dirs, self.weights)],
        }

    def setup(self, stage: str | None = None) -> None:
        """Resolve rank and world size (explicit, else from the Trainer) and load the manifests."""
        if self.rank is None or self.world_size is None:
            tr = self.trainer
            self._rank, self._world = (tr.global_rank, tr.world_size) if tr is not None else (0, 1)
        else:
            self._rank, self._world = int(self.rank), int(self.world_size)
        if self._train_ds is not None and (self._train_ds.rank, self._train_ds.world_size) != (self._rank, self._world):
            self._train_ds = None
        self._load()

    def _stream(self, train: bool) -> ClipStream:
        if not hasattr(self, "_rank"):
            self.setup()
        dirs, splits = self._load(), ["train"] if train else self.val_splits
        have = [i for i, d in enumerate(dirs) if d.shards(splits)]
        lacking = [d.path for d in dirs if not d.shards(splits)]
        if not have or train and lacking:  # a mixture validates on the directories that have a held-out split
            raise ShardError(f"{lacking}: no shards of split(s) {splits}" + ("" if train else " in any directory "
                             "(convert with --split train,val, or set val_splits)"))
        if lacking:
            log.info("validation leaves out %s (no %s shards)", lacking, splits)
        return ClipStream(self, [dirs[i] for i in have], [self.weights[i] for i in have], train)

    def _loader(self, ds: ClipStream) -> DataLoader:
        nw = min(self.num_workers, max(1, ds.steps))
        return _EpochLoader(ds, batch_size=None, num_workers=nw, pin_memory=self.pin_memory)

    def train_dataloader(self) -> DataLoader:
        """Loader of ``steps_per_epoch`` train batches per rank (one cached stream: its epoch advances)."""
        if self._train_ds is None:
            self._train_ds = self._stream(train=True)
        return self._loader(self._train_ds)

    def val_dataloader(self) -> DataLoader:
        """Loader of ``val_steps`` validation batches per rank, the same clips every time."""
        return self._loader(self._stream(train=False))

    def val_clip_count(self) -> int:
        """Distinct validation clips (episode, start frame) at ``val_clip_len`` and ``frame_stride``."""
        need = self.val_clip_len * self.frame_stride
        lengths = (len(load_npz(s["steps.npz"])["actions"]) for d in self._load() for sh in d.shards(self.val_splits)
                   for s in iter_tar_samples(Path(d.path) / sh["name"]))
        return sum(max(0, n - need + 1) for n in lengths)

    def iter_episodes(self, split: str) -> Iterator[Episode]:
        """Whole episodes of ``split`` of the first directory (its tokens with ``tokens``), in manifest order."""
        return iter_episodes(self._load()[0].path, [split], verify=False)  # verified by _load

    def episodes(self, split: str) -> list[Episode]:
        """``iter_episodes`` as a list."""
        return list(self.iter_episodes(split))

    def manifest(self) -> dict:
        """The manifest of the first directory."""
        return self._load()[0].m


class MetaWorldDataModule(ClipDataModule):
    """Clips from a Meta-World dataset config (``stages/<scale>/data.yaml``), collected by ``prepare_data``."""

    def __init__(self, config: str, **kwargs: Any):
        """``kwargs``: ``ClipDataModule``'s arguments but ``dirs``."""
        from whale_pl.data.metaworld import CollectConfig

        self.collect_config = CollectConfig.from_yaml(config)
        super().__init__(dirs=[self.collect_config.out], **kwargs)

    def prepare_data(self) -> None:
        """Collect the config into its ``out`` directory unless complete shards of it are there."""
        from whale_pl.data.metaworld import ensure_collected

        self._verified[self.dir_paths[0]] = ensure_collected(self.collect_config)  # verified: setup reuses it

    @property
    def data_spec(self) -> dict:
        """ClipDataModule's data_spec plus the Meta-World collection settings."""
        spec = super().data_spec
        c = self.collect_config
        spec["metaworld"] = {"tasks": list(c.tasks), "camera": c.camera, "size": c.size, "max_steps": c.max_steps,
                             "action_repeat": c.action_repeat,
                             "train_policies": list(c.train_policies), "ood_policies": list(c.ood_policies)}
        return spec
