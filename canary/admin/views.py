"""The admin API's JSON of a rollout, from the controller's read model (:class:`RolloutView`).

``GET /api/v1/rollouts`` lists :func:`rollout_summary` of each rollout, ``GET
/api/v1/rollouts/{name}`` shows :func:`rollout_detail`; the CLI and the load tests read the same
shapes. They are an API: keys and their meaning only ever get added to. Non-finite numbers
(an estimate without data) are ``null``: JSON has no NaN.
"""

from __future__ import annotations

import math
from typing import Any

from canary.config import RolloutConfig
from canary.controller import RolloutView
from canary.controller.history import metric_info
from canary.controller.leadership import Leadership
from canary.decision import step_fields
from canary.stats import MetricResult


def rollout_summary(view: RolloutView) -> dict[str, Any]:
    """Where a rollout is: phase, step, weights, samples, the step's requirements, status."""
    cfg, state, now = view.config, view.state, view.at
    candidate, shadow = state.weights(cfg)
    step_index = min(state.step, len(cfg.steps) - 1)
    step = cfg.steps[step_index]
    if view.progress is not None:
        step_samples = view.progress.samples
    else:
        step_samples = max(0, view.candidate_samples - state.step_base)
    last = view.decisions[-1] if view.decisions else None
    return {
        "name": cfg.name,
        "phase": state.phase.value,
        **step_fields(step_index, len(cfg.steps)),
        "step_kind": "shadow" if step.is_shadow else "weight",
        "weights": {"production": 100.0 - candidate, "candidate": candidate},
        "shadow": shadow,
        "samples": {"production": view.production_samples, "candidate": view.candidate_samples},
        "step_samples": step_samples,
        "step_required": step.required_requests,
        "step_elapsed": max(0.0, now - state.step_started_at),
        "step_min_duration": step.required_duration,
        "elapsed": max(0.0, now - state.started_at),
        "deadline_in": state.deadline - now,
        "status": view.status,
        "store_ok": view.store_ok,
        "last_decision": None
        if last is None
        else {"action": last["action"], "reason": last["reason"], "at": last["at"]},
        # gates (docs/gates.md): where an automatic transition waits, and an approval given
        # at this step (`canary approve`) that has not opened its gate yet
        "gate": {
            "waiting": view.gate,
            "approved": state.approved_step is not None and state.approved_step == state.step,
        },
    }


def rollout_detail(view: RolloutView) -> dict[str, Any]:
    """:func:`rollout_summary` plus every test's result, the decision log and the endpoints."""
    out = rollout_summary(view)
    a = view.analysis
    out["metrics"] = [] if a is None else [result_dict(r) for r in a.metrics]
    out["guards"] = [] if a is None else [result_dict(a.srm)]
    out["net_value"] = None if a is None or a.net is None else result_dict(a.net)
    out["decisions"] = list(view.decisions)
    out["endpoints"] = {
        "production": list(view.config.production.endpoints),
        "candidate": list(view.config.candidate.endpoints),
    }
    return out


def result_dict(r: MetricResult) -> dict[str, Any]:
    """One test's result: verdict, estimate and interval, tolerance, sample sizes, explanation."""
    return {
        "name": r.name,
        "kind": r.kind.value,
        "verdict": r.verdict.value.upper(),
        "estimate": _num(r.estimate),
        "lower": _num(r.lower),
        "upper": _num(r.upper),
        "margin": r.margin,
        "relative": r.relative,
        "direction": r.direction.value,
        "tolerance": _num(r.tolerance),
        "n_production": r.n_production,
        "n_candidate": r.n_candidate,
        "alpha": r.alpha,
        "detail": r.detail,
        "explain": r.explain(),
    }


def _num(x: float) -> float | None:
    return x if math.isfinite(x) else None


def leader_view(lead: Leadership | None) -> dict[str, Any]:
    """Which canary process acts on the rollouts: ``shared`` is false for a process alone on
    its store (it always acts); else this process's name, whether it leads now, the leader's
    name as last read from the store and the lease's fencing token while this one leads."""
    if lead is None:
        return {"shared": False, "leading": True, "holder": None, "leader": None, "token": None}
    leading = lead.leading
    return {
        "shared": True,
        "leading": leading,
        "holder": lead.holder,
        "leader": lead.holder if leading else lead.leader,
        "token": lead.token if leading else None,
        "lease_ttl": lead.ttl,
    }


def rollout_history(cfg: RolloutConfig, points: list[dict[str, Any]]) -> dict[str, Any]:
    """``GET /api/v1/rollouts/{name}/history``: the rollout's history points, oldest first
    (their keys: :mod:`canary.controller.history`), and what each metric ``k`` of a point is
    (name, signal, stat, the tolerance as configured and the scale of its numbers)."""
    return {"rollout": cfg.name, "points": points, "metrics": metric_info(cfg)}


__all__ = ["leader_view", "result_dict", "rollout_detail", "rollout_history", "rollout_summary"]
