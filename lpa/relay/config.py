"""The relay's configuration: the manager's own ``config.toml``, read unchanged.

The relay takes the keys it needs from the manager's file (``[database]``, ``[worker]``,
``[security]``, ``[logging]``) with the config kit both daemons share (:mod:`lpa.configkit`):

* every key in those sections is either one the relay reads (:data:`_KEYS`), or one of the
  manager's own keys, listed one by one in :data:`_MANAGER_KEYS` and accepted with a warning; any
  other key there (a misspelt ``ws_relay_*`` …) stops start-up with "did you mean";
* sections the relay has no part in (``[server]``, ``[rate_limit]``, ``[repo]``) are not looked
  into; an unknown section is a warning, or an error when its name is close to a known one;
* a bad value is a :class:`~lpa.errors.ConfigError` with one line naming the key (the original
  silently fell back to built-in defaults, including its default database URL).

``[database] url`` is REQUIRED (in the file or as ``PATCH_MANAGER__DATABASE__URL``): a relay that
quietly writes to a default database is the original's worst failure.  Every other key has the
manager's default.  ``PATCH_MANAGER__SECTION__KEY`` environment variables override file values,
as the manager does; their text is parsed as the key's type, and one naming an unknown key of a
section the relay checks is an error too.

:func:`check_relay_files` checks the ``[security]`` files (``lpa config check`` and
``twistd lpa-relay`` run it).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from typing import Any

import attr

from lpa import configkit as kit
from lpa.errors import ConfigError
from lpa.logs import LEVELS

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
    #: this relay's name among the relays sharing the database; "" = host name + pid
    relay_id: str = ""
    heartbeat_interval: float = 2.0
    lease_ttl: float = 8.0
    client_cert_path: str = "/etc/patch-manager/certs/client.crt"
    client_key_path: str = "/etc/patch-manager/certs/client.key"
    ca_cert_path: str = "/etc/patch-manager/ca/ca.crt"
    log_format: str = "json"
    #: events below this level are not logged (one of lpa.logs.LEVELS)
    log_level: str = "info"
    #: the ops port (status page, /metrics, /healthz, /readyz): loopback unless told otherwise
    ops_enabled: bool = True
    ops_bind: str = "127.0.0.1"
    ops_port: int = 12480
    #: with a certificate and key, the ops port serves TLS and requires client certificates
    ops_tls_cert_path: str | None = None
    ops_tls_key_path: str | None = None
    #: the CA of those client certificates (default: [security] ca_cert_path)
    ops_client_ca_path: str | None = None
    #: where it came from (a path), for error lines; not part of equality
    source: str = attr.field(default="<config>", eq=False)
    #: one line per group of accepted-but-unused keys; the tap logs them at start-up
    warnings: tuple[str, ...] = attr.field(default=(), eq=False)


# Key checks from the shared kit, under the names the table below uses.
_positive_number = kit.positive_seconds
_positive_int = kit.positive_integer
_path = kit.path
_bool = kit.boolean
_database_url = kit.url("postgres", "postgresql")
_log_format = kit.choice(*LOG_FORMATS)


def _log_level(key: str, value: Any) -> str:
    """A level name; the manager's filter form (``"info,sqlx=warn"``) gives its bare level."""
    if not isinstance(value, str):
        raise ConfigError(f"{key}: must be a level name ({', '.join(LEVELS)}), got {value!r}")
    bare = [part.strip().lower() for part in value.split(",") if part.strip() and "=" not in part]
    level = bare[-1] if bare else "info"
    if level not in LEVELS:
        raise ConfigError(f"{key}: must be a level name ({', '.join(LEVELS)}), got {value!r}")
    return level


def _relay_id(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.isprintable() or len(value) > 200:
        raise ConfigError(f"{key}: must be printable text of at most 200 characters, got {value!r}")
    return value.strip()


#: attribute -> (section, key, check, kind of env text); add a key with one line here, one
#: attribute above, and its documentation in README.rst and etc/relay.toml
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
    "relay_id": ("worker", "ws_relay_id", _relay_id, str),
    "heartbeat_interval": (
        "worker",
        "ws_relay_heartbeat_interval_secs",
        _positive_number,
        float,
    ),
    "lease_ttl": ("worker", "ws_relay_lease_ttl_secs", _positive_number, float),
    "client_cert_path": ("security", "agent_client_cert_path", _path, str),
    "client_key_path": ("security", "agent_client_key_path", _path, str),
    "ca_cert_path": ("security", "ca_cert_path", _path, str),
    "log_format": ("logging", "format", _log_format, str),
    "log_level": ("logging", "level", _log_level, str),
    "ops_enabled": ("ops", "enabled", _bool, bool),
    "ops_bind": ("ops", "bind", kit.text, str),
    "ops_port": ("ops", "port", kit.integer(0, 65535), int),
    "ops_tls_cert_path": ("ops", "tls_cert_path", kit.optional_text, str),
    "ops_tls_key_path": ("ops", "tls_key_path", kit.optional_text, str),
    "ops_client_ca_path": ("ops", "client_ca_path", kit.optional_text, str),
}

_MANAGER = "the manager's own keys, left to it"

#: the manager's keys in the sections the relay checks (its config.example.toml and pm-core's
#: config.rs): accepted with one warning line
_MANAGER_KEYS: dict[str, str] = {
    **{f"worker.{key}": _MANAGER for key in (
        "health_poll_interval_secs", "patch_poll_interval_secs",
        "health_check_poll_interval_secs", "max_concurrent_agent_calls",
        "heartbeat_interval_secs", "self_upgrade_reconnect_timeout_secs",
        "self_upgrade_reconnect_poll_interval_secs", "job_timeout_secs")},
    **{f"security.{key}": _MANAGER for key in (
        "ip_whitelist", "trusted_proxies", "jwt_signing_key_path", "jwt_verify_key_path",
        "jwt_access_ttl_secs", "ca_key_path", "web_tls_cert_path", "web_tls_key_path",
        "sso_callback_url", "allowed_origins")},
    **{f"database.{key}": _MANAGER for key in (
        "max_connections", "min_connections", "acquire_timeout_secs")},
}

#: the manager's sections the relay has no part in: never looked into
_MANAGER_SECTIONS = frozenset({"server", "rate_limit", "repo"})


def _schema() -> kit.Schema:
    return kit.Schema(
        keys={f"{section}.{key}": check for section, key, check, _ in _KEYS.values()},
        accepted=_MANAGER_KEYS,
        foreign_sections=_MANAGER_SECTIONS,
        other_sections="warn",
    )


def _env_name(dotted: str) -> str:
    return ENV_PREFIX + "__".join(part.upper() for part in dotted.split("."))


def _from_env_text(name: str, text: str, kind: type) -> Any:
    """Env values are text; read them as the key's type so the same checks apply."""
    if kind is str:
        return text
    if kind is bool:
        if text.strip().lower() not in ("true", "false"):
            raise ConfigError(f"{name}: environment value {text!r} is not true or false")
        return text.strip().lower() == "true"
    try:
        return float(text) if kind is float else int(text)
    except ValueError:
        raise ConfigError(f"{name}: environment value {text!r} is not a number") from None


def _env_values(environ: Mapping[str, str], schema: kit.Schema) -> dict[str, Any]:
    """``PATCH_MANAGER__SECTION__KEY`` overrides of keys the relay reads, checked."""
    kinds = {f"{section}.{key}": kind for section, key, _, kind in _KEYS.values()}
    sections = schema.sections()
    values: dict[str, Any] = {}
    for name in sorted(environ):
        parts = name[len(ENV_PREFIX):].lower().split("__") if name.startswith(ENV_PREFIX) else []
        if len(parts) != 2 or parts[0] not in sections:
            continue  # not ours: the manager's, or another section
        dotted = ".".join(parts)
        if dotted in schema.keys:
            raw = _from_env_text(name, environ[name], kinds[dotted])
            values[dotted] = schema.keys[dotted](name, raw)
        elif dotted not in schema.accepted:
            hint = kit.did_you_mean(name, [_env_name(key) for key in schema.keys])
            raise ConfigError(f"{name}: unknown key {dotted}{hint}")
    return values


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
    schema = _schema()
    try:
        for section in schema.sections():
            if section in document and not isinstance(document[section], dict):
                raise ConfigError(f"[{section}] must be a table")
        values, warnings = kit.walk(document, schema)
        values.update(_env_values(environ, schema))
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    if "database.url" not in values:
        raise ConfigError(
            f"{source}: database.url: required (or set {ENV_PREFIX}DATABASE__URL)"
        )
    attributes = {
        attribute: values[f"{section}.{key}"]
        for attribute, (section, key, _, _) in _KEYS.items()
        if f"{section}.{key}" in values
    }
    config = RelayConfig(**attributes, source=source, warnings=tuple(warnings))
    if config.reconnect_initial_delay > config.reconnect_max_delay:
        raise ConfigError(
            f"{source}: worker.ws_relay_reconnect_initial_delay_secs: must not exceed "
            f"ws_relay_reconnect_max_delay_secs ({config.reconnect_max_delay:g})"
        )
    if (config.ops_tls_cert_path is None) != (config.ops_tls_key_path is None):
        raise ConfigError(
            f"{source}: ops.tls_cert_path and ops.tls_key_path: set both (TLS with client "
            "certificates on the ops port) or neither (plain HTTP)"
        )
    if config.lease_ttl < 3 * config.heartbeat_interval:
        raise ConfigError(
            f"{source}: worker.ws_relay_lease_ttl_secs: must be at least three heartbeat "
            f"intervals (3 x ws_relay_heartbeat_interval_secs = {3 * config.heartbeat_interval:g})"
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
    return parse_relay_config(kit.read_config_text(path), path, environ)


def check_relay_files(config: RelayConfig) -> list[str]:
    """Check the ``[security]`` files as the relay reads them at start; return warnings.

    :raises ConfigError: ``"{source}: security.agent_client_cert_path: /path: no such file"`` …
    """
    try:
        cas = kit.check_file("security.ca_cert_path", config.ca_cert_path, kit.Pem.CERTIFICATES)
        warnings = kit.validity_warnings("security.ca_cert_path", config.ca_cert_path, cas)
        warnings += kit.check_key_pair(
            "security.agent_client_cert_path", config.client_cert_path,
            "security.agent_client_key_path", config.client_key_path)
        if config.ops_enabled and config.ops_tls_cert_path and config.ops_tls_key_path:
            if config.ops_client_ca_path:
                kit.check_file("ops.client_ca_path", config.ops_client_ca_path,
                               kit.Pem.CERTIFICATES)
            warnings += kit.check_key_pair(
                "ops.tls_cert_path", config.ops_tls_cert_path,
                "ops.tls_key_path", config.ops_tls_key_path)
    except ConfigError as error:
        raise ConfigError(f"{config.source}: {error}") from None
    return warnings
