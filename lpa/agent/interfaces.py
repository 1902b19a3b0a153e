"""The seams of the agent, each with a production class and a fake (``verifyObject`` checks both).

Flow of one mutation::

    api ──submit(JobRequest)──▶ IJobManager ──execute(job, ctx)──▶ IPackageBackend
                                    │                                  │ ctx.run(argv, timeout)
                                    │ IEventJournal ─durable─▶ EventLog ▼
                                    │  (write-ahead)   ─▶ broadcast   IProcessRunner ─▶ child
                                    ▼                   (ws sessions)  (own process group)
                                 IJobStore (one file per job: the journal's checkpoint)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from lpa.agent.eventlog import StoredEvents
    from lpa.agent.model import CommandResult, Job, JobOutcome, Package, Patch
    from lpa.agent.phase import TransactionWatch
    from lpa.events import JobEvent

# The names below are used only in annotations (strings under `from __future__ import annotations`).


class IProcessRunner(Interface):
    """Runs one child process, argv only, never a shell, in its own process group."""

    def run(
        argv: Sequence[str],
        *,
        timeout: float,
        env: Mapping[str, str] | None = None,
        on_stdout_line: Callable[[str], None] | None = None,
        on_stderr_line: Callable[[str], None] | None = None,
        extra_fds: Mapping[int, Callable[[str], None]] | None = None,
    ) -> Deferred[CommandResult]:
        """Start ``argv``; fire with a ``CommandResult`` whatever the exit status.

        Past ``timeout`` seconds the group gets SIGTERM, then SIGKILL after a grace period, and
        the result has ``timed_out=True``.  Cancelling the Deferred terminates the group the same
        way and errbacks with ``CancelledError``.  A missing executable errbacks with
        ``CommandNotFoundError``.  ``extra_fds`` maps a child fd (e.g. apt's ``APT::Status-Fd``)
        to a line callback.
        """


class ICommandRun(Interface):
    """One command of a job, started by :class:`IJobCommands`: its lines, its end, its signals."""

    number = Attribute("the run's number within its job (1, 2, …)")
    argv = Attribute("the command line, as a tuple")
    started = Attribute("wall-clock seconds at which the command was launched")
    times_itself = Attribute(
        "True when the runner enforces the command timeout itself (a piped run); the job "
        "context then starts no deadline of its own"
    )
    ended = Attribute(
        "a Deferred firing with the CommandResult once the command has exited and every line "
        "was handed out; it errbacks with CommandNotFoundError (it could not be started) or "
        "CommandError (the run went without saying how it ended)"
    )

    def follow(starts: Mapping[int, int], on_line: Callable[[int, str, int], None]) -> None:
        """Hand out ``on_line(fd, text, end)`` for fds 1, 2 and 3 from the offsets ``starts``
        (missing fds from 0); ``end`` is the offset just past the line."""

    def signal(signum: int) -> bool:
        """Send ``signum`` to the command's process group; False once it has ended."""

    def mark(reason: str) -> None:
        """Record why the agent is about to signal the command (``timed_out``, ``cancelled``),
        so that a restarted agent reports the run the same way."""

    def stop() -> None:
        """Stop following (the agent is stopping); the command itself goes on."""


class IJobCommands(Interface):
    """Starts the commands of jobs and finds them again after an agent restart."""

    outlives_agent = Attribute("whether a command goes on when the agent stops or dies")

    def launch(
        job_id: str,
        number: int,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float,
    ) -> Deferred[ICommandRun]:
        """Start the job's ``number``-th command; fire with its :class:`ICommandRun` once it
        runs, or errback ``CommandNotFoundError`` / ``CommandError`` when it cannot start."""

    def attach(job_id: str, number: int) -> ICommandRun | None:
        """The job's ``number``-th run as an :class:`ICommandRun` (running or finished), or
        None when there is none that started."""

    def last_run(job_id: str) -> tuple[int, str] | None:
        """``(number, state)`` of the job's last run (``running``, ``finished``, ``vanished``,
        ``never-started``), or None when the job has none."""

    def discard(job_id: str) -> None:
        """The job has ended: forget its runs (those no longer running)."""


class IJobContext(Interface):
    """What a backend may do while it executes a job: run commands and report progress."""

    job = Attribute("the Job being executed (read-only for backends)")

    def run(
        argv: Sequence[str],
        *,
        timeout: float,
        env: Mapping[str, str] | None = None,
        ok_codes: Sequence[int] = (0,),
        status_fd_line: Callable[[str], None] | None = None,
        transaction: TransactionWatch | None = None,
    ) -> Deferred[CommandResult]:
        """Run a command for this job; every output line becomes an ``output`` event.

        Fires with the ``CommandResult``; errbacks with ``CommandFailedError`` (exit not in
        ``ok_codes``), ``CommandTimedOutError`` or ``JobCancelledError``.  ``status_fd_line``
        receives lines of a machine-readable status channel (fd 3) when given.
        ``transaction`` (a :class:`lpa.agent.phase.TransactionWatch`) says when the command
        starts changing the package database: from then on cancel and timeout let it finish.
        """

    def progress(percent: int, message: str) -> None:
        """Report real progress (0–100) with a message; emits a ``progress`` event."""

    def waiting_for_lock(holder: str) -> None:
        """Say the package database lock is held by ``holder``; emits ``waiting_for_lock``."""


class IPackageBackend(Interface):
    """One package manager (apt, dnf, yum, zypper, apk, pacman) behind one interface."""

    name = Attribute("the backend's name, e.g. 'apt'")

    def list_packages(
        name_filter: str | None = None, status: str | None = None
    ) -> Deferred[list[Package]]:
        """Fire with a list of ``Package``; read-only."""

    def get_package(name: str) -> Deferred[Package]:
        """Fire with one ``Package`` or errback with ``PackageNotFoundError``; read-only."""

    def list_patches(security_only: bool = False) -> Deferred[list[Patch]]:
        """Fire with a list of ``Patch`` (pending updates); read-only."""

    def execute(job: Job, context: IJobContext) -> Deferred[JobOutcome]:
        """Carry out ``job.request`` (install/update/remove/patch_apply) through ``context``.

        Fires with a ``JobOutcome``.  A dry run changes nothing and lists what would change in
        ``JobOutcome.changes``.  Errors are the ``CommandError`` family or ``JobCancelledError``.
        """


class ISystem(Interface):
    """Facts about and actions on the host that are not package-manager specific."""

    def boot_id() -> str:
        """``/proc/sys/kernel/random/boot_id`` (empty string when unavailable)."""

    def system_info() -> Deferred[dict[str, Any]]:
        """Fire with the ``/api/v1/system/info`` data dict."""

    def uptime_seconds() -> int:
        """Host uptime from ``/proc/uptime``."""

    def service_status(name: str) -> Deferred[dict[str, Any]]:
        """Fire with the service dict or errback ``ServiceNotFoundError``/``ServiceStatusError``."""

    def reboot_argv(delay_seconds: int) -> list[str]:
        """The command that reboots this host after ``delay_seconds``."""

    def pending_reboot() -> Deferred[tuple[bool, list[str]]]:
        """Fire with ``(bool, [package names])``: does the host need a reboot, and why."""


class IJobStore(Interface):
    """Durable job history, one entry per job: the checkpoint of the write-ahead event log."""

    def load() -> list[tuple[Job, StoredEvents]]:
        """Return ``[(Job, events), ...]`` as last saved, oldest job first (empty when none).

        ``events`` is a list of ``JobEvent`` or a callable returning one (decoded on demand).
        """

    def save(
        changed: list[tuple[Job, Sequence[JobEvent]]], removed: Sequence[str] = ()
    ) -> Deferred[None]:
        """Write ``[(Job, [JobEvent, ...]), ...]`` and forget ``removed`` job ids, atomically
        per job; fire once all of it is durable."""

    def close() -> None:
        """Release what the store holds (its writer thread)."""


class IEventJournal(Interface):
    """The write-ahead log: records are handed back (as tokens) only once they are durable."""

    size = Attribute("bytes appended since the last rotate()")

    def set_listener(listener: Callable[[list[Any]], None]) -> None:
        """``listener(tokens)`` is called on the reactor for each durable batch, in order."""

    def recover(incarnation: str = "") -> list[Any]:
        """Records left by the previous run (after its checkpoint), oldest first."""

    def append(record: object, token: object) -> None:
        """Queue a JSON-able record (or ``bytes`` of its JSON text); its token reaches the
        listener once it is durable."""

    def rotate() -> int:
        """Start a new segment; return the last one holding what was appended before."""

    def drop_through(through: int) -> Deferred[None]:
        """Segments up to ``through`` are checkpointed elsewhere: delete them."""

    def drain() -> Deferred[None]:
        """Fire once everything appended so far is durable."""

    def close(grace: float = 10.0) -> Deferred[int]:
        """Write what is pending and stop; fire with the number of records given up on
        (still not durable after ``grace`` seconds)."""

    def abandon() -> int:
        """Drop records not yet durable (shutdown on a failing disk); return how many."""


class IJobManager(Interface):
    """The job engine as the REST API and the WebSocket see it."""

    events = Attribute("the EventLog: numbered, kept, published job events")
    incarnation = Attribute(
        "this agent start's identity, '<boot_id>:<start counter>' (None before start())"
    )

    def submit(request: object) -> object:
        """Admit a ``JobRequest``; return the new pending ``Job`` or raise ``AdmissionError``."""

    def get(job_id: str) -> object:
        """Return the ``Job`` or raise ``JobNotFoundError``."""

    def list_jobs(status: str | None = None, limit: int = 50) -> list[Job]:
        """Jobs newest first, optionally filtered by status."""

    def cancel(job_id: str) -> object:
        """End a pending or running job as ``cancelled``.

        Raise ``CancelNotAllowedError`` if it has ended.
        """

    def delete(job_id: str) -> None:
        """Forget an ended job; raise ``DeleteNotAllowedError`` if it has not ended."""

    def mutation_in_progress() -> bool:
        """True while a package-database mutation runs."""

    def active_count() -> int:
        """Number of pending plus running jobs."""


class IStreamChannel(Interface):
    """Where a session's frames go: the WebSocket protocol, or a list in tests."""

    def send_text(text: str) -> None:
        """Send one text frame."""

    def close(code: int, reason: str) -> None:
        """Start the closing handshake with ``code`` and ``reason``."""
