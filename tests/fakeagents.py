"""Test agents on real loopback TLS for the relay's transport tests.

* :class:`LpaTestAgent` — a minimal lpa-protocol agent: an Autobahn ``WebSocketServerFactory``
  behind ``WebSocketResource`` at ``/api/v1/ws/jobs`` (subscribe with ``after_seq`` replays then
  goes live, resync when the events are gone, per-job filtering), the REST twin
  ``GET /api/v1/jobs/{id}/events?after=N`` and ``GET /api/v1/jobs/{id}``, all fed from an
  :class:`~lpa.agent.eventlog.EventLog`.  Like the real agent, it serves the stream only under
  the subprotocol ``lpa.jobs.v1`` (a handshake without it gets HTTP 400) and sends a connection
  only what it subscribed to.  ``websocket=False`` answers the WS path with 404 (an agent with
  ``websocket.enabled: false``).
* :class:`StubHandshakeAgent` — the original agent's stub: ``101`` with a JSON body and no
  ``Sec-WebSocket-Accept``; only ``GET /api/v1/jobs/{id}``; any other ``/api/v1`` path gets an
  EMPTY 405.
* :func:`h2_preferring_options` + ``listen(..., alpn=H2_FIRST)`` — a server whose ALPN offer is
  ``[h2, http/1.1]`` (a client offering h2 gets h2: the negative test proves it).

Each agent records the ALPN protocol of every connection it accepted (``negotiated``) and can be
killed (listener closed, every connection aborted) and started again on the same port.  The lpa
frames and envelopes they write are built by :mod:`lpa.protocol`, the definition the relay and the
CLI read them with.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet import ssl
from twisted.internet.defer import Deferred, DeferredList
from twisted.web.resource import Resource
from twisted.web.server import Site

from lpa import events as ev
from lpa import protocol
from lpa.agent.eventlog import EventLog, EventsExpiredError
from lpa.tls import load_certificates, load_key_pair, negotiated_protocol


def envelope(data: Any = None, error: Any = None) -> bytes:
    return json.dumps(
        protocol.envelope(data, error, request_id=str(uuid.uuid4()), timestamp=ev.rfc3339())
    ).encode()


#: the ALPN offer of an h2-preferring server (pass to ``listen(..., alpn=H2_FIRST)`` as well)
H2_FIRST = (b"h2", b"http/1.1")


def h2_preferring_options(pki: Any) -> ssl.CertificateOptions:
    """The test PKI's server certificate, client certificates required, ALPN ``h2`` first."""
    cert, key = load_key_pair(pki.server_cert, pki.server_key)
    roots = [
        ssl.Certificate.loadPEM(c.public_bytes(_pem())) for c in load_certificates(pki.ca_cert)
    ]
    return ssl.CertificateOptions(
        privateKey=key,  # type: ignore[arg-type]  # pyOpenSSL takes cryptography's key too
        certificate=cert,  # type: ignore[arg-type]  # and its certificate, typed as X509
        trustRoot=ssl.trustRootFromCertificates(roots),
        acceptableProtocols=list(H2_FIRST),
    )


def _pem() -> Any:
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.PEM


class _RecordingSite(Site):
    """A Site that remembers its connections so a test can kill them all.

    ``alpn`` overrides the protocols the Site offers over ALPN: Twisted 26 puts a factory's
    ``acceptableProtocols()`` AHEAD of the TLS options' list, so an h2-preferring server must
    say so here too (a plain Site offers h2 first only when Twisted's HTTP/2 is importable).
    """

    def __init__(self, resource: Resource, agent: _BaseAgent, alpn: Any = None) -> None:
        super().__init__(resource)
        self._agent = agent
        self._alpn = list(alpn) if alpn is not None else None

    def acceptableProtocols(self) -> list[bytes]:
        if self._alpn is not None:
            return self._alpn
        return super().acceptableProtocols()  # type: ignore[no-any-return]

    def buildProtocol(self, addr: Any) -> Any:
        proto = super().buildProtocol(addr)
        self._agent.connections.append(proto)
        return proto


class _BaseAgent:
    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.jobs: dict[str, dict[str, Any]] = {}
        self.requests: list[str] = []
        self.connections: list[Any] = []
        self.negotiated: list[str | None] = []
        self.port: Any = None
        self.port_number = 0

    def add_job(self, job_id: str | None = None, status: str = ev.PENDING) -> str:
        job_id = job_id or str(uuid.uuid4())
        self.jobs[job_id] = {
            "job_id": job_id,
            "id": job_id,
            "operation": "update",
            "status": status,
            "progress": 0,
            "message": "Job created",
            "logs": [],
            "error": None,
            "error_code": None,
            "created_at": ev.rfc3339(),
            "updated_at": ev.rfc3339(),
        }
        return job_id

    def _resource(self) -> Resource:
        raise NotImplementedError

    def listen(self, options: Any, alpn: Any = None) -> int:
        """Listen on 127.0.0.1 (the previous port after a kill); returns the port number.

        :param alpn: the Site's ALPN offer, e.g. :data:`H2_FIRST`; default Twisted's own.
        """
        site = _RecordingSite(self._resource(), self, alpn)
        self.port = self.reactor.listenSSL(self.port_number, site, options, interface="127.0.0.1")
        self.port_number = self.port.getHost().port
        return self.port_number

    def kill(self) -> Deferred[list[tuple[bool, Any]]]:
        """Stop listening and abort every connection (an agent crash)."""
        stopping = [self.port.stopListening()] if self.port is not None else []
        self.port = None
        transports = [
            getattr(getattr(p, "_channel", p), "transport", None) for p in self.connections
        ]
        # an upgraded connection's transport moved from the HTTP channel to the WebSocket protocol
        transports += [p.transport for p in getattr(self, "sockets", [])]
        for transport in transports:
            if transport is not None and not getattr(transport, "disconnected", False):
                with contextlib.suppress(AttributeError):  # TLS already torn down
                    transport.abortConnection()
        self.connections = []
        return DeferredList(stopping)


class _MiniAgentProtocol(WebSocketServerProtocol):
    """Just enough of the lpa agent's stream for the relay: subscribe/unsubscribe, replay, live."""

    factory: Any

    def onConnect(self, request: Any) -> str | None:
        agent = self.factory.agent
        value = negotiated_protocol(self.transport)
        agent.negotiated.append(value.decode() if value else None)
        agent.offered.append(list(request.protocols))
        if not agent.subprotocol:
            return None  # an agent that predates lpa.jobs.v1: accepts, selects nothing
        if protocol.SUBPROTOCOL not in request.protocols:
            raise ConnectionDeny(400, f"offer the subprotocol {protocol.SUBPROTOCOL}")
        return protocol.SUBPROTOCOL

    def onOpen(self) -> None:
        self.subscribed: set[str] = set()
        self.sent: dict[str, int] = {}
        self.factory.agent.sockets.append(self)
        self._subscription = self.factory.agent.events.subscribe(self._live)
        self._send_frame(protocol.ack_frame("connected", "", "WebSocket connected", ev.rfc3339()))

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        subscription = getattr(self, "_subscription", None)
        if subscription is not None:
            subscription.cancel()
        if self in self.factory.agent.sockets:
            self.factory.agent.sockets.remove(self)

    def _ack(self, event: str, job_id: str, message: str) -> dict[str, Any]:
        return protocol.ack_frame(event, job_id, message, ev.rfc3339())

    def _send_frame(self, frame: dict[str, Any]) -> None:
        if self.state != WebSocketServerProtocol.STATE_OPEN:
            return  # closing: the client resumes from its last seq
        self.sendMessage(json.dumps(frame).encode(), isBinary=False)

    def _send_event(self, job_event: ev.JobEvent) -> None:
        seq = job_event.seq
        assert seq is not None, "the stream carries numbered events only"
        if seq <= self.sent.get(job_event.job_id, 0):
            return
        self.sent[job_event.job_id] = seq
        self._send_frame(job_event.to_wire())

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        agent = self.factory.agent
        message = json.loads(payload)
        agent.ws_messages.append(message)
        job_id = message.get("job_id")
        if message.get("action") == "unsubscribe":
            self.subscribed.discard(job_id)
            self.sent.pop(job_id, None)
            self._send_frame(self._ack("unsubscribed", job_id, f"Unsubscribed from job: {job_id}"))
            return
        if job_id not in agent.jobs:
            self._send_frame(protocol.error_frame(
                protocol.JOB_NOT_FOUND, f"job {job_id} not found", ev.rfc3339(), job_id))
            return
        self.subscribed.add(job_id)
        self._send_frame(self._ack("subscribed", job_id, f"Subscribed to job: {job_id}"))
        after = message.get("after_seq") or 0
        try:
            replay = agent.events.after(job_id, after)
        except EventsExpiredError:
            last = agent.events.last_seq(job_id)
            detail = dict(agent.jobs[job_id], seq=last)
            self._send_frame(protocol.resync_frame(detail, last, "resync", ev.rfc3339()))
            self.sent[job_id] = last
            return
        for job_event in replay:
            self._send_event(job_event)

    def _live(self, job_event: ev.JobEvent) -> None:
        if job_event.job_id in self.subscribed:
            self._send_event(job_event)


class _MiniAgentFactory(WebSocketServerFactory):
    """The WebSocket factory of a :class:`LpaTestAgent`; its protocols reach the agent."""

    protocol = _MiniAgentProtocol

    def __init__(self, agent: LpaTestAgent) -> None:
        super().__init__()
        self.agent = agent


class _LpaRoot(Resource):
    isLeaf = True

    def __init__(self, agent: LpaTestAgent) -> None:
        super().__init__()
        self.agent = agent
        factory = _MiniAgentFactory(agent)
        self.ws = WebSocketResource(factory)

    def render_GET(self, request: Any) -> Any:
        agent = self.agent
        path = request.path.decode()
        agent.requests.append(request.uri.decode())
        if path == protocol.WS_PATH:
            if not agent.websocket:
                request.setResponseCode(404)
                return envelope(error={"code": "NOT_FOUND", "message": "WebSocket disabled"})
            return self.ws.render(request)
        parts = path.split("/")
        if len(parts) in (5, 6) and parts[:4] == ["", "api", "v1", "jobs"]:
            job_id = parts[4]
            detail = agent.jobs.get(job_id)
            if detail is None:
                request.setResponseCode(404)
                return envelope(error={"code": protocol.JOB_NOT_FOUND, "message": "no such job"})
            if len(parts) == 5:
                return envelope(dict(detail, seq=agent.events.last_seq(job_id)))
            if parts[5] == "events":
                after = int(request.args.get(b"after", [b"0"])[0])
                try:
                    events = agent.events.after(job_id, after)
                except EventsExpiredError:
                    request.setResponseCode(410)
                    return envelope(
                        error={
                            "code": protocol.EVENTS_EXPIRED,
                            "message": "gone",
                            "details": dict(detail, seq=agent.events.last_seq(job_id)),
                        }
                    )
                return envelope({"events": [e.to_wire() for e in events]})
        request.setResponseCode(405)
        return b""


class LpaTestAgent(_BaseAgent):
    """A minimal lpa-protocol agent fed from an EventLog (see the module docstring)."""

    def __init__(
        self,
        reactor: Any,
        *,
        websocket: bool = True,
        max_events_per_job: int = 1000,
        subprotocol: bool = True,
    ) -> None:
        super().__init__(reactor)
        self.websocket = websocket
        #: select lpa.jobs.v1 (False: an agent that predates it, selects no subprotocol)
        self.subprotocol = subprotocol
        self.offered: list[list[str]] = []
        self.events = EventLog(reactor, max_events_per_job=max_events_per_job)
        self.sockets: list[_MiniAgentProtocol] = []
        self.ws_messages: list[dict[str, Any]] = []

    def _resource(self) -> Resource:
        return _LpaRoot(self)

    def emit(
        self,
        job_id: str,
        status: str,
        message: str = "",
        *,
        kind: str = ev.KIND_STATUS,
        error: str | None = None,
    ) -> ev.JobEvent:
        """Append one event (and keep the job detail in step)."""
        detail = self.jobs[job_id]
        detail.update(status=status, message=message, updated_at=ev.rfc3339())
        if status == ev.COMPLETED:
            detail["progress"] = 100
        if kind == ev.KIND_OUTPUT:
            detail["logs"].append(message)
        if error is not None:
            detail["error"] = error
        return self.events.append(
            job_id,
            status=status,
            progress=detail["progress"],
            message=message,
            kind=kind,
            error=error,
        )

    def finish(self, job_id: str, status: str = ev.COMPLETED, error: str | None = None) -> None:
        """The terminal job_status, then the single job_complete."""
        self.emit(job_id, status, "Job finished", error=error)
        detail = self.jobs[job_id]
        self.events.append(
            job_id,
            status=status,
            progress=detail["progress"],
            message="Job complete",
            event=ev.EVENT_JOB_COMPLETE,
            error=error,
        )


class _StubRoot(Resource):
    isLeaf = True

    def __init__(self, agent: StubHandshakeAgent) -> None:
        super().__init__()
        self.agent = agent

    def render_GET(self, request: Any) -> Any:
        agent = self.agent
        path = request.path.decode()
        agent.requests.append(request.uri.decode())
        if path == protocol.WS_PATH:
            if (request.getHeader("upgrade") or "").lower() == "websocket":
                request.setResponseCode(101)
                request.setHeader("Upgrade", "websocket")
                request.setHeader("Connection", "Upgrade")
                return json.dumps(
                    {
                        "event": "connected",
                        "ws_id": str(uuid.uuid4()),
                        "timestamp": ev.rfc3339(),
                        "message": "WebSocket endpoint ready. Full implementation requires "
                        "actix-web-actors compatibility.",
                        "polling_alternative": "Use GET /api/v1/jobs/{id} for job status polling",
                    }
                ).encode()
            return envelope({"endpoint": "/api/v1/ws/jobs"})
        parts = path.split("/")
        if len(parts) == 5 and parts[:4] == ["", "api", "v1", "jobs"]:
            detail = agent.jobs.get(parts[4])
            if detail is None:
                request.setResponseCode(404)
                return envelope(error={"code": "JOB_NOT_FOUND", "message": "Job not found"})
            return envelope(detail)
        request.setResponseCode(405)
        request.setHeader("Allow", "GET, POST, PUT, DELETE")
        return b""


class StubHandshakeAgent(_BaseAgent):
    """The original agent: stub WebSocket handshake, REST spelling ``timedout``, details only."""

    def _resource(self) -> Resource:
        return _StubRoot(self)

    def set_state(
        self, job_id: str, status: str, *, logs: list[str] | None = None, error: str | None = None
    ) -> None:
        detail = self.jobs[job_id]
        detail.update(status=status, updated_at=ev.rfc3339())
        if status == "completed":
            detail["progress"] = 100
        if logs is not None:
            detail["logs"] = logs
        if error is not None:
            detail["error"] = error


__all__ = ["H2_FIRST", "LpaTestAgent", "StubHandshakeAgent", "envelope", "h2_preferring_options"]
