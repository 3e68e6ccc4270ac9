"""canary.signals: the one grammar and the one set of names that validation, the proxy, the
sources and the analysis share; pinned so that `canary validate` and `canary run` cannot
disagree about a signal again (issue 13: ``server_timing:a/b`` validated, then crashed run)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from canary.config import load_config_text
from canary.config._models import check_signal
from canary.errors import ConfigError
from canary.metrics import Metrics
from canary.observe import Recorder
from canary.observe.extract import JsonPath, ResponseExtractor
from canary.observe.resources import ResourceScraper
from canary.proxy import H1Transport, Proxy
from canary.signals import (
    ARMS,
    BARE_SIGNALS,
    CANDIDATE,
    NO_ANSWER_CLASS,
    OTHER_STATUS_CLASS,
    PREFIXED_SIGNALS,
    PRODUCTION,
    RATE_SIGNALS,
    ResourceQuery,
    ResourceQueryError,
    is_continuous,
    is_rate,
    is_resource,
    is_token,
    json_path_segments,
    paired_key,
    parse_prediction,
    parse_signal,
    status_class_labels,
)
from tests.test_config import MINIMAL, issues_of

# One example of every form a signal string can take, with the edge characters of each grammar.
EVERY_FORM = [
    *BARE_SIGNALS,
    "header:X-Model-Cost",
    "header:x!#$%&'*+.^_`|~9",  # every RFC 9110 tchar
    "server_timing:db",
    "server_timing:inference.gpu-1",
    "json:usage.total_tokens",
    "json:choices.0.score",
    "json:a_b-c.9",
    "resource:process_resident_memory_bytes",
    'resource:gpu_util{gpu="0", job=~"model-.*", env!="dev", zone!~"eu"}',
    "resource:ns:metric_total",
    "finish_reason:length",
    "finish_reason:content_filter",
]


def _rollout_with(signals: list[str]) -> str:
    """A rollout file that uses every signal in ``signals`` (and what each one requires)."""
    metrics = []
    for i, s in enumerate(signals):
        quoted = s.replace("'", "''")  # a YAML single-quoted scalar
        # The judge's win rate is tested against 50%: only a decrease is a regression.
        way = "max_decrease" if s == "judge" else "max_increase"
        metrics.append(
            f"        - {{name: m{i}, signal: '{quoted}', stat: rate, {way}: 5pp}}"
            if is_rate(s)
            else f"        - {{name: m{i}, signal: '{quoted}', max_increase: 5%}}"
        )
    return (
        textwrap.dedent(
            """\
        rollouts:
          - name: every
            production:
              endpoints: [http://127.0.0.1:8001]
              resources: {scrape: /metrics, every: 5s}
              cost: {per_1k_tokens: 0.002, header: X-Cost}
            candidate:
              endpoints: [http://127.0.0.1:8002]
              resources: {scrape: /metrics, every: 5s}
            steps: [{shadow: {}}, {weight: 5}]
            prediction: json:choices.0.label
            inputs: {fields: [amount, features.0, a-b_c]}
            judge: {url: "http://127.0.0.1:8100/judge"}
            analysis:
              metrics:
        """
        )
        + "\n".join(metrics)
        + "\n"
    )


# --- the issue's reproduction -------------------------------------------------------------------


def test_server_timing_with_a_slash_is_refused_by_validate_with_key_and_line() -> None:
    text = MINIMAL + (
        "    analysis:\n      metrics:\n"
        "        - name: st\n"
        "          signal: server_timing:a/b\n"
        "          max_increase: 10%\n"
    )
    assert issues_of(text) == [
        (
            "rollouts[0].analysis.metrics[0].signal",
            "'a/b' in 'server_timing:a/b' is not a valid Server-Timing metric name",
            9,
        )
    ]


def test_canary_validate_refuses_server_timing_with_a_slash(tmp_path: Path) -> None:
    path = tmp_path / "rollout.yaml"
    path.write_text(
        MINIMAL + "    analysis:\n      metrics:\n"
        "        - {name: st, signal: 'server_timing:a/b', max_increase: 10%}\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "canary", "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "rollouts[0].analysis.metrics[0].signal" in done.stdout + done.stderr
    assert "not a valid Server-Timing metric name (line 8)" in done.stdout + done.stderr


def test_every_accepted_form_validates_and_compiles_as_canary_run_does() -> None:
    config = load_config_text(_rollout_with(EVERY_FORM))
    rollout = config.rollouts[0]
    assert len(rollout.analysis.metrics) == len(EVERY_FORM)
    # What `canary run` builds from a validated file: the proxy's routes (response extractor,
    # input monitor, feedback store), the resource scraper; none of them may raise.
    proxy = Proxy(config, H1Transport(), Recorder(), Metrics())
    route = proxy.routes["every"]
    assert {s.key for s in route.extractor.signals} == {parse_signal(s).key for s in EVERY_FORM}
    scraper = ResourceScraper(rollout, Recorder(), Metrics())
    assert [s.query.signal for s in scraper.signals] == [s for s in EVERY_FORM if is_resource(s)]


def test_every_accepted_form_yields_its_value_from_a_response() -> None:
    extractor = ResponseExtractor(
        [s for s in EVERY_FORM if s.startswith(("header:", "server_timing:", "json:"))],
        prediction=parse_prediction("json:choices.0.label"),
    )
    inspector = extractor.start("application/json")
    inspector.feed(
        b'{"usage": {"total_tokens": 7}, "choices": [{"score": 0.5, "label": "cat"}],'
        b' "a_b-c": {"9": 3}}'
    )
    inspector.finish(
        {
            "x-model-cost": "0.25",
            "x!#$%&'*+.^_`|~9": "1",
            "server-timing": "db;dur=2, inference.gpu-1;dur=30",
        }
    )
    assert inspector.signals == {
        "header:x-model-cost": 0.25,
        "header:x!#$%&'*+.^_`|~9": 1.0,
        "server_timing:db": 0.002,
        "server_timing:inference.gpu-1": 0.03,
        "json:usage.total_tokens": 7.0,
        "json:choices.0.score": 0.5,
        "json:a_b-c.9": 3.0,
    }
    assert inspector.prediction == "cat"


# A grammar-shaped alphabet: kinds, separators and the characters each NAME may or may not hold.
_SIGNAL_TEXT = st.builds(
    "".join,
    st.lists(
        st.sampled_from(
            [*BARE_SIGNALS, *PREFIXED_SIGNALS, ":", ".", "/", "-", "_", "a", "Z", "0", " ",
             "{", "}", '"', "=", "~", "!", ",", ";", "é"]
        ),
        min_size=1,
        max_size=6,
    ),
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(_SIGNAL_TEXT)
def test_validation_accepts_exactly_what_the_proxy_compiles(text: str) -> None:
    try:
        key: str | None = check_signal(text)
    except ValueError:
        key = None
    try:
        compiled = ResponseExtractor([text])
        proxy_key: str | None = compiled.signals[0].key
    except ValueError:
        proxy_key = None
    assert key == proxy_key


_PATH_TEXT = st.text(alphabet="ab0_-. /:é", min_size=0, max_size=8)


@settings(max_examples=300, deadline=None)
@given(_PATH_TEXT)
def test_prediction_and_input_fields_use_the_json_path_grammar(path: str) -> None:
    # The loader strips surrounding whitespace before validating, as for every string.
    prediction = MINIMAL.replace("steps:", f"prediction: 'json:{path}'\n    steps:")
    try:
        rollout = load_config_text(prediction).rollouts[0]
        assert rollout.prediction is not None
        ResponseExtractor([], prediction=rollout.prediction)
        accepted = True
    except ConfigError:
        accepted = False
    assert accepted == _compiles(path.rstrip())
    fields = MINIMAL + f"    inputs: {{fields: ['{path}']}}\n"
    try:
        load_config_text(fields)
        accepted = True
    except ConfigError:
        accepted = False
    assert accepted == _compiles(path.strip())


def _compiles(path: str) -> bool:
    """True when the proxy compiles ``path`` (input health and prediction use JsonPath)."""
    try:
        JsonPath(path)
    except ValueError:
        return False
    return True


# --- the names ----------------------------------------------------------------------------------


def test_arms() -> None:
    assert ARMS == (PRODUCTION, CANDIDATE) == ("production", "candidate")


def test_resource_prefix_and_rates() -> None:
    assert is_resource("resource:rss") and not is_resource("json:resource")
    assert RATE_SIGNALS[:3] == ("error", "feedback", "agreement")
    assert {"empty_answer", "refusal"} <= set(RATE_SIGNALS)  # LLM answer quality, 0/1
    assert is_rate("finish_reason:length") and not is_continuous("finish_reason:stop")
    assert [s for s in BARE_SIGNALS if is_continuous(s)] == [
        "latency", "ttft", "tokens_per_s", "itl", "cost", "output_tokens", "repetition",
    ]  # fmt: skip
    assert is_continuous("header:x-cost") and not is_continuous("resource:rss")


@pytest.mark.parametrize("signal", [*BARE_SIGNALS, "header:X-Cost"])
def test_stat_rate_is_accepted_exactly_for_the_rate_signals(signal: str) -> None:
    way = "max_decrease" if signal == "judge" else "max_increase"  # a win rate: see judge.md
    text = MINIMAL.replace("steps: [{weight: 5}]", "steps: [{shadow: {}}, {weight: 5}]") + (
        "    prediction: json:p\n    judge: {url: 'http://127.0.0.1:8100/judge'}\n"
        "    analysis:\n      metrics:\n"
        f"        - {{name: r, signal: '{signal}', stat: rate, {way}: 1pp}}\n"
    )
    try:
        load_config_text(text)
        accepted = True
    except ConfigError as exc:
        assert "stat 'rate' applies to error, feedback, agreement" in str(exc)
        accepted = False
    assert accepted == is_rate(signal)


def test_paired_keys() -> None:
    assert paired_key("resource:rss", True) == "paired:log:resource:rss"
    assert paired_key("resource:rss", False) == "paired:diff:resource:rss"
    assert paired_key("resource:rss", True, changes=True) == "paired_change:log:resource:rss"
    assert paired_key("resource:rss", False, batch=4) == "paired_batch4:diff:resource:rss"


def test_status_class_labels_keep_each_place_s_label() -> None:
    metrics = status_class_labels(NO_ANSWER_CLASS)
    accumulators = status_class_labels(OTHER_STATUS_CLASS)
    assert metrics == ("none", "1xx", "2xx", "3xx", "4xx", "5xx")
    assert accumulators == ("other", "1xx", "2xx", "3xx", "4xx", "5xx")
    for status, label in ((0, "none"), (204, "2xx"), (599, "5xx"), (600, "none")):
        assert metrics[status // 100 if 100 <= status < 600 else 0] == label


def test_tokens_and_resource_queries() -> None:
    assert is_token("X-Cost") and not is_token("a/b") and not is_token("")
    assert json_path_segments("choices.0.score") == ["choices", "0", "score"]
    q = ResourceQuery.parse('resource:gpu{gpu="0"}')
    assert q.name == "gpu" and q.matches_labels({"gpu": "0"})
    with pytest.raises(ResourceQueryError, match="not a resource signal"):
        ResourceQuery.parse("json:gpu")
    with pytest.raises(ValueError, match="prediction must be 'json:PATH'"):
        parse_prediction("json:a..b")


# --- layering -----------------------------------------------------------------------------------


def test_signals_is_a_leaf_and_observe_resources_sits_below_decision_and_metrics() -> None:
    code = (
        "import sys\n"
        "import canary.signals\n"
        "leaf = sorted(m for m in sys.modules if m.startswith('canary'))\n"
        "import canary.observe.resources\n"
        "above = [m for m in ('canary.decision', 'canary.metrics') if m in sys.modules]\n"
        "print(leaf, above)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "['canary', 'canary.errors', 'canary.signals'] []"
