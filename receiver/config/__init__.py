"""The config: typed objects (:mod:`~receiver.config.model`) and how a file becomes one
(:mod:`~receiver.config.load`)."""

from receiver.config.load import ConfigError, config_warnings, lease_problem, load_config, parse_config
from receiver.config.model import (
    DEFAULT_TEMPLATE,
    DEFAULT_THROTTLE,
    AdminAuth,
    Config,
    Delivery,
    Group,
    Level,
    QuietHours,
    Storage,
    ThrottleRule,
    WebhookAuth,
    format_duration,
    parse_duration,
    split_listen,
)

__all__ = [
    "DEFAULT_TEMPLATE", "DEFAULT_THROTTLE", "AdminAuth", "Config", "ConfigError", "Delivery", "Group", "Level",
    "QuietHours", "Storage", "ThrottleRule", "WebhookAuth", "config_warnings", "format_duration", "lease_problem",
    "load_config", "parse_config", "parse_duration", "split_listen",
]
