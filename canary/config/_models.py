"""Typed, frozen models of the rollout file (DESIGN.md "The rollout file").

Unknown keys are errors; every field that takes a unit string is parsed here, so the rest of
canary only ever sees seconds, fractions, bytes and :class:`Margin` values.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import re
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from canary.config._units import (
    Margin,
    parse_duration,
    parse_listen,
    parse_margin,
    parse_percent,
    parse_size,
    parse_upstream_url,
)
from canary.signals import (
    AGREEMENT,
    CANDIDATE,
    JUDGE,
    PRODUCTION,
    RATE_SIGNALS,
    check_inline_promql,
    is_continuous,
    is_promql,
    is_rate,
    is_resource,
    is_token,
    json_path_segments,
    parse_prediction,
    parse_signal,
    promql_placeholders,
    promql_query_name,
)

__all__ = [
    "GATE_EVENTS",
    "INPUT_TYPES",
    "RESERVED_WEBHOOK_HEADERS",
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
    "MatchConfig",
    "MetricConfig",
    "PricingConfig",
    "PrometheusConfig",
    "ProxyConfig",
    "ResourcesConfig",
    "RolloutConfig",
    "RoutingConfig",
    "ShadowStep",
    "StateConfig",
    "StepConfig",
    "StickyConfig",
    "WebhookConfig",
    "WebhookEvent",
    "check_signal",
    "is_loopback_host",
]

Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
Percent = Annotated[float, BeforeValidator(parse_percent)]
Listen = Annotated[tuple[str, int], BeforeValidator(parse_listen)]
UpstreamURL = Annotated[str, BeforeValidator(parse_upstream_url)]
MarginValue = Annotated[Margin, BeforeValidator(parse_margin)]

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
_STAT = re.compile(r"^(mean|rate|distribution|p(\d{1,2}(?:\.\d+)?))$")
_PERCENTILE = re.compile(r"^p(\d{1,2}(?:\.\d+)?)$")
_ERROR_CLASS = re.compile(r"^([1-5]xx|[1-5]\d\d)$")
_RATE_NAMES = f"{', '.join(RATE_SIGNALS)} and finish_reason:VALUE"


def check_signal(value: str) -> str:
    """Validate a signal string such as ``latency``, ``header:X-Cost`` or ``json:usage.total``
    with the one grammar the proxy also compiles it with; return its canonical key."""
    return parse_signal(value).key


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class ProxyConfig(_Model):
    listen: Listen = ("0.0.0.0", 8080)
    max_body_size: Size = 10 * 1024 * 1024
    max_header_size: Size = 16 * 1024
    client_timeout: Duration = 60.0  # a slow client cannot hold a worker longer than this
    replay_buffer: Size = 1024 * 1024  # bodies up to this are buffered: failover and mirroring
    mirror_concurrency: int = Field(64, ge=1)  # shadow requests in flight before dropping more
    # An upstream response head (status line, fields, interim 1xx heads) beyond this is a 502.
    max_response_header_size: Size = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024)
    max_response_headers: int = Field(100, ge=1, le=10_000)  # fields in one response head


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals (127.0.0.0/8, ::1)."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AdminConfig(_Model):
    # Declared before ``listen``: its check reads them (pydantic validates in this order).
    token_env: str | None = None
    # Serve the admin API on a non-loopback address with no token (anyone who can reach it
    # can promote or roll back): only when set, and canary warns loudly at start.
    allow_public_without_token: bool = False
    listen: Listen = ("127.0.0.1", 9901)

    @field_validator("listen")
    @classmethod
    def _public_needs_token(cls, v: tuple[str, int], info: ValidationInfo) -> tuple[str, int]:
        if is_loopback_host(v[0]) or info.data.get("token_env"):
            return v
        if "token_env" not in info.data:  # token_env itself is invalid: reported there
            return v
        if info.data.get("allow_public_without_token"):
            return v
        raise ValueError(
            f"admin API on non-loopback address {v[0]!r} without a token: set "
            "admin.token_env (recommended), listen on 127.0.0.1, or set "
            "admin.allow_public_without_token: true to accept that anyone who can reach "
            "it can promote, roll back and reload"
        )

    @property
    def public_without_token(self) -> bool:
        """Served on a non-loopback address with no token (allowed explicitly)."""
        return not self.token_env and not is_loopback_host(self.listen[0])


class StateConfig(_Model):
    backend: Literal["sqlite", "memory", "redis"] = "sqlite"
    path: str = "canary-state.db"
    url: str | None = None

    @model_validator(mode="after")
    def _redis_url(self) -> StateConfig:
        if self.backend == "redis":
            if not self.url or not self.url.startswith(("redis://", "rediss://", "unix://")):
                raise ValueError("backend 'redis' needs url: redis://HOST:PORT/DB")
        elif self.url is not None:
            raise ValueError(f"'url' is only used with backend 'redis', not {self.backend!r}")
        return self


class PricingConfig(_Model):
    per_request: float = Field(0.0, ge=0)
    per_1k_tokens: float = Field(0.0, ge=0)
    per_hour: float = Field(0.0, ge=0)
    replicas: int = Field(1, ge=1)
    header: str | None = None  # a response header carrying the endpoint's own cost figure

    @field_validator("header")
    @classmethod
    def _header(cls, v: str | None) -> str | None:
        if v is not None and not is_token(v):
            raise ValueError(f"{v!r} is not a valid header name")
        return v


class ResourcesConfig(_Model):
    scrape: str = "/metrics"
    every: Duration = 5.0

    @field_validator("scrape")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"scrape path must start with '/', got {v!r}")
        return v

    @field_validator("every")
    @classmethod
    def _every(cls, v: float) -> float:
        if v < 0.1:
            raise ValueError(f"scrape interval must be at least 100ms, got {v}s")
        return v


def _model_name(v: object) -> object:
    """An OpenAI model name (``llama-3.1-8b``, ``org/model:tag``): 1-256 printable characters."""
    if isinstance(v, str) and not (0 < len(v) <= 256 and v.isprintable() and v == v.strip()):
        raise ValueError(f"a model name must be 1-256 printable characters, got {v!r}")
    return v


ModelName = Annotated[str, BeforeValidator(_model_name)]


class ArmConfig(_Model):
    endpoints: list[UpstreamURL] = Field(min_length=1)
    cost: PricingConfig | None = None
    resources: ResourcesConfig | None = None
    # The name this arm serves (vLLM --served-model-name): written into the top-level `model`
    # of OpenAI requests sent to it (docs/openai.md).
    model: ModelName | None = None
    # Named PromQL queries of this arm, used by `signal: promql:NAME` (docs/promql.md).
    queries: dict[str, str] = Field(default_factory=dict)

    @field_validator("queries")
    @classmethod
    def _queries(cls, v: dict[str, str]) -> dict[str, str]:
        for name, query in v.items():
            if promql_query_name(name) is None:
                raise ValueError(
                    f"query name {name!r} must be an identifier ([A-Za-z_][A-Za-z0-9_]*), "
                    "so that promql:NAME reads as a name, not as a query"
                )
            try:
                promql_placeholders(query)
            except ValueError as exc:
                raise ValueError(f"query {name!r}: {exc}") from None
        return v


class MatchConfig(_Model):
    path_prefix: str = "/"
    host: str | None = None
    # OpenAI model names this rollout serves (the request body's top-level `model`, on the
    # model-routed paths only; docs/openai.md). One name or a list.
    model: list[ModelName] | None = None

    @field_validator("model", mode="before")
    @classmethod
    def _models(cls, v: object) -> object:
        if isinstance(v, str):
            return [v]
        if v is not None and not isinstance(v, list):
            raise ValueError(f"expected a model name or a list of them, got {v!r}")
        if isinstance(v, list):
            if not v:
                raise ValueError("match.model needs at least one model name")
            dup = sorted({m for m in v if isinstance(m, str) and v.count(m) > 1})
            if dup:
                raise ValueError(f"duplicate model names {dup}")
        return v

    @field_validator("path_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"path_prefix must start with '/', got {v!r}")
        return v.rstrip("/") or "/"

    @field_validator("host")
    @classmethod
    def _host(cls, v: str | None) -> str | None:
        return v.lower() if v else v

    def covers(self, path: str) -> bool:
        """True when ``path`` is this prefix or below it: /a covers /a and /a/b, not /ab."""
        p = self.path_prefix
        return p == "/" or path == p or path.startswith(p + "/")

    def overlaps(self, other: MatchConfig) -> bool:
        if self.host and other.host and self.host != other.host:
            return False
        if bool(self.host) != bool(other.host):
            return False  # a host-specific rule wins over a host-less one: not ambiguous
        if bool(self.model) != bool(other.model):
            return False  # likewise a model-specific rule over a model-less one
        if self.model and other.model and not set(self.model) & set(other.model):
            return False  # the same paths, told apart by the body's model
        return self.covers(other.path_prefix) or other.covers(self.path_prefix)


class StickyConfig(_Model):
    header: str | None = None
    cookie: str | None = None

    @model_validator(mode="after")
    def _one(self) -> StickyConfig:
        if (self.header is None) == (self.cookie is None):
            raise ValueError("sticky needs exactly one of 'header' or 'cookie'")
        if self.header is not None and not is_token(self.header):
            raise ValueError(f"{self.header!r} is not a valid header name")
        return self


class RoutingConfig(_Model):
    sticky: StickyConfig | None = None
    override_header: str | None = None
    failover: bool = True
    # Which failed candidate requests failover may send to production once the candidate may
    # have processed them: idempotent methods only (RFC 9110 9.2.2), or all of them.
    failover_methods: Literal["idempotent", "all"] = "idempotent"
    timeout: Duration = 30.0
    connect_timeout: Duration = 5.0
    read_timeout: Duration | None = None  # longest silence between response bytes
    error_status: list[str] = Field(default_factory=lambda: ["5xx"])
    max_connections: int = Field(256, ge=1)

    @field_validator("override_header")
    @classmethod
    def _override(cls, v: str | None) -> str | None:
        if v is not None and not is_token(v):
            raise ValueError(f"{v!r} is not a valid header name")
        return v

    @field_validator("error_status")
    @classmethod
    def _classes(cls, v: list[str]) -> list[str]:
        for item in v:
            if not _ERROR_CLASS.match(str(item)):
                raise ValueError(
                    f"expected a status class such as '5xx' or a code such as 429, got {item!r}"
                )
        return [str(i) for i in v]

    @model_validator(mode="after")
    def _timeouts(self) -> RoutingConfig:
        if self.timeout <= 0 or self.connect_timeout <= 0:
            raise ValueError("timeouts must be positive")
        return self

    def is_error_status(self, status: int) -> bool:
        return str(status) in self.error_status or f"{status // 100}xx" in self.error_status


class ShadowStep(_Model):
    min_requests: int = Field(0, ge=0)
    min_duration: Duration = 0.0


class StepConfig(_Model):
    shadow: ShadowStep | None = None
    weight: Percent | None = None
    min_requests: int = Field(0, ge=0)
    min_duration: Duration = 0.0

    @model_validator(mode="before")
    @classmethod
    def _shadow_shorthand(cls, data: object) -> object:
        # `- shadow: {}` and `- shadow:` (null) both mean a shadow step with defaults
        if isinstance(data, dict) and "shadow" in data and data["shadow"] is None:
            return {**data, "shadow": {}}
        return data

    @model_validator(mode="after")
    def _one_kind(self) -> StepConfig:
        if (self.shadow is None) == (self.weight is None):
            raise ValueError("a step needs exactly one of 'shadow' or 'weight'")
        if self.shadow is not None and (self.min_requests or self.min_duration):
            raise ValueError(
                "put min_requests/min_duration of a shadow step inside 'shadow: {...}'"
            )
        return self

    @property
    def is_shadow(self) -> bool:
        return self.shadow is not None

    @property
    def candidate_weight(self) -> float:
        """Percent of live traffic the candidate answers during this step (0 in shadow)."""
        return 0.0 if self.weight is None else self.weight

    @property
    def required_requests(self) -> int:
        return self.shadow.min_requests if self.shadow is not None else self.min_requests

    @property
    def required_duration(self) -> float:
        return self.shadow.min_duration if self.shadow is not None else self.min_duration


class MetricConfig(_Model):
    name: str
    signal: str
    stat: str = "mean"
    max_increase: MarginValue | None = None
    max_decrease: MarginValue | None = None
    quantiles: list[str] | None = None  # stat: distribution only; default p5..p95, p99

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"metric name must match [a-z0-9][a-z0-9_.-]*, got {v!r}")
        return v

    @field_validator("signal")
    @classmethod
    def _signal(cls, v: str) -> str:
        return check_signal(v)

    @field_validator("stat")
    @classmethod
    def _stat(cls, v: str) -> str:
        m = _STAT.match(v)
        if not m or (m.group(2) is not None and not 0 < float(m.group(2)) < 100):
            raise ValueError(
                f"stat must be mean, rate, distribution or a percentile such as p95, got {v!r}"
            )
        return v

    @field_validator("quantiles")
    @classmethod
    def _quantiles(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("quantiles must list at least one percentile such as p99")
        levels = []
        for item in v:
            m = _PERCENTILE.match(item)
            if not m or not 0 < float(m.group(1)) < 100:
                raise ValueError(f"quantiles must be percentiles such as p50 or p99, got {item!r}")
            levels.append(float(m.group(1)))
        if levels != sorted(set(levels)):
            raise ValueError(f"quantiles must be ascending without repeats, got {v!r}")
        return v

    @model_validator(mode="after")
    def _direction(self) -> MetricConfig:
        if (self.max_increase is None) == (self.max_decrease is None):
            raise ValueError("a metric needs exactly one of 'max_increase' or 'max_decrease'")
        if self.stat.startswith("p") and self.margin.relative is False:
            raise ValueError("a percentile tolerance must be relative, such as '10%'")
        if self.stat == "distribution":
            if self.margin.relative is False:
                raise ValueError("a distribution tolerance must be relative, such as '10%'")
            if not is_continuous(self.signal):
                raise ValueError(
                    f"stat 'distribution' compares the values of a per-request signal such as "
                    f"latency or ttft, not {self.signal!r}"
                )
        elif self.quantiles is not None:
            raise ValueError("'quantiles' applies only to stat: distribution")
        if self.stat == "rate" and not is_rate(self.signal):
            raise ValueError(f"stat 'rate' applies to {_RATE_NAMES}, not {self.signal!r}")
        return self

    @property
    def margin(self) -> Margin:
        m = self.max_increase if self.max_increase is not None else self.max_decrease
        assert m is not None
        return m

    @property
    def higher_is_worse(self) -> bool:
        return self.max_increase is not None

    @property
    def quantile(self) -> float | None:
        return float(self.stat[1:]) / 100.0 if self.stat.startswith("p") else None

    @property
    def quantile_levels(self) -> tuple[float, ...] | None:
        """Levels a ``distribution`` metric compares (None: the default grid)."""
        if self.quantiles is None:
            return None
        return tuple(float(q[1:]) / 100.0 for q in self.quantiles)


_PROMQL_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class PrometheusConfig(_Model):
    """``analysis.prometheus``: the server ``promql:`` metrics are queried from
    (docs/promql.md)."""

    url: UpstreamURL  # base URL; /api/v1/query is appended (a path prefix is kept)
    every: Duration = 15.0  # one window per arm every this often; also {{window}}
    timeout: Duration | None = None  # per query; default 80% of `every`, at most 10s
    bearer_token_env: str | None = None  # sent as "Authorization: Bearer $VALUE"
    headers: dict[str, str] = Field(default_factory=dict)  # e.g. X-Scope-OrgID for Mimir

    @field_validator("every")
    @classmethod
    def _every(cls, v: float) -> float:
        if v < 0.1:
            raise ValueError(f"prometheus.every must be at least 100ms, got {v}s")
        return v

    @field_validator("bearer_token_env")
    @classmethod
    def _env(cls, v: str | None) -> str | None:
        if v is not None and not _PROMQL_ENV.match(v):
            raise ValueError(f"bearer_token_env must be an environment variable name, got {v!r}")
        return v

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            if not is_token(name):
                raise ValueError(f"{name!r} is not a valid header name")
            if name.lower() == "authorization":
                raise ValueError(
                    "do not write credentials into the rollout file: put the token in an "
                    "environment variable and name it with 'bearer_token_env'"
                )
            if any(c in value for c in "\r\n\0"):
                raise ValueError(f"header {name!r} must not contain CR, LF or NUL")
        return v

    @model_validator(mode="after")
    def _timeout(self) -> PrometheusConfig:
        if self.timeout is not None and not 0 < self.timeout <= self.every:
            raise ValueError(
                f"prometheus.timeout must be positive and at most 'every' ({self.every}s), "
                f"got {self.timeout}s"
            )
        return self

    @property
    def query_timeout(self) -> float:
        """Seconds a query may take: ``timeout``, or 80% of ``every`` up to 10 s."""
        return self.timeout if self.timeout is not None else min(0.8 * self.every, 10.0)


class AnalysisConfig(_Model):
    interval: Duration = 1.0
    alpha: float = Field(0.05, gt=0, lt=0.5)
    burn_in: int = Field(100, ge=0)
    max_duration: Duration = 3600.0
    on_inconclusive: Literal["rollback", "hold", "promote"] = "rollback"
    metrics: list[MetricConfig] = Field(default_factory=list)
    tradeoff: dict[str, MarginValue] | None = None
    prometheus: PrometheusConfig | None = None  # where promql: metrics are queried

    @field_validator("interval")
    @classmethod
    def _interval(cls, v: float) -> float:
        if v < 0.05:
            raise ValueError(f"interval must be at least 50ms, got {v}s")
        return v

    @model_validator(mode="after")
    def _names(self) -> AnalysisConfig:
        seen: set[str] = set()
        for m in self.metrics:
            if m.name in seen:
                raise ValueError(f"duplicate metric name {m.name!r}")
            seen.add(m.name)
        if self.tradeoff is not None:
            if len(self.tradeoff) < 2:
                raise ValueError("tradeoff needs at least two metrics to trade against each other")
            by_name = {m.name: m for m in self.metrics}
            for name, worth in self.tradeoff.items():
                if name not in seen:
                    raise ValueError(
                        f"tradeoff names {name!r}, which is not a metric of this analysis"
                    )
                if worth.value <= 0:
                    raise ValueError(f"tradeoff {name!r} must be positive, got {worth}")
                if by_name[name].stat == "distribution":
                    raise ValueError(
                        f"tradeoff names {name!r}, a distribution metric (the worst of many "
                        "quantiles has no single value to trade); trade a percentile such as p95"
                    )
                if worth.relative != by_name[name].margin.relative:
                    scale = "relative (%)" if by_name[name].margin.relative else "absolute (pp)"
                    raise ValueError(
                        f"tradeoff {name!r} is {worth}, but metric {name!r} is compared on the "
                        f"{scale} scale; use the same unit as its tolerance"
                    )
        return self


WebhookEvent = Literal[
    "advance",
    "promote",
    "rollback",
    "pause",
    "resume",
    "hold",
    "start",
    "confirm-advance",  # gates (docs/gates.md): must answer 2xx before an automatic ADVANCE
    "confirm-promotion",  # ... before an automatic PROMOTE
]
GATE_EVENTS = ("confirm-advance", "confirm-promotion")
# Headers canary sets on every delivery: a custom header must not replace them.
RESERVED_WEBHOOK_HEADERS = frozenset(
    {
        "content-type",
        "content-length",
        "content-encoding",
        "transfer-encoding",
        "connection",
        "host",
        "user-agent",
        "x-canary-event",
        "x-canary-timestamp",
        "x-canary-signature",
    }
)
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,100}$")  # RFC 9110 token
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


class WebhookConfig(_Model):
    on: list[WebhookEvent] = Field(min_length=1)
    # None: a manual gate (only with gate events), opened by `canary approve NAME`.
    url: UpstreamURL | None = None
    timeout: Duration = Field(5.0, gt=0, le=300)
    # Names the environment variable holding the HMAC-SHA256 key that signs every delivery.
    secret_env: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)  # sent with every delivery

    @field_validator("secret_env")
    @classmethod
    def _secret_is_set(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not _ENV_NAME.match(v):
            raise ValueError(
                f"expected an environment variable name such as HOOK_SECRET, not {v!r}"
            )
        if not os.environ.get(v):
            raise ValueError(
                f"names ${v}, but it is not set or empty: set it to the signing secret, or "
                "remove secret_env to send unsigned deliveries"
            )
        return v

    @field_validator("headers")
    @classmethod
    def _headers_are_valid(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) > 20:
            raise ValueError(f"at most 20 custom headers, got {len(v)}")
        for name, value in v.items():
            if not _HEADER_NAME.match(name):
                raise ValueError(f"header name {name!r} is not a valid HTTP field name")
            if name.lower() in RESERVED_WEBHOOK_HEADERS:
                raise ValueError(f"header {name!r} is set by canary itself and cannot be replaced")
            if len(value) > 4096 or any(
                (ord(ch) < 0x20 and ch != "\t") or ord(ch) == 0x7F for ch in value
            ):
                raise ValueError(
                    f"header {name!r}: the value must be at most 4096 characters without "
                    "CR, LF or other control characters"
                )
        return v

    @model_validator(mode="after")
    def _manual_only_for_gates(self) -> WebhookConfig:
        if self.url is None:
            other = [e for e in self.on if e not in GATE_EVENTS]
            if other:
                raise ValueError(
                    f"url is required for {', '.join(other)}: only a gate "
                    f"({' or '.join(GATE_EVENTS)}) can do without one (then it waits for "
                    "`canary approve NAME`)"
                )
            if self.secret_env is not None or self.headers:
                raise ValueError("secret_env and headers need a url: a manual gate sends nothing")
        if len(set(self.on)) != len(self.on):
            raise ValueError(f"on lists an event twice: {self.on}")
        return self

    @property
    def gate(self) -> bool:
        """Whether this entry gates a transition (it lists confirm-advance or -promotion)."""
        return any(e in GATE_EVENTS for e in self.on)


def _parse_share(value: object) -> float:
    """A share as a fraction in 0..1 (``0.25``) or a percentage (``'25%'``)."""
    if isinstance(value, str) and value.strip().endswith("%"):
        return parse_percent(value) / 100.0
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a share such as 0.25 or '25%', got {value!r}")
    if not 0 <= value <= 1:
        raise ValueError(
            f"a share must be within 0..1 (or a percentage such as '25%'), got {value}"
        )
    return float(value)


class JudgeConfig(_Model):
    """Pairwise judging of the two arms' answers to one request (``signal: judge``)."""

    url: UpstreamURL  # the exact URL posted to (for kind openai: .../v1/chat/completions)
    kind: Literal["openai", "http"] = "http"
    model: str | None = None  # the judge model's name (kind openai only, required there)
    share: Annotated[float, BeforeValidator(_parse_share)] = 1.0  # of the mirrored pairs
    # Of the live requests of weighted steps, also sent to the other arm for the judge.
    live_share: Annotated[float, BeforeValidator(_parse_share)] = 0.0
    max_concurrency: int = Field(4, ge=1, le=1024)  # judge calls in flight; more are dropped
    max_per_minute: int = Field(60, ge=1, le=1_000_000)  # judge calls in any 60 s; cost bound
    timeout: Duration = 30.0
    token_env: str | None = None  # environment variable holding a bearer token for the judge
    max_answer_chars: int = Field(4000, ge=1, le=1_000_000)  # of each answer and the request
    max_pending: int = Field(1000, ge=1, le=1_000_000)  # sampled pairs waiting for answers

    @model_validator(mode="after")
    def _model_for_openai(self) -> JudgeConfig:
        if self.kind == "openai" and not self.model:
            raise ValueError("a judge of kind 'openai' needs 'model' (the judge model's name)")
        if self.kind == "http" and self.model is not None:
            raise ValueError("'model' applies only to a judge of kind 'openai'")
        if self.timeout <= 0:
            raise ValueError(f"timeout must be positive, got {self.timeout}s")
        return self


class AnswersConfig(_Model):
    """How LLM answers are scored (signals finish_reason:VALUE, output_tokens, empty_answer,
    repetition, refusal; see docs/llm-quality.md)."""

    # Openings of a refusal in the wording of common chat models; Python regular expressions
    # matched case-insensitively within the first `refusal_within` characters of the answer.
    refusal_patterns: list[str] = Field(
        default_factory=lambda: [
            r"\bI(?:['’]m| am) (?:so |very |truly )?sorry,? but\b",
            r"\bI (?:can(?:not|['’]t)|won['’]t|will not|am unable to|['’]m unable to"
            r"|am not able to|['’]m not able to) (?:help|assist|provide|comply|fulfill"
            r"|do that|answer|support)",
            r"\bAs an AI\b",
            r"\bI apologi[sz]e,? but\b",
        ],
        max_length=256,
    )
    refusal_within: int = Field(300, ge=1, le=65536)  # characters
    repetition_ngram: int = Field(4, ge=1, le=16)  # words per n-gram
    max_chars: int = Field(8192, ge=16, le=1 << 20)  # characters the repetition score covers

    @field_validator("refusal_patterns")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        for i, p in enumerate(v):
            if not p:
                raise ValueError(f"refusal_patterns[{i}] is empty (it would match every answer)")
            try:
                rx = re.compile(p)
            except re.error as exc:
                raise ValueError(
                    f"refusal_patterns[{i}] {p!r} is not a regular expression: {exc}"
                ) from None
            if rx.fullmatch(""):
                raise ValueError(
                    f"refusal_patterns[{i}] {p!r} matches the empty string (every answer)"
                )
        return v


class FeedbackConfig(_Model):
    ttl: Duration = 3600.0
    max_entries: int = Field(100_000, ge=1)
    # maturity: an answer's label counts once the answer is `ttl` old, so both arms' answers
    # are compared after the same label window; arrival: as soon as it is posted.
    count_at: Literal["maturity", "arrival"] = "maturity"


INPUT_TYPES = ("number", "string", "bool", "null", "missing", "object", "array")
InputType = Literal["number", "string", "bool", "null", "missing", "object", "array"]


class InputFieldBaseline(_Model):
    """A field's expected input values, when the baseline is given instead of learned."""

    mean: float | None = None
    std: float | None = Field(None, ge=0)
    null_rate: float | None = Field(None, ge=0, le=1)  # share of requests where it is null/missing
    types: dict[InputType, float] | None = None  # share of requests per JSON type; unlisted = 0

    @field_validator("types", mode="before")
    @classmethod
    def _null_key(cls, v: object) -> object:
        # YAML reads the key `null` as None: {number: 0.99, null: 0.01} means the JSON type null
        if isinstance(v, dict) and None in v:
            return {("null" if k is None else k): share for k, share in v.items()}
        return v

    @model_validator(mode="after")
    def _consistent(self) -> InputFieldBaseline:
        if (self.mean is None) != (self.std is None):
            raise ValueError("give 'mean' and 'std' together: the mean tolerance is in stds")
        if self.types is not None:
            bad = {t: v for t, v in self.types.items() if not 0 <= v <= 1}
            if bad:
                raise ValueError(f"type shares must be within 0..1, got {bad}")
            if abs(sum(self.types.values()) - 1.0) > 0.01:
                raise ValueError(f"type shares must add up to 1, got {sum(self.types.values()):g}")
            absent = self.types.get("null", 0.0) + self.types.get("missing", 0.0)
            if self.null_rate is not None and abs(self.null_rate - absent) > 0.01:
                raise ValueError(
                    f"null_rate {self.null_rate:g} disagrees with the null + missing type shares "
                    f"({absent:g}); give one of them or make them agree"
                )
        if self.mean is None and self.null_rate is None and self.types is None:
            raise ValueError("a field baseline needs at least one of mean/std, null_rate, types")
        return self


class InputBaselineConfig(_Model):
    requests: int | None = Field(None, ge=30)  # learn from the first N inspected requests
    fields: dict[str, InputFieldBaseline] | None = None  # or give it per field

    @model_validator(mode="after")
    def _one(self) -> InputBaselineConfig:
        if (self.requests is None) == (self.fields is None):
            raise ValueError("baseline needs exactly one of 'requests' (learn) or 'fields' (given)")
        return self


class InputToleranceConfig(_Model):
    mean: float = Field(0.25, ge=0)  # shift of a field's mean, in baseline standard deviations
    rate: MarginValue = Margin(0.05, relative=False)  # null rate and type shares, e.g. 5pp

    @field_validator("rate")
    @classmethod
    def _absolute(cls, v: Margin) -> Margin:
        if v.relative:
            raise ValueError(f"rate tolerance is in percentage points such as '5pp', got '{v}'")
        return v


class InputsConfig(_Model):
    """Input health: type mix, null rate and mean of request-body JSON fields vs a baseline."""

    fields: list[str] = Field(min_length=1, max_length=32)
    baseline: InputBaselineConfig = Field(
        default_factory=lambda: InputBaselineConfig(requests=1000)
    )
    alpha: float = Field(0.01, gt=0, lt=0.5)
    tolerance: InputToleranceConfig = Field(default_factory=InputToleranceConfig)
    on_drift: Literal["report", "hold"] = "report"
    max_body: Size = 64 * 1024  # larger bodies are not parsed (counted as too_large)

    @field_validator("fields")
    @classmethod
    def _paths(cls, v: list[str]) -> list[str]:
        for path in v:
            try:
                json_path_segments(path)
            except ValueError:
                raise ValueError(
                    f"{path!r} is not a JSON path such as 'amount' or 'features.age'"
                ) from None
        dup = sorted({p for p in v if v.count(p) > 1})
        if dup:
            raise ValueError(f"duplicate fields {dup}")
        return v

    @model_validator(mode="after")
    def _given(self) -> InputsConfig:
        given = self.baseline.fields
        if given is not None:
            missing = [f for f in self.fields if f not in given]
            extra = [f for f in given if f not in self.fields]
            if missing:
                raise ValueError(f"baseline.fields has no entry for {missing}")
            if extra:
                raise ValueError(f"baseline.fields names {extra}, which are not in 'fields'")
        return self


class RolloutConfig(_Model):
    name: str
    match: MatchConfig = Field(default_factory=MatchConfig)
    production: ArmConfig
    candidate: ArmConfig
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    steps: list[StepConfig] = Field(min_length=1)
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)
    webhooks: list[WebhookConfig] = Field(default_factory=list)
    prediction: str | None = None
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)
    inputs: InputsConfig | None = None  # input health of request bodies
    judge: JudgeConfig | None = None  # pairwise judging of both arms' answers (signal: judge)
    answers: AnswersConfig = Field(default_factory=AnswersConfig)  # LLM answer quality

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"rollout name must match [a-z0-9][a-z0-9_.-]*, got {v!r}")
        return v

    @field_validator("prediction")
    @classmethod
    def _prediction(cls, v: str | None) -> str | None:
        if v is not None:
            parse_prediction(v)  # the path the proxy reads it from; ValueError says why not
        return v

    @model_validator(mode="after")
    def _cross(self) -> RolloutConfig:
        weights = [s.weight for s in self.steps if s.weight is not None]
        if any(b < a for a, b in itertools.pairwise(weights)):
            raise ValueError(f"step weights must not decrease, got {weights}")
        for m in self.analysis.metrics:
            if is_resource(m.signal):
                for arm_name, arm in ((PRODUCTION, self.production), (CANDIDATE, self.candidate)):
                    if arm.resources is None:
                        raise ValueError(
                            f"metric {m.name!r} uses {m.signal!r}; add 'resources: "
                            f"{{scrape: /metrics, every: 5s}}' to {arm_name}"
                        )
        for m in self.analysis.metrics:
            if m.signal == AGREEMENT:
                if self.prediction is None:
                    raise ValueError(
                        f"metric {m.name!r} uses 'agreement', which compares the arms' "
                        "predictions: set 'prediction: json:PATH' on the rollout"
                    )
                if not any(s.is_shadow for s in self.steps):
                    raise ValueError(
                        f"metric {m.name!r} uses 'agreement', which is measured in shadow "
                        "steps only: add a '- shadow: {...}' step"
                    )
        if set(self.production.endpoints) & set(self.candidate.endpoints):
            raise ValueError("production and candidate must not share an endpoint")
        return self

    @model_validator(mode="after")
    def _promql(self) -> RolloutConfig:
        """``promql:`` metrics: a Prometheus to ask, named queries defined on both arms."""
        prod, cand = self.production.queries, self.candidate.queries
        for name in sorted(set(prod) ^ set(cand)):
            has, lacks = (PRODUCTION, CANDIDATE) if name in prod else (CANDIDATE, PRODUCTION)
            raise ValueError(
                f"query {name!r} is defined under {has}.queries but not under "
                f"{lacks}.queries: both arms need it, each with the query of its own series"
            )
        for m in self.analysis.metrics:
            if not is_promql(m.signal):
                continue
            if self.analysis.prometheus is None:
                raise ValueError(
                    f"metric {m.name!r} uses {m.signal!r}, which is queried from a Prometheus "
                    "server: add 'prometheus: {url: http://prometheus:9090}' under analysis"
                )
            if m.stat != "mean":
                raise ValueError(
                    f"metric {m.name!r} has stat {m.stat!r}: a promql metric is compared as "
                    "the mean of its per-window paired values; use stat: mean"
                )
            qname = promql_query_name(m.signal)
            if qname is None:
                continue  # an inline query, checked with the signal
            if qname not in prod:
                defined = ", ".join(sorted(prod)) or "none"
                raise ValueError(
                    f"metric {m.name!r} uses {m.signal!r}, but no query {qname!r} is defined: "
                    f"add it under production.queries and candidate.queries "
                    f"(defined: {defined}); an inline query needs {{{{arm}}}} or {{{{endpoints}}}}"
                )
            if prod[qname] == cand[qname]:
                try:
                    check_inline_promql(prod[qname])
                except ValueError:
                    raise ValueError(
                        f"query {qname!r} is the same on both arms and uses neither {{{{arm}}}} "
                        "nor {{endpoints}}, so both arms would get the same answer: select "
                        "the series of each arm"
                    ) from None
        return self

    @model_validator(mode="after")
    def _judged(self) -> RolloutConfig:
        uses = [m for m in self.analysis.metrics if m.signal == JUDGE]
        for m in uses:
            if self.judge is None:
                raise ValueError(
                    f"metric {m.name!r} uses 'judge', the win rate of a judge's verdicts: "
                    "add 'judge: {url: ..., kind: http | openai}' to the rollout"
                )
            if m.max_decrease is None or m.margin.relative or m.stat != "rate":
                raise ValueError(
                    f"metric {m.name!r} tests the candidate's win rate against 50%: write "
                    "it as {stat: rate, max_decrease: 5pp} (percentage points below 50%)"
                )
            if m.margin.value >= 0.5:
                raise ValueError(
                    f"metric {m.name!r}: max_decrease must be below 50pp, got {m.margin}"
                )
        if (
            self.judge is not None
            and not self.judge.live_share
            and not any(s.is_shadow for s in self.steps)
        ):
            raise ValueError(
                "'judge' compares the two arms' answers to the same request, which exist in "
                "shadow steps only: add a '- shadow: {...}' step, or set judge.live_share to "
                "also send a share of live requests to the other arm"
            )
        return self

    @model_validator(mode="after")
    def _answer_signals(self) -> RolloutConfig:
        if not self.answers.refusal_patterns:
            for m in self.analysis.metrics:
                if m.signal == "refusal":
                    raise ValueError(
                        f"metric {m.name!r} uses 'refusal', but answers.refusal_patterns is "
                        "empty: list the patterns of a refusal (or drop the key for the defaults)"
                    )
        return self

    def signals(self) -> list[str]:
        """Every per-request signal the analysis reads, in order, without duplicates."""
        out: list[str] = []
        for m in self.analysis.metrics:
            if m.signal not in out:
                out.append(m.signal)
        return out


class Config(_Model):
    proxy: ProxyConfig = Field(default_factory=ProxyConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    rollouts: list[RolloutConfig] = Field(min_length=1)

    def rollout(self, name: str) -> RolloutConfig:
        for r in self.rollouts:
            if r.name == name:
                return r
        raise KeyError(name)
