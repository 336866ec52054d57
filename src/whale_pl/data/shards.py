"""Episode shards (WebDataset tars, one split each) and ``manifest.json``, written last: an atomic writer and a
verifying reader (docs/contracts.md, "Shards and manifests")."""

from __future__ import annotations

import io
import itertools
import json
import mmap
import os
import tarfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from whale_pl.data.episode import Episode, EpisodeError
from whale_pl.io import sha256_file, write_json_atomic

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "ood")
QUANTILE_RESERVOIR = 1_000_000
MAX_SHARD_BYTES = 512 << 20


class ShardError(ValueError):
    """A dataset directory, shard or sample is missing, corrupt or disagrees with its manifest."""


class _ActionStats:
    """Running mean/std/min/max (exact, float64) and q01/q99 (exact up to 1M rows, then a reservoir)."""

    def __init__(self, dim: int):
        self.n = 0
        self.s1, self.s2 = np.zeros(dim, np.float64), np.zeros(dim, np.float64)
        self.lo, self.hi = np.full(dim, np.inf), np.full(dim, -np.inf)
        self.rows: list[np.ndarray] = []
        self.rng = np.random.default_rng(0)

    def add(self, a_TA: np.ndarray) -> None:
        """Account for the actions of one episode."""
        a = a_TA.astype(np.float64)
        self.s1 += a.sum(0)
        self.s2 += (a * a).sum(0)
        self.lo, self.hi = np.minimum(self.lo, a.min(0)), np.maximum(self.hi, a.max(0))
        for row in a:  # reservoir sampling (algorithm R), deterministic via the seeded rng
            if len(self.rows) < QUANTILE_RESERVOIR:
                self.rows.append(row)
            else:
                j = int(self.rng.integers(0, self.n + 1))
                if j < QUANTILE_RESERVOIR:
                    self.rows[j] = row
            self.n += 1

    def to_json(self) -> dict:
        """The statistics as the manifest stores them."""
        mean = self.s1 / self.n
        var = np.maximum(self.s2 / self.n - mean * mean, 0.0)
        r = np.stack(self.rows)
        q01, q99 = np.quantile(r, [0.01, 0.99], axis=0)
        f = lambda x: [float(v) for v in x]  # noqa: E731
        return {"count": int(self.n), "mean": f(mean), "std": f(np.sqrt(var)), "min": f(self.lo), "max": f(self.hi),
                "q01": f(q01), "q99": f(q99), "quantile_rows": int(len(r))}


class _OpenShard:
    """A shard being written under a temporary name, renamed when complete."""

    def __init__(self, final: Path, split: str):
        self.final, self.split = final, split
        self.tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)
        self.keys: list[str] = []
        self.frames = self.bytes = 0

    def add(self, sample: dict[str, Any], frames: int) -> None:
        """Append one sample's members, in their order (fixed mtime, mode and owner)."""
        key = sample["__key__"]
        for ext, data in sample.items():
            if ext.startswith("__"):
                continue
            info = tarfile.TarInfo(f"{key}.{ext}")  # mtime 0, mode 0o644, owner 0 / "": the defaults
            info.size = len(data)
            self.tar.addfile(info, io.BytesIO(data))
            self.bytes += 512 + len(data)
        self.keys.append(key)
        self.frames += frames

    def close(self) -> dict:
        """Flush, rename to the final name; returns the shard's manifest entry."""
        self.tar.close()
        with open(self.tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(self.tmp, self.final)
        return {"name": self.final.name, "split": self.split, "episodes": len(self.keys), "frames": self.frames,
                "bytes": self.final.stat().st_size, "sha256": sha256_file(self.final), "keys": self.keys}

    def abort(self) -> None:
        """Drop the temporary file."""
        try:
            self.tar.close()
        finally:
            self.tmp.unlink(missing_ok=True)


class ShardWriter:
    """Write Episodes into ``out_dir`` (replacing the dataset there) as shards of one split each, then the
    manifest (``extra`` stored as-is); after an exception in the ``with`` block there is none."""

    def __init__(self, out_dir: str | Path, episodes_per_shard: int = 64, extra: dict | None = None):
        self.out_dir = Path(out_dir)
        self.episodes_per_shard, self.extra = episodes_per_shard, extra or {}
        (self.out_dir / MANIFEST).unlink(missing_ok=True)  # first: the directory now reads as incomplete
        for p in [*self.out_dir.glob("shard-*.tar"), *self.out_dir.glob(".shard-*.tar.tmp-*")]:
            p.unlink()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._open: dict[str, _OpenShard] = {}
        self._done: list[dict] = []
        self._keys: set[str] = set()
        self._ref: dict | None = None
        self._stats: dict[str, _ActionStats] = {}
        self._policies: dict[str, dict] = {}
        self._tasks: dict[str, int] = defaultdict(int)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close() if exc_type is None else self.abort()

    def write(self, episode: Episode, key: str | None = None, sample: dict | None = None) -> str:
        """Append one episode; returns its sample key. ``sample``: the episode already encoded under ``key``
        (``episode.to_sample(key)``), copied as it is; ``episode.frames`` may then be a placeholder."""
        key = key or f"ep{len(self._keys):07d}"
        where = f"{self.out_dir} episode {key} ({episode.meta.get('episode_id', '?')})"
        split = episode.meta.get("split", "train")
        if key in self._keys or split not in SPLITS or "action_space" not in episode.meta:
            raise ShardError(f"{where}: the key must be unique, meta must hold 'action_space' and a split in "
                             f"{SPLITS} (got {split!r})")
        if sample is None:
            sample = episode.to_sample(key)  # validates
        ref = {"frame_size": list(episode.frames.shape[1:3]), "action_space": episode.meta["action_space"],
               "state_dim": 0 if episode.state is None else int(episode.state.shape[1])}
        self._ref = self._ref or ref
        if ref != self._ref:
            diff = {k: (ref[k], self._ref[k]) for k in ref if ref[k] != self._ref[k]}
            raise ShardError(f"{where}: differs from the dataset's first episode in {diff} (this, first)")
        sh = self._open.get(split)
        if sh is None:
            name = f"shard-{len(self._done) + len(self._open):06d}.tar"
            sh = self._open[split] = _OpenShard(self.out_dir / name, split)
        sh.add(sample, len(episode))
        self._keys.add(key)
        self._account(episode, split)
        if len(sh.keys) >= self.episodes_per_shard or sh.bytes >= MAX_SHARD_BYTES:
            self._done.append(self._open.pop(split).close())
        return key

    def _account(self, ep: Episode, split: str) -> None:
        if split not in self._stats:
            self._stats[split] = _ActionStats(ep.actions.shape[1])
        self._stats[split].add(ep.actions)
        pol = ep.meta.get("policy") or {}
        name = pol.get("name", "unknown")
        p = self._policies.setdefault(name, {"family": pol.get("family", name), "params": pol.get("params", {}),
                                             "splits": {}, "episodes": 0, "frames": 0, "returns": [], "successes": []})
        p["splits"][split] = p["splits"].get(split, 0) + 1
        p["episodes"] += 1
        p["frames"] += len(ep)
        p["returns"].append(float(ep.rewards.astype(np.float64).sum()))
        p["successes"].append(float(ep.success.max()))
        self._tasks[str(ep.meta.get("task", "unknown"))] += 1

    def abort(self) -> None:
        """Drop the open shards; no manifest is written."""
        for sh in self._open.values():
            sh.abort()
        self._open.clear()

    def close(self) -> dict:
        """Flush open shards and write the manifest (atomically). Returns the manifest."""
        self._done += [self._open[split].close() for split in sorted(self._open)]
        self._open.clear()
        if not self._keys:
            raise ShardError(f"{self.out_dir}: no episodes were written; no manifest")
        shards = sorted(self._done, key=lambda s: s["name"])
        stats_split = "train" if "train" in self._stats else sorted(self._stats)[0]
        policies = {}
        for name, p in sorted(self._policies.items()):
            r, s = np.array(p.pop("returns")), np.array(p.pop("successes"))
            policies[name] = {**p, "return_mean": float(r.mean()), "return_std": float(r.std()),
                              "success_rate": float(s.mean())}
        of = lambda sp, what: sum(s[what] for s in shards if s["split"] == sp)  # noqa: E731
        manifest = {
            "schema_version": SCHEMA_VERSION, "frame_encoding": "npz-deflate", **self._ref,
            "action_dim": len(self._ref["action_space"]["names"]),
            "episodes": len(self._keys), "frames": int(sum(s["frames"] for s in shards)),
            "splits": {sp: {"episodes": of(sp, "episodes"), "frames": of(sp, "frames"),
                            "shards": [s["name"] for s in shards if s["split"] == sp]}
                       for sp in SPLITS if any(s["split"] == sp for s in shards)},
            "shards": shards,
            "action_stats": {"split": stats_split, **self._stats[stats_split].to_json()},
            "policies": policies,
            "families": sorted({p["family"] for p in policies.values()}),
            "tasks": dict(sorted(self._tasks.items())),
            "extra": self.extra,
        }
        write_json_atomic(self.out_dir / MANIFEST, manifest, allow_nan=True, sort_keys=True)
        return manifest


def read_manifest(data_dir: str | Path) -> dict:
    """Load and sanity-check ``manifest.json``; ShardError if the directory is missing/incomplete."""
    d = Path(data_dir)
    if not d.is_dir():
        raise ShardError(f"{d}: dataset directory does not exist")
    mp = d / MANIFEST
    if not mp.exists():
        tars = sorted(p.name for p in d.glob("shard-*.tar"))
        what = f"has {len(tars)} shards but no {MANIFEST} (incomplete write?)" if tars else "is empty"
        raise ShardError(f"{d}: dataset directory {what}")
    try:
        m = json.loads(mp.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{mp}: manifest is not valid JSON: {e}") from e
    if m.get("schema_version") != SCHEMA_VERSION:
        raise ShardError(f"{mp}: schema_version {m.get('schema_version')!r}, this reader expects {SCHEMA_VERSION}")
    return m


def verify_dataset(data_dir: str | Path) -> dict:
    """The manifest, once every shard it lists exists with its size and sha256."""
    d = Path(data_dir)
    m = read_manifest(d)
    for s in m["shards"]:
        p = d / s["name"]
        if not p.exists():
            raise ShardError(f"{p}: shard listed in the manifest is missing")
        if p.stat().st_size != s["bytes"]:
            raise ShardError(f"{p}: size {p.stat().st_size} bytes, manifest says {s['bytes']}")
        if (h := sha256_file(p)) != s["sha256"]:
            raise ShardError(f"{p}: sha256 {h[:16]}... does not match the manifest's {s['sha256'][:16]}...")
    return m


def iter_tar_samples(path: str | Path, keys: set[str] | None = None) -> Iterator[dict[str, Any]]:
    """The samples {'__key__', '__url__', ext: bytes, ...} of a tar ``ShardWriter`` wrote (only ``keys``, if given)."""
    path = str(path)
    try:
        with open(path, "rb") as fh:
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:  # ValueError: an empty file
        raise ShardError(f"{path}: cannot read shard: {e}") from e
    try:
        for key, items in itertools.groupby(_members(path, buf, keys), key=lambda m: m[0]):
            if keys is None or key in keys:
                yield {"__key__": key, "__url__": path, **{ext: data for _, ext, data in items}}
    finally:
        buf.close()


def _members(path: str, buf: mmap.mmap, keys: set[str] | None) -> Iterator[tuple[str, str, Any]]:
    """(key, ext, bytes) of every file member; the bytes are None for a key not in ``keys`` (not copied)."""
    pos, n, last_key = 0, len(buf), None
    while pos + 512 <= n:
        hdr = buf[pos:pos + 512]
        if hdr.count(0) == 512:  # end-of-archive block
            return
        try:
            info = tarfile.TarInfo.frombuf(hdr, "utf-8", "surrogateescape")
        except tarfile.HeaderError as e:
            raise ShardError(f"{path}: corrupt tar header at byte {pos} (after key {last_key}): {e}") from e
        start, end = pos + 512, pos + 512 + info.size
        pos = start + -(-info.size // 512) * 512
        if not info.isfile():
            continue
        key, _, ext = os.path.basename(info.name).partition(".")
        if end > n:
            raise ShardError(f"{path} key {key}: member {info.name!r} truncated ({n - start} of {info.size} bytes)")
        last_key = key
        yield key, ext, (buf[start:end] if keys is None or key in keys else None)
    raise ShardError(f"{path}: tar lacks its end-of-archive blocks (truncated after key {last_key}?)")


def decode_sample(sample: dict[str, Any], manifest: dict) -> Episode:
    """Sample -> Episode (token ids with a ``tokens`` manifest), checked against the manifest; ShardError if not."""
    size = manifest["tokens"]["grid"] if "tokens" in manifest else manifest["frame_size"]
    try:
        return Episode.from_sample(sample, frame_size=size)
    except EpisodeError as e:
        raise ShardError(str(e)) from e


def iter_shard_episodes(data_dir: str | Path, shard: dict, manifest: dict,
                        keys: set[str] | None = None) -> Iterator[tuple[str, Episode]]:
    """(key, episode) of one shard (optionally only ``keys``); its keys checked against the manifest's."""
    path = Path(data_dir) / shard["name"]
    seen, want = [], [k for k in shard["keys"] if keys is None or k in keys]
    for s in iter_tar_samples(path, keys=keys):
        seen.append(s["__key__"])
        yield s["__key__"], decode_sample(s, manifest)
    if seen != want:
        missing = [k for k in want if k not in seen]
        unexpected = [k for k in seen if k not in want]
        raise ShardError(f"{path}: keys differ from the manifest (missing {missing[:5]}, unexpected {unexpected[:5]})")


def iter_episodes(data_dir: str | Path, splits: Iterable[str] | None = None, verify: bool = True) -> Iterator[Episode]:
    """All episodes of a dataset directory (optionally only some splits), in shard order."""
    m = verify_dataset(data_dir) if verify else read_manifest(data_dir)
    for sh in m["shards"]:
        if splits is None or sh["split"] in splits:
            for _, ep in iter_shard_episodes(data_dir, sh, m):
                yield ep
