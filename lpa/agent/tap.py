"""``twistd lpa-agent``: options and makeService, the only place the global reactor appears.

Exit statuses before the agent runs: 78 (``EX_CONFIG``) for a configuration error, printed as
one line on stderr; 75, 77, 78 or 71 when the port cannot be bound, logged as one error line
(see :mod:`lpa.agent.listening`).
"""

from __future__ import annotations

from typing import Any, ClassVar, NoReturn

from twisted.logger import Logger
from twisted.python import usage

from lpa.configkit import exit_config_error, own_pidfile
from lpa.errors import ConfigError
from lpa.logs import LogConfiguredService, observer_for_twistd

_log = Logger()

DEFAULT_CONFIG = "/etc/lpa/agent.yaml"


class Options(usage.Options):
    synopsis = "[--config PATH]"
    longdesc = (
        "Run the lpa patch agent: the mutual-TLS REST API and job event WebSocket on one port "
        "(12443 by default). Without --config the embedded defaults are used; the YAML keys are "
        "those of linux-patch-api's config.yaml plus lpa's own (see etc/agent.yaml)."
    )
    optParameters: ClassVar[list[list[str | None]]] = [
        ["config", "c", None, f"YAML configuration file (e.g. {DEFAULT_CONFIG})"],
    ]

    def postOptions(self) -> None:
        from lpa.agent.config import check_agent_files, load_agent_config

        own_pidfile(self, "lpa-agent")
        try:
            self["agent_config"] = load_agent_config(self["config"])
            check_agent_files(self["agent_config"])
        except ConfigError as error:
            _exit_with(error)


def _exit_with(error: ConfigError) -> NoReturn:
    """One line on stderr and exit 78 (EX_CONFIG): never a traceback for a bad configuration."""
    exit_config_error("lpa-agent", error)


def makeService(options: Options) -> Any:
    from twisted.internet import reactor

    from lpa.agent.service import make_agent_service

    try:
        service = make_agent_service(options["agent_config"], reactor=reactor)
    except ConfigError as error:
        _exit_with(error)
    _reload_on_sighup(reactor, service)
    logging = options["agent_config"].logging
    return _AgentRoot(service, observer_for_twistd(options, logging.format, logging.level))


class _AgentRoot(LogConfiguredService):
    """twistd's root service: a port that cannot be bound is one line and an exit status."""

    def privilegedStartService(self) -> None:
        from lpa.agent.listening import ListenError

        try:
            super().privilegedStartService()
        except ListenError as error:
            # an operator's fault, not a bug: an error line (critical is kept for crashes)
            _log.error("{reason}", reason=str(error), exit_status=error.exit_status)
            raise SystemExit(error.exit_status) from None


def _reload_on_sighup(reactor: Any, service: Any) -> None:
    """SIGHUP re-reads the CRL and the IP whitelist (``systemctl reload lpa-agent``)."""
    import signal

    reloader = getattr(service, "reloader", None)
    if reloader is None:
        return
    signal.signal(
        signal.SIGHUP, lambda signum, frame: reactor.callFromThread(reloader.reload, "SIGHUP")
    )
