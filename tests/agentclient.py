"""A treq client that speaks mutual TLS to a test agent (shared by daemon-level tests)."""

from __future__ import annotations

from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer


@implementer(IPolicyForHTTPS)
class FixedTLSPolicy:
    """Always hands out the same client TLS options (one agent, one identity)."""

    def __init__(self, options: Any) -> None:
        self._options = options

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return self._options


def mtls_client(options: Any) -> tuple[HTTPClient, HTTPConnectionPool]:
    """A treq client over ``options``; close the pool with ``closeCachedConnections()``."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    agent = Agent(reactor, contextFactory=FixedTLSPolicy(options), pool=pool)
    return HTTPClient(agent), pool
