"""The one home of canary's names: arms, signal strings, their keys and status-class labels.

Everything that names what is measured is defined here once and imported by the rollout file's
validation (:mod:`canary.config`), the proxy's response extraction
(:mod:`canary.observe.extract`), the background sources (feedback, resource scraping), the
analysis and the metrics. Two modules that parse or build the same string from two
definitions drift apart (``server_timing:a/b`` once passed ``canary validate`` and then made
``canary run`` fail); importing the one definition makes that impossible.

A leaf module: it imports only the standard library and :mod:`canary.errors`, so every layer
(config, observe, decision, proxy, metrics) may import it without a cycle.

Signal strings (DESIGN.md "Signals")::

    latency | ttft | error                     measured by the proxy
    tokens_per_s | itl | cost                  derived at the end of a response
    header:NAME | server_timing:NAME | json:PATH   read from the response
    feedback | agreement | resource:NAME{...}  external: joined later, compared or scraped
    promql:QUERY | promql:NAME                external: queried from a Prometheus server
    judge                                      a judge's verdict on a pair of answers
    finish_reason:VALUE | output_tokens | empty_answer | repetition | refusal
                                               LLM answer quality, read from the response
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import urlsplit

from canary.errors import CanaryError

__all__ = [
    "AGREEMENT",
    "ARMS",
    "BARE_SIGNALS",
    "CANDIDATE",
    "COST",
    "EMPTY_ANSWER",
    "ERROR",
    "FEEDBACK",
    "FINISH_REASON_PREFIX",
    "ITL",
    "JUDGE",
    "LATENCY",
    "NO_ANSWER_CLASS",
    "OTHER_STATUS_CLASS",
    "OUTPUT_TOKENS",
    "PREFIXED_SIGNALS",
    "PRODUCTION",
    "PROMQL_PLACEHOLDERS",
    "PROMQL_PREFIX",
    "RATE_SIGNALS",
    "REFUSAL",
    "REPETITION",
    "RESOURCE_PREFIX",
    "SOURCE_DERIVED",
    "SOURCE_EXTERNAL",
    "SOURCE_PROXY",
    "SOURCE_RESPONSE",
    "STATUS_CLASSES",
    "TOKENS_PER_S",
    "TTFT",
    "ResourceQuery",
    "ResourceQueryError",
    "Signal",
    "check_inline_promql",
    "expand_promql",
    "is_continuous",
    "is_promql",
    "is_rate",
    "is_resource",
    "is_token",
    "is_windowed",
    "json_path_segments",
    "paired_key",
    "parse_prediction",
    "parse_signal",
    "promql_duration",
    "promql_endpoints",
    "promql_placeholders",
    "promql_query_name",
    "status_class_labels",
]

# --- arms ---------------------------------------------------------------------------------------

PRODUCTION: Final = "production"
CANDIDATE: Final = "candidate"
ARMS: Final = (PRODUCTION, CANDIDATE)

# --- signal strings -----------------------------------------------------------------------------

# Where a signal's value comes from.
SOURCE_PROXY: Final = "proxy"  # measured by the proxy itself: latency, ttft, error
SOURCE_DERIVED: Final = "derived"  # computed at finish from measured and extracted values
SOURCE_RESPONSE: Final = "response"  # read from the response: header, Server-Timing, JSON
SOURCE_EXTERNAL: Final = "external"  # not per response: scraped, posted later or paired

LATENCY: Final = "latency"
TTFT: Final = "ttft"
ERROR: Final = "error"
TOKENS_PER_S: Final = "tokens_per_s"
ITL: Final = "itl"  # inter-token latency of a stream, seconds per token
COST: Final = "cost"
FEEDBACK: Final = "feedback"  # ground truth posted later, joined on the request id
AGREEMENT: Final = "agreement"  # shadow steps: candidate's prediction == production's
JUDGE: Final = "judge"  # a judge's verdict on both arms' answers to one request (win rate)
# LLM answer quality, read from an OpenAI-compatible body or stream (canary.observe.answers)
OUTPUT_TOKENS: Final = "output_tokens"  # usage.completion_tokens, else text events of a stream
EMPTY_ANSWER: Final = "empty_answer"  # 0/1: the answer's text is empty or whitespace
REPETITION: Final = "repetition"  # share of the answer's word n-grams that repeat, in [0, 1]
REFUSAL: Final = "refusal"  # 0/1: a refusal pattern matches the start of the answer
FINISH_REASON_PREFIX: Final = "finish_reason:"  # finish_reason:VALUE, 0/1 per answer

# Bare signal names and the source of each.
BARE_SIGNALS: Final[dict[str, str]] = {
    LATENCY: SOURCE_PROXY,
    TTFT: SOURCE_PROXY,
    ERROR: SOURCE_PROXY,
    TOKENS_PER_S: SOURCE_DERIVED,
    ITL: SOURCE_DERIVED,
    COST: SOURCE_DERIVED,
    FEEDBACK: SOURCE_EXTERNAL,
    AGREEMENT: SOURCE_EXTERNAL,
    JUDGE: SOURCE_EXTERNAL,
    OUTPUT_TOKENS: SOURCE_RESPONSE,
    EMPTY_ANSWER: SOURCE_RESPONSE,
    REPETITION: SOURCE_RESPONSE,
    REFUSAL: SOURCE_RESPONSE,
}
# NAME-taking signal kinds and the source of each.
PREFIXED_SIGNALS: Final[dict[str, str]] = {
    "header": SOURCE_RESPONSE,
    "server_timing": SOURCE_RESPONSE,
    "json": SOURCE_RESPONSE,
    "resource": SOURCE_EXTERNAL,  # scraped from the arm's Prometheus endpoint
    "promql": SOURCE_EXTERNAL,  # queried from a Prometheus server (analysis.prometheus)
    "finish_reason": SOURCE_RESPONSE,  # the LLM answer's finish_reason (0/1 per answer)
}
RESOURCE_PREFIX: Final = "resource:"
PROMQL_PREFIX: Final = "promql:"
_JSON_PREFIX: Final = "json:"

# Signals whose per-request value is 0 or 1 (or a reward in [0, 1]): compared as rates, the only
# ones ``stat: rate`` applies to, and never as a distribution of values.
RATE_SIGNALS: Final = (ERROR, FEEDBACK, AGREEMENT, JUDGE, EMPTY_ANSWER, REFUSAL)

_EXPECTED = ", ".join([*BARE_SIGNALS, *(f"{k}:NAME" for k in PREFIXED_SIGNALS)])
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token (header and metric names)
_JSON_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")


def is_token(text: str) -> bool:
    """True for an RFC 9110 token: what an HTTP header name (or Server-Timing name) may be."""
    return _TOKEN.fullmatch(text) is not None


def is_resource(signal: str) -> bool:
    """True for a ``resource:NAME{...}`` signal (scraped per window, not measured per request)."""
    return signal.startswith(RESOURCE_PREFIX)


def is_promql(signal: str) -> bool:
    """True for a ``promql:QUERY`` or ``promql:NAME`` signal (queried per window)."""
    return signal.startswith(PROMQL_PREFIX)


def is_windowed(signal: str) -> bool:
    """True for a signal compared per time window, paired across the arms, not per request:
    ``resource:`` (scraped from the arms) and ``promql:`` (queried from Prometheus)."""
    return is_resource(signal) or is_promql(signal)


def is_continuous(signal: str) -> bool:
    """True when the signal has a value per request that is not a rate: its values can be
    compared as a distribution (latency, ttft, header:..., json:...; not error, resource: or
    promql:)."""
    return not is_rate(signal) and not is_windowed(signal)


def is_rate(signal: str) -> bool:
    """True for a signal whose per-request value is 0 or 1 (or a reward in [0, 1]): the
    RATE_SIGNALS and every ``finish_reason:VALUE``; ``stat: rate`` applies to these only."""
    return signal in RATE_SIGNALS or signal.startswith(FINISH_REASON_PREFIX)


@dataclass(frozen=True, slots=True)
class Signal:
    """A parsed signal string.

    ``key`` is the canonical form used in :attr:`Observation.signals` and the accumulators:
    the input with header names lower-cased (HTTP header names are case-insensitive), so
    ``header:X-Model-Cost`` and ``header:x-model-cost`` are the same signal.
    """

    kind: str  # a BARE_SIGNALS name or a PREFIXED_SIGNALS kind
    arg: str  # the NAME after the colon; "" for bare signals
    key: str
    source: str  # SOURCE_PROXY | SOURCE_DERIVED | SOURCE_RESPONSE | SOURCE_EXTERNAL

    @property
    def per_request(self) -> bool:
        """True when the signal has a value per request (everything but resource/feedback)."""
        return self.source != SOURCE_EXTERNAL


def parse_signal(text: str) -> Signal:
    """Parse and classify a signal string; raise ValueError naming what is wrong.

    The rollout file is validated with it (so ``canary validate`` reports the key and line)
    and the proxy compiles its extractors with it: a string accepted by one is accepted by both.
    """
    if not isinstance(text, str) or not text:
        raise ValueError(f"a signal must be a non-empty string, got {text!r}")
    kind, sep, arg = text.partition(":")
    if not sep:
        source = BARE_SIGNALS.get(text)
        if source is None:
            hint = " (it needs a NAME, e.g. 'header:X-Cost')" if text in PREFIXED_SIGNALS else ""
            raise ValueError(f"unknown signal {text!r}{hint}; expected one of {_EXPECTED}")
        return Signal(text, "", text, source)
    if kind in BARE_SIGNALS:
        raise ValueError(f"signal {kind!r} takes no argument, got {text!r}")
    source = PREFIXED_SIGNALS.get(kind)
    if source is None:
        raise ValueError(f"unknown signal kind {kind!r} in {text!r}; expected one of {_EXPECTED}")
    if not arg:
        raise ValueError(f"signal {text!r} needs a name after '{kind}:'")
    if kind == "header":
        if not is_token(arg):
            raise ValueError(f"{arg!r} in {text!r} is not a valid HTTP header name")
        return Signal(kind, arg.lower(), f"header:{arg.lower()}", source)
    if kind == "server_timing":
        if not is_token(arg):
            raise ValueError(f"{arg!r} in {text!r} is not a valid Server-Timing metric name")
    elif kind == "json":
        json_path_segments(arg)  # raises ValueError with the reason
    elif kind == "finish_reason":
        if not _JSON_SEGMENT.fullmatch(arg):
            raise ValueError(
                f"{arg!r} in {text!r} is not a finish_reason such as 'length', 'stop' or "
                "'content_filter' (letters, digits, '_' and '-')"
            )
    elif kind == "resource":
        ResourceQuery.parse(text)  # the name and label selector; a ResourceQueryError says why
    elif kind == "promql" and promql_query_name(text) is None:
        check_inline_promql(arg)  # placeholders; a query both arms would share is refused
    return Signal(kind, arg, text, source)


def json_path_segments(text: str) -> list[str]:
    """The segments of a dot path into JSON (``usage.total_tokens``, ``choices.0.score``).

    The one JSON path grammar: ``json:`` signals, ``prediction: json:PATH`` and the input
    health ``fields`` are all read with it. Raises ValueError saying what a path may contain.
    """
    segments = text.split(".")
    for seg in segments:
        if not _JSON_SEGMENT.fullmatch(seg):
            raise ValueError(
                f"{text!r} is not a JSON path: segments are separated by '.' and made of "
                f"letters, digits, '_' and '-' (e.g. 'usage.total_tokens', 'choices.0.score')"
            )
    return segments


def parse_prediction(text: str) -> str:
    """The PATH of a rollout's ``prediction: json:PATH``; ValueError when it is not one."""
    if text.startswith(_JSON_PREFIX):
        path = text[len(_JSON_PREFIX) :]
        try:
            json_path_segments(path)
        except ValueError:
            pass
        else:
            return path
    raise ValueError(f"prediction must be 'json:PATH' such as 'json:prediction', got {text!r}")


# --- resource signals ---------------------------------------------------------------------------

_MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*(,|$)')
_PROM_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_UNESCAPE = re.compile(r"\\(.)")


class ResourceQueryError(CanaryError, ValueError):
    """A resource signal that cannot be read (a ValueError too: the config validators'
    way of reporting a bad value)."""


@dataclass(frozen=True)
class ResourceQuery:
    """A parsed ``resource:NAME{label="value", ...}`` signal: a PromQL-style selector.

    Parsed where the rollout file is validated (so ``canary validate``, start-up and reloads
    all reject a selector that cannot be read, with its key path and line) and used by the
    scrapers (:mod:`canary.observe.resources`) to pick series from an exposition.

    ``signal`` is the accumulator key (the signal string). Matchers are ``=``, ``!=``, ``=~``
    and ``!~`` as in PromQL (regular expressions match the whole value). Every sample that
    matches on an endpoint is summed: use a selector to pick one series.
    """

    signal: str
    name: str
    matchers: tuple[tuple[str, str, str], ...] = ()
    _regex: tuple[re.Pattern[str] | None, ...] = field(default=(), compare=False, repr=False)

    @classmethod
    def parse(cls, signal: str) -> ResourceQuery:
        """Parse ``resource:NAME`` or ``resource:NAME{...}``; ResourceQueryError says why."""
        arg = signal[len(RESOURCE_PREFIX) :] if is_resource(signal) else ""
        if not arg:
            raise ResourceQueryError(f"{signal!r} is not a resource signal ('resource:METRIC')")
        name, brace, rest = arg.partition("{")
        if not _PROM_NAME.fullmatch(name):
            raise ResourceQueryError(f"{name!r} in {signal!r} is not a Prometheus metric name")
        matchers: list[tuple[str, str, str]] = []
        if brace:
            if not rest.endswith("}"):
                raise ResourceQueryError(f"label selector of {signal!r} must end with '}}'")
            body = rest[:-1]
            pos = 0
            while pos < len(body) and body[pos:].strip():
                m = _MATCHER.match(body, pos)
                if m is None or m.end() == pos:
                    raise ResourceQueryError(
                        f"cannot read the label selector of {signal!r} at {body[pos:]!r}; "
                        'expected label="value" (or !=, =~, !~), separated by commas'
                    )
                label, op, raw = m.group(1), m.group(2), m.group(3)
                matchers.append((label, op, _UNESCAPE.sub(_unescape, raw)))
                pos = m.end()
        regex: list[re.Pattern[str] | None] = []
        for label, op, value in matchers:
            if op in ("=~", "!~"):
                try:
                    regex.append(re.compile(value))
                except re.error as exc:
                    raise ResourceQueryError(
                        f"bad regular expression {value!r} for label {label!r} in {signal!r}: {exc}"
                    ) from exc
            else:
                regex.append(None)
        return cls(signal, name, tuple(matchers), tuple(regex))

    def matches_labels(self, labels: dict[str, str]) -> bool:
        """True when a sample with these labels is selected (a missing label reads as "")."""
        for (label, op, value), rx in zip(self.matchers, self._regex, strict=True):
            got = labels.get(label, "")
            if op == "=":
                ok = got == value
            elif op == "!=":
                ok = got != value
            else:
                assert rx is not None
                ok = (rx.fullmatch(got) is not None) == (op == "=~")
            if not ok:
                return False
        return True


def _unescape(m: re.Match[str]) -> str:
    c = m.group(1)
    return "\n" if c == "n" else c


def paired_key(
    signal_key: str, relative: bool, *, changes: bool = False, batch: int | None = None
) -> str:
    """Candidate-arm accumulator key of a resource signal's per-window paired value.

    ``log`` holds ``log(c / p)`` per window (relative tolerances), ``diff`` holds ``c - p``
    (absolute ones); with ``changes`` the change of that value since the previous consecutive
    window (its squares estimate the autocorrelation); with ``batch`` the sum of the last
    ``batch`` consecutive values (overlapping batch means: the long-run variance). Written
    by :mod:`canary.observe.resources`, read by the analysis and the analysis worker.
    """
    scale = "log" if relative else "diff"
    if batch is not None:
        return f"paired_batch{batch}:{scale}:{signal_key}"
    return f"paired{'_change' if changes else ''}:{scale}:{signal_key}"


# --- promql signals -----------------------------------------------------------------------------

#: Placeholders a ``promql:`` query may use, expanded per arm before it is sent.
PROMQL_PLACEHOLDERS: Final = ("arm", "endpoints", "window")
_PLACEHOLDER = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
_QUERY_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Go's regexp.QuoteMeta: what Prometheus' RE2 treats as special outside a character class.
_RE2_SPECIAL = re.compile(r"([\\.+*?()|\[\]{}^$])")
_ARM_PLACEHOLDERS = frozenset({"arm", "endpoints"})


def promql_query_name(signal: str) -> str | None:
    """The NAME of ``promql:NAME`` (a query named under each arm's ``queries``), or None for
    an inline query.

    The rule: the text after ``promql:`` is a name when it is one identifier
    (``[A-Za-z_][A-Za-z0-9_]*``, no ``:``, braces, brackets, parentheses or spaces);
    anything else is a PromQL query. A bare metric name is never a useful inline query:
    both arms would get the same answer (see :func:`check_inline_promql`).
    """
    arg = signal[len(PROMQL_PREFIX) :] if is_promql(signal) else signal
    return arg if _QUERY_NAME.fullmatch(arg) else None


def promql_placeholders(query: str) -> frozenset[str]:
    """The placeholders ``query`` uses; ValueError for an empty query, an unknown
    placeholder or an unclosed ``{{``."""
    if not query.strip():
        raise ValueError("a promql query must not be empty")
    found: set[str] = set()
    for m in _PLACEHOLDER.finditer(query):
        name = m.group(1)
        if name not in PROMQL_PLACEHOLDERS:
            known = ", ".join("{{" + p + "}}" for p in PROMQL_PLACEHOLDERS)
            raise ValueError(f"unknown placeholder {m.group(0)!r} in {query!r}; expected {known}")
        found.add(name)
    if "{{" in _PLACEHOLDER.sub("", query):
        raise ValueError(f"'{{{{' without a matching '}}}}' in {query!r}")
    return frozenset(found)


def check_inline_promql(query: str) -> frozenset[str]:
    """Check an inline ``promql:QUERY``: its placeholders, and that it names the arm.

    An inline query is sent once per arm, so it must use ``{{arm}}`` or ``{{endpoints}}``:
    without them both arms would get the same answer and the comparison would be void.
    """
    found = promql_placeholders(query)
    if not found & _ARM_PLACEHOLDERS:
        raise ValueError(
            f"the inline promql query {query!r} uses neither {{{{arm}}}} nor {{{{endpoints}}}}, "
            "so both arms would get the same answer: select the series of each arm with "
            'instance=~"{{endpoints}}" or a label set to {{arm}}, or name a query under the '
            "queries of each arm and use promql:NAME"
        )
    return found


def promql_endpoints(endpoints: Sequence[str]) -> str:
    """The arm's endpoints as a regular expression of their ``host:port``, written for a
    quoted PromQL string: ``instance=~"{{endpoints}}"``.

    Each ``host:port`` is RE2-escaped (``.`` matches only a dot), then backslashes are
    doubled for the string literal. An endpoint without an explicit port matches its
    ``host`` with or without the scheme's default port (Prometheus versions differ on
    whether ``instance`` carries it).
    """
    alternatives: list[str] = []
    for url in endpoints:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:  # IPv6, as Prometheus writes it in instance
            host = f"[{host}]"
        explicit = parts.port
        if explicit is not None:
            alternatives.append(_re2_quote(f"{host}:{explicit}"))
        else:
            default = 443 if parts.scheme == "https" else 80
            alternatives.append(_re2_quote(host) + f"(:{default})?")
    return "|".join(alternatives).replace("\\", "\\\\")


def _re2_quote(text: str) -> str:
    return _RE2_SPECIAL.sub(r"\\\1", text)


def promql_duration(seconds: float) -> str:
    """``seconds`` as a PromQL duration: ``15s``, ``1500ms`` (whole milliseconds, at least 1)."""
    ms = max(1, round(seconds * 1000))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def expand_promql(query: str, *, arm: str, endpoints: Sequence[str], window: float) -> str:
    """``query`` with ``{{arm}}``, ``{{endpoints}}`` and ``{{window}}`` replaced for ``arm``
    (ValueError as :func:`promql_placeholders` for a query that does not check)."""
    promql_placeholders(query)
    values = {
        "arm": arm,
        "endpoints": promql_endpoints(endpoints),
        "window": promql_duration(window),
    }
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], query)


# --- status classes -----------------------------------------------------------------------------

STATUS_CLASSES: Final = ("1xx", "2xx", "3xx", "4xx", "5xx")
# Two labels for a status outside 100..599, kept as each place has always exported them:
# ``canary_requests{code_class}`` says "none" (no HTTP answer at all, as the README documents),
# an arm accumulator's ``status_classes`` counts only answered requests and says "other".
NO_ANSWER_CLASS: Final = "none"
OTHER_STATUS_CLASS: Final = "other"


def status_class_labels(outside: str) -> tuple[str, str, str, str, str, str]:
    """Status-class labels indexed by ``status // 100``, with ``outside`` at index 0.

    A lookup table rather than a function, for the hot path:
    ``labels[status // 100] if 100 <= status < 600 else labels[0]``.
    """
    return (outside, *STATUS_CLASSES)
