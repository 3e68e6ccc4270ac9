"""Parsers for the unit strings of the rollout file: durations, percentages, sizes, addresses."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = [
    "Margin",
    "parse_duration",
    "parse_listen",
    "parse_margin",
    "parse_percent",
    "parse_size",
    "parse_upstream_url",
]

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
