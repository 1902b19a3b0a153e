"""``twistd -n lpa-relay --config /etc/lpa/relay.toml``: the only place the global reactor appears.

A bad configuration ends start-up with one line on stderr and a non-zero exit, no traceback
(the original silently fell back to defaults, database URL included).
"""

from __future__ import annotations

import sys

from twisted.application.service import IService
from twisted.python import usage

from lpa.errors import ConfigError

DEFAULT_CONFIG = "/etc/lpa/relay.toml"


class Options(usage.Options):
    """Command line of ``twistd lpa-relay``."""

    optParameters = [
        ["config", "c", DEFAULT_CONFIG, "the relay's TOML file (the manager's config.toml shape)"],
    ]


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from lpa.logs import LogConfiguredService, observer_for_twistd
    from lpa.relay.config import load_relay_config
    from lpa.relay.service import make_relay_service

    try:
        config = load_relay_config(options["config"])
        service = make_relay_service(config, reactor=reactor)
        return LogConfiguredService(service, observer_for_twistd(options, config.log_format))
    except ConfigError as error:
        sys.stderr.write(f"lpa-relay: {error}\n")
        sys.stderr.flush()
        raise SystemExit(2) from None
