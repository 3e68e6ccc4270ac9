"""Deliver rollout events to the webhooks of a rollout, without ever blocking the caller.

:meth:`WebhookSender.fire` only puts deliveries on a bounded queue; a fixed pool of worker tasks
posts them, each with its own retries, so one slow or dead hook never delays another and a flood
of events cannot open an unbounded number of sockets.

:meth:`WebhookSender.ask` asks one gate (``confirm-advance``, ``confirm-promotion``) once and
returns its answer; the controller awaits it in a task of its own (:mod:`canary.controller.gates`).

Every delivery carries the hook's custom ``headers`` and, with ``secret_env``, an HMAC-SHA256
signature: ``X-Canary-Timestamp: UNIX_SECONDS`` and ``X-Canary-Signature: sha256=HEX`` over
``TIMESTAMP.BODY`` (the exact body bytes), made anew for each attempt (docs/gates.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import httpx

from canary import __version__
from canary.config import WebhookConfig

__all__ = [
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "GateAnswer",
    "WebhookResult",
    "WebhookSender",
    "sign",
]

log = logging.getLogger("canary.webhooks")

GATE_CONNECTIONS = 16  # gate questions in flight at once, over every rollout

WebhookResult = Literal["delivered", "failed", "dropped"]
SIGNATURE_HEADER = "X-Canary-Signature"
TIMESTAMP_HEADER = "X-Canary-Timestamp"
GATE_ANSWER_SHOWN = 200  # characters of a gate's answer body kept for status and the log
_GATE_ANSWER_READ = 4096  # bytes of a gate's answer body read at most


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The ``X-Canary-Signature`` value: ``sha256=`` and the hex HMAC-SHA256 of
    ``TIMESTAMP.BODY`` under ``secret``."""
    mac = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def _delivery_headers(event: str, body: bytes, hook: WebhookConfig) -> dict[str, str]:
    """The headers of one attempt: custom ones, then canary's own (which they cannot replace:
    the config refuses those names), signed when ``secret_env`` is set."""
    headers = dict(hook.headers)
    headers["Content-Type"] = "application/json"
    headers["X-Canary-Event"] = event
    if hook.secret_env is not None:
        secret = os.environ.get(hook.secret_env, "")
        if not secret:  # checked when the config was loaded; unset since
            raise _Fatal(f"${hook.secret_env} (secret_env) is not set: not sent unsigned")
        stamp = str(int(time.time()))
        headers[TIMESTAMP_HEADER] = stamp
        headers[SIGNATURE_HEADER] = sign(secret.encode(), stamp, body)
    return headers


@dataclass(frozen=True, slots=True)
class GateAnswer:
    """What a gate answered: ``open`` on a 2xx; ``reason`` says what it answered, for
    ``status`` and the decision log (``http://h/gate answered 403 'change freeze'``)."""

    open: bool
    reason: str
    result: Literal["yes", "no", "timeout", "error"]


@dataclass(frozen=True, slots=True)
class _Delivery:
    rollout: str
    event: str
    url: str
    timeout: float
    body: bytes
    hook: WebhookConfig


class _Retryable(Exception):
    """An attempt failed in a way worth retrying (connection error, timeout, 5xx, 429)."""


class _Fatal(Exception):
    """An attempt failed in a way that retrying cannot fix (4xx other than 429, 3xx)."""


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None: NaN is not JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _safe_url(url: str) -> str:
    """``url`` without user:password, for logs."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


class WebhookSender:
    """Post rollout events to webhooks, concurrently, with retries and a bounded queue.

    Parameters
    ----------
    max_attempts
        Attempts per delivery before it counts as failed (at least 1).
    backoff
        Base of the exponential back-off in seconds: before retry ``k`` (0-based) the sender
        sleeps a uniformly random time in ``[0, min(max_backoff, backoff * 2**k)]`` ("full
        jitter").
    max_backoff
        Cap of one back-off sleep in seconds.
    queue_size
        Deliveries waiting for a worker; beyond this :meth:`fire` drops them.
    on_result
        Called as ``on_result(rollout, result)`` exactly once per delivery, with result
        ``"delivered"``, ``"failed"`` (gave up) or ``"dropped"`` (queue full, or still pending
        when :meth:`close` gave up waiting). Exceptions it raises are logged and ignored.
    concurrency
        Deliveries in flight at once (worker tasks and pooled connections).

    Notes
    -----
    :meth:`fire` must be called from the event loop thread that runs :meth:`start`.
    """

    def __init__(
        self,
        *,
        max_attempts: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        queue_size: int = 1000,
        on_result: Callable[[str, str], None] | None = None,
        concurrency: int = 32,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts!r}")
        if not backoff >= 0:
            raise ValueError(f"backoff must be >= 0 seconds, got {backoff!r}")
        if not max_backoff >= 0:
            raise ValueError(f"max_backoff must be >= 0 seconds, got {max_backoff!r}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, got {queue_size!r}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency!r}")
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.concurrency = concurrency
        self._on_result = on_result
        self._queue: asyncio.Queue[_Delivery] = asyncio.Queue(maxsize=queue_size)
        self._workers: list[asyncio.Task[None]] = []
        self._client: httpx.AsyncClient | None = None
        # Gates have their own connections: notifications queued for slow or dead hooks
        # (and their retries) must not make a gate's question wait for a connection.
        self._gate_client: httpx.AsyncClient | None = None
        self._closed = False
        self._pending = 0  # queued or in flight: fired and not yet reported

    async def start(self) -> None:
        """Create the HTTP client and the worker tasks; deliveries fired before start wait."""
        if self._closed:
            raise RuntimeError("WebhookSender is closed")
        if self._client is not None:
            return
        self._client = httpx.AsyncClient(
            headers={"User-Agent": f"canary/{__version__}"},
            limits=httpx.Limits(
                max_connections=self.concurrency, max_keepalive_connections=self.concurrency
            ),
            follow_redirects=False,
        )
        self._gate_client = httpx.AsyncClient(
            headers={"User-Agent": f"canary/{__version__}"},
            limits=httpx.Limits(max_connections=GATE_CONNECTIONS, max_keepalive_connections=4),
            follow_redirects=False,
        )
        self._workers = [
            asyncio.create_task(self._work(), name=f"canary-webhook-{i}")
            for i in range(self.concurrency)
        ]

    async def close(self, timeout: float = 5.0) -> None:
        """Stop accepting events, wait up to ``timeout`` seconds for pending deliveries, cancel.

        Deliveries still queued or in flight when the time is up are reported as ``"dropped"``.
        """
        if self._closed:
            return
        self._closed = True
        if self._workers:
            try:
                async with asyncio.timeout(max(timeout, 0.0)):
                    await self._queue.join()
            except TimeoutError:
                log.warning(
                    "webhooks: %d delivery(ies) still pending after %.1fs at shutdown; "
                    "dropping them",
                    self._pending,
                    timeout,
                )
            for task in self._workers:
                task.cancel()
            await asyncio.gather(*self._workers, return_exceptions=True)
            self._workers = []
        while not self._queue.empty():  # never started, or abandoned above
            item = self._queue.get_nowait()
            self._queue.task_done()
            self._pending -= 1
            self._report(item.rollout, "dropped")
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if self._gate_client is not None:
            await self._gate_client.aclose()
            self._gate_client = None

    def fire(
        self,
        rollout: str,
        event: str,
        hooks: Sequence[WebhookConfig],
        payload: Mapping[str, Any],
    ) -> int:
        """Queue one delivery of ``event`` to every hook whose ``on`` lists it; never blocks.

        Parameters
        ----------
        rollout
            Name of the rollout, sent as ``"rollout"`` and passed to ``on_result``.
        event
            One of the webhook events (``advance``, ``promote``, ``rollback``, ...); an event
            no hook subscribes to queues nothing.
        hooks
            The rollout's configured webhooks.
        payload
            Extra JSON fields. The body is ``{"rollout", "event", "at", **payload}``; a
            payload ``at`` replaces the send time, ``rollout`` and ``event`` cannot be replaced.
            Non-finite floats are sent as null.

        Returns
        -------
        int
            Deliveries queued (hooks dropped because the queue is full are not counted).
        """
        targets = [h for h in hooks if event in h.on and h.url is not None]
        if not targets:
            return 0
        body = {"rollout": rollout, "event": event, "at": time.time(), **payload}
        body["rollout"], body["event"] = rollout, event
        data = json.dumps(_finite(body), default=str, separators=(",", ":")).encode()
        queued = 0
        for hook in targets:
            assert hook.url is not None
            if self._closed:
                log.warning(
                    "webhook %s for %s to %s dropped: the sender is closed",
                    event,
                    rollout,
                    _safe_url(hook.url),
                )
                self._report(rollout, "dropped")
                continue
            try:
                self._queue.put_nowait(
                    _Delivery(rollout, event, hook.url, hook.timeout, data, hook)
                )
            except asyncio.QueueFull:
                log.warning(
                    "webhook %s for %s to %s dropped: %d deliveries already queued",
                    event,
                    rollout,
                    _safe_url(hook.url),
                    self._queue.maxsize,
                )
                self._report(rollout, "dropped")
            else:
                queued += 1
                self._pending += 1
        return queued

    async def ask(
        self,
        rollout: str,
        event: str,
        hook: WebhookConfig,
        payload: Mapping[str, Any],
    ) -> GateAnswer:
        """Ask gate ``hook`` once whether ``event`` (``confirm-advance``, ``confirm-promotion``)
        may happen: POST ``{"rollout", "event", "at", **payload}``, signed like every delivery;
        a 2xx within ``hook.timeout`` opens it. Never raises for what the gate does."""
        client = self._gate_client
        if client is None or self._closed:
            return GateAnswer(False, "the webhook client is not running", "error")
        return await _ask(client, rollout, event, hook, payload)

    def pending(self) -> int:
        """Deliveries queued or in flight."""
        return self._pending

    def _report(self, rollout: str, result: WebhookResult) -> None:
        if self._on_result is None:
            return
        try:
            self._on_result(rollout, result)
        except Exception:
            log.exception("webhook on_result callback failed")

    async def _work(self) -> None:
        while True:
            item = await self._queue.get()
            result: WebhookResult = "dropped"  # if cancelled mid-delivery by close()
            try:
                result = await self._deliver(item)
            except Exception:  # a bug here must not kill the worker
                log.exception("webhook %s for %s: unexpected error", item.event, item.rollout)
                result = "failed"
            finally:
                self._pending -= 1
                self._report(item.rollout, result)
                self._queue.task_done()

    async def _deliver(self, item: _Delivery) -> WebhookResult:
        url = _safe_url(item.url)
        for attempt in range(self.max_attempts):
            try:
                await self._attempt(item)
            except (_Retryable, _Fatal) as exc:
                fatal = isinstance(exc, _Fatal)
                last = fatal or attempt + 1 >= self.max_attempts
                log.warning(
                    "webhook %s for %s to %s failed (attempt %d/%d): %s%s",
                    item.event,
                    item.rollout,
                    url,
                    attempt + 1,
                    self.max_attempts,
                    exc,
                    "; giving up" if last else "; retrying",
                )
                if last:
                    return "failed"
                cap = min(self.max_backoff, self.backoff * 2**attempt)
                await asyncio.sleep(random.uniform(0.0, cap))
            else:
                log.debug("webhook %s for %s delivered to %s", item.event, item.rollout, url)
                return "delivered"
        return "failed"  # unreachable: the loop returns on its last attempt

    async def _attempt(self, item: _Delivery) -> None:
        client = self._client
        assert client is not None, "workers run only after start()"
        headers = _delivery_headers(item.event, item.body, item.hook)
        try:
            # httpx's timeout bounds each phase; this bounds the whole attempt (a server that
            # trickles its answer byte by byte cannot hold a worker longer than the timeout)
            async with asyncio.timeout(item.timeout):
                response = await client.post(
                    item.url, content=item.body, headers=headers, timeout=item.timeout
                )
        except (TimeoutError, httpx.TimeoutException):
            raise _Retryable(f"timed out after {item.timeout:g}s") from None
        except httpx.TransportError as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc}" if str(exc) else repr(exc)) from None
        except httpx.HTTPError as exc:  # e.g. an invalid URL: retrying will not help
            raise _Fatal(f"{type(exc).__name__}: {exc}") from None
        status = response.status_code
        if 200 <= status < 300:
            return
        reason = f"HTTP {status} {response.reason_phrase}".rstrip()
        if status >= 500 or status == 429:
            raise _Retryable(reason)
        raise _Fatal(reason)


def _body_text(raw: bytes) -> str:
    """A gate's answer body as one short line for ``status`` (its JSON ``reason``/``message``/
    ``error`` field when it has one)."""
    text = raw.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        for key in ("reason", "message", "error"):
            if isinstance(data.get(key), str):
                text = data[key]
                break
    text = " ".join(text.split())  # no CR/LF in a status line
    return text[:GATE_ANSWER_SHOWN] + ("…" if len(text) > GATE_ANSWER_SHOWN else "")


async def _ask(
    client: httpx.AsyncClient,
    rollout: str,
    event: str,
    hook: WebhookConfig,
    payload: Mapping[str, Any],
) -> GateAnswer:
    assert hook.url is not None, "a manual gate is not asked"
    url = _safe_url(hook.url)
    body = {"rollout": rollout, "event": event, "at": time.time(), **payload}
    body["rollout"], body["event"] = rollout, event
    data = json.dumps(_finite(body), default=str, separators=(",", ":")).encode()
    try:
        headers = _delivery_headers(event, data, hook)
        # One attempt, bounded as a whole (a trickling answer cannot outlast the timeout);
        # the controller asks again at its next analysis, so no retries here.
        async with asyncio.timeout(hook.timeout):
            async with client.stream(
                "POST", hook.url, content=data, headers=headers, timeout=hook.timeout
            ) as response:
                raw = b""
                async for chunk in response.aiter_bytes():
                    raw += chunk
                    if len(raw) >= _GATE_ANSWER_READ:
                        break
    except (TimeoutError, httpx.TimeoutException):
        return GateAnswer(False, f"{url} did not answer within {hook.timeout:g}s", "timeout")
    except _Fatal as exc:
        return GateAnswer(False, f"{url} was not asked: {exc}", "error")
    except httpx.HTTPError as exc:
        why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return GateAnswer(False, f"{url} could not be reached ({why})", "error")
    status = response.status_code
    said = _body_text(raw)
    reason = f"{url} answered {status}" + (f" {said!r}" if said else "")
    if 200 <= status < 300:
        return GateAnswer(True, reason, "yes")
    return GateAnswer(False, reason, "no")
