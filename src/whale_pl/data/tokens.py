"""Token shards: every frame of a dataset tokenised once by the frozen tokenizer, for stages 2 and 3.

A token dataset mirrors a frame dataset (``shards.py``) shard for shard (names, keys, splits); a sample holds
``<key>.ids.npy`` (``[T, h, w]``, uint8 up to 256 codes, else uint16) and the source sample's ``steps.npz`` and
``meta.json`` bytes. Its ``manifest.json``, written last, is the source's with the token shards and a ``tokens``
section naming the tokenizer and the source (docs/contracts.md). Each frame is encoded alone, as a one-frame
clip: the causal encoder would otherwise make its ids depend on where its clip starts.

``build_tokens`` splits the shards over ``RANK`` / ``WORLD_SIZE`` times ``workers`` processes; each token shard is
written atomically and recorded in ``.parts/<shard>.json``; rank 0 writes the manifest once every part exists. A
rerun keeps the parts still matching their record; parts or a manifest of another tokenizer file or source
dataset are refused, naming both.
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from whale_pl.data.episode import STEP_FIELDS, load_npz
from whale_pl.data.frames import frames_to_unit
from whale_pl.data.shards import (MANIFEST, ShardError, _OpenShard, decode_sample, iter_shard_episodes,
                                  iter_tar_samples, read_manifest, sha256_file, verify_dataset, write_json_atomic)

TOKEN_EXTS = ("ids.npy", "steps.npz", "meta.json")
PARTS = ".parts"
ENCODING = "per-frame"


class TokenError(ShardError):
    """A token dataset that is incomplete, damaged, or made with another tokenizer or from other data."""


def ids_dtype(codebook_size: int) -> np.dtype:
    """The smallest unsigned integer dtype that holds ids ``0 .. codebook_size - 1``."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if codebook_size <= int(np.iinfo(dt).max) + 1:
            return np.dtype(dt)
    raise ValueError(f"codebook of {codebook_size} codes does not fit 32-bit ids")


@torch.no_grad()
def encode_frames(tok: torch.nn.Module, frames_BTCHW: torch.Tensor) -> torch.Tensor:
    """Token ids ``[B, T, h, w]`` (long) of uint8 frames ``[B, T, 3, H, W]``, each frame encoded alone."""
    B, T = frames_BTCHW.shape[:2]
    ids_N1hw = tok.encode(frames_to_unit(frames_BTCHW.flatten(0, 1).unsqueeze(1)))
    return ids_N1hw[:, 0].unflatten(0, (B, T))


@torch.no_grad()
def encode_episode(tok: torch.nn.Module, frames_THWC: np.ndarray, device: torch.device | str,
                   batch_frames: int = 256) -> np.ndarray:
    """Token ids ``[T, h, w]`` of one episode's uint8 frames ``[T, H, W, 3]``, ``batch_frames`` at a time,
    in the smallest dtype that holds the codebook."""
    frames = torch.from_numpy(np.ascontiguousarray(frames_THWC)).permute(0, 3, 1, 2)
    ids = [encode_frames(tok, frames[i : i + batch_frames, None].to(device))[:, 0].cpu()
           for i in range(0, len(frames), batch_frames)]
    return torch.cat(ids).numpy().astype(ids_dtype(tok.codebook_size))


@dataclass
class TokenEpisode:
    """One episode of a token dataset: its frames' token ids and the source episode's other arrays."""

    ids: np.ndarray  # [T, h, w] unsigned integers
    actions: np.ndarray
    rewards: np.ndarray
    success: np.ndarray
    is_first: np.ndarray
    is_last: np.ndarray
    is_terminal: np.ndarray
    state: np.ndarray | None = None
    language: str = ""
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def decode_token_sample(sample: dict[str, Any], manifest: dict | None = None) -> TokenEpisode:
    """Sample -> TokenEpisode, its ids checked against the manifest's grid; ShardError naming key and field."""
    key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
    missing = [e for e in TOKEN_EXTS if e not in sample]
    if missing:
        raise ShardError(f"{url} key {key}: token sample lacks {missing} (a frame dataset given as tokens?)",
                         shard=url, key=key)
    try:
        ids = np.load(io.BytesIO(sample["ids.npy"]), allow_pickle=False)
        steps = load_npz(sample["steps.npz"])
        meta = json.loads(bytes(sample["meta.json"]).decode("utf-8"))
    except Exception as e:  # noqa: BLE001 - any decode failure is a corrupt member
        raise ShardError(f"{url} key {key}: token sample cannot be decoded: {e}", shard=url, key=key) from e
    grid = tuple((manifest or {}).get("tokens", {}).get("grid") or ids.shape[1:])
    T = ids.shape[0] if ids.ndim == 3 else -1
    if ids.ndim != 3 or ids.dtype.kind != "u" or tuple(ids.shape[1:]) != grid:
        raise ShardError(f"{url} key {key}: field 'ids' must be unsigned [T, {grid[0]}, {grid[1]}], got {ids.dtype} "
                         f"{ids.shape}", shard=url, key=key, field="ids")
    bad = [n for n in STEP_FIELDS if n not in steps or len(steps[n]) != T]
    if bad:
        raise ShardError(f"{url} key {key}: steps {bad} missing or not of the ids' length {T}", shard=url, key=key,
                         field=bad[0])
    language = meta.pop("language", "")
    return TokenEpisode(ids=ids, state=steps.get("state"), language=language, meta=meta,
                        **{n: steps[n] for n in STEP_FIELDS})


def iter_token_episodes(data_dir: str | Path, shard: dict, manifest: dict, on_error: str = "raise",
                        keys: set[str] | None = None) -> Iterator[tuple[str, TokenEpisode]]:
    """The episodes of one token shard (optionally only ``keys``), counts checked against the manifest."""
    return iter_shard_episodes(data_dir, shard, manifest, on_error=on_error, keys=keys, decode=decode_token_sample)


def read_token_manifest(token_dir: str | Path, source_dir: str | Path | None = None, checksums: bool = True) -> dict:
    """A complete token dataset's manifest, verified (sizes, sha256, counts); with ``source_dir`` it must
    have been made from that very dataset (its manifest's sha256), else TokenError naming both."""
    token_dir = Path(token_dir)
    if not token_dir.is_dir():
        raise TokenError(f"{token_dir}: no token shards; build them (`python -m whale_pl.pipeline tokens --scale S`, "
                         "`make tokens`), or read the frames instead (data section: `tokens: null`)")
    if not (token_dir / MANIFEST).exists() and (token_dir / PARTS).is_dir():
        raise TokenError(f"{token_dir}: token dataset is incomplete (parts but no {MANIFEST}: an interrupted build); "
                         "rerun `python -m whale_pl.pipeline tokens` to finish it")
    m = verify_dataset(token_dir, checksums=checksums)
    if "tokens" not in m:
        raise TokenError(f"{token_dir}: {MANIFEST} has no 'tokens' section: a frame dataset, not token shards")
    if source_dir is not None:
        theirs, this = m["tokens"]["source"], source_identity(source_dir)
        if theirs["manifest_sha256"] != this["manifest_sha256"]:
            raise TokenError(f"token shards {token_dir} were made from another source dataset: its manifest sha256 "
                             f"{theirs['manifest_sha256']} (at {theirs['dir']}) != {this['manifest_sha256']} (at "
                             f"{this['dir']}); rebuild them (`python -m whale_pl.pipeline tokens --scale S --force`)")
    return m


def check_token_tokenizer(datamodule: Any, fingerprint_: str | None, where: str) -> None:
    """Refuse a datamodule's token shards made with another tokenizer than the stage's (weight fingerprints
    compared, as the stage records them), naming both; a datamodule reading frames passes."""
    for info in getattr(datamodule, "token_info", None) or []:
        theirs = info["tokenizer"]
        if theirs["fingerprint"] != fingerprint_:
            raise TokenError(f"{where}: token shards {info['dir']} were made with another tokenizer: "
                             f"{theirs['checkpoint']} (weights sha256 {theirs['fingerprint'][:16]}...) != this stage's "
                             f"({str(fingerprint_)[:16]}...); rebuild them with this tokenizer "
                             "(`python -m whale_pl.pipeline tokens --scale S --force`)")


def source_identity(source_dir: str | Path) -> dict:
    """The source dataset's directory and the sha256 of its manifest (which lists every shard's sha256)."""
    p = Path(source_dir) / MANIFEST
    if not p.is_file():
        raise TokenError(f"{source_dir}: source dataset has no {MANIFEST} (collect or convert it first)")
    return {"dir": str(source_dir), "manifest_sha256": sha256_file(p)}


@dataclass
class TokenJob:
    """What one token dataset is made of: a source dataset, a tokenizer checkpoint, the output folder."""

    source: str
    out: str
    tokenizer_ckpt: str
    identity: dict = field(default_factory=dict)

    @classmethod
    def make(cls, source: str | Path, out: str | Path, tokenizer_ckpt: str | Path) -> "TokenJob":
        """The job, with the identity (tokenizer file sha256, source manifest sha256) its parts carry."""
        if not Path(tokenizer_ckpt).is_file():
            raise TokenError(f"tokenizer checkpoint {tokenizer_ckpt} does not exist (train stage 1 first)")
        ident = {"tokenizer_sha256": sha256_file(tokenizer_ckpt),
                 "source_manifest_sha256": source_identity(source)["manifest_sha256"]}
        return cls(str(source), str(out), str(tokenizer_ckpt), ident)

    def check(self, found: dict, where: str, found_tokenizer: str, found_source: str) -> None:
        """Refuse parts or a manifest of another tokenizer or source (``found``: their identity, made from
        ``found_tokenizer`` and ``found_source``), naming both values of each that differs."""
        what = {"tokenizer_sha256": "tokenizer checkpoint sha256", "source_manifest_sha256": "source dataset manifest sha256"}
        bad = [f"{what[k]}: theirs {found.get(k)} (from {found_tokenizer} / {found_source}) != this {v} (from "
               f"{self.tokenizer_ckpt} / {self.source})" for k, v in self.identity.items() if found.get(k) != v]
        if bad:
            raise TokenError(f"{where} were made with another tokenizer or from another source dataset: "
                             + "; ".join(bad) + ". Rebuild them (`python -m whale_pl.pipeline tokens --scale S "
                             "--force` moves them aside)")


def load_tokenizer(ckpt: str | Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, str, dict]:
    """The frozen tokenizer of a stage-1 checkpoint on ``device``, its weight fingerprint (as the later stages
    record it) and its data_spec."""
    from whale_pl.lit.handoff import fingerprint, load_frozen
    from whale_pl.lit.tokenizer_module import TokenizerModule

    module = load_frozen(ckpt, TokenizerModule)
    return module.model.to(device), fingerprint(module), dict(module.hparams.get("data_spec") or {})


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _part_path(out: Path, shard: str) -> Path:
    return out / PARTS / f"{shard}.json"


def _checked_part(job: TokenJob, p: Path) -> dict:
    """The part recorded at ``p``, refused when made with another tokenizer or from another source."""
    part = json.loads(p.read_text())
    job.check(part.get("identity", {}), f"token shard part {p}", part.get("tokenizer", "?"), part.get("source", "?"))
    return part


def _kept_part(job: TokenJob, shard: dict) -> dict | None:
    """The recorded part of ``shard`` when its token shard is still the one recorded, else None."""
    p = _part_path(Path(job.out), shard["name"])
    if not p.is_file():
        return None
    part, f = _checked_part(job, p), Path(job.out) / shard["name"]
    if not f.is_file() or f.stat().st_size != part["bytes"] or sha256_file(f) != part["sha256"]:
        return None
    return part


def encode_shard(job: TokenJob, shard: dict, source_manifest: dict, tok: torch.nn.Module,
                 device: torch.device | str, batch_frames: int = 256) -> dict:
    """Tokenise one source shard into its token shard (atomically), then record the part; returns the part."""
    src, out = Path(job.source), Path(job.out)
    writer = _OpenShard(out / shard["name"], shard["split"])
    try:
        for s in iter_tar_samples(src / shard["name"]):
            ep = decode_sample(s, source_manifest)  # the source sample is checked before anything is copied
            sample = {"__key__": s["__key__"], "ids.npy": _npy_bytes(encode_episode(tok, ep.frames, device, batch_frames)),
                      "steps.npz": bytes(s["steps.npz"]), "meta.json": bytes(s["meta.json"])}
            writer.add(sample, len(ep), TOKEN_EXTS)
        if writer.keys != shard["keys"]:
            raise TokenError(f"{src / shard['name']}: keys {writer.keys[:5]}... differ from its manifest's "
                             f"{shard['keys'][:5]}...", shard=shard["name"])
        rec = writer.close()
    except BaseException:
        writer.abort()
        raise
    part = {**rec, "identity": job.identity, "tokenizer": job.tokenizer_ckpt, "source": job.source}
    write_json_atomic(_part_path(out, shard["name"]), part)
    return part


def encode_shards(job: TokenJob, names: list[str], device: str, batch_frames: int = 256,
                  threads: int | None = None, parent_pid: int | None = None) -> int:
    """Tokenise the shards ``names`` of the job that have no kept part; returns how many were encoded.
    (The body of a worker process: ``threads`` torch threads, exits with ``parent_pid``.)"""
    if parent_pid is not None:
        from whale_pl.data.workers import exit_with_parent

        exit_with_parent(parent_pid)
    if threads:
        torch.set_num_threads(threads)
    source_manifest = read_manifest(job.source)
    todo = [sh for sh in source_manifest["shards"] if sh["name"] in set(names) and _kept_part(job, sh) is None]
    if todo:
        tok, _, _ = load_tokenizer(job.tokenizer_ckpt, device)
        for sh in todo:
            encode_shard(job, sh, source_manifest, tok, device, batch_frames)
    return len(todo)


def _check_out_dir(job: TokenJob) -> dict | None:
    """The verified manifest when ``out`` already holds this job's complete token dataset; None when it holds
    nothing or this job's parts; TokenError for another job's dataset, a damaged one or foreign files."""
    out = Path(job.out)
    if not out.exists():
        return None
    foreign = sorted(p.name for p in out.iterdir() if not (p.name in (MANIFEST, PARTS) or p.name.startswith(
        ("shard-", ".shard-", f".{MANIFEST}.tmp"))))
    if foreign:
        raise TokenError(f"{out}: holds files that are not token shards ({foreign[:5]}); choose another folder")
    if (out / MANIFEST).exists():
        m = json.loads((out / MANIFEST).read_text())
        tk = m.get("tokens") or {}
        job.check(tk.get("identity", {}), f"token shards {out}", tk.get("tokenizer", {}).get("checkpoint", "?"),
                  tk.get("source", {}).get("dir", "?"))
        try:
            return read_token_manifest(out)
        except ShardError as e:
            raise TokenError(f"{out}: complete token dataset is damaged ({e}); rebuild it with --force") from e
    for p in sorted((out / PARTS).glob("*.json")):
        _checked_part(job, p)
    return None


def _wait_for_parts(job: TokenJob, shards: list[dict], timeout_s: float, poll_s: float = 2.0) -> list[dict]:
    """Every shard's kept part (other ranks may still be writing theirs), in shard order."""
    t0, parts = time.time(), {}
    while True:
        for sh in shards:
            if sh["name"] not in parts and (part := _kept_part(job, sh)) is not None:
                parts[sh["name"]] = part
        missing = [sh["name"] for sh in shards if sh["name"] not in parts]
        if not missing:
            return [parts[sh["name"]] for sh in shards]
        if time.time() - t0 > timeout_s:
            raise TokenError(f"{job.out}: after {timeout_s:.0f}s still no token shard for {missing[:5]} "
                             f"({len(missing)} of {len(shards)}); did another rank fail? Rerun to resume")
        time.sleep(poll_s)


def token_manifest(job: TokenJob, source_manifest: dict, parts: list[dict], tok_info: dict) -> dict:
    """The token dataset's manifest: the source's, with the token shards and the ``tokens`` section."""
    shards = [{k: p[k] for k in ("name", "split", "episodes", "frames", "bytes", "sha256", "keys")} for p in parts]
    for sh, src in zip(shards, source_manifest["shards"]):
        if (sh["name"], sh["keys"], sh["frames"]) != (src["name"], src["keys"], src["frames"]):
            raise TokenError(f"{job.out}: token shard {sh['name']} does not mirror source shard {src['name']}")
    return {**source_manifest, "frame_encoding": "token-ids", "shards": shards,
            "tokens": {"encoding": ENCODING, "identity": job.identity, **tok_info,
                       "source": {"dir": job.source, "manifest_sha256": job.identity["source_manifest_sha256"]}}}


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    r = int(os.environ.get("RANK", 0)) if rank is None else int(rank)
    w = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else int(world_size)
    if not 0 <= r < w:
        raise ValueError(f"rank {r} not in [0, world_size={w})")
    return r, w


def _default_device() -> str:
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
    return "cpu"


def _run_workers(job: TokenJob, assignment: list[list[str]], device: str, batch_frames: int) -> None:
    """Each list of shard names in its own spawned process (one torch thread each); raise if one fails."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=encode_shards, args=(job, names, device, batch_frames, 1, os.getpid()),
                         name=f"whale-tokens-{i}") for i, names in enumerate(assignment)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    failed = [p.name for p in procs if p.exitcode != 0]
    if failed:
        raise TokenError(f"{job.out}: token worker(s) {failed} failed (see their errors above); rerun to resume")


def build_tokens(source: str | Path, out: str | Path, tokenizer_ckpt: str | Path, workers: int = 1,
                 rank: int | None = None, world_size: int | None = None, device: str | None = None,
                 batch_frames: int = 256, wait_timeout_s: float = 6 * 3600.0) -> dict | None:
    """Tokenise the dataset at ``source`` with the tokenizer checkpoint into ``out`` (module docstring).
    Returns the verified manifest on rank 0 (None on the other ranks); a complete dataset of this job is
    returned as it is."""
    r, w = _rank_world(rank, world_size)
    job = TokenJob.make(source, out, tokenizer_ckpt)
    done = _check_out_dir(job)
    if done is not None:
        return done
    (Path(out) / PARTS).mkdir(parents=True, exist_ok=True)
    source_manifest = read_manifest(source)
    names = [sh["name"] for sh in source_manifest["shards"]]
    slots = w * max(1, int(workers))
    assignment = [names[s::slots] for s in range(r * max(1, int(workers)), (r + 1) * max(1, int(workers)))]
    device = device or _default_device()
    if len(assignment) == 1:
        encode_shards(job, assignment[0], device, batch_frames)
    else:
        _run_workers(job, assignment, device, batch_frames)
    if r != 0:
        return None
    parts = _wait_for_parts(job, source_manifest["shards"], wait_timeout_s)
    tok_info = _tokenizer_info(job, *load_tokenizer(tokenizer_ckpt))
    write_json_atomic(Path(out) / MANIFEST, token_manifest(job, source_manifest, parts, tok_info))
    for stale in Path(out).glob(".shard-*.tar.tmp-*"):  # left by an interrupted run; every writer has finished
        stale.unlink()
    return read_token_manifest(out, source)


def _tokenizer_info(job: TokenJob, tok: torch.nn.Module, fingerprint_: str, spec: dict) -> dict:
    """The manifest's account of the tokenizer: checkpoint, file sha256, weight fingerprint, data_spec, grid."""
    return {"tokenizer": {"checkpoint": job.tokenizer_ckpt, "sha256": job.identity["tokenizer_sha256"],
                          "fingerprint": fingerprint_, "data_spec": spec},
            "grid": list(tok.grid_hw()), "codebook_size": int(tok.codebook_size),
            "dtype": ids_dtype(int(tok.codebook_size)).name}
