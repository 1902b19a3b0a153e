"""One job's event numbers as a client reads them: in order, once, and what a snapshot says.

An lpa agent numbers each job's events 1, 2, 3 … and never reuses a number.  A
:class:`JobSequence` is what a client (:class:`lpa.follower.JobFollower`, used by ``lpa agent
watch`` and the relay) knows of one job: the last seq delivered, and the rules for what comes
next.  Events are delivered at most once and in ``seq`` order; a snapshot (a ``resync``, a
409/410 answer's detail, a job detail) replaces the stream.

Agents that break the numbering promise exist (one from before durable events, a restored
backup, a disk that lost its last writes): after a restart their last seq can be *below* what
the client already has, and a client that only took "seq above mine" would wait forever behind a
finished job.  So a snapshot *numbered at or below* ``last_seq`` (:meth:`JobSequence.snapshot`,
``authoritative``) is judged, and :class:`Renumbered` says what was found:

* terminal → delivered: the agent's final word wins (a store applies a terminal snapshot
  whatever its seq);
* not terminal → delivered; a terminal event numbered at or below :attr:`JobSequence.floor`
  (the highest seq ever delivered) is later delivered as a snapshot, so that it still wins
  downstream;
* at ``last_seq`` and not terminal, or after a terminal event was delivered → nothing new.

A delivered one moves ``last_seq`` down to the agent's numbering.
"""

from __future__ import annotations

import attr

from lpa.events import EVENT_JOB_COMPLETE, KIND_SNAPSHOT, JobEvent

#: what :meth:`JobSequence.place` says of an event
NEXT = "next"  # seq == last_seq + 1: deliver it
OLD = "old"  # at or below last_seq (a replay overlap), or unnumbered: drop it
GAP = "gap"  # above last_seq + 1: events are missing before it


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Renumbered:
    """A snapshot numbered at or below what was delivered: the agent lost or renumbered events."""

    job_id: str
    #: ``last_seq`` before the snapshot
    had_seq: int
    #: the snapshot's seq (the agent's last)
    agent_seq: int
    incarnation_before: str | None
    incarnation_now: str | None
    #: the terminal status delivered (the agent's final word), or None: following goes on
    #: from ``agent_seq``
    final_status: str | None = None

    @property
    def behind(self) -> int:
        return self.had_seq - self.agent_seq


class JobSequence:
    """What was delivered of one job, and the rules for what comes next (module docstring).

    :ivar last_seq: the highest event number delivered (the resume point)
    :ivar floor: the highest seq ever delivered or started from (what downstream may hold)
    :ivar latest: the last event delivered (None before the first)
    :ivar outcome: the last delivered event other than ``job_complete``: at the end, the
        terminal ``job_status`` (or snapshot) that states how the job ended
    :ivar ended: a terminal event was delivered
    :ivar done: the job ended and its last event was delivered
    :ivar incarnation: the agent's incarnation in the last input that carried one
    """

    __slots__ = ("done", "ended", "floor", "incarnation", "job_id", "last_seq", "latest", "outcome")

    def __init__(self, job_id: str, after_seq: int = 0) -> None:
        self.job_id = job_id
        self.last_seq = after_seq
        self.floor = after_seq
        self.latest: JobEvent | None = None
        self.outcome: JobEvent | None = None
        self.ended = False
        self.done = False
        self.incarnation: str | None = None

    def saw(self, incarnation: str | None) -> None:
        """An input carried ``incarnation`` (None: it carried none)."""
        if incarnation is not None:
            self.incarnation = incarnation

    def place(self, event: JobEvent) -> str:
        """Where ``event`` falls: :data:`NEXT`, :data:`OLD` or :data:`GAP`."""
        if event.seq is None or event.seq <= self.last_seq:
            return OLD
        return NEXT if event.seq == self.last_seq + 1 else GAP

    def deliver(self, event: JobEvent) -> JobEvent:
        """Take the :data:`NEXT` event; returns it as it is to be delivered."""
        seq = event.seq
        if seq is not None:
            if event.terminal and seq <= self.floor:
                # numbered below what downstream may hold (the agent renumbered): a snapshot,
                # so that its end still wins
                event = attr.evolve(event, kind=KIND_SNAPSHOT)
            self.last_seq = seq
            self.floor = max(self.floor, seq)
        self.latest = event
        self.ended = self.ended or event.terminal
        if event.event == EVENT_JOB_COMPLETE:
            self.done = True
        else:
            self.outcome = event
        return event

    def rewind(self, seq: int) -> None:
        """Forget what was delivered after ``seq`` (lost downstream): it is news again."""
        self.last_seq = min(self.last_seq, seq)
        self.done = self.ended = False

    def snapshot(
        self, snapshot: JobEvent, *, authoritative: bool, now: str | None = None
    ) -> tuple[tuple[JobEvent, ...], Renumbered | None]:
        """Take a snapshot; returns what to deliver and what it says of the agent's numbering.

        ``authoritative`` snapshots (resync, 409/410, a detail read to end the job) set
        ``last_seq``, under the module's rule when numbered at or below it.  A polled detail
        (not authoritative) is delivered only when it is numbered above ``last_seq``, or, from
        an agent that numbers nothing, when it changes what was last delivered.  ``now`` is the
        incarnation the input carried.
        """
        latest = self.latest
        renumbered = None
        if snapshot.seq is None and not authoritative:
            if latest is not None and _same_state(latest, snapshot):
                self.done = self.done or snapshot.terminal
                return (), None
        elif snapshot.seq is not None and snapshot.seq <= self.last_seq:
            if not authoritative:
                if snapshot.terminal and latest is not None and latest.terminal:
                    self.done = True
                return (), None
            if self.ended or (not snapshot.terminal and snapshot.seq == self.last_seq):
                return (), None  # the end is already delivered, or nothing is new
            renumbered = Renumbered(
                job_id=self.job_id,
                had_seq=self.last_seq,
                agent_seq=snapshot.seq,
                incarnation_before=self.incarnation,
                incarnation_now=now,
                final_status=snapshot.status if snapshot.terminal else None,
            )
            self.last_seq = snapshot.seq  # the agent's numbering from now on
        self.latest = self.outcome = snapshot
        if snapshot.seq is not None and snapshot.seq > self.last_seq:
            self.last_seq = snapshot.seq
            self.floor = max(self.floor, snapshot.seq)
        if snapshot.terminal:
            self.done = self.ended = True
        return (snapshot,), renumbered


def _same_state(a: JobEvent, b: JobEvent) -> bool:
    return (a.status, a.progress, a.message, a.error, a.error_code) == (
        b.status,
        b.progress,
        b.message,
        b.error,
        b.error_code,
    )
