"""The one place that wires config, proxy, admin app and (later) store and controller."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from pathlib import Path

from aiohttp import web

from canary.admin import make_admin_app
from canary.config import Config, load_config
from canary.errors import CanaryError, ConfigError
from canary.metrics import Metrics
from canary.observe import Recorder
from canary.proxy import AiohttpTransport, Proxy

log = logging.getLogger("canary.runtime")


class Runtime:
    """Start and stop the proxy port and the admin port for one config."""

    def __init__(self, config: Config, config_path: str | Path | None = None) -> None:
        self.config = config
        self.config_path = Path(config_path) if config_path is not None else None
        self.metrics = Metrics()
        self.recorder = Recorder()
        self.transport = AiohttpTransport(
            limit_per_host=max(r.routing.max_connections for r in config.rollouts)
        )
        self.proxy = Proxy(config, self.transport, self.recorder, self.metrics)
        self._runners: list[web.BaseRunner] = []
        self._ready = False
        self.proxy_port: int | None = None
        self.admin_port: int | None = None

    def readiness(self) -> tuple[bool, str]:
        return (True, "serving") if self._ready else (False, "starting")

    async def start(self) -> None:
        pcfg = self.config.proxy
        server = web.Server(
            self.proxy.handle,
            max_line_size=pcfg.max_header_size,
            max_field_size=pcfg.max_header_size,
            auto_decompress=False,  # request bodies pass through as the client encoded them
            keepalive_timeout=75.0,
            access_log=None,
        )
        proxy_runner = web.ServerRunner(server, handle_signals=False)
        await proxy_runner.setup()
        self._runners.append(proxy_runner)
        host, port = pcfg.listen
        proxy_site = web.TCPSite(proxy_runner, host, port, backlog=2048, reuse_address=True)
        await proxy_site.start()
        self.proxy_port = _bound_port(proxy_runner)

        admin_app = make_admin_app(self.proxy, self.metrics, self.readiness)
        admin_runner = web.AppRunner(admin_app, handle_signals=False, access_log=None)
        await admin_runner.setup()
        self._runners.append(admin_runner)
        ahost, aport = self.config.admin.listen
        await web.TCPSite(admin_runner, ahost, aport, reuse_address=True).start()
        self.admin_port = _bound_port(admin_runner)
        self._ready = True
        for r in self.config.rollouts:
            w = self.proxy.routes[r.name].weights
            log.info(
                "rollout %s: candidate %.1f%%%s; proxy on %s:%s, admin on %s:%s",
                r.name,
                w.candidate,
                " (shadow)" if w.shadow else "",
                host,
                self.proxy_port,
                ahost,
                self.admin_port,
            )

    def reload(self) -> None:
        """Re-read the config file; an invalid file is rejected and the running config stays."""
        if self.config_path is None:
            log.warning("reload requested but canary was not started from a file")
            return
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("reload rejected, keeping the running config: %s", exc)
            return
        if new.proxy.listen != self.config.proxy.listen or new.admin != self.config.admin:
            log.warning("listen addresses changed: restart canary to apply them")
        self.proxy.apply_config(new)
        self.config = new
        log.info("configuration reloaded from %s", self.config_path)

    async def stop(self) -> None:
        self._ready = False
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        await self.proxy.close()
        await self.transport.close()


def _bound_port(runner: web.BaseRunner) -> int:
    for addr in runner.addresses:
        if isinstance(addr, tuple):
            return int(addr[1])
    raise CanaryError("server is not listening")


async def serve(config: Config, config_path: str | Path | None = None) -> None:
    """Run until SIGINT or SIGTERM; SIGHUP reloads the config file."""
    runtime = Runtime(config, config_path)
    await runtime.start()
    # Everything allocated at start-up lives for the whole run: keep it out of the collector's
    # way, and collect young objects less often (DESIGN.md "Data plane notes": ~+11% req/s).
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, runtime.reload)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await runtime.stop()
