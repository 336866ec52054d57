"""Episode shards: an atomic writer, the manifest, and a verifying reader.

A dataset directory holds ``shard-000000.tar``, ``shard-000001.tar``, ... (WebDataset tars, one sample
per episode, see ``episode.py``) and ``manifest.json``, written last: a directory without one is an
incomplete dataset. Every shard holds episodes of one split (``train``, ``val`` or ``ood``, from
``episode.meta["split"]``, default ``train``); action statistics are computed over the ``train`` split
(all episodes when there is none). Tars are written deterministically (fixed mtime/owner)::

    with ShardWriter(out_dir) as w:
        for ep in episodes:
            w.write(ep)
    manifest = verify_dataset(out_dir)          # counts, sizes and sha256 of every shard
    for ep in iter_episodes(out_dir): ...       # decodes and checks every sample
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import mmap
import os
import tarfile
import zipfile
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from whale_pl.data.episode import KEY_RE, SAMPLE_EXTS, Episode, EpisodeError, load_npz
from whale_pl.io import sha256_file, write_json_atomic

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "ood")
QUANTILE_RESERVOIR = 1_000_000
log = logging.getLogger(__name__)


class ShardError(ValueError):
    """A dataset directory, shard or sample is missing, corrupt or disagrees with its manifest."""

    def __init__(self, msg: str, shard: str | None = None, key: str | None = None, field: str | None = None):
        super().__init__(msg)
        self.shard, self.key, self.field = shard, key, field


class _ActionStats:
    """Running mean/std/min/max (exact, float64) and q01/q99 (exact up to 1M rows, then a reservoir)."""

    def __init__(self, dim: int, seed: int = 0):
        self.n = 0
        self.s1, self.s2 = np.zeros(dim, np.float64), np.zeros(dim, np.float64)
        self.lo, self.hi = np.full(dim, np.inf), np.full(dim, -np.inf)
        self.rows: list[np.ndarray] = []
        self.rng = np.random.default_rng(seed)

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
        if self.n == 0:
            raise ShardError("no actions to compute statistics from (empty dataset)")
        mean = self.s1 / self.n
        var = np.maximum(self.s2 / self.n - mean * mean, 0.0)
        r = np.stack(self.rows)
        q01, q99 = np.quantile(r, [0.01, 0.99], axis=0)
        f = lambda x: [float(v) for v in x]  # noqa: E731
        return {"count": int(self.n), "mean": f(mean), "std": f(np.sqrt(var)), "min": f(self.lo), "max": f(self.hi),
                "q01": f(q01), "q99": f(q99), "quantile_rows": int(len(r))}


class _OpenShard:
    """A shard being written under a temporary name."""

    def __init__(self, final: Path, split: str):
        self.final, self.split = final, split
        self.tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)
        self.keys: list[str] = []
        self.frames = self.bytes = 0

    def add(self, sample: dict[str, Any], frames: int, exts: tuple[str, ...] = SAMPLE_EXTS) -> None:
        """Append one sample's members ``exts`` (fixed mtime, mode and owner)."""
        key = sample["__key__"]
        for ext in exts:
            data = sample[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
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
    """Write Episodes into ``out_dir`` (empty or absent unless ``overwrite``) as shards of one split each,
    then the manifest, which stores ``extra`` as-is. After an exception in the ``with`` block there is no
    manifest: the directory reads as incomplete."""

    def __init__(self, out_dir: str | Path, episodes_per_shard: int = 64, max_shard_bytes: int = 512 << 20,
                 overwrite: bool = False, extra: dict | None = None):
        self.out_dir = Path(out_dir)
        if episodes_per_shard < 1:
            raise ValueError(f"episodes_per_shard must be >= 1, got {episodes_per_shard}")
        self.episodes_per_shard, self.max_shard_bytes, self.extra = episodes_per_shard, max_shard_bytes, extra or {}
        existing = sorted(p.name for p in self.out_dir.glob("*")) if self.out_dir.exists() else []
        if existing:
            if not overwrite:
                raise ShardError(f"{self.out_dir}: output directory is not empty ({existing[:5]}...); "
                                 "pass overwrite=True to replace it")
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
        self._next_shard = self._n = 0
        self._closed = False

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close() if exc_type is None else self.abort()

    def write(self, episode: Episode, key: str | None = None, sample: dict | None = None) -> str:
        """Append one episode; returns its sample key. ``sample``: the episode already encoded under ``key``
        (``episode.to_sample(key)``), copied as it is; ``episode.frames`` may then be a placeholder."""
        if self._closed:
            raise ShardError(f"{self.out_dir}: writer is closed")
        key = key or f"ep{self._n:07d}"
        where = f"{self.out_dir} episode {key} ({episode.meta.get('episode_id', '?')})"
        if not KEY_RE.match(key) or key in self._keys:
            raise ShardError(f"{where}: key must be unique and match {KEY_RE.pattern}", key=key)
        if "action_space" not in episode.meta:
            raise ShardError(f"{where}: meta lacks 'action_space' (ActionSpace.to_json())", key=key, field="meta")
        split = episode.meta.get("split", "train")
        if split not in SPLITS:
            raise ShardError(f"{where}: meta split {split!r} is not one of {SPLITS}", key=key, field="meta")
        if sample is None:
            sample = episode.to_sample(key)  # validates
        else:
            episode.validate(f"episode {key}")
        ref = {"frame_size": list(episode.frames.shape[1:3]), "action_space": episode.meta["action_space"],
               "state_dim": 0 if episode.state is None else int(episode.state.shape[1])}
        if self._ref is None:
            self._ref = ref
        elif ref != self._ref:
            diff = {k: (ref[k], self._ref[k]) for k in ref if ref[k] != self._ref[k]}
            raise ShardError(f"{where}: differs from the dataset's first episode in {diff} (this, first)", key=key)
        sh = self._open.get(split)
        if sh is None:
            sh = self._open[split] = _OpenShard(self.out_dir / f"shard-{self._next_shard:06d}.tar", split)
            self._next_shard += 1
        sh.add(sample, len(episode))
        self._keys.add(key)
        self._n += 1
        self._account(episode, split)
        if len(sh.keys) >= self.episodes_per_shard or sh.bytes >= self.max_shard_bytes:
            self._done.append(self._open.pop(split).close())
        return key

    def _account(self, ep: Episode, split: str) -> None:
        if split not in self._stats:
            self._stats[split] = _ActionStats(ep.actions.shape[1])
        self._stats[split].add(ep.actions)
        pol = ep.meta.get("policy") or {}
        pol = pol if isinstance(pol, dict) else {"name": str(pol)}
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
        self._closed = True

    def close(self) -> dict:
        """Flush open shards and write the manifest (atomically). Returns the manifest."""
        if self._closed:
            raise ShardError(f"{self.out_dir}: writer already closed")
        self._done += [self._open[split].close() for split in sorted(self._open)]
        self._open.clear()
        self._closed = True
        if self._n == 0:
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
            "episodes": self._n, "frames": int(sum(s["frames"] for s in shards)),
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
        what = f"has {len(tars)} shards but no {MANIFEST} (incomplete write?)" if tars else "is empty (no shards, no manifest)"
        raise ShardError(f"{d}: dataset directory {what}")
    try:
        m = json.loads(mp.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{mp}: manifest is not valid JSON: {e}") from e
    if m.get("schema_version") != SCHEMA_VERSION:
        raise ShardError(f"{mp}: schema_version {m.get('schema_version')!r}, this reader expects {SCHEMA_VERSION}")
    for k in ("shards", "action_stats", "frame_size", "action_space", "state_dim"):
        if k not in m:
            raise ShardError(f"{mp}: manifest lacks '{k}'")
    if not m["shards"]:
        raise ShardError(f"{mp}: manifest lists no shards")
    return m


def _check_counts(m: dict, where: str | Path) -> None:
    """The manifest's episode and frame counts agree with its shard list (per shard, per split, in all)."""
    for s in m["shards"]:
        if s.get("episodes") != len(s.get("keys", ())):
            raise ShardError(f"{where}: manifest says shard {s.get('name')} holds {s.get('episodes')} episodes, "
                             f"it lists {len(s.get('keys', ()))} keys", shard=s.get("name"))
    for what in ("episodes", "frames"):
        total = sum(s.get(what, 0) for s in m["shards"])
        if m.get(what) != total:
            raise ShardError(f"{where}: manifest says {m.get(what)} {what}, its shards hold {total}")
        for sp, v in m.get("splits", {}).items():
            n = sum(s.get(what, 0) for s in m["shards"] if s.get("split") == sp)
            if v.get(what) != n:
                raise ShardError(f"{where}: manifest says split {sp!r} has {v.get(what)} {what}, its shards hold {n}")
    missing = sorted({s.get("split") for s in m["shards"]} - set(m.get("splits", {})))
    if missing:
        raise ShardError(f"{where}: manifest has shards of split(s) {missing} that its split table lacks")


def verify_dataset(data_dir: str | Path, checksums: bool = True) -> dict:
    """Check every shard the manifest lists exists with its size (and sha256); no unlisted shards; the
    manifest's counts agree with its shard list."""
    d = Path(data_dir)
    m = read_manifest(d)
    _check_counts(m, d / MANIFEST)
    listed = {s["name"] for s in m["shards"]}
    extra = sorted(p.name for p in d.glob("shard-*.tar") if p.name not in listed)
    if extra:
        raise ShardError(f"{d}: shards not in the manifest: {extra}", shard=extra[0])
    for s in m["shards"]:
        p = d / s["name"]
        if not p.exists():
            raise ShardError(f"{p}: shard listed in the manifest is missing", shard=s["name"])
        if p.stat().st_size != s["bytes"]:
            raise ShardError(f"{p}: size {p.stat().st_size} bytes, manifest says {s['bytes']}", shard=s["name"])
        if checksums and (h := sha256_file(p)) != s["sha256"]:
            raise ShardError(f"{p}: sha256 {h[:16]}... does not match the manifest's {s['sha256'][:16]}...",
                             shard=s["name"])
    return m


def iter_tar_samples(path: str | Path, keys: set[str] | None = None) -> Iterator[dict[str, Any]]:
    """Group a WebDataset tar's members by key: {'__key__', '__url__', ext: bytes, ...}, parsing the plain
    ustar headers ``ShardWriter`` writes straight from a memory map (checksums checked). With ``keys`` the
    other samples come back as ``__skipped__`` stubs, not copied."""
    path = str(path)
    try:
        with open(path, "rb") as fh:
            if os.fstat(fh.fileno()).st_size == 0:
                raise ShardError(f"{path}: tar is empty", shard=path)
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise ShardError(f"{path}: cannot read shard: {e}", shard=path) from e
    try:
        yield from _group(path, _members(path, buf, keys), keys)
    finally:
        buf.close()


def _group(path: str, members: Iterator[tuple[str, str, Any]], keys: set[str] | None) -> Iterator[dict[str, Any]]:
    """(key, ext, data) members -> samples; a sample not in ``keys`` comes back as a ``__skipped__`` stub."""
    for key, items in itertools.groupby(members, key=lambda m: m[0]):
        sample: dict[str, Any] = {"__key__": key, "__url__": path}
        for _, ext, data in items:
            if ext in sample:
                raise ShardError(f"{path} key {key}: member {ext} appears twice", shard=path, key=key, field=ext)
            sample[ext] = data
        yield sample if keys is None or key in keys else {"__key__": key, "__url__": path, "__skipped__": True}


def _members(path: str, buf: mmap.mmap, keys: set[str] | None) -> Iterator[tuple[str, str, Any]]:
    """(key, ext, bytes) of every file member; the bytes are None for a key not in ``keys``."""
    pos, n, last_key = 0, len(buf), None
    while pos + 512 <= n:
        hdr = buf[pos:pos + 512]
        if hdr.count(0) == 512:  # end-of-archive block
            return
        try:
            info = tarfile.TarInfo.frombuf(hdr, "utf-8", "surrogateescape")
        except tarfile.HeaderError as e:
            raise ShardError(f"{path}: corrupt tar header at byte {pos} (after key {last_key}): {e}",
                             shard=path, key=last_key) from e
        if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE):
            raise ShardError(f"{path}: unsupported tar member type {info.type!r} after key {last_key}",
                             shard=path, key=last_key)
        start, end = pos + 512, pos + 512 + info.size
        pos = start + -(-info.size // 512) * 512
        if not info.isfile():
            continue
        base = os.path.basename(info.name)
        if "." not in base:
            raise ShardError(f"{path}: member {info.name!r} has no extension (after key {last_key})",
                             shard=path, key=last_key)
        key, ext = base.split(".", 1)
        if end > n:
            raise ShardError(f"{path} key {key}: member {info.name!r} truncated ({n - start} of {info.size} bytes)",
                             shard=path, key=key, field=ext)
        last_key = key
        yield key, ext, (buf[start:end] if keys is None or key in keys else None)
    if pos < n:
        raise ShardError(f"{path}: tar ends mid-header after key {last_key}", shard=path, key=last_key)
    raise ShardError(f"{path}: tar lacks its end-of-archive blocks (truncated after key {last_key}?)",
                     shard=path, key=last_key)


class CorruptCounter:
    """Counts samples skipped under ``on_error='skip'`` (never silently: each one is logged)."""

    def __init__(self) -> None:
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.skipped)


def decode_sample(sample: dict[str, Any], manifest: dict | None = None) -> Episode:
    """Sample -> Episode, checked against the manifest's frame size and action dim; ShardError on fault."""
    try:
        return Episode.from_sample(sample, where=sample.get("__url__"),
                                   frame_size=tuple(manifest["frame_size"]) if manifest else None,
                                   action_dim=manifest.get("action_dim") if manifest else None)
    except EpisodeError as e:
        raise ShardError(str(e), shard=sample.get("__url__"), key=sample.get("__key__")) from e


def iter_shard_episodes(data_dir: str | Path, shard: dict, manifest: dict, on_error: str = "raise",
                        counter: CorruptCounter | None = None, keys: set[str] | None = None,
                        decode: Callable[[dict, dict], Any] = decode_sample) -> Iterator[tuple[str, Any]]:
    """Decode the episodes of one shard (optionally only ``keys``; ``decode``: sample -> record, by default an
    Episode), checking counts against the manifest."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path = Path(data_dir) / shard["name"]
    if not path.exists():
        raise ShardError(f"{path}: shard listed in the manifest is missing", shard=str(path))

    def _skip(what: str, msg: str, *args: Any) -> None:
        log.warning(msg, *args)
        if counter is not None:
            counter.skipped.append(what)

    seen = []
    try:
        for s in iter_tar_samples(path, keys=keys):
            seen.append(s["__key__"])
            if s.get("__skipped__"):
                continue
            try:
                ep = decode(s, manifest)
            except ShardError as e:
                if on_error == "raise":
                    raise ShardError(str(e), shard=s["__url__"], key=s["__key__"]) from e
                _skip(f"{path}:{s['__key__']}", "skipping corrupt sample: %s", e)
                continue
            yield s["__key__"], ep
    except ShardError as e:
        if on_error == "raise" or e.key is None and not seen:
            raise
        _skip(f"{path}:<after {e.key}>", "skipping rest of corrupt shard: %s", e)
        return
    if seen != shard["keys"]:
        missing = [k for k in shard["keys"] if k not in seen]
        unexpected = [k for k in seen if k not in shard["keys"]]
        msg = f"{path}: keys differ from the manifest (missing {missing[:5]}, unexpected {unexpected[:5]})"
        if on_error == "raise":
            raise ShardError(msg, shard=str(path), key=(missing or unexpected or [None])[0])
        _skip(msg, "%s", msg)


def iter_episodes(data_dir: str | Path, splits: Iterable[str] | None = None, verify: bool = True,
                  on_error: str = "raise", counter: CorruptCounter | None = None) -> Iterator[Episode]:
    """All episodes of a dataset directory (optionally only some splits), in shard order."""
    m = verify_dataset(data_dir, checksums=verify) if verify else read_manifest(data_dir)
    want = None if splits is None else set(splits)
    for sh in m["shards"]:
        if want is None or sh["split"] in want:
            for _, ep in iter_shard_episodes(data_dir, sh, m, on_error=on_error, counter=counter):
                yield ep


def verify_contents(data_dir: str | Path) -> tuple[int, int]:
    """Verify a dataset completely: checksums, then every sample decoded and each shard's episodes and
    frames counted against the manifest. Returns (episodes, frames)."""
    m = verify_dataset(data_dir)
    episodes = frames = 0
    for sh in m["shards"]:
        lengths = [len(ep) for _, ep in iter_shard_episodes(data_dir, sh, m)]
        n_ep, n_fr = len(lengths), sum(lengths)
        if (n_ep, n_fr) != (sh["episodes"], sh["frames"]):
            raise ShardError(f"{Path(data_dir) / sh['name']}: holds {n_ep} episodes / {n_fr} frames, the manifest "
                             f"says {sh['episodes']} / {sh['frames']}", shard=sh["name"])
        episodes, frames = episodes + n_ep, frames + n_fr
    return episodes, frames


def episode_lengths(data_dir: str | Path, manifest: dict, splits: Iterable[str]) -> list[int]:
    """Frames of every episode of ``splits``, in shard order, read from the samples' step arrays
    (frames are not decoded)."""
    want, out = set(splits), []
    for sh in manifest["shards"]:
        if sh["split"] in want:
            for s in iter_tar_samples(Path(data_dir) / sh["name"]):
                try:
                    out.append(int(load_npz(s["steps.npz"])["actions"].shape[0]))
                except (KeyError, ValueError, OSError, zlib.error, zipfile.BadZipFile) as e:
                    raise ShardError(f"{s['__url__']} key {s['__key__']}: unreadable steps: {e}",
                                     shard=sh["name"], key=s["__key__"]) from e
    return out


def safe_std(std: Iterable[float], floor: float = 1e-6) -> np.ndarray:
    """Standard deviations used for normalisation: a (near-)constant dim is left unscaled (std 1)."""
    s = np.asarray(list(std), np.float64)
    return np.where(np.isfinite(s) & (s > floor), s, 1.0).astype(np.float32)
