"""The relay's transaction: any number of host rows' events in a handful of statements.

One :func:`apply_batch` call is one transaction, sent in two round trips when no row ends
(``BEGIN`` rides with the first, ``COMMIT`` with the last; see
:class:`lpa.relay.pgadapter.Transaction`)::

    BEGIN; SELECT … FROM patch_job_hosts WHERE id = ANY(rows) ORDER BY id FOR UPDATE
    rows.reduce_events() per call, in order                                    pure, in Python
    WITH u AS (unnest(…)),                                                     one statement:
         INSERT INTO relay_output_pending …        the new output lines of rows kept waiting
         DELETE FROM relay_output_pending … RETURNING   the lines of rows refreshed now
    UPDATE patch_job_hosts … FROM u  WHERE status NOT IN (terminal)    guarded; output appended
    [rows that ended: lpa.relay.rollup, two more round trips]             only when refreshed
      parents locked (with the write), counted or probed, updated (with the notify)
    SELECT pg_notify('job_update', p) FROM unnest(payloads); COMMIT   last: one per changed
                                                                      row, one per job ended

Every array travels as one literal (:func:`lpa.relay.sqlbits.array`), so each statement's text
is the same whatever the batch size.

Guarantees: a row's events apply in order (the pool runs one transaction per row at a time) and
only above its ``relay_last_seq``; a terminal row never changes; notifications commit with their
update or not at all; the parent's lock serialises roll-ups, and each count is a new statement
after the lock, so under READ COMMITTED it sees every roll-up committed before: exactly one
job-level notification per job.  Rows are locked in id order, then parents in id order, so two
relay transactions cannot deadlock.

Output: a line is written once, to ``relay_output_pending`` (append-only until it is moved).  A
row's ``patch_job_hosts.output``, which the manager's UI reads, gets its pending lines appended
when the row is *due* — no refresh for ``output_interval`` (1 s), decided by the store — and
always when the row ends, so it lags at most about a second behind the notifications while the
job runs and is complete with the terminal notification.  While the output is small (up to
:data:`INLINE_REFRESH_BYTES`) a notifying transaction refreshes it in passing; a larger one is
refreshed by a transaction of its own (a ``fold`` call: no notification, so no NOTIFY lock),
because rewriting a TOASTed value costs milliseconds the notifications should not wait for.  No
statement reads ``output`` back (``right(output, 1)`` once per agent job excepted), and no event
rewrites it.

Roll-up cost: the parent keeps running counts (``relay_*_count``), so a host's ending costs the
same on a 1,000-host job as on a 3-host one; see :mod:`lpa.relay.rollup`.

A little over 400 lines, on purpose: each statement of the transaction sits beside the Python
that builds its arrays; the roll-up and the shared SQL are already in :mod:`lpa.relay.rollup`
and :mod:`lpa.relay.sqlbits`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attr
from twisted.logger import Logger

from lpa.relay import notify
from lpa.relay.interfaces import AgentAddress, ApplyResult, HostJob
from lpa.relay.rollup import roll_up
from lpa.relay.rows import (
    ROW_MISSING,
    Reduction,
    RowState,
    fail_state,
    reduce_events,
)
from lpa.relay.sqlbits import TERMINAL_SQL as _TERMINAL_SQL
from lpa.relay.sqlbits import array

_log = Logger()


CALL_EVENTS = "events"
CALL_FAIL = "fail"
CALL_FOLD = "fold"

#: how a row's ``output`` changes in the write statement
_KEEP, _FOLD, _REPLACE = 0, 1, 2
#: a notifying transaction also refreshes a due row's output while it is this small (rewriting a
#: larger TOASTed value takes milliseconds, which the notifications would wait for)
INLINE_REFRESH_BYTES = 8192


@attr.s(frozen=True, slots=True, auto_attribs=True, kw_only=True)
class RowCall:
    """One store call on one row: apply events, fail the row, or only refresh its output."""

    kind: str
    row_id: str
    host_job: HostJob | None = None
    events: tuple[Any, ...] = ()
    reason: str = ""
    transport: str | None = None


@attr.s(auto_attribs=True, kw_only=True)
class BatchOutcome:
    """What one transaction did: a result per call (in order) and output bookkeeping."""

    results: list[ApplyResult | None]
    folded: set[str]  # rows whose output got every pending line
    pending: set[str]  # rows that now have lines waiting in relay_output_pending
    finished: set[str]  # rows the relay will not write again (terminal, gone, not ours)
    #: (event_type, UTF-8 bytes) of each notification it sent
    payloads: list[tuple[str, int]] = attr.ib(factory=list)


# -- reads ------------------------------------------------------------------------------------

_RUNNING_SQL = """
SELECT pjh.id::text, pjh.job_id::text, pjh.host_id::text, pjh.agent_job_id,
       COALESCE(NULLIF(h.fqdn, ''), host(h.ip_address)) AS address, h.agent_port,
       CASE WHEN pjh.relay_agent_job_id = pjh.agent_job_id THEN pjh.relay_last_seq ELSE 0 END,
       pjh.relay_missing_since IS NOT NULL
  FROM patch_job_hosts pjh JOIN hosts h ON h.id = pjh.host_id
 WHERE pjh.status = 'running'::job_status AND pjh.agent_job_id IS NOT NULL
 ORDER BY pjh.job_id, pjh.id
"""

_PENDING_ROWS_SQL = "SELECT DISTINCT row_id::text FROM relay_output_pending"


async def running_host_jobs(tx: Any) -> list[HostJob]:
    await tx.execute((_RUNNING_SQL, None))
    return [
        HostJob(
            row_id=row_id,
            job_id=job_id,
            host_id=host_id,
            agent_job_id=agent_job_id,
            agent=AgentAddress(host=address, port=int(port)),
            last_seq=int(last_seq),
            missing_recorded=bool(missing),
        )
        for (row_id, job_id, host_id, agent_job_id, address, port, last_seq,
             missing) in tx.fetchall()
    ]


async def rows_with_pending_output(tx: Any) -> list[str]:
    """Rows whose output has lines waiting (left by a relay that stopped before moving them)."""
    await tx.execute((_PENDING_ROWS_SQL, None))
    return [row_id for (row_id,) in tx.fetchall()]


# -- the batch --------------------------------------------------------------------------------

_LOCK_ROWS_SQL = f"""
SELECT id::text, status::text, error_message, agent_job_id,
       CASE WHEN relay_agent_job_id = agent_job_id THEN relay_last_seq ELSE 0 END,
       relay_progress, relay_message, job_id::text, host_id::text,
       CASE WHEN relay_agent_job_id = agent_job_id AND relay_output_end IS NOT NULL
            THEN relay_output_end ELSE right(output, 1) END,
       CASE WHEN relay_agent_job_id = agent_job_id THEN relay_snapshot_digest END,
       status IN {_TERMINAL_SQL}, octet_length(output),
       EXISTS (SELECT 1 FROM relay_output_pending o WHERE o.row_id = patch_job_hosts.id)
  FROM patch_job_hosts WHERE id = ANY(%s::uuid[]) ORDER BY id FOR UPDATE
"""

_WRITE_ROWS_SQL = f"""
WITH u AS (
    SELECT * FROM unnest(%s::uuid[], %s::bool[], %s::text[], %s::text[], %s::bool[],
                         %s::bigint[], %s::text[], %s::text[], %s::int[], %s::text[],
                         %s::text[], %s::text[], %s::int[], %s::text[])
        AS u(id, changed, status, error_message, ended, last_seq, agent_job_id, transport,
             progress, message, output_end, digest, mode, text)
), kept AS (
    INSERT INTO relay_output_pending (row_id, text)
    SELECT id, text FROM u WHERE mode = {_KEEP} AND text <> ''
), taken AS (
    DELETE FROM relay_output_pending o USING u WHERE o.row_id = u.id AND u.mode <> {_KEEP}
    RETURNING o.row_id, o.id, o.text
), moved AS (
    SELECT row_id, string_agg(text, '' ORDER BY id) AS text FROM taken GROUP BY row_id
)
UPDATE patch_job_hosts p
   SET status = CASE WHEN u.changed THEN u.status::job_status ELSE p.status END,
       error_message = CASE WHEN u.changed THEN u.error_message ELSE p.error_message END,
       completed_at = CASE WHEN u.ended THEN now() ELSE p.completed_at END,
       relay_last_seq = CASE WHEN u.changed THEN u.last_seq ELSE p.relay_last_seq END,
       relay_agent_job_id = CASE WHEN u.changed THEN u.agent_job_id ELSE p.relay_agent_job_id END,
       relay_transport = CASE WHEN u.changed THEN u.transport ELSE p.relay_transport END,
       relay_last_event_at = CASE WHEN u.changed THEN now() ELSE p.relay_last_event_at END,
       relay_progress = CASE WHEN u.changed THEN u.progress ELSE p.relay_progress END,
       relay_message = CASE WHEN u.changed THEN u.message ELSE p.relay_message END,
       relay_output_end = CASE WHEN u.changed THEN u.output_end ELSE p.relay_output_end END,
       relay_snapshot_digest = CASE WHEN u.changed THEN u.digest ELSE p.relay_snapshot_digest END,
       output = CASE
           WHEN u.mode = {_REPLACE} THEN u.text
           WHEN u.mode = {_FOLD} AND (m.text IS NOT NULL OR u.text <> '')
               THEN p.output || COALESCE(m.text, '') || u.text
           ELSE p.output END
  FROM u LEFT JOIN moved m ON m.row_id = u.id
 WHERE p.id = u.id AND (NOT u.changed OR p.status NOT IN {_TERMINAL_SQL})
"""

_NOTIFY_SQL = "SELECT pg_notify(%s, p) FROM unnest(%s::text[]) AS p"


@attr.s(auto_attribs=True, eq=False)
class _Row:
    """One locked row during the batch."""

    row_id: str
    job_id: str
    host_id: str
    agent_job_id: str | None
    state: RowState
    was_terminal: bool
    size: int  # bytes of its output now (the TOAST pointer says it: nothing is read)
    #: lines already wait for it (a transaction whose commit answer was lost can leave some)
    has_pending: bool
    changed: bool = False
    ended: bool = False
    reset: bool = False
    added: str = ""
    transport: str | None = None
    follower: HostJob | None = None  # the call's HostJob of the last change
    fold: bool = False  # a fold-only call, or a row no longer ours: move its pending lines
    mode: int = _KEEP  # what the write statement does to ``output`` (decided once per batch)
    notify_call: int | None = None  # index of the call that gets the host notification
    end_call: int | None = None  # index of the call that ended the row


async def apply_batch(
    tx: Any, calls: Sequence[RowCall], *, due: Callable[[str], bool]
) -> BatchOutcome:
    """One transaction over every row of ``calls``; ``due(row_id)``: refresh its ``output`` now.

    ``tx`` is a :class:`lpa.relay.pgadapter.Transaction`: two round trips when no row ends
    (``BEGIN`` + lock; write + notify + ``COMMIT``), four when some do (the parents' lock rides
    with the write, the counts or probe, then their update with the notify and ``COMMIT``).
    """
    order: list[str] = []
    for call in calls:
        if call.row_id not in order:
            order.append(call.row_id)
    await tx.execute((_LOCK_ROWS_SQL, (array(order),)))
    rows = {found[0]: _row(found) for found in tx.fetchall()}
    results: list[ApplyResult | None] = []
    finished: set[str] = set()
    for index, call in enumerate(calls):
        results.append(_reduce_call(rows.get(call.row_id), call, index, finished))

    # every row is locked and was read above, so each write below changes exactly its row
    writes = []
    for row in (rows.get(row_id) for row_id in order):
        if row is not None and (row.changed or row.fold):
            row.mode = _mode(row, due)
            writes.append(row)
    payloads: list[str] = []
    endings: dict[str, list[str]] = {}
    for row in writes:
        if not row.changed:
            continue
        payloads.append(_host_payload(row))
        assert row.notify_call is not None
        notified = results[row.notify_call]
        assert notified is not None
        results[row.notify_call] = attr.evolve(notified, notified=1)
        if row.ended:
            endings.setdefault(row.job_id, []).append(row.state.status)
    statements = [_write_rows(writes)] if writes else []
    if endings:
        ended, update = await roll_up(tx, endings, statements)
        statements = [update]
        for job_id, status, counts in ended:
            payloads.append(
                notify.build_payload(
                    event_type=notify.EVENT_JOB, job_id=job_id, status=status,
                    succeeded_count=counts.succeeded, failed_count=counts.failed,
                    host_count=counts.hosts,
                )
            )
            row = next(r for r in writes if r.ended and r.job_id == job_id)
            assert row.end_call is not None
            result = results[row.end_call]
            assert result is not None
            results[row.end_call] = attr.evolve(result, notified=result.notified + 1)
            _log.info("job {job_id} ended {status}", job_id=job_id, status=status)
    if payloads:  # last in the transaction: the NOTIFY lock is held from here to the commit
        statements.append((_NOTIFY_SQL, (notify.CHANNEL, array(payloads))))
    if statements:
        await tx.execute(*statements, commit=True)
    return BatchOutcome(
        results=results,
        folded={row.row_id for row in writes if row.mode != _KEEP},
        pending={row.row_id for row in rows.values()
                 if row.mode == _KEEP and (row.added or row.has_pending)},
        finished=finished,
        payloads=[(json_event_type(p), len(p.encode("utf-8"))) for p in payloads],
    )


def json_event_type(payload: str) -> str:
    """``host`` or ``job``: the payload's first member (build_payload writes it first)."""
    return notify.EVENT_JOB if payload.startswith('{"event_type":"job"') else notify.EVENT_HOST


def _row(found: tuple[Any, ...]) -> _Row:
    (row_id, status, error_message, agent_job_id, last_seq, progress, message, job_id, host_id,
     output_end, digest, terminal, size, has_pending) = found
    state = RowState(
        status=status,
        error_message=error_message,
        last_seq=int(last_seq),
        progress=progress,
        message=message,
        agent_job_id=agent_job_id,
        output_end=output_end or "",
        snapshot_digest=digest,
    )
    return _Row(row_id, job_id, host_id, agent_job_id, state, bool(terminal), int(size or 0),
                bool(has_pending))


def _reduce_call(
    row: _Row | None, call: RowCall, index: int, finished: set[str]
) -> ApplyResult | None:
    """Apply one call to the locked row (in memory); its result, ``notified`` filled in later."""
    if call.kind == CALL_FOLD:
        if row is not None:
            row.fold = True
        return None
    host_job = call.host_job
    assert host_job is not None
    if row is None:
        _log.warn("row {row_id} is gone; stop following it", row_id=call.row_id)
        finished.add(call.row_id)
        return ApplyResult(applied=0, last_seq=host_job.last_seq, row_status=ROW_MISSING,
                           terminal=True)
    if row.agent_job_id != host_job.agent_job_id:
        _log.warn(
            "row {row_id} now belongs to agent job {current}, not {ours}; stop following it",
            row_id=call.row_id, current=row.agent_job_id, ours=host_job.agent_job_id,
        )
        row.fold = True
        finished.add(call.row_id)
        return ApplyResult(applied=0, last_seq=row.state.last_seq, row_status=row.state.status,
                           terminal=True)
    reduction: Reduction
    if call.kind == CALL_FAIL:
        reduction = fail_state(row.state, call.reason)
    else:
        reduction = reduce_events(row.state, host_job.agent_job_id, call.events)
        if reduction.refused:
            _log.warn(
                "refused {count} events of another agent job for row {row_id} (agent job {ours})",
                count=reduction.refused, row_id=call.row_id, ours=host_job.agent_job_id,
            )
    if row.was_terminal:
        row.fold = True  # ended by another writer: lines it left waiting belong in its output
    row.state = reduction.state
    if reduction.changed:
        row.changed = True
        row.transport = call.transport
        row.follower = host_job
        row.notify_call = index
        if reduction.output_reset:
            row.reset, row.added = True, reduction.output_added
        else:
            row.added += reduction.output_added
        if reduction.became_terminal:
            row.ended = True
            row.end_call = index
    if row.state.terminal:
        finished.add(call.row_id)
    return ApplyResult(
        applied=reduction.applied,
        last_seq=row.state.last_seq,
        row_status=row.state.status,
        terminal=row.state.terminal,
    )


def _mode(row: _Row, due: Callable[[str], bool]) -> int:
    if row.reset:
        return _REPLACE
    if row.fold or row.ended or row.state.terminal:
        return _FOLD
    if row.size <= INLINE_REFRESH_BYTES and due(row.row_id):
        return _FOLD
    return _KEEP  # a larger output is refreshed by a transaction of its own (no NOTIFY lock)


def _write_rows(writes: list[_Row]) -> tuple[str, tuple[Any, ...]]:
    """The write statement over ``writes`` with its parameters."""
    columns: list[list[Any]] = [[] for _ in range(14)]
    for row in writes:
        state, changed = row.state, row.changed
        values = (
            row.row_id, changed,
            state.status if changed else None,
            state.error_message if changed else None,
            row.ended,
            state.last_seq if changed else None,
            row.follower.agent_job_id if changed and row.follower else None,
            row.transport if changed else None,
            state.progress if changed else None,
            state.message if changed else None,
            state.output_end if changed else None,
            state.snapshot_digest if changed else None,
            row.mode,
            row.added,
        )
        for column, value in zip(columns, values, strict=True):
            column.append(value)
    return _WRITE_ROWS_SQL, tuple(array(column) for column in columns)


def _host_payload(row: _Row) -> str:
    state = row.state
    return notify.build_payload(
        event_type=notify.EVENT_HOST,
        job_id=row.job_id,
        host_id=row.host_id,
        status=state.status,
        agent_job_id=row.follower.agent_job_id if row.follower else (row.agent_job_id or ""),
        output=row.added or None,
        error_message=state.error_message,
        seq=state.last_seq,
        transport=row.transport,
        progress=state.progress,
    )
