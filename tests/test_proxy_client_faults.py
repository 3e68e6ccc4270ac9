"""A streamed request body that fails is the client's fault (a ClientError), never the upstream's.

Bodies without a Content-Length (or longer than the replay buffer) are streamed upstream as
they arrive; when the client breaks a limit or the framing on the way, canary answers 413, 408
or 400 itself, counts a rejection, and records no observation and no upstream error for the
arm the request was going to.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from canary.errors import ClientError, UpstreamError
from canary.proxy.h1_server import BadRequestBody
from canary.proxy.server import _ClientBodyFailed, _ClientStalled
from canary.proxy.upstream import RequestBodyTooLarge
from tests.conftest import Canary, fake_pair, rollout_config, running_canary
from tests.upstream_harness import read_response

HEAD = b"POST /echo HTTP/1.1\r\nHost: m\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (RequestBodyTooLarge, 413),
        (_ClientStalled, 408),
        (_ClientBodyFailed, 400),
        (BadRequestBody, 400),
    ],
)
def test_client_faults_are_client_errors(error: type[ClientError], status: int) -> None:
    assert issubclass(error, ClientError) and not issubclass(error, UpstreamError)
    assert error.status == status


async def _send(can: Canary, *parts: bytes, pause: float = 0.0) -> int:
    """Send ``parts`` on one connection (pausing before the last); the answer's status."""
    assert can.runtime.proxy_port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", can.runtime.proxy_port)
    try:
        for i, part in enumerate(parts):
            if pause and i == len(parts) - 1:
                await asyncio.sleep(pause)
            writer.write(part)
            await writer.drain()
        return (await asyncio.wait_for(read_response(reader, "POST"), 10)).status
    finally:
        writer.close()


def _arms(can: Canary) -> dict[str, Any]:
    """What the rollout's arms counted: requests by class, upstream errors by kind."""
    arms = can.runtime.proxy.routes["m"].counters.arms
    return {arm: (dict(c.requests), dict(c.errors)) for arm, c in arms.items()}


async def test_streamed_body_faults_are_answered_and_counted_as_rejections() -> None:
    async with fake_pair() as (p, c):
        cfg = rollout_config([p], [c])
        cfg["proxy"].update(max_body_size="64KiB", replay_buffer="16KiB", client_timeout="1s")
        async with running_canary(cfg) as can:
            chunk = b"%x\r\n%b\r\n" % (30_000, b"y" * 30_000)
            too_large = await _send(can, HEAD, chunk, chunk, chunk)
            stalled = await _send(can, HEAD, chunk, b"0\r\n\r\n", pause=1.5)
            broken = await _send(can, HEAD, chunk, b"zz-not-hex\r\n")
            rejected = dict(can.runtime.metrics.counters.rejected)
            arms = _arms(can)
    assert (too_large, stalled, broken) == (413, 408, 400)
    assert rejected["body_too_large"] == 1 and rejected["client_timeout"] == 1
    assert rejected["bad_request"] >= 1  # the server's own count of the framing error, too
    assert arms == {"production": ({}, {}), "candidate": ({}, {})}
