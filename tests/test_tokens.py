"""Token shards (``data/tokens.py``): the same ids as tokenising on the fly, for every clip start and
stride; refused for another tokenizer or another source dataset, naming both; never taken as complete
when half-written; a rerun resumes; shards split over ranks; and the pipeline's
``tokens -> behavior -> dynamics`` on the tiny dataset."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml

from whale_pl.data import tokens as tk
from whale_pl.data.shards import MANIFEST, ShardError, decode_sample, read_manifest

ROOT = Path(__file__).resolve().parents[1]
TINY_TOKENIZER = dict(frame_size=[32, 32], patch_size=8, dim=32, enc_depth=1, dec_depth=1, heads=2,
                      codebook_size=32, code_dim=8)
CLOCK = dict(frame_stride=2, retrace_strides=[2, 3], retrace_prob=0.5, retrace_clip_len=3)


def _fit_tokenizer(data_yaml: Path, out: Path, seed: int) -> Path:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from whale_pl.data.datamodule import MetaWorldDataModule
    from whale_pl.lit.tokenizer_module import TokenizerModule

    torch.manual_seed(seed)
    dm = MetaWorldDataModule(config=str(data_yaml), clip_len=4, batch_size=2, num_workers=0, steps_per_epoch=3,
                             val_steps=1)
    L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
              num_sanity_val_steps=0, limit_val_batches=0,
              callbacks=[ModelCheckpoint(dirpath=out, filename="best")]).fit(
        TokenizerModule(net=TINY_TOKENIZER, optim=dict(warmup_steps=1)), dm)
    return out / "best.ckpt"


@pytest.fixture(scope="module")
def tokenizers(tiny_data_yaml, tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny stage-1 checkpoints (different seeds), a few steps each."""
    out = tmp_path_factory.mktemp("tokenizers")
    return _fit_tokenizer(tiny_data_yaml, out / "a", 0), _fit_tokenizer(tiny_data_yaml, out / "b", 1)


@pytest.fixture(scope="module")
def built(tokenizers, tiny_shards, tmp_path_factory) -> Path:
    """The tiny dataset's token shards made with the first tokenizer; the folder holding them."""
    root = tmp_path_factory.mktemp("tokens")
    tk.build_tokens(tiny_shards, root / tiny_shards.name, tokenizers[0])
    return root


def _dm(data_yaml: Path, tokens: Path | None = None, **kw):
    from whale_pl.data.datamodule import MetaWorldDataModule

    args = dict(clip_len=4, batch_size=4, num_workers=0, steps_per_epoch=12, val_steps=2, seed=3, **CLOCK)
    return MetaWorldDataModule(config=str(data_yaml), tokens=None if tokens is None else str(tokens), **{**args, **kw})


def _shas(d: Path) -> dict[str, str]:
    return {s["name"]: s["sha256"] for s in read_manifest(d)["shards"]}


def test_token_shards_give_the_ids_of_tokenising_each_frame_on_the_fly(built, tokenizers, tiny_data_yaml, tiny_shards):
    """The same seed cuts the same clips from frames and from tokens (composed actions, strides, everything but
    the pixels equal), and the stored ids are the tokenizer's ids of each frame alone, whatever the clip."""
    tok, _, _ = tk.load_tokenizer(tokenizers[0])
    m, src = read_manifest(built / tiny_shards.name), read_manifest(tiny_shards)
    assert [(s["name"], s["split"], s["keys"]) for s in m["shards"]] == [(s["name"], s["split"], s["keys"])
                                                                        for s in src["shards"]]
    assert m["tokens"]["dtype"] == "uint8" and m["tokens"]["grid"] == [4, 4] and m["tokens"]["encoding"] == "per-frame"
    frames_dm, tokens_dm = _dm(tiny_data_yaml), _dm(tiny_data_yaml, built)
    assert frames_dm.data_spec == tokens_dm.data_spec
    strides = set()
    for loader in ("train_dataloader", "val_dataloader"):
        for fb, tb in zip(getattr(frames_dm, loader)(), getattr(tokens_dm, loader)()):
            assert set(fb) - {"frames"} == set(tb) - {"ids"}
            for k in set(fb) - {"frames"}:
                assert torch.equal(fb[k], tb[k]), k
            assert tb["ids"].dtype == torch.int64
            assert torch.equal(tb["ids"], tk.encode_frames(tok, fb["frames"]))
            strides |= set(tb["stride"].tolist())
    assert strides == {1, 2, 3}
    # clip encoding would not do: the causal encoder gives a frame other ids after other frames
    frames = torch.from_numpy(next(frames_dm.iter_episodes("train")).frames[:8]).permute(0, 3, 1, 2)[None]
    alone, in_clip = tk.encode_frames(tok, frames), tok.encode(frames.float() / 127.5 - 1)
    assert torch.equal(alone[:, 0], in_clip[:, 0])  # the first frame of a clip is encoded alone
    assert torch.equal(tk.encode_frames(tok, frames[:, 3:]), alone[:, 3:])  # per frame: no dependence on the start


def test_another_tokenizer_or_source_dataset_is_refused_naming_both(built, tokenizers, tiny_shards, tiny_data_yaml,
                                                                    tmp_path):
    first, second = (tk.sha256_file(t) for t in tokenizers)
    out = built / tiny_shards.name
    with pytest.raises(tk.TokenError, match=rf"tokenizer checkpoint sha256: theirs {first} .* != this {second}"):
        tk.build_tokens(tiny_shards, out, tokenizers[1])
    # another source: the same episodes, a manifest that says otherwise
    other = tmp_path / tiny_shards.name
    shutil.copytree(tiny_shards, other)
    m = json.loads((other / MANIFEST).read_text())
    m["extra"] = {"note": "another collection"}
    (other / MANIFEST).write_text(json.dumps(m))
    theirs, this = tk.sha256_file(tiny_shards / MANIFEST), tk.sha256_file(other / MANIFEST)
    with pytest.raises(tk.TokenError, match=rf"another source dataset: its manifest sha256 {theirs} \(at .*\) != {this}"):
        tk.read_token_manifest(out, source_dir=other)
    data_yaml = tmp_path / "data.yaml"
    data_yaml.write_text(yaml.safe_dump(dict(yaml.safe_load(tiny_data_yaml.read_text()), out=str(other))))
    with pytest.raises(tk.TokenError, match=rf"{theirs} .* != {this}"):
        _dm(data_yaml, built).setup()
    with pytest.raises(tk.TokenError, match=r"source dataset manifest sha256: theirs .* != this"):
        tk.build_tokens(other, out, tokenizers[0])
    # a frame dataset named as tokens is refused too
    with pytest.raises(tk.TokenError, match="no 'tokens' section"):
        tk.read_token_manifest(tiny_shards)


def test_half_written_tokens_are_never_complete_and_a_rerun_resumes(built, tokenizers, tiny_shards, tiny_data_yaml,
                                                                     tmp_path, monkeypatch):
    """A crash between writing the third shard and recording it leaves parts and no manifest: readers refuse
    the folder; the rerun keeps the two recorded shards, redoes the rest and ends byte-identical to a clean build."""
    root = tmp_path / "tokens"
    out = root / tiny_shards.name
    real_write, encoded = tk.write_json_atomic, []

    def crash_on_third_part(path, obj):
        if path.parent.name == tk.PARTS and len(list(path.parent.glob("*.json"))) == 2:
            raise KeyboardInterrupt("killed")
        real_write(path, obj)

    monkeypatch.setattr(tk, "write_json_atomic", crash_on_third_part)
    with pytest.raises(KeyboardInterrupt):
        tk.build_tokens(tiny_shards, out, tokenizers[0])
    monkeypatch.setattr(tk, "write_json_atomic", real_write)
    assert not (out / MANIFEST).exists() and len(list((out / tk.PARTS).glob("*.json"))) == 2
    assert (out / "shard-000002.tar").exists()  # written, not recorded: not trusted
    with pytest.raises(tk.TokenError, match="incomplete"):
        _dm(tiny_data_yaml, root).setup()
    real_encode = tk.encode_shard
    monkeypatch.setattr(tk, "encode_shard", lambda job, sh, *a, **k: encoded.append(sh["name"]) or real_encode(job, sh, *a, **k))
    m = tk.build_tokens(tiny_shards, out, tokenizers[0])
    names = [s["name"] for s in read_manifest(tiny_shards)["shards"]]
    assert encoded == names[2:]
    assert m["episodes"] == read_manifest(tiny_shards)["episodes"]
    assert _shas(out) == _shas(built / tiny_shards.name)
    assert tk.build_tokens(tiny_shards, out, tokenizers[0]) == m and encoded == names[2:]  # complete: reused
    # a recorded shard that changed afterwards is redone, not trusted
    (out / MANIFEST).unlink()
    with open(out / names[0], "r+b") as f:
        f.seek(700)
        f.write(b"\xff")
    tk.build_tokens(tiny_shards, out, tokenizers[0])
    assert encoded[len(names) - 2 :] == [names[0]] and _shas(out) == _shas(built / tiny_shards.name)


def test_ranks_split_the_shards_and_rank_zero_writes_the_manifest(built, tokenizers, tiny_shards, tmp_path,
                                                                   monkeypatch):
    out = tmp_path / tiny_shards.name
    names = [s["name"] for s in read_manifest(tiny_shards)["shards"]]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert tk.build_tokens(tiny_shards, out, tokenizers[0]) is None
    assert sorted(p.stem for p in (out / tk.PARTS).glob("*.json")) == names[1::2] and not (out / MANIFEST).exists()
    with pytest.raises(ShardError):
        tk.read_token_manifest(out)
    monkeypatch.setenv("RANK", "0")
    m = tk.build_tokens(tiny_shards, out, tokenizers[0])
    assert m is not None and _shas(out) == _shas(built / tiny_shards.name)


def test_two_worker_processes_build_the_same_tokens(built, tokenizers, tiny_shards, tmp_path):
    out = tmp_path / tiny_shards.name
    tk.build_tokens(tiny_shards, out, tokenizers[0], workers=2)
    assert _shas(out) == _shas(built / tiny_shards.name)


def test_the_pipeline_builds_tokens_then_behavior_then_dynamics_on_one_clock(tokenizers, tiny_data_yaml, tmp_path,
                                                                             monkeypatch):
    """``python -m whale_pl.pipeline dynamics`` on a tiny scale (the demo configs at tiny shapes): the token
    shards are built after the tokenizer, handed to both stages, and both stages record the same clock."""
    from whale_pl import pipeline

    scale = tmp_path / "stages" / "tiny"
    scale.mkdir(parents=True)
    shrink = {"behavior": dict(expect_codebook_size=32, probe_t_min=2,
                               net=dict(z_dim=4, dim=16, depth=1, heads=2, decoder_hidden=16)),
              "dynamics": dict(net=dict(dim=32, depth=1, heads=2, max_frames=8),
                               sampling=dict(maskgit_steps=2, rollout_horizon=2, rollout_batches=1))}
    data = dict(config=str(tiny_data_yaml), tokens="runs/tiny/tokens", clip_len=6, val_clip_len=6, frame_stride=2,
                retrace_clip_len=3, batch_size=2, num_workers=0, steps_per_epoch=2, val_steps=1)
    for stage, over in shrink.items():
        cfg = yaml.safe_load((ROOT / "stages" / "demo" / f"{stage}.yaml").read_text())
        args = cfg["model"]["init_args"]
        for k, v in over.items():
            args[k] = {**args.get(k, {}), **v} if isinstance(v, dict) else v
        cfg["data"]["init_args"].update(data)
        cfg["trainer"].update(max_steps=2, enable_progress_bar=False, precision="32-true")
        cfg["trainer"]["logger"]["init_args"]["save_dir"] = "runs/tiny"
        cfg["trainer"]["callbacks"] = [c for c in cfg["trainer"]["callbacks"] if "EvalCallback" not in c["class_path"]]
        (scale / f"{stage}.yaml").write_text(yaml.safe_dump(cfg))
    shutil.copy(ROOT / "stages" / "demo" / "tokenizer.yaml", scale / "tokenizer.yaml")  # done below: not run
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "tiny" / "tokenizer"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(tokenizers[0], run / "checkpoints" / "best.ckpt")
    (run / "DONE").write_text(json.dumps({"checkpoint": str(run / "checkpoints" / "best.ckpt"),
                                          "sha256": pipeline.sha256_of(run / "checkpoints" / "best.ckpt")}))
    pipeline.main(["dynamics", "--scale", "tiny"])
    tokens = tmp_path / "runs" / "tiny" / "tokens" / Path(yaml.safe_load(tiny_data_yaml.read_text())["out"]).name
    assert tk.read_token_manifest(tokens)["tokens"]["tokenizer"]["sha256"] == tk.sha256_file(tokenizers[0])
    specs = {}
    for stage in ("behavior", "dynamics"):
        done = json.loads((tmp_path / "runs" / "tiny" / stage / "DONE").read_text())
        specs[stage] = torch.load(done["checkpoint"], map_location="cpu", weights_only=True)["hyper_parameters"]["data_spec"]
    for k in ("frame_stride", "retrace_strides", "action_mean", "action_std"):
        assert specs["behavior"][k] == specs["dynamics"][k], k
    assert specs["dynamics"]["frame_stride"] == 2 and specs["dynamics"]["retrace_strides"] == [2, 3]


def test_stage_configs_put_stages_two_and_three_on_one_clock():
    """Every scale's behavior and dynamics configs read the same data on the same clock and token shards, and the
    prior is trained on every retracing stride the dynamics model draws (docs/method.md, "The clock")."""
    keys = ("frame_stride", "retrace_strides", "tokens", "config", "dirs")
    for scale in ("demo", "whale_st", "whale_x", "whale_x_finetune"):
        beh, dyn = ({k: v for k, v in yaml.safe_load((ROOT / "stages" / scale / f"{s}.yaml").read_text())["data"][
            "init_args"].items() if k in keys} for s in ("behavior", "dynamics"))
        assert beh == dyn, scale
        b, d = (yaml.safe_load((ROOT / "stages" / scale / f"{s}.yaml").read_text())["data"]["init_args"]
                for s in ("behavior", "dynamics"))
        assert (b.get("retrace_prob", 0) > 0) == (d.get("retrace_prob", 0) > 0), scale
        assert (scale == "whale_x_finetune") == (b.get("tokens") is None), scale


def test_ids_dtype_is_the_smallest_that_holds_the_codebook():
    assert [tk.ids_dtype(n).name for n in (2, 256, 257, 65536, 65537)] == ["uint8", "uint8", "uint16", "uint16", "uint32"]
    buf = io.BytesIO()
    np.save(buf, np.arange(512, dtype=np.uint16).reshape(2, 16, 16))
    sample = {"__key__": "ep0", "__url__": "x", "ids.npy": buf.getvalue(), "meta.json": b"{}",
              "steps.npz": b"not an npz"}
    with pytest.raises(ShardError, match="ep0: member steps.npz cannot be decoded"):
        decode_sample(sample, {"tokens": {"grid": [16, 16]}, "action_dim": 4})
