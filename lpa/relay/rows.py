"""What agent events do to one ``patch_job_hosts`` row: pure functions, no I/O.

The PostgreSQL store and ``tests.fakes_relay.FakeRelayStore`` both run :func:`reduce_events` on
the row they read, so the fake cannot drift from the real rules:

* events of another agent job are refused (the original agent broadcast every job);
* events with ``seq`` at or below the row's ``relay_last_seq`` are duplicates and skipped, except
  a terminal snapshot (a ``resync`` or a polled job detail): the agent's final word on a job wins
  even when the agent lost or renumbered events (an old agent, a restored backup, a disk that lost
  its last writes), so a row is never left ``running`` behind a seq it already passed;
* a ``seq``-less snapshot (a poller reading an old agent) counts only if it changes something;
* a terminal row (succeeded/failed/cancelled) never changes;
* agent statuses map to the manager's ``job_status`` (:data:`DB_STATUS`); ``timed_out`` ends the
  row ``failed`` with an explanatory error (the original relay dropped it).

The job-level roll-up (:func:`rollup_status`) decides the parent ``patch_jobs`` status once every
host row is terminal.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import attr

from lpa import events as ev

DB_RUNNING = "running"
DB_SUCCEEDED = "succeeded"
DB_FAILED = "failed"
DB_CANCELLED = "cancelled"
#: ``ApplyResult.row_status`` when the row no longer exists (its job was deleted)
ROW_MISSING = "missing"
DB_TERMINAL: frozenset[str] = frozenset({DB_SUCCEEDED, DB_FAILED, DB_CANCELLED})

#: agent status (lpa spelling) -> manager ``job_status``
DB_STATUS: dict[str, str] = {
    ev.PENDING: DB_RUNNING,
    ev.RUNNING: DB_RUNNING,
    ev.REBOOTING: DB_RUNNING,
    ev.COMPLETED: DB_SUCCEEDED,
    ev.FAILED: DB_FAILED,
    ev.TIMED_OUT: DB_FAILED,
    ev.CANCELLED: DB_CANCELLED,
}


@attr.s(frozen=True, slots=True, auto_attribs=True, kw_only=True)
class RowState:
    """The columns of one ``patch_job_hosts`` row the relay reads and writes."""

    status: str
    output: str = ""
    error_message: str | None = None
    last_seq: int = 0
    progress: int | None = None
    message: str | None = None
    #: the agent job the row currently belongs to (job_executor may re-dispatch it)
    agent_job_id: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status in DB_TERMINAL


@attr.s(frozen=True, slots=True, auto_attribs=True, kw_only=True)
class Reduction:
    """The outcome of applying one batch of events to a row."""

    state: RowState
    applied: int  # events that changed the row
    duplicates: int  # seq at or below the row's last seq
    refused: int  # another agent job's events
    ignored: int  # arrived when the row was already terminal, or a no-op snapshot
    #: the row turned terminal in this batch (the caller rolls the parent job up)
    became_terminal: bool
    last_seq_event: int | None  # seq of the last applied event (for the notification)

    @property
    def changed(self) -> bool:
        return self.applied > 0


def timed_out_error(event: ev.JobEvent) -> str:
    """The error text for a job the agent ended ``timed_out``."""
    detail = event.error or event.message or "no detail"
    return f"timed out on the agent ({detail})"


def clean_text(text: str) -> str:
    """Text PostgreSQL accepts: no NUL characters, no lone surrogates (from JSON ``\\ud800``)."""
    if "\x00" in text:
        text = text.replace("\x00", "")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def _clean_event(event: ev.JobEvent) -> ev.JobEvent:
    return attr.evolve(
        event,
        message=clean_text(event.message),
        error=None if event.error is None else clean_text(event.error),
        output=None if event.output is None else clean_text(event.output),
    )


def _append_line(output: str, line: str) -> str:
    if not output:
        return line
    return output if not line and output.endswith("\n") else f"{output}\n{line}"


def _apply_one(state: RowState, event: ev.JobEvent) -> RowState:
    """The row after one accepted event (no duplicate or ownership checks here)."""
    event = _clean_event(event)
    status = DB_STATUS[event.status]
    output = state.output
    if event.kind == ev.KIND_OUTPUT:
        output = _append_line(output, event.message)
    elif event.kind == ev.KIND_SNAPSHOT and event.output is not None:
        output = event.output
    error_message = state.error_message
    if event.status == ev.TIMED_OUT:
        error_message = timed_out_error(event)
    elif status == DB_FAILED and event.error:
        error_message = event.error
    elif status == DB_FAILED and error_message is None and event.message:
        error_message = event.message
    message = state.message if event.kind == ev.KIND_OUTPUT else event.message
    return attr.evolve(
        state,
        status=status,
        output=output,
        error_message=error_message,
        last_seq=event.seq if event.seq is not None else state.last_seq,
        progress=event.progress,
        message=message,
    )


def _final_snapshot(event: ev.JobEvent) -> bool:
    """A terminal job detail from the agent (``resync`` or a poll): applied whatever its seq."""
    return event.kind == ev.KIND_SNAPSHOT and event.terminal


def reduce_events(state: RowState, agent_job_id: str, events: Iterable[ev.JobEvent]) -> Reduction:
    """Apply ``events`` in order to ``state`` under the rules in the module docstring."""
    applied = duplicates = refused = ignored = 0
    last_seq_event: int | None = None
    started_terminal = state.terminal
    for event in events:
        if event.job_id != agent_job_id:
            refused += 1
            continue
        if state.terminal:
            ignored += 1
            continue
        if event.seq is not None:
            if event.seq <= state.last_seq and not _final_snapshot(event):
                duplicates += 1
                continue
            if event.seq <= state.last_seq:  # a final snapshot behind the row: it still wins
                state = attr.evolve(_apply_one(state, event), last_seq=state.last_seq)
                applied += 1
                continue
            state = _apply_one(state, event)
            applied += 1
            last_seq_event = event.seq
            continue
        # seq-less snapshot: only a change of status or output is news
        after = _apply_one(state, event)
        if (after.status, after.output) == (state.status, state.output):
            ignored += 1
            continue
        state = after
        applied += 1
    return Reduction(
        state=state,
        applied=applied,
        duplicates=duplicates,
        refused=refused,
        ignored=ignored,
        became_terminal=state.terminal and not started_terminal,
        last_seq_event=last_seq_event,
    )


def fail_state(state: RowState, reason: str) -> Reduction:
    """The row ended ``failed`` with ``reason`` (unless it is already terminal)."""
    if state.terminal:
        return Reduction(
            state=state, applied=0, duplicates=0, refused=0, ignored=1,
            became_terminal=False, last_seq_event=None,
        )
    failed = attr.evolve(state, status=DB_FAILED, error_message=clean_text(reason))
    return Reduction(
        state=failed, applied=1, duplicates=0, refused=0, ignored=0,
        became_terminal=True, last_seq_event=None,
    )


def rollup_status(host_statuses: Sequence[str]) -> str | None:
    """The parent job's status once every host row is terminal, else ``None``.

    All succeeded → succeeded; any failed → failed; otherwise (all cancelled, or cancelled mixed
    with succeeded) → cancelled: the job did not do everything it was asked, but nothing failed.
    The original relay called all-cancelled "succeeded".
    """
    if not host_statuses or any(s not in DB_TERMINAL for s in host_statuses):
        return None
    if DB_FAILED in host_statuses:
        return DB_FAILED
    if all(s == DB_SUCCEEDED for s in host_statuses):
        return DB_SUCCEEDED
    return DB_CANCELLED
