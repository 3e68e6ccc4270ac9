"""Set-up of the analysis worker process that ``canary run`` runs the statistics in."""

from __future__ import annotations

import os
import threading
import time

WORKER_NICE = 19  # lowest priority: the proxy's requests come first on a shared core


def init_worker(parent: int) -> None:
    """Process-pool initializer: lower this worker's priority and watch its parent.

    The statistics are background work. Where canary shares one core with its worker, a
    worker at normal priority delays requests that arrive while it runs; at nice 19 they
    preempt it. (``SCHED_IDLE`` was tried too: no clearer gain in p99, and at saturation it
    starved the analysis for seconds, delaying the controller's flushes and commands.)
    """
    try:
        os.nice(WORKER_NICE)
    except OSError:  # not allowed here (a hardened container): run at normal priority
        pass
    watch_parent(parent)


def watch_parent(pid: int, every: float = 1.0) -> None:
    """Exit this worker when process ``pid`` (the canary that started it) is gone.

    A SIGKILLed canary cannot shut its process pool down, and the forkserver's own liveness
    pipe is held open by the worker itself, so without this the worker (and the forkserver and
    resource tracker waiting on it) would live forever.
    """

    def run() -> None:
        while True:
            time.sleep(every)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(0)
            except PermissionError:  # alive, owned by someone else (cannot happen for a parent)
                pass

    threading.Thread(target=run, name="canary-parent-watch", daemon=True).start()
