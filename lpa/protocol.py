"""The agent's job-stream protocol as its clients speak it: one definition for relay, CLI and tests.

The WebSocket at :data:`WS_PATH` is served under the subprotocol :data:`SUBPROTOCOL`
(``Sec-WebSocket-Protocol``): a client that does not offer it (the manager's own relay inside
pm-worker, which never subscribes) is refused at the handshake and falls back to REST polling.

This module is pure (no I/O, no clock): frame builders and parsers, the REST envelope and the
events page; it is a little over 400 lines on purpose, so the whole wire format reads top to
bottom in one file.  :mod:`lpa.follower` holds the state machine that follows one job with them.

Client → server frames are built by :func:`subscribe_frame` and :func:`unsubscribe_frame`.
Server → client frames are parsed by :func:`parse_frame` into typed values::

    connected / subscribed / unsubscribed  → Ack
    job_status / job_complete              → lpa.events.JobEvent
    resync                                 → Resync (the job's detail in ``job``, its last ``seq``)
    error                                  → StreamError (``error_code``, ``message``)
    anything newer                         → UnknownFrame (readers ignore it)

A ``resync`` keeps the job's snapshot in ``job`` (what the agent sends: ``Job.to_detail()``), the
job's last event number in ``seq`` and the agent's current ``incarnation``; its own ``status``,
``progress``, ``message``, ``error`` and ``error_code`` repeat the snapshot's.  A reader that finds
no ``job`` object takes the frame's own members as the snapshot.  Members a reader does not know
are ignored everywhere, so agents can add them without breaking older clients.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import attr

from lpa.events import (
    EVENT_JOB_COMPLETE,
    EVENT_JOB_STATUS,
    KIND_SNAPSHOT,
    JobEvent,
    normalise_status,
)

#: the WebSocket subprotocol of the job event stream, version 1
SUBPROTOCOL = "lpa.jobs.v1"
#: where the job event stream is served
WS_PATH = "/api/v1/ws/jobs"
#: ``job_id`` of a subscription to every job
ALL = "all"

# ``event`` members of server frames other than job events
EVENT_CONNECTED = "connected"
EVENT_SUBSCRIBED = "subscribed"
EVENT_UNSUBSCRIBED = "unsubscribed"
EVENT_RESYNC = "resync"
EVENT_ERROR = "error"
ACK_EVENTS = (EVENT_CONNECTED, EVENT_SUBSCRIBED, EVENT_UNSUBSCRIBED)

# ``error_code`` of ``error`` frames (the connection stays open)
INVALID_JSON = "INVALID_JSON"
INVALID_MESSAGE = "INVALID_MESSAGE"
UNKNOWN_ACTION = "UNKNOWN_ACTION"
INVALID_JOB_ID = "INVALID_JOB_ID"
JOB_NOT_FOUND = "JOB_NOT_FOUND"
TOO_MANY_SUBSCRIPTIONS = "TOO_MANY_SUBSCRIPTIONS"
BINARY_NOT_SUPPORTED = "BINARY_NOT_SUPPORTED"
INTERNAL_ERROR = "INTERNAL_ERROR"

#: close code for a consumer that fell too far behind: reconnect and resume with ``after_seq``
CLOSE_SLOW_CONSUMER = 1008

# REST error codes a follower acts on
EVENTS_EXPIRED = "EVENTS_EXPIRED"  # 410: N is older than what is kept; details: the job
EVENTS_AHEAD = "EVENTS_AHEAD"  # 409: N is past the job's last seq; details: last_seq, job


class ProtocolError(ValueError):
    """A frame or answer that does not follow the protocol; ``str()`` is one line."""


# -- client → server ----------------------------------------------------------------------------


def subscribe_frame(job_id: str | None = None, after_seq: int | None = None) -> dict[str, Any]:
    """``subscribe``: one job (with ``after_seq``: replay the kept events after it), or all."""
    if after_seq is not None and (
        not isinstance(after_seq, int) or isinstance(after_seq, bool) or after_seq < 0
    ):
        raise ValueError(f"after_seq must be a non-negative integer, got {after_seq!r}")
    if job_id is None or job_id == ALL:
        if after_seq is not None:
            raise ValueError("after_seq needs a job_id")
        return {"action": "subscribe", "job_id": ALL}
    frame: dict[str, Any] = {"action": "subscribe", "job_id": job_id}
    if after_seq is not None:
        frame["after_seq"] = after_seq
    return frame


def unsubscribe_frame(job_id: str | None = None) -> dict[str, Any]:
    """``unsubscribe``: stop one job, or (no ``job_id``) everything."""
    return {"action": "unsubscribe", "job_id": ALL if job_id is None else job_id}


def dumps(frame: Mapping[str, Any]) -> str:
    """The text of one frame (compact JSON)."""
    return json.dumps(frame, separators=(",", ":"))


# -- server → client: builders (the agent's shapes; fakes and tests build with these) -----------


def ack_frame(event: str, job_id: str, message: str, timestamp: str) -> dict[str, Any]:
    """``connected`` (``job_id`` ""), ``subscribed`` or ``unsubscribed``."""
    if event not in ACK_EVENTS:
        raise ValueError(f"not an acknowledgement: {event!r}")
    return {
        "event": event,
        "job_id": job_id,
        "status": event,
        "progress": 0,
        "message": message,
        "timestamp": timestamp,
    }


def error_frame(code: str, message: str, timestamp: str, job_id: str = "") -> dict[str, Any]:
    """An ``error`` frame: ``status`` is the code in lower case, as the original agent wrote it."""
    return {
        "event": EVENT_ERROR,
        "job_id": job_id,
        "status": code.lower(),
        "progress": 0,
        "message": message,
        "timestamp": timestamp,
        "error": message,
        "error_code": code,
    }


def resync_frame(
    detail: Mapping[str, Any], seq: int, message: str, timestamp: str,
    incarnation: str | None = None,
) -> dict[str, Any]:
    """A ``resync``: the job detail in ``job``, the job's last event number in ``seq``."""
    frame: dict[str, Any] = {
        "event": EVENT_RESYNC,
        "job_id": detail["job_id"],
        "seq": seq,
        "kind": KIND_SNAPSHOT,
        "status": detail["status"],
        "progress": detail.get("progress", 0),
        "message": message,
        "timestamp": timestamp,
        "job": dict(detail),
    }
    if detail.get("error") is not None or detail.get("error_code") is not None:
        frame["error"] = detail.get("error")
        frame["error_code"] = detail.get("error_code")
    if incarnation is not None:
        frame["incarnation"] = incarnation
    return frame


# -- server → client: parsed values ---------------------------------------------------------------


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Ack:
    """``connected``, ``subscribed`` or ``unsubscribed``."""

    event: str
    job_id: str
    message: str = ""


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Resync:
    """The agent cannot replay from the ``after_seq`` asked: its snapshot replaces the stream."""

    job_id: str
    #: the job's last event number (None only when neither frame nor detail carries one)
    seq: int | None
    #: the detail as a KIND_SNAPSHOT event (``seq`` = :attr:`seq`)
    snapshot: JobEvent
    #: the job detail (``job``), or the frame itself when it carries none
    detail: Mapping[str, Any]
    #: the agent's current incarnation, when it says (``"<boot_id>:<start counter>"``)
    incarnation: str | None = None


@attr.s(frozen=True, slots=True, auto_attribs=True)
class StreamError:
    """An ``error`` frame: the agent refused a message of ours; the connection stays open."""

    code: str
    message: str
    job_id: str = ""


@attr.s(frozen=True, slots=True, auto_attribs=True)
class UnknownFrame:
    """A frame of a kind this version does not know (a newer agent): ignore it."""

    event: str
    job_id: str = ""


Frame = Ack | JobEvent | Resync | StreamError | UnknownFrame


def _positive_int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    return None


def _str(value: Any, default: str = "") -> str:
    return value if isinstance(value, str) else default


def snapshot_event(job_id: str, detail: Mapping[str, Any], seq: Any = None) -> JobEvent:
    """A job detail (``GET /jobs/{id}``, a 410's details, a ``resync``) as a KIND_SNAPSHOT event.

    Status spellings of every agent are read (``timedout`` …); ``output`` is the joined ``logs``;
    ``seq`` (else the detail's own) is kept when it is a positive integer, else None (an original
    agent numbers nothing).  Raises :class:`ProtocolError` for a detail without a readable status.
    """
    if not isinstance(detail, Mapping):
        raise ProtocolError("job detail is not a JSON object")
    status = detail.get("status")
    if not isinstance(status, str):
        raise ProtocolError("job detail has no status")
    try:
        status = normalise_status(status)
    except ValueError as bad:
        raise ProtocolError(str(bad)) from None
    number = _positive_int(seq) if seq is not None else _positive_int(detail.get("seq"))
    progress = detail.get("progress", 0)
    if not isinstance(progress, int) or isinstance(progress, bool):
        progress = 0
    logs = detail.get("logs")
    error, error_code = detail.get("error"), detail.get("error_code")
    return JobEvent(
        job_id=job_id,
        seq=number,
        status=status,
        progress=max(0, min(100, progress)),
        message=_str(detail.get("message")),
        timestamp=str(detail.get("updated_at") or detail.get("timestamp") or ""),
        kind=KIND_SNAPSHOT,
        error=error if isinstance(error, str) else None,
        error_code=error_code if isinstance(error_code, str) else None,
        output="\n".join(str(line) for line in logs) if isinstance(logs, list) else None,
    )


def load_frame(data: str | bytes) -> dict[str, Any]:
    """The JSON object of one text frame; raises :class:`ProtocolError` for anything else."""
    try:
        decoded = json.loads(data)
    except (ValueError, RecursionError):
        raise ProtocolError("frame is not JSON") from None
    if not isinstance(decoded, dict):
        raise ProtocolError("frame is not a JSON object")
    return decoded


def parse_frame(data: str | bytes | Mapping[str, Any]) -> Frame:
    """One server frame (text, bytes or decoded JSON) as a typed value.

    Raises :class:`ProtocolError` for text that is not a JSON object, and for a job event,
    ``resync`` or ``error`` frame missing what it must carry.  Unknown members are ignored.
    """
    if isinstance(data, (str, bytes)):
        data = load_frame(data)
    if not isinstance(data, Mapping):
        raise ProtocolError("frame is not a JSON object")
    event = data.get("event")
    if not isinstance(event, str):
        raise ProtocolError("frame has no string member 'event'")
    job_id = _str(data.get("job_id"))
    if event in (EVENT_JOB_STATUS, EVENT_JOB_COMPLETE):
        try:
            return JobEvent.from_wire(data)
        except ValueError as error:
            raise ProtocolError(f"bad {event} frame: {error}") from None
    if event in ACK_EVENTS:
        return Ack(event, job_id, _str(data.get("message")))
    if event == EVENT_ERROR:
        code = data.get("error_code")
        if not isinstance(code, str) or not code:
            code = _str(data.get("status"), "UNKNOWN_ERROR").upper()
        message = _str(data.get("message")) or _str(data.get("error"))
        return StreamError(code, message, job_id)
    if event == EVENT_RESYNC:
        if not job_id:
            raise ProtocolError("resync frame has no job_id")
        detail = data.get("job")
        if not isinstance(detail, Mapping):
            detail = data
        seq = _positive_int(data.get("seq"))
        if seq is None:
            seq = _positive_int(detail.get("seq"))
        snapshot = snapshot_event(job_id, detail, seq)
        incarnation = data.get("incarnation")
        return Resync(job_id, seq, snapshot, detail,
                      incarnation if isinstance(incarnation, str) else None)
    return UnknownFrame(event, job_id)


# -- REST ----------------------------------------------------------------------------------------


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ApiErrorInfo:
    """The envelope's ``error``: ``{code, message, details, retryable}``."""

    code: str
    message: str
    details: Any = None
    retryable: bool = False


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Answer:
    """One REST answer: its HTTP status and, when it is an envelope, what the envelope says.

    ``enveloped`` is False for a body that is not the JSON envelope (the original agent's empty
    405, a proxy's HTML page); ``text`` then holds its first 200 characters.
    """

    status: int
    enveloped: bool
    success: bool = False
    data: Any = None
    error: ApiErrorInfo | None = None
    request_id: str | None = None
    text: str = ""

    @property
    def ok(self) -> bool:
        """A success envelope with a 2xx status."""
        return self.enveloped and self.success and 200 <= self.status < 300

    @property
    def code(self) -> str | None:
        """The error code, when there is one."""
        return self.error.code if self.error is not None else None

    def describe(self) -> str:
        """One line for an answer that is not a success."""
        if self.error is not None:
            return f"{self.error.code}: {self.error.message} (HTTP {self.status})"
        if not self.enveloped:
            return f"HTTP {self.status}" + (f": {self.text}" if self.text else " with no body")
        return f"HTTP {self.status}"


def parse_answer(status: int, body: bytes) -> Answer:
    """Read a REST answer; never raises (a body that is not an envelope says so)."""
    try:
        decoded = json.loads(body.decode("utf-8")) if body.strip() else None
    except (UnicodeDecodeError, ValueError, RecursionError):
        decoded = None
    if not isinstance(decoded, Mapping) or not isinstance(decoded.get("success"), bool):
        text = " ".join(body[:200].decode("utf-8", "replace").split())
        return Answer(status, False, text=text)
    error = None
    raw_error = decoded.get("error")
    if isinstance(raw_error, Mapping):
        code = raw_error.get("code")
        error = ApiErrorInfo(
            code=code if isinstance(code, str) and code else "UNKNOWN_ERROR",
            message=_str(raw_error.get("message")) or f"HTTP {status}",
            details=raw_error.get("details"),
            retryable=raw_error.get("retryable") is True,
        )
    elif not decoded["success"] or status >= 400:
        error = ApiErrorInfo("UNKNOWN_ERROR", f"HTTP {status}")
    request_id = decoded.get("request_id")
    return Answer(
        status,
        True,
        success=decoded["success"],
        data=decoded.get("data"),
        error=error,
        request_id=request_id if isinstance(request_id, str) else None,
    )


def envelope(
    data: Any = None, error: Mapping[str, Any] | None = None, *, request_id: str, timestamp: str
) -> dict[str, Any]:
    """An envelope as the agent writes it (for fakes and tests)."""
    return {
        "success": error is None,
        "request_id": request_id,
        "timestamp": timestamp,
        "data": None if error is not None else data,
        "error": None if error is None else dict(error),
    }


def events_path(job_id: str, after: int) -> str:
    """``GET`` path of the events endpoint (the REST twin of the stream)."""
    return f"/api/v1/jobs/{job_id}/events?after={after}"


def job_path(job_id: str) -> str:
    """``GET`` path of one job's detail."""
    return f"/api/v1/jobs/{job_id}"


@attr.s(frozen=True, slots=True, auto_attribs=True)
class EventsPage:
    """``data`` of ``GET /api/v1/jobs/{id}/events?after=N``: the kept events after N."""

    job_id: str
    events: tuple[JobEvent, ...]
    last_seq: int | None = None
    status: str | None = None
    terminal: bool = False
    #: one line per event that could not be read (skipped)
    rejected: tuple[str, ...] = ()
    #: the agent's current incarnation, when it says
    incarnation: str | None = None


def parse_events_page(data: Any, job_id: str) -> EventsPage:
    """The events of ``job_id`` in ``seq`` order; unreadable ones are listed in ``rejected``.

    Raises :class:`ProtocolError` when ``data`` has no ``events`` list.
    """
    if not isinstance(data, Mapping) or not isinstance(data.get("events"), list):
        raise ProtocolError("events answer without a data.events list")
    events, rejected = [], []
    for wire in data["events"]:
        try:
            event = JobEvent.from_wire(wire)
        except ValueError as error:
            rejected.append(str(error))
            continue
        if event.job_id == job_id:
            events.append(event)
    events.sort(key=lambda e: e.seq or 0)
    status = data.get("status")
    last = data.get("last_seq")
    try:
        status = normalise_status(status) if isinstance(status, str) else None
    except ValueError:
        status = None
    counted = isinstance(last, int) and not isinstance(last, bool) and last >= 0
    return EventsPage(
        job_id=job_id,
        events=tuple(events),
        last_seq=last if counted else None,
        status=status,
        terminal=data.get("terminal") is True,
        rejected=tuple(rejected),
        incarnation=_str(data.get("incarnation")) or None,
    )
