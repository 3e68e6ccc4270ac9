"""Set-up of the analysis worker process that ``canary run`` runs the statistics in."""

from __future__ import annotations

import os
import threading
import time


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
