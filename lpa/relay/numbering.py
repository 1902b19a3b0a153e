"""Agents that restart, lose events or renumber them: what the relay says about it.

The rule lives with the client's other numbering rules (:mod:`lpa.jobseq`, applied by each
followed job's :class:`~lpa.follower.JobFollower`): a terminal snapshot numbered at or below what
the relay received still ends the row, a lower non-terminal one is continued from.  This module
holds the relay's words for it:

* :data:`BEHIND_FORMAT` and :func:`behind_fields`: the warning for a
  :class:`~lpa.jobseq.Renumbered` finding, which says by how much and which incarnations;
* :class:`IncarnationWatch`: each change of an agent's incarnation (a value that changes at
  every agent start), logged once per agent.
"""

from __future__ import annotations

from twisted.logger import Logger

from lpa.jobseq import Renumbered

_log = Logger()

#: how many incarnations of one agent are remembered (a late answer of an older one is no news)
_REMEMBERED = 8


#: the warning for a snapshot behind the link's seq; one format, structured fields
BEHIND_FORMAT = (
    "agent {agent} lost or renumbered events of job {agent_job_id}: the relay had seq {had_seq}, "
    "the agent's last is {agent_seq} ({behind} lower{incarnations}); {outcome}"
)


def _incarnations(before: str | None, now: str | None) -> str:
    if before and now and before != now:
        return f", incarnation {before} → {now}"
    if now:
        return f", incarnation {now}"
    return ""


def behind_fields(agent: str, renumbered: Renumbered) -> dict[str, object]:
    """The fields of :data:`BEHIND_FORMAT` (all but ``row_id``) for ``renumbered``."""
    before, now = renumbered.incarnation_before, renumbered.incarnation_now
    if renumbered.final_status is not None:
        outcome = f"taking its final state {renumbered.final_status}"
    else:
        outcome = (
            f"continuing from its seq {renumbered.agent_seq} (the row keeps seq "
            f"{renumbered.had_seq})"
        )
    return {
        "agent": agent,
        "agent_job_id": renumbered.job_id,
        "had_seq": renumbered.had_seq,
        "agent_seq": renumbered.agent_seq,
        "behind": renumbered.behind,
        "incarnations": _incarnations(before, now),
        "incarnation_before": before,
        "incarnation_now": now,
        "outcome": outcome,
    }


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
        self._seen = ([*self._seen, incarnation])[-_REMEMBERED:]
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

