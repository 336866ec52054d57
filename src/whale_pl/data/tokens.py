"""Token shards: every frame of a dataset tokenised once, alone, by the frozen tokenizer, for stages 2 and 3
(layout, resuming and the refusals: docs/contracts.md, "Token shards")."""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from whale_pl.data.frames import frames_to_unit
from whale_pl.data.shards import (MANIFEST, ShardError, _OpenShard, decode_sample, iter_tar_samples, read_manifest,
                                  sha256_file, verify_dataset, write_json_atomic)
from whale_pl.data.workers import map_ordered

PARTS = ".parts"
ENCODING = "per-frame"
WAIT_S = 6 * 3600.0  # how long rank 0 waits for the other ranks' parts
BATCH_FRAMES = 256


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


def read_token_manifest(token_dir: str | Path, source_dir: str | Path | None = None) -> dict:
    """A complete token dataset's verified manifest; with ``source_dir``, refused unless made from that dataset."""
    token_dir = Path(token_dir)
    if not token_dir.is_dir():
        raise TokenError(f"{token_dir}: no token shards; build them (`python -m whale_pl.pipeline tokens --scale S`, "
                         "`make tokens`), or read the frames instead (data section: `tokens: null`)")
    if not (token_dir / MANIFEST).exists() and (token_dir / PARTS).is_dir():
        raise TokenError(f"{token_dir}: token dataset is incomplete (parts but no {MANIFEST}: an interrupted build); "
                         "rerun `python -m whale_pl.pipeline tokens` to finish it")
    m = verify_dataset(token_dir)
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
    """Refuse a datamodule's token shards made with another tokenizer (weight fingerprint) than the stage's."""
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
        ident = {"tokenizer_sha256": sha256_file(tokenizer_ckpt),
                 "source_manifest_sha256": source_identity(source)["manifest_sha256"]}
        return cls(str(source), str(out), str(tokenizer_ckpt), ident)

    def check(self, found: dict, where: str, found_tokenizer: str, found_source: str) -> None:
        """Refuse parts or a manifest whose identity ``found`` differs from this job's, naming both sides."""
        what = {"tokenizer_sha256": "tokenizer checkpoint sha256",
                "source_manifest_sha256": "source dataset manifest sha256"}
        bad = [f"{what[k]}: theirs {found.get(k)} (from {found_tokenizer} / {found_source}) != this {v} (from "
               f"{self.tokenizer_ckpt} / {self.source})" for k, v in self.identity.items() if found.get(k) != v]
        if bad:
            raise TokenError(f"{where} were made with another tokenizer or from another source dataset: "
                             + "; ".join(bad) + ". Rebuild them (`python -m whale_pl.pipeline tokens --scale S "
                             "--force` moves them aside)")


def load_tokenizer(ckpt: str | Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, str, dict]:
    """The frozen tokenizer of a stage-1 checkpoint on ``device``, its weight fingerprint and its data_spec."""
    from whale_pl.lit.handoff import fingerprint, load_frozen
    from whale_pl.lit.tokenizer_module import TokenizerModule

    module = load_frozen(ckpt, TokenizerModule)
    return module.model.to(device), fingerprint(module), dict(module.hparams.get("data_spec") or {})


def _kept_part(job: TokenJob, shard: dict) -> dict | None:
    """The recorded part of ``shard`` when its token shard is still the one recorded, else None."""
    p = Path(job.out) / PARTS / f"{shard['name']}.json"
    if not p.is_file():
        return None
    part, f = json.loads(p.read_text()), Path(job.out) / shard["name"]  # (its identity checked by _check_out_dir)
    if not f.is_file() or f.stat().st_size != part["bytes"] or sha256_file(f) != part["sha256"]:
        return None
    return part


def encode_shard(job: TokenJob, shard: dict, source_manifest: dict, tok: torch.nn.Module,
                 device: torch.device | str) -> dict:
    """Tokenise one source shard into its token shard (atomically), then record the part; returns the part."""
    src, out = Path(job.source), Path(job.out)
    writer = _OpenShard(out / shard["name"], shard["split"])
    try:
        for s in iter_tar_samples(src / shard["name"]):
            ep = decode_sample(s, source_manifest)  # the source sample is checked before anything is copied
            frames = torch.from_numpy(np.ascontiguousarray(ep.frames)).permute(0, 3, 1, 2)
            ids = [encode_frames(tok, frames[i : i + BATCH_FRAMES, None].to(device))[:, 0].cpu()
                   for i in range(0, len(frames), BATCH_FRAMES)]  # [T, h, w]: BATCH_FRAMES frames at a time
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(torch.cat(ids).numpy().astype(ids_dtype(tok.codebook_size))))
            writer.add({"__key__": s["__key__"], "ids.npy": buf.getvalue(), "steps.npz": bytes(s["steps.npz"]),
                        "meta.json": bytes(s["meta.json"])}, len(ep))
        rec = writer.close()  # its keys are checked against the source's by token_manifest
    except BaseException:
        writer.abort()
        raise
    part = {**rec, "identity": job.identity, "tokenizer": job.tokenizer_ckpt, "source": job.source}
    write_json_atomic(out / PARTS / f"{shard['name']}.json", part)
    return part


def encode_shards(job: TokenJob, names: list[str], device: str) -> dict[str, dict]:
    """Tokenise the shards ``names`` of the job that have no kept part; returns the part of each, by name."""
    source_manifest = read_manifest(job.source)
    mine = [sh for sh in source_manifest["shards"] if sh["name"] in set(names)]
    parts = {sh["name"]: p for sh in mine if (p := _kept_part(job, sh)) is not None}
    todo = [sh for sh in mine if sh["name"] not in parts]
    if todo:
        tok, _, _ = load_tokenizer(job.tokenizer_ckpt, device)
        for sh in todo:
            parts[sh["name"]] = encode_shard(job, sh, source_manifest, tok, device)
    return parts


def _check_out_dir(job: TokenJob) -> dict | None:
    """The manifest of this job's complete dataset at ``out``; None for nothing or this job's parts; else TokenError."""
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
        part = json.loads(p.read_text())
        job.check(part.get("identity", {}), f"token shard part {p}", part.get("tokenizer", "?"),
                  part.get("source", "?"))
    return None


def _wait_for_parts(job: TokenJob, shards: list[dict], parts: dict[str, dict]) -> list[dict]:
    """Every shard's kept part in shard order: ``parts`` (this rank's, by name), the others' once written."""
    t0, parts = time.time(), dict(parts)
    while True:
        for sh in shards:
            if sh["name"] not in parts and (part := _kept_part(job, sh)) is not None:
                parts[sh["name"]] = part
        missing = [sh["name"] for sh in shards if sh["name"] not in parts]
        if not missing:
            return [parts[sh["name"]] for sh in shards]
        if time.time() - t0 > WAIT_S:
            raise TokenError(f"{job.out}: after {WAIT_S:.0f}s still no token shard for {missing[:5]} "
                             f"({len(missing)} of {len(shards)}); did another rank fail? Rerun to resume")
        time.sleep(2.0)


def token_manifest(job: TokenJob, source_manifest: dict, parts: list[dict]) -> dict:
    """The token dataset's manifest: the source's, with the token shards and the ``tokens`` section."""
    shards = [{k: p[k] for k in ("name", "split", "episodes", "frames", "bytes", "sha256", "keys")} for p in parts]
    for sh, src in zip(shards, source_manifest["shards"]):
        if (sh["name"], sh["keys"], sh["frames"]) != (src["name"], src["keys"], src["frames"]):
            raise TokenError(f"{job.out}: token shard {sh['name']} does not mirror source shard {src['name']}")
    tok, fingerprint_, spec = load_tokenizer(job.tokenizer_ckpt)
    return {**source_manifest, "frame_encoding": "token-ids", "shards": shards,
            "tokens": {"encoding": ENCODING, "identity": job.identity,
                       "tokenizer": {"checkpoint": job.tokenizer_ckpt, "sha256": job.identity["tokenizer_sha256"],
                                     "fingerprint": fingerprint_, "data_spec": spec},
                       "grid": list(tok.grid_hw()), "codebook_size": int(tok.codebook_size),
                       "dtype": ids_dtype(int(tok.codebook_size)).name,
                       "source": {"dir": job.source, "manifest_sha256": job.identity["source_manifest_sha256"]}}}


def build_tokens(source: str | Path, out: str | Path, tokenizer_ckpt: str | Path, workers: int = 1) -> dict | None:
    """Tokenise this rank's share (``RANK`` / ``WORLD_SIZE``) of ``source`` into ``out`` over ``workers`` processes;
    rank 0 returns the verified manifest once every part is there, the other ranks None."""
    r, w = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    job = TokenJob.make(source, out, tokenizer_ckpt)
    done = _check_out_dir(job)
    if done is not None:
        return done
    (Path(out) / PARTS).mkdir(parents=True, exist_ok=True)
    source_manifest = read_manifest(source)
    names = [sh["name"] for sh in source_manifest["shards"]]
    workers = max(1, int(workers))
    assignment = [names[s::w * workers] for s in range(r * workers, (r + 1) * workers)]
    device = "cpu"
    if torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
    if workers == 1:
        mine = encode_shards(job, assignment[0], device)
    else:  # one torch thread per spawned worker, which exits with this process
        mine = {k: p for ps in map_ordered(partial(encode_shards, job, device=device), assignment, workers,
                                           initializer=partial(torch.set_num_threads, 1)) for k, p in ps.items()}
    if r != 0:
        return None
    m = token_manifest(job, source_manifest, _wait_for_parts(job, source_manifest["shards"], mine))
    write_json_atomic(Path(out) / MANIFEST, m)
    for stale in Path(out).glob(".shard-*.tar.tmp-*"):  # left by an interrupted run; every writer has finished
        stale.unlink()
    return m
