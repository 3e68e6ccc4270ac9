"""``https`` upstreams: TLS on 127.0.0.1 with certificates made here by ``openssl req``.

:class:`~canary.proxy.h1_transport.H1Transport` hands ``https`` URLs to the aiohttp transport,
which verifies the upstream's certificate against the system's trust store (``SSL_CERT_FILE``
names another one). A handshake that fails, for an untrusted certificate or a peer that hangs
up, is a connect error: nothing of the request was sent, so a failover may replay it.

The served case runs ``canary run`` as a process whose trust store is the test's certificate
(aiohttp reads the store when it is imported); the failures need no trust and run in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from canary.proxy import H1Transport, Timeouts
from canary.proxy.upstream import UpstreamConnectError, never_sent

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")

T = Timeouts(total=10.0, connect=5.0, read=5.0)
CHUNKS = [b'{"prediction": 1, ', b'"score": 0.5, ', b'"pad": "' + b"x" * 70_000 + b'"}']


def _certificate(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for IP 127.0.0.1 (its own trust anchor) and its key."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    directory = tmp_path_factory.mktemp("tls")
    return {name: _certificate(directory, name) for name in ("trusted", "untrusted")}


@contextlib.asynccontextmanager
async def tls_upstream(cert: Path, key: str | Path) -> AsyncIterator[str]:
    """An https model on 127.0.0.1 that streams its answer in three chunked pieces."""

    async def predict(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        for chunk in CHUNKS:
            await resp.write(chunk)
            await asyncio.sleep(0.01)
        await resp.write_eof()
        return resp

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", predict)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"https://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def hanging_up() -> AsyncIterator[str]:
    """A port that accepts connections and closes them before a TLS handshake completes."""

    async def close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)  # the ClientHello arrives
        writer.close()

    server = await asyncio.start_server(close, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"https://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


async def test_an_untrusted_certificate_is_a_connect_error_never_sent(
    certificates: dict[str, tuple[Path, Path]],
) -> None:
    t = H1Transport()
    try:
        async with tls_upstream(*certificates["untrusted"]) as url:
            with pytest.raises(UpstreamConnectError) as caught:
                await t.send("POST", url + "/predict", [("Host", "m")], b"{}", T)
            assert caught.value.kind == "connect" and never_sent(caught.value)
            assert "certificate" in str(caught.value).lower()
        async with hanging_up() as url:
            with pytest.raises(UpstreamConnectError) as caught:
                await t.send("POST", url + "/predict", [("Host", "m")], b"{}", T)
            assert never_sent(caught.value)
    finally:
        await t.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rollout(name: str, prefix: str, url: str) -> dict[str, object]:
    return {
        "name": name,
        "match": {"path_prefix": prefix},
        "production": {"endpoints": [url]},
        "candidate": {"endpoints": ["http://127.0.0.1:1"]},  # weight 0: never asked
        "steps": [{"weight": 0}],
    }


async def test_canary_streams_an_https_answer_and_counts_a_failed_handshake(
    certificates: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    trusted_cert, _ = certificates["trusted"]
    async with tls_upstream(*certificates["trusted"]) as good, \
            tls_upstream(*certificates["untrusted"]) as bad:  # fmt: skip
        proxy_port, admin_port = _free_port(), _free_port()
        config = {
            "proxy": {"listen": f"127.0.0.1:{proxy_port}"},
            "admin": {"listen": f"127.0.0.1:{admin_port}"},
            "state": {"backend": "memory"},
            "rollouts": [_rollout("good", "/good", good), _rollout("bad", "/bad", bad)],
        }
        path = tmp_path / "rollout.yaml"
        path.write_text(yaml.safe_dump(config))
        env = {**os.environ, "SSL_CERT_FILE": str(trusted_cert)}  # the one trusted certificate
        proc = subprocess.Popen(
            [sys.executable, "-m", "canary", "run", "-c", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        admin, proxy = f"http://127.0.0.1:{admin_port}", f"http://127.0.0.1:{proxy_port}"
        try:
            async with httpx.AsyncClient(timeout=10.0) as client:
                deadline = time.monotonic() + 20
                while True:
                    assert proc.poll() is None, proc.communicate()
                    with contextlib.suppress(httpx.HTTPError):
                        if (await client.get(admin + "/readyz")).status_code == 200:
                            break
                    assert time.monotonic() < deadline, "canary did not become ready"
                    await asyncio.sleep(0.1)

                r = await client.post(proxy + "/good/predict", json={"id": 1})
                assert r.status_code == 200, r.text
                assert r.content == b"".join(CHUNKS)
                assert r.headers["x-canary-arm"] == "production"
                assert "content-length" not in r.headers  # streamed back as it came, chunked

                r = await client.post(proxy + "/bad/predict", json={"id": 2})
                assert r.status_code == 502
                assert r.json()["error"] == "upstream production failed: connect"

                text = (await client.get(admin + "/metrics")).text
        finally:
            proc.terminate()
            out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0, out
    errors = {
        (s.labels["rollout"], s.labels["kind"]): s.value
        for family in text_string_to_metric_families(text)
        if family.name == "canary_upstream_errors"
        for s in family.samples
        if s.name.endswith("_total")
    }
    assert errors == {("bad", "connect"): 1.0}
