"""Leadership among the canary processes that share one store: exactly one acts at a time.

Every process (a ``--workers`` worker or a replica) serves traffic and flushes its samples to
the store; only the holder of the store's lease (:meth:`canary.store.Store.acquire_lease`)
analyses, decides and writes rollout state. The lease has a TTL and a fencing token: a leader
renews it every flush interval, a follower tries to take it at the same pace, and every state
or decision write of the leader carries the token, so a leader that lost its lease (paused,
cut off) cannot write once another holds it.

Two guards, so that a paused leader never acts on a lease it may have lost:

- **locally**, :attr:`Leadership.leading` is true only until ``ttl x SAFETY`` after the
  renewal *was sent* (monotonic clock): a process that was stopped for longer wakes up as a
  follower, before it could decide anything;
- **in the store**, a write fenced with a token that is no longer the running lease's is
  refused (:class:`canary.errors.FencedError`), whatever the local clock says.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable

from canary.errors import StoreError
from canary.store import Store

log = logging.getLogger("canary.controller")

SAFETY = 0.8  # share of the TTL after a renewal during which this process acts as leader


def holder_name(admin_url: str | None = None, *, key: str | None = None) -> str:
    """A name for this process that no other process (here or on another host) shares; with
    ``admin_url``, followers can forward operator commands to it (``NAME@URL``).

    ``key`` (the admin token): the address is signed (``NAME@URL#HMAC``), and followers that
    hold the same token forward commands, with the caller's token, only to a signed address:
    whoever can write the store (Redis) but does not know the token cannot redirect them.
    """
    name = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    if not admin_url:
        return name
    base = f"{name}@{admin_url}"
    return f"{base}#{_signature(base, key)}" if key else base


def _signature(base: str, key: str) -> str:
    return hmac.new(key.encode(), base.encode(), hashlib.sha256).hexdigest()[:32]


def admin_url_of(holder: str | None, key: str | None = None) -> str | None:
    """The admin API a lease holder advertises in its name (None when it does not, or, with
    ``key``, when the address is not signed with it)."""
    if not holder or "@" not in holder:
        return None
    base, sep, signature = holder.rpartition("#")
    if not sep:
        base, signature = holder, ""
    if key is not None and not hmac.compare_digest(signature, _signature(base, key)):
        log.warning("the leader's advertised admin address is not signed with this admin token")
        return None
    url = base.split("@", 1)[1]
    return url if url.startswith(("http://", "https://")) else None


class Leadership:
    """This process's view of the lease: whether it leads now, and the token to fence with."""

    def __init__(
        self,
        store: Store,
        ttl: float,
        *,
        holder: str | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not ttl > 0:
            raise ValueError(f"a lease TTL must be positive, got {ttl!r}")
        self.holder = holder or holder_name()
        self.key: str | None = None  # the admin token: advertised addresses are signed with it
        self.ttl = ttl
        self._store = store
        self._monotonic = monotonic
        self.token: int | None = None
        self._valid_until = 0.0
        self.leader: str | None = None  # who leads, as last read from the store

    @property
    def leading(self) -> bool:
        """This process holds the lease and its last renewal is recent enough to act on."""
        return self.token is not None and self._monotonic() < self._valid_until

    async def renew(self) -> bool:
        """Take or renew the lease; return whether this process leads now.

        A store that fails leaves the lease to run out locally (no decision is made on a
        lease that could not be confirmed); the store's failure is the caller's to report.
        """
        sent = self._monotonic()
        try:
            token = await self._store.acquire_lease(self.holder, self.ttl)
        except StoreError:
            return self.leading
        if token is None:
            if self.token is not None:
                log.warning("lost the leadership lease (token %d)", self.token)
            self.token = None
            try:
                lease = await self._store.lease()
            except StoreError:
                lease = None
            self.leader = lease.holder if lease is not None else None
            return False
        if self.token != token:
            log.info("leading (lease token %d, holder %s)", token, self.holder)
        self.token, self.leader = token, self.holder
        self._valid_until = sent + self.ttl * SAFETY
        return True

    def lost(self) -> None:
        """The store refused a write fenced with our token: another process leads."""
        if self.token is not None:
            log.warning("a write was fenced: lease token %d is no longer the leader's", self.token)
        self.token = None

    async def release(self) -> None:
        """Hand the lease over now (a clean stop), if this process holds it."""
        if self.token is None:
            return
        self.token = None
        try:
            await self._store.release_lease(self.holder)
        except StoreError as exc:  # it runs out by itself within the TTL
            log.warning("could not release the leadership lease: %s", exc)


__all__ = ["SAFETY", "Leadership", "admin_url_of", "holder_name"]
