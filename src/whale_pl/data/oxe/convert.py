"""RLDS (TFRecord) -> Episodes -> WebDataset shards, streaming. Each input file converts, in a worker process,
into its part ``<out>/.parts/<split>-<file index>/`` (``part.json`` written last; a rerun reuses it); the parts
merge in file and record order into ``<out>``: keys, order and bytes do not depend on workers or interruptions."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
from google.protobuf.message import DecodeError

from whale_pl.data.episode import EEF7_ACTION_SPACE, STEP_FIELDS, Episode, load_npz
from whale_pl.data.oxe import registry as reg
from whale_pl.data.oxe.example_proto import parse_example
from whale_pl.data.oxe.schema import DatasetSchema, load_schema
from whale_pl.data.oxe.standardize import (Where, decode_frame, episode_length, language_of, parse_spec,
                                           standard_actions, step_array, step_bytes)
from whale_pl.data.oxe.tfrecord import iter_records
from whale_pl.data.ownership import claim, ownership, read_json
from whale_pl.data.shards import MANIFEST, ShardWriter, iter_tar_samples, verify_dataset
from whale_pl.data.workers import map_ordered
from whale_pl.io import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)
PARTS = ".parts"
KIND = "whale-data oxe"
RLDS_TO_SHARD_SPLIT = {"train": "train", "val": "val", "validation": "val", "test": "val"}


class ConversionError(ValueError):
    """The source cannot be converted as asked (unregistered dataset, missing keys or files, wrong episode counts)."""


@dataclass
class ConvertOptions:
    """How to convert: frame size, splits, an episode limit per split, workers, replacing another output."""
    size: int = 64                      # output frames are size x size (centre-cropped); 0 keeps the native size
    splits: tuple[str, ...] = ("train",)
    max_episodes: int | None = None     # per split: only the first N episodes (file, record order)
    workers: int = 0                    # 0: min(#files, cpu count)
    overwrite: bool = False             # replace an existing, different output directory


@dataclass(frozen=True)
class Plan:
    """What a conversion reads and writes: the dataset's registry entry, its version and the frame size."""
    cfg: reg.DatasetConfig
    version: str
    size: int

    def fingerprint(self) -> str:
        """Short sha256 of the plan (part markers and the conversion identity use it)."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def make_plan(src: Path, schema: DatasetSchema, size: int) -> Plan:
    """The registry entry of ``src``'s dataset, once features.json holds every key the entry names."""
    cfg = reg.REGISTRY.get(src.parent.name)
    if cfg is None:
        raise ConversionError(f"{src}: dataset {src.parent.name!r} is not in the OXE registry "
                              "(whale_pl/data/oxe/registry.py lists the datasets it converts)")
    specs = {"camera": "observation/" + cfg.camera, "instruction": cfg.language, "translation": cfg.action.xyz,
             "rotation": cfg.action.rot, "gripper": cfg.action.gripper}
    missing = [f"{what} {parse_spec(s)[0]!r}" for what, s in specs.items()
               if s is not None and parse_spec(s)[0] not in schema.features]
    if missing:
        raise ConversionError(f"{schema.path}: registry entry {cfg.name!r} names {', '.join(missing)}, which "
                              "features.json lacks")
    return Plan(cfg, src.name, size)


def _splits_info(src: Path) -> tuple[str, dict[str, dict]]:
    """The dataset's file name prefix and its splits' entries in dataset_info.json."""
    path = src / "dataset_info.json"
    if not path.is_file():
        raise ConversionError(f"{path}: missing; a TFDS dataset directory lists its splits and files there")
    info = json.loads(path.read_text())
    return info.get("name", src.parent.name), {s["name"]: s for s in info.get("splits", [])}


def source_files(src: Path, split: str) -> list[tuple[Path, int]]:
    """The split's TFRecord files in shard order, with their episode counts (dataset_info.json)."""
    name, splits = _splits_info(src)
    if split not in splits:
        raise ConversionError(f"{src}: no split {split!r} in dataset_info.json (it has {sorted(splits)})")
    counts = [int(c) for c in splits[split].get("shardLengths", [])]
    template = splits[split].get("filepathTemplate", "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}")
    n = len(counts)
    files = [src / template.replace("{DATASET}", name).replace("{SPLIT}", split)
             .replace("{FILEFORMAT}", "tfrecord").replace("{SHARD_X_OF_Y}", f"{i:05d}-of-{n:05d}") for i in range(n)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ConversionError(f"{src}: dataset_info.json lists {n} {split!r} files; missing: "
                              f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return list(zip(files, counts))


def record_to_episode(data: bytes, schema: DatasetSchema, plan: Plan, where: Where, split: str,
                      file_index: int) -> Episode:
    """One serialized RLDS episode -> Episode, under the plan (RecordError on any fault)."""
    try:
        ex = parse_example(data)
    except DecodeError as e:
        raise where.err("<record>", f"not a tf.train.Example: {e}") from e
    cfg, k, camera = plan.cfg, plan.cfg.frame_stride, "steps/observation/" + plan.cfg.camera
    t = episode_length(ex, schema, camera, where)
    if t == 0:
        raise where.err(camera, "episode has no steps")
    actions = standard_actions(ex, schema, cfg.action, t, where)
    flags, steps = {}, np.arange(t)
    for name, default in (("is_first", 0), ("is_last", t - 1), ("is_terminal", t - 1)):
        key = f"steps/{name}"
        flags[name] = step_array(ex, schema, key, t, where)[:, 0] != 0 if key in schema.features else steps == default
    rewards = (step_array(ex, schema, "steps/reward", t, where)[:, 0].astype(np.float32)
               if "steps/reward" in schema.features else np.zeros(t, np.float32))
    images = step_bytes(ex, camera, t, where)
    language = language_of(ex, "steps/" + cfg.language, cfg.language_encoding, t, where)
    keep = range(0, t, k)
    frames = np.stack([decode_frame(images[i], plan.size, camera, i, where) for i in keep])
    success = flags["is_terminal"].astype(np.float32)
    if k > 1:
        groups = [slice(i, min(i + k, t)) for i in keep]
        actions = np.stack([EEF7_ACTION_SPACE.compose(actions[g]) for g in groups]).astype(np.float32)
        rewards = np.array([rewards[g].sum() for g in groups], np.float32)
        success = np.array([success[g].max() for g in groups], np.float32)
        flags = {n: np.array([v[g].any() for g in groups]) for n, v in flags.items()}
    name = cfg.name
    meta = {"source": f"oxe/{name}", "task": language or name,
            "policy": {"name": f"oxe/{name}", "family": name, "params": {}},
            "split": RLDS_TO_SHARD_SPLIT.get(split, split), "action_space": EEF7_ACTION_SPACE.to_json(),
            "control_hz": cfg.control_hz / k, "episode_id": f"{name}/{split}/{file_index:05d}/{where.index:06d}",
            "oxe": {"dataset": name, "version": plan.version, "split": split, "file": Path(where.path).name,
                    "record": where.index, "frame_stride": k, "camera": camera, "native_steps": t}}
    return Episode(frames=frames, actions=np.ascontiguousarray(actions, np.float32), rewards=rewards,
                   success=success, is_first=flags["is_first"], is_last=flags["is_last"],
                   is_terminal=flags["is_terminal"], state=None, language=language, meta=meta)


def _source_id(path: Path) -> dict:
    st = path.stat()
    return {"file": path.name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def convert_file(job: tuple) -> Path:
    """Convert one TFRecord file (its first ``limit`` episodes, if given) into its part directory, unless an
    earlier run did; returns the part's shard directory."""
    src, path, split, file_index, expected, limit, plan, out = job
    part = out / PARTS / f"{split}-{file_index:05d}"
    marker = {"plan": plan.fingerprint(), "source": _source_id(path), "limit": limit}
    if read_json(part / "part.json") == marker:
        return part / "shards"
    if part.exists():
        shutil.rmtree(part)
    part.mkdir(parents=True)
    schema, n_ep = load_schema(src), 0
    with ShardWriter(part / "shards", episodes_per_shard=1 << 30) as writer:
        for index, data in enumerate(iter_records(path)):
            ep = record_to_episode(data, schema, plan, Where(str(path), index), split, file_index)
            writer.write(ep, key=f"{split}-{file_index:05d}-{index:06d}")  # fixed by (split, file, record)
            n_ep += 1
            if n_ep == limit:
                break
        if n_ep != (expected if limit is None else limit):
            raise ConversionError(f"{path}: dataset_info.json promises {expected} episodes, the file holds {n_ep}")
    write_json_atomic(part / "part.json", marker, sort_keys=True)
    return part / "shards"


def convert_dataset(src: str | os.PathLike, out: str | os.PathLike, opts: ConvertOptions | None = None,
                    progress: bool = True) -> dict:
    """Convert ``<root>/<dataset>/<version>`` into a shard directory ``out``; returns the manifest."""
    opts = opts or ConvertOptions()
    src, out = Path(src), Path(out)
    plan = make_plan(src, load_schema(src), opts.size)
    jobs, ident = _plan_jobs(src, out, plan, opts)
    state, what = ownership(out, KIND, ident)
    if state == "ours" and (out / MANIFEST).is_file():
        log.info("%s: already converted with the same source and options", out)
        return read_json(out / MANIFEST)
    if state in ("other_config", "foreign") and not opts.overwrite:
        raise ConversionError(f"{what}; pass --overwrite to replace it, or choose another --out")
    from tqdm import tqdm

    workers = opts.workers or min(len(jobs), os.cpu_count() or 1)
    oxe = {"id": ident, "dataset": plan.cfg.name, "version": plan.version, "size": plan.size,
           "registry": asdict(plan.cfg), "gripper_convention": "absolute opening in [0, 1]: 1 = open, 0 = closed"}
    with ShardWriter(out, extra={"oxe": oxe}) as w:  # first removes an earlier manifest
        claim(out, KIND, ident)  # before the first part: an interrupted conversion resumes only as ours
        parts = map(convert_file, jobs) if workers <= 1 else map_ordered(convert_file, jobs, workers)
        for shards in tqdm(parts, total=len(jobs), desc=f"oxe {plan.cfg.name}: files", unit="file",
                           disable=not progress):
            for ep, sample in _iter_encoded(shards):  # merged in file order as the parts finish
                w.write(ep, key=sample["__key__"], sample=sample)
    shutil.rmtree(out / PARTS, ignore_errors=True)
    manifest = read_json(out / MANIFEST)
    log.info("%s: %d episodes, %d frames", out, manifest["episodes"], manifest["frames"])
    return manifest


def _plan_jobs(src: Path, out: Path, plan: Plan, opts: ConvertOptions) -> tuple[list[tuple], dict]:
    """One ``convert_file`` job per source file holding the first ``max_episodes`` of each split, and the
    conversion's identity."""
    if opts.max_episodes is not None and opts.max_episodes < 1:
        raise ConversionError(f"max_episodes must be >= 1, got {opts.max_episodes}")
    jobs = []
    for split in opts.splits:
        if split not in RLDS_TO_SHARD_SPLIT:
            raise ConversionError(f"split {split!r}: expected one of {sorted(RLDS_TO_SHARD_SPLIT)}")
        left = opts.max_episodes  # episodes still wanted from this split (None: all)
        for i, (path, expected) in enumerate(source_files(src, split)):
            if left == 0:
                break
            take = expected if left is None else min(expected, left)
            if take:  # a file of no episodes has no part
                jobs.append((src, path, split, i, expected, None if take == expected else take, plan, out))
            left = None if left is None else left - take
    ident = {"plan": plan.fingerprint(), "sources": [_source_id(j[1]) for j in jobs],
             "max_episodes": opts.max_episodes}
    return jobs, ident


def _iter_encoded(part_dir: Path) -> Iterator[tuple[Episode, dict]]:
    """(episode, its encoded sample) of every episode of a part; the frames are a placeholder (the merge copies
    the sample instead of compressing the frames again)."""
    m = verify_dataset(part_dir)
    h, w = m["frame_size"]
    for sh in m["shards"]:
        for s in iter_tar_samples(part_dir / sh["name"]):
            steps = load_npz(s["steps.npz"])
            meta = json.loads(s["meta.json"].decode("utf-8"))
            frames = np.broadcast_to(np.zeros((1, 1, 1, 3), np.uint8), (len(steps["actions"]), h, w, 3))
            yield Episode(frames=frames, state=steps.get("state"), language=meta.pop("language", ""), meta=meta,
                          **{n: steps[n] for n in STEP_FIELDS}), s


MIXTURE_FILE = "mixture.json"
DATAMODULE_FILE = "datamodule.yaml"
DM_CLASS = "whale_pl.data.datamodule.ClipDataModule"


def convert_mixture(root: str | os.PathLike, datasets: list[tuple[str, float | None]],
                    out: str | os.PathLike, opts: ConvertOptions | None = None,
                    progress: bool = True) -> dict:
    """Convert ``datasets`` ((name, weight or None for the registry's)) under ``root`` to ``out/<dataset>``, each
    with the requested splits it has (``train`` is required); write ``out/mixture.json`` and ``datamodule.yaml``."""
    opts = opts or ConvertOptions()
    root, out = Path(root), Path(out)
    _check_mixture_root(out, opts.overwrite)
    names = [n for n, _ in datasets]
    if len(set(names)) != len(names):
        raise ConversionError(f"--datasets names a dataset twice: {names}")
    entries = []
    for name, weight in datasets:
        versions = sorted(p for p in (root / name).glob("*") if (p / "features.json").is_file())
        if not versions:
            raise ConversionError(f"{root / name}: no <version>/features.json under it")
        src = versions[-1]
        w = weight if weight is not None else reg.DEFAULT_MIXTURE_WEIGHTS.get(name, 1.0)
        if not w > 0:
            raise ConversionError(f"{name}: sampling weight must be > 0, got {w}")
        have = _splits_info(src)[1]
        splits = tuple(sp for sp in opts.splits if sp in have)
        if "train" in opts.splits and "train" not in splits or not splits:
            raise ConversionError(f"{src}: has none of the splits {list(opts.splits)} needed (it has {sorted(have)})")
        if splits != tuple(opts.splits):
            log.warning("%s: no split(s) %s; converting %s", name, [sp for sp in opts.splits if sp not in splits],
                        list(splits))
        m = convert_dataset(src, out / name, replace(opts, splits=splits), progress)
        entries.append({"name": name, "path": name, "weight": float(w),
                        "episodes": m["episodes"], "frames": m["frames"], "splits": list(splits)})
    mixture = {"kind": "whale_pl.mixture", "version": 1, "datasets": entries}
    write_json_atomic(out / MIXTURE_FILE, mixture, sort_keys=True)
    # a LightningCLI data config: `whale fit ... --data <out>/datamodule.yaml` (dirs as given by --out)
    import yaml

    dm = {"class_path": DM_CLASS, "init_args": {"dirs": [str(out / e["path"]) for e in entries],
                                                "weights": [e["weight"] for e in entries]}}
    write_text_atomic(out / DATAMODULE_FILE, yaml.safe_dump(dm, sort_keys=False))
    return mixture


def _check_mixture_root(out: Path, overwrite: bool) -> None:
    """Refuse (unless ``overwrite``) to replace a mixture.json or datamodule.yaml that whale-data oxe did not write."""
    import yaml

    owned = ((out / MIXTURE_FILE, "kind", "whale_pl.mixture"), (out / DATAMODULE_FILE, "class_path", DM_CLASS))
    for path, key, ours in owned:
        try:  # JSON is YAML
            mine = not path.exists() or overwrite or yaml.safe_load(path.read_text()).get(key) == ours
        except (OSError, AttributeError, yaml.YAMLError):
            mine = False
        if not mine:
            raise ConversionError(f"{path}: not written by whale-data oxe; pass --overwrite to replace it, "
                                  "or choose another --out")
