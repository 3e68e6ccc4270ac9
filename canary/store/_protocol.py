"""The :class:`Store` Protocol and the JSON helpers every backend shares."""

from __future__ import annotations

import json
from typing import Any, Protocol, runtime_checkable

from canary.errors import StoreError
from canary.observe import RolloutAccumulator

DEFAULT_MAX_DECISIONS = 10_000


@runtime_checkable
class Store(Protocol):
    """Persistent state of every rollout: controller state, merged samples, decision log.

    Every method is a coroutine. A store is opened once (:meth:`open`), used, and closed once
    (:meth:`close`); any other call after :meth:`close` raises
    :class:`~canary.errors.StoreError`. A store never aliases the caller's objects: what goes
    in is copied, what comes out is a fresh copy. Every backend failure is raised as
    :class:`~canary.errors.StoreError`.
    """

    async def open(self) -> None:
        """Create or migrate the schema; idempotent."""

    async def close(self) -> None:
        """Release the backend; closing twice is fine."""

    async def get_state(self, rollout: str) -> dict[str, Any] | None:
        """Return the state last put for ``rollout``, or None."""

    async def put_state(self, rollout: str, state: dict[str, Any]) -> None:
        """Replace the state of ``rollout`` with ``state`` (a JSON-serialisable dict)."""

    async def add_samples(self, rollout: str, delta: RolloutAccumulator) -> None:
        """Merge ``delta`` into the stored accumulator of ``rollout`` (created if absent)."""

    async def get_samples(self, rollout: str) -> RolloutAccumulator | None:
        """Return the merged accumulator of ``rollout``, or None when nothing was added."""

    async def append_decision(self, rollout: str, entry: dict[str, Any]) -> None:
        """Append ``entry`` (a JSON-serialisable dict) to the decision log of ``rollout``."""

    async def decisions(self, rollout: str, limit: int = 100) -> list[dict[str, Any]]:
        """Return the last ``limit`` decisions of ``rollout``, oldest first."""

    async def reset(self, rollout: str) -> None:
        """Forget state, samples and decisions of ``rollout`` (a new rollout of that name)."""

    async def rollouts(self) -> list[str]:
        """Return the sorted names of the rollouts with any state, samples or decisions."""


@runtime_checkable
class FileBackedStore(Protocol):
    """A store whose file can go bad under it (hang, deletion): what the controller's
    watchdog asks (:class:`~canary.store.SQLiteStore` implements it; memory has no file)."""

    def health(self, stall: float) -> str | None:
        """Why the store cannot be trusted to write now, or None; synchronous and cheap."""
        ...

    def deleted(self) -> bool:
        """The file the store opened no longer exists at its path."""
        ...

    async def reopen(self) -> None:
        """Open the path again (the caller writes back what the old file held)."""
        ...


def encode(value: dict[str, Any], what: str) -> str:
    """Serialise ``value`` compactly; StoreError naming ``what`` when it is not valid JSON."""
    try:
        return json.dumps(value, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:  # unserialisable type, nan/inf, circular reference
        raise StoreError(f"cannot store {what}: not JSON-serialisable ({exc})") from exc


def decode(text: str, what: str) -> dict[str, Any]:
    """Parse a stored JSON object; StoreError naming ``what`` when it is corrupt."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"corrupt {what}: {exc}") from exc
    if not isinstance(value, dict):
        raise StoreError(f"corrupt {what}: expected a JSON object, got {type(value).__name__}")
    return value


def check_limit(limit: int) -> None:
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit!r}")


def check_max_decisions(max_decisions: int) -> None:
    if max_decisions < 1:
        raise ValueError(f"max_decisions must be >= 1, got {max_decisions!r}")


__all__ = [
    "DEFAULT_MAX_DECISIONS",
    "FileBackedStore",
    "Store",
    "check_limit",
    "check_max_decisions",
    "decode",
    "encode",
]
