"""What a ``canary run --workers N`` worker process is told, and how it answers.

The supervisor (:mod:`canary.supervisor`) starts each worker as ``python -m canary run -c
FILE`` with ``$CANARY_WORKER`` set to a :class:`WorkerSpec` in JSON: its number, the proxy port
every worker listens on (SO_REUSEPORT), the directory where the worker writes its status
(:func:`write_status`: its pid, the loopback admin port the supervisor talks to and its
leadership name) and the supervisor's pid, which the worker watches: a worker whose supervisor
is gone stops by itself.

This module is light on purpose (no aiohttp): the CLI reads it for every command.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from canary.config import Config
from canary.errors import CanaryError

__all__ = [
    "MAX_WORKERS",
    "WORKER_ENV",
    "WorkerSpec",
    "check_workers",
    "parse_workers",
    "read_status",
    "write_status",
]

WORKER_ENV = "CANARY_WORKER"
MAX_WORKERS = 64  # more processes than this on one machine is a mistake, not a plan


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """One worker's place: ``index`` in 1..``count``, the shared ``proxy_port``, the
    supervisor's ``run_dir`` and pid (``parent``)."""

    index: int
    count: int
    proxy_port: int
    run_dir: str
    parent: int

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> WorkerSpec | None:
        """The spec in ``$CANARY_WORKER``; None when it is not set (not a worker)."""
        text = environ.get(WORKER_ENV, "").strip()
        if not text:
            return None
        try:
            data = json.loads(text)
            spec = cls(
                index=int(data["index"]),
                count=int(data["count"]),
                proxy_port=int(data["proxy_port"]),
                run_dir=str(data["run_dir"]),
                parent=int(data["parent"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise CanaryError(
                f"${WORKER_ENV} is set but malformed ({type(exc).__name__}: {exc}); it is "
                "set by `canary run --workers N` for its workers: unset it"
            ) from None
        if not 1 <= spec.index <= spec.count or not 0 < spec.proxy_port < 65536:
            raise CanaryError(f"${WORKER_ENV} is out of range: {text[:200]}")
        return spec

    @property
    def status_path(self) -> Path:
        return Path(self.run_dir) / f"worker-{self.index}.json"


def write_status(spec: WorkerSpec, admin_port: int, holder: str | None) -> None:
    """Tell the supervisor this worker serves: written whole under a temporary name and
    renamed, so the supervisor never reads half a file."""
    path = spec.status_path
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "admin_port": admin_port, "holder": holder}))
    tmp.replace(path)


def read_status(path: Path, pid: int) -> dict[str, Any] | None:
    """The status worker ``pid`` wrote at ``path``; None until it has (or when the file is
    an earlier worker's)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("pid") != pid:
        return None
    if not isinstance(data.get("admin_port"), int):
        return None
    return data


def parse_workers(text: str) -> int:
    """``--workers N``: a count from 1 to ``MAX_WORKERS``, or ``auto`` (this process's CPUs)."""
    if text.strip().lower() == "auto":
        return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"expected a number of processes or 'auto', got {text!r}") from None
    if not 1 <= n <= MAX_WORKERS:
        raise ValueError(f"expected 1 to {MAX_WORKERS} workers, got {n}")
    return n


def check_workers(config: Config, workers: int) -> None:
    """Refuse what N processes cannot share: an in-memory store."""
    if workers > 1 and config.state.backend == "memory":
        raise CanaryError(
            f"--workers {workers}: state.backend memory cannot be shared by several "
            "processes; use sqlite (the default: one file on this machine) or redis"
        )
