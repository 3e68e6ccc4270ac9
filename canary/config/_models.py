"""Typed, frozen models of the rollout file (DESIGN.md "The rollout file").

Unknown keys are errors; every field that takes a unit string is parsed here, so the rest of
canary only ever sees seconds, fractions, bytes and :class:`Margin` values.
"""

from __future__ import annotations

import ipaddress
import itertools
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
    PRODUCTION,
    RATE_SIGNALS,
    is_continuous,
    is_resource,
    is_token,
    json_path_segments,
    parse_prediction,
    parse_signal,
)

__all__ = [
    "INPUT_TYPES",
    "AdminConfig",
    "AnalysisConfig",
    "ArmConfig",
    "Config",
    "FeedbackConfig",
    "InputBaselineConfig",
    "InputFieldBaseline",
    "InputToleranceConfig",
    "InputsConfig",
    "MatchConfig",
    "MetricConfig",
    "PricingConfig",
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
_RATE_NAMES = f"{', '.join(RATE_SIGNALS[:-1])} and {RATE_SIGNALS[-1]}"


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


class ArmConfig(_Model):
    endpoints: list[UpstreamURL] = Field(min_length=1)
    cost: PricingConfig | None = None
    resources: ResourcesConfig | None = None


class MatchConfig(_Model):
    path_prefix: str = "/"
    host: str | None = None

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
        if self.stat == "rate" and self.signal not in RATE_SIGNALS:
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


class AnalysisConfig(_Model):
    interval: Duration = 1.0
    alpha: float = Field(0.05, gt=0, lt=0.5)
    burn_in: int = Field(100, ge=0)
    max_duration: Duration = 3600.0
    on_inconclusive: Literal["rollback", "hold", "promote"] = "rollback"
    metrics: list[MetricConfig] = Field(default_factory=list)
    tradeoff: dict[str, MarginValue] | None = None

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


WebhookEvent = Literal["advance", "promote", "rollback", "pause", "resume", "hold", "start"]


class WebhookConfig(_Model):
    on: list[WebhookEvent] = Field(min_length=1)
    url: UpstreamURL
    timeout: Duration = 5.0


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
