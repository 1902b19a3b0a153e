"""The agent's configuration: the original's ``config.yaml`` keys, plus lpa's own.

Text in, frozen attrs out: :func:`parse_agent_config` checks every key against one table
(:data:`_SPEC`) and builds an :class:`AgentConfig`; :func:`load_agent_config` reads the file.

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

import difflib
import math
from typing import Any, Callable, Mapping

import attr
import yaml

from lpa.errors import ConfigError

#: lpa's own default location; the original's is ORIGINAL_CONFIG_PATH
DEFAULT_CONFIG_PATH = "/etc/lpa/agent.yaml"
ORIGINAL_CONFIG_PATH = "/etc/linux_patch_api/config.yaml"
CERT_DIR = "/etc/linux_patch_api/certs"

BACKENDS = ("auto", "apt", "dnf", "yum", "zypper", "apk", "pacman")
LOG_LEVELS = ("trace", "debug", "info", "warn", "warning", "error", "critical")
LOG_FORMATS = ("text", "json")

_frozen = attr.s(frozen=True, slots=True, auto_attribs=True, kw_only=True)


@_frozen
class ServerConfig:
    bind: str = "0.0.0.0"
    port: int = 12443
    #: seconds a request may take to arrive (the original declared it and never used it)
    timeout_seconds: int = 30


@_frozen
class TlsConfig:
    enabled: bool = True
    ca_cert: str = f"{CERT_DIR}/ca.pem"
    server_cert: str = f"{CERT_DIR}/server.pem"
    server_key: str = f"{CERT_DIR}/server.key.pem"
    #: None: no revocation checking (``tls.crl_path: null``)
    crl_path: str | None = f"{CERT_DIR}/crl.pem"
    min_tls_version: str = "1.3"


@_frozen
class CommandTimeouts:
    refresh_secs: int = 300
    package_secs: int = 1800
    quick_secs: int = 60


@_frozen
class JobsConfig:
    max_concurrent: int = 5
    timeout_minutes: int = 30
    max_queue_depth: int = 100
    history_limit: int = 500
    max_events_per_job: int = 1000
    lock_timeout_secs: int = 300
    command_timeouts: CommandTimeouts = CommandTimeouts()


@_frozen
class WhitelistConfig:
    #: None: no IP whitelist (every address may connect; mTLS still applies)
    path: str | None = None


@_frozen
class RateLimitConfig:
    enabled: bool = True
    destructive_per_minute: int = 20
    destructive_burst: int = 10
    read_per_minute: int = 120
    read_burst: int = 30


@_frozen
class CacheConfig:
    stale_threshold_secs: int = 3600


@_frozen
class LoggingConfig:
    level: str = "info"
    format: str = "text"


@_frozen
class PackageManagerConfig:
    backend: str = "auto"


@_frozen
class WebSocketConfig:
    enabled: bool = True
    ping_interval_secs: float = 5
    ping_timeout_secs: float = 10
    max_message_bytes: int = 65536
    max_subscriptions: int = 256
    max_connections: int = 64
    send_buffer_events: int = 2000


@_frozen
class AuthConfig:
    #: client certificate CNs/SANs allowed; empty = any client certificate of the CA
    allowed_clients: tuple[str, ...] = ()


@_frozen
class ApiConfig:
    max_body_bytes: int = 1048576


@_frozen
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
    #: where it came from: a path or "embedded defaults"
    source: str = "embedded defaults"
    #: one line per accepted-but-unused key; the caller logs them at start-up
    warnings: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------
# Value checkers: (key, raw value) -> value, or ConfigError naming the key.

Check = Callable[[str, Any], Any]


def _got(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _int(lo: int, hi: int) -> Check:
    def check(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer, got {_got(value)}")
        if not lo <= value <= hi:
            raise ConfigError(f"{key}: must be between {lo} and {hi}, got {value}")
        return value

    return check


def _number(lo: float, hi: float) -> Check:
    def check(key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ConfigError(f"{key}: must be a number, got {_got(value)}")
        if not lo <= value <= hi:
            raise ConfigError(f"{key}: must be between {lo} and {hi}, got {value}")
        return value

    return check


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: must be true or false, got {_got(value)}")
    return value


def _text(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: must be a non-empty string, got {_got(value)}")
    return value


def _optional_text(key: str, value: Any) -> str | None:
    if value is None or value == "":
        return None
    return _text(key, value)


def _choice(*choices: str) -> Check:
    def check(key: str, value: Any) -> str:
        if not isinstance(value, str) or value.lower() not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(choices)}; got {_got(value)}")
        return value.lower()

    return check


def _tls_version(key: str, value: Any) -> str:
    text = str(value) if isinstance(value, (str, float)) else None
    if text not in ("1.2", "1.3"):
        raise ConfigError(f'{key}: must be "1.2" or "1.3", got {_got(value)}')
    return text


def _names(key: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"{key}: must be a list of names, got {_got(value)}")
    return tuple(v.strip() for v in value)


_MINUTE = 60
_DAY = 86400

#: every key lpa uses: dotted key -> checker.  The attrs default is the default.
_SPEC: dict[str, Check] = {
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

_SECTIONS = {key.rsplit(".", 1)[0] for key in list(_SPEC) + list(_UNUSED) if "." in key}


# --------------------------------------------------------------------------------------------
# YAML with duplicate keys refused (the original's serde would refuse them too).


class _StrictLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _value in node.value:
        key = loader.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping  # type: ignore[arg-type]
)


def _load_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{source}: invalid YAML at{where}: {problem}") from None


# --------------------------------------------------------------------------------------------


def _flatten(mapping: Mapping[Any, Any], prefix: str, out: dict[str, Any]) -> None:
    for raw_key, value in mapping.items():
        if not isinstance(raw_key, str):
            raise ConfigError(f"{prefix or 'top level'}: key {raw_key!r} is not a string")
        key = f"{prefix}{raw_key}"
        if key in _SPEC or key in _UNUSED:
            out[key] = value
        elif key in _SECTIONS or key.split(".", 1)[0] in _UNUSED_SECTIONS and "." not in key:
            if value is None:
                continue  # an empty section: all defaults
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key}: must be a section (a mapping), got {_got(value)}")
            _flatten(value, key + ".", out)
        else:
            out[key] = value


def _unknown_key(key: str) -> ConfigError:
    known = list(_SPEC) + list(_UNUSED) + sorted(_SECTIONS) + list(_UNUSED_SECTIONS)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return ConfigError(f"unknown key {key}{hint}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    kwargs: dict[str, Any] = {}
    for field in attr.fields(cls):
        key = f"{prefix}{field.name}"
        if attr.has(field.type) if isinstance(field.type, type) else False:
            kwargs[field.name] = _build(field.type, values, key + ".")
        elif key in values:
            kwargs[field.name] = values[key]
    return cls(**kwargs)


def _resolve_types() -> None:
    for cls in (
        AgentConfig, ServerConfig, TlsConfig, CommandTimeouts, JobsConfig, WhitelistConfig,
        RateLimitConfig, CacheConfig, LoggingConfig, PackageManagerConfig, WebSocketConfig,
        AuthConfig, ApiConfig,
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

    flat: dict[str, Any] = {}
    try:
        _flatten(document, "", flat)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None

    values: dict[str, Any] = {}
    warnings: list[str] = []
    warned_sections: set[str] = set()
    for key, raw in flat.items():
        section = key.split(".", 1)[0]
        try:
            if key in _SPEC:
                values[key] = _SPEC[key](key, raw)
            elif key in _UNUSED:
                if key != "tls.port":
                    warnings.append(f"{key} is accepted but not used: {_UNUSED[key]}")
            elif section in _UNUSED_SECTIONS and "." in key:
                if section not in warned_sections:
                    warned_sections.add(section)
                    warnings.append(
                        f"{section}.* is accepted but not used: {_UNUSED_SECTIONS[section]}"
                    )
            else:
                raise _unknown_key(key)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    port = values.get("server.port", ServerConfig().port)
    if "tls.port" in flat and flat["tls.port"] != port:
        warnings.append(
            f"tls.port ({flat['tls.port']!r}) differs from server.port ({port}) and is unused: "
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

    config: AgentConfig = _build(AgentConfig, values, "")
    return attr.evolve(config, source=source, warnings=tuple(warnings))


def load_agent_config(path: str | None) -> AgentConfig:
    """Read and parse the file at ``path``; None gives the embedded defaults.

    :raises ConfigError: missing or unreadable file, or anything :func:`parse_agent_config`
        refuses.
    """
    if path is None:
        return AgentConfig()
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path}: not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"config file {path}: cannot read: {e.strerror or e}") from None
    return parse_agent_config(text, source=path)


# --------------------------------------------------------------------------------------------
# ``lpa config check FILE``


def _cmd_check(args: Any) -> int:
    config = load_agent_config(args.file)
    for warning in config.warnings:
        print(f"warning: {warning}")
    print(f"{config.source}: OK")
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``lpa config check``."""
    parser = subparsers.add_parser(
        "config", help="check an agent configuration file",
        description="Work with the agent's config.yaml.")
    actions = parser.add_subparsers(dest="config_action", metavar="ACTION", required=True)
    check = actions.add_parser(
        "check", help="validate a config file and print its warnings",
        description="Parse an agent config.yaml as lpa-agent would at start-up: print each "
        "warning (keys accepted but unused) and exit 0, or print the one-line error and exit 2.")
    check.add_argument("file", metavar="FILE", help=f"the file (lpa default {DEFAULT_CONFIG_PATH})")
    check.set_defaults(func=_cmd_check)
