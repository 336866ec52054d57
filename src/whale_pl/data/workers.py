"""Worker processes that never outlive the process that started them.

A killed ``whale-data metaworld`` or ``whale-data oxe --workers N`` must not leave its workers
collecting (and then hanging on a full result pipe). Each worker calls ``exit_with_parent`` first:
on Linux the kernel sends it SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``); everywhere a
daemon thread also polls the parent pid and exits the process when it changes (the portable fallback,
and a guard for a parent that died before the signal was armed). The kernel's signal follows the
parent *thread* that started the worker: start workers from a thread that outlives them (the
collectors start them from the thread that consumes their results).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

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
