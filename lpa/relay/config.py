"""The relay's configuration: the manager's own ``config.toml``, read unchanged.

The relay takes the keys it needs from the manager's file (``[database]``, ``[worker]``,
``[security]``, ``[logging]``) and ignores every other section and key, so one file serves both.
Unlike the original (which silently fell back to built-in defaults, including the database URL,
on any parse error, including its default database URL), a bad value here is a :class:`~lpa.errors.ConfigError` with one
line naming the key.

``[database] url`` is REQUIRED (in the file or as ``PATCH_MANAGER__DATABASE__URL``): a relay that
quietly writes to a default database is the original's worst failure.  Every other key has the
manager's default.  ``PATCH_MANAGER__SECTION__KEY`` environment variables override file values,
as the manager does; their text is parsed as the key's type.
"""

from __future__ import annotations

import os
import tomllib
from typing import Any, Callable, Mapping

import attr

from lpa.errors import ConfigError

#: where the manager keeps its file; ``$PATCH_MANAGER_CONFIG`` overrides
DEFAULT_CONFIG_PATH = "/etc/patch-manager/config.toml"
ENV_CONFIG_PATH = "PATCH_MANAGER_CONFIG"
ENV_PREFIX = "PATCH_MANAGER__"

LOG_FORMATS = ("text", "json")


@attr.s(frozen=True, slots=True, auto_attribs=True, kw_only=True)
class RelayConfig:
    """Everything the relay daemon needs; durations are seconds (float)."""

    database_url: str
    poll_interval: float = 10.0
    scan_interval: float = 10.0
    handshake_timeout: float = 10.0
    max_handshakes_in_flight: int = 32
    reconnect_initial_delay: float = 1.0
    reconnect_max_delay: float = 60.0
    unreachable_deadline: float = 900.0
    max_pending_events: int = 10000
    client_cert_path: str = "/etc/patch-manager/certs/client.crt"
    client_key_path: str = "/etc/patch-manager/certs/client.key"
    ca_cert_path: str = "/etc/patch-manager/ca/ca.crt"
    log_format: str = "json"


def _positive_number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{key}: must be a positive number of seconds, got {value!r}")
    return float(value)


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}: must be a positive integer, got {value!r}")
    return value


def _path(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: must be a non-empty path string, got {value!r}")
    return value


def _database_url(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: must be a non-empty PostgreSQL URL, got {value!r}")
    scheme = value.split("://", 1)[0].lower() if "://" in value else ""
    if scheme not in ("postgres", "postgresql"):
        raise ConfigError(f"{key}: must be a postgres:// or postgresql:// URL, got {value!r}")
    return value


def _log_format(key: str, value: Any) -> str:
    if not isinstance(value, str) or value.lower() not in LOG_FORMATS:
        raise ConfigError(f"{key}: must be one of {', '.join(LOG_FORMATS)}, got {value!r}")
    return value.lower()


#: attribute -> (section, key, validator, kind of env text)
_KEYS: dict[str, tuple[str, str, Callable[[str, Any], Any], type]] = {
    "database_url": ("database", "url", _database_url, str),
    "poll_interval": ("worker", "ws_relay_poll_interval_secs", _positive_number, float),
    "scan_interval": ("worker", "ws_relay_scan_interval_secs", _positive_number, float),
    "handshake_timeout": ("worker", "ws_relay_handshake_timeout_secs", _positive_number, float),
    "max_handshakes_in_flight": ("worker", "ws_relay_max_handshakes", _positive_int, int),
    "reconnect_initial_delay": (
        "worker",
        "ws_relay_reconnect_initial_delay_secs",
        _positive_number,
        float,
    ),
    "reconnect_max_delay": ("worker", "ws_relay_reconnect_max_delay_secs", _positive_number, float),
    "unreachable_deadline": (
        "worker",
        "ws_relay_unreachable_deadline_secs",
        _positive_number,
        float,
    ),
    "max_pending_events": ("worker", "ws_relay_max_pending_events", _positive_int, int),
    "client_cert_path": ("security", "agent_client_cert_path", _path, str),
    "client_key_path": ("security", "agent_client_key_path", _path, str),
    "ca_cert_path": ("security", "ca_cert_path", _path, str),
    "log_format": ("logging", "format", _log_format, str),
}


def _from_env_text(key: str, text: str, kind: type) -> Any:
    """Env values are text; read them as the key's type so the same validators apply."""
    if kind is str:
        return text
    try:
        number = float(text) if kind is float else int(text)
    except ValueError:
        raise ConfigError(f"{key}: environment value {text!r} is not a number") from None
    return number


def parse_relay_config(
    text: str, source: str = "<config>", environ: Mapping[str, str] | None = None
) -> RelayConfig:
    """Parse TOML ``text`` (named ``source`` in errors) plus env overrides into a RelayConfig.

    :param environ: the environment for ``PATCH_MANAGER__SECTION__KEY`` overrides; ``None`` reads
        ``os.environ``, pass ``{}`` for none.
    """
    if environ is None:
        environ = os.environ
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{source}: not valid TOML: {error}") from None
    values: dict[str, Any] = {}
    for attribute, (section, key, validate, kind) in _KEYS.items():
        dotted = f"{section}.{key}"
        table = document.get(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [{section}] must be a table")
        env_name = f"{ENV_PREFIX}{section.upper()}__{key.upper()}"
        if env_name in environ:
            raw = _from_env_text(env_name, environ[env_name], kind)
            values[attribute] = validate(env_name, raw)
        elif key in table:
            values[attribute] = validate(f"{source}: {dotted}", table[key])
    if "database_url" not in values:
        raise ConfigError(
            f"{source}: database.url: required (or set {ENV_PREFIX}DATABASE__URL)"
        )
    config = RelayConfig(**values)
    if config.reconnect_initial_delay > config.reconnect_max_delay:
        raise ConfigError(
            f"{source}: worker.ws_relay_reconnect_initial_delay_secs: must not exceed "
            f"ws_relay_reconnect_max_delay_secs ({config.reconnect_max_delay:g})"
        )
    return config


def default_config_path(environ: Mapping[str, str] | None = None) -> str:
    """``$PATCH_MANAGER_CONFIG`` or the manager's default path."""
    if environ is None:
        environ = os.environ
    return environ.get(ENV_CONFIG_PATH) or DEFAULT_CONFIG_PATH


def load_relay_config(
    path: str | None = None, environ: Mapping[str, str] | None = None
) -> RelayConfig:
    """Read and parse the file at ``path`` (default: :func:`default_config_path`)."""
    if path is None:
        path = default_config_path(environ)
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror or error}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    return parse_relay_config(text, path, environ)
