"""A raw HTTP/1.1 client for tests: send any bytes, get back the one response (or nothing).

``exchange(endpoint, payload)`` connects, writes ``payload`` as is, parses the first response
(status line, headers, then a body framed by ``Content-Length``, ``chunked`` or the end of the
connection) and closes once it is complete.  When the server closes without a byte,
``Answer.status`` is None.  A client-side guard aborts a connection the server holds longer than
``guard`` seconds without a complete answer, and says so (``Answer.held``): that is a failure to
report, not a way to wait.
"""

from __future__ import annotations

import json
from typing import Any, cast

import attr
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import connectProtocol
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure


@attr.s(auto_attribs=True)
class Answer:
    """What came back: ``status`` None means the connection closed without an answer."""

    status: int | None
    headers: dict[bytes, list[bytes]] = attr.ib(factory=dict)
    body: bytes = b""
    raw: bytes = b""
    held: bool = False

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.get(name.lower())
        return values[-1] if values else None

    def envelope(self) -> Any:
        return json.loads(self.body)


def parse_response(data: bytes, *, head_only: bool = False, eof: bool = False) -> Answer | None:
    """The first response in ``data``, or None when more bytes are needed."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = data[:end].split(b"\r\n")
    status_line = lines[0].split(b" ", 2)
    if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/"):
        raise ValueError(f"not an HTTP response: {data[:80]!r}")
    headers: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    status = int(status_line[1])
    rest = data[end + 4 :]
    answer = Answer(status, headers, raw=data)
    if head_only or status in (204, 304) or 100 <= status < 200:
        return answer
    if headers.get(b"transfer-encoding", [b""])[-1].lower() == b"chunked":
        body = _dechunk(rest)
        if body is None:
            return None
        answer.body = body
        return answer
    if b"content-length" in headers:
        length = int(headers[b"content-length"][-1])
        if len(rest) < length:
            return None
        answer.body = rest[:length]
        return answer
    if not eof:
        return None
    answer.body = rest
    return answer


def _dechunk(data: bytes) -> bytes | None:
    out = b""
    while True:
        size_end = data.find(b"\r\n")
        if size_end < 0:
            return None
        size = int(data[:size_end].split(b";")[0], 16)
        data = data[size_end + 2 :]
        if size == 0:
            return out if data.find(b"\r\n") >= 0 else None
        if len(data) < size + 2:
            return None
        out, data = out + data[:size], data[size + 2 :]


class _Exchange(Protocol):
    def __init__(self, payload: bytes, head_only: bool, guard: float) -> None:
        self.payload = payload
        self.head_only = head_only
        self.guard = guard
        self.data = b""
        self.answer: Answer | None = None
        self.done: Deferred[Answer] = Deferred()
        self.held = False
        self._guard: Any = None

    def _transport(self) -> ITCPTransport:
        """The connection's transport (TCP, or TLS over TCP: both can abort)."""
        return cast(ITCPTransport, self.transport)

    def connectionMade(self) -> None:
        self._guard = reactor.callLater(self.guard, self._hold_timeout)
        self._transport().write(self.payload)

    def _hold_timeout(self) -> None:
        self.held = True
        self._transport().abortConnection()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.answer is None:
            self.answer = parse_response(self.data, head_only=self.head_only)
            if self.answer is not None:
                self._transport().loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._guard is not None and self._guard.active():
            self._guard.cancel()
        answer = self.answer
        if answer is None and self.data:
            answer = parse_response(self.data, head_only=self.head_only, eof=True)
        if answer is None:
            answer = Answer(None, raw=self.data)
        answer.held = self.held
        self.done.callback(answer)


async def eventually(predicate: Any, within: float = 10.0) -> None:
    """Wait (in 10 ms turns) until ``predicate()`` is true: for what the server does after the
    client has seen the end of a connection, such as logging why it refused it."""
    from twisted.internet.task import deferLater

    for _ in range(int(within / 0.01)):
        if predicate():
            return
        await deferLater(reactor, 0.01, lambda: None)
    raise AssertionError(f"not true within {within:g} s: {predicate}")


async def exchange(
    endpoint: Any, payload: bytes, *, head_only: bool = False, guard: float = 20.0
) -> Answer:
    """Send ``payload`` on a new connection; the server's first answer (or None)."""
    protocol = _Exchange(payload, head_only, guard)
    await connectProtocol(endpoint, protocol)
    return await protocol.done
