"""Child processes that do not outlive their parent.

hivemind runs its DHT in a child process, which starts the libp2p daemon; neither is told when the
donor that started them dies by SIGKILL or the OOM killer, so both would run on, holding their
ports. `dying_with_its_parent` wraps such a process class (multiprocessing style: `run()` is the
child's body): on Linux the child asks the kernel for SIGTERM when its parent dies, and on SIGTERM
stops its own children and exits. The kernel's signal follows the thread that started the child,
so only wrap processes started from the main thread of a process that lives as long as they do.
"""

from __future__ import annotations

import os
import signal
import sys


def dying_with_its_parent(process_class):
    class DyingWithItsParent(process_class):
        """The process class, whose process also stops, with the children it started, when the
        process that started it dies."""

        def run(self):
            _stop_with_parent()
            super().run()

    return DyingWithItsParent


def _stop_with_parent() -> None:
    """In the child, on Linux: SIGTERM when the parent dies, and on SIGTERM, stop its own children
    (for the DHT's process: the libp2p daemon) and exit."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    signal.signal(signal.SIGTERM, _stop_children_and_exit)
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if os.getppid() == 1:  # the parent died before the line above
        _stop_children_and_exit()


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _stop_children_and_exit(*_) -> None:
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                children = [int(pid) for pid in f.read().split()]
        except OSError:
            continue
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    os._exit(0)
