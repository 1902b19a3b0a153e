"""The reboot reservation (the original's ``reserve_reboot``): one reboot at a time, and nothing
else admitted while it is due.

::

    reserve(job) ── admission frozen, every other pending job ends cancelled (the engine's part)
        │
    command ok ──▶ arm(job, delay) ── job waits as ``rebooting`` (not terminal)
        │                               │ the host goes down: the next start completes the job
        │                               └ still up after delay + grace ─▶ on_overdue(job id)
        └ command failed / job ended ──▶ release(job) ── admission reopens

A reboot job, or a patch job with ``allow_reboot`` whose outcome needs one, reserves.  If the
host is still up ``reboot_delay_seconds + reboot_grace_seconds`` after the reboot command
succeeded, the engine fails the reboot job ``REBOOT_ERROR`` (a patch job completes, saying so).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class RebootReservation:
    """Which job's reboot is reserved or under way, and its overdue timer."""

    def __init__(
        self,
        clock: IReactorTime,
        *,
        on_overdue: Callable[[str], None],
        grace_seconds: float = 900.0,
    ) -> None:
        self._clock = clock
        self._on_overdue = on_overdue
        self._grace = grace_seconds
        #: id of the job whose reboot is reserved or under way (admission frozen meanwhile)
        self.job_id: str | None = None
        self._overdue_call: IDelayedCall | None = None

    @property
    def reserved(self) -> bool:
        return self.job_id is not None

    def reserve(self, job_id: str) -> None:
        self.job_id = job_id

    def arm(self, job_id: str, delay: float) -> None:
        """The reboot command succeeded: expect the host to go down within delay + grace."""
        self.cancel_timer()
        self._overdue_call = self._clock.callLater(delay + self._grace, self._overdue, job_id)

    def release(self, job_id: str) -> None:
        """The job ended (or its reboot failed): admission reopens."""
        if self.job_id == job_id:
            self.job_id = None
            self.cancel_timer()

    def cancel_timer(self) -> None:
        if self._overdue_call is not None and self._overdue_call.active():
            self._overdue_call.cancel()
        self._overdue_call = None

    def _overdue(self, job_id: str) -> None:
        self._overdue_call = None
        self._on_overdue(job_id)
