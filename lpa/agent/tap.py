"""``twistd lpa-agent``: options and makeService, the only place the global reactor appears."""

from __future__ import annotations

import sys
from typing import Any

from twisted.python import usage

from lpa.errors import ConfigError
from lpa.logs import LogConfiguredService, observer_for_twistd

DEFAULT_CONFIG = "/etc/lpa/agent.yaml"


class Options(usage.Options):
    synopsis = "[--config PATH]"
    longdesc = (
        "Run the lpa patch agent: the mutual-TLS REST API and job event WebSocket on one port "
        "(12443 by default). Without --config the embedded defaults are used; the YAML keys are "
        "those of linux-patch-api's config.yaml plus lpa's own (see etc/agent.yaml)."
    )
    optParameters = [
        ["config", "c", None, f"YAML configuration file (e.g. {DEFAULT_CONFIG})"],
    ]

    def postOptions(self) -> None:
        from lpa.agent.config import load_agent_config

        try:
            self["agent_config"] = load_agent_config(self["config"])
        except ConfigError as error:
            _exit_with(error)


def _exit_with(error: ConfigError) -> None:
    """One line on stderr and a non-zero exit: never a traceback for a bad configuration."""
    sys.stderr.write(f"lpa-agent: configuration error: {error}\n")
    sys.stderr.flush()
    raise SystemExit(78)  # EX_CONFIG


def makeService(options: Options) -> Any:
    from twisted.internet import reactor

    from lpa.agent.service import make_agent_service

    try:
        service = make_agent_service(options["agent_config"], reactor=reactor)
    except ConfigError as error:
        _exit_with(error)
    _reload_on_sighup(reactor, service)
    logging = options["agent_config"].logging
    return LogConfiguredService(
        service, observer_for_twistd(options, logging.format, logging.level)
    )


def _reload_on_sighup(reactor: Any, service: Any) -> None:
    """SIGHUP re-reads the CRL and the IP whitelist (``systemctl reload lpa-agent``)."""
    import signal

    reloader = getattr(service, "reloader", None)
    if reloader is None:
        return
    signal.signal(signal.SIGHUP, lambda signum, frame: reactor.callFromThread(reloader.reload))
