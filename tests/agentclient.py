"""Talking to a real test agent: a treq client over mutual TLS, and an in-process agent service.

:func:`start_agent` runs the real daemon (:func:`lpa.agent.service.make_agent_service`) on
loopback with the test PKI and a :class:`tests.fakes.FakeBackend`, so a test reaches the agent's
real REST API and WebSocket over real mutual TLS while nothing touches the host's packages.
"""

from __future__ import annotations

import os
from typing import Any

from treq.client import HTTPClient
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from lpa.agent.config import parse_agent_config
from lpa.agent.service import make_agent_service
from tests.loopback import port_number, started_port


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


async def start_agent(
    case: TestCase, pki: Any, directory: str, *, backend: Any = None, extra: str = "",
) -> tuple[Any, int]:
    """Start an agent service on 127.0.0.1 (a free port); stopped at the test's cleanup.

    Returns the service and its port.  ``extra`` is appended to the agent's YAML config.
    """
    from tests.fakes import FakeBackend, FakeSystem

    text = (
        "server:\n  bind: 127.0.0.1\n  port: 0\n"
        f"tls:\n  ca_cert: {pki.ca_cert}\n  server_cert: {pki.server_cert}\n"
        f"  server_key: {pki.server_key}\n  crl_path: {pki.crl}\n"
        f"state_dir: {os.path.join(directory, 'agent-state')}\n" + extra
    )
    service = make_agent_service(
        parse_agent_config(text, "agent.yaml"),
        reactor=reactor,
        backend=backend if backend is not None else FakeBackend(),
        system=FakeSystem(),
    )
    service.startService()
    port = await started_port(service.listener)
    case.addCleanup(
        lambda: defer.ensureDeferred(service.stopService()) if service.running else None
    )
    return service, port_number(port)
