"""Where a report's data comes from: the admin API of a running canary, or the state store
itself (SQLite file or Redis) with no canary running.

Both end in the same :class:`~canary.report._model.ReportData`. The store is only read: a
SQLite file is first copied whole with SQLite's online backup (a consistent snapshot even
while canary writes to it) into a temporary file, which is opened instead, so neither a
schema migration nor a lock ever touches the file canary uses.
"""

from __future__ import annotations

import asyncio
import math
import os
import sqlite3
import tempfile
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from canary.config import Config, RolloutConfig
from canary.decision import Phase, RolloutState, analyze, decide, upgrade_entry
from canary.errors import AdminError, StoreError, UnknownRollout
from canary.observe import RolloutAccumulator
from canary.observe.cost import cost_per_1000
from canary.observe.distributions import DISTRIBUTION_SIGNALS, distributions
from canary.report._model import ARMS, Distribution, HistoryPoint, ReportData, is_num
from canary.stats import MetricResult
from canary.store import SQLiteStore, Store, open_store

if TYPE_CHECKING:
    from canary.admin_client import AdminClient

MAX_DECISIONS = 10_000  # the store's own bound (DEFAULT_MAX_DECISIONS)


# -- shapes shared by both sources ------------------------------------------------------------


def result_dict(r: MetricResult) -> dict[str, Any]:
    """One test's result in the admin API's shape (``canary.admin.views.result_dict``)."""
    return {
        "name": r.name,
        "kind": r.kind.value,
        "verdict": r.verdict.value.upper(),
        "estimate": _finite(r.estimate),
        "lower": _finite(r.lower),
        "upper": _finite(r.upper),
        "margin": r.margin,
        "relative": r.relative,
        "direction": r.direction.value,
        "tolerance": _finite(r.tolerance),
        "n_production": r.n_production,
        "n_candidate": r.n_candidate,
        "alpha": r.alpha,
        "detail": r.detail,
        "explain": r.explain(),
    }


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _level(label: str) -> float | None:
    """``p95`` -> 0.95, ``0.95`` -> 0.95."""
    text = label[1:] if label.startswith("p") else label
    try:
        value = float(text)
    except ValueError:
        return None
    return value / 100.0 if label.startswith("p") else value


def drop_echo(dists: dict[str, dict[str, Distribution]]) -> bool:
    """Leave ``ttft`` out when it only repeats ``latency`` (responses that are not streamed:
    the first byte comes with the last); True when it did."""
    ttft, latency = dists.get("ttft"), dists.get("latency")
    if not ttft or not latency:
        return False
    for arm, d in ttft.items():
        lat = latency.get(arm)
        t50, l50 = d.quantiles.get(0.5), lat.quantiles.get(0.5) if lat else None
        if t50 is None or l50 is None or t50 < 0.95 * l50:
            return False
    del dists["ttft"]
    return True


def parse_distributions(signals: Any) -> dict[str, dict[str, Distribution]]:
    """:func:`canary.observe.distributions.distributions` (the admin API's answer's
    ``signals``) as Distributions."""
    out: dict[str, dict[str, Distribution]] = {}
    if not isinstance(signals, Mapping):
        return out
    for signal, body in signals.items():
        if not isinstance(body, Mapping) or not isinstance(body.get("arms"), Mapping):
            continue
        edges = body.get("edges")
        edges = [float(e) for e in edges if is_num(e)] if isinstance(edges, list) else []
        arms: dict[str, Distribution] = {}
        for arm, d in body["arms"].items():
            if not isinstance(d, Mapping):
                continue
            qs = {}
            for label, value in (d.get("quantiles") or {}).items():
                level = _level(str(label))
                if level is not None and is_num(value):
                    qs[level] = float(value)
            counts = d.get("counts") if isinstance(d.get("counts"), list) else []
            bins: tuple[tuple[float, float, int], ...] = ()
            if counts and len(edges) == len(counts) + 1:
                bins = tuple(
                    (edges[i], edges[i + 1], int(c))
                    for i, c in enumerate(counts)
                    if isinstance(c, int | float)
                )
            n = d.get("n")
            mean = d.get("mean")
            arms[str(arm)] = Distribution(
                n=int(n) if isinstance(n, int | float) else 0,
                quantiles=qs,
                mean=float(mean) if is_num(mean) else None,
                bins=bins,
            )
        if arms:
            out[str(signal)] = arms
    return out


def _history_metric(m: Mapping[str, Any]) -> dict[str, Any] | None:
    """One metric of a history point in the admin API's result shape (the store's compact
    keys ``k e l u tol v n``, or already the long ones)."""
    if "k" not in m:
        return dict(m) if m.get("name") else None
    counts = m.get("n")
    n: list[Any] = counts if isinstance(counts, list) and len(counts) == 2 else [None, None]
    return {
        "name": str(m["k"]),
        "estimate": m.get("e"),
        "lower": m.get("l"),
        "upper": m.get("u"),
        "tolerance": m.get("tol"),
        "verdict": m.get("v"),
        "n_production": n[0],
        "n_candidate": n[1],
    }


def parse_history(points: Any) -> list[HistoryPoint]:
    """History points as the store keeps them (``canary.controller.history``: ``t`` time,
    ``ph`` phase, ``st`` 0-based step, ``w`` weights, ``m`` per-metric results) or as an
    admin API serves them (``{"points": [...]}``); points without a time are skipped."""
    out: list[HistoryPoint] = []
    if isinstance(points, Mapping):
        points = points.get("points", points.get("history"))
    if not isinstance(points, list):
        return out
    for p in points:
        if not isinstance(p, Mapping):
            continue
        at = p.get("t", p.get("at"))
        if not is_num(at):
            continue
        metrics: dict[str, dict[str, Any]] = {}
        raw = p.get("m", p.get("metrics"))
        items: list[Any] = list(raw.values()) if isinstance(raw, Mapping) else raw or []
        for m in items if isinstance(items, list) else []:
            if isinstance(m, Mapping):
                result = _history_metric(m)
                if result is not None:
                    metrics[result["name"]] = result
        weights = p.get("w", p.get("weights"))
        weight: Any = None
        if isinstance(weights, list) and len(weights) == 2:
            weight = weights[1]
        elif isinstance(weights, Mapping):
            weight = weights.get("candidate")
        step: Any = p.get("st", p.get("step_index"))
        step = step + 1 if isinstance(step, int) else p.get("step")
        phase = p.get("ph", p.get("phase"))
        out.append(
            HistoryPoint(
                at=float(at),
                phase=str(phase) if isinstance(phase, str) else None,
                step=step if isinstance(step, int) else None,
                weight=float(weight) if is_num(weight) else None,
                metrics=metrics,
            )
        )
    out.sort(key=lambda h: h.at)
    return out


# -- from the admin API -----------------------------------------------------------------------


def from_admin(client: AdminClient, name: str, *, now: float | None = None) -> ReportData:
    """A report of rollout ``name`` from the admin API behind ``client``.

    Raises :class:`~canary.admin_client.AdminNotFoundError` for an unknown rollout and
    :class:`~canary.admin_client.AdminUnreachableError` when no canary answers. What an
    older canary's API lacks (history, distributions, cost) is left out and said so.
    """
    detail = client.rollout(name)
    now = time.time() if now is None else now
    data = ReportData(
        name=str(detail.get("name", name)),
        source=f"admin API at {client.base_url}",
        generated_at=now,
        phase=str(detail.get("phase", "?")),
        step=detail.get("step") if isinstance(detail.get("step"), int) else None,
        steps=detail.get("steps") if isinstance(detail.get("steps"), int) else None,
        step_kind=str(detail["step_kind"]) if detail.get("step_kind") else None,
        weights=_weights(detail.get("weights")),
        shadow=bool(detail.get("shadow")),
        samples=_samples(detail.get("samples")),
        status=str(detail.get("status") or ""),
        metrics=_results(detail.get("metrics")),
        guards=_results(detail.get("guards")),
        net_value=detail["net_value"] if isinstance(detail.get("net_value"), dict) else None,
        decisions=_results(detail.get("decisions")),
        endpoints=_endpoints(detail.get("endpoints")),
    )
    elapsed = detail.get("elapsed")
    if is_num(elapsed):
        data.started_at = now - float(elapsed)
    start = next((d for d in data.decisions if d.get("action") == "START"), None)
    if start is not None and is_num(start.get("at")):
        data.started_at = float(start["at"])
    try:
        data.history = parse_history(client.history(name))
    except AdminError as exc:
        if _unreachable(exc):
            raise
        data.notes.append(f"no metric history: this canary's admin API does not serve it ({exc})")
    try:
        answer = client.distributions(name)
        data.distributions = parse_distributions(answer.get("signals"))
        data.distributions_source = "from the admin API (the controller's histograms)"
        if drop_echo(data.distributions):
            data.distributions_source += "; ttft left out: it equals latency (no streaming)"
    except AdminError as exc:
        if _unreachable(exc):
            raise
        data.distributions_source = ""
    prom = _scrape(client)
    if not data.distributions:
        data.distributions = _prom_quantiles(prom, data.name)
        if data.distributions:
            data.distributions_source = (
                "quantiles only: the admin API serves no histograms, these are the "
                "canary_signal_quantile gauges of /metrics"
            )
    data.cost_per_1k = _prom_cost(prom, data.name)
    if data.cost_per_1k:
        data.cost_source = "the admin API's /metrics: cost over priced requests since the start"
    return data


def _unreachable(exc: AdminError) -> bool:
    from canary.admin_client import AdminUnauthorizedError, AdminUnreachableError

    return isinstance(exc, AdminUnreachableError | AdminUnauthorizedError)


def _scrape(client: AdminClient) -> str:
    """The admin API's ``/metrics`` text ("" when it does not answer it)."""
    import httpx

    try:
        r = httpx.get(client.base_url + "/metrics", timeout=client.timeout)
    except httpx.HTTPError:
        return ""
    return r.text if r.status_code == 200 else ""


def _prom_samples(text: str, family: str, name: str) -> list[tuple[dict[str, str], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    out = []
    try:
        for fam in text_string_to_metric_families(text):
            if fam.name != family:
                continue
            for s in fam.samples:
                if s.name not in (family, family + "_total"):  # not _created
                    continue
                if s.labels.get("rollout") == name and math.isfinite(s.value):
                    out.append((dict(s.labels), float(s.value)))
    except ValueError:  # not the exposition format: nothing to read
        return []
    return out


def _prom_cost(text: str, name: str) -> dict[str, float | None]:
    """Cost per 1000 inferences per arm since the start: ``canary_cost_total`` over
    ``canary_priced_requests_total``, each summed over the processes (a supervisor's
    ``/metrics`` has one sample per worker), else ``canary_cost_per_1k_requests``."""
    totals: dict[str, list[float]] = {}
    for family, i in (("canary_cost", 0), ("canary_priced_requests", 1)):
        for labels, value in _prom_samples(text, family, name):
            totals.setdefault(labels.get("arm", ""), [0.0, 0.0])[i] += value
    if any(n > 0 for _, n in totals.values()):
        return {
            arm: 1000.0 * totals[arm][0] / totals[arm][1]
            if arm in totals and totals[arm][1] > 0
            else None
            for arm in ARMS
        }
    found = {
        labels.get("arm", ""): value
        for labels, value in _prom_samples(text, "canary_cost_per_1k_requests", name)
    }
    if not found:
        return {}
    return {arm: found.get(arm) for arm in ARMS}


def _prom_quantiles(text: str, name: str) -> dict[str, dict[str, Distribution]]:
    by: dict[str, dict[str, dict[float, float]]] = {}
    for labels, value in _prom_samples(text, "canary_signal_quantile", name):
        level = _level(labels.get("quantile", ""))
        if level is None:
            continue
        by.setdefault(labels.get("signal", "?"), {}).setdefault(labels.get("arm", "?"), {})[
            level
        ] = value
    return {
        signal: {arm: Distribution(n=0, quantiles=qs) for arm, qs in arms.items()}
        for signal, arms in by.items()
    }


def _weights(w: Any) -> dict[str, float]:
    if not isinstance(w, Mapping):
        return {}
    return {str(k): float(v) for k, v in w.items() if is_num(v)}


def _samples(s: Any) -> dict[str, int]:
    if not isinstance(s, Mapping):
        return {}
    return {str(k): int(v) for k, v in s.items() if isinstance(v, int | float)}


def _results(items: Any) -> list[dict[str, Any]]:
    return [dict(m) for m in items if isinstance(m, Mapping)] if isinstance(items, list) else []


def _endpoints(e: Any) -> dict[str, list[str]]:
    if not isinstance(e, Mapping):
        return {}
    return {str(k): [str(u) for u in v] for k, v in e.items() if isinstance(v, list)}


# -- from the state store ---------------------------------------------------------------------


async def from_store(
    store: Store,
    name: str,
    *,
    rollout: RolloutConfig | None = None,
    source: str,
    now: float | None = None,
) -> ReportData:
    """A report of rollout ``name`` from an open ``store``, with no canary running.

    ``rollout`` (the rollout's config, from ``-c FILE``) adds what the store does not keep:
    the metrics' definitions (so the tests are run once more on the stored samples when the
    store has no history), the steps, the endpoints and the pricing. Raises
    :class:`~canary.errors.UnknownRollout` (naming the rollouts it holds) when the store has
    nothing of ``name``.
    """
    now = time.time() if now is None else now
    raw_state = await store.get_state(name)
    decisions = await store.decisions(name, limit=MAX_DECISIONS)
    if raw_state is None and not decisions:
        known = await store.rollouts()
        held = ", ".join(repr(n) for n in known) if known else "none"
        raise UnknownRollout(f"no rollout named {name!r} in {source} (it holds: {held})")
    totals = await store.get_samples(name)
    history_raw = await _history(store, name)
    state = None
    if raw_state is not None:
        try:
            state = RolloutState.from_dict(raw_state)
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"rollout {name!r} in {source}: unreadable state ({exc})") from exc
    steps = len(rollout.steps) if rollout is not None else _steps_of(decisions)
    if steps is not None:
        decisions = [upgrade_entry(e, steps) for e in decisions]
    last = decisions[-1] if decisions else {}
    data = ReportData(name=name, source=source, generated_at=now, phase="?")
    data.decisions = decisions
    data.history = parse_history(history_raw)
    if state is not None:
        data.phase = state.phase.value
        data.started_at = state.started_at
        step_index = state.step
        if rollout is not None:
            weight, shadow = state.weights(rollout)
            step_index = min(state.step, len(rollout.steps) - 1)
            data.step_kind = "shadow" if rollout.steps[step_index].is_shadow else "weight"
            data.weights = {"production": 100.0 - weight, "candidate": weight}
            data.shadow = shadow
        data.step = step_index + 1
    else:  # a decision log without a state: what the last entry says
        data.phase = str(last.get("phase", "?"))
        data.step = last.get("step") if isinstance(last.get("step"), int) else None
    if not data.weights and isinstance(last.get("weights"), Mapping):
        data.weights = _weights(last["weights"])
        data.shadow = bool(last.get("shadow"))
        if data.shadow:
            data.step_kind = "shadow"
    if state is not None and state.phase is Phase.PROMOTED:
        data.weights, data.shadow = {"production": 0.0, "candidate": 100.0}, False
    elif state is not None and state.phase is Phase.ROLLED_BACK:
        data.weights, data.shadow = {"production": 100.0, "candidate": 0.0}, False
    data.steps = steps
    if data.started_at is None and decisions and is_num(decisions[0].get("at")):
        data.started_at = float(decisions[0]["at"])
    if totals is not None:
        data.samples = {arm: totals.arms[arm].observed for arm in ARMS}
    elif isinstance(last.get("samples"), Mapping):
        data.samples = _samples(last["samples"])
    if rollout is not None:
        data.endpoints = {
            "production": list(rollout.production.endpoints),
            "candidate": list(rollout.candidate.endpoints),
        }
    _results_from_store(data, rollout, state, totals, now)
    _store_distributions(data, rollout, totals)
    _store_cost(data, rollout, totals)
    if not data.history:
        data.notes.append(
            "no metric history in the state store (written by a canary with metric history)"
        )
    return data


async def _history(store: Store, name: str) -> Any:
    history = getattr(store, "history", None)
    if history is None:
        return []
    return await history(name)


def _steps_of(decisions: list[dict[str, Any]]) -> int | None:
    for entry in reversed(decisions):
        if isinstance(entry.get("steps"), int):
            return int(entry["steps"])
    return None


def _results_from_store(
    data: ReportData,
    rollout: RolloutConfig | None,
    state: RolloutState | None,
    totals: RolloutAccumulator | None,
    now: float,
) -> None:
    """Each metric's latest result. While the rollout runs and its config is known: the tests
    run once more on the stored samples (the analysis canary runs, on the same merged
    samples), and the policy says what it waits for. A finished rollout: its newest history
    point (the results it ended on). Else the evidence in the decision log."""
    meta: dict[str, dict[str, Any]] = {}
    if rollout is not None and totals is not None:
        analysis = analyze(rollout, totals)
        meta = {r.name: result_dict(r) for r in (*analysis.metrics, analysis.srm)}
        if analysis.net is not None:
            meta[analysis.net.name] = result_dict(analysis.net)
        if not (data.history and data.terminal):
            data.metrics = [result_dict(r) for r in analysis.metrics]
            data.guards = [result_dict(analysis.srm)]
            data.net_value = None if analysis.net is None else result_dict(analysis.net)
            if state is not None:
                data.status = decide(rollout, state, analysis, now).reason
            return
    if data.history:
        newest = next((h.metrics for h in reversed(data.history) if h.metrics), {})
        order = [m.name for m in rollout.analysis.metrics] if rollout is not None else []
        names = [n for n in order if n in newest] + [n for n in newest if n not in order]
        results = []
        for name in names:
            base = {k: v for k, v in meta.get(name, {}).items() if k not in ("explain",)}
            results.append({**(base or infer_scale(newest[name])), **newest[name]})
        if not meta and results:
            data.notes.append(
                "the metrics' scales (ratio or difference) are inferred from their tolerance "
                "lines: pass -c FILE (the rollout file) for their definitions"
            )
        data.metrics = [m for m in results if m.get("kind") != "net_value"]
        net = [m for m in results if m.get("kind") == "net_value"]
        data.net_value = net[0] if net else None
        data.guards = []
    else:
        seen: dict[str, dict[str, Any]] = {}
        for entry in data.decisions:
            ev = entry.get("evidence")
            if isinstance(ev, Mapping) and ev.get("metric"):
                name = str(ev["metric"])
                seen[name] = {**meta.get(name, {}), "name": name, **ev}
        data.metrics = list(seen.values())
        if rollout is None:
            data.notes.append(
                "metric results come from the decision log's evidence only: pass -c FILE "
                "(the rollout file) to run the tests on the stored samples"
            )
    if state is not None and not data.status:
        data.status = state.reason


_RATE_WORDS = ("error", "accuracy", "rate", "agree", "correct", "success")


def infer_scale(m: Mapping[str, Any]) -> dict[str, Any]:
    """A result's scale guessed from its tolerance line when nothing defines it (a history
    point read without the rollout file): a line near 1 is a candidate/production ratio
    (1 + margin), else a difference (in pp for rate-like names)."""
    name = str(m.get("name", ""))
    tol = m.get("tolerance")
    if name == "net_value":
        return {"kind": "net_value", "relative": False, "direction": "increase", "margin": 0.0}
    if not is_num(tol):
        return {}
    if 0.3 <= tol <= 3.0 and tol != 1.0:
        direction = "increase" if tol > 1.0 else "decrease"
        return {"kind": "mean", "relative": True, "direction": direction, "margin": abs(tol - 1)}
    rate = any(w in name.lower() for w in _RATE_WORDS) and abs(tol) < 1.0
    return {
        "kind": "rate" if rate else "mean",
        "relative": False,
        "direction": "increase" if tol >= 0 else "decrease",
        "margin": abs(tol),
    }


def _store_distributions(
    data: ReportData, rollout: RolloutConfig | None, totals: RolloutAccumulator | None
) -> None:
    if totals is None:
        return
    signals = list(DISTRIBUTION_SIGNALS)
    if rollout is not None:  # and every signal a quantile metric judges
        for m in rollout.analysis.metrics:
            if m.stat.startswith("p") and m.signal not in signals:
                signals.append(m.signal)
    data.distributions = parse_distributions(distributions(totals, signals=tuple(signals)))
    data.distributions_source = "from the state store (the merged log-bucket histograms)"
    if drop_echo(data.distributions):
        data.distributions_source += "; ttft left out: it equals latency (no streaming)"


def _store_cost(
    data: ReportData, rollout: RolloutConfig | None, totals: RolloutAccumulator | None
) -> None:
    """Cost per 1000 inferences per arm: the mean of the ``cost`` signal the proxy recorded
    (present when a metric judges cost), else the pricing of the rollout file when it needs
    no measurement (a fixed price per request, or replica-hours over the arm's observed
    request rate)."""
    if totals is not None:
        means = {}
        for arm in ARMS:
            sig = totals.arms[arm].signals.get("cost")
            means[arm] = cost_per_1000(sig.mean) if sig is not None and sig.n else None
        if any(v is not None for v in means.values()):
            data.cost_per_1k = means
            data.cost_source = "mean of each arm's recorded per-request cost"
            return
    if rollout is None:
        data.notes.append(
            "no cost per 1k inferences: the store holds no recorded cost (no metric judges "
            "cost); pass -c FILE for the arms' pricing"
        )
        return
    elapsed = data.generated_at - data.started_at if data.started_at is not None else None
    end = data.ended_at()
    if end is not None and data.started_at is not None:
        elapsed = end - data.started_at
    out: dict[str, float | None] = {}
    for arm, cfg in (("production", rollout.production), ("candidate", rollout.candidate)):
        price = cfg.cost
        if price is None:
            out[arm] = None
            continue
        if price.per_1k_tokens > 0 or price.header:
            out[arm] = None  # depends on what each response reported: not in the store
            continue
        per_request = price.per_request
        if price.per_hour > 0:
            n = data.samples.get(arm, 0)
            if not elapsed or n <= 0:
                out[arm] = None
                continue
            per_request += price.per_hour * price.replicas / 3600.0 / (n / elapsed)
        out[arm] = cost_per_1000(per_request)
    if any(v is not None for v in out.values()):
        data.cost_per_1k = out
        data.cost_source = (
            "the rollout file's pricing (replica-hours spread over each arm's requests "
            "while the rollout ran)"
        )


def _snapshot_sqlite(path: str, into: str) -> None:
    """Copy the SQLite file ``path`` into ``into`` with the online backup API: a consistent
    snapshot, read-only on ``path``."""
    if not os.path.exists(path):
        raise StoreError(f"state file {path} does not exist")
    if os.path.isdir(path):
        raise StoreError(f"state file {path} is a directory")
    uri = "file:" + quote(os.path.abspath(path)) + "?mode=ro"
    src = sqlite3.connect(uri, uri=True, timeout=5.0)
    try:
        dst = sqlite3.connect(into)
        try:
            src.backup(dst)
        finally:
            dst.close()
    finally:
        src.close()


async def open_readonly(
    *, path: str | None = None, url: str | None = None, backend: str = "sqlite"
) -> tuple[Store, str, tempfile.TemporaryDirectory[str] | None]:
    """Open the state store for reading: ``(store, description, temp dir to clean up)``.

    SQLite: ``path`` must exist (a report never creates an empty state file); it is read
    through a snapshot copy. Redis: ``url``; opening it only writes the store's id where
    Redis has none yet (a Redis canary never used).
    """
    if backend == "redis":
        if not url:
            raise StoreError("a Redis state store needs its url: redis://HOST:PORT/DB")
        store = open_store("redis", url=url)
        await store.open()
        return store, f"the Redis state store {url}", None
    if backend != "sqlite" or not path:
        raise StoreError(
            f"state.backend {backend!r} keeps nothing after canary stops: report from the "
            "admin API of the running canary instead (--admin URL)"
        )
    tmp = tempfile.TemporaryDirectory(prefix="canary-report-")
    copy = os.path.join(tmp.name, "state.db")
    try:
        await asyncio.to_thread(_snapshot_sqlite, path, copy)
    except StoreError:
        tmp.cleanup()
        raise
    except sqlite3.Error as exc:
        tmp.cleanup()
        raise StoreError(f"cannot read state file {path}: {exc}") from exc
    store = SQLiteStore(copy)
    try:
        await store.open()
    except StoreError as exc:
        tmp.cleanup()
        raise StoreError(str(exc).replace(copy, path)) from None
    return store, f"state file {path}", tmp


async def report_from_store(
    name: str,
    *,
    path: str | None = None,
    url: str | None = None,
    backend: str = "sqlite",
    config: Config | None = None,
    now: float | None = None,
) -> ReportData:
    """Open the store read-only, build the report of ``name``, close it."""
    rollout = None
    if config is not None:
        rollout = next((r for r in config.rollouts if r.name == name), None)
    store, source, tmp = await open_readonly(path=path, url=url, backend=backend)
    try:
        data = await from_store(store, name, rollout=rollout, source=source, now=now)
    finally:
        try:
            await store.close()
        finally:
            if tmp is not None:
                tmp.cleanup()
    if config is not None and rollout is None:
        data.notes.append(f"the rollout file has no rollout named {name!r}: its config unused")
    return data


__all__ = [
    "DISTRIBUTION_SIGNALS",
    "from_admin",
    "from_store",
    "open_readonly",
    "parse_distributions",
    "parse_history",
    "report_from_store",
    "result_dict",
]
