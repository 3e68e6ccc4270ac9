"""Rollout file -> typed, frozen config. The only code that reads configuration files."""

from canary.config._loader import load_config, load_config_text
from canary.config._models import (
    AdminConfig,
    AnalysisConfig,
    ArmConfig,
    Config,
    FeedbackConfig,
    MatchConfig,
    MetricConfig,
    PricingConfig,
    ProxyConfig,
    ResourcesConfig,
    RolloutConfig,
    RoutingConfig,
    StateConfig,
    StepConfig,
    StickyConfig,
    WebhookConfig,
)
from canary.config._units import Margin, parse_duration, parse_margin, parse_size

__all__ = [
    "AdminConfig",
    "AnalysisConfig",
    "ArmConfig",
    "Config",
    "FeedbackConfig",
    "Margin",
    "MatchConfig",
    "MetricConfig",
    "PricingConfig",
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
]
