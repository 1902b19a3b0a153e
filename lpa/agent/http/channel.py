"""The agent's HTTP/1.1 connection: twisted.web's parser, with envelope refusals and a deadline.

twisted.web answers what it cannot parse with a bare ``400 Bad Request`` and no body, drops an
over-long request line without any answer, and bounds only idle time (which a client sending a
byte at a time resets for ever).  :class:`EnvelopeChannel` keeps twisted.web's parser and limits
and changes what the client gets::

    request line not METHOD SP TARGET SP HTTP/1.x, bad header,  ─▶ 400 BAD_REQUEST
      bad Content-Length, bad chunked body                          (details.reason: which)
    a transfer coding other than chunked                         ─▶ 501 NOT_IMPLEMENTED
    HTTP/2.0, HTTP/0.9 … on the request line                     ─▶ 505 (HTTP version)
    request line over 16 KiB                                     ─▶ 414 URI_TOO_LONG
    request line + headers over 16 KiB, or over 500 headers      ─▶ 431 HEADERS_TOO_LARGE
    body over api.max_body_bytes (declared, or chunked so far)   ─▶ 413, at once
    head and body not all in within server.timeout_seconds       ─▶ 408 REQUEST_TIMEOUT

each a whole response in the JSON envelope with ``Connection: close``.  The agent then stops
sending (a TCP half-close) but reads and drops what the client still sends for a moment, so that
the client reads the answer rather than a reset, and closes.  Each refusal is logged (info,
throttled per error code).

The deadline covers everything a client sends, never the agent's own work::

    ready ─(server.timeout_seconds)─▶ 408 and close (a quiet close if no byte of a request
      │                                came; over TLS without a handshake, logged as refused)
      │ head and body complete
      ▼
    handling: no deadline (a package-manager query may take minutes)
      │ response handed to the transport
      ▼
    ready again (keep-alive)

Over TLS, a connection that ends before its handshake completed is one refused handshake: the
site logs it with the peer and the reason (see :func:`lpa.tls.handshake_failure_reason`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IHandshakeListener
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from zope.interface import implementer

from lpa.agent.http.envelope import (
    BadRequestError,
    HeadersTooLargeError,
    HttpVersionError,
    NotImplementedHttpError,
    RequestTimeoutError,
    UriTooLongError,
)
from lpa.errors import ApiError, PayloadTooLargeError

#: seconds the rest of a refused request is read and dropped before the connection is closed
LINGER_SECONDS = 2.0

_HTTP_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]\Z")
_SUPPORTED_VERSIONS = (b"HTTP/1.0", b"HTTP/1.1")


def _bad_request_line() -> ApiError:
    return BadRequestError(
        "The request line must be METHOD SP TARGET SP HTTP/1.1 (or HTTP/1.0)", "request_line"
    )


def _request_line_problem(line: bytes) -> ApiError | None:
    """A refusal more precise than twisted.web's for a request line it will not take."""
    parts = line.split(b" ")
    if len(parts) != 3:
        return _bad_request_line()
    version = parts[2]
    if _HTTP_VERSION.match(version) and version not in _SUPPORTED_VERSIONS:
        return HttpVersionError(
            "Only HTTP/1.1 and HTTP/1.0 are served", {"version": version.decode("ascii")}
        )
    return None


def _payload_too_large(limit: int) -> ApiError:
    return PayloadTooLargeError(f"Request body larger than {limit} bytes", {"max_bytes": limit})


def _header_problem(line: bytes, count: int, max_headers: int) -> ApiError:
    """What is wrong with a header line if twisted.web refuses it."""
    name, _, value = line.partition(b":")
    name = name.strip().lower()
    if count + 1 > max_headers:
        return HeadersTooLargeError(
            f"A request may carry at most {max_headers} headers", {"max_headers": max_headers}
        )
    if name == b"content-length":
        return BadRequestError(
            "Content-Length must be one non-negative integer, without Transfer-Encoding",
            "content_length",
        )
    if name == b"transfer-encoding":
        if value.strip().lower() not in (b"chunked", b"identity"):
            return NotImplementedHttpError(
                "Transfer-Encoding other than chunked is not supported",
                {"reason": "transfer_encoding"},
            )
        return BadRequestError(
            "Transfer-Encoding chunked may be sent once, and not with Content-Length",
            "transfer_encoding",
        )
    return BadRequestError(
        "A header line must be NAME: VALUE with a token name and no control characters", "header"
    )


@implementer(IHandshakeListener)
class EnvelopeChannel(HTTPChannel):
    """An HTTPChannel whose own refusals are envelopes and whose reads have a deadline.

    ``site`` is an :class:`~lpa.agent.http.site.AgentSite` (set by ``Site.buildProtocol``);
    ``timeout_seconds`` is set by the site too (None: no deadline).
    """

    site: Any
    timeout_seconds: float | None = None

    _deadline: IDelayedCall | None = None
    _linger: IDelayedCall | None = None
    _received_since_ready = 0
    _awaiting_request_line = True
    _refused = False
    _problem: ApiError | None = None
    _tls_handshake_done = False

    # -- connection ----------------------------------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        self._arm_deadline()

    def handshakeCompleted(self) -> None:
        self._tls_handshake_done = True

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return  # lingering: read and drop
        self._received_since_ready += len(data)
        super().dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel(self._deadline)
        self._cancel(self._linger)
        self._deadline = self._linger = None
        try:
            if self.isSecure() and not self._tls_handshake_done:
                self.site.handshake_failed(self.transport, reason)
        finally:
            super().connectionLost(reason)

    # -- parsing: name the problem before twisted.web finds it -----------------------------------

    @contextmanager
    def _expecting(self, problem: ApiError | None) -> Iterator[None]:
        previous, self._problem = self._problem, problem
        try:
            yield
        finally:
            self._problem = previous

    def lineReceived(self, line: bytes) -> None:
        if self._refused:
            return
        first = self._awaiting_request_line
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            self._refuse(self._too_long(first))
            return
        problem: ApiError | None = None
        if first and line:
            self._awaiting_request_line = False
            problem = _request_line_problem(line)
            if problem is not None:
                self._refuse(problem)
                return
            problem = _bad_request_line()
        with self._expecting(problem):
            super().lineReceived(line)

    def headerReceived(self, line: bytes) -> bool:
        with self._expecting(_header_problem(line, self._receivedHeaderCount, self.maxHeaders)):
            return bool(super().headerReceived(line))

    def lineLengthExceeded(self, line: bytes) -> None:
        self._refuse(self._too_long(self._awaiting_request_line))

    def _too_long(self, request_line: bool) -> ApiError:
        limit = self.totalHeadersSize
        if request_line:
            return UriTooLongError(
                f"The request line is longer than {limit} bytes", {"max_bytes": limit}
            )
        return HeadersTooLargeError(
            f"The request line and headers are longer than {limit} bytes", {"max_bytes": limit}
        )

    def allHeadersReceived(self) -> None:
        limit = getattr(self.requests[-1], "max_body_bytes", None)
        if limit is not None and self.length is not None and self.length > limit:
            # before twisted.web would answer "Expect: 100-continue" with a 100
            self._refuse(_payload_too_large(limit))
            return
        super().allHeadersReceived()

    def rawDataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        chunked = BadRequestError("The chunked request body is malformed", "chunked")
        with self._expecting(None if self._handlingRequest else chunked):
            super().rawDataReceived(data)
        self._refuse_oversized_body()

    def _refuse_oversized_body(self) -> None:
        """413 as soon as a chunked body grows too large, not after reading all of it."""
        if self._refused or self._transferDecoder is None:
            return
        request = self.requests[-1] if self.requests else None
        if request is not None and getattr(request, "body_too_large", False):
            self._refuse(_payload_too_large(request.max_body_bytes))

    def allContentReceived(self) -> None:
        if self._refused:
            return
        self._cancel(self._deadline)
        self._deadline = None
        self._awaiting_request_line = True
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        if self.persistent and not self._refused:
            self._arm_deadline()  # before buffered pipelined bytes are parsed and counted
        super().requestDone(request)

    def _respondToBadRequestAndDisconnect(self) -> None:
        """twisted.web's refusal (a bare 400): ours names the problem in the envelope."""
        problem = self._problem or BadRequestError("The request is not valid HTTP/1.1", "syntax")
        self._refuse(problem)

    # -- time ------------------------------------------------------------------------------------

    def _arm_deadline(self) -> None:
        self._cancel(self._deadline)
        self._deadline = None
        self._received_since_ready = 0
        if self.timeout_seconds:
            self._deadline = self.callLater(self.timeout_seconds, self._expire)

    def timeoutConnection(self) -> None:
        """twisted.web's idle timeout: the same as the deadline."""
        self._expire()

    def _expire(self) -> None:
        self._cancel(self._deadline)
        self._deadline = None
        if self._refused or self._handlingRequest or self.transport is None:
            return
        if self._received_since_ready:
            self._refuse(
                RequestTimeoutError(
                    f"The request was not received within {self.timeout_seconds:g} seconds",
                    {"timeout_seconds": self.timeout_seconds},
                )
            )
            return
        if self.isSecure() and not self._tls_handshake_done:
            self.site.handshake_timed_out(self.transport)
        self._refused = True
        self._close()

    # -- refusing ----------------------------------------------------------------------------

    def _refuse(self, error: ApiError) -> None:
        """Answer ``error`` as a whole response, drop what else comes, close shortly after."""
        if self._refused:
            return
        self._refused = True
        self._cancel(self._deadline)
        self._deadline = None
        self.setTimeout(None)
        if self.transport is None:
            return
        self.transport.write(self.site.enveloper.refusal(error))
        self.site.request_refused(self.transport, error)
        if not self.isSecure() and hasattr(self.transport, "loseWriteConnection"):
            # TCP: the answer ends with our FIN now; what the client still sends is dropped
            # (TLS has no half-close: there the client closes on Connection: close, or we do)
            self.transport.loseWriteConnection()
        self._linger = self.callLater(LINGER_SECONDS, self._close)

    def _close(self) -> None:
        self._linger = None
        if self.transport is None:
            return
        if self.abortTimeout is not None and self._abortingCall is None:
            self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)
        self.loseConnection()

    @staticmethod
    def _cancel(call: IDelayedCall | None) -> None:
        if call is not None and call.active():
            call.cancel()
