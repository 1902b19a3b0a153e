"""The agent's configuration: the original's ``config.yaml`` keys, plus lpa's own.

Text in, frozen attrs out: :func:`parse_agent_config` checks every key against one table
(:data:`_SPEC`) with the config kit both daemons share (:mod:`lpa.configkit`) and builds an
:class:`AgentConfig`; :func:`load_agent_config` reads the file; :func:`check_agent_files` checks
the certificates, key and CRL it names (``lpa config check`` and ``twistd lpa-agent`` run it).

* Every key has a default; an empty file, or no file at all, gives the embedded defaults.
* A key neither program knows (a typo) is an error that suggests the close match; a wrong type or
  an out-of-range value is an error naming the key.  Each error is ONE line
  (:class:`~lpa.errors.ConfigError`), never a silent default.
* Keys of the original that lpa has no use for (``enrollment.*``, ``file_install.*``,
  ``logging.journal_enabled`` ...) are accepted so an existing file works unchanged; each yields a
  line in :attr:`AgentConfig.warnings` that the caller logs.

Honoured from ``logging``: ``level`` and ``format`` only.  ``journal_enabled``,
``syslog_enabled``, ``syslog_server``, ``file_path`` and ``retention_days`` are accepted and
warned about (log routing belongs to twistd: ``--logfile``, ``--syslog``, ``--logger``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import attr
import yaml

from lpa import configkit as kit
from lpa.errors import ConfigError

#: lpa's own default location; the original's is ORIGINAL_CONFIG_PATH
DEFAULT_CONFIG_PATH = "/etc/lpa/agent.yaml"
ORIGINAL_CONFIG_PATH = "/etc/linux_patch_api/config.yaml"
CERT_DIR = "/etc/linux_patch_api/certs"

BACKENDS = ("auto", "apt", "dnf", "yum", "zypper", "apk", "pacman")
LOG_LEVELS = ("trace", "debug", "info", "warn", "warning", "error", "critical")
LOG_FORMATS = ("text", "json")



@attr.frozen(kw_only=True)
class ServerConfig:
    bind: str = "0.0.0.0"
    port: int = 12443
    #: seconds a request may take to arrive (the original declared it and never used it)
    timeout_seconds: int = 30


@attr.frozen(kw_only=True)
class TlsConfig:
    enabled: bool = True
    ca_cert: str = f"{CERT_DIR}/ca.pem"
    server_cert: str = f"{CERT_DIR}/server.pem"
    server_key: str = f"{CERT_DIR}/server.key.pem"
    #: None: no revocation checking (``tls.crl_path: null``)
    crl_path: str | None = f"{CERT_DIR}/crl.pem"
    min_tls_version: str = "1.3"


@attr.frozen(kw_only=True)
class CommandTimeouts:
    refresh_secs: int = 300
    package_secs: int = 1800
    quick_secs: int = 60


@attr.frozen(kw_only=True)
class JobsConfig:
    max_concurrent: int = 5
    timeout_minutes: int = 30
    max_queue_depth: int = 100
    history_limit: int = 500
    max_events_per_job: int = 1000
    lock_timeout_secs: int = 300
    command_timeouts: CommandTimeouts = CommandTimeouts()


@attr.frozen(kw_only=True)
class WhitelistConfig:
    #: None: no IP whitelist (every address may connect; mTLS still applies)
    path: str | None = None


@attr.frozen(kw_only=True)
class RateLimitConfig:
    enabled: bool = True
    destructive_per_minute: int = 20
    destructive_burst: int = 10
    read_per_minute: int = 120
    read_burst: int = 30


@attr.frozen(kw_only=True)
class CacheConfig:
    stale_threshold_secs: int = 3600


@attr.frozen(kw_only=True)
class LoggingConfig:
    level: str = "info"
    format: str = "text"


@attr.frozen(kw_only=True)
class PackageManagerConfig:
    backend: str = "auto"


@attr.frozen(kw_only=True)
class WebSocketConfig:
    enabled: bool = True
    ping_interval_secs: float = 5
    ping_timeout_secs: float = 10
    max_message_bytes: int = 65536
    max_subscriptions: int = 256
    max_connections: int = 64
    send_buffer_events: int = 2000


@attr.frozen(kw_only=True)
class AuthConfig:
    #: client certificate CNs/SANs allowed; empty = any client certificate of the CA
    allowed_clients: tuple[str, ...] = ()


@attr.frozen(kw_only=True)
class ApiConfig:
    max_body_bytes: int = 1048576


@attr.frozen(kw_only=True)
class MetricsConfig:
    #: a plain-HTTP port serving only /metrics, for a scraper on this host; 0 = none
    local_port: int = 0
    local_bind: str = "127.0.0.1"


@attr.frozen(kw_only=True)
class AgentConfig:
    """The whole agent configuration; see the module docstring."""

    state_dir: str = "/var/lib/lpa"
    server: ServerConfig = ServerConfig()
    tls: TlsConfig = TlsConfig()
    jobs: JobsConfig = JobsConfig()
    whitelist: WhitelistConfig = WhitelistConfig()
    rate_limit: RateLimitConfig = RateLimitConfig()
    cache: CacheConfig = CacheConfig()
    logging: LoggingConfig = LoggingConfig()
    package_manager: PackageManagerConfig = PackageManagerConfig()
    websocket: WebSocketConfig = WebSocketConfig()
    auth: AuthConfig = AuthConfig()
    api: ApiConfig = ApiConfig()
    metrics: MetricsConfig = MetricsConfig()
    #: where it came from: a path or "embedded defaults"
    source: str = "embedded defaults"
    #: one line per accepted-but-unused key; the caller logs them at start-up
    warnings: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------
# Key checks come from the shared kit; the short names keep the table below readable.

_int = kit.integer
_number = kit.number
_bool = kit.boolean
_text = kit.text
_optional_text = kit.optional_text
_choice = kit.choice
_names = kit.names


def _tls_version(key: str, value: Any) -> str:
    text = str(value) if isinstance(value, (str, float)) else None
    if text not in ("1.2", "1.3"):
        raise ConfigError(f'{key}: must be "1.2" or "1.3", got {kit.got(value)}')
    return text


_MINUTE = 60
_DAY = 86400

#: every key lpa uses: dotted key -> checker.  The attrs default is the default.
_SPEC: dict[str, kit.Check] = {
    "state_dir": _text,
    "server.bind": _text,
    "server.port": _int(0, 65535),
    "server.timeout_seconds": _int(1, 3600),
    "tls.enabled": _bool,
    "tls.ca_cert": _text,
    "tls.server_cert": _text,
    "tls.server_key": _text,
    "tls.crl_path": _optional_text,
    "tls.min_tls_version": _tls_version,
    "jobs.max_concurrent": _int(1, 1000),
    "jobs.timeout_minutes": _int(1, 7 * 24 * 60),
    "jobs.max_queue_depth": _int(1, 100000),
    "jobs.history_limit": _int(1, 1000000),
    "jobs.max_events_per_job": _int(10, 1000000),
    "jobs.lock_timeout_secs": _int(0, _DAY),
    "jobs.command_timeouts.refresh_secs": _int(1, _DAY),
    "jobs.command_timeouts.package_secs": _int(1, 7 * _DAY),
    "jobs.command_timeouts.quick_secs": _int(1, _DAY),
    "whitelist.path": _optional_text,
    "rate_limit.enabled": _bool,
    "rate_limit.destructive_per_minute": _int(1, 1000000),
    "rate_limit.destructive_burst": _int(1, 1000000),
    "rate_limit.read_per_minute": _int(1, 1000000),
    "rate_limit.read_burst": _int(1, 1000000),
    "cache.stale_threshold_secs": _int(0, 30 * _DAY),
    "logging.level": _choice(*LOG_LEVELS),
    "logging.format": _choice(*LOG_FORMATS),
    "package_manager.backend": _choice(*BACKENDS),
    "websocket.enabled": _bool,
    "websocket.ping_interval_secs": _number(0.1, 3600),
    "websocket.ping_timeout_secs": _number(0.1, 3600),
    "websocket.max_message_bytes": _int(1024, 64 * 1024 * 1024),
    "websocket.max_subscriptions": _int(1, 1000000),
    "websocket.max_connections": _int(1, 1000000),
    "websocket.send_buffer_events": _int(1, 10000000),
    "auth.allowed_clients": _names,
    "api.max_body_bytes": _int(1024, 1024 * 1024 * 1024),
    "metrics.local_port": _int(0, 65535),
    "metrics.local_bind": _text,
}

#: the original's keys lpa accepts and does not use: key -> why
_UNUSED: dict[str, str] = {
    "tls.port": "lpa serves HTTPS on server.port",
    "jobs.storage_path": "lpa keeps job history under state_dir",
    "logging.journal_enabled": "route logs with twistd (--syslog, --logger)",
    "logging.syslog_enabled": "route logs with twistd --syslog",
    "logging.syslog_server": "route logs with twistd --syslog or a log shipper",
    "logging.file_path": "use twistd --logfile",
    "logging.retention_days": "rotate logs with logrotate or journald",
}

#: whole sections of the original lpa does not implement
_UNUSED_SECTIONS: dict[str, str] = {
    "enrollment": "lpa has no enrollment; provision certificates with `lpa pki` or your CA",
    "file_install": "lpa does not install files",
}


# --------------------------------------------------------------------------------------------
# YAML with duplicate keys refused (the original's serde would refuse them too).


class _StrictLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _value in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping
)


def _load_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{source}: invalid YAML at{where}: {problem}") from None


def _as_written(key: str, value: Any) -> Any:
    return value


#: ``tls.port`` is read only to warn when it differs from ``server.port``
_SCHEMA = kit.Schema(
    keys={**_SPEC, "tls.port": _as_written},
    accepted={key: why for key, why in _UNUSED.items() if key != "tls.port"},
    accepted_sections=_UNUSED_SECTIONS,
)


def _resolve_types() -> None:
    for cls in (
        AgentConfig, ServerConfig, TlsConfig, CommandTimeouts, JobsConfig, WhitelistConfig,
        RateLimitConfig, CacheConfig, LoggingConfig, PackageManagerConfig, WebSocketConfig,
        AuthConfig, ApiConfig, MetricsConfig,
    ):
        attr.resolve_types(cls, globals())


_resolve_types()


def parse_agent_config(text: str, source: str = "<config>") -> AgentConfig:
    """Parse YAML ``text``; ``source`` names it in errors.

    :raises ConfigError: bad YAML, unknown key, wrong type or out-of-range value (one line).
    """
    document = _load_yaml(text, source)
    if document is None:
        return AgentConfig(source=source)
    if not isinstance(document, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    try:
        values, warnings = kit.walk(document, _SCHEMA)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None

    port = values.get("server.port", ServerConfig().port)
    if "tls.port" in values and values["tls.port"] != port:
        warnings.append(
            f"tls.port ({values['tls.port']!r}) differs from server.port ({port}) and is unused: "
            "lpa serves HTTPS on server.port"
        )
    if "tls" not in document:
        warnings.append(
            "no tls section: the original served plain HTTP in that case; lpa keeps TLS on with "
            "the default certificate paths (set tls.enabled: false to serve plain HTTP)"
        )
    if values.get("tls.enabled") is False:
        warnings.append(
            "tls.enabled is false: serving plain HTTP without client certificates (INSECURE)"
        )

    config: AgentConfig = kit.build(AgentConfig, values)
    return attr.evolve(config, source=source, warnings=tuple(warnings))


def load_agent_config(path: str | None) -> AgentConfig:
    """Read and parse the file at ``path``; None gives the embedded defaults.

    :raises ConfigError: missing or unreadable file, or anything :func:`parse_agent_config`
        refuses.
    """
    if path is None:
        return AgentConfig()
    return parse_agent_config(kit.read_config_text(path), source=path)


def check_agent_files(config: AgentConfig) -> list[str]:
    """Check the files ``config`` names, as the agent reads them at start; return warnings.

    Certificates and keys must exist, be readable and parse, and the key must match the
    certificate.  A missing CRL or whitelist file is a warning (the agent starts: no revocation
    checking until the CRL appears; every address refused until the whitelist appears).

    :raises ConfigError: ``"{source}: tls.server_cert: /path: no such file"`` …
    """
    warnings: list[str] = []
    tls = config.tls
    try:
        if tls.enabled:
            cas = kit.check_file("tls.ca_cert", tls.ca_cert, kit.Pem.CERTIFICATES)
            warnings += kit.validity_warnings("tls.ca_cert", tls.ca_cert, cas)
            warnings += kit.check_key_pair(
                "tls.server_cert", tls.server_cert, "tls.server_key", tls.server_key)
            if tls.crl_path is not None:
                if os.path.exists(tls.crl_path):
                    kit.check_file("tls.crl_path", tls.crl_path, kit.Pem.CRL)
                else:
                    warnings.append(f"tls.crl_path: {tls.crl_path}: no such file; client "
                                    "certificates are not checked for revocation until it exists")
        whitelist = config.whitelist.path
        if whitelist is not None and not os.path.isfile(whitelist):
            warnings.append(f"whitelist.path: {whitelist}: no such file; every client address "
                            "is refused until it exists")
    except ConfigError as e:
        raise ConfigError(f"{config.source}: {e}") from None
    return warnings
