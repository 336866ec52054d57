"""RLDS (TFRecord) -> Episodes -> WebDataset shards; parallel over input files, streaming, resumable.

Each input file converts, in a worker process, into its part directory ``<out>/.parts/<split>-<file index>/``
(``part.json`` written last; a rerun skips matching parts); the parts merge in file and record order into
``<out>``, so keys, order and bytes do not depend on the workers or on interruptions."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
from google.protobuf.message import DecodeError

from whale_pl.data.episode import EEF7_ACTION_SPACE, STEP_FIELDS, ActionSpace, Episode, load_npz
from whale_pl.data.oxe import registry as reg
from whale_pl.data.oxe.example_proto import parse_example
from whale_pl.data.oxe.schema import DatasetSchema, load_schema
from whale_pl.data.oxe.standardize import (Where, decode_frame, episode_length, language_of, standard_actions,
                                           step_array, step_bytes)
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
    """The source cannot be converted as asked (ambiguous schema, missing files, wrong episode counts)."""


@dataclass
class ConvertOptions:
    """How to convert: frame size, splits, an episode limit per split, workers, replacing another output."""
    size: int = 64                      # output frames are size x size (centre-cropped); 0 keeps the native size
    splits: tuple[str, ...] = ("train",)
    max_episodes: int | None = None     # per split: only the first N episodes (file, record order)
    workers: int = 0                    # 0: min(#files, cpu count)
    overwrite: bool = False             # replace an existing, different output directory


@dataclass
class Plan:
    """What to read from the source and how: decided once from features.json."""
    dataset: str
    version: str
    camera_key: str                     # full Example key
    language_key: str | None
    language_encoding: str
    stride: int
    control_hz: float | None
    action: dict                        # {"registry": ActionMap dict} or {"native": key}
    action_space: dict
    reward_key: str | None
    size: int

    def fingerprint(self) -> str:
        """Short sha256 of the plan (part markers and the conversion identity use it)."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def make_plan(src: Path, schema: DatasetSchema, opts: ConvertOptions) -> Plan:
    """What to read from ``src``: the registry entry's keys, else the only camera, action and text key there are."""
    dataset, version = src.parent.name, src.name
    cfg = reg.REGISTRY.get(dataset)
    if cfg is None:
        camera, action, space, lang = _infer_keys(schema, dataset)
        enc, stride, hz = "utf8", 1, None
    else:
        camera = _key_in(schema, "steps/observation/" + cfg.camera, dataset, "camera", schema.image_keys())
        lang = _key_in(schema, "steps/" + cfg.language, dataset, "text", schema.text_step_keys())
        action, space = {"registry": asdict(cfg.action)}, EEF7_ACTION_SPACE.to_json()
        enc, stride, hz = cfg.language_encoding, cfg.frame_stride, cfg.control_hz
    return Plan(dataset=dataset, version=version, camera_key=camera, language_key=lang, language_encoding=enc,
                stride=stride, control_hz=hz, action=action, action_space=space,
                reward_key="steps/reward" if "steps/reward" in schema.features else None, size=opts.size)


def _key_in(schema: DatasetSchema, key: str, dataset: str, what: str, have: list[str]) -> str:
    """``key`` if the schema has it, else a ConversionError naming the registry entry and the keys there are."""
    if key not in schema.features:
        raise ConversionError(f"{schema.path}: registry entry {dataset!r} names {what} {key!r}, which features.json "
                              f"lacks; {what} keys: {', '.join(have) or 'none'}")
    return key


def _infer_keys(schema: DatasetSchema, dataset: str) -> tuple[str, dict, dict, str | None]:
    """An unregistered dataset's only RGB camera, flat action tensor and text key (if any), else ConversionError."""
    images, texts, actions = schema.image_keys(), schema.text_step_keys(), schema.numeric_step_keys("action")
    problems = []
    if len(images) != 1:
        problems.append(f"{len(images)} camera keys ({', '.join(images) or 'none'})")
    if len(actions) != 1 or len(schema.features[actions[0]].shape) > 1:
        problems.append(f"action is not one flat tensor ({', '.join(actions) or 'none'})")
    if len(texts) > 1:
        problems.append(f"{len(texts)} text keys ({', '.join(texts)})")
    if problems:
        raise ConversionError(f"{schema.path}: dataset {dataset!r} is not in the OXE registry "
                              "(whale_pl/data/oxe/registry.py) and its schema is ambiguous:\n  - "
                              + "\n  - ".join(problems))
    n = schema.features[actions[0]].size
    if n is None:
        raise ConversionError(f"{schema.path}: action {actions[0]!r} has unknown shape")
    space = EEF7_ACTION_SPACE if n == 7 else ActionSpace(names=[f"a{i}" for i in range(n)], sum_dims=list(range(n)))
    return images[0], {"native": actions[0]}, space.to_json(), (texts[0] if texts else None)


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
    t = episode_length(ex, schema, plan.camera_key, where)
    if t == 0:
        raise where.err(plan.camera_key, "episode has no steps")
    if "registry" in plan.action:
        actions = standard_actions(ex, schema, reg.ActionMap(**plan.action["registry"]), t, where)
    else:  # an unregistered dataset's flat action tensor, unchanged
        actions = step_array(ex, schema, plan.action["native"], t, where).astype(np.float32)
    flags, steps = {}, np.arange(t)
    for name, default in (("is_first", 0), ("is_last", t - 1), ("is_terminal", t - 1)):
        key = f"steps/{name}"
        flags[name] = step_array(ex, schema, key, t, where)[:, 0] != 0 if key in schema.features else steps == default
    rewards = (step_array(ex, schema, plan.reward_key, t, where)[:, 0].astype(np.float32)
               if plan.reward_key else np.zeros(t, np.float32))
    images = step_bytes(ex, plan.camera_key, t, where)
    language = language_of(ex, plan.language_key, plan.language_encoding, t, where)
    k = plan.stride
    keep = range(0, t, k)
    frames = np.stack([decode_frame(images[i], plan.size, plan.camera_key, i, where) for i in keep])
    success = flags["is_terminal"].astype(np.float32)
    if k > 1:
        space = ActionSpace.from_json(plan.action_space)
        groups = [slice(i, min(i + k, t)) for i in keep]
        actions = np.stack([space.compose(actions[g]) for g in groups]).astype(np.float32)
        rewards = np.array([rewards[g].sum() for g in groups], np.float32)
        success = np.array([success[g].max() for g in groups], np.float32)
        flags = {n: np.array([v[g].any() for g in groups]) for n, v in flags.items()}
    name = plan.dataset
    meta = {"source": f"oxe/{name}", "task": language or name,
            "policy": {"name": f"oxe/{name}", "family": name, "params": {}},
            "split": RLDS_TO_SHARD_SPLIT.get(split, split), "action_space": plan.action_space,
            "control_hz": plan.control_hz / k if plan.control_hz else None,
            "episode_id": f"{name}/{split}/{file_index:05d}/{where.index:06d}",
            "oxe": {"dataset": name, "version": plan.version, "split": split, "file": Path(where.path).name,
                    "record": where.index, "frame_stride": k, "camera": plan.camera_key, "native_steps": t}}
    return Episode(frames=frames, actions=np.ascontiguousarray(actions, np.float32), rewards=rewards,
                   success=success, is_first=flags["is_first"], is_last=flags["is_last"],
                   is_terminal=flags["is_terminal"], state=None, language=language, meta=meta)


def _source_id(path: Path) -> dict:
    st = path.stat()
    return {"file": path.name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _part_dir(out: Path, split: str, file_index: int) -> Path:
    return out / PARTS / f"{split}-{file_index:05d}"


def _recorded(path: Path, ident: dict, ident_of) -> dict | None:
    """The JSON record at ``path`` if ``ident_of(record) == ident`` (None if absent, unreadable or another)."""
    rec = read_json(path)
    return rec if isinstance(rec, dict) and ident_of(rec) == ident else None


def convert_file(job: tuple) -> dict:
    """Convert one TFRecord file into its part directory (at most ``limit`` episodes); returns its summary."""
    src, path, split, file_index, expected, plan_d, out, limit = job
    plan, path = Plan(**plan_d), Path(path)
    part = _part_dir(Path(out), split, file_index)
    marker = {"plan": plan.fingerprint(), "source": _source_id(path), "limit": limit}
    done = _recorded(part / "part.json", marker, lambda r: r.get("id"))
    if done is not None:
        return {**done, "resumed": True}
    if part.exists():
        shutil.rmtree(part)
    part.mkdir(parents=True)
    cpu0 = time.process_time()
    n_ep, n_frames = _write_part(path, load_schema(src), plan, split, file_index, part / "shards", limit)
    if n_ep != expected and (limit is None or n_ep < limit):
        raise ConversionError(f"{path}: dataset_info.json promises {expected} episodes, the file holds {n_ep}")
    summary = {"id": marker, "split": split, "file_index": file_index, "episodes": n_ep, "frames": n_frames,
               "resumed": False, "cpu_s": time.process_time() - cpu0,
               "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    write_json_atomic(part / "part.json", summary, sort_keys=True)
    return summary


def _write_part(path: Path, schema: DatasetSchema, plan: Plan, split: str, file_index: int, shards: Path,
                limit: int | None) -> tuple[int, int]:
    """Convert one file's records (at most ``limit``) into the dataset ``shards``: (episodes, frames)."""
    writer: ShardWriter | None = None
    n_ep = n_frames = 0
    try:
        for index, data in enumerate(iter_records(path)):
            ep = record_to_episode(data, schema, plan, Where(str(path), index), split, file_index)
            writer = writer or ShardWriter(shards, episodes_per_shard=1 << 30)
            writer.write(ep, key=f"{split}-{file_index:05d}-{index:06d}")  # fixed by (split, file, record)
            n_ep, n_frames = n_ep + 1, n_frames + len(ep)
            if n_ep == limit:
                break
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return n_ep, n_frames


def convert_dataset(src: str | os.PathLike, out: str | os.PathLike, opts: ConvertOptions | None = None,
                    progress: bool = True, timing: dict | None = None) -> dict:
    """Convert ``<root>/<dataset>/<version>`` into a shard directory ``out``; returns the manifest.
    ``timing`` receives wall and CPU seconds (this process + the part workers) and the parts resumed."""
    opts = opts or ConvertOptions()
    src, out = Path(src), Path(out)
    plan = make_plan(src, load_schema(src), opts)
    jobs, ident = _plan_jobs(src, out, plan, opts)
    done = _recorded(out / MANIFEST, ident, lambda m: m.get("extra", {}).get("oxe", {}).get("id"))
    if done is not None:
        log.info("%s: already converted with the same source and options", out)
        return done
    state, what = ownership(out, KIND, ident)
    if state in ("other_config", "foreign") and not opts.overwrite:
        raise ConversionError(f"{what}; pass --overwrite to replace it, or choose another --out")
    claim(out, KIND, ident)  # before the first part: an interrupted conversion resumes only as ours

    t0, cpu0 = time.perf_counter(), time.process_time()
    workers = opts.workers or min(len(jobs), os.cpu_count() or 1)
    oxe = {"id": ident, "dataset": plan.dataset, "version": plan.version, "plan": asdict(plan),
           "registry": asdict(reg.REGISTRY[plan.dataset]) if "registry" in plan.action else None,
           "gripper_convention": "absolute opening in [0, 1]: 1 = open, 0 = closed"}
    summaries = _merge_parts(out, jobs, opts, plan, oxe, workers, progress)
    manifest = json.loads((out / MANIFEST).read_text())
    shutil.rmtree(out / PARTS, ignore_errors=True)
    dt = time.perf_counter() - t0
    if timing is not None:
        fresh = [p for p in summaries if not p["resumed"]]
        timing.update(wall_s=dt, cpu_s=time.process_time() - cpu0 + sum(p["cpu_s"] for p in fresh),
                      parts=len(summaries), parts_resumed=len(summaries) - len(fresh),
                      max_rss_mb=max((p["max_rss_mb"] for p in fresh), default=0.0))
    log.info("%s: %d episodes, %d frames in %.1f s", out, manifest["episodes"], manifest["frames"], dt)
    return manifest


def _plan_jobs(src: Path, out: Path, plan: Plan, opts: ConvertOptions) -> tuple[list[tuple], dict]:
    """One ``convert_file`` job per source file of each split, and the conversion's identity."""
    limit = opts.max_episodes
    if limit is not None and limit < 1:
        raise ConversionError(f"max_episodes must be >= 1, got {limit}")
    jobs = []
    for split in opts.splits:
        if split not in RLDS_TO_SHARD_SPLIT:
            raise ConversionError(f"split {split!r}: expected one of {sorted(RLDS_TO_SHARD_SPLIT)}")
        files = source_files(src, split)
        if limit is not None:  # the leading files that hold the first `limit` episodes
            files = files[: int(np.searchsorted(np.cumsum([n for _, n in files]), limit)) + 1]
        jobs += [(str(src), str(path), split, i, expected, asdict(plan), str(out), limit)
                 for i, (path, expected) in enumerate(files)]
    ident = {"plan": plan.fingerprint(), "sources": [_source_id(Path(j[1])) for j in jobs], "max_episodes": limit}
    return jobs, ident


def _merge_parts(out: Path, jobs: list[tuple], opts: ConvertOptions, plan: Plan, oxe: dict, workers: int,
                 progress: bool) -> list[dict]:
    """Convert the parts and merge each into ``out`` in file order, as soon as it is done; returns their summaries."""
    from tqdm import tqdm

    limit = opts.max_episodes
    summaries: list[dict] = []
    written: dict[str, int] = {}
    parts = map(convert_file, jobs) if workers <= 1 else map_ordered(convert_file, jobs, workers)
    with ShardWriter(out, extra={"oxe": oxe}) as w:
        for p in tqdm(parts, total=len(jobs), desc=f"oxe {plan.dataset}: files", unit="file", disable=not progress):
            summaries.append(p)
            if p["episodes"]:
                for ep, sample in _iter_encoded(_part_dir(out, p["split"], p["file_index"]) / "shards"):
                    if limit is not None and written.get(p["split"], 0) >= limit:
                        break
                    w.write(ep, key=sample["__key__"], sample=sample)
                    written[p["split"]] = written.get(p["split"], 0) + 1
    return summaries


def _iter_encoded(part_dir: Path) -> Iterator[tuple[Episode, dict]]:
    """(episode, its encoded sample) of every episode of a part; the frames are a placeholder (the merge copies
    the sample instead of compressing the frames again)."""
    m = verify_dataset(part_dir)
    h, w = m["frame_size"]
    for sh in m["shards"]:
        for s in iter_tar_samples(part_dir / sh["name"]):
            steps = load_npz(s["steps.npz"])
            meta = json.loads(s["meta.json"].decode("utf-8"))
            language = meta.pop("language", "")
            frames = np.broadcast_to(np.zeros((1, 1, 1, 3), np.uint8), (len(steps["actions"]), h, w, 3))
            yield (Episode(frames=frames, state=steps.get("state"), language=language, meta=meta,
                           **{n: steps[n] for n in STEP_FIELDS}),
                   {k: s[k] for k in ("__key__", "frames.npz", "steps.npz", "meta.json")})


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
