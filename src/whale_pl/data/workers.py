"""An ordered map over spawned worker processes that never outlive the process that started them: on Linux the
kernel kills a worker when its parent *thread* dies (``PR_SET_PDEATHSIG``; ``map_ordered`` starts them from the
thread that consumes their results); everywhere a daemon thread also polls the parent pid.
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


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _start_worker(parent_pid: int, initializer: Callable[[], None] | None) -> None:
    """Make this worker exit as soon as ``parent_pid`` dies, then run ``initializer``."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: the polling thread alone does it
            pass
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)
    threading.Thread(target=_watch, args=(parent_pid,), daemon=True, name="exit-with-parent").start()
    if initializer is not None:
        initializer()


def map_ordered(fn: Callable[[Any], Any], items: Iterable[Any], workers: int,
                initializer: Callable[[], None] | None = None) -> Iterator[Any]:
    """``fn(item)`` for every item in ``workers`` spawned processes that exit with this one (each runs
    ``initializer()`` first); results in item order. Items not started when the caller stops are dropped."""
    ctx = mp.get_context("spawn")  # not forkserver: its children keep it alive
    ex = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_start_worker,
                             initargs=(os.getpid(), initializer))
    try:
        yield from ex.map(fn, items)
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
