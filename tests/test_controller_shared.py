"""Several canary processes on one store: one leader acts, every process serves the stored
weights within a flush, a new leader takes over from the persisted state, and a leader that
lost its lease can neither decide nor write (fencing).

Two controllers, each with its own recorder and its own SQLite connection to one file, stand
for two processes; a manual clock drives both (the lease's TTL runs on it too).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from canary.controller import Controller
from canary.controller.leadership import Leadership
from canary.decision import Phase
from canary.errors import CommandRejected, StoreError
from canary.metrics import Metrics
from canary.observe import Recorder
from canary.store import SQLiteStore
from tests.test_controller import Clock, Sink, _config, _feed

TTL = 1.0  # seconds of the lease (the analysis interval of _config() is 100 ms)


class Process:
    """One canary process: a store connection, a recorder, a controller, its served weights."""

    def __init__(self, path: Path, name: str, clock: Clock) -> None:
        self.store = SQLiteStore(path, clock=clock)
        self.recorder = Recorder()
        self.sink = Sink()
        self.lead = Leadership(self.store, TTL, holder=name, monotonic=clock)
        self.shares: list[float] = []
        self.ctl = Controller(
            _config(), self.store, self.recorder, Metrics(), self.sink,
            clock=clock, monotonic=clock, leadership=self.lead,
            on_share=lambda rollout, share: self.shares.append(share),
        )  # fmt: skip

    async def start(self) -> None:
        await self.store.open()
        await self.ctl.load()

    @property
    def served(self) -> float | None:
        """The candidate weight this process's proxy serves now (None: never told)."""
        return self.sink.calls[-1][1] if self.sink.calls else None


@pytest.fixture
def clock() -> Clock:
    return Clock()


async def _two(tmp_path: Path, clock: Clock) -> tuple[Process, Process]:
    a, b = Process(tmp_path / "s.db", "a", clock), Process(tmp_path / "s.db", "b", clock)
    await a.start()
    await b.start()
    return a, b


async def test_one_leads_on_the_merged_samples_and_every_process_serves_its_weights(
    tmp_path: Path, clock: Clock
) -> None:
    a, b = await _two(tmp_path, clock)
    assert a.lead.leading and not b.lead.leading
    assert a.ctl.state("m").step == b.ctl.state("m").step == 0
    for round_ in range(12):
        _feed(a.recorder, 300, 10, seed=round_)
        _feed(b.recorder, 300, 10, seed=100 + round_)
        await b.ctl.tick()  # the follower's samples reach the store
        await a.ctl.tick()
        clock.t += 0.25
        if a.ctl.state("m").step > 0:
            break
    assert a.ctl.state("m").step == 1, a.ctl.view("m").status
    totals = a.ctl.totals("m")  # what the leader analysed: both processes' samples
    assert totals.production.observed + totals.candidate.observed == 600 * (round_ + 1)
    assert a.served == 50.0  # stored, then served by the leader
    assert b.served != 50.0  # the follower learns it from the store at its next flush
    await b.ctl.tick()
    assert b.served == 50.0 and b.ctl.state("m").step == 1
    assert "following: a leads" in b.ctl.view("m").status
    assert [d["action"] for d in b.ctl.view("m").decisions] == ["START", "ADVANCE"]
    with pytest.raises(CommandRejected, match="does not lead"):
        await b.ctl.command("m", "pause")


async def test_a_new_leader_takes_over_within_the_lease_and_resumes_from_the_store(
    tmp_path: Path, clock: Clock
) -> None:
    a, b = await _two(tmp_path, clock)
    await a.ctl.command("m", "pause")  # a decision the new leader must keep
    await b.ctl.tick()
    assert b.ctl.state("m").phase is Phase.PAUSED
    # a dies without a word: b takes over once the lease has run out (TTL), not before.
    clock.t += TTL * 0.5
    await b.ctl.tick()
    assert not b.lead.leading
    clock.t += TTL * 0.5 + 0.01
    await b.ctl.tick()
    assert b.lead.leading and b.lead.token == a.lead.token + 1
    assert b.ctl.state("m").phase is Phase.PAUSED  # resumed from the stored state
    await b.ctl.command("m", "resume")
    assert b.ctl.state("m").phase is Phase.RUNNING
    assert [d["action"] for d in await b.store.decisions("m")] == ["START", "PAUSE", "RESUME"]


async def test_a_leader_that_lost_its_lease_neither_decides_nor_writes(
    tmp_path: Path, clock: Clock
) -> None:
    a, b = await _two(tmp_path, clock)
    clock.t += TTL + 0.01  # a is paused (SIGSTOP) past its lease; b takes over
    await b.ctl.tick()
    assert b.lead.leading
    assert not a.lead.leading  # a wakes up: its own clock says the lease ran out
    with pytest.raises(CommandRejected):
        await a.ctl.command("m", "promote")
    # Even a process whose clock misleads it is fenced by the store.
    a.lead._valid_until = clock.t + 100.0
    with pytest.raises(CommandRejected, match="lost the leadership"):
        await a.ctl.command("m", "promote")
    assert a.ctl.state("m").phase is Phase.RUNNING  # undone: neither stored nor served
    assert a.served != 100.0 and not a.lead.leading
    assert (await a.store.get_state("m") or {})["phase"] == "running"
    assert [d["action"] for d in await a.store.decisions("m")] == ["START"]
    await b.ctl.tick()
    assert b.ctl.state("m").phase is Phase.RUNNING and b.served != 100.0


async def test_a_clean_stop_hands_over_at_once(tmp_path: Path, clock: Clock) -> None:
    a, b = await _two(tmp_path, clock)
    await a.ctl.stop()  # releases the lease
    await b.ctl.tick()
    assert b.lead.leading


async def test_a_reload_with_new_endpoints_starts_over_on_the_leader_only(
    tmp_path: Path, clock: Clock
) -> None:
    a, b = await _two(tmp_path, clock)
    await a.ctl.command("m", "pause")
    config = _config()
    r = config.rollouts[0]
    candidate = r.candidate.model_copy(update={"endpoints": ["http://127.0.0.1:9"]})
    moved = config.model_copy(update={"rollouts": [r.model_copy(update={"candidate": candidate})]})

    await b.ctl.apply_config(moved)  # the follower reloads first: it must not write
    assert [d["action"] for d in await b.store.decisions("m")] == ["START", "PAUSE"]
    assert b.ctl.state("m").phase is Phase.RUNNING  # as it would start, until the leader says
    await a.ctl.apply_config(moved)  # the leader starts the new rollout
    assert [d["action"] for d in await a.store.decisions("m")] == ["START"]
    await b.ctl.tick()
    assert b.ctl.state("m") == a.ctl.state("m")


async def test_each_process_learns_its_share_of_the_traffic(tmp_path: Path, clock: Clock) -> None:
    """The proxy divides its request rate by it, so per-hour costs are amortised over the
    rollout's total rate: here a sends three requests for each of b's."""
    a, b = await _two(tmp_path, clock)
    await a.ctl.command("m", "pause")  # no decision in the way: only the counts matter
    for round_ in range(12):
        _feed(a.recorder, 300, 10, seed=round_)
        _feed(b.recorder, 100, 10, seed=50 + round_)
        await b.ctl.flush()
        await a.ctl.tick()
        await b.ctl.tick()
        clock.t += 0.25
    assert a.shares and b.shares
    assert a.shares[-1] == pytest.approx(0.75, abs=0.03)
    assert b.shares[-1] == pytest.approx(0.25, abs=0.03)


async def test_a_new_leader_keeps_the_samples_it_could_not_write_yet(
    tmp_path: Path, clock: Clock
) -> None:
    """After a store outage the process that takes the lease adopts every rollout from the
    store: what it recorded during the outage, not written yet, must survive the adoption
    (it used to be dropped with the old rollout object: ~30% of a 10 s outage's requests)."""
    a, b = await _two(tmp_path, clock)
    assert a.lead.leading
    real = b.store.add_samples

    async def down(*args: object, **kwargs: object) -> None:
        raise StoreError("connection reset")

    b.store.add_samples = down  # type: ignore[method-assign]
    for round_ in range(8):  # 2 s: a (stopped) lets its lease run out, b takes it
        _feed(b.recorder, 100, 10, seed=round_)
        await b.ctl.tick()
        clock.t += 0.25
    assert b.lead.leading
    b.store.add_samples = real  # type: ignore[method-assign]
    await b.ctl.tick()
    stored = await b.store.get_samples("m")
    assert stored is not None
    assert stored.production.observed + stored.candidate.observed == 800
