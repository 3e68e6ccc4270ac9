"""Synchronous client of the admin API, for the CLI (``canary status``, ``canary promote`` ...).

Every failure becomes an :class:`~canary.errors.AdminError` whose message is meant for a
person at a terminal and whose ``exit_code`` the CLI exits with; httpx errors do not leak.
"""

from __future__ import annotations

from typing import Any, Final
from urllib.parse import quote, urlsplit

import httpx

from canary import __version__
from canary.errors import AdminError, ConfigIssue

__all__ = [
    "ACTIONS",
    "DEFAULT_ADMIN_URL",
    "AdminClient",
    "AdminConflictError",
    "AdminError",
    "AdminNotFoundError",
    "AdminUnauthorizedError",
    "AdminUnreachableError",
]

DEFAULT_ADMIN_URL: Final = "http://127.0.0.1:9901"
# POST /api/v1/rollouts/{name}/{action}: "promote" sends all traffic to the candidate,
# "advance" moves to the next step (promoting from the last), "retry" starts a rolled-back
# rollout again from step 1 with fresh samples, "approve" opens the gate of the transition
# pending at the current step (docs/gates.md).
ACTIONS: Final = ("pause", "resume", "promote", "advance", "rollback", "retry", "approve")


class AdminUnreachableError(AdminError):
    """No answer from the admin API (connection refused, timeout, not HTTP)."""

    exit_code = 2


class AdminUnauthorizedError(AdminError):
    """The admin API refused the bearer token (401/403)."""

    exit_code = 3


class AdminNotFoundError(AdminError):
    """No such rollout (404)."""

    exit_code = 4


class AdminConflictError(AdminError):
    """The action is not allowed in the rollout's current phase (409)."""

    exit_code = 5


class AdminClient:
    """Call the admin API of a running ``canary run``.

    Parameters
    ----------
    base_url
        Admin base URL such as ``http://127.0.0.1:9901``.
    token
        Bearer token sent as ``Authorization: Bearer TOKEN``; None sends none.
    timeout
        Seconds for each call (connect, and each read).
    transport
        httpx transport, for tests; None uses the network.

    Raises
    ------
    AdminError
        With ``exit_code`` 2 when ``base_url`` is not an http(s) URL.
    """

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        timeout: float = 5.0,
        *,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise AdminUnreachableError(
                f"--admin {base_url!r} is not an admin URL such as {DEFAULT_ADMIN_URL}"
            )
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        headers = {"User-Agent": f"canary-cli/{__version__}", "Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._client = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def rollouts(self) -> list[dict[str, Any]]:
        """Summaries of every rollout (``GET /api/v1/rollouts``)."""
        data = self._call("GET", "/api/v1/rollouts")
        rollouts = data.get("rollouts")
        if not isinstance(rollouts, list):
            raise self._not_ours("an answer without a 'rollouts' list")
        return rollouts

    def rollout(self, name: str) -> dict[str, Any]:
        """Summary of one rollout with its ``metrics`` and ``decisions``."""
        return self._call("GET", f"/api/v1/rollouts/{quote(name, safe='')}")

    def history(self, name: str) -> dict[str, Any]:
        """The rollout's metric history (``GET /api/v1/rollouts/NAME/history``)."""
        return self._call("GET", f"/api/v1/rollouts/{quote(name, safe='')}/history")

    def distributions(self, name: str) -> dict[str, Any]:
        """Per-arm latency and ttft distributions (``GET .../distributions``)."""
        return self._call("GET", f"/api/v1/rollouts/{quote(name, safe='')}/distributions")

    def action(self, name: str, action: str, reason: str | None = None) -> dict[str, Any]:
        """Send an operator command to rollout ``name``; returns where it is now.

        Parameters
        ----------
        name
            Rollout name.
        action
            One of :data:`ACTIONS`: ``pause``, ``resume``, ``promote`` (all traffic to the
            candidate), ``advance`` (the next step), ``rollback``, ``retry`` (a rolled-back
            rollout from step 1 with fresh samples), ``approve`` (open the gate of the
            transition pending at the current step, once).
        reason
            Why, recorded in the decision log.

        Returns
        -------
        dict
            ``{"name", "phase", "action", "reason"}`` as the admin API answered (this
            canary adds ``step``, ``steps``, ``weights``, ``shadow`` and ``attempt``).
        """
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {', '.join(ACTIONS)}, got {action!r}")
        body = {"reason": reason} if reason else {}
        return self._call("POST", f"/api/v1/rollouts/{quote(name, safe='')}/{action}", body)

    def reload(self) -> dict[str, Any]:
        """Re-read the rollout file (``POST /api/v1/reload``); a refused file raises its issues."""
        return self._call("POST", "/api/v1/reload", {}, refused="reload refused")

    def _call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        refused: str | None = None,
    ) -> dict[str, Any]:
        if body is None and method != "GET":
            body = {}  # mutating calls must be JSON (Content-Type: application/json), or 415
        try:
            response = self._client.request(method, path, json=body)
        except httpx.TimeoutException:
            raise self._unreachable(f"no answer within {self.timeout:g}s") from None
        except httpx.ConnectError as exc:
            raise self._unreachable(_connect_reason(exc)) from None
        except httpx.TransportError as exc:
            raise self._unreachable(f"{type(exc).__name__}: {exc}") from None
        status = response.status_code
        try:
            data = response.json()
        except ValueError:
            data = None
        if 200 <= status < 300:
            if not isinstance(data, dict):
                raise self._not_ours(f"{status} but not with a JSON object")
            return data
        error = _error_text(response, data)
        if status == 403 and "cross-origin" in error:
            raise AdminError(f"the admin API answered 403: {error}", status=status)
        if status in (401, 403):
            raise AdminUnauthorizedError(
                f"the admin API refused the token ({status}): set the bearer token in "
                "$CANARY_ADMIN_TOKEN (or the variable named by admin.token_env)",
                status=status,
            )
        if status == 404 and not _has_error(data):
            # not the admin API's own "unknown rollout": some other server answered
            raise self._not_ours(f"404 to {method} {path}")
        if status == 404:
            raise AdminNotFoundError(error, status=status)
        if status == 409:
            raise AdminConflictError(error, status=status)
        head = refused if refused and status == 400 else f"the admin API answered {status}"
        raise AdminError(f"{head}: {error}", status=status, issues=_issues(data))

    def _unreachable(self, reason: str) -> AdminUnreachableError:
        return AdminUnreachableError(
            f"cannot reach the canary admin API at {self.base_url} ({reason}): "
            "is `canary run` running, and is --admin right?"
        )

    def _not_ours(self, what: str) -> AdminError:
        return AdminError(
            f"{self.base_url} answered {what}: is --admin the admin port (admin.listen), "
            "not the proxy port?"
        )


def _connect_reason(exc: httpx.ConnectError) -> str:
    text = str(exc)
    if "refused" in text.lower():
        return "connection refused"
    return text or type(exc).__name__


def _has_error(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("error"), str) and bool(data["error"])


def _error_text(response: httpx.Response, data: Any) -> str:
    """The server's ``error`` field, else the start of its body, else the status phrase."""
    if _has_error(data):
        return str(data["error"])
    text = response.text.strip()
    if text:
        return text if len(text) <= 200 else text[:199] + "…"
    return response.reason_phrase or f"HTTP {response.status_code}"


def _issues(data: Any) -> list[ConfigIssue]:
    """The ``issues`` of a refused reload as :class:`ConfigIssue` values (bad entries skipped)."""
    if not isinstance(data, dict) or not isinstance(data.get("issues"), list):
        return []
    out: list[ConfigIssue] = []
    for item in data["issues"]:
        if isinstance(item, dict) and "message" in item:
            line = item.get("line")
            out.append(
                ConfigIssue(
                    str(item.get("path") or ""),
                    str(item["message"]),
                    line if isinstance(line, int) else None,
                )
            )
    return out
