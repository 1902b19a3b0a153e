"""The JSON envelope of every REST answer, and the one place errors become answers.

Every answer, errors included, is ``{success, request_id, timestamp, data, error}``; the
original agent answered 429, 405 and parse errors in plain text, which its own clients could
not parse.  :func:`error_answer` maps an :class:`~lpa.errors.ApiError` to status, envelope and
``Retry-After``; anything else is a logged 500 ``INTERNAL_ERROR`` that leaks nothing.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Callable, Mapping

import attr
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from lpa.errors import ApiError
from lpa.events import rfc3339_from_epoch

_log = Logger()

JSON_CONTENT_TYPE = b"application/json"


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Answer:
    """What a route returns: HTTP status, the envelope's ``data`` and extra headers."""

    data: Any
    status: int = 200
    headers: Mapping[str, str] = attr.ib(factory=dict)


class InternalError(ApiError):
    """What a client sees of an unexpected failure: nothing but the code."""

    code, http_status = "INTERNAL_ERROR", 500


class Enveloper:
    """Stamps envelopes with a fresh request id and the injected clock's time."""

    def __init__(
        self, clock: IReactorTime, uuid_factory: Callable[[], uuid.UUID] = uuid.uuid4
    ) -> None:
        self._clock = clock
        self._uuid_factory = uuid_factory

    def envelope(self, data: Any = None, error: ApiError | None = None) -> dict[str, Any]:
        return {
            "success": error is None,
            "request_id": str(self._uuid_factory()),
            "timestamp": rfc3339_from_epoch(self._clock.seconds()),
            "data": None if error is not None else data,
            "error": error.to_error_dict() if error is not None else None,
        }

    def write(self, request: IRequest, answer: Answer) -> bytes:
        """Set status and headers for a success answer; return the body."""
        return self._finish(request, answer.status, answer.headers, self.envelope(answer.data))

    def write_error(self, request: IRequest, failure: Failure | BaseException) -> bytes:
        """Set status and headers for an error; return the body.  The only error mapping."""
        error = failure.value if isinstance(failure, Failure) else failure
        if not isinstance(error, ApiError):
            _log.failure(
                "unexpected error answering {method} {path}",
                failure if isinstance(failure, Failure) else Failure(error),
                method=_text(request.method),
                path=_text(request.path),
            )
            error = InternalError("Internal server error")
        headers: dict[str, str] = dict(getattr(error, "headers", None) or {})
        if error.retry_after is not None:
            headers["Retry-After"] = str(error.retry_after)
        return self._finish(request, error.http_status, headers, self.envelope(error=error))

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


def _text(value: bytes | str | None) -> str:
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return value or ""
