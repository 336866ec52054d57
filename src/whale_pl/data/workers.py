"""Worker processes that never outlive the process that started them, and an ordered map over them.

A killed ``whale-data metaworld`` or ``whale-data oxe --workers N`` must not leave its workers
collecting (and then hanging on a full result pipe). Each worker calls ``exit_with_parent`` first:
on Linux the kernel sends it SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``); everywhere a
daemon thread also polls the parent pid and exits the process when it changes (the portable fallback,
and a guard for a parent that died before the signal was armed). The kernel's signal follows the
parent *thread* that started the worker: start workers from a thread that outlives them
(``map_ordered`` starts them from the thread that consumes their results).
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Iterable, Iterator

PR_SET_PDEATHSIG = 1


def _arm_parent_death_signal() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: the polling thread alone does it
        pass


def _watch(parent: int, poll_s: float) -> None:
    while os.getppid() == parent:
        time.sleep(poll_s)
    os._exit(1)


def exit_with_parent(parent_pid: int, poll_s: float = 0.5) -> None:
    """Make this worker exit as soon as ``parent_pid``, the process that spawned it, dies. (Workers must
    be spawned, not started by a forkserver: every forkserver child keeps the forkserver alive.)"""
    _arm_parent_death_signal()
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)
    threading.Thread(target=_watch, args=(parent_pid, poll_s), daemon=True, name="exit-with-parent").start()


def _start_worker(parent_pid: int, initializer: Callable[[], None] | None) -> None:
    exit_with_parent(parent_pid)
    if initializer is not None:
        initializer()


def map_ordered(fn: Callable[[Any], Any], items: Iterable[Any], workers: int,
                initializer: Callable[[], None] | None = None) -> Iterator[Any]:
    """``fn(item)`` for every item in ``workers`` spawned processes that exit with this one (each runs
    ``initializer()`` first); results in item order. Items not started when the caller stops are dropped."""
    ctx = mp.get_context("spawn")  # (not forkserver: its children keep it alive)
    ex = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_start_worker,
                             initargs=(os.getpid(), initializer))
    try:
        yield from ex.map(fn, items)
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
