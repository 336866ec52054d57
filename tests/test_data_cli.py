"""whale-data: bad names exit with the valid ones listed; reuse; oxe dispatch."""

from __future__ import annotations

import pytest

from whale_pl.data.cli import main


def test_unknown_command_lists_valid_ones(capsys):
    assert main(["frobnicate"]) == 2 and "valid: ['metaworld', 'oxe']" in capsys.readouterr().err


def test_reuse_prints_the_summary(tiny_shards, tiny_data_yaml, capsys):
    # the config's dataset is complete: nothing is collected, the summary is printed
    assert main(["metaworld", "--config", str(tiny_data_yaml)]) == 0
    out = capsys.readouterr().out
    assert "22 episodes" in out and "noise_1.0" in out


def test_oxe_dispatch():
    with pytest.raises(SystemExit) as e:
        main(["oxe", "--help"])
    assert e.value.code == 0


@pytest.mark.parametrize("bad, message", [
    ({"episodes_per_policy": 2.5}, "episodes_per_policy must be an integer, got 2.5"),
    ({"tasks": "push-v3"}, "tasks must be a list of names, got the string 'push-v3' (write [push-v3])"),
    ({"camera": "bogus"}, "unknown camera 'bogus'; valid cameras: ['topview', 'corner', 'corner2'"),
    ({"size": 100000}, "size 100000 > 480"),
    ({"tasks": ["pushh-v3"]}, "unknown Meta-World task(s) ['pushh-v3']; valid tasks: ["),
    ({"train_policies": ["expertt"]}, "unknown behavior policy 'expertt'; valid names: expert | noise_<sigma>"),
])
def test_bad_config_values_get_one_line_before_any_work(bad, message, tiny_config, tmp_path, capsys):
    import dataclasses

    import yaml

    out = tmp_path / "never"
    cfg = {**dataclasses.asdict(tiny_config), "out": str(out), **bad}
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["metaworld", "--config", str(tmp_path / "data.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()  # nothing was started
