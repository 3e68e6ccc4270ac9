"""Check ``canary simulate`` against real rollouts: predicted vs measured time to decision.

For each scenario of :mod:`loadtest.scenarios` that maps onto simulate's traffic model, this
builds the scenario's own rollout file (``Scenario.rollout``), describes its fake models as
simulate's traffic (rate, lognormal latency, errors, accuracy, labels ``feedback.ttl`` late,
sticky users) and effects (the candidate's slowdown, errors, accuracy, cost, ttft), runs
:func:`canary.simulate.simulate`, and compares the predicted median time to the terminal
decision with the measured one: the scenarios run for real (``--measure``: ``python -m
loadtest.scenarios --only NAME --repeat N``, bounded), or their output saved earlier is parsed
(``--measured FILE ...``)::

    python -m loadtest.simulate_check --measure --repeat 3          # runs the scenarios (minutes)
    python -m loadtest.scenarios --only identical slow30 > out.txt  # or measure once, then
    python -m loadtest.simulate_check --measured out.txt            # compare (seconds)

Not mapped (simulate has no model of them): ``band20`` (a slowdown of one band of the
distribution), ``drift_aa`` (latency trending on both arms), ``down`` (the candidate stops
mid-rollout), ``memory40``/``memory_same`` (resource metrics), ``restart``, and the
``accuracy_*`` trade-off scenarios (minutes each; mapped, run them with ``--only``).
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from canary.config import RolloutConfig, load_config_text
from canary.simulate import Effect, Scenario, Traffic, simulate
from loadtest.fake_model import FakeModelConfig
from loadtest.scenarios import SCENARIOS
from loadtest.scenarios import Scenario as LoadScenario

DEFAULT = (
    "identical",
    "slow30",
    "errors5",
    "cheaper",
    "ttft2x",
    "unreachable",
    "labels_worse3",
    "labels_better2",
    "sticky_aa",
)
OPTIONAL = ("accuracy_slow8", "accuracy_slow25")
TOLERANCE = 0.30  # the check: predicted median within +-30% of the measured one


@dataclass
class Mapping:
    """A load scenario as simulate's input."""

    name: str
    rollout: RolloutConfig
    traffic: Traffic
    effects: dict[str, Effect]
    expect: str
    how: str


def _rollout(sc: LoadScenario) -> RolloutConfig:
    doc = sc.rollout("http://127.0.0.1:1", "http://127.0.0.1:2")
    return load_config_text(yaml.safe_dump(doc), f"scenario {sc.name}").rollouts[0]


def _rel(cand: float, prod: float) -> Effect | None:
    return None if math.isclose(cand, prod) else Effect(cand / prod - 1.0, True)


def map_scenario(name: str) -> Mapping | None:
    """simulate's input for load scenario ``name`` (None: simulate has no model of it)."""
    sc = SCENARIOS[name]
    if name in ("band20", "drift_aa", "down", "memory40", "memory_same", "restart"):
        return None
    p: FakeModelConfig = sc.production
    c: FakeModelConfig = sc.candidate
    rollout = _rollout(sc)
    effects: dict[str, Effect] = {}
    how: list[str] = []
    unreachable = sc.candidate_down_at == 0.0
    if sc.chat:
        # Streamed: ttft and the total are sleeps (ttft, then n-1 inter-token gaps); the
        # jitter of the event loop on them is modelled as a log-sd of 0.05.
        total_p = p.ttft + p.inter_token * (p.completion_tokens - 1)
        total_c = c.ttft + c.inter_token * (c.completion_tokens - 1)
        traffic = Traffic(
            rate=sc.rate,
            latency_median=total_p,
            latency_sigma=0.05,
            ttft_median=p.ttft,
            ttft_sigma=0.05,
            error_rate=p.error_rate,
        )
        for key, e in (("latency", _rel(total_c, total_p)), ("ttft", _rel(c.ttft, p.ttft))):
            if e is not None:
                effects[key] = e
        how.append(f"ttft {1000 * p.ttft:g} vs {1000 * c.ttft:g} ms, total {1000 * total_p:g} ms")
    else:
        traffic = Traffic(
            rate=sc.rate,
            latency_median=p.latency_median,
            latency_sigma=p.latency_sigma,
            error_rate=p.error_rate,
            accuracy=p.accuracy,
            users=sc.users or 1000,
            user_latency_sigma=p.user_latency_sigma,
            user_error_sigma=p.user_error_sigma,
        )
        lat = _rel(c.latency_median * c.slowdown, p.latency_median * p.slowdown)
        if lat is not None:
            effects["latency"] = lat
    keys = {m.signal for m in rollout.analysis.metrics}
    if unreachable:
        effects["error"] = Effect(1.0 - p.error_rate, False)
        how.append("candidate never up: every candidate request an error")
    elif not math.isclose(c.error_rate, p.error_rate):
        effects["error"] = Effect(c.error_rate - p.error_rate, False)
    if "cost" in keys and not math.isclose(c.cost, p.cost):
        effects["cost"] = Effect(c.cost / p.cost - 1.0, True)
    acc_keys = [m.signal for m in rollout.analysis.metrics if m.name == "accuracy"]
    if acc_keys and not math.isclose(c.accuracy, p.accuracy):
        effects[acc_keys[0]] = Effect(c.accuracy - p.accuracy, False)
    if sc.users:
        how.append(f"{sc.users} sticky users")
    if sc.kind == "feedback":
        how.append(f"labels count at maturity ({rollout.feedback.ttl:g} s)")
    expect = "promote" if sc.expect in ("promoted", "not_rolled_back") else "rollback"
    return Mapping(name, rollout, traffic, effects, expect, "; ".join(how))


# -- measured ------------------------------------------------------------------------------------

_HEADER = re.compile(r"^== (\S+):.*limit ([\d.]+) s\)")
_TIME = re.compile(r"^\s+decision time\s+([\d.]+) s")
_REQUESTS = re.compile(r"^\s+requests\s+(\d+) candidate")
_OUTCOME = re.compile(r"^\s+outcome\s+(.+?) \(expected")


@dataclass
class Measured:
    times: list[float] = field(default_factory=list)
    candidate: list[int] = field(default_factory=list)
    outcomes: list[str] = field(default_factory=list)
    limits: list[float] = field(default_factory=list)  # each run's time limit
    source: str = ""

    @property
    def undecided(self) -> int:
        return sum(o.startswith("no decision") for o in self.outcomes)

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times else None


def parse_scenarios_output(text: str, source: str, into: dict[str, Measured]) -> None:
    """Decision times per scenario from ``python -m loadtest.scenarios`` output."""
    name = None
    for line in text.splitlines():
        if m := _HEADER.match(line):
            name = m.group(1)
            into.setdefault(name, Measured(source=source)).limits.append(float(m.group(2)))
        elif name is not None and (m := _OUTCOME.match(line)):
            into[name].outcomes.append(m.group(1))
        elif name is not None and (m := _TIME.match(line)):
            into[name].times.append(float(m.group(1)))
        elif name is not None and (m := _REQUESTS.match(line)):
            into[name].candidate.append(int(m.group(1)))


def measure(names: Sequence[str], repeat: int, seed: int, log: str) -> dict[str, Measured]:
    """Run the scenarios for real (one process, bounded by their own time limits)."""
    cmd = [sys.executable, "-m", "loadtest.scenarios", "--only", *names,
           "--repeat", str(repeat), "--seed", str(seed)]  # fmt: skip
    print("measuring: " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=False)
    with open(log, "w") as f:
        f.write(proc.stdout)
    out: dict[str, Measured] = {}
    parse_scenarios_output(proc.stdout, log, out)
    return out


# -- compare -------------------------------------------------------------------------------------


def predict(mp: Mapping, repeats: int, seed: int) -> dict[str, Any]:
    sc = Scenario(mp.name, mp.effects, mp.expect)
    rep = simulate(mp.rollout, mp.traffic, [sc], repeats=repeats, detect=False, seed=seed,
                   time_limit=600.0)  # fmt: skip
    summary = rep.summaries[0]
    times = [r.seconds for r in summary.runs if r.by != "max_duration"]
    return summary.to_dict() | {"decision": summary.decision, "decided_at": times}


def compare(p: dict[str, Any], m: Measured) -> tuple[str, str, str]:
    """(measured, ratio, within) cells; within is yes, **no** or - (nothing measured)."""
    t = p["seconds"]
    med = m.median
    if med is None and m.undecided:
        # No measured decision within the scenario's time limit: the prediction agrees when
        # most simulated rollouts do not decide within it either.
        limit = min(m.limits)
        within = sum(x <= limit for x in p["decided_at"]) / max(1, p["repeats"])
        measured = f"no decision within {limit:g} s ({m.undecided}/{len(m.outcomes)})"
        ratio = f"decided within {limit:g} s: {100 * within:.0f}% predicted"
        return measured, ratio, "yes" if within < 0.5 else "**no**"
    if med is None:
        return f"- ({', '.join(m.outcomes) or 'not run'})", "-", "-"
    ratio_v = t["median"] / med
    measured = f"{med:.1f} s ({len(m.times)}: {', '.join(f'{x:.1f}' for x in m.times)})"
    return measured, f"{ratio_v:.2f}", "yes" if abs(ratio_v - 1.0) <= TOLERANCE else "**no**"


def table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| scenario | simulated as | predicted decision | predicted median time (p10-p90) | "
        "measured median time (runs) | ratio | within +-30% | predicted / measured "
        "candidate requests (medians) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p, m = r["predicted"], r["measured"]
        t = p["seconds"]
        effects = ", ".join(f"{k} {v}" for k, v in p["effects"].items()) or "identical"
        if r["how"]:
            effects += f"; {r['how']}"
        measured, ratio, ok = compare(p, m)
        cand_m = statistics.median(m.candidate) if m.candidate else math.nan
        out.append(
            f"| {r['name']} | {effects} | {p['decision']} | {t['median']:.1f} s "
            f"({t['p10']:.1f}-{t['p90']:.1f}) | {measured} | {ratio} | {ok} | "
            f"{p['candidate_requests']['median']:,.0f} / "
            f"{'-' if math.isnan(cand_m) else f'{cand_m:,.0f}'} |"
        )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--only", nargs="+", choices=[*DEFAULT, *OPTIONAL], help="these scenarios")
    ap.add_argument("--measure", action="store_true", help="run the scenarios for real")
    ap.add_argument("--measured", nargs="+", default=[], metavar="FILE",
                    help="saved output of python -m loadtest.scenarios")  # fmt: skip
    ap.add_argument("--repeat", type=int, default=3, help="real runs per scenario (--measure)")
    ap.add_argument("--repeats", type=int, default=50, help="simulated rollouts per scenario")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log", default="simulate_check_scenarios.txt",
                    help="where --measure keeps the scenarios' output")  # fmt: skip
    args = ap.parse_args(argv)
    names = args.only or list(DEFAULT)
    measured: dict[str, Measured] = {}
    for path in args.measured:
        with open(path) as f:
            parse_scenarios_output(f.read(), path, measured)
    if args.measure:
        measured.update(measure(names, args.repeat, args.seed, args.log))
    rows = []
    bad = compared = 0
    for name in names:
        mp = map_scenario(name)
        if mp is None:
            print(f"{name}: not mapped (simulate has no model of it)", file=sys.stderr)
            continue
        t0 = time.monotonic()
        pred = predict(mp, args.repeats, args.seed)
        m = measured.get(name, Measured())
        med = m.median
        ok = compare(pred, m)[2]
        bad += ok == "**no**"
        compared += ok != "-"
        print(f"{name}: predicted {pred['seconds']['median']:.1f} s, measured "
              f"{'-' if med is None else f'{med:.1f} s'} ({time.monotonic() - t0:.1f} s)",
              file=sys.stderr, flush=True)  # fmt: skip
        rows.append({"name": name, "how": mp.how, "predicted": pred, "measured": m})
    print(table(rows))
    print(
        f"\n{compared - bad}/{compared} predictions agree with the measurements (median time "
        f"within +-{100 * TOLERANCE:.0f}%, or no decision within the time limit)"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
