"""Prometheus for tests: parse a ``/metrics`` text, compute ``histogram_quantile`` as Prometheus
does, and run a real ``prometheus`` server on a free loopback port scraping a canary.

The real server is Debian's ``prometheus`` (``.ci/run`` installs it); :func:`running_prometheus`
skips, saying why, when the binary is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.redis_harness import free_port

START_TIMEOUT = 30.0  # seconds for prometheus to answer /-/ready
MISSING = (
    "prometheus is not on PATH: the dashboard queries and promql: metrics are not run "
    "through a real Prometheus "
    "(apt-get install prometheus; .ci/run installs it)"
)


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def samples(text: str) -> list[Sample]:
    """Every sample of a Prometheus text exposition (``_total``, ``_bucket`` ... included)."""
    return [
        Sample(s.name, dict(s.labels), float(s.value))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def select(found: Iterable[Sample], name: str, **labels: str) -> list[Sample]:
    return [
        s for s in found if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float:
    """Prometheus' ``histogram_quantile`` (promql/quantile.go, classic buckets) of cumulative
    ``{upper bound: count}``: the rank's bucket, linearly interpolated from its lower bound
    (0 for the first bucket); the highest finite bound when the rank falls in ``+Inf``."""
    bounds = sorted(buckets)
    if not bounds or bounds[-1] != math.inf:
        return math.nan
    total = buckets[math.inf]
    if total == 0:
        return math.nan
    rank = q * total
    b = next(i for i, bound in enumerate(bounds) if buckets[bound] >= rank)
    if b == len(bounds) - 1:  # in +Inf
        return bounds[-2]
    end = bounds[b]
    if b == 0:
        return end if end <= 0 else end * rank / buckets[end]
    start, below = bounds[b - 1], buckets[bounds[b - 1]]
    return start + (end - start) * (rank - below) / (buckets[end] - below)


def scraped_buckets(found: Iterable[Sample], family: str, **labels: str) -> dict[float, float]:
    """The cumulative buckets ``{le: count}`` of one series of histogram ``family``."""
    return {float(s.labels["le"]): s.value for s in select(found, family + "_bucket", **labels)}


class Prometheus:
    """A running ``prometheus`` process; :meth:`query` runs an instant query."""

    def __init__(self, url: str, client: httpx.AsyncClient) -> None:
        self.url = url
        self._client = client

    async def query(self, expr: str) -> dict[str, Any]:
        """The API's answer to ``expr`` (``status`` "success" or "error", ``data``...)."""
        r = await self._client.get(self.url + "/api/v1/query", params={"query": expr})
        answer: dict[str, Any] = r.json()
        return answer

    async def wait_for(self, expr: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Query ``expr`` until it returns a non-empty result (AssertionError after
        ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            answer = await self.query(expr)
            result = answer.get("data", {}).get("result")
            if answer.get("status") == "success" and result:
                return list(result)
            if time.monotonic() > deadline:
                raise AssertionError(f"{expr!r} returned nothing within {timeout}s: {answer}")
            await asyncio.sleep(0.5)


def _static_configs(target: str | Sequence[str], labels: Mapping[str, Mapping[str, str]]) -> str:
    """Flow-style YAML of one static config per target (its own labels); JSON is YAML."""
    targets = [target] if isinstance(target, str) else list(target)
    return ", ".join(
        json.dumps({"targets": [t], "labels": dict(labels.get(t, {}))}) for t in targets
    )


@contextlib.asynccontextmanager
async def running_prometheus(
    target: str | Sequence[str],
    *,
    interval: str = "1s",
    labels: Mapping[str, Mapping[str, str]] | None = None,
) -> AsyncIterator[Prometheus]:
    """A Prometheus on a free loopback port scraping ``target`` (``host:port``, path
    ``/metrics``; or several) every ``interval``, each target with its ``labels`` (target ->
    label -> value) added to its series; skips the test when the binary is missing."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip(MISSING)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="canary-prometheus-") as tmp:
        config = Path(tmp) / "prometheus.yml"
        config.write_text(
            "global:\n"
            f"  scrape_interval: {interval}\n"
            f"  evaluation_interval: {interval}\n"
            "scrape_configs:\n"
            "  - job_name: canary\n"
            f"    static_configs: [{_static_configs(target, labels or {})}]\n"
        )
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={Path(tmp) / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            async with httpx.AsyncClient(timeout=5.0) as client:
                deadline = time.monotonic() + START_TIMEOUT
                while True:
                    if proc.poll() is not None:
                        err = proc.stderr.read().decode() if proc.stderr else ""
                        raise AssertionError(f"prometheus exited ({proc.returncode}): {err}")
                    with contextlib.suppress(httpx.HTTPError):
                        if (await client.get(url + "/-/ready")).status_code == 200:
                            break
                    if time.monotonic() > deadline:
                        raise AssertionError(f"prometheus not ready within {START_TIMEOUT}s")
                    await asyncio.sleep(0.2)
                yield Prometheus(url, client)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()
