"""Operator commands on a follower go to the leader: the address it advertises, and what a
follower answers when the leader does not advertise one or does not answer."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from canary.admin import make_admin_app
from canary.config import load_config_text
from canary.controller.leadership import admin_url_of, holder_name
from canary.errors import NotLeader
from canary.metrics import Metrics
from canary.runtime import ADVERTISE_ENV, advertised_admin_url
from tests.redis_harness import free_port


def _config(listen: str) -> Any:
    return load_config_text(
        f"""\
admin: {{listen: '{listen}', allow_public_without_token: true}}
rollouts:
  - name: m
    production: {{endpoints: [http://127.0.0.1:1]}}
    candidate: {{endpoints: [http://127.0.0.1:2]}}
    steps: [{{weight: 5}}]
"""
    )


def test_the_advertised_admin_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ADVERTISE_ENV, raising=False)
    assert advertised_admin_url(_config("127.0.0.1:9901")) == "http://127.0.0.1:9901"
    assert advertised_admin_url(_config("127.0.0.1:0")) is None  # ephemeral: unknown
    wildcard = advertised_admin_url(_config("0.0.0.0:9901"))
    assert wildcard is not None and "0.0.0.0" not in wildcard and wildcard.endswith(":9901")
    monkeypatch.setenv(ADVERTISE_ENV, "http://canary-2.canary:9901/")
    assert advertised_admin_url(_config("0.0.0.0:9901")) == "http://canary-2.canary:9901"


def test_a_holder_name_carries_its_admin_url() -> None:
    assert admin_url_of(holder_name("http://10.0.0.7:9901")) == "http://10.0.0.7:9901"
    assert admin_url_of(holder_name()) is None
    assert admin_url_of(None) is None and admin_url_of("host:1:abc@not-a-url") is None


def test_with_an_admin_token_only_a_signed_address_is_forwarded_to() -> None:
    """Whoever can write the store but does not hold the admin token cannot make followers
    send commands (and the caller's token) to an address of their choosing."""
    url = "http://10.0.0.7:9901"
    signed = holder_name(url, key="s3cret")
    assert admin_url_of(signed, "s3cret") == url
    assert admin_url_of(signed) == url  # without a token there is nothing to protect
    assert admin_url_of(signed, "other") is None
    assert admin_url_of(holder_name(url), "s3cret") is None  # unsigned
    forged = signed.replace("10.0.0.7", "203.0.113.9")
    assert admin_url_of(forged, "s3cret") is None


class _Follower:
    """A controller that does not lead (only what the command path asks of it)."""

    leadership = None

    def __init__(self, admin_url: str | None) -> None:
        self.admin_url = admin_url

    def names(self) -> list[str]:
        return ["m"]

    async def command(self, name: str, action: str, reason: str | None = None) -> Any:
        raise NotLeader("not the leader", leader="other", admin_url=self.admin_url)


class _Routing:
    def routing(self, rollout: str) -> dict[str, Any] | None:
        return None

    def input_health(self, rollout: str) -> dict[str, Any] | None:
        return None


async def _client(admin_url: str | None) -> TestClient[web.Request, web.Application]:
    app = make_admin_app(
        _Routing(),
        Metrics(),
        lambda: (True, "serving"),
        controller=_Follower(admin_url),  # type: ignore[arg-type]
    )
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


async def test_a_follower_without_a_known_leader_address_answers_409() -> None:
    client = await _client(None)
    try:
        r = await client.post("/api/v1/rollouts/m/pause", json={})
        assert r.status == 409 and "not the leader" in (await r.json())["error"]
    finally:
        await client.close()


async def test_a_leader_that_does_not_answer_is_a_502_naming_it() -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    client = await _client(dead)
    try:
        r = await client.post("/api/v1/rollouts/m/pause", json={"reason": "x"})
        assert r.status == 502
        assert dead in (await r.json())["error"]
    finally:
        await client.close()


async def test_a_forwarded_command_is_never_forwarded_again() -> None:
    """Two followers whose views of the lease are stale would pass a command back and forth:
    one forwarded to a process that does not lead is refused there (409, retry)."""
    seen: list[str] = []

    async def other(request: web.Request) -> web.Response:  # would be the next hop
        seen.append(request.headers.get("X-Canary-Forwarded", ""))
        return web.json_response({"ok": True})

    hop = web.Application()
    hop.router.add_post("/api/v1/rollouts/m/pause", other)
    server = TestServer(hop)
    await server.start_server()
    client = await _client(str(server.make_url("")).rstrip("/"))
    try:
        r = await client.post("/api/v1/rollouts/m/pause", json={})  # from an operator
        assert r.status == 200 and seen == ["1"]  # forwarded once, marked
        r = await client.post(
            "/api/v1/rollouts/m/pause", json={}, headers={"X-Canary-Forwarded": "1"}
        )
        assert r.status == 409 and "retry" in (await r.json())["error"]
        assert seen == ["1"]  # not forwarded a second time
    finally:
        await client.close()
        await server.close()
