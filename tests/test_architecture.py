"""The layering of docs/architecture.md, pinned: which units may import which, what each
package exports, and one exception tree.

A change that adds an import edge between top-level units, or changes a package's public
names, fails here until this file (and docs/architecture.md) say so: the layering cannot rot
silently. The edges are read from the source (``ast``), imports under ``if TYPE_CHECKING:``
included: a type-only import is still a dependency a reader has to follow.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import pkgutil
from pathlib import Path
from types import ModuleType

import pytest

import canary
from canary.errors import CanaryError

ROOT = Path(canary.__file__).parent
_SPEC = importlib.util.spec_from_file_location(
    "arch_stats", ROOT.parent / "scripts" / "arch_stats.py"
)
assert _SPEC is not None and _SPEC.loader is not None
arch_stats = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(arch_stats)

# Top-level unit -> the units it may import (besides itself and the ``canary`` root, which
# holds only ``__version__``). Lower layers first; see docs/architecture.md "Layers".
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "stats": set(),
    "signals": {"errors"},
    "config": {"errors", "signals"},
    "observe": {"config", "errors", "signals", "stats"},
    "metrics": {"observe", "signals"},
    "store": {"errors", "observe"},
    "decision": {"config", "errors", "observe", "signals", "stats"},
    "analyzer": {"config", "decision", "errors", "metrics", "observe", "signals", "stats"},
    "controller": {
        "analyzer",
        "config",
        "decision",
        "errors",
        "metrics",
        "observe",
        "signals",
        "stats",
        "store",
    },
    "proxy": {"config", "errors", "metrics", "observe", "signals"},
    "webhooks": {"config", "errors"},
    "admin": {
        "config",
        "controller",
        "decision",
        "errors",
        "metrics",
        "observe",
        "signals",
        "stats",
    },
    "runtime": {
        "admin",
        "analyzer",
        "config",
        "controller",
        "decision",
        "errors",
        "metrics",
        "observe",
        "proxy",
        "signals",
        "store",
        "webhooks",
        "workers",
    },
    "workers": {"config", "errors"},
    "supervisor": {"admin", "config", "errors", "workers"},
    "admin_client": {"errors"},
    "simulate": {"config", "decision", "errors", "observe", "signals"},
    "report": {"admin_client", "config", "decision", "errors", "observe", "stats", "store"},
    "cli": {
        "admin_client",
        "config",
        "errors",
        "report",
        "runtime",
        "simulate",
        "supervisor",
        "workers",
    },
    "__main__": {"cli"},
}

# Each package's public names (its ``__all__``). Change deliberately, with the docs.
EXPORTS: dict[str, set[str]] = {
    "canary": {
        "__version__",
    },
    "canary.admin": {
        "FeedbackStores",
        "RolloutRouting",
        "make_admin_app",
        "warn_if_public",
    },
    "canary.analyzer": {
        "AnalysisJob",
        "Analyzer",
        "InlineAnalyzer",
        "WorkerAnalyzer",
    },
    "canary.config": {
        "AdminConfig",
        "AnalysisConfig",
        "AnswersConfig",
        "ArmConfig",
        "Config",
        "FeedbackConfig",
        "InputBaselineConfig",
        "InputFieldBaseline",
        "InputToleranceConfig",
        "InputsConfig",
        "JudgeConfig",
        "Margin",
        "MatchConfig",
        "MetricConfig",
        "PricingConfig",
        "PrometheusConfig",
        "ProxyConfig",
        "ResourcesConfig",
        "RolloutConfig",
        "RoutingConfig",
        "StateConfig",
        "StepConfig",
        "StickyConfig",
        "WebhookConfig",
        "load_config",
        "load_config_text",
        "parse_duration",
        "parse_margin",
        "parse_size",
    },
    "canary.controller": {
        "Controller",
        "DECISIONS_SHOWN",
        "FLUSH_INTERVAL",
        "Notifier",
        "RolloutView",
        "STORE_TIMEOUT",
        "StoreGuard",
        "WeightSink",
    },
    "canary.decision": {
        "Action",
        "Analysis",
        "CommandRejected",
        "Decision",
        "Evidence",
        "HARD_FAILURE_REQUESTS",
        "HARD_FAILURE_SECONDS",
        "MANUAL_ACTIONS",
        "Phase",
        "RolloutState",
        "StepProgress",
        "analyze",
        "command",
        "decide",
        "evidence",
        "failure_clock_moved",
        "fingerprint",
        "log_entry",
        "metric_alpha",
        "progress",
        "resume_failures",
        "step_fields",
        "track_failures",
        "transition",
        "upgrade_entry",
    },
    "canary.observe": {
        "ArmAccumulator",
        "ArmCost",
        "CLUSTERS",
        "COARSE_SHIFT",
        "ClusterCells",
        "ERROR_KINDS",
        "InputMonitor",
        "InputReport",
        "JsonPath",
        "LogHistogram",
        "Moments",
        "NO_CLUSTER",
        "Observation",
        "Pricing",
        "RateEstimator",
        "Recorder",
        "ResponseExtractor",
        "ResponseInspector",
        "RolloutAccumulator",
        "SignalAccumulator",
        "Weights",
        "coarse_bucket",
        "coarse_upper",
        "cost_per_1000",
        "parse_server_timing",
    },
    "canary.proxy": {
        "AiohttpTransport",
        "H1Transport",
        "HttpServer",
        "Proxy",
        "ServerLimits",
        "Timeouts",
        "Transport",
        "UpstreamResponse",
    },
    "canary.report": {
        "Distribution",
        "HistoryPoint",
        "Outcome",
        "ReportData",
        "from_admin",
        "from_store",
        "outcome",
        "render_html",
        "render_markdown",
        "report_from_store",
    },
    "canary.stats": {
        "ArmClusters",
        "ArmMoments",
        "ArmRouting",
        "ClusterHistogram",
        "DEFAULT_BATCH_SIZES",
        "DISTRIBUTION_QUANTILES",
        "DesignSummary",
        "Direction",
        "HistogramArrays",
        "IPWSummary",
        "MIN_MEAN_SAMPLES",
        "MetricKind",
        "MetricResult",
        "ShiftChecks",
        "StratifiedHistogram",
        "Verdict",
        "allocation_log_evidence",
        "bernoulli_cs",
        "classify",
        "design_summary",
        "distribution_test",
        "error_test",
        "few_clusters_factor",
        "ipw_summary",
        "mean_interval",
        "mean_shift_cs",
        "mean_test",
        "net_value",
        "normal_mixture_radius",
        "normal_mixture_rho2",
        "paired_interval",
        "paired_mean_test",
        "promotion_verdict",
        "proportion_shift_cs",
        "proportion_test",
        "quantile_cs",
        "quantile_rank_bounds",
        "quantile_test",
        "rate_ratio_cs",
        "rate_test",
        "rollback_verdict",
        "shift_checks",
        "split_alpha",
        "srm_test",
        "stratified_quantile_test",
        "variance_floor",
        "verdict_codes",
        "win_rate_interval",
        "win_rate_test",
    },
    "canary.store": {
        "DEFAULT_MAX_DECISIONS",
        "FileBackedStore",
        "IdentifiedStore",
        "Lease",
        "MemoryStore",
        "RedisStore",
        "SQLiteStore",
        "Store",
        "check_identity",
        "open_store",
    },
}


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        out.append((arch_stats._module_name(ROOT, path), path))
    return out


def _edges() -> dict[tuple[str, str], list[str]]:
    """(from unit, to unit) -> the modules that make the edge."""
    edges: dict[tuple[str, str], list[str]] = {}
    for name, path in _modules():
        src = arch_stats._unit(name)
        for target, _typing in arch_stats.imports(ast.parse(path.read_text()), "canary"):
            dst = arch_stats._unit(target) if target != "canary" else "canary"
            if dst not in (src, "canary"):
                edges.setdefault((src, dst), []).append(f"{name} imports {target}")
    return edges


def test_every_unit_has_a_rule() -> None:
    units = {arch_stats._unit(n) for n, _ in _modules() if n != "canary"}
    assert units == set(ALLOWED), "add the new unit to ALLOWED and to docs/architecture.md"


def test_imports_follow_the_layers() -> None:
    wrong = [
        f"{src} -> {dst}: {', '.join(sites)}"
        for (src, dst), sites in sorted(_edges().items())
        if dst not in ALLOWED.get(src, set())
    ]
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_the_layers_have_no_cycle() -> None:
    """The allowed graph itself is acyclic (so no pair of units can depend on each other)."""
    seen: dict[str, int] = {}

    def visit(unit: str, path: tuple[str, ...]) -> None:
        state = seen.get(unit)
        assert state != 1, f"cycle: {' -> '.join((*path, unit))}"
        if state == 2:
            return
        seen[unit] = 1
        for dep in ALLOWED[unit]:
            visit(dep, (*path, unit))
        seen[unit] = 2

    for unit in ALLOWED:
        visit(unit, ())


def test_proxy_and_controller_never_import_each_other() -> None:
    edges = _edges()
    assert ("proxy", "controller") not in edges and ("controller", "proxy") not in edges
    assert ("admin", "proxy") not in edges  # admin gets narrow interfaces from the runtime


def test_stats_imports_nothing_from_canary() -> None:
    assert not [e for e in _edges() if e[0] == "stats"]


def _packages() -> list[ModuleType]:
    out = [canary]
    for info in pkgutil.walk_packages(canary.__path__, "canary."):
        if info.ispkg:
            out.append(importlib.import_module(info.name))
    return out


@pytest.mark.parametrize("package", _packages(), ids=lambda p: p.__name__)
def test_each_package_curates_its_exports(package: ModuleType) -> None:
    exported = getattr(package, "__all__", None)
    assert exported is not None, f"{package.__name__} has no __all__"
    missing = [n for n in exported if not hasattr(package, n)]
    assert not missing, f"{package.__name__}.__all__ names what it lacks: {missing}"
    assert len(set(exported)) == len(exported)
    assert set(exported) == EXPORTS.get(package.__name__), (
        f"{package.__name__}'s public names changed: update EXPORTS and the docs"
    )


def test_every_module_declares_its_public_names() -> None:
    lacking = [
        name
        for name, path in _modules()
        if not path.name.startswith("__")
        and not any(
            isinstance(node, ast.Assign)
            and any(getattr(t, "id", "") == "__all__" for t in node.targets)
            for node in ast.parse(path.read_text()).body
        )
    ]
    assert not lacking, f"modules without __all__: {lacking}"


def test_one_exception_tree() -> None:
    """Every exception class canary defines derives from CanaryError; private ones used only
    for control flow inside a module may stay outside (they never reach a caller)."""
    outside = []
    for info in pkgutil.walk_packages(canary.__path__, "canary."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__ == module.__name__
                and not name.startswith("_")
                and not issubclass(obj, CanaryError)
            ):
                outside.append(f"{module.__name__}.{name}")
    assert not outside, f"exceptions outside CanaryError: {outside}"
