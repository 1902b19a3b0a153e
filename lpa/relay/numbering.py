"""Agents that restart, lose events or renumber them: what the relay notices and says.

An lpa agent numbers each job's events 1, 2, 3 … and never reuses a number, and stamps every
frame and answer with its ``incarnation`` (a value that changes at every agent start).  Agents
that break the promise exist: one from before durable events, a restored backup, a disk that
lost its last writes.  After such a restart the agent's last seq can be *below* what the relay
already applied, and a relay that only took "seq above mine" would wait forever behind a
finished job.

:func:`judge_snapshot` is the rule for a snapshot (a ``resync``, a 409/410 answer, a job
detail) whose seq is not above what the link received:

* terminal → apply it (the agent's final word wins; the store keeps the row's seq, see
  :mod:`lpa.relay.rows`) and warn how far behind the agent is;
* not terminal and below → warn, continue from the agent's seq (the row's seq never moves back:
  the store skips events at or below it);
* equal and not terminal, or after a terminal event was already received → nothing new.

:class:`IncarnationWatch` logs each change of an agent's incarnation once.
"""

from __future__ import annotations

import attr
from twisted.logger import Logger

from lpa.events import JobEvent

_log = Logger()

APPLY = "apply"  # queue the snapshot for the store
RENUMBER = "renumber"  # continue from the snapshot's seq; nothing to apply
SKIP = "skip"  # nothing new

#: how many incarnations of one agent are remembered (a late answer of an older one is no news)
_REMEMBERED = 8


#: the warning for a snapshot behind the link's seq; one format, structured fields
BEHIND_FORMAT = (
    "agent {agent} lost or renumbered events of job {agent_job_id}: the relay had seq {had_seq}, "
    "the agent's last is {agent_seq} ({behind} lower{incarnations}); {outcome}"
)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Judgement:
    """What to do with a snapshot at or below the link's seq; ``warn`` holds the log fields."""

    action: str
    warn: dict[str, object] | None = None


def _incarnations(before: str | None, now: str | None) -> str:
    if before and now and before != now:
        return f", incarnation {before} → {now}"
    if now:
        return f", incarnation {now}"
    return ""


def judge_snapshot(
    agent: str,
    snapshot: JobEvent,
    *,
    had_seq: int,
    had_terminal: bool,
    incarnation_before: str | None,
    incarnation_now: str | None,
) -> Judgement:
    """The rule in the module docstring for ``snapshot`` (its seq at or below ``had_seq``).

    ``Judgement.warn`` (when set) are the fields of :data:`BEHIND_FORMAT`.
    """
    seq = snapshot.seq if snapshot.seq is not None else had_seq
    if had_terminal:
        return Judgement(SKIP)  # the job's end is already on its way to the store
    behind = had_seq - seq
    if not snapshot.terminal and behind == 0:
        return Judgement(SKIP)
    fields: dict[str, object] = {
        "agent": agent,
        "agent_job_id": snapshot.job_id,
        "had_seq": had_seq,
        "agent_seq": seq,
        "behind": behind,
        "incarnations": _incarnations(incarnation_before, incarnation_now),
        "incarnation_before": incarnation_before,
        "incarnation_now": incarnation_now,
    }
    if snapshot.terminal:
        fields["outcome"] = f"taking its final state {snapshot.status}"
        return Judgement(APPLY, fields)
    fields["outcome"] = f"continuing from its seq {seq} (the row keeps seq {had_seq})"
    return Judgement(RENUMBER, fields)


class IncarnationWatch:
    """The incarnations one agent has shown; a new one is logged once."""

    def __init__(self, agent: str) -> None:
        self._agent = agent
        self.current: str | None = None
        self._seen: list[str] = []

    def saw(self, incarnation: str | None) -> None:
        """A frame or answer carried ``incarnation`` (None: an agent that sends none)."""
        if incarnation is None or incarnation == self.current:
            return
        if incarnation in self._seen:
            return  # a late answer from an incarnation we already moved past
        previous, self.current = self.current, incarnation
        self._seen = (self._seen + [incarnation])[-_REMEMBERED:]
        if previous is None:
            _log.info(
                "agent {agent} runs incarnation {incarnation}",
                agent=self._agent,
                incarnation=incarnation,
            )
        else:
            _log.warn(
                "agent {agent} restarted (incarnation {old} → {new}); its jobs are checked for "
                "lost or renumbered events",
                agent=self._agent,
                old=previous,
                new=incarnation,
            )

