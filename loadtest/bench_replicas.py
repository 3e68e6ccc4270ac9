"""Replicas on one Redis: aggregate throughput and added latency of 1 and N canary processes.

Starts its own ``redis-server`` (free loopback port, persistence off), the upstream (nginx
when installed, else two fake model servers, as ``bench_proxy``), one canary process on Redis
database 1 (the 1-replica group) and N processes on database 0 (the N-replica group; they
elect a leader and share the totals), every data-plane feature on
(:func:`loadtest.bench_proxy.canary_config`, ``state.backend: redis``). Then, interleaved and
repeated like ``bench_proxy`` (same measurements, same noise handling):

* throughput: closed loop, one wrk process with N threads, each thread's connections on one
  replica's port (round-robin per connection; the direct and 1-replica configurations use the
  same threads and connections, all on one port), or the Python closed-loop client per port;
* latency: open loop, Poisson arrivals at ``--rate`` split evenly over the replicas (the sum of
  N Poisson streams at rate/N is one at rate), added p50/p99 against direct.

Prints per configuration the medians over repeats, their range, the run count, the ratio
N-replica/1-replica and the CPU count: on a 2-core machine N replicas cannot scale N-fold.

    .venv/bin/python -m loadtest.bench_replicas --quick
    .venv/bin/python -m loadtest.bench_replicas --repeats 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import uvloop
import yaml

from loadtest.bench_proxy import (
    HOST,
    REPO,
    Bench,
    ClientResult,
    CpuWindow,
    LatencyRun,
    Proc,
    Settings,
    ThroughputRun,
    canary_command,
    canary_config,
    choose_pinning,
    closed_loop,
    find_tool,
    free_port,
    open_loop,
    pct,
    progress,
    run_wrk,
    start_nginx,
    start_redis,
    summarize,
    upstream_nginx_body,
    wait_healthz,
    wait_port,
    wrk_script,
)


def wrk_spread_script(path: Path, ports: Sequence[int]) -> None:
    """bench_proxy's request mix, plus a ``setup`` that points wrk thread k at port k mod N."""
    wrk_script(path)
    listed = ", ".join(f'"{p}"' for p in ports)
    path.write_text(
        path.read_text()
        + f"""
local ports = {{{listed}}}
local nthreads = 0
setup = function(thread)
  nthreads = nthreads + 1
  thread.addr = wrk.lookup("{HOST}", ports[(nthreads - 1) % #ports + 1])[1]
end
"""
    )


@dataclass
class SpreadBench(Bench):
    """``Bench`` whose targets are sets of ports: the load is spread over them."""

    port_sets: dict[str, list[int]] = field(default_factory=dict)
    threads: int = 3
    scripts: dict[str, Path] = field(default_factory=dict)

    def measure_throughput(self, target: str) -> ThroughputRun:
        s = self.settings
        ports = self.port_sets[target]
        pids = self.proxy_pids.get(target, [])
        if self.wrk is not None:
            script = self.scripts[target]
            run_wrk_threads(self.wrk, script, ports[0], s.warmup, s.connections, self)
            with CpuWindow(pids) as cpu:
                rps, errors, cmd = run_wrk_threads(
                    self.wrk, script, ports[0], s.duration, s.connections, self
                )
            self.commands.setdefault("throughput", cmd)
        else:
            per = _split(s.connections, len(ports))
            self.runner.run(_gather_closed(ports, s.warmup, per))
            with CpuWindow(pids) as cpu:
                res = self.runner.run(_gather_closed(ports, s.duration, per))
            rps, errors = res.rate, res.errors
        return ThroughputRun(rps, errors, cpu.proxy, cpu.foreign)

    def measure_latency(self, target: str, seed: int) -> LatencyRun:
        s = self.settings
        ports = self.port_sets[target]
        per = _split(s.ol_connections, len(ports))
        rate = s.rate / len(ports)
        self.runner.run(_gather_open(ports, rate, s.warmup, per, seed + 1000))
        with CpuWindow([]) as cpu:
            res = self.runner.run(_gather_open(ports, rate, s.duration, per, seed))
        return LatencyRun(
            pct(res.latencies, 0.50),
            pct(res.latencies, 0.99),
            res.rate,
            res.errors,
            res.queued,
            cpu.foreign,
        )


def run_wrk_threads(
    wrk: str, script: Path, port: int, seconds: float, connections: int, bench: SpreadBench
) -> tuple[float, int, str]:
    """``bench_proxy.run_wrk`` with ``bench.threads`` threads (the script's ``setup`` points
    each at its port)."""
    return run_wrk(wrk, script, port, max(1, round(seconds)), connections, bench.pin, bench.threads)


def _split(total: int, n: int) -> list[int]:
    return [total // n + (1 if i < total % n else 0) for i in range(n)]


def _merge(results: Sequence[ClientResult]) -> ClientResult:
    out = ClientResult()
    for r in results:
        out.latencies += r.latencies
        out.completed += r.completed
        out.errors += r.errors
        out.queued += r.queued
        out.sent += r.sent
    out.window = max(r.window for r in results)
    return out


async def _gather_closed(ports: Sequence[int], duration: float, per: Sequence[int]) -> ClientResult:
    return _merge(
        await asyncio.gather(
            *(closed_loop(p, duration, c) for p, c in zip(ports, per, strict=True))
        )
    )


async def _gather_open(
    ports: Sequence[int], rate: float, duration: float, per: Sequence[int], seed: int
) -> ClientResult:
    runs = (
        open_loop(p, rate, duration, c, seed * 31 + i)
        for i, (p, c) in enumerate(zip(ports, per, strict=True))
    )
    return _merge(await asyncio.gather(*runs))


def _range(values: Sequence[float]) -> str:
    return f"{min(values):.0f}-{max(values):.0f}" if values else "-"


def report(bench: SpreadBench, targets: Sequence[str], replicas: int) -> list[str]:
    rows = {r.target: r for r in summarize(bench, targets)}
    direct = bench.latency["direct"]
    lines = [
        f"replicas on one Redis: {bench.settings.repeats} repeat(s) x {bench.settings.duration:g}"
        f" s, throughput closed loop c{bench.settings.connections} in {bench.threads} wrk"
        f" threads, latency open loop {bench.settings.rate:g} req/s; medians; CPUs:"
        f" {os.cpu_count()}",
        f"{'config':<10} {'req/s':>7} {'range':>13} {'added p50 ms':>12} {'range':>13}"
        f" {'added p99 ms':>12} {'range':>13} {'proxy CPU':>9} {'errors':>6} {'runs':>4}"
        f" {'disturbed':>9}",
    ]
    for t in targets:
        r = rows[t]
        tr, lr = bench.throughput[t], bench.latency[t]
        d50 = [(a.p50 - d.p50) * 1e3 for a, d in zip(lr, direct, strict=True)]
        d99 = [(a.p99 - d.p99) * 1e3 for a, d in zip(lr, direct, strict=True)]
        added = t != "direct"
        lines.append(
            f"{t:<10} {r.rps:7.0f} {_range([x.rps for x in tr]):>13}"
            f" {r.added_p50_ms if added else float('nan'):12.3f}"
            f" {(f'{min(d50):.3f}-{max(d50):.3f}' if added else '-'):>13}"
            f" {r.added_p99_ms if added else float('nan'):12.3f}"
            f" {(f'{min(d99):.3f}-{max(d99):.3f}' if added else '-'):>13}"
            f" {('-' if not added else f'{r.proxy_cpu * 100:.0f}%'):>9} {r.errors:>6}"
            f" {len(tr):>4} {r.noisy:>4}/{r.measurements}"
        )
    one, many = bench.throughput.get("canary-1"), bench.throughput.get(f"canary-{replicas}")
    if one and many:
        per_run = [m.rps / o.rps for o, m in zip(one, many, strict=True)]
        lines.append(
            f"ratio {replicas}-replica/1-replica req/s: median {statistics.median(per_run):.2f}"
            f" (per repeat {', '.join(f'{x:.2f}' for x in per_run)}); {os.cpu_count()} CPUs,"
            f" so {replicas} replicas cannot scale {replicas}x here"
        )
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_replicas", description=__doc__)
    p.add_argument("--quick", action="store_true", help="short run (~1 min)")
    p.add_argument("--duration", type=float, help="seconds per measurement (default 6, quick 2)")
    p.add_argument("--repeats", type=int, help="repeats (default 5, quick 2)")
    p.add_argument("--replicas", type=int, default=3, help="the N of the N-replica group")
    p.add_argument("--rate", type=float, default=1000.0, help="open-loop arrivals per second")
    p.add_argument("--connections", type=int, default=63, help="closed-loop connections")
    p.add_argument("--pin", choices=("auto", "none"), default="auto")
    p.add_argument("--upstream", choices=("auto", "fake"), default="auto",
                   help="auto: nginx when installed, else the fake model server")  # fmt: skip
    p.add_argument("--quiet-wait", type=float, default=10.0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    n = args.replicas
    s = Settings(
        duration=args.duration or (2.0 if args.quick else 6.0),
        repeats=args.repeats or (2 if args.quick else 5),
        rate=args.rate,
        connections=max(n, args.connections - args.connections % n),
        ol_connections=max(n, 32 - 32 % n),
        warmup=0.5 if args.quick else 1.0,
        quick=args.quick,
        quiet_wait=args.quiet_wait,
    )
    if not (0.2 <= s.duration <= 120 and 1 <= s.repeats <= 50 and 2 <= n <= 8):
        print("duration must be 0.2..120 s, repeats 1..50, replicas 2..8", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    tmp = Path(tempfile.mkdtemp(prefix="canary-bench-replicas-"))
    if os.geteuid() == 0:
        tmp.chmod(0o755)
    procs: list[Proc] = []
    try:
        progress(f"{os.cpu_count()} CPUs")
        nginx = find_tool("nginx") if args.upstream == "auto" else None
        wrk = find_tool("wrk")
        pin = choose_pinning(args.pin)
        if pin.generator is not None:
            os.sched_setaffinity(0, {int(pin.generator)})
        progress(f"pinning: {pin.describe()} (all replicas share the proxy CPU)")
        prod, cand = free_port(), free_port()
        if nginx is not None:
            body = upstream_nginx_body([prod, cand])
            procs.append(start_nginx("upstream", nginx, tmp, body, pin.upstream, pin, [prod, cand]))
            progress("upstream: nginx")
        else:
            for name, port in (("production", prod), ("candidate", cand)):
                cmd = pin.wrap(
                    pin.upstream,
                    [sys.executable, "-m", "loadtest.fake_model", "--port", str(port),
                     "--model", name, "--latency", "fixed", "--latency-median", "0"],
                )  # fmt: skip
                proc = Proc(f"fake-{name}", cmd, tmp, cwd=REPO)
                procs.append(proc)
                wait_port(port, 15.0, proc.popen)
            progress("upstream: fake model servers")
        redis_proc, redis_port = start_redis(tmp, pin.upstream, pin)
        procs.append(redis_proc)
        progress(f"redis-server on {HOST}:{redis_port} (persistence off)")
        port_sets: dict[str, list[int]] = {"direct": [prod]}
        pids: dict[str, list[int]] = {}
        for group, count, db in (("canary-1", 1, 1), (f"canary-{n}", n, 0)):
            port_sets[group], pids[group] = [], []
            for k in range(count):
                cport, aport = free_port(), free_port()
                home = tmp / f"{group}-{k}"
                home.mkdir()
                state = {"backend": "redis", "url": f"redis://{HOST}:{redis_port}/{db}"}
                cfg = home / "canary.yaml"
                cfg.write_text(yaml.safe_dump(canary_config(cport, aport, prod, cand, state)))
                cmd = pin.wrap(
                    pin.proxy, [*canary_command(), "--log-level", "WARNING", "run", "-c", str(cfg)]
                )
                progress(f"starting {group} #{k + 1}: {shlex.join(cmd)}")
                proc = Proc(f"{group}-{k}", cmd, tmp, cwd=REPO)
                procs.append(proc)
                wait_healthz(aport, proc)
                port_sets[group].append(cport)
                pids[group].append(proc.pid)
        targets = ["direct", "canary-1", f"canary-{n}"]
        scripts = {}
        for t in targets:
            # the same n threads for every configuration; only where they point differs
            scripts[t] = tmp / f"{t}.lua"
            wrk_spread_script(
                scripts[t], port_sets[t] * n if len(port_sets[t]) == 1 else port_sets[t]
            )
        progress(f"measuring {', '.join(targets)}: {s.repeats} repeat(s) x {s.duration:g} s")
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            bench = SpreadBench(
                s, pin, tmp, {t: p[0] for t, p in port_sets.items()}, wrk, tmp / "unused.lua",
                pids, runner, port_sets=port_sets, threads=n, scripts=scripts,
            )  # fmt: skip
            bench.noise_budget = 10.0 if s.quick else 75.0
            bench.run(targets)
        print()
        for line in report(bench, targets, n):
            print(line)
        return 0
    except KeyboardInterrupt:
        progress("interrupted")
        return 130
    except RuntimeError as exc:
        progress(f"benchmark failed: {exc}")
        return 2
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
