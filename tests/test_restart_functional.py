"""`canary run` SIGKILLed mid-rollout resumes the same step with its samples (real processes)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from loadtest.crash_loss import crash_once


def _orphaned_workers() -> set[int]:
    """Analysis worker / forkserver processes whose parent is gone (re-parented to init)."""
    found = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == 1 and b"multiprocessing" in cmd:
            found.add(int(proc.name))
    return found


async def test_sigkill_mid_rollout_resumes_the_step_and_loses_at_most_a_flush(
    tmp_path: Path,
) -> None:
    before = _orphaned_workers()
    r = await crash_once(tmp_path, rate=150.0)
    assert r.step_before == 1, r
    assert r.step_after == r.step_before and r.phase_after == "running", r
    assert r.resumed > 0 and r.lost >= 0, r
    # one 250 ms flush interval plus the write in progress, with room for a slow CI machine
    assert r.lost <= r.rate * 0.5 + 5, r
    # the killed canary's analysis worker (and its forkserver) notice and exit
    for _ in range(50):
        leaked = _orphaned_workers() - before
        if not leaked:
            break
        await asyncio.sleep(0.1)
    assert not leaked, f"processes left behind by a SIGKILLed canary: {sorted(leaked)}"
