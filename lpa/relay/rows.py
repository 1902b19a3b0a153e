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

Output never passes through here whole: a reduction says what to do to the row's ``output``
(append :attr:`Reduction.output_added`, or replace it when :attr:`Reduction.output_reset`), and the
row state carries only what the rules need to know about the text so far (its last character,
and a digest when it came whole from a snapshot).  So applying a line costs the same on the
3,000th line of a row as on the first.

The job-level roll-up (:func:`rollup_counts`, :func:`rollup_status`) decides the parent
``patch_jobs`` status once every host row is terminal.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

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
    """The columns of one ``patch_job_hosts`` row the relay reads and writes (never ``output``)."""

    status: str
    error_message: str | None = None
    last_seq: int = 0
    progress: int | None = None
    message: str | None = None
    #: the agent job the row currently belongs to (job_executor may re-dispatch it)
    agent_job_id: str | None = None
    #: the last character of the row's output, "" while it is empty (how the next line joins)
    output_end: str = ""
    #: digest of the output when it was last replaced by a snapshot and nothing was appended since
    snapshot_digest: str | None = None

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
    #: the row's output is replaced by :attr:`output_added` (a snapshot carried the whole text)
    output_reset: bool = False
    #: text to append to the row's output (or its new text when :attr:`output_reset`)
    output_added: str = ""

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


def output_digest(text: str) -> str:
    """A short digest of a whole output text (to tell whether a seq-less snapshot is news)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def _clean_event(event: ev.JobEvent) -> ev.JobEvent:
    message = clean_text(event.message)
    error = None if event.error is None else clean_text(event.error)
    output = None if event.output is None else clean_text(event.output)
    if message is event.message and error is event.error and output is event.output:
        return event  # the common case: nothing to clean, no copy
    return attr.evolve(event, message=message, error=error, output=output)


def join_line(output_end: str, line: str) -> str:
    """What appending ``line`` adds to an output ending in ``output_end`` ("" = empty).

    Lines are joined with a newline; an empty line after a newline adds nothing.
    """
    if not output_end:
        return line
    if not line and output_end == "\n":
        return ""
    return "\n" + line


@attr.s(frozen=True, slots=True, auto_attribs=True)
class _Step:
    state: RowState
    reset: bool  # the output was replaced by ``text``
    text: str  # appended (or the whole new output when ``reset``)


def _apply_one(state: RowState, event: ev.JobEvent) -> _Step:
    """The row after one accepted event (no duplicate or ownership checks here)."""
    event = _clean_event(event)
    status = DB_STATUS[event.status]
    reset, text = False, ""
    output_end, digest = state.output_end, state.snapshot_digest
    if event.kind == ev.KIND_OUTPUT:
        text = join_line(state.output_end, event.message)
        if text:
            output_end, digest = text[-1], None
    elif event.kind == ev.KIND_SNAPSHOT and event.output is not None:
        reset, text = True, event.output
        output_end, digest = text[-1:], output_digest(text)
    error_message = state.error_message
    if event.status == ev.TIMED_OUT:
        error_message = timed_out_error(event)
    elif status == DB_FAILED and event.error:
        error_message = event.error
    elif status == DB_FAILED and error_message is None and event.message:
        error_message = event.message
    message = state.message if event.kind == ev.KIND_OUTPUT else event.message
    after = attr.evolve(
        state,
        status=status,
        error_message=error_message,
        last_seq=event.seq if event.seq is not None else state.last_seq,
        progress=event.progress,
        message=message,
        output_end=output_end,
        snapshot_digest=digest,
    )
    return _Step(after, reset, text)


def _final_snapshot(event: ev.JobEvent) -> bool:
    """A terminal job detail from the agent (``resync`` or a poll): applied whatever its seq."""
    return event.kind == ev.KIND_SNAPSHOT and event.terminal


def _is_news(state: RowState, event: ev.JobEvent, step: _Step) -> bool:
    """A seq-less snapshot counts only when it changes the status or the output."""
    if step.state.status != state.status:
        return True
    return event.output is not None and step.state.snapshot_digest != state.snapshot_digest


def reduce_events(state: RowState, agent_job_id: str, events: Iterable[ev.JobEvent]) -> Reduction:
    """Apply ``events`` in order to ``state`` under the rules in the module docstring."""
    applied = duplicates = refused = ignored = 0
    last_seq_event: int | None = None
    started_terminal = state.terminal
    reset, added = False, ""
    for event in events:
        if event.job_id != agent_job_id:
            refused += 1
            continue
        if state.terminal:
            ignored += 1
            continue
        if event.seq is not None and event.seq <= state.last_seq and not _final_snapshot(event):
            duplicates += 1
            continue
        step = _apply_one(state, event)
        if event.seq is None:
            if not _is_news(state, event, step):  # seq-less snapshot: only a change is news
                ignored += 1
                continue
        elif event.seq <= state.last_seq:  # a final snapshot behind the row: it still wins
            step = _Step(attr.evolve(step.state, last_seq=state.last_seq), step.reset, step.text)
        else:
            last_seq_event = event.seq
        state = step.state
        applied += 1
        if step.reset:
            reset, added = True, step.text
        else:
            added += step.text
    return Reduction(
        state=state,
        applied=applied,
        duplicates=duplicates,
        refused=refused,
        ignored=ignored,
        became_terminal=state.terminal and not started_terminal,
        last_seq_event=last_seq_event,
        output_reset=reset,
        output_added=added,
    )


def apply_output(output: str, reduction: Reduction) -> str:
    """The whole output text after ``reduction`` (for stores that keep the text in one piece)."""
    return reduction.output_added if reduction.output_reset else output + reduction.output_added


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


@attr.s(frozen=True, slots=True, auto_attribs=True, kw_only=True)
class JobCounts:
    """How many host rows a job has, and how many of them ended which way."""

    hosts: int
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0

    @property
    def ended(self) -> int:
        return self.succeeded + self.failed + self.cancelled

    def plus(self, status: str) -> JobCounts:
        """The counts after one more row ended ``status``."""
        if status == DB_SUCCEEDED:
            return attr.evolve(self, succeeded=self.succeeded + 1)
        if status == DB_FAILED:
            return attr.evolve(self, failed=self.failed + 1)
        if status == DB_CANCELLED:
            return attr.evolve(self, cancelled=self.cancelled + 1)
        return self

    @classmethod
    def of(cls, host_statuses: Sequence[str]) -> JobCounts:
        return cls(
            hosts=len(host_statuses),
            succeeded=host_statuses.count(DB_SUCCEEDED),
            failed=host_statuses.count(DB_FAILED),
            cancelled=host_statuses.count(DB_CANCELLED),
        )


def rollup_counts(counts: JobCounts) -> str | None:
    """The parent job's status once every host row ended (``counts.ended == counts.hosts``).

    All succeeded → succeeded; any failed → failed; otherwise (all cancelled, or cancelled mixed
    with succeeded) → cancelled: the job did not do everything it was asked, but nothing failed.
    The original relay called all-cancelled "succeeded".
    """
    if counts.hosts == 0 or counts.ended != counts.hosts:
        return None
    if counts.failed:
        return DB_FAILED
    if counts.succeeded == counts.hosts:
        return DB_SUCCEEDED
    return DB_CANCELLED


def rollup_status(host_statuses: Sequence[str]) -> str | None:
    """:func:`rollup_counts` over the list of every host row's status (``None`` while any runs)."""
    return rollup_counts(JobCounts.of(host_statuses))
