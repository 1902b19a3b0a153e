"""The job event schema shared by the agent engine, its WebSocket, its REST twin and the relay.

One spelling of statuses and operations everywhere (the original agent spelled ``timedout`` on
REST and ``timed_out`` on its WebSocket; lpa says ``timed_out`` on every surface and only *reads*
the old spellings, see :func:`normalise_status`).

A :class:`JobEvent` is what the engine numbers (``seq`` rises by exactly one per job, from 1),
keeps, persists and publishes.  Its wire form (:meth:`JobEvent.to_wire`) is the JSON object sent
on the WebSocket and returned by ``GET /api/v1/jobs/{id}/events``; the relay parses it back with
:meth:`JobEvent.from_wire`.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

import attr

PENDING = "pending"
RUNNING = "running"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"
TIMED_OUT = "timed_out"
REBOOTING = "rebooting"

STATUSES: tuple[str, ...] = (PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMED_OUT, REBOOTING)
TERMINAL_STATUSES: frozenset[str] = frozenset({COMPLETED, FAILED, CANCELLED, TIMED_OUT})

#: spellings of the originals (REST ``timedout``, serde ``TimedOut`` …) mapped to ours
_STATUS_ALIASES = {
    "timedout": TIMED_OUT,
    "timed-out": TIMED_OUT,
    "canceled": CANCELLED,
    "queued": PENDING,
    "succeeded": COMPLETED,
}

OP_INSTALL = "install"
OP_UPDATE = "update"
OP_REMOVE = "remove"
OP_PATCH_APPLY = "patch_apply"
OP_REBOOT = "reboot"
OPERATIONS: tuple[str, ...] = (OP_INSTALL, OP_UPDATE, OP_REMOVE, OP_PATCH_APPLY, OP_REBOOT)
_OPERATION_ALIASES = {"patchapply": OP_PATCH_APPLY, "selfupdate": OP_UPDATE}

#: the ``event`` member: every job event is ``job_status`` except the single closing
#: ``job_complete`` the engine emits right after a job's terminal ``job_status``
EVENT_JOB_STATUS = "job_status"
EVENT_JOB_COMPLETE = "job_complete"

#: the ``kind`` member says what the event carries
KIND_STATUS = "status"  # a state change (pending → running → terminal …)
KIND_OUTPUT = "output"  # one line of package-manager output in ``message``
KIND_PROGRESS = "progress"  # progress/message changed, status did not
KIND_WAITING_FOR_LOCK = "waiting_for_lock"  # the package database lock is held by someone else
KIND_SNAPSHOT = "snapshot"  # made by a poller from a job's REST snapshot (never by the engine)
KINDS: tuple[str, ...] = (
    KIND_STATUS, KIND_OUTPUT, KIND_PROGRESS, KIND_WAITING_FOR_LOCK, KIND_SNAPSHOT
)


def normalise_status(value: str) -> str:
    """Our spelling of a status read from any agent; raises ValueError for an unknown one."""
    lowered = value.strip().lower()
    lowered = _STATUS_ALIASES.get(lowered, lowered)
    if lowered not in STATUSES:
        raise ValueError(f"unknown job status {value!r}")
    return lowered


def normalise_operation(value: str) -> str:
    """Our spelling of an operation read from any agent; raises ValueError for an unknown one."""
    lowered = value.strip().lower()
    lowered = _OPERATION_ALIASES.get(lowered, lowered)
    if lowered not in OPERATIONS:
        raise ValueError(f"unknown operation {value!r}")
    return lowered


def rfc3339(when: datetime.datetime | None = None) -> str:
    """A timestamp as the original agent wrote them: RFC 3339 with ``+00:00``."""
    if when is None:
        when = datetime.datetime.now(datetime.UTC)
    return when.astimezone(datetime.UTC).isoformat()


def rfc3339_from_epoch(seconds: float) -> str:
    """RFC 3339 for a POSIX timestamp (for code that runs on an injected clock)."""
    return rfc3339(datetime.datetime.fromtimestamp(seconds, datetime.UTC))


@attr.s(frozen=True, slots=True, auto_attribs=True, kw_only=True)
class JobEvent:
    """One numbered event of one job."""

    job_id: str
    seq: int | None  # None only for KIND_SNAPSHOT events made by a poller of an old agent
    status: str
    progress: int
    message: str
    timestamp: str
    kind: str = KIND_STATUS
    event: str = EVENT_JOB_STATUS
    error: str | None = None
    error_code: str | None = None
    #: full output text, only on KIND_SNAPSHOT events read from a REST job snapshot
    output: str | None = None
    #: the agent incarnation that numbered this event (``"<boot_id>:<start counter>"``); an
    #: event keeps it for life, so the same ``seq`` with another incarnation means renumbering.
    #: Absent on events of agents that predate it (readers must accept None)
    incarnation: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def to_wire(self) -> dict[str, Any]:
        """The JSON object for the WebSocket and the REST events endpoint."""
        wire: dict[str, Any] = {
            "event": self.event,
            "job_id": self.job_id,
            "seq": self.seq,
            "kind": self.kind,
            "status": self.status,
            "progress": self.progress,
            "message": self.message,
            "timestamp": self.timestamp,
        }
        if self.error is not None or self.error_code is not None:
            wire["error"] = self.error
            wire["error_code"] = self.error_code
        if self.output is not None:
            wire["output"] = self.output
        if self.incarnation is not None:
            wire["incarnation"] = self.incarnation
        return wire

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> JobEvent:
        """Parse and validate a wire object; raises ValueError naming the bad member."""
        if not isinstance(wire, Mapping):
            raise ValueError("event is not a JSON object")
        event = wire.get("event", EVENT_JOB_STATUS)
        if event not in (EVENT_JOB_STATUS, EVENT_JOB_COMPLETE):
            raise ValueError(f"not a job event: event={event!r}")
        job_id = wire.get("job_id")
        if not isinstance(job_id, str) or not job_id:
            raise ValueError("job_id missing or not a string")
        seq = wire.get("seq")
        if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool) or seq < 1):
            raise ValueError(f"seq must be a positive integer, got {seq!r}")
        status = wire.get("status")
        if not isinstance(status, str):
            raise ValueError("status missing or not a string")
        status = normalise_status(status)
        progress = wire.get("progress", 0)
        if not isinstance(progress, int) or isinstance(progress, bool):
            raise ValueError(f"progress must be an integer, got {progress!r}")
        kind = wire.get("kind", KIND_STATUS)
        if kind not in KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        message = wire.get("message", "")
        timestamp = wire.get("timestamp", "")
        if not isinstance(message, str) or not isinstance(timestamp, str):
            raise ValueError("message and timestamp must be strings")
        error = wire.get("error")
        error_code = wire.get("error_code")
        output = wire.get("output")
        incarnation = wire.get("incarnation")
        for name, value in (
            ("error", error),
            ("error_code", error_code),
            ("output", output),
            ("incarnation", incarnation),
        ):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a string or null")
        return cls(
            job_id=job_id,
            seq=seq,
            status=status,
            progress=max(0, min(100, progress)),
            message=message,
            timestamp=timestamp,
            kind=kind,
            event=event,
            error=error,
            error_code=error_code,
            output=output,
            incarnation=incarnation,
        )
