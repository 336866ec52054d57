"""Atomic writes: the target holds the old content or the whole new one, and no temporary file is left."""

from __future__ import annotations

import json
import math

import pytest

from whale_pl.io import atomic_path, write_json_atomic, write_text_atomic


def test_json_written_whole_and_nothing_left_beside_it(tmp_path):
    path = write_json_atomic(tmp_path / "sub" / "res.json", {"a": [1, 2.5], "b": None})
    assert json.loads(path.read_text()) == {"a": [1, 2.5], "b": None} and path.read_text().endswith("}\n")
    assert [p.name for p in path.parent.iterdir()] == ["res.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = write_text_atomic(tmp_path / "report.md", "old\n")
    with pytest.raises(ValueError, match="Out of range float"):
        write_json_atomic(tmp_path / "report.md", {"x": math.nan})  # NaN is not JSON: refused, not written
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_path(path) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("crash")
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_temporary_names_keep_the_suffix_for_libraries_that_infer_the_format(tmp_path):
    with atomic_path(tmp_path / "plot.png") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".plot.png.") and tmp.name.endswith(".tmp.png")
        tmp.write_bytes(b"png")
    assert (tmp_path / "plot.png").read_bytes() == b"png"
