"""Parsers for the unit strings of the rollout file: durations, percentages, sizes, addresses."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

from canary.config._resource_query import ResourceQuery

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KB": 1000,
    "KiB": 1024,
    "MB": 1000**2,
    "MiB": 1024**2,
    "GB": 1000**3,
    "GiB": 1024**3,
}
_MARGIN = re.compile(r"^\s*([+-]?\d+(?:\.\d+)?)\s*(%|pp)\s*$")


def parse_duration(value: object) -> float:
    """Seconds from ``500ms``, ``30s``, ``5m``, ``2h`` or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as '30s', got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ValueError(f"expected a duration such as '500ms', '30s', '5m' or '2h', got {value!r}")
    if seconds < 0:
        raise ValueError(f"duration must not be negative, got {value!r}")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from ``512``, ``64KiB``, ``10MiB``, ``1GB``."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as '10MiB', got {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])
    else:
        raise ValueError(f"expected a size such as '64KiB' or '10MiB', got {value!r}")
    if size < 0:
        raise ValueError(f"size must not be negative, got {value!r}")
    return size


@dataclass(frozen=True, slots=True)
class Margin:
    """A tolerance: ``relative`` (from ``10%``: 0.10 of production) or absolute (``0.5pp``)."""

    value: float
    relative: bool

    def __str__(self) -> str:
        return f"{self.value * 100:g}{'%' if self.relative else 'pp'}"


def parse_margin(value: object) -> Margin:
    """``10%`` -> relative 0.10; ``0.5pp`` -> absolute 0.005 (percentage points)."""
    if isinstance(value, Margin):
        return value
    if not isinstance(value, str) or not (m := _MARGIN.match(value)):
        raise ValueError(
            f"expected a relative change such as '10%' or an absolute rate change such as "
            f"'0.5pp', got {value!r}"
        )
    number = float(m.group(1))
    if number < 0:
        raise ValueError(f"tolerance must not be negative, got {value!r}")
    return Margin(number / 100.0, m.group(2) == "%")


def parse_percent(value: object) -> float:
    """A weight in percent from ``5``, ``5.5`` or ``'5%'``."""
    if isinstance(value, bool):
        raise ValueError(f"expected a weight in percent, got {value!r}")
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            value = float(value.strip()[:-1])
        except ValueError:
            raise ValueError(
                f"expected a weight in percent such as 5 or '5%', got {value!r}"
            ) from None
    if not isinstance(value, int | float):
        raise ValueError(f"expected a weight in percent such as 5 or '5%', got {value!r}")
    if not 0 <= value <= 100:
        raise ValueError(f"weight must be within 0..100, got {value!r}")
    return float(value)


def parse_listen(value: object) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6) -> (host, port)."""
    if not isinstance(value, str):
        raise ValueError(f"expected HOST:PORT such as '127.0.0.1:8080', got {value!r}")
    host, sep, port_s = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ValueError(f"expected HOST:PORT such as '127.0.0.1:8080', got {value!r}")
    return host, int(port_s)


def parse_upstream_url(value: object) -> str:
    """An upstream base URL: http(s), with a host, no query or fragment; trailing / removed."""
    if not isinstance(value, str):
        raise ValueError(f"expected an http(s) URL, got {value!r}")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http(s) URL such as 'http://10.0.0.5:8000', got {value!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"upstream URL must not have a query or fragment, got {value!r}")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValueError(f"bad port in URL {value!r}") from None
    return value.rstrip("/")


# --- signal strings ---------------------------------------------------------------------------
# The one grammar of signal strings: the rollout file is validated with it (MetricConfig.signal)
# and the proxy compiles its extractors with it (canary.observe.signals re-exports it).

# Where a signal's value comes from.
SOURCE_PROXY: Final = "proxy"  # measured by the proxy itself: latency, ttft, error
SOURCE_DERIVED: Final = "derived"  # computed at finish from measured and extracted values
SOURCE_RESPONSE: Final = "response"  # read from the response: header, Server-Timing, JSON
SOURCE_EXTERNAL: Final = "external"  # not per response: scraped, posted later or paired

# Bare signal names and the source of each.
BARE_SIGNALS: Final[dict[str, str]] = {
    "latency": SOURCE_PROXY,
    "ttft": SOURCE_PROXY,
    "error": SOURCE_PROXY,
    "tokens_per_s": SOURCE_DERIVED,
    "itl": SOURCE_DERIVED,  # inter-token latency of a stream, seconds per token
    "cost": SOURCE_DERIVED,
    "feedback": SOURCE_EXTERNAL,  # ground truth joined later on request id
    "agreement": SOURCE_EXTERNAL,  # shadow steps: candidate's prediction == production's
}
# NAME-taking signal kinds and the source of each.
PREFIXED_SIGNALS: Final[dict[str, str]] = {
    "header": SOURCE_RESPONSE,
    "server_timing": SOURCE_RESPONSE,
    "json": SOURCE_RESPONSE,
    "resource": SOURCE_EXTERNAL,  # scraped from the arm's Prometheus endpoint
}
_EXPECTED = ", ".join([*BARE_SIGNALS, *(f"{k}:NAME" for k in PREFIXED_SIGNALS)])

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token (header and metric names)
_JSON_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True, slots=True)
class Signal:
    """A parsed signal string.

    ``key`` is the canonical form used in :attr:`Observation.signals` and the accumulators:
    the input with header names lower-cased (HTTP header names are case-insensitive), so
    ``header:X-Model-Cost`` and ``header:x-model-cost`` are the same signal.
    """

    kind: str  # a BARE_SIGNALS name or a PREFIXED_SIGNALS kind
    arg: str  # the NAME after the colon; "" for bare signals
    key: str
    source: str  # SOURCE_PROXY | SOURCE_DERIVED | SOURCE_RESPONSE | SOURCE_EXTERNAL

    @property
    def per_request(self) -> bool:
        """True when the signal has a value per request (everything but resource/feedback)."""
        return self.source != SOURCE_EXTERNAL


def parse_signal(text: str) -> Signal:
    """Parse and classify a signal string; raise ValueError naming what is wrong."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"a signal must be a non-empty string, got {text!r}")
    kind, sep, arg = text.partition(":")
    if not sep:
        source = BARE_SIGNALS.get(text)
        if source is None:
            hint = " (it needs a NAME, e.g. 'header:X-Cost')" if text in PREFIXED_SIGNALS else ""
            raise ValueError(f"unknown signal {text!r}{hint}; expected one of {_EXPECTED}")
        return Signal(text, "", text, source)
    if kind in BARE_SIGNALS:
        raise ValueError(f"signal {kind!r} takes no argument, got {text!r}")
    source = PREFIXED_SIGNALS.get(kind)
    if source is None:
        raise ValueError(f"unknown signal kind {kind!r} in {text!r}; expected one of {_EXPECTED}")
    if not arg:
        raise ValueError(f"signal {text!r} needs a name after '{kind}:'")
    if kind == "header":
        if not _TOKEN.fullmatch(arg):
            raise ValueError(f"{arg!r} in {text!r} is not a valid HTTP header name")
        return Signal(kind, arg.lower(), f"header:{arg.lower()}", source)
    if kind == "server_timing":
        if not _TOKEN.fullmatch(arg):
            raise ValueError(f"{arg!r} in {text!r} is not a valid Server-Timing metric name")
    elif kind == "json":
        json_path_segments(arg)  # raises ValueError with the reason
    elif kind == "resource":
        ResourceQuery.parse(text)  # the name and label selector; a ResourceQueryError says why
    return Signal(kind, arg, text, source)


def json_path_segments(text: str) -> list[str]:
    """The segments of a dot path into JSON (``usage.total_tokens``, ``choices.0.score``)."""
    segments = text.split(".")
    for seg in segments:
        if not _JSON_SEGMENT.fullmatch(seg):
            raise ValueError(
                f"{text!r} is not a JSON path: segments are separated by '.' and made of "
                f"letters, digits, '_' and '-' (e.g. 'usage.total_tokens', 'choices.0.score')"
            )
    return segments
