"""Killing ``whale-data metaworld`` or ``whale-data oxe --workers 2`` leaves no worker running.

Each test starts a real collection/conversion in a subprocess, waits until its workers run, SIGKILLs
the parent (no cleanup code of the parent can run) and checks through /proc that every process the
parent had started is gone within a few seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import rlds_fixtures as rw  # (tests/ is on sys.path under pytest)


pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")


def _table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state letter) of every process."""
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            out[int(d)] = (int(fields[1]), fields[0])
    return out


def _descendants(pid: int) -> set[int]:
    table, found, todo = _table(), set(), [pid]
    while todo:
        p = todo.pop()
        kids = {c for c, (pp, _) in table.items() if pp == p} - found
        found |= kids
        todo.extend(kids)
    return found


def _running(pids: set[int]) -> set[int]:
    table = _table()
    return {p for p in pids if p in table and table[p][1] != "Z"}  # zombies have exited


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _workers(top: int) -> list[int]:
    """The worker processes under ``top``: its descendants but multiprocessing's helper processes."""
    table = _table()
    helpers = (b"resource_tracker", b"forkserver")
    return [p for p in _descendants(top)
            if not (table.get(p, (0, ""))[0] == top and any(h in _cmdline(p) for h in helpers))]


def _kill_parent_after_workers_start(cmd: list[str], n: int, grace_s: float) -> dict[int, bytes]:
    """Run ``cmd``; once ``n`` workers have run for ``grace_s``, SIGKILL it; return what still runs
    (pid -> command line) 10 s later."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ))
    kids: set[int] = set()
    try:
        deadline, seen = time.time() + 180, None
        while time.time() < deadline:
            assert proc.poll() is None, f"finished before its workers were seen: {proc.stderr.read().decode()[-2000:]}"
            if len(_workers(proc.pid)) >= n:
                seen = seen or time.time()
                if time.time() - seen >= grace_s:
                    break
            time.sleep(0.05)
        assert seen is not None, "workers never started"
        kids = _descendants(proc.pid)
        assert proc.poll() is None, "the parent must still be working when it is killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 10
        while _running(kids) and time.time() < deadline:
            time.sleep(0.1)
        return {p: _cmdline(p)[:100] for p in _running(kids)}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in _running(kids):  # leave nothing behind when the test fails
            os.kill(p, signal.SIGKILL)


def test_killed_metaworld_collector_leaves_no_worker(tmp_path):
    cfg = {"tasks": ["push-v3"], "train_policies": ["expert"], "episodes_per_policy": 400, "val_episodes_per_policy": 0,
           "max_steps": 24, "size": 32, "workers": 2, "out": str(tmp_path / "out")}
    (tmp_path / "data.yaml").write_text(json.dumps(cfg))
    cmd = [sys.executable, "-m", "whale_pl.data.cli", "metaworld", "--config", str(tmp_path / "data.yaml")]
    left = _kill_parent_after_workers_start(cmd, 2, grace_s=1.5)
    assert not left, f"processes left running: {left}"


def _slow_rlds(root: Path, files: int = 32, per_file: int = 24, t: int = 40) -> Path:
    """An unregistered single-camera dataset of ``files`` TFRecord files (hard links to one), each of
    which takes a worker a fraction of a second: several seconds of work for two workers."""
    rng = np.random.default_rng(0)
    frames = [rw.encode_image(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "png") for _ in range(t)]
    flags = {"steps/is_first": np.arange(t) == 0, "steps/is_last": np.arange(t) == t - 1}
    rec = rw.episode_record({"steps/action": rng.normal(size=(t, 7)).astype(np.float32),
                             "steps/observation/image": frames, **flags})
    steps = {"action": rw.tensor((7,)), "observation": {"image": rw.image(64, 64, "png")},
             "is_first": rw.scalar("bool"), "is_last": rw.scalar("bool")}
    d = rw.write_dataset(root / "slow_set" / "1.0.0", rw.features_json(steps), {"train": [[rec] * per_file]})
    one = d / "slow_set-train.tfrecord-00000-of-00001"
    for i in range(files):
        os.link(one, d / f"slow_set-train.tfrecord-{i:05d}-of-{files:05d}")
    one.unlink()
    info = json.loads((d / "dataset_info.json").read_text())
    info["splits"][0]["shardLengths"] = [str(per_file)] * files
    (d / "dataset_info.json").write_text(json.dumps(info))
    return d


def test_killed_oxe_conversion_leaves_no_worker(tmp_path):
    src = _slow_rlds(tmp_path / "src")
    cmd = [sys.executable, "-m", "whale_pl.data.cli", "oxe", "--src", str(src), "--out", str(tmp_path / "out"),
           "--size", "32", "--workers", "2", "-q"]

    left = _kill_parent_after_workers_start(cmd, 2, grace_s=0.5)
    assert not left, f"processes left running: {left}"
