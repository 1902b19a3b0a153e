"""The parent job's roll-up: running counts under the parent's row lock, no scan of its hosts.

Called by :func:`lpa.relay.writepath.apply_batch` inside its transaction, after the host rows
it ended were written (their write rides with the parents' lock)::

    SELECT … FROM patch_jobs WHERE id = ANY(jobs) ORDER BY id FOR UPDATE        parent locks
    [first ending of a job]   count its host rows once (rows other writers ended before count)
    [counts not all ended]    probe relay_open_host_rows: is any row of the job still open?
                              (rows ended by other writers since are not in the counts)
    UPDATE patch_jobs … relay_*_count, status, completed_at          sent with the notifications

Each step is a new statement after the lock, so under READ COMMITTED it sees every roll-up
committed before it: exactly one transaction sees "every host ended" (the original relay's
check-then-act roll-up could fire twice).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lpa.relay.rows import JobCounts, rollup_counts
from lpa.relay.sqlbits import TERMINAL_SQL as _TERMINAL_SQL
from lpa.relay.sqlbits import array

_LOCK_PARENTS_SQL = f"""
SELECT id::text, status IN {_TERMINAL_SQL}, relay_host_count, relay_succeeded_count,
       relay_failed_count, relay_cancelled_count
  FROM patch_jobs WHERE id = ANY(%s::uuid[]) ORDER BY id FOR UPDATE
"""

# the predicate is the one of the partial index relay_open_host_rows (lpa/sql/002…), word for word
_NO_OPEN_ROWS_SQL = f"""
SELECT j::text FROM unnest(%s::uuid[]) AS j
 WHERE NOT EXISTS (SELECT 1 FROM patch_job_hosts h
                    WHERE h.job_id = j AND h.status NOT IN {_TERMINAL_SQL})
"""

_UPDATE_PARENTS_SQL = f"""
UPDATE patch_jobs p
   SET relay_host_count = u.hosts, relay_succeeded_count = u.succeeded,
       relay_failed_count = u.failed, relay_cancelled_count = u.cancelled,
       status = COALESCE(u.final::job_status, p.status),
       completed_at = CASE WHEN u.final IS NULL THEN p.completed_at ELSE now() END
  FROM unnest(%s::uuid[], %s::int[], %s::int[], %s::int[], %s::int[], %s::text[])
       AS u(id, hosts, succeeded, failed, cancelled, final)
 WHERE p.id = u.id AND p.status NOT IN {_TERMINAL_SQL}
"""


# one round trip: full counts of the jobs not counted yet, and which of the others have no open row
_CHECK_SQL = (
    "SELECT 'count', job_id::text, count(*), count(*) FILTER (WHERE status = 'succeeded'), "
    "count(*) FILTER (WHERE status = 'failed'), count(*) FILTER (WHERE status = 'cancelled') "
    "FROM patch_job_hosts WHERE job_id = ANY(%s::uuid[]) GROUP BY job_id "
    "UNION ALL SELECT 'done', j, 0, 0, 0, 0 FROM ("
    + _NO_OPEN_ROWS_SQL.strip() + ") AS done(j)"
)


def _counted(found: Sequence[tuple[Any, ...]]) -> tuple[dict[str, JobCounts], list[str]]:
    counts = {
        job_id: JobCounts(hosts=hosts, succeeded=succeeded, failed=failed, cancelled=cancelled)
        for kind, job_id, hosts, succeeded, failed, cancelled in found if kind == "count"
    }
    return counts, [job_id for kind, job_id, *_ in found if kind == "done"]


async def roll_up(
    tx: Any, endings: dict[str, list[str]], before: list[tuple[str, tuple[Any, ...]]]
) -> tuple[list[tuple[str, str, JobCounts]], tuple[str, tuple[Any, ...]]]:
    """Under the parents' locks: count this batch's endings, end the jobs whose hosts all ended.

    ``endings``: job id → statuses of its rows that ended in this transaction; ``before``: the
    rows' write, sent with the parents' lock.  Returns (job id, final status, counts) of the
    jobs that end, and the parents' update (for the caller to send with the notifications).
    """
    await tx.execute(*before, (_LOCK_PARENTS_SQL, (array(sorted(endings)),)))
    counts: dict[str, JobCounts] = {}
    uncounted: list[str] = []
    for job_id, terminal, hosts, succeeded, failed, cancelled in tx.fetchall():
        if terminal:
            continue  # ended already (by the manager, or a cancel): nothing to roll up
        if hosts is None or succeeded is None or failed is None or cancelled is None:
            uncounted.append(job_id)
            continue
        stored = JobCounts(hosts=hosts, succeeded=succeeded, failed=failed, cancelled=cancelled)
        for status in endings[job_id]:
            stored = stored.plus(status)
        counts[job_id] = stored
    # the first ending of a job counts its rows once (this transaction's included).  Later counts
    # only miss endings by other writers: "all ended" by the counts is the truth, otherwise the
    # partial index says whether a row is really still open, and only then are rows counted again
    unsure = [job_id for job_id, c in counts.items() if c.ended != c.hosts]
    if uncounted or unsure:
        await tx.execute((_CHECK_SQL, (array(uncounted), array(unsure))))
        fresh, recount = _counted(tx.fetchall())
        counts.update(fresh)
        if recount:
            await tx.execute((_CHECK_SQL, (array(recount), array([]))))
            counts.update(_counted(tx.fetchall())[0])
    ended = [(job_id, rollup_counts(c), c) for job_id, c in sorted(counts.items())]
    update = (
        _UPDATE_PARENTS_SQL,
        (
            array([job_id for job_id, _, _ in ended]),
            array([c.hosts for _, _, c in ended]),
            array([c.succeeded for _, _, c in ended]),
            array([c.failed for _, _, c in ended]),
            array([c.cancelled for _, _, c in ended]),
            array([final for _, final, _ in ended]),
        ),
    )
    return [(job_id, final, c) for job_id, final, c in ended if final is not None], update
