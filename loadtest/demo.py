"""The README's first command: a live canary rollout on the embedded default config.

Starts two fake model servers (production and a slightly faster, slightly pricier candidate),
starts canary in front of them, sends open-loop traffic with sticky users, walks the rollout's
steps (shadow, 5%, 25%, 50%) and prints, once a second, what canary measures per arm.
Everything runs on 127.0.0.1 and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from typing import Any

import httpx
import uvloop
import yaml

from canary.config import load_config_text
from canary.proxy import Weights
from canary.runtime import Runtime
from loadtest.fake_model import FakeModelConfig, running_fake_model
from loadtest.loadgen import LoadConfig, run_load

# The embedded defaults: the shape of configs/fraud-model.yaml on ephemeral loopback ports.
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
      cost: {per_hour: 3.10, replicas: 2}
    routing:
      sticky: {header: X-User-Id}
      override_header: X-Canary-Arm
      failover: true
      timeout: 5s
    steps:
      - shadow: {min_requests: 200}
      - {weight: 5, min_requests: 100}
      - {weight: 25}
      - {weight: 50}
    analysis:
      metrics:
        - {name: latency_p95, signal: latency, stat: p95, max_increase: 10%}
        - {name: errors, signal: error, stat: rate, max_increase: 0.5pp}
        - {name: cost, signal: cost, stat: mean, max_increase: 5%}
        - {name: inference, signal: "server_timing:inference", stat: mean, max_increase: 10%}
"""


def _fmt_ms(v: float) -> str:
    return f"{v * 1000:6.1f}" if v == v else "     -"


def _arm_line(arm: str, acc: Any) -> str:
    lat = acc.signals["latency"]
    cost = acc.signals.get("cost")
    cost_1k = f"{1000 * cost.mean:7.4f}" if cost is not None and cost.n else "      -"
    err = acc.errors / acc.observed if acc.observed else 0.0
    return (
        f"    {arm:<10} n={acc.observed:6d}  p50={_fmt_ms(lat.hist.quantile(0.5))} ms  "
        f"p95={_fmt_ms(lat.hist.quantile(0.95))} ms  errors={err:6.2%}  cost/1k={cost_1k}"
    )


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
        proxy_url = f"http://127.0.0.1:{runtime.proxy_port}"
        admin_url = f"http://127.0.0.1:{runtime.admin_port}"
        print(f"production fake model : {p_url}  (median 20 ms, accuracy 90%)")
        print(f"candidate  fake model : {c_url}  (median 18 ms, accuracy 92%)")
        print(f"canary proxy          : {proxy_url}")
        print(f"canary admin          : {admin_url}/metrics")
        print(f"rollout file (embedded defaults):\n{yaml.safe_dump(yaml.safe_load(text))}")
        rollout = config.rollouts[0]
        step_seconds = duration / len(rollout.steps)
        print(
            f"Sending {rate:.0f} req/s (Poisson, 500 sticky users) for {duration:.0f} s; each "
            f"step lasts {step_seconds:.0f} s.\nThis demo walks the steps on a timer; the "
            "statistical controller that advances, promotes or rolls back on evidence is "
            "the next milestone (see the README's status).\n"
        )
        load = asyncio.create_task(
            run_load(
                LoadConfig(
                    url=proxy_url + "/predict", rate=rate, duration=duration, users=500, seed=3
                )
            )
        )
        started = time.monotonic()
        step = -1
        try:
            while not load.done():
                elapsed = time.monotonic() - started
                want = min(int(elapsed / step_seconds), len(rollout.steps) - 1)
                if want != step:
                    step = want
                    s = rollout.steps[step]
                    runtime.proxy.set_weights(
                        rollout.name, Weights(candidate=s.candidate_weight, shadow=s.is_shadow)
                    )
                    label = "shadow (mirrored)" if s.is_shadow else f"{s.candidate_weight:g}%"
                    print(f"-- step {step + 1}/{len(rollout.steps)}: candidate {label}")
                acc = runtime.controller.totals(rollout.name)
                print(f"  t={elapsed:5.1f}s")
                print(_arm_line("production", acc.production))
                print(_arm_line("candidate", acc.candidate))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(load), 1.0)
            report = await load
            async with httpx.AsyncClient() as client:
                metrics = (await client.get(admin_url + "/metrics")).text
        finally:
            await runtime.stop()
    print("\nLoad generator summary:")
    print(report.format())
    print("\nA few lines of canary's /metrics:")
    for line in metrics.splitlines():
        if line.startswith(("canary_requests_total", "canary_traffic_weight_ratio",
                            "canary_cost_per_1k", "canary_shadow_requests_total")):  # fmt: skip
            print("  " + line)
    bad = report.errors
    print(f"\nDone: {report.completed} requests answered, errors seen by users: {bad or 'none'}.")
    return 0 if report.completed > 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=40.0, help="seconds of traffic")
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second")
    args = parser.parse_args(argv)
    if not 1 <= args.duration <= 600 or not 1 <= args.rate <= 5000:
        parser.error("--duration must be within 1..600 and --rate within 1..5000")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(demo(args.duration, args.rate))


if __name__ == "__main__":
    sys.exit(main())
