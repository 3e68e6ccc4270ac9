"""loadtest/bench_replicas.py in its tiny form: the figures are printed and nothing is left
running (redis-server, the upstream and every canary replica are stopped)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _leftovers() -> list[str]:
    """Command lines of running processes started from a bench_replicas run directory."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "canary-bench-replicas-" in cmdline:
            found.append(cmdline)
    return found


def test_bench_replicas_tiny_run_prints_the_figures_and_cleans_up() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "loadtest.bench_replicas", "--quick", "--replicas", "2",
         "--duration", "0.5", "--repeats", "1", "--quiet-wait", "0", "--rate", "200"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert f"CPUs: {os.cpu_count()}" in out
    for config in ("direct", "canary-1", "canary-2"):
        assert re.search(rf"^{config}\s+\d+ ", out, re.M), out
    assert re.search(r"^canary-2\s+\d+\s+\S+\s+-?\d+\.\d+ ", out, re.M), out  # added p50
    assert re.search(r"ratio 2-replica/1-replica req/s: median \d+\.\d\d", out), out
    assert "repeat 1/1 canary-2" in r.stderr  # progress while running
    assert _leftovers() == []
