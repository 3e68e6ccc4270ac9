"""Header rewriting for a pass-through proxy (RFC 9110 section 7.6.1). No aiohttp types."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence

__all__ = [
    "HOP_BY_HOP",
    "downstream_headers",
    "request_id",
    "upstream_headers",
]

# Connection-specific headers: meaningful for one hop only, never forwarded.
HOP_BY_HOP = frozenset(
    {
        "connection",
        # h2c upgrade's settings: for one hop only even when Connection does not list it
        # (RFC 9113 section 3.1 deprecates the upgrade; RFC 7540 section 3.2.1). nginx
        # forwards it; stricter here.
        "http2-settings",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Set by the proxy itself on the way up; a client's own values are replaced, not trusted.
# Expect too: the proxy's server answers 100-continue itself and sends the upstream the body
# at once (nginx drops it as well, ngx_http_proxy_headers).
_REWRITTEN_UP = frozenset(
    {"host", "content-length", "x-forwarded-host", "x-forwarded-proto", "expect"}
)
# Set by the proxy on the way down.
_REWRITTEN_DOWN = frozenset({"content-length", "x-request-id", "x-canary-arm"})

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")


def request_id(client_value: str | None) -> str:
    """The client's X-Request-Id when it is a sane token, else a new random one."""
    if client_value is not None and _REQUEST_ID.match(client_value):
        return client_value
    return os.urandom(16).hex()  # 128 random bits, like uuid4, at a third of the cost


def _connection_tokens(headers: Iterable[tuple[str, str]]) -> frozenset[str]:
    tokens: set[str] = set()
    for k, v in headers:
        if k.lower() == "connection":
            tokens.update(t.strip().lower() for t in v.split(",") if t.strip())
    return frozenset(tokens)


def upstream_headers(
    client_headers: Sequence[tuple[str, str]],
    *,
    upstream_host: str,
    client_ip: str | None,
    scheme: str,
    rid: str,
) -> list[tuple[str, str]]:
    """Headers to send upstream: hop-by-hop stripped, forwarding headers set, request id added."""
    drop = (
        HOP_BY_HOP | _connection_tokens(client_headers)
        if any(k.lower() == "connection" for k, _ in client_headers)
        else HOP_BY_HOP
    )
    out: list[tuple[str, str]] = [("Host", upstream_host)]
    original_host = None
    forwarded_for = None
    for k, v in client_headers:
        lk = k.lower()
        if lk in drop or lk in _REWRITTEN_UP:
            if lk == "host":
                original_host = v
            continue
        if lk == "x-forwarded-for":
            forwarded_for = v if forwarded_for is None else f"{forwarded_for}, {v}"
            continue
        if lk == "x-request-id":
            continue
        out.append((k, v))
    if client_ip:
        forwarded_for = f"{forwarded_for}, {client_ip}" if forwarded_for else client_ip
    if forwarded_for:
        out.append(("X-Forwarded-For", forwarded_for))
    out.append(("X-Forwarded-Proto", scheme))
    if original_host:
        out.append(("X-Forwarded-Host", original_host))
    out.append(("X-Request-Id", rid))
    return out


def downstream_headers(
    upstream: Sequence[tuple[str, str]], *, rid: str, arm: str
) -> tuple[list[tuple[str, str]], int | None]:
    """Response headers for the client, and the upstream's Content-Length if it sent one."""
    drop = HOP_BY_HOP
    if any(k.lower() == "connection" for k, _ in upstream):
        drop = drop | _connection_tokens(upstream)
    out: list[tuple[str, str]] = []
    length = None
    for k, v in upstream:
        lk = k.lower()
        if lk == "content-length":
            try:
                length = int(v)
            except ValueError:
                length = None
            continue
        if lk in drop or lk in _REWRITTEN_DOWN:
            continue
        out.append((k, v))
    out.append(("X-Request-Id", rid))
    out.append(("X-Canary-Arm", arm))
    return out, length
