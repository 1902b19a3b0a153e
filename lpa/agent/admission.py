"""Admission and dispatch: a strict FIFO of pending jobs, run slots, one mutation at a time.

::

    admit(request) ── refused: ValidationError, ADMISSION_FROZEN, QUEUE_FULL, reboot guards
         │
    enqueue(job) ──▶ pending (FIFO) ──(pump, next reactor turn)──▶ start(job)
                        ▲                │ the head waits while the mutation slot is taken
                        │                │ or max_concurrent jobs run; nothing overtakes it
    release(job) ───────┴── frees its slot, pumps again

Dispatch happens on the next reactor turn (``callLater(0)``), so ``submit`` always returns a
``pending`` job; tests using ``task.Clock`` call ``clock.advance(0)`` to let it start.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from lpa.agent.model import Job, JobRequest
from lpa.errors import (
    AdmissionFrozenError,
    MutationInProgressError,
    QueueFullError,
    RebootBlockedError,
    ValidationError,
)
from lpa.events import (
    OP_INSTALL,
    OP_PATCH_APPLY,
    OP_REBOOT,
    OP_REMOVE,
    OP_UPDATE,
    OPERATIONS,
)

MUTATIONS = frozenset({OP_INSTALL, OP_UPDATE, OP_REMOVE, OP_PATCH_APPLY})

_log = Logger()


def validate(request: Any) -> None:
    """What the engine refuses whatever the API let through (bad input changes nothing)."""
    if not isinstance(request, JobRequest):
        raise ValidationError("not a job request")
    if request.operation not in OPERATIONS:
        raise ValidationError(f"unknown operation {request.operation!r}")
    # packages=() is "apply nothing" (patch_apply only): the job completes, changing nothing
    if request.operation in (OP_INSTALL, OP_UPDATE, OP_REMOVE) and not request.packages:
        raise ValidationError(f"{request.operation} needs at least one package")
    if request.reboot_delay_seconds < 0:
        raise ValidationError("reboot_delay_seconds must not be negative")


class JobQueue:
    """Pending jobs in order and the slots of the running ones.

    :param start: called with the head job when it may run (its slot is taken already).
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        start: Callable[[Job], None],
        max_concurrent: int = 5,
        max_queue_depth: int = 100,
    ) -> None:
        self._clock = clock
        self._start = start
        self._max_concurrent = max_concurrent
        self._max_queue_depth = max_queue_depth
        self.pending: deque[Job] = deque()
        self.running: set[str] = set()
        #: id of the job holding the package-database mutation slot
        self.mutation_job: str | None = None
        #: why admission is refused (the agent is stopping), None while open
        self.frozen: str | None = None
        self._pump_call: IDelayedCall | None = None

    # -- admission ---------------------------------------------------------------------------

    def active_count(self) -> int:
        return len(self.pending) + len(self.running)

    def admit(self, request: Any, *, reboot_reserved: bool) -> JobRequest:
        """Return ``request`` if it may be admitted now, else raise its refusal (in the
        original's order)."""
        validate(request)
        if self.frozen is not None:
            raise AdmissionFrozenError(self.frozen)
        if reboot_reserved:
            raise AdmissionFrozenError("A reboot is in progress")
        active = self.active_count()
        if active >= self._max_queue_depth:
            raise QueueFullError(
                f"Job queue is full ({active} of {self._max_queue_depth})",
                {"active_jobs": active, "max_queue_depth": self._max_queue_depth},
            )
        if request.operation == OP_REBOOT:
            self._check_reboot_guards(request, active)
        return request  # type: ignore[no-any-return]

    def _check_reboot_guards(self, request: JobRequest, active: int) -> None:
        if not request.force:
            if active > 0:
                raise RebootBlockedError(
                    f"Reboot blocked: {active} active jobs", {"active_jobs": active}
                )
        elif not request.acknowledge_package_database_corruption_risk:
            if self.mutation_job is not None:
                raise MutationInProgressError(
                    "A package database mutation is in progress",
                    {"package_operation_in_progress": True},
                )
        else:
            _log.warn(
                "AUDIT: Forced reboot accepted with package database corruption risk "
                "acknowledged (mutation in progress: {mutation})",
                mutation=self.mutation_job is not None,
            )

    # -- the FIFO ----------------------------------------------------------------------------

    def enqueue(self, job: Job) -> None:
        self.pending.append(job)
        self.schedule_pump()

    def occupy(self, job: Job) -> None:
        """A job resumed after a restart runs already: it takes its slots at once."""
        self.running.add(job.id)
        if job.operation in MUTATIONS:
            self.mutation_job = job.id

    def withdraw(self, job: Job) -> None:
        """Take a pending job out (it is being cancelled)."""
        self.pending.remove(job)

    def release(self, job_id: str) -> None:
        """A job stopped running: free its slot (and the mutation slot) and pump."""
        self.running.discard(job_id)
        if self.mutation_job == job_id:
            self.mutation_job = None
        self.schedule_pump()

    def freeze(self, reason: str) -> list[Job]:
        """Refuse admission from now on and stop dispatching; return the pending jobs."""
        self.frozen = reason
        if self._pump_call is not None and self._pump_call.active():
            self._pump_call.cancel()
        self._pump_call = None
        return list(self.pending)

    def schedule_pump(self) -> None:
        if self.frozen is not None or (self._pump_call is not None and self._pump_call.active()):
            return
        if self.pending:
            self._pump_call = self._clock.callLater(0, self._pump)

    def _pump(self) -> None:
        self._pump_call = None
        while self.pending and self.frozen is None:
            job = self.pending[0]
            if job.operation in MUTATIONS and self.mutation_job is not None:
                break
            if len(self.running) >= self._max_concurrent:
                break
            self.pending.popleft()
            self.running.add(job.id)
            if job.operation in MUTATIONS:
                self.mutation_job = job.id
            self._start(job)
