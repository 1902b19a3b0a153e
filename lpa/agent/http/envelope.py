"""The JSON envelope of every REST answer, and the one place errors become answers.

Every answer, errors included, is ``{success, request_id, timestamp, data, error}``; the
original agent answered 429, 405 and parse errors in plain text, which its own clients could
not parse.  :meth:`Enveloper.write_error` maps an :class:`~lpa.errors.ApiError` to status,
envelope and ``Retry-After``; anything else is a logged 500 ``INTERNAL_ERROR`` that leaks nothing.

Refusals made below the routes, where there is no request object to answer through (a request
line or header twisted.web cannot parse, a request that took too long), are whole HTTP/1.1
responses from :meth:`Enveloper.refusal`, with the same envelope and ``Connection: close``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import attr
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES, datetimeToString
from twisted.web.iweb import IRequest

from lpa.errors import ApiError, CommandError
from lpa.events import rfc3339_from_epoch

_log = Logger()

JSON_CONTENT_TYPE = b"application/json"


class Seconds(Protocol):
    """What stamps an envelope: ``seconds()`` of an ``IReactorTime`` or of a wall clock."""

    def seconds(self) -> float: ...


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Answer:
    """What a route returns: HTTP status, the envelope's ``data`` and extra headers."""

    data: Any
    status: int = 200
    headers: Mapping[str, str] = attr.ib(factory=dict)


class InternalError(ApiError):
    """What a client sees of an unexpected failure: nothing but the code."""

    code, http_status = "INTERNAL_ERROR", 500


# -- refusals of the HTTP layer (framing, limits, time), before any route runs -----------------


class BadRequestError(ApiError):
    """The request cannot be parsed as HTTP/1.1; ``details.reason`` says which part."""

    code, http_status = "BAD_REQUEST", 400

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message, {"reason": reason})


class RequestTimeoutError(ApiError):
    """The request head and body did not arrive within ``server.timeout_seconds``."""

    code, http_status, retryable = "REQUEST_TIMEOUT", 408, True


class UriTooLongError(ApiError):
    code, http_status = "URI_TOO_LONG", 414


class HeadersTooLargeError(ApiError):
    code, http_status = "HEADERS_TOO_LARGE", 431


class NotImplementedHttpError(ApiError):
    code, http_status = "NOT_IMPLEMENTED", 501


class HttpVersionError(ApiError):
    code, http_status = "HTTP_VERSION_NOT_SUPPORTED", 505


#: reason phrases twisted.web does not know (431 is RFC 6585)
_REASONS = {
    426: b"Upgrade Required",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
}


def reason_phrase(status: int) -> bytes:
    return _REASONS.get(status) or RESPONSES.get(status) or b"Error"


def refusal_response(
    status: int,
    envelope: Mapping[str, Any],
    now: float,
    headers: Iterable[tuple[str, str]] = (),
) -> bytes:
    """A whole HTTP/1.1 response carrying ``envelope``, after which the server closes."""
    body = json.dumps(envelope, separators=(",", ":")).encode("utf-8")
    lines = [
        b"HTTP/1.1 %d %s" % (status, reason_phrase(status)),
        b"Date: " + datetimeToString(now),
        b"Content-Type: " + JSON_CONTENT_TYPE,
        b"Cache-Control: no-store",
        b"Connection: close",
        b"Content-Length: %d" % len(body),
    ]
    for name, value in headers:
        if name.lower() not in ("content-type", "content-length", "connection"):
            lines.append(name.encode("ascii") + b": " + value.encode("latin-1"))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class Enveloper:
    """Stamps envelopes with a fresh request id and the injected clock's time."""

    def __init__(
        self, clock: Seconds, uuid_factory: Callable[[], uuid.UUID] = uuid.uuid4
    ) -> None:
        self._clock = clock
        self._uuid_factory = uuid_factory

    def envelope(
        self, data: Any = None, error: ApiError | None = None, request_id: str | None = None
    ) -> dict[str, Any]:
        return {
            "success": error is None,
            "request_id": request_id or str(self._uuid_factory()),
            "timestamp": rfc3339_from_epoch(self._clock.seconds()),
            "data": None if error is not None else data,
            "error": error.to_error_dict() if error is not None else None,
        }

    def write(self, request: IRequest, answer: Answer) -> bytes:
        """Set status and headers for a success answer; return the body."""
        return self._finish(request, answer.status, answer.headers, self.envelope(answer.data))

    def write_error(self, request: IRequest, failure: Failure | BaseException) -> bytes:
        """Set status and headers for an error; return the body.  The only error mapping.

        What the client gets names the failure, never the host's command line or output; a
        server-side failure's cause (a host command's argv, exit status and stderr, or an
        exception) is logged here with the request id the client sees, so the two correlate.
        """
        error = failure.value if isinstance(failure, Failure) else failure
        request_id = str(self._uuid_factory())
        if not isinstance(error, ApiError):
            _log.failure(
                "request {request_id}: unexpected error answering {method} {path}",
                failure if isinstance(failure, Failure) else Failure(error),
                request_id=request_id,
                method=_text(request.method),
                path=_text(request.path),
            )
            error = InternalError("Internal server error")
        elif error.http_status >= 500 and error.__cause__ is not None:
            _log_cause(request, request_id, error)
        headers: dict[str, str] = dict(error.headers or {})
        if error.retry_after is not None:
            headers["Retry-After"] = str(error.retry_after)
        envelope = self.envelope(error=error, request_id=request_id)
        return self._finish(request, error.http_status, headers, envelope)

    def refusal(self, error: ApiError) -> bytes:
        """``error`` as a whole HTTP/1.1 response with ``Connection: close`` (no request object)."""
        headers = dict(getattr(error, "headers", None) or {})
        if error.retry_after is not None:
            headers["Retry-After"] = str(error.retry_after)
        return refusal_response(
            error.http_status,
            self.envelope(error=error),
            self._clock.seconds(),
            headers.items(),
        )

    @staticmethod
    def _finish(
        request: IRequest, status: int, headers: Mapping[str, str], body: dict[str, Any]
    ) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", JSON_CONTENT_TYPE)
        request.setHeader(b"Cache-Control", b"no-store")
        for name, value in headers.items():
            request.setHeader(name.encode("ascii"), value.encode("latin-1"))
        return json.dumps(body, separators=(",", ":")).encode("utf-8")


def _log_cause(request: IRequest, request_id: str, error: ApiError) -> None:
    """One warn line: which request failed and why, with the host command's output if any."""
    cause = error.__cause__
    fields: dict[str, Any] = {}
    while cause is not None and not isinstance(cause, CommandError):
        cause = cause.__cause__
    if isinstance(cause, CommandError):
        fields = cause.log_fields()
        stderr = " | ".join(fields["stderr"]) or "(no stderr)"
        reason = f"{cause.message}; stderr: {stderr}"
    else:
        cause = error.__cause__
        reason = f"{type(cause).__name__}: {cause}"
    _log.warn(
        "request {request_id}: {method} {path} answered {status} {code}: {reason}",
        request_id=request_id,
        method=_text(request.method),
        path=_text(request.path),
        status=error.http_status,
        code=error.code,
        reason=reason,
        **fields,
    )


def _text(value: bytes | str | None) -> str:
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return value or ""
