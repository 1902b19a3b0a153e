"""``twistd -n lpa-relay --config /etc/lpa/relay.toml``: the only place the global reactor appears.

A bad configuration, or a ``[security]`` file that is missing or does not parse, ends start-up
with one line on stderr naming the key and exit status 78 (``EX_CONFIG``), no traceback (the
original silently fell back to defaults, database URL included).  A database that cannot be
reached or refuses us (wrong password, database or host) ends it with one line naming host,
port, database and user, and exit status 69 (``EX_UNAVAILABLE``).  The pid file defaults to
``lpa-relay.pid``, so the relay and an agent can start from one directory.
"""

from __future__ import annotations

from typing import Any, ClassVar, NoReturn

from twisted.application.service import IService
from twisted.logger import Logger
from twisted.python import usage

from lpa.configkit import exit_config_error, own_pidfile
from lpa.errors import ConfigError

DEFAULT_CONFIG = "/etc/lpa/relay.toml"

_log = Logger(namespace="lpa.relay.tap")


class Options(usage.Options):
    """Command line of ``twistd lpa-relay``."""

    optParameters: ClassVar[list[list[str]]] = [
        ["config", "c", DEFAULT_CONFIG, "the relay's TOML file (the manager's config.toml shape)"],
    ]

    def postOptions(self) -> None:
        from lpa.relay.config import check_relay_files, load_relay_config

        own_pidfile(self, "lpa-relay")
        try:
            self["relay_config"] = load_relay_config(self["config"])
            check_relay_files(self["relay_config"])
        except ConfigError as error:
            _exit_with(error)


def _exit_with(error: ConfigError) -> NoReturn:
    exit_config_error("lpa-relay", error)


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from lpa.logs import LogConfiguredService, observer_for_twistd
    from lpa.relay.pgadapter import DatabaseUnreachable, check_database
    from lpa.relay.service import make_relay_service

    config = options["relay_config"]
    for warning in config.warnings:
        _log.warn("config {source}: {problem}", source=config.source, problem=warning)
    try:
        service = make_relay_service(config, reactor=reactor, ops=config.ops_enabled)
    except ConfigError as error:
        _exit_with(error)
    try:
        check_database(config.database_url, where=f"[database] url of {options['config']}")
    except DatabaseUnreachable as error:
        _exit_unreachable(error)
    _log_sighup(reactor)
    observer = observer_for_twistd(options, config.log_format, config.log_level)
    return LogConfiguredService(service, observer)


def _exit_unreachable(error: Exception) -> NoReturn:
    """One line on stderr and exit 69: the database cannot be used at start."""
    import sys

    from lpa.relay.pgadapter import EXIT_DATABASE_UNREACHABLE

    sys.stderr.write(f"lpa-relay: {error}\n")
    sys.stderr.flush()
    raise SystemExit(EXIT_DATABASE_UNREACHABLE)


def _log_sighup(reactor: Any) -> None:
    """``systemctl reload lpa-relay`` (SIGHUP) must not end the relay (Python's default)."""
    import signal

    def reload(signum: int, frame: Any) -> None:
        reactor.callFromThread(
            _log.info,
            "SIGHUP: nothing to reload; the [security] certificates are read again for each new "
            "agent connection; restart lpa-relay to apply other config changes",
        )

    signal.signal(signal.SIGHUP, reload)
