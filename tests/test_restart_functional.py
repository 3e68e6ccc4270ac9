"""`canary run` SIGKILLed mid-rollout resumes the same step with its samples (real processes)."""

from __future__ import annotations

from pathlib import Path

from loadtest.crash_loss import crash_once


async def test_sigkill_mid_rollout_resumes_the_step_and_loses_at_most_a_flush(
    tmp_path: Path,
) -> None:
    r = await crash_once(tmp_path, rate=150.0)
    assert r.step_before == 1, r
    assert r.step_after == r.step_before and r.phase_after == "running", r
    assert r.resumed > 0 and r.lost >= 0, r
    # one 250 ms flush interval plus the write in progress, with room for a slow CI machine
    assert r.lost <= r.rate * 0.5 + 5, r
