"""``resource:NAME{label="value", ...}`` signals: the PromQL-style selector, parsed once.

Parsed where the rollout file is validated (so ``canary validate``, start-up and reloads all
reject a selector that cannot be read, with its key path and line) and used by the scrapers
(:mod:`canary.observe.resources`) to pick series from an exposition.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from canary.errors import CanaryError

_MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*(,|$)')
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_UNESCAPE = re.compile(r"\\(.)")


class ResourceQueryError(CanaryError, ValueError):
    """A resource signal that cannot be read (a ValueError too: the config validators'
    way of reporting a bad value)."""


@dataclass(frozen=True)
class ResourceQuery:
    """A parsed ``resource:NAME{label="value", ...}`` signal.

    ``signal`` is the accumulator key (the signal string). Matchers are ``=``, ``!=``, ``=~``
    and ``!~`` as in PromQL (regular expressions match the whole value). Every sample that
    matches on an endpoint is summed: use a selector to pick one series.
    """

    signal: str
    name: str
    matchers: tuple[tuple[str, str, str], ...] = ()
    _regex: tuple[re.Pattern[str] | None, ...] = field(default=(), compare=False, repr=False)

    @classmethod
    def parse(cls, signal: str) -> ResourceQuery:
        """Parse ``resource:NAME`` or ``resource:NAME{...}``; ResourceQueryError says why."""
        kind, _, arg = signal.partition(":")
        if kind != "resource" or not arg:
            raise ResourceQueryError(f"{signal!r} is not a resource signal ('resource:METRIC')")
        name, brace, rest = arg.partition("{")
        if not _NAME.fullmatch(name):
            raise ResourceQueryError(f"{name!r} in {signal!r} is not a Prometheus metric name")
        matchers: list[tuple[str, str, str]] = []
        if brace:
            if not rest.endswith("}"):
                raise ResourceQueryError(f"label selector of {signal!r} must end with '}}'")
            body = rest[:-1]
            pos = 0
            while pos < len(body) and body[pos:].strip():
                m = _MATCHER.match(body, pos)
                if m is None or m.end() == pos:
                    raise ResourceQueryError(
                        f"cannot read the label selector of {signal!r} at {body[pos:]!r}; "
                        'expected label="value" (or !=, =~, !~), separated by commas'
                    )
                label, op, raw = m.group(1), m.group(2), m.group(3)
                matchers.append((label, op, _UNESCAPE.sub(_unescape, raw)))
                pos = m.end()
        regex: list[re.Pattern[str] | None] = []
        for label, op, value in matchers:
            if op in ("=~", "!~"):
                try:
                    regex.append(re.compile(value))
                except re.error as exc:
                    raise ResourceQueryError(
                        f"bad regular expression {value!r} for label {label!r} in {signal!r}: {exc}"
                    ) from exc
            else:
                regex.append(None)
        return cls(signal, name, tuple(matchers), tuple(regex))

    def matches_labels(self, labels: dict[str, str]) -> bool:
        for (label, op, value), rx in zip(self.matchers, self._regex, strict=True):
            got = labels.get(label, "")
            if op == "=":
                ok = got == value
            elif op == "!=":
                ok = got != value
            else:
                assert rx is not None
                ok = (rx.fullmatch(got) is not None) == (op == "=~")
            if not ok:
                return False
        return True


def _unescape(m: re.Match[str]) -> str:
    c = m.group(1)
    return "\n" if c == "n" else c
