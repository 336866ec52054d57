"""RLDS (TFRecord) -> Episodes -> WebDataset shards; parallel over input files, streaming, resumable.

1. Every input file is converted, in a worker process, one episode in memory at a time, into its own
   part directory ``<out>/.parts/<split>-<file index>/`` (a ShardWriter dataset) with a ``part.json``
   completion marker written last. A rerun skips every part whose marker matches its source and options.
2. The parts are merged, in file and record order, into ``<out>`` by one ShardWriter, then removed.
   A rerun of a finished conversion with the same source and options finds the manifest and stops.

Keys, order and bytes are fixed by (split, file index, record index), whatever the workers or interruptions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np
from google.protobuf.message import DecodeError

from whale_pl.data.episode import EEF7_ACTION_SPACE, STEP_FIELDS, ActionSpace, Episode, load_npz
from whale_pl.data.oxe import registry as reg
from whale_pl.data.oxe.example_proto import parse_example
from whale_pl.data.oxe.schema import DatasetSchema, SchemaError, load_schema
from whale_pl.data.oxe.standardize import (RecordError, Where, decode_frame, episode_length, language_of,
                                           standard_actions, step_array, step_bytes)
from whale_pl.data.oxe.tfrecord import TFRecordError, iter_records_safe
from whale_pl.data.ownership import claim, ownership, read_json
from whale_pl.data.shards import MANIFEST, ShardWriter, iter_tar_samples, verify_dataset
from whale_pl.data.workers import map_ordered
from whale_pl.io import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)
PARTS = ".parts"
KIND = "whale-data oxe"
RLDS_TO_SHARD_SPLIT = {"train": "train", "val": "val", "validation": "val", "test": "val"}


class ConversionError(ValueError):
    """The source cannot be converted as asked (ambiguous schema, missing files, corrupt input)."""


@dataclass
class ConvertOptions:
    """How to convert: frame size and crop, key overrides, splits, stride, workers, corrupt input."""
    size: int = 64                      # output frames are size x size; 0 keeps the native size
    crop: str = "center"                # "center" (crop to square) | "pad" (letterbox to square)
    camera: str | None = None           # override the primary camera (key under steps/observation/)
    action_key: str | None = None       # unregistered datasets: the flat action tensor to use
    language_key: str | None = None     # unregistered datasets: the instruction key
    splits: tuple[str, ...] = ("train",)
    stride: int | None = None           # None: the registry's frame stride (1 if unregistered)
    workers: int = 0                    # 0: min(#files, cpu count)
    skip_corrupt: bool = False          # skip and count corrupt episodes instead of failing
    episodes_per_shard: int = 64
    max_episodes: int | None = None     # per split: only the first N episodes (file, record order)
    overwrite: bool = False             # replace an existing, different output directory
    keep_parts: bool = False


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
    registered: bool
    reward_key: str | None
    size: int
    crop: str
    splits: list[str] = field(default_factory=list)

    def fingerprint(self) -> str:
        """Short sha256 of the plan (part markers and the conversion identity use it)."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def _obs_key(key: str) -> str:
    return "steps/observation/" + key.removeprefix("steps/").removeprefix("observation/")


def _step_key(key: str) -> str:
    return key if key.startswith("steps/") else f"steps/{key}"


def make_plan(src: Path, schema: DatasetSchema, opts: ConvertOptions) -> Plan:
    """What to read from ``src`` and how: the registry entry's choices (or the flags'), else the only
    camera, flat action tensor and text key the schema has; ConversionError listing what is ambiguous."""
    dataset, version = src.parent.name, src.name
    cfg = reg.REGISTRY.get(dataset)
    problems: list[str] = []
    camera = _plan_camera(schema, cfg, opts, dataset, problems)
    action, space = _plan_action(schema, cfg, opts, problems)
    lang, enc = _plan_language(schema, cfg, opts, dataset, problems)
    if problems:
        raise ConversionError(f"{schema.path}: dataset {dataset!r} is not in the OXE registry and its "
                              "schema is ambiguous:\n  - " + "\n  - ".join(problems))
    stride = opts.stride or (cfg.frame_stride if cfg else 1)
    if stride > 1 and ActionSpace.from_json(space).uncomposable_dims:
        raise ConversionError(f"{dataset}: frame stride {stride} needs composable actions; {space}")
    return Plan(dataset=dataset, version=version, camera_key=camera, language_key=lang,
                language_encoding=enc, stride=stride, control_hz=cfg.control_hz if cfg else None,
                action=action, action_space=space, registered=cfg is not None,
                reward_key="steps/reward" if "steps/reward" in schema.features else None,
                size=opts.size, crop=opts.crop, splits=list(opts.splits))


def _key_in(schema: DatasetSchema, key: str, who: str, what: str, have: list[str], flag: str) -> str:
    """``key`` if the schema has it, else a ConversionError naming who asked for it and the keys there are."""
    if key not in schema.features:
        raise ConversionError(f"{schema.path}: {who} names {what} {key!r}, which features.json lacks; {what} keys: "
                              f"{', '.join(have) or 'none'}; choose one with {flag} KEY")
    return key


def _plan_camera(schema: DatasetSchema, cfg, opts: ConvertOptions, dataset: str, problems: list[str]) -> str:
    images = schema.image_keys()
    if opts.camera or cfg is not None:
        who = f"--camera {opts.camera!r}" if opts.camera else f"registry entry {dataset!r}"
        return _key_in(schema, _obs_key(opts.camera or cfg.camera), who, "camera", images, "--camera")
    if len(images) == 1:
        return images[0]
    problems.append(f"{len(images)} camera keys ({', '.join(images) or 'none'}): choose one with --camera KEY")
    return ""


def _plan_action(schema: DatasetSchema, cfg, opts: ConvertOptions, problems: list[str]) -> tuple[dict, dict]:
    if cfg is not None and opts.action_key is None:
        reg.check_config(cfg)
        return {"registry": asdict(cfg.action)}, EEF7_ACTION_SPACE.to_json()
    cands = schema.numeric_step_keys("action")
    flat = [k for k in cands if len(schema.features[k].shape) <= 1]
    if opts.action_key:
        key = _key_in(schema, _step_key(opts.action_key), f"--action-key {opts.action_key!r}", "action", cands,
                      "--action-key")
    elif len(cands) == 1 and flat:
        key = flat[0]
    else:
        problems.append(f"action is not one flat tensor ({', '.join(cands) or 'none'}): register the dataset in "
                        "whale_pl/data/oxe/registry.py, or choose one flat tensor with --action-key KEY")
        return {}, {}
    n = schema.features[key].size
    if n is None:
        raise ConversionError(f"{schema.path}: action {key!r} has unknown shape {schema.features[key].shape}")
    if n == 7:  # the standard layout: (dx, dy, dz, droll, dpitch, dyaw, gripper)
        return {"native": key}, EEF7_ACTION_SPACE.to_json()
    return {"native": key}, ActionSpace(names=[f"a{i}" for i in range(n)], sum_dims=list(range(n))).to_json()


def _plan_language(schema: DatasetSchema, cfg, opts: ConvertOptions, dataset: str,
                   problems: list[str]) -> tuple[str | None, str]:
    texts = schema.text_step_keys()
    if opts.language_key in ("none", ""):
        return None, "utf8"
    if opts.language_key:
        lang = _key_in(schema, _step_key(opts.language_key), f"--language-key {opts.language_key!r}", "text", texts,
                       "--language-key")
        return lang, "codepoints" if schema.features[lang].kind == "tensor" else "utf8"
    if cfg is not None:
        if not cfg.language:
            return None, cfg.language_encoding
        who = f"registry entry {dataset!r}"
        return _key_in(schema, _step_key(cfg.language), who, "text", texts, "--language-key"), cfg.language_encoding
    if len(texts) <= 1:
        return (texts[0] if texts else None), "utf8"
    problems.append(f"{len(texts)} text keys ({', '.join(texts)}): choose the instruction with --language-key KEY")
    return None, "utf8"


def _dataset_info(src: Path) -> dict:
    path = src / "dataset_info.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def source_files(src: Path, split: str) -> list[tuple[Path, int | None]]:
    """The split's TFRecord files in shard order, with episode counts from dataset_info.json."""
    info = _dataset_info(src)
    name = info.get("name", src.parent.name)
    entries = [s for s in info.get("splits", []) if s.get("name") == split]
    if entries:
        counts = [int(c) for c in entries[-1].get("shardLengths", [])]
        template = entries[-1].get("filepathTemplate", "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}")
        n = len(counts)
        files = [src / template.replace("{DATASET}", name).replace("{SPLIT}", split)
                 .replace("{FILEFORMAT}", "tfrecord").replace("{SHARD_X_OF_Y}", f"{i:05d}-of-{n:05d}")
                 for i in range(n)]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ConversionError(f"{src}: dataset_info.json lists {n} {split!r} files; missing: "
                                  f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        return list(zip(files, counts))
    files = sorted(src.glob(f"{name}-{split}.tfrecord-*"))
    if not files:
        raise ConversionError(f"{src}: no split {split!r} (no dataset_info.json entry, no "
                              f"{name}-{split}.tfrecord-* files)")
    return [(f, None) for f in files]


def _enough_files(files: list[tuple[Path, int | None]], n: int) -> list[tuple[Path, int | None]]:
    """The leading files that hold the first ``n`` episodes (all files when counts are unknown;
    each then converts at most ``n`` and the merge keeps the first ``n``)."""
    if any(count is None for _, count in files):
        return files
    totals = np.cumsum([count for _, count in files])
    return files[: int(np.searchsorted(totals, n)) + 1]


def dataset_splits(src: Path) -> set[str]:
    """The RLDS split names a dataset directory holds (dataset_info.json, else its file names)."""
    names = {s.get("name") for s in _dataset_info(src).get("splits", [])}
    if names:
        return {n for n in names if n}
    return {f.name.split(".tfrecord")[0].rsplit("-", 1)[-1] for f in src.glob("*-*.tfrecord-*")}


def record_to_episode(data: bytes, schema: DatasetSchema, plan: Plan, where: Where, split: str,
                      file_index: int) -> Episode:
    """One serialized RLDS episode -> Episode, under the plan (RecordError on any fault)."""
    try:
        ex = parse_example(data)
    except DecodeError as e:
        raise RecordError(where.path, where.index, "<record>", f"not a tf.train.Example: {e}") from e
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
    frames = np.stack([decode_frame(images[i], plan.size, plan.crop, plan.camera_key, i, where) for i in keep])
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


def episode_key(split: str, file_index: int, record: int) -> str:
    """The shard sample key of a record: fixed by (split, file index, record index)."""
    return f"{split}-{file_index:05d}-{record:06d}"


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
    """Convert one TFRecord file into its part directory; returns the part's summary. ``limit`` (the
    job's last item) stops after that many converted episodes."""
    src, path, split, file_index, expected, plan_d, out, skip_corrupt, limit = job
    plan, path = Plan(**plan_d), Path(path)
    part = _part_dir(Path(out), split, file_index)
    marker = {"plan": plan.fingerprint(), "source": _source_id(path), "skip_corrupt": skip_corrupt}
    if limit is not None:
        marker["limit"] = int(limit)
    done = _recorded(part / "part.json", marker, lambda r: r.get("id"))
    if done is not None:
        return {**done, "resumed": True}
    if part.exists():
        shutil.rmtree(part)
    part.mkdir(parents=True)
    cpu0 = time.process_time()
    n_ep, n_frames, n_records, skipped = _write_part(path, load_schema(src), plan, split, file_index,
                                                     part / "shards", skip_corrupt, limit)
    stopped = limit is not None and n_ep >= limit
    if expected is not None and not stopped and n_ep + len(skipped) != expected:
        msg = (f"{path}: dataset_info.json promises {expected} episodes, the file holds {n_records} "
               f"readable records ({n_ep} converted, {len(skipped)} skipped as corrupt)")
        if not skip_corrupt or n_ep + len(skipped) > expected:
            raise ConversionError(msg)
        # records lost where the framing could not be recovered: each one counts as a dropped episode
        skipped.append({"file": path.name, "record": None, "episodes": expected - n_ep - len(skipped),
                        "error": msg})
    summary = {"id": marker, "split": split, "file_index": file_index, "episodes": n_ep,
               "frames": n_frames, "skipped": skipped, "resumed": False,
               "cpu_s": time.process_time() - cpu0,
               "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    write_json_atomic(part / "part.json", summary, sort_keys=True)
    return summary


def _write_part(path: Path, schema: DatasetSchema, plan: Plan, split: str, file_index: int, shards: Path,
                skip_corrupt: bool, limit: int | None) -> tuple[int, int, int, list[dict]]:
    """Convert one file's records into the dataset ``shards``: (episodes, frames, records read, skipped)."""
    writer: ShardWriter | None = None
    skipped: list[dict] = []
    n_ep = n_frames = n_records = 0
    try:
        for index, item in iter_records_safe(path):
            if limit is not None and n_ep >= limit:
                break
            n_records += 1
            try:
                if isinstance(item, TFRecordError):
                    raise item
                ep = record_to_episode(item, schema, plan, Where(str(path), index), split, file_index)
            except (TFRecordError, RecordError) as e:
                if not skip_corrupt:
                    raise
                log.warning("skipping corrupt episode: %s", e)
                skipped.append({"file": path.name, "record": index, "error": str(e)})
                continue
            writer = writer or ShardWriter(shards, episodes_per_shard=1 << 30)
            writer.write(ep, key=episode_key(split, file_index, index))
            n_ep, n_frames = n_ep + 1, n_frames + len(ep)
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return n_ep, n_frames, n_records, skipped


def convert_dataset(src: str | os.PathLike, out: str | os.PathLike, opts: ConvertOptions | None = None,
                    progress: bool = True, timing: dict | None = None) -> dict:
    """Convert ``<root>/<dataset>/<version>`` into a shard directory ``out``; returns the manifest.
    ``timing`` receives wall and CPU seconds (this process + the part workers) and the parts resumed."""
    opts = opts or ConvertOptions()
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise ConversionError(f"{src}: source directory does not exist (expected <root>/<dataset>/<version>)")
    try:
        schema = load_schema(src)
    except SchemaError as e:
        raise ConversionError(str(e)) from e
    plan = make_plan(src, schema, opts)
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
    oxe = {
        "id": ident, "dataset": plan.dataset, "version": plan.version, "plan": asdict(plan),
        "registry": reg.REGISTRY[plan.dataset].to_json() if plan.registered else None,
        "options": {k: v for k, v in asdict(opts).items() if k not in ("workers", "overwrite", "keep_parts")},
        "crop_policy": ("center-crop to square, antialiased bilinear resize" if opts.crop == "center"
                        else "letterbox (black) to square, antialiased bilinear resize"),
        "gripper_convention": "absolute opening in [0, 1]: 1 = open, 0 = closed",
    }
    summaries, n_skipped = _merge_parts(src, out, jobs, opts, plan, oxe, workers, progress)
    manifest = json.loads((out / MANIFEST).read_text())
    if not opts.keep_parts:
        shutil.rmtree(out / PARTS, ignore_errors=True)
    dt = time.perf_counter() - t0
    if timing is not None:
        fresh = [p for p in summaries if not p["resumed"]]
        timing.update(wall_s=dt, cpu_s=time.process_time() - cpu0 + sum(p.get("cpu_s", 0.0) for p in fresh),
                      parts=len(summaries), parts_resumed=len(summaries) - len(fresh),
                      max_rss_mb=max((p.get("max_rss_mb", 0.0) for p in fresh), default=0.0))
    log.info("%s: %d episodes, %d frames in %.1f s (%d corrupt skipped)", out, manifest["episodes"],
             manifest["frames"], dt, n_skipped)
    return manifest


def _plan_jobs(src: Path, out: Path, plan: Plan, opts: ConvertOptions) -> tuple[list[tuple], dict]:
    """One ``convert_file`` job per source file of each split, and the conversion's identity (the plan,
    the source files' sizes and times, the options that change the output)."""
    limit = opts.max_episodes
    if limit is not None and int(limit) < 1:
        raise ConversionError(f"max_episodes must be >= 1, got {limit}")
    jobs = []
    for split in opts.splits:
        if split not in RLDS_TO_SHARD_SPLIT:
            raise ConversionError(f"split {split!r}: expected one of {sorted(RLDS_TO_SHARD_SPLIT)}")
        files = source_files(src, split)
        if limit is not None:
            files = _enough_files(files, int(limit))
        for i, (path, expected) in enumerate(files):
            jobs.append((str(src), str(path), split, i, expected, asdict(plan), str(out), opts.skip_corrupt, limit))
    ident = {"plan": plan.fingerprint(), "sources": [_source_id(Path(j[1])) for j in jobs],
             "skip_corrupt": opts.skip_corrupt, "episodes_per_shard": opts.episodes_per_shard}
    if limit is not None:  # (absent otherwise, so conversions made before the option still match)
        ident["max_episodes"] = int(limit)
    return jobs, ident


def _merge_parts(src: Path, out: Path, jobs: list[tuple], opts: ConvertOptions, plan: Plan, oxe: dict,
                 workers: int, progress: bool) -> tuple[list[dict], int]:
    """Convert the parts and merge them, in file order as each is done while the workers go on, into
    ``out``; ``oxe`` (the manifest's conversion record) gets the corrupt-episode counts. Returns the
    parts' summaries and the number of episodes skipped as corrupt."""
    limit = opts.max_episodes
    summaries: list[dict] = []
    with ShardWriter(out, episodes_per_shard=opts.episodes_per_shard, overwrite=True, extra={"oxe": oxe}) as w:
        written: dict[str, int] = {}
        for p in _iter_jobs(jobs, workers, progress, plan.dataset):
            summaries.append(p)
            if p["episodes"]:
                for ep, sample in _iter_encoded(_part_dir(out, p["split"], p["file_index"]) / "shards"):
                    if limit is not None and written.get(p["split"], 0) >= limit:
                        break
                    w.write(ep, key=sample["__key__"], sample=sample)
                    written[p["split"]] = written.get(p["split"], 0) + 1
        skipped = [s for p in summaries for s in p["skipped"]]
        n_skipped = sum(s.get("episodes", 1) for s in skipped)
        oxe.update(skipped_corrupt=skipped, corrupt_episodes=n_skipped,
                   source_episodes=sum(p["episodes"] for p in summaries) + n_skipped)
        if not any(p["episodes"] for p in summaries):
            raise ConversionError(f"{src}: no episode converted ({n_skipped} corrupt)")
    return summaries, n_skipped


def _iter_encoded(part_dir: Path) -> Iterator[tuple[Episode, dict]]:
    """(episode, its sample) of every episode of a part: the merge copies the encoded sample instead of
    compressing the frames again, so the episode's frames are a zero-cost placeholder of the right shape."""
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


def _iter_jobs(jobs: list[tuple], workers: int, progress: bool, name: str):
    """Run `convert_file` over the jobs (in worker processes when workers > 1); yield in job order."""
    from tqdm import tqdm

    with tqdm(total=len(jobs), desc=f"oxe {name}: files", unit="file", disable=not progress) as bar:
        for r in map(convert_file, jobs) if workers <= 1 else map_ordered(convert_file, jobs, workers):
            yield r
            bar.update(1)


MIXTURE_FILE = "mixture.json"
DATAMODULE_FILE = "datamodule.yaml"
DM_CLASS = "whale_pl.data.datamodule.ClipDataModule"


def convert_mixture(root: str | os.PathLike, datasets: list[tuple[str, float | None]],
                    out: str | os.PathLike, opts: ConvertOptions | None = None,
                    progress: bool = True) -> dict:
    """Convert several datasets under ``root`` to ``out/<dataset>``; write ``out/mixture.json`` (each
    directory with its sampling weight and splits) and ``out/datamodule.yaml``. ``datasets``: (name or
    name/version, weight or None for the registry default). Each dataset converts the requested splits it
    has (RLDS held-out splits differ: ``val``, ``test`` or none); ``train`` is required."""
    opts = opts or ConvertOptions()
    root, out = Path(root), Path(out)
    _check_mixture_root(out, opts.overwrite)
    names = [n.split("/")[0] for n, _ in datasets]
    if len(set(names)) != len(names):
        raise ConversionError(f"--datasets names a dataset twice: {names}")
    entries = []
    for name, weight in datasets:
        src = root / name
        if src.is_dir() and not (src / "features.json").is_file():
            versions = sorted(p for p in src.iterdir() if (p / "features.json").is_file())
            if not versions:
                raise ConversionError(f"{src}: no <version>/features.json under it")
            src = versions[-1]
        dataset = src.parent.name
        w = weight if weight is not None else reg.DEFAULT_MIXTURE_WEIGHTS.get(dataset, 1.0)
        if not w > 0:
            raise ConversionError(f"{dataset}: sampling weight must be > 0, got {w}")
        splits = tuple(sp for sp in opts.splits if sp in dataset_splits(src))
        if "train" in opts.splits and "train" not in splits or not splits:
            raise ConversionError(f"{src}: has none of the splits {list(opts.splits)} needed "
                                  f"(it has {sorted(dataset_splits(src))})")
        if splits != tuple(opts.splits):
            log.warning("%s: no split(s) %s; converting %s", dataset,
                        [sp for sp in opts.splits if sp not in splits], list(splits))
        m = convert_dataset(src, out / dataset, replace(opts, splits=splits), progress)
        entries.append({"name": dataset, "path": dataset, "weight": float(w),
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
    """Refuse (unless ``overwrite``) to replace a mixture.json or datamodule.yaml that a mixture
    conversion did not write."""
    import yaml

    for name, ours in ((MIXTURE_FILE, lambda t: json.loads(t).get("kind") == "whale_pl.mixture"),
                       (DATAMODULE_FILE, lambda t: yaml.safe_load(t).get("class_path") == DM_CLASS)):
        path = out / name
        if not path.exists() or overwrite:
            continue
        try:
            mine = path.is_file() and ours(path.read_text())
        except (OSError, ValueError, AttributeError, yaml.YAMLError):
            mine = False
        if not mine:
            raise ConversionError(f"{path}: not written by whale-data oxe; pass --overwrite to replace it, "
                                  "or choose another --out")


def read_mixture(path: str | os.PathLike) -> tuple[list[str], list[float]]:
    """``mixture.json`` (or its directory) -> (dataset dirs, weights), the ``dirs`` and ``weights``
    of ``ClipDataModule``; paths are resolved against the file's directory."""
    path = Path(path)
    if path.is_dir():
        path = path / MIXTURE_FILE
    if not path.is_file():
        raise ConversionError(f"{path}: mixture file does not exist")
    m = json.loads(path.read_text())
    if m.get("kind") != "whale_pl.mixture" or not m.get("datasets"):
        raise ConversionError(f"{path}: not a whale_pl mixture file (kind {m.get('kind')!r})")
    return ([str(path.parent / d["path"]) for d in m["datasets"]], [float(d["weight"]) for d in m["datasets"]])
