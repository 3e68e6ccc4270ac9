"""Resource signals: scrape both arms' Prometheus endpoints in time-paired windows.

A rollout that has ``resource:METRIC`` metrics gets one :class:`ResourceScraper` (a background
task, never on the proxy's request path). Every ``every`` seconds it scrapes every endpoint of
both arms at the same moment and turns each pair of scrapes into one window per metric:

- a gauge (memory, utilisation) is the mean over the arm's endpoints: per replica;
- a counter (``*_total``, and a histogram's or summary's ``_sum``/``_count``) is its increase
  since the previous window summed over the endpoints (a counter that went down was reset: its
  new value is the increase), divided by the requests the proxy sent to that arm in the window:
  per request (CPU seconds per request). Windows with fewer than ``min_requests`` requests on an
  arm are dropped.

Each complete window records both arms' values under the signal key (``resource:NAME``) and,
on the candidate, the paired value ``log(c / p)`` and/or ``c - p`` with its change since the
previous window (keys from :func:`canary.signals.paired_key`); they flow to the store and the
analysis like every other accumulator. A window where either arm's scrape failed is dropped and
counted; a failing or hanging endpoint only costs its own (short) timeout.

The scrapers read the proxy's request counts and report their own metrics through
:class:`ScrapeMetrics`, which :class:`canary.metrics.Metrics` satisfies: observe sits below
the metrics module and does not import it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from canary.config import Config, RolloutConfig
from canary.errors import CanaryError
from canary.observe.accumulators import Recorder
from canary.signals import (
    ARMS,
    CANDIDATE,
    PRODUCTION,
    ResourceQuery,
    is_resource,
    paired_key,
    parse_signal,
)
from canary.stats import DEFAULT_BATCH_SIZES

__all__ = [
    "DEFAULT_MIN_REQUESTS",
    "MAX_SCRAPE_BYTES",
    "Incrementable",
    "MetricFamily",
    "PairedWindows",
    "PerRollout",
    "Reading",
    "ResourceScraper",
    "ResourceScrapers",
    "ScrapeMetrics",
    "Settable",
    "WindowMetric",
    "WindowPoller",
    "counter_increase",
    "read_exposition",
    "resource_metrics",
    "run_every",
    "window_metrics",
]

log = logging.getLogger("canary.resources")  # the name it logged under before the move

DEFAULT_MIN_REQUESTS = 10
"""Requests an arm must have had in a window for a per-request (counter) value."""
MAX_SCRAPE_BYTES = 8 * 1024 * 1024
_ACCEPT = "text/plain;version=0.0.4;q=1.0, */*;q=0.1"
_COUNTER_SUFFIXES = ("_sum", "_count", "_bucket")


_T_co = TypeVar("_T_co", covariant=True)


class Incrementable(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class Settable(Protocol):
    def set(self, value: float) -> None: ...


class MetricFamily(Protocol[_T_co]):
    def labels(self, *labelvalues: str) -> _T_co: ...


class _ArmCounts(Protocol):
    @property
    def requests(self) -> Mapping[str, int]: ...  # answered requests by status class


class _RolloutCounts(Protocol):
    @property
    def arms(self) -> Mapping[str, _ArmCounts]: ...


class _ProxyCounts(Protocol):
    def rollout(self, name: str) -> _RolloutCounts: ...


class ScrapeMetrics(Protocol):
    """What a scraper reads and reports through (:class:`canary.metrics.Metrics` is one).

    ``counters`` gives the requests the proxy answered per arm so far (a counter's window is
    divided by the arm's requests in it); the three families are the scrapers' own metrics
    (``canary_resource_scrapes``, ``canary_resource_windows``, ``canary_resource_value``).
    """

    @property
    def counters(self) -> _ProxyCounts: ...
    @property
    def resource_scrapes(self) -> MetricFamily[Incrementable]: ...  # labels: rollout, arm, result
    @property
    def resource_windows(
        self,
    ) -> MetricFamily[Incrementable]: ...  # labels: rollout, metric, outcome
    @property
    def resource_value(self) -> MetricFamily[Settable]: ...  # labels: rollout, arm, metric


@dataclass(frozen=True, slots=True)
class Reading:
    """One endpoint's value of one query: the sum of the matching samples."""

    value: float
    counter: bool


def _wanted_line(line: str, names: frozenset[str]) -> bool:
    if line.startswith("#"):
        parts = line.split(None, 3)
        # "# TYPE family type": keep the types of the families our names belong to (a family
        # name is a prefix of its samples' names); HELP and other comments are not needed.
        return len(parts) >= 3 and parts[1] == "TYPE" and any(n.startswith(parts[2]) for n in names)
    end = len(line)
    for i, ch in enumerate(line):
        if ch == "{" or ch == " " or ch == "\t":
            end = i
            break
    return line[:end] in names


def read_exposition(text: str, queries: Iterable[ResourceQuery]) -> dict[str, Reading | None]:
    """Read each query's value from a Prometheus text exposition (None when absent).

    Only the lines of the wanted metrics go through ``prometheus_client``'s parser, so the
    cost does not grow with the size of the endpoint's /metrics. Raises ValueError when those
    lines do not parse.
    """
    qs = list(queries)
    names = frozenset(n for q in qs for n in (q.name, q.name + "_total"))
    kept = "\n".join(line for line in text.splitlines() if _wanted_line(line.strip(), names))
    found: dict[str, list[float]] = {q.signal: [] for q in qs}
    counter: dict[str, bool] = {}
    for family in text_string_to_metric_families(kept + "\n" if kept else ""):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            is_counter = (
                family.type == "counter"
                or (
                    family.type in ("histogram", "summary")
                    and sample.name.endswith(_COUNTER_SUFFIXES)
                )
                or (family.type in ("untyped", "unknown") and sample.name.endswith("_total"))
            )
            for q in qs:
                hit = sample.name == q.name or (
                    is_counter and family.type == "counter" and sample.name == q.name + "_total"
                )
                if hit and q.matches_labels(sample.labels):
                    found[q.signal].append(float(sample.value))
                    counter[q.signal] = is_counter
    return {s: Reading(math.fsum(v), counter[s]) if v else None for s, v in found.items()}


def counter_increase(previous: float, current: float) -> float:
    """Increase of a counter between two scrapes; a decrease means it was reset to zero."""
    return current - previous if current >= previous else current


@dataclass(frozen=True)
class WindowMetric:
    """An analysis metric on a windowed signal: its name and whether its tolerance is
    relative (compared on ``log(c / p)``) or absolute (on ``c - p``)."""

    name: str
    relative: bool


def window_metrics(
    rollout: RolloutConfig, wanted: Callable[[str], bool]
) -> dict[str, list[WindowMetric]]:
    """Signal key -> the metrics on it, for the rollout's signals ``wanted`` says yes to."""
    out: dict[str, list[WindowMetric]] = {}
    for m in rollout.analysis.metrics:
        key = parse_signal(m.signal).key
        if wanted(key):
            out.setdefault(key, []).append(WindowMetric(m.name, m.margin.relative))
    return out


@dataclass(frozen=True)
class _Signal:
    query: ResourceQuery
    metrics: tuple[WindowMetric, ...]


class PairedWindows:
    """Records one rollout's complete windows of windowed signals, paired across the arms.

    Shared by the resource scrapers and the promql evaluators (:mod:`canary.observe.promql`):
    for a window with a value on both arms it records each arm's value under the signal key
    and, on the candidate, ``log(c / p)`` (relative tolerances) and/or ``c - p`` (absolute
    ones) under :func:`canary.signals.paired_key`, with the change since the previous
    consecutive window and the sums of the last ``b`` consecutive windows: what the paired
    test (:func:`canary.stats.paired_mean_test`) reads. State is bounded per signal.
    """

    def __init__(
        self,
        rollout: str,
        recorder: Recorder,
        windows: MetricFamily[Incrementable],
        value: MetricFamily[Settable],
    ) -> None:
        self.rollout = rollout
        self._recorder = recorder
        self._windows = windows  # labels: rollout, metric, outcome
        self._value = value  # labels: rollout, arm, metric
        # Per paired key: the round of its last window and its latest consecutive values (the
        # last is the previous value for the change; all of them for the batch sums), bounded.
        self._runs: dict[str, tuple[int, deque[float]]] = {}

    def dropped(self, metrics: Iterable[WindowMetric], outcome: str) -> None:
        """Count a window that could not be recorded, by why (``outcome``)."""
        for m in metrics:
            self._windows.labels(self.rollout, m.name, outcome).inc()

    def record(
        self,
        round_no: int,
        key: str,
        metrics: Sequence[WindowMetric],
        values: Mapping[str, float],
    ) -> None:
        """Record round ``round_no``'s window of ``key`` (``values`` has both arms)."""
        p, c = values[PRODUCTION], values[CANDIDATE]
        rec = self._recorder
        for arm in ARMS:
            rec.record_value(self.rollout, arm, key, values[arm])
            for m in metrics:
                self._value.labels(self.rollout, arm, m.name).set(values[arm])
        logged = False
        if any(m.relative for m in metrics) and p > 0 and c > 0:
            self._paired(round_no, key, True, math.log(c / p))
            logged = True
        if any(not m.relative for m in metrics):
            self._paired(round_no, key, False, c - p)
        for m in metrics:
            ok = logged or not m.relative
            self._windows.labels(self.rollout, m.name, "recorded" if ok else "not_positive").inc()

    def _paired(self, round_no: int, key: str, relative: bool, value: float) -> None:
        pk = paired_key(key, relative)
        rec = self._recorder
        rec.record_value(self.rollout, CANDIDATE, pk, value)
        last, recent = self._runs.get(pk, (-2, deque(maxlen=DEFAULT_BATCH_SIZES[-1])))
        if last == round_no - 1 and recent:
            change = paired_key(key, relative, changes=True)
            rec.record_value(self.rollout, CANDIDATE, change, value - recent[-1])
        else:
            recent.clear()  # a skipped window: changes and batches need consecutive windows
        self._runs[pk] = (round_no, recent)
        recent.append(value)
        # Sums of the last b consecutive windows (overlapping batches): the long-run variance
        # the paired test needs when windows are correlated beyond lag 1.
        for b in DEFAULT_BATCH_SIZES:
            if len(recent) >= b:
                total = math.fsum(itertools.islice(recent, len(recent) - b, None))
                rec.record_value(self.rollout, CANDIDATE, paired_key(key, relative, batch=b), total)


async def run_every(every: float, tick: Callable[[], Awaitable[None]], what: str) -> None:
    """Call ``tick`` every ``every`` seconds on a fixed schedule until cancelled.

    A round that raises is logged and the schedule goes on (a bug must not end the windows
    for good); a round that overran, or a stopped event loop, skips rounds instead of
    bursting to catch up.
    """
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    while True:
        try:
            await tick()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: round failed", what)
        next_at += every
        now = loop.time()
        if next_at < now:
            next_at = now + every
        await asyncio.sleep(next_at - now)


def resource_metrics(rollout: RolloutConfig) -> list[str]:
    """Signals of the rollout's ``resource:`` metrics, in config order, without duplicates."""
    out: list[str] = []
    for m in rollout.analysis.metrics:
        key = parse_signal(m.signal).key
        if is_resource(key) and key not in out:
            out.append(key)
    return out


@dataclass(frozen=True, slots=True)
class _Failed:
    """A scrape that gave no readings: the ``result`` label and why."""

    result: str
    message: str

    def __str__(self) -> str:
        return self.message


class WindowPoller:
    """The lifecycle both windowed sources share (:class:`ResourceScraper`, and
    :class:`canary.observe.promql.PromQLEvaluator`): one aiohttp session, :meth:`tick` run
    every ``every`` seconds by :func:`run_every` from :meth:`start` until :meth:`stop`.
    Subclasses set ``name``, ``every`` and ``what`` and define :meth:`tick` and
    :meth:`_new_session`."""

    name: str
    every: float
    what: str  # what one round does, for the log and the task name: "resource scrape"

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None

    def _new_session(self) -> aiohttp.ClientSession:
        raise NotImplementedError

    async def tick(self) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        if self._task is not None:
            return
        self._session = self._new_session()
        self._task = asyncio.get_running_loop().create_task(
            run_every(self.every, self.tick, f"rollout {self.name}: {self.what}"),
            name=f"canary-{self.what.replace(' ', '-')}-{self.name}",
        )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        await self._close_session()

    async def _close_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    @contextlib.asynccontextmanager
    async def _round_session(self) -> AsyncIterator[aiohttp.ClientSession]:
        """The running session, or one for this round only (a :meth:`tick` called without
        :meth:`start`, as tests do)."""
        if self._session is not None:
            yield self._session
            return
        self._session = self._new_session()
        try:
            yield self._session
        finally:
            await self._close_session()


class ResourceScraper(WindowPoller):
    """Scrapes one rollout's arms every ``every`` seconds and records paired windows.

    :meth:`tick` does one round (tests call it directly); :meth:`start` runs it on a fixed
    schedule in a background task until :meth:`stop`.
    """

    def __init__(
        self,
        rollout: RolloutConfig,
        recorder: Recorder,
        metrics: ScrapeMetrics,
        *,
        min_requests: int = DEFAULT_MIN_REQUESTS,
        timeout: float | None = None,
    ) -> None:
        arms = {PRODUCTION: rollout.production, CANDIDATE: rollout.candidate}
        missing = [a for a, cfg in arms.items() if cfg.resources is None]
        if missing:
            raise CanaryError(
                f"rollout {rollout.name!r}: resource metrics need 'resources' on "
                f"{' and '.join(missing)}"
            )
        if min_requests < 1:
            raise CanaryError(f"min_requests must be at least 1, got {min_requests!r}")
        self.name = rollout.name
        self.every = min(cfg.resources.every for cfg in arms.values() if cfg.resources)
        self.timeout = timeout if timeout is not None else 0.8 * min(self.every, 2.0)
        self.min_requests = min_requests
        self.urls = {
            arm: tuple(e.rstrip("/") + cfg.resources.scrape for e in cfg.endpoints)
            for arm, cfg in arms.items()
            if cfg.resources is not None
        }
        self.signals = tuple(
            _Signal(ResourceQuery.parse(s), tuple(ms))
            for s, ms in window_metrics(rollout, is_resource).items()
        )
        self._metrics = metrics
        self._windows = PairedWindows(
            self.name, recorder, metrics.resource_windows, metrics.resource_value
        )
        super().__init__()
        self.what = "resource scrape"
        self.ticks = 0
        # Per arm and counter signal: per-endpoint values at the previous tick (None = no
        # usable baseline) and the arm's request count then.
        self._prev: dict[str, dict[str, tuple[float, ...] | None]] = {a: {} for a in ARMS}
        self._prev_requests: dict[str, int | None] = {a: None for a in ARMS}
        self._failing: set[str] = set()

    # -- lifecycle --------------------------------------------------------------------------

    def _new_session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            headers={"Accept": _ACCEPT},
            connector=aiohttp.TCPConnector(limit=32),
        )

    # -- one round ----------------------------------------------------------------------------

    def _requests(self) -> dict[str, int]:
        arms = self._metrics.counters.rollout(self.name).arms
        return {a: sum(arms[a].requests.values()) for a in ARMS}

    async def tick(self) -> None:
        """Scrape every endpoint of both arms at once and record the window."""
        async with self._round_session() as session:
            requests = self._requests()
            jobs = [(arm, url) for arm in ARMS for url in self.urls[arm]]
            results = await asyncio.gather(*(self._scrape(session, url) for _, url in jobs))
        self.ticks += 1
        per_arm: dict[str, list[dict[str, Reading | None] | None]] = {a: [] for a in ARMS}
        for (arm, url), res in zip(jobs, results, strict=True):
            if isinstance(res, _Failed):
                self._count(arm, res.result)
                if url not in self._failing:
                    self._failing.add(url)
                    log.warning("rollout %s: scraping %s %s: %s", self.name, arm, url, res)
                per_arm[arm].append(None)
                continue
            if url in self._failing:
                self._failing.discard(url)
                log.info("rollout %s: scraping %s %s works again", self.name, arm, url)
            missing = [s.query.signal for s in self.signals if res.get(s.query.signal) is None]
            self._count(arm, "missing_metric" if missing else "ok")
            per_arm[arm].append(res)
        for sig in self.signals:
            self._window(sig, per_arm, requests)
        self._prev_requests = {a: requests[a] for a in ARMS}

    def _count(self, arm: str, result: str) -> None:
        self._metrics.resource_scrapes.labels(self.name, arm, result).inc()

    def _window(
        self,
        sig: _Signal,
        per_arm: dict[str, list[dict[str, Reading | None] | None]],
        requests: dict[str, int],
    ) -> None:
        key = sig.query.signal
        values: dict[str, float] = {}
        outcome = "recorded"
        for arm in ARMS:
            readings = [r.get(key) if r is not None else None for r in per_arm[arm]]
            if any(r is None for r in readings):
                self._prev[arm][key] = None
                outcome = "scrape_failed"
                continue
            current = [r.value for r in readings if r is not None]
            if not any(r.counter for r in readings if r is not None):
                values[arm] = math.fsum(current) / len(current)
                continue
            prev = self._prev[arm].get(key)
            self._prev[arm][key] = tuple(current)
            prev_requests = self._prev_requests[arm]
            if prev is None or prev_requests is None or len(prev) != len(current):
                outcome = "no_baseline" if outcome == "recorded" else outcome
                continue
            n = requests[arm] - prev_requests
            if n < self.min_requests:
                outcome = "few_requests" if outcome == "recorded" else outcome
                continue
            increase = math.fsum(counter_increase(p, c) for p, c in zip(prev, current, strict=True))
            values[arm] = increase / n
        if outcome != "recorded" or len(values) != len(ARMS):
            self._windows.dropped(sig.metrics, outcome)
            return
        self._windows.record(self.ticks, key, sig.metrics, values)

    async def _scrape(
        self, session: aiohttp.ClientSession, url: str
    ) -> dict[str, Reading | None] | _Failed:
        try:
            async with session.get(url) as resp:
                if resp.status != 200:
                    return _Failed("error", f"HTTP {resp.status}")
                chunks: list[bytes] = []
                size = 0
                async for chunk in resp.content.iter_chunked(1 << 16):
                    size += len(chunk)
                    if size > MAX_SCRAPE_BYTES:
                        return _Failed("parse", f"more than {MAX_SCRAPE_BYTES} bytes")
                    chunks.append(chunk)
                charset = resp.charset or "utf-8"
        except TimeoutError:
            return _Failed("timeout", f"no answer within {self.timeout:.3g} s")
        except (aiohttp.ClientError, OSError) as exc:
            return _Failed("error", f"{type(exc).__name__}: {exc}")
        try:
            text = b"".join(chunks).decode(charset)
            return read_exposition(text, (s.query for s in self.signals))
        except (ValueError, LookupError, IndexError) as exc:
            # UnicodeDecodeError is a ValueError; the parser raises ValueError (and at times
            # IndexError) on malformed lines; LookupError: an unknown charset.
            return _Failed("parse", f"not Prometheus text format: {exc}")


def _spec(rollout: RolloutConfig) -> object:
    """What a scraper depends on: a change of any of it restarts the scraper."""
    return (
        tuple(rollout.production.endpoints),
        rollout.production.resources,
        tuple(rollout.candidate.endpoints),
        rollout.candidate.resources,
        tuple(
            (m.name, m.signal, m.margin.relative)
            for m in rollout.analysis.metrics
            if is_resource(m.signal)
        ),
    )


class _Background(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


_B = TypeVar("_B", bound=_Background)


class PerRollout(Generic[_B]):
    """One background task object per rollout that needs one, kept in step with the config.

    :meth:`apply` starts what a new config wants, restarts what changed (``spec`` differs)
    and stops what it no longer wants; :meth:`close` stops everything. The runtime calls
    both on the leader only. Subclasses say which rollouts need a task and what it is.
    """

    def __init__(self, factory: Callable[[RolloutConfig], _B]) -> None:
        self._factory = factory
        self.tasks: dict[str, _B] = {}
        self._specs: dict[str, object] = {}

    def wanted(self, rollout: RolloutConfig) -> bool:
        raise NotImplementedError

    def spec(self, rollout: RolloutConfig) -> object:
        """What a task depends on: a change of any of it restarts the task."""
        raise NotImplementedError

    def started(self, name: str, task: _B) -> None:
        """Log that ``task`` was started for rollout ``name``."""

    async def apply(self, config: Config) -> None:
        wanted = {r.name: r for r in config.rollouts if self.wanted(r)}
        for name in list(self.tasks):
            r = wanted.get(name)
            if r is None or self.spec(r) != self._specs[name]:
                await self.tasks.pop(name).stop()
                del self._specs[name]
        for name, r in wanted.items():
            if name in self.tasks:
                continue
            task = self._factory(r)
            await task.start()
            self.tasks[name] = task
            self._specs[name] = self.spec(r)
            self.started(name, task)

    async def close(self) -> None:
        for task in self.tasks.values():
            await task.stop()
        self.tasks.clear()
        self._specs.clear()


class ResourceScrapers(PerRollout[ResourceScraper]):
    """The scrapers of every rollout that has resource metrics (owned by the runtime)."""

    def __init__(
        self,
        recorder: Recorder,
        metrics: ScrapeMetrics,
        *,
        factory: Callable[[RolloutConfig], ResourceScraper] | None = None,
    ) -> None:
        super().__init__(factory or (lambda r: ResourceScraper(r, recorder, metrics)))

    @property
    def scrapers(self) -> dict[str, ResourceScraper]:
        return self.tasks

    def wanted(self, rollout: RolloutConfig) -> bool:
        return bool(resource_metrics(rollout))

    def spec(self, rollout: RolloutConfig) -> object:
        return _spec(rollout)

    def started(self, name: str, task: ResourceScraper) -> None:
        log.info(
            "rollout %s: scraping resources every %gs: %s",
            name,
            task.every,
            ", ".join(s.query.signal for s in task.signals),
        )
