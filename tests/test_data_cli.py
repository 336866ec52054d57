"""whale-data: bad names exit with the valid ones listed; verify; oxe dispatch."""

from __future__ import annotations

import pytest

from whale_pl.data.cli import main


def test_bad_task_and_policy_list_valid_names(capsys, tmp_path):
    assert main(["metaworld", "--tasks", "pushh-v3", "--policies", "expert", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "unknown Meta-World task(s) ['pushh-v3']" in err and "'push-v3'" in err
    assert main(["metaworld", "--tasks", "push-v3", "--policies", "expertt", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "unknown behavior policy 'expertt'" in err and "noise_<sigma>" in err
    assert not (tmp_path / "x").exists()
    assert main(["frobnicate"]) == 2 and "valid: ['metaworld', 'verify', 'oxe']" in capsys.readouterr().err


def test_verify_and_reuse(tiny_shards, tiny_data_yaml, capsys):
    assert main(["verify", str(tiny_shards)]) == 0
    out = capsys.readouterr().out
    assert "OK (22 episodes decoded and checked)" in out and "noise_1.0" in out
    # the config's dataset is complete: nothing is collected, the summary is printed
    assert main(["metaworld", "--config", str(tiny_data_yaml)]) == 0
    assert "22 episodes" in capsys.readouterr().out


def test_oxe_dispatch():
    with pytest.raises(SystemExit) as e:
        main(["oxe", "--help"])
    assert e.value.code == 0
