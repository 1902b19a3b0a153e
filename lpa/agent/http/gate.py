"""What every request passes before any route runs: peer, headers, rate, body size.

The order is the original's middleware order, outermost first::

    peer_check (IP whitelist, then client allowlist) ─▶ 403 FORBIDDEN
    duplicate Content-Type / Host / Authorization   ─▶ 400 DUPLICATE_HEADERS
    Host not a host[:port], path not UTF-8          ─▶ 400 BAD_REQUEST
    RateLimiter.check (one limiter per process)     ─▶ 429 RATE_LIMITED + Retry-After
    body larger than the limit                      ─▶ 413 PAYLOAD_TOO_LARGE

Refusals are ``ApiError`` s written by the API's one error mapping, so they are envelopes too.
The Host and path checks keep what Klein cannot route (it logs a traceback for a path that is
not UTF-8 once percent-decoded) from reaching it.  :class:`BoundedRequest` keeps twisted.web
from buffering an oversized body in the first place, and answers a failure that escapes every
handler as a 500 envelope rather than twisted.web's HTML page.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from lpa.agent.http import inputs
from lpa.agent.http.envelope import Answer, BadRequestError
from lpa.agent.http.ratelimit import Limiter
from lpa.errors import ApiError, DuplicateHeadersError, ForbiddenError, MethodNotAllowedError

_log = Logger()

PeerCheck = Callable[[IRequest], "ApiError | None"]

#: headers a request may carry once only (the original's "security headers" middleware)
SINGLE_HEADERS = (b"content-type", b"host", b"authorization")

#: a Host header: a registered name or IPv4 address, or an IPv6 literal, then maybe a port
_HOST = re.compile(rb"(?:[A-Za-z0-9._~!$&'()*+,;=%-]*|\[[0-9A-Fa-f:.]+\])(?::[0-9]*)?\Z")


def check_target(request: IRequest) -> None:
    """400 for a Host that is not ``host[:port]`` or a path that is not UTF-8 once decoded."""
    for host in request.requestHeaders.getRawHeaders(b"host") or []:
        if not _HOST.match(host):
            raise BadRequestError("The Host header must be host[:port]", "host")
    postpath = getattr(request, "postpath", None) or []
    try:
        b"/".join(postpath).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequestError(
            "The request path must be UTF-8 once percent-decoded", "path_encoding"
        ) from None


class Admission:
    """The checks above, as one callable that raises an ``ApiError`` to refuse a request."""

    def __init__(
        self,
        *,
        peer_check: PeerCheck | None,
        rate_limiter: Limiter | None,
        max_body_bytes: int,
    ) -> None:
        self._peer_check = peer_check
        self._rate_limiter = rate_limiter
        self._max_body_bytes = max_body_bytes

    def __call__(self, request: IRequest) -> None:
        if self._peer_check is not None:
            refusal = self._peer_check(request)
            if refusal is not None:
                raise refusal
        for name in SINGLE_HEADERS:
            values = request.requestHeaders.getRawHeaders(name) or []
            if len(values) > 1:
                raise DuplicateHeadersError(
                    "Duplicate critical headers not allowed", {"header": name.decode("ascii")}
                )
        check_target(request)
        if self._rate_limiter is not None:
            address = request.getClientAddress()
            client = str(getattr(address, "host", address))
            self._rate_limiter.check(
                client, request.method.decode("ascii", "replace"), request.path.decode("latin-1")
            )
        inputs.check_body_size(request, self._max_body_bytes)


class Gate(Resource):
    """Runs the admission checks on every request, then hands it to the routes."""

    isLeaf = True

    def __init__(
        self,
        routes: IResource,
        admit: Callable[[IRequest], None],
        write_error: Callable[[IRequest, Failure], bytes],
    ) -> None:
        super().__init__()
        self._routes = routes
        self._admit = admit
        self._write_error = write_error

    def render(self, request: IRequest) -> Any:
        try:
            self._admit(request)
        except Exception:
            # a crashing check fails closed: a logged 500, and the request goes no further
            return self._write_error(request, Failure())
        return self._routes.render(request)


class BoundedRequest(Request):
    """A request that stops buffering its body past ``max_body_bytes`` and flags it.

    twisted.web reads the whole body before rendering (into a temporary file past 100 kB);
    with this request class an oversized body, declared or chunked, is counted and dropped, and
    the gate answers 413.  Use :func:`bounded_request_factory` to set the limit.
    """

    max_body_bytes = 1 << 20
    body_too_large = False
    _body_received = 0
    #: bodies are JSON: never parse form submissions into ``args`` (twisted.web answers a
    #: malformed multipart body with a bare 400 of its own)
    _parsePOSTFormSubmission = False

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.max_body_bytes:
            self.body_too_large = True
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        self._body_received += len(data)
        if self._body_received > self.max_body_bytes:
            self.body_too_large = True
        if not self.body_too_large:
            super().handleContentChunk(data)

    def _handleStar(self) -> None:
        """``OPTIONS *`` (a probe) is an empty 200, other methods on ``*`` a 405, as twisted.web
        answers them, but in the envelope."""
        enveloper = getattr(self.site, "enveloper", None)
        if enveloper is None:
            super()._handleStar()
            return
        if self.method == b"OPTIONS":
            body = enveloper.write(self, Answer(None))
        else:
            error = MethodNotAllowedError(
                "Only OPTIONS applies to *", {"allowed_methods": ["OPTIONS"]}
            )
            error.headers = {"Allow": "OPTIONS"}
            body = enveloper.write_error(self, error)
        self.setHeader(b"Content-Length", b"%d" % len(body))
        self.write(body)
        self.finish()

    def processingFailed(self, reason: Failure) -> Failure:
        """A failure no handler answered: a logged 500 envelope, not twisted.web's HTML page."""
        write_error = getattr(getattr(self.site, "enveloper", None), "write_error", None)
        if write_error is None or self.finished or self.startedWriting:
            logged: Failure = super().processingFailed(reason)
            return logged
        body = write_error(self, reason)
        self.setHeader(b"Content-Length", b"%d" % len(body))
        self.write(body)
        self.finish()
        return reason


def bounded_request_factory(max_body_bytes: int) -> type[BoundedRequest]:
    """A :class:`BoundedRequest` subclass for ``Site(requestFactory=...)``."""
    return type("BoundedRequest", (BoundedRequest,), {"max_body_bytes": max_body_bytes})


def make_peer_check(
    whitelist: Any | None,
    allowed_clients: Sequence[str],
    identity_of: Callable[[IRequest], Any],
    identity_allowed: Callable[[Any, Sequence[str]], bool] | None = None,
) -> PeerCheck:
    """Compose the IP whitelist (``whitelist.allows(ip)``) and the client allowlist into a check.

    ``whitelist`` None means every IP; an empty ``allowed_clients`` means every client the CA
    vouches for.  ``identity_of(request)`` gives the peer identity from the TLS transport (e.g.
    ``lambda r: lpa.tls.peer_identity(r.transport)``); ``identity_allowed`` defaults to
    ``lpa.tls.identity_allowed``.
    """
    if identity_allowed is None:
        from lpa.tls import identity_allowed as tls_identity_allowed

        identity_allowed = tls_identity_allowed
    allowed = tuple(allowed_clients)
    check_identity = identity_allowed

    def peer_check(request: IRequest) -> ApiError | None:
        if whitelist is not None:
            address = request.getClientAddress()
            host = getattr(address, "host", None)
            if host is None or not whitelist.allows(host):
                _log.warn("refused {ip}: not in the IP whitelist", ip=host)
                return ForbiddenError("Client IP not allowed", {"ip": host})
        if allowed:
            identity = identity_of(request)
            if not check_identity(identity, allowed):
                _log.warn(
                    "refused client {identity}: not in auth.allowed_clients", identity=identity
                )
                return ForbiddenError("Client certificate not allowed")
        return None

    return peer_check
