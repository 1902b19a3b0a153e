"""``lpa agent URL watch ID``: follow one job to its end, the way the relay does.

:func:`follow_job` drives a :class:`lpa.follower.JobFollower` over the WebSocket, then over
REST polling::

    subscribe {job_id, after_seq: N} ──▶ job_status … job_status(terminal) ──▶ job_complete: done
          │ handshake fails (TLS, not 101, bad accept key, timeout), socket drops, subscription
          ▼ refused
    every interval: GET /api/v1/jobs/{id}/events?after=N   (410/409 → the job's detail)
          │ 404/405 (an original agent has no events endpoint)
          ▼
    every interval: GET /api/v1/jobs/{id}   until the status is terminal

:class:`ProgressPrinter` shows what is delivered: a bar redrawn on a terminal (a moving marker
while the job reports no percentage, as a dry run never does), one plain line per event
otherwise, one JSON object per event with ``--json``; then :func:`final_lines` states the end
once, with the job's error, error code and the output lines that explain a failure.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TextIO

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from lpa.events import COMPLETED, EVENT_JOB_COMPLETE, KIND_OUTPUT, JobEvent
from lpa.follower import JobFollower
from lpa.protocol import ProtocolError, parse_frame
from lpa.tools.client import AgentClient, ClientError
from lpa.tools.stream import HandshakeFailed, JobStream, StreamClosed

#: output lines that say why a package manager failed (apt's E:, dnf's Error: …)
_RELEVANT = re.compile(r"^(E:|W:|error|fatal|failed|.*\berror\b)", re.IGNORECASE)
#: our own lines in a job's log, not the package manager's
_OWN = re.compile(r"^(Job failed:|Command failed \(exit)")


async def follow_job(
    job_id: str, *, client: AgentClient, clock: IReactorTime,
    open_stream: Callable[[], Awaitable[JobStream]] | None,
    show: Callable[[JobEvent], None], note: Callable[[str], None],
    interval: float = 2.0, unreachable_after: float = 30.0, after_seq: int = 0,
) -> JobFollower:
    """Follow ``job_id`` until it is over; every delivered event goes to ``show`` once.

    :param open_stream: dials the WebSocket; None polls only (``--poll``).
    :param unreachable_after: give up when polling fails that long in a row.
    :raises ClientError: the agent forgot the job, refused a request, or stayed unreachable.
    """
    follower = JobFollower(job_id, after_seq)
    if open_stream is None:
        note("polling over REST (--poll)")
    else:
        try:
            stream = await open_stream()
        except HandshakeFailed as why:
            note(f"WebSocket handshake failed ({why}); polling instead")
        else:
            try:
                await _read_stream(follower, stream, show, note)
            finally:
                await stream.close()
    failing_since: float | None = None
    while not follower.over:
        try:
            answer = await client.answer("GET", follower.poll_path())
        except ClientError as error:
            now = clock.seconds()
            failing_since = now if failing_since is None else failing_since
            if now - failing_since >= unreachable_after:
                raise
            note(f"{error}; trying again in {interval:g}s")
            await deferLater(clock, interval, lambda: None)
            continue
        failing_since = None
        step = follower.receive_answer(answer)
        for event in step.events:
            show(event)
        if not follower.over:  # the answer did not end it: say why, then poll again
            if step.problem is not None:
                if answer.status != 429 and answer.status < 500:
                    raise ClientError(step.problem, status=answer.status, code=answer.code)
                note(f"{step.problem}; trying again in {interval:g}s")
            if not step.again:
                await deferLater(clock, interval, lambda: None)
    if follower.gone is not None:
        raise ClientError(follower.gone, code="JOB_NOT_FOUND")
    return follower


async def _read_stream(
    follower: JobFollower, stream: JobStream, show: Callable[[JobEvent], None],
    note: Callable[[str], None],
) -> None:
    for frame in follower.stream_opened().send:
        stream.send(frame)
    while not follower.over:
        try:
            text = await stream.next_text()
        except StreamClosed as why:
            follower.stream_lost()
            note(f"{why}; polling from seq {follower.last_seq}")
            return
        try:
            step = follower.receive(parse_frame(text))
        except ProtocolError as error:
            note(f"ignored a frame from the agent: {error}")
            continue
        for event in step.events:
            show(event)
        for frame in step.send:
            stream.send(frame)
        if step.refused is not None:
            note(f"the agent refused the subscription ({step.refused.code}: "
                 f"{step.refused.message}); polling instead")
            return


class ProgressPrinter:
    """Shows delivered events: a bar on a terminal, plain lines otherwise, or JSON lines."""

    def __init__(
        self, out: TextIO, *, tty: bool | None = None, json_lines: bool = False,
        columns: int | None = None, bar_width: int = 24,
    ) -> None:
        self._out = out
        self._json = json_lines
        self._tty = (out.isatty() if tty is None else tty) and not json_lines
        self._columns = columns or shutil.get_terminal_size((100, 24)).columns
        self._bar_width = bar_width
        self._drawn = False
        self._progress_known = False
        self._ticks = 0
        self.lines = 0  # output lines seen

    def show(self, event: JobEvent) -> None:
        if event.kind == KIND_OUTPUT:
            self.lines += 1
        if event.progress > 0:
            self._progress_known = True
        if self._json:
            self._write(json.dumps(event.to_wire(), sort_keys=True) + "\n")
        elif self._tty:
            if not event.terminal:
                self._draw(event)
        elif not event.terminal and event.event != EVENT_JOB_COMPLETE:
            seq = "-" if event.seq is None else str(event.seq)
            self._write(f"seq={seq} {event.status} {event.progress}% [{event.kind}] "
                        f"{event.message}\n")

    def _draw(self, event: JobEvent) -> None:
        width = self._bar_width
        if self._progress_known:
            filled = event.progress * width // 100
            bar = "#" * filled + "-" * (width - filled)
            head = f"[{bar}] {event.progress:3d}% {event.status:<9}"
        else:  # no percentage reported (a dry run): a moving marker and the lines seen
            self._ticks += 1
            at = self._ticks % (width - 2)
            bar = " " * at + "<=>" + " " * (width - 3 - at)
            head = f"[{bar}] {event.status:<9} {self.lines:>5} lines"
        room = max(0, self._columns - len(head) - 2)
        message = " ".join(event.message.split())
        line = f"{head} {message[:room]}"
        self._write("\r" + line + "\x1b[K")
        self._drawn = True

    def finish(self, lines: list[str]) -> None:
        """End the bar and print the final lines (nothing in JSON mode)."""
        if self._drawn:
            self._write("\r\x1b[K")
            self._drawn = False
        if not self._json:
            self._write("".join(line + "\n" for line in lines))

    def _write(self, text: str) -> None:
        self._out.write(text)
        self._out.flush()


def final_lines(
    job_id: str, latest: JobEvent | None, detail: Mapping[str, Any] | None,
    *, dry_run: bool | None = None, tail: int = 5,
) -> list[str]:
    """The end of a job, stated once: status, dry run, message or error, and why it failed."""
    detail = detail or {}
    status = latest.status if latest is not None else str(detail.get("status", "unknown"))
    if dry_run is None:
        dry_run = detail.get("dry_run") is True
    head = f"job {job_id} {status}" + (" (DRY-RUN)" if dry_run else "")
    error = (latest.error if latest is not None else None) or detail.get("error")
    code = (latest.error_code if latest is not None else None) or detail.get("error_code")
    message = (latest.message if latest is not None else "") or str(detail.get("message") or "")
    if status == COMPLETED or not (error or code):
        return [f"{head}: {message}" if message else head]
    lines = [f"{head}: " + ": ".join(str(part) for part in (code, error) if part)]
    lines += [f"  {line}" for line in relevant_output(detail, tail)]
    return lines


def relevant_output(detail: Mapping[str, Any], tail: int = 5) -> list[str]:
    """The last lines of a failed job's output that say why (all last lines if none match)."""
    stderr = str(detail.get("command_stderr") or "")
    logs = detail.get("logs")
    logs = logs if isinstance(logs, list) else []
    candidates = [line.rstrip() for line in stderr.splitlines() if line.strip()]
    if not candidates:
        candidates = [str(line).rstrip() for line in logs
                      if str(line).strip() and not _OWN.match(str(line))]
    matching = [line for line in candidates if _RELEVANT.match(line.strip())]
    return (matching or candidates)[-tail:]
