"""The collector and the converter never delete data they did not write.

A folder is resumed or re-collected only when its ``.whale_collect.json`` marker names the same
writer and config; any other non-empty folder is refused, naming the folder and what it holds, and is
left byte for byte as it was. ``overwrite`` stays the explicit way to replace.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest

from whale_pl.data.cli import main as data_main
from whale_pl.data.metaworld import CollectConfig, dataset_status, ensure_collected
from whale_pl.data.ownership import MARKER, config_hash
from whale_pl.data.oxe.convert import ConversionError, ConvertOptions, convert_dataset, convert_mixture
from whale_pl.data.shards import ShardError, verify_dataset

from test_oxe_fixtures import rt1_dataset  # noqa: E402  (tests/ is on sys.path under pytest)


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _one_episode(out: Path) -> CollectConfig:
    return CollectConfig(tasks=["push-v3"], train_policies=["expert"], episodes_per_policy=1,
                         val_episodes_per_policy=0, max_steps=24, size=32, workers=1, out=str(out))


def test_foreign_manifest_is_refused_by_collector_cli_and_prepare_data(tiny_config, tmp_path, capsys):
    from whale_pl.data.datamodule import MetaWorldDataModule

    out = tmp_path / "theirs"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"name": "another program's index", "files": 3}))
    (out / "shard-000000.tar").write_bytes(b"their bytes")
    before = _snapshot(out)
    cfg = dataclasses.replace(tiny_config, out=str(out))
    assert dataset_status(cfg)[0] == "foreign"
    held = "theirs holds 2 entries (manifest.json, shard-000000.tar) and no whale-data marker"
    with pytest.raises(ShardError, match=re.escape(held) + ".*--overwrite"):
        ensure_collected(cfg, progress=False)
    yaml_path = tmp_path / "data.yaml"
    yaml_path.write_text(json.dumps({**{k: v for k, v in dataclasses.asdict(tiny_config).items()}, "out": str(out)}))
    assert data_main(["metaworld", "--config", str(yaml_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and held in err[0] and str(out) in err[0]
    with pytest.raises(ShardError, match=re.escape(held)):
        MetaWorldDataModule(config=str(yaml_path), num_workers=0).prepare_data()
    assert _snapshot(out) == before


def test_damaged_dataset_is_recollected_only_when_the_marker_says_it_is_ours(tiny_shards, tiny_config, tmp_path):
    # another whale_pl dataset (no collection marker: copied, or collected elsewhere) with one damaged shard
    other = tmp_path / "other"
    shutil.copytree(tiny_shards, other)
    (other / MARKER).unlink()
    shard = other / "shard-000003.tar"
    shard.write_bytes(shard.read_bytes()[:-700])
    before = _snapshot(other)
    cfg = dataclasses.replace(tiny_config, out=str(other))
    status, why = dataset_status(cfg)
    assert status == "foreign" and "and no whale-data marker" in why and "fails verification" in why
    with pytest.raises(ShardError, match="--overwrite"):
        ensure_collected(cfg, progress=False)
    assert _snapshot(other) == before
    # another config's collection (its marker says so) is refused too, naming both hashes
    (other / MARKER).write_text((tiny_shards / MARKER).read_text())
    small = dataclasses.replace(cfg, tasks=["push-v3"])
    have = json.loads((tiny_shards / MARKER).read_text())["config_hash"]
    status, why = dataset_status(small)
    assert status == "different" and f"was written with another config (hash {have} != " \
        f"{config_hash(small.data_json())})" in why
    with pytest.raises(ShardError, match=r"was written with another config \(hash [0-9a-f]{16} != [0-9a-f]{16}\)"):
        ensure_collected(small, progress=False)
    assert (other / "manifest.json").exists() and shard.read_bytes() == before["shard-000003.tar"]


def test_own_interrupted_collection_is_recollected_and_overwrite_replaces(tmp_path):
    out = tmp_path / "mine"
    cfg = _one_episode(out)
    m = ensure_collected(cfg, progress=False)
    assert m["episodes"] == 1 and json.loads((out / MARKER).read_text())["kind"] == "whale-data metaworld"
    # a damaged shard of our own collection of this config: re-collected, same bytes as before
    good = (out / "shard-000000.tar").read_bytes()
    (out / "shard-000000.tar").write_bytes(good[:-100])
    assert dataset_status(cfg)[0] == "incomplete"
    ensure_collected(cfg, progress=False)
    assert (out / "shard-000000.tar").read_bytes() == good
    # a stranger's folder is replaced only with overwrite=True
    (out / MARKER).unlink()
    (out / "manifest.json").write_text("{}")
    with pytest.raises(ShardError, match=r"holds \d+ entries \(.*manifest.json.*\) and no whale-data marker"):
        ensure_collected(cfg, progress=False)
    assert ensure_collected(cfg, overwrite=True, progress=False)["episodes"] == 1
    verify_dataset(out)


def test_oxe_converter_refuses_folders_it_did_not_write(tiny_config, tmp_path):
    src, _ = rt1_dataset(tmp_path / "src", n_files=1, per_file=1)
    opts = ConvertOptions(size=8, workers=1)
    # a folder with a '.parts' subfolder of someone else's: not resumed (its parts were once deleted)
    out = tmp_path / "theirs"
    (out / ".parts" / "train-00000").mkdir(parents=True)
    (out / ".parts" / "train-00000" / "notes.txt").write_text("keep me")
    (out / "shard-000000.tar").write_bytes(b"their shard")
    before = _snapshot(out)
    with pytest.raises(ConversionError, match=r"theirs holds 2 entries \(.parts, shard-000000.tar\) and no "
                                              r"whale-data marker.*--overwrite"):
        convert_dataset(src, out, opts, progress=False)
    assert _snapshot(out) == before
    # another program's manifest
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "manifest.json").write_text('{"tool": "else"}')
    with pytest.raises(ConversionError, match=r"m holds 1 entries \(manifest.json\) and no whale-data marker"):
        convert_dataset(src, tmp_path / "m", opts, progress=False)
    assert (tmp_path / "m" / "manifest.json").read_text() == '{"tool": "else"}'
    # a mixture root whose mixture.json is someone else's
    mix = tmp_path / "mix"
    mix.mkdir()
    (mix / "mixture.json").write_text('{"kind": "their.mixture"}')
    with pytest.raises(ConversionError, match="mixture.json: not written by whale-data oxe"):
        convert_mixture(tmp_path / "src", [("fractal20220817_data", None)], mix, opts, progress=False)
    assert sorted(p.name for p in mix.iterdir()) == ["mixture.json"]
    # overwrite replaces explicitly
    m = convert_dataset(src, out, ConvertOptions(size=8, workers=1, overwrite=True), progress=False)
    assert m["episodes"] == 1 and json.loads((out / MARKER).read_text())["kind"] == "whale-data oxe"
    # and the Meta-World collector will not take the converter's folder
    status, why = dataset_status(dataclasses.replace(tiny_config, out=str(out)))
    assert status == "foreign" and why.startswith(f"{out} was written by 'whale-data oxe', not 'whale-data metaworld'")
