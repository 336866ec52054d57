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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


def exit_with_parent(starter_pid: int, poll_s: float = 0.5) -> None:
    """Make this worker exit as soon as its parent dies. ``starter_pid`` is the process that started the
    worker: its parent (spawn), or the grandparent whose forkserver (the parent) exits when it does."""
    parent = os.getppid()
    if parent != starter_pid and not _alive(starter_pid):
        os._exit(1)
    _arm_parent_death_signal()
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)
    threading.Thread(target=_watch, args=(parent, poll_s), daemon=True, name="exit-with-parent").start()
