"""Microbenchmark: what OpenAI model routing adds to a request on the proxy's hot path.

Per request body size it times, in one process with nothing else running in it:

* ``json.loads``: the reference (what any JSON-reading proxy pays);
* ``find``: :func:`canary.proxy.openai.find_model`, the scan canary does (UTF-8 decode, the C
  scanner over every top-level value, byte offsets of ``model``);
* ``find+rename``: the scan plus the splice of an arm's name (a rollout with ``model:`` on
  an arm: one more copy of the body);
* ``route``: the route table's two lookups (path/host, then the model) minus the one every
  request pays anyway.

``--end-to-end`` also measures whole requests: two ``canary run`` processes in front of the same
two fake models (one model-less rollout; one with a ``match.model`` rule and both arms renamed),
loaded in turn by a closed loop of chat requests (1.3 KiB, ``model`` after the messages as the
``openai`` client writes it); the figure is canary's CPU time per request (``/proc``), median
over repeats, and the difference between the two.

Each figure is the median over ``--repeats`` runs (default 7) of the mean CPU time per call
in a run of about ``--seconds`` (default 0.2 s); the three timings of a body alternate within
each run. Run::

    .venv/bin/python -m loadtest.bench_openai
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

from canary.config import MatchConfig
from canary.proxy.openai import find_model, model_json
from canary.proxy.routing import RouteTable
from loadtest.bench_proxy import HOST, Proc, _Conn, _connect, cpu_ticks, free_port, wait_port

__all__ = ["bodies", "main", "measure"]


def bodies() -> dict[str, bytes]:
    """Chat-completion bodies of growing size, as the ``openai`` client sends them (messages
    first, ``model`` after them); one with non-ASCII text (byte offsets are recomputed)."""

    def chat(chars: int, text: str = "How do I canary a model? ") -> bytes:
        content = (text * (chars // len(text) + 1))[:chars]
        doc = {
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": content},
            ],
            "model": "llama-3.1-8b",
            "stream": True,
            "max_tokens": 256,
        }
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()

    return {
        "chat 200 B": chat(60),
        "chat 4 KiB": chat(4000),
        "chat 64 KiB": chat(64_000),
        "chat 512 KiB": chat(512_000),
        "chat 4 KiB non-ASCII": chat(2000, "Wie rollt man ein Modell aus? ü 🙂 "),
    }


def measure(fns: dict[str, Callable[[], object]], seconds: float, repeats: int) -> dict[str, float]:
    """Median over ``repeats`` of the mean CPU seconds per call of each function.

    The functions are run in turn within each repeat (so a burst of load elsewhere hits all of
    them alike), each for about ``seconds``, timed with this process's CPU clock (time spent
    descheduled by other processes on the machine does not count).
    """
    calls = {}
    for label, fn in fns.items():
        t0 = time.process_time()
        n = 0
        while time.process_time() - t0 < seconds / 10:
            fn()
            n += 1
        calls[label] = max(1, n * 10)
    means: dict[str, list[float]] = {label: [] for label in fns}
    for _ in range(repeats):
        for label, fn in fns.items():
            n = calls[label]
            start = time.process_time()
            for _ in range(n):
                fn()
            means[label].append((time.process_time() - start) / n)
    return {label: statistics.median(m) for label, m in means.items()}


_CHAT = json.dumps(
    {
        "messages": [{"role": "user", "content": "How do I canary a model? " * 50}],
        "model": "llama-3.1-8b",
        "max_tokens": 1,
    },
    separators=(",", ":"),
).encode()


def _config(proxy: int, admin: int, p: str, c: str, routed: bool) -> dict[str, object]:
    rollout: dict[str, object] = {
        "name": "llama",
        "production": {"endpoints": [p]},
        "candidate": {"endpoints": [c]},
        "steps": [{"weight": 50}],
    }
    if routed:
        rollout["match"] = {"model": "llama-3.1-8b"}
        rollout["production"] = {"endpoints": [p], "model": "llama-3.1-8b-prod"}
        rollout["candidate"] = {"endpoints": [c], "model": "llama-3.1-8b-ft2"}
    return {
        "proxy": {"listen": f"{HOST}:{proxy}"},
        "admin": {"listen": f"{HOST}:{admin}"},
        "state": {"backend": "memory"},
        "rollouts": [rollout],
    }


async def _closed_loop(port: int, seconds: float, connections: int) -> tuple[int, int]:
    """Send the chat request on ``connections`` keep-alive connections for ``seconds``;
    return (answered 200, other)."""
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(_CHAT)}\r\n\r\n"
    ).encode() + _CHAT
    counts = [0, 0]
    stop = False

    def on_done(conn: _Conn, status: int, now: float) -> None:
        counts[0 if status == 200 else 1] += 1
        if not stop and not conn.lost:
            conn.send(request, now)

    conns = await _connect(port, connections, on_done)
    for conn in conns:
        conn.send(request, time.perf_counter())
    await asyncio.sleep(seconds)
    stop = True
    await asyncio.sleep(0.2)  # the last answers
    for conn in conns:
        if conn.transport is not None:
            conn.transport.close()
    return counts[0], counts[1]


def end_to_end(repeats: int, seconds: float, connections: int) -> dict[str, float]:
    """canary's CPU microseconds per request, model-less vs model-routed, median of repeats."""
    python = sys.executable
    procs: list[Proc] = []
    out: dict[str, list[float]] = {"plain": [], "routed": []}
    with tempfile.TemporaryDirectory(prefix="bench-openai-") as tmp:
        logdir = Path(tmp)
        try:
            urls = []
            for name in ("prod", "cand"):
                port = free_port()
                cmd = [python, "-m", "loadtest.fake_model", "--port", str(port), "--model",
                       name, "--latency", "fixed", "--latency-median", "0", "--ttft", "0",
                       "--inter-token", "0", "--completion-tokens", "1"]  # fmt: skip
                procs.append(Proc(f"fake-{name}", cmd, logdir))
                wait_port(port, 20, procs[-1].popen)
                urls.append(f"http://{HOST}:{port}")
            canaries: dict[str, tuple[Proc, int]] = {}
            for variant in out:
                proxy, admin = free_port(), free_port()
                cfg = logdir / f"{variant}.yaml"
                cfg.write_text(
                    yaml.safe_dump(_config(proxy, admin, urls[0], urls[1], variant == "routed"))
                )
                proc = Proc(f"canary-{variant}", [python, "-m", "canary", "run", "-c", str(cfg)],
                            logdir)  # fmt: skip
                procs.append(proc)
                wait_port(proxy, 30, proc.popen)
                canaries[variant] = (proc, proxy)
            for _, port in canaries.values():  # warm-up
                asyncio.run(_closed_loop(port, 0.5, connections))
            for r in range(repeats):
                order = list(canaries) if r % 2 == 0 else list(reversed(canaries))
                for variant in order:
                    proc, port = canaries[variant]
                    before = cpu_ticks([proc.pid])
                    ok, bad = asyncio.run(_closed_loop(port, seconds, connections))
                    used = cpu_ticks([proc.pid]) - before
                    if bad or not ok:
                        raise RuntimeError(f"{variant}: {bad} requests failed, {ok} answered")
                    out[variant].append(used / ok)
        finally:
            for proc in procs:
                proc.stop()
    return {variant: statistics.median(v) for variant, v in out.items()}


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_openai", description=__doc__)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--seconds", type=float, default=0.2)
    p.add_argument("--end-to-end", action="store_true", help="also time whole requests")
    p.add_argument("--load-seconds", type=float, default=4.0, help="per end-to-end run")
    args = p.parse_args(argv)
    name = model_json("llama-3.1-8b-ft2")
    table = RouteTable(
        [
            (MatchConfig(model=["llama-3.1-8b"]), "llama"),
            (MatchConfig(model=["mistral-7b"]), "mistral"),
            (MatchConfig(), "rest"),
        ]
    )
    path = "/v1/chat/completions"
    plain = RouteTable([(MatchConfig(), "rest")])
    routes = measure(
        {
            "model": lambda: (
                table.lookup(None, path),
                table.lookup_model(None, path, "llama-3.1-8b"),
            ),
            "plain": lambda: plain.lookup(None, path),
        },
        args.seconds,
        args.repeats,
    )
    route = routes["model"] - routes["plain"]
    print(f"median of {args.repeats} runs; CPU microseconds per request")
    print(f"{'body':<22}{'bytes':>9}{'json.loads':>12}{'find':>10}{'find+rename':>13}")
    for label, body in bodies().items():

        def loads(body: bytes = body) -> object:
            return json.loads(body)

        def find(body: bytes = body) -> object:
            return find_model(body)

        def rename(body: bytes = body) -> bytes:
            return find_model(body).with_model(name)

        t = measure(
            {"loads": loads, "find": find, "rename": rename},
            args.seconds,
            args.repeats,
        )
        print(
            f"{label:<22}{len(body):>9}{t['loads'] * 1e6:>12.2f}{t['find'] * 1e6:>10.2f}"
            f"{t['rename'] * 1e6:>13.2f}"
        )
    print(f"route table, model rules vs none: {route * 1e6:+.2f} us")
    if args.end_to_end:
        e2e = end_to_end(args.repeats, args.load_seconds, 16)
        print(
            f"end to end, canary CPU per request: model-less {e2e['plain'] * 1e6:.1f} us, "
            f"model-routed and renamed {e2e['routed'] * 1e6:.1f} us, "
            f"added {(e2e['routed'] - e2e['plain']) * 1e6:+.1f} us"
        )


if __name__ == "__main__":
    main()
