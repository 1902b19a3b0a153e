"""A test-only echo variant of the agent's WebSocket, for the Autobahn|Testsuite (kosoku, wstest).

The conformance cases expect an echo server.  :class:`EchoProtocol` echoes every message and
starts no job-stream session, and it accepts a handshake without the ``lpa.jobs.v1``
subprotocol (the fuzzing clients offer none); everything else (framing, limits, heartbeat,
handshake timeouts, the producer take-over, the resource and the site) is exactly what the agent
runs, because the factory is a :class:`~lpa.agent.ws.JobStreamFactory` built with the caller's
options.
"""

from __future__ import annotations

from typing import Any

from twisted.web.resource import Resource

from lpa.agent.ws import JobStreamFactory, JobStreamProtocol, make_ws_resource

WS_PATH = (b"api", b"v1", b"ws", b"jobs")


class EchoProtocol(JobStreamProtocol):
    """Echoes each message back as it came (text or binary)."""

    def onConnect(self, request: Any) -> str | None:
        # the fuzzing clients offer no subprotocol; select ours when one is offered
        return super().onConnect(request) if request.protocols else None

    def onOpen(self) -> None:
        self.become_producer()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.sendMessage(payload, isBinary)


def make_echo_factory(events: Any, jobs: Any, **options: Any) -> JobStreamFactory:
    """A JobStreamFactory with the agent's options whose connections echo."""
    factory = JobStreamFactory(events, jobs, **options)
    factory.protocol = EchoProtocol
    return factory


def echo_site_root(factory: JobStreamFactory) -> Resource:
    """A resource tree serving the echo at ``/`` (kosoku's only path) and the agent's path."""
    resource = make_ws_resource(factory)
    root = Resource()
    root.putChild(b"", resource)
    node = root
    for segment in WS_PATH[:-1]:
        child = Resource()
        node.putChild(segment, child)
        node = child
    node.putChild(WS_PATH[-1], resource)
    return root
