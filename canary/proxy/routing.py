"""Arm choice: which rollout owns a request and which arm answers it. No aiohttp types here.

Weights are an immutable :class:`Weights` value per rollout, replaced as a whole by the
controller; the proxy reads the current one once per request, so there is nothing to lock.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from typing import Final, Protocol

from canary.config import MatchConfig, RolloutConfig
from canary.observe.record import CLUSTERS, NO_CLUSTER, Weights
from canary.proxy.openai import is_model_path
from canary.signals import ARMS, CANDIDATE, PRODUCTION

__all__ = [
    "NEEDS_MODEL",
    "ArmChooser",
    "Choice",
    "HeaderLookup",
    "RouteTable",
    "cookie_value",
    "sticky_hash",
    "sticky_point",
]


@dataclass(slots=True)
class Choice:
    """The routing decision for one request (a value: never changed once made).

    Not ``frozen``: a frozen dataclass sets each field through ``object.__setattr__``, which
    makes one per request cost three times as much to build.
    """

    arm: str
    propensity: float  # probability this arm had for this request; 1.0 when forced
    forced: bool  # chosen by the override header: measured, but kept out of the analysis
    mirror: bool  # also send a copy to the candidate (shadow step)
    cluster: int = NO_CLUSTER  # the sticky key's cluster (the unit the analysis counts)


def sticky_point(rollout: str, key: str) -> float:
    """A stable point in [0, 100) for a sticky key.

    The candidate takes keys whose point is below its weight, so raising the weight only
    moves users from production to the candidate, never back. blake2b, not ``hash()``: the
    point must be the same in every worker and replica and across restarts.
    """
    return sticky_hash(rollout, key)[0]


def sticky_hash(rollout: str, key: str) -> tuple[float, int]:
    """The sticky key's point (see :func:`sticky_point`) and its cluster in 0..CLUSTERS-1.

    The cluster is the digest's lowest bits, while the arm is decided by its highest ones, so
    the two are independent: every cluster holds users of both arms, and clusters are
    independent groups of users that the statistics can count as their units.
    """
    h = int.from_bytes(hashlib.blake2b(f"{rollout}\x00{key}".encode(), digest_size=8).digest())
    return h / 2**64 * 100.0, h % CLUSTERS


def cookie_value(cookie_header: str | None, name: str) -> str | None:
    """Value of cookie ``name`` in a Cookie header, or None (malformed headers count as absent)."""
    if not cookie_header or name not in cookie_header:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(cookie_header)
    except CookieError:
        return None
    morsel = jar.get(name)
    return morsel.value if morsel is not None else None


class HeaderLookup(Protocol):
    """Request headers by name, case-insensitively (a dict with the exact names also does)."""

    def get(self, name: str, /) -> str | None: ...


class ArmChooser:
    """Choose an arm for a request of one rollout from its headers and the current weights."""

    __slots__ = ("_name", "_override", "_random", "_sticky_cookie", "_sticky_header")

    def __init__(self, rollout: RolloutConfig, rand: Callable[[], float] = random.random) -> None:
        self._name = rollout.name
        sticky = rollout.routing.sticky
        self._sticky_header = sticky.header if sticky is not None else None
        self._sticky_cookie = sticky.cookie if sticky is not None else None
        self._override = rollout.routing.override_header
        self._random = rand

    def choose(self, headers: HeaderLookup, weights: Weights) -> Choice:
        if self._override is not None:
            forced = headers.get(self._override)
            if forced is not None:
                forced = forced.strip().lower()
                if forced in ARMS:
                    return Choice(forced, 1.0, True, False)
        share = weights.candidate
        if not weights.shadow:
            if share <= 0.0:
                return Choice(PRODUCTION, 1.0, False, False)
            if share >= 100.0:
                return Choice(CANDIDATE, 1.0, False, False)
        key = None
        if self._sticky_header is not None:
            key = headers.get(self._sticky_header)
        elif self._sticky_cookie is not None:
            key = cookie_value(headers.get("Cookie"), self._sticky_cookie)
        if key:
            point, cluster = sticky_hash(self._name, key)
        else:
            point, cluster = -1.0, NO_CLUSTER
        if weights.shadow:  # both arms answer every request: the cluster still matters
            return Choice(PRODUCTION, 1.0, False, True, cluster)
        if point < 0.0:
            point = self._random() * 100.0
        if point < share:
            return Choice(CANDIDATE, share / 100.0, False, False, cluster)
        return Choice(PRODUCTION, 1.0 - share / 100.0, False, False, cluster)


def _hostname(host: str) -> str:
    """``Host`` header without its port: ``a.b:80`` -> ``a.b``, ``[::1]:80`` -> ``::1``."""
    if host.startswith("["):
        end = host.find("]")
        return host[1:end].lower() if end > 0 else host.lower()
    name, sep, port = host.rpartition(":")
    return (name if sep and port.isdigit() else host).lower()


class _NeedsModel:
    """What :meth:`RouteTable.lookup` returns when the body's ``model`` decides the rollout."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEEDS_MODEL"


NEEDS_MODEL: Final = _NeedsModel()


class RouteTable:
    """Find the rollout that owns a request: host-specific rules first, then model-specific
    ones (on the OpenAI model-routed paths only), then longest prefix."""

    __slots__ = ("_entries", "_models")

    def __init__(self, rollouts: list[tuple[MatchConfig, str]]) -> None:
        self._entries = sorted(
            ((m, name, frozenset(m.model or ())) for m, name in rollouts),
            key=lambda e: (e[0].host is None, e[0].model is None, -len(e[0].path_prefix)),
        )
        self._models = any(m.model for m, _ in rollouts)  # any rule that needs the body

    def lookup(self, host: str | None, path: str) -> str | _NeedsModel | None:
        """The rollout owning the request, or :data:`NEEDS_MODEL` when a model rule covers
        it (then :meth:`lookup_model` decides once the body's model is known)."""
        h = _hostname(host) if host else None
        model_path = self._models and is_model_path(path)
        for match, name, models in self._entries:
            if match.host is not None and match.host != h:
                continue
            if models and not model_path:
                continue  # a model rule owns the model-routed paths only
            if match.covers(path):
                return NEEDS_MODEL if models else name
        return None

    def lookup_model(self, host: str | None, path: str, model: str | None) -> str | None:
        """The rollout owning a model-routed request whose body names ``model``: the first
        rule serving that name, else the first model-less rule covering it, else None
        (``model`` None: the body names none, only a model-less rule can take it)."""
        h = _hostname(host) if host else None
        for match, name, models in self._entries:
            if match.host is not None and match.host != h:
                continue
            if models and model not in models:
                continue
            if match.covers(path):
                return name
        return None
