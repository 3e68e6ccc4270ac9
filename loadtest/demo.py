"""The README's first command: a live canary rollout on the embedded default config.

Starts two fake model servers (production, and a candidate that is about 10% faster and runs
on slightly pricier replicas), starts canary in front of them with its rollout controller,
sends open-loop traffic with sticky users and lets the statistics drive the rollout: shadow,
5%, 25% and 50%, then promote or roll back. Once a second it prints the phase, step, weights,
samples per arm and every metric's verdict with its interval; each decision is printed as it
happens, with its reason. Everything runs on 127.0.0.1 and stops by itself: at the decision,
or at ``--duration`` (exit status 1 when no decision was reached by then).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from typing import Any

import httpx
import uvloop
import yaml

from canary.admin.views import rollout_detail
from canary.config import load_config_text
from canary.runtime import Runtime
from loadtest.fake_model import FakeModelConfig, running_fake_model
from loadtest.scenarios import TERMINAL, Traffic, Watcher

# The embedded defaults: the shape of configs/fraud-model.yaml on ephemeral loopback ports,
# with steps short enough for a demo: each weight step needs a few hundred candidate requests
# and the last one waits until every metric is provably within its tolerance (at 300 req/s
# the errors test needs the longest, about 2000 candidate requests at 0 errors per arm).
DEFAULT_ROLLOUT = """
proxy: {listen: "127.0.0.1:0"}
admin: {listen: "127.0.0.1:0"}
state: {backend: memory}
rollouts:
  - name: fraud-model
    prediction: json:prediction
    production:
      endpoints: [PRODUCTION_URL]
      cost: {per_hour: 2.40, replicas: 2}
    candidate:
      endpoints: [CANDIDATE_URL]
      cost: {per_hour: 2.60, replicas: 2}
    routing:
      sticky: {header: X-User-Id}
      override_header: X-Canary-Arm
      failover: true
      timeout: 5s
    steps:
      - shadow: {min_requests: 300, min_duration: 3s}
      - {weight: 5, min_requests: 100}
      - {weight: 25, min_requests: 300}
      - {weight: 50}
    analysis:
      interval: 250ms
      alpha: 0.05
      burn_in: 100
      max_duration: 10m
      metrics:
        - {name: latency_p95, signal: latency, stat: p95, max_increase: 10%}
        - {name: errors, signal: error, stat: rate, max_increase: 0.5pp}
        - {name: cost, signal: cost, stat: mean, max_increase: 10%}
        - {name: inference, signal: "server_timing:inference", stat: mean, max_increase: 10%}
"""
ROLLOUT = "fraud-model"


async def demo(duration: float, rate: float) -> int:
    production = FakeModelConfig(model="fraud-v1", latency_median=0.020, latency_sigma=0.35,
                                 accuracy=0.90, cost=0.0010, seed=1)  # fmt: skip
    candidate = FakeModelConfig(model="fraud-v2", latency_median=0.018, latency_sigma=0.35,
                                accuracy=0.92, cost=0.0012, seed=2)  # fmt: skip
    async with running_fake_model(production) as p_url, running_fake_model(candidate) as c_url:
        text = DEFAULT_ROLLOUT.replace("PRODUCTION_URL", p_url).replace("CANDIDATE_URL", c_url)
        config = load_config_text(text, "embedded defaults")
        runtime = Runtime(config)
        await runtime.start()
        try:
            detail, traffic, metrics = await _drive(runtime, text, p_url, c_url, duration, rate)
        finally:
            await runtime.stop()
    return _summary(detail, traffic, metrics)


async def _drive(
    runtime: Runtime, text: str, p_url: str, c_url: str, duration: float, rate: float
) -> tuple[dict[str, Any], Traffic, str]:
    """Send the traffic and print progress until a decision or ``duration``."""
    proxy_url = f"http://127.0.0.1:{runtime.proxy_port}"
    admin_url = f"http://127.0.0.1:{runtime.admin_port}"
    print(f"production fake model : {p_url}  (median 20 ms, $2.40/h x 2 replicas)")
    print(f"candidate  fake model : {c_url}  (median 18 ms, $2.60/h x 2 replicas)")
    print(f"canary proxy          : {proxy_url}")
    print(f"canary admin          : {admin_url}/metrics, {admin_url}/api/v1/rollouts")
    print(f"rollout file (embedded defaults):\n{yaml.safe_dump(yaml.safe_load(text))}")
    print(
        f"Sending {rate:g} req/s (Poisson, 500 sticky users) for at most {duration:g} s. "
        "The controller advances, promotes or rolls back on the evidence; intervals are\n"
        "candidate vs production (ratios as % change, rates in pp), OK = provably within "
        "the tolerance, WORSE = provably beyond it.\n",
        flush=True,
    )
    traffic = Traffic(
        proxy_url + "/predict",
        rate=rate,
        duration=duration,
        requests=int(rate * duration * 1.2) + 1,
        seed=3,
        users=500,
    )

    async def fetch() -> dict[str, Any]:
        return rollout_detail(runtime.controller.view(ROLLOUT))

    watcher = Watcher(fetch, sys.stdout)
    detail: dict[str, Any] = {}
    try:
        traffic.start()
        while not traffic.done:
            detail = await watcher.poll(traffic.first_sent)
            if detail["phase"] in TERMINAL:
                break
            await asyncio.sleep(0.1)
        if detail.get("phase") in TERMINAL:
            # One more second of traffic, to show the new weights serving.
            await asyncio.sleep(1.0)
            watcher.last_print = -math.inf
            detail = await watcher.poll(traffic.first_sent)
    finally:
        await traffic.stop()
    async with httpx.AsyncClient() as client:
        metrics = (await client.get(admin_url + "/metrics")).text
    return detail, traffic, metrics


def _summary(detail: dict[str, Any], traffic: Traffic, metrics: str) -> int:
    print("\nA few lines of canary's /metrics:")
    shown = ("canary_requests_total", "canary_traffic_weight_ratio", "canary_rollout_phase",
             "canary_decisions_total")  # fmt: skip
    for line in metrics.splitlines():
        if line.startswith(shown) and not line.rstrip().endswith(" 0.0"):
            print("  " + line)
    phase = detail.get("phase", "?")
    decided = phase in TERMINAL
    entry = next(
        (
            d
            for d in reversed(detail.get("decisions", []))
            if d["action"] in ("PROMOTE", "ROLLBACK")
        ),
        None,
    )
    errors = ", ".join(f"{k}={v}" for k, v in sorted(traffic.errors.items())) or "none"
    print("\nSummary")
    if decided and entry is not None:
        took = entry["at"] - (traffic.first_sent or entry["at"])
        samples = entry["samples"]
        print(f"  outcome            {phase} after {took:.1f} s of traffic")
        print(
            f"  requests           {samples['candidate']} candidate requests observed "
            f"(shadow mirrors included), {samples['production'] + samples['candidate']} in all "
            "at the decision"
        )
        print(f"  reason             {entry['reason']}")
    else:
        print(f"  outcome            no decision within the run ({phase}): {detail.get('status')}")
    print(f"  answered           {sum(traffic.answered.values())} requests: "
          + ", ".join(f"{k} {v}" for k, v in sorted(traffic.answered.items())))  # fmt: skip
    print(f"  users' errors      {errors}")
    return 0 if decided else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--duration", type=float, default=90.0, help="upper bound on seconds of traffic"
    )
    parser.add_argument("--rate", type=float, default=300.0, help="requests per second")
    args = parser.parse_args(argv)
    if not 1 <= args.duration <= 600 or not 1 <= args.rate <= 5000:
        parser.error("--duration must be within 1..600 and --rate within 1..5000")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(demo(args.duration, args.rate))


if __name__ == "__main__":
    sys.exit(main())
