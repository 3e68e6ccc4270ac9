"""The reference point of the proxy benchmark: a minimal aiohttp + uvloop reverse proxy.

Issue 2 states its latency targets next to "a minimal 60-line aiohttp+uvloop proxy" measured
on this kind of machine. This is that proxy, so ``bench_proxy`` can measure it in the same run
as canary: no routing, no observation, no timeouts beyond aiohttp's, buffered bodies, one
upstream. It is a yardstick, not a product; it only listens on 127.0.0.1.

    python -m loadtest.minimal_proxy --port 8090 --upstream http://127.0.0.1:8001
"""

from __future__ import annotations

import argparse
import asyncio

import aiohttp
import uvloop
from aiohttp import web

_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "host"})


async def serve(port: int, upstream: str) -> None:
    session = aiohttp.ClientSession(
        auto_decompress=False, skip_auto_headers=("Accept-Encoding", "User-Agent")
    )

    async def handle(request: web.BaseRequest) -> web.Response:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        async with session.request(
            request.method, upstream + request.raw_path, data=body, headers=headers
        ) as resp:
            data = await resp.read()
            out = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP}
            return web.Response(status=resp.status, body=data, headers=out)

    runner = web.ServerRunner(web.Server(handle), handle_signals=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        await asyncio.Event().wait()
    finally:
        await session.close()
        await runner.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True, help="http://127.0.0.1:PORT")
    args = p.parse_args()
    if not args.upstream.startswith(("http://127.0.0.1", "http://localhost")):
        p.error("the reference proxy only forwards to 127.0.0.1 / localhost")
    uvloop.run(serve(args.port, args.upstream.rstrip("/")))


if __name__ == "__main__":
    main()
