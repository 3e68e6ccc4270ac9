"""The one exception tree of canary: everything raised on purpose derives from CanaryError."""

from __future__ import annotations

from dataclasses import dataclass


class CanaryError(Exception):
    """Base class of every error canary raises on purpose."""


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem in a rollout file: where (key path, line) and what."""

    path: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = self.path or "<root>"
        line = f" (line {self.line})" if self.line is not None else ""
        return f"{where}: {self.message}{line}"


class ConfigError(CanaryError):
    """The configuration is invalid; ``issues`` lists every problem found."""

    def __init__(self, issues: list[ConfigIssue], source: str | None = None) -> None:
        self.issues = issues
        self.source = source
        head = f"invalid configuration{f' in {source}' if source else ''}"
        super().__init__(head + ":\n" + "\n".join(f"  - {i}" for i in issues))


class ClientError(CanaryError):
    """The client is at fault: its request is malformed, too large, or stopped arriving.

    ``status`` is the HTTP status canary answers with (when an answer can still be sent).
    Found before an upstream answered, it is answered with ``status`` and never counted
    against an upstream or an arm. A streamed request body that fails after the upstream's
    answer began still ends that exchange as a failed observation of its arm (``kind`` names
    why), as it did before this class existed.
    """

    status: int = 400
    kind = "client"  # short label for metrics and logs; subclasses refine it


class UpstreamError(CanaryError):
    """An upstream endpoint could not be reached or answered badly."""

    kind = "upstream"  # short label for metrics and observations; subclasses refine it


class StoreError(CanaryError):
    """The state store failed."""


class StoreDataLost(StoreError):
    """The store lost its data behind canary's back (a Redis restarted without persistence):
    unlike a failed call, waiting does not bring it back."""


class FencedError(StoreError):
    """A write carried the fencing token of a lease that is no longer the running one: its
    writer is not the leader any more (it was paused or cut off past its lease)."""


class AnalysisError(CanaryError):
    """The analysis could not be run where it was asked to (e.g. its worker process died)."""


class UnknownRollout(CanaryError, KeyError):
    """No rollout of that name is configured."""


class CommandRejected(CanaryError, ValueError):
    """An operator command that the rollout's phase does not allow (e.g. resume a promoted one)."""


class NotLeader(CommandRejected):
    """A command reached a canary process that does not lead the rollouts (several processes
    share one store); ``admin_url`` is the leader's admin API when it advertises one."""

    def __init__(self, message: str, *, leader: str | None, admin_url: str | None) -> None:
        super().__init__(message)
        self.leader = leader
        self.admin_url = admin_url


class AdminError(CanaryError):
    """The admin API refused or failed a call (used by the CLI client).

    ``exit_code`` is what the CLI exits with; ``status`` the HTTP status, if there was an answer;
    ``issues`` the configuration problems of a refused reload, already listed in the message.
    """

    exit_code: int = 1

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        issues: list[ConfigIssue] | None = None,
        exit_code: int | None = None,
    ) -> None:
        self.status = status
        self.issues = issues or []
        if exit_code is not None:
            self.exit_code = exit_code
        if self.issues:
            message += "".join(f"\n  - {i}" for i in self.issues)
        super().__init__(message)


__all__ = [
    "AdminError",
    "AnalysisError",
    "CanaryError",
    "ClientError",
    "CommandRejected",
    "ConfigError",
    "ConfigIssue",
    "FencedError",
    "NotLeader",
    "StoreDataLost",
    "StoreError",
    "UnknownRollout",
    "UpstreamError",
]
