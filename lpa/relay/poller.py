"""Polling an agent's jobs over mTLS when its WebSocket handshake fails.

One :class:`AgentPoller` per agent link, driven by a ``LoopingCall`` on the injected clock::

    every interval:  for each followed job of the agent
        GET /api/v1/jobs/{id}/events?after=N     lpa agents: data.events
          410 EVENTS_EXPIRED  → the job detail in error.details, applied as a snapshot
          404 JOB_NOT_FOUND   → the job ends failed (the agent forgot it)
          405 / other 404     → the agent lacks the path (the original): remember, and
        GET /api/v1/jobs/{id}                    → one KIND_SNAPSHOT event
    a failed request:   the interval doubles up to ``max_interval``; a job failing longer than
                        ``deadline`` ends failed (the original polled forever)

The HTTP client is an injected treq ``HTTPClient``; production builds it over an ``Agent`` whose
TLS policy returns :func:`lpa.tls.client_tls_options` (see :func:`make_agent_http_client`).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping, Sequence

import attr
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from lpa.events import KIND_SNAPSHOT, JobEvent, normalise_status
from lpa.relay.interfaces import AgentAddress, HostJob

_log = Logger()

#: bodies larger than this are refused (an agent keeps at most a bounded event window)
MAX_BODY_BYTES = 16 * 1024 * 1024


class PollError(Exception):
    """One poll request failed; ``transport`` is True when the agent could not be reached.

    ``retry_after`` (seconds) is set when the agent rate-limited us (429): that is an agent
    that answers, so it never counts toward the unreachable deadline.
    """

    def __init__(
        self, message: str, *, transport: bool = False, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.transport = transport
        self.retry_after = retry_after


@attr.s(frozen=True, slots=True, auto_attribs=True)
class PollOutcome:
    """What one poll of one job found: new events, or that the agent no longer knows the job."""

    events: tuple[JobEvent, ...] = ()
    gone: str | None = None


def snapshot_event(agent_job_id: str, detail: Mapping[str, Any], seq: Any = None) -> JobEvent:
    """A job detail (``GET /jobs/{id}``, a 410's details, a ``resync``) as a KIND_SNAPSHOT event.

    Status spellings of every agent are read (``timedout`` …); ``output`` is the joined ``logs``;
    ``seq`` is taken from the detail when it has a positive one (lpa agents), else None.
    Raises ValueError for a detail without a readable status.
    """
    if not isinstance(detail, Mapping):
        raise ValueError("job detail is not a JSON object")
    status = detail.get("status")
    if not isinstance(status, str):
        raise ValueError("job detail has no status")
    if seq is None:
        seq = detail.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        seq = None
    progress = detail.get("progress", 0)
    if not isinstance(progress, int) or isinstance(progress, bool):
        progress = 0
    logs = detail.get("logs")
    output = "\n".join(str(line) for line in logs) if isinstance(logs, list) else None
    message = detail.get("message")
    error = detail.get("error")
    error_code = detail.get("error_code")
    return JobEvent(
        job_id=agent_job_id,
        seq=seq,
        status=normalise_status(status),
        progress=max(0, min(100, progress)),
        message=message if isinstance(message, str) else "",
        timestamp=str(detail.get("updated_at") or detail.get("timestamp") or ""),
        kind=KIND_SNAPSHOT,
        error=error if isinstance(error, str) else None,
        error_code=error_code if isinstance(error_code, str) else None,
        output=output,
    )


def _retry_after(headers: Any) -> float:
    """Seconds from a ``Retry-After`` header (1 when absent or unreadable)."""
    try:
        values = headers.getRawHeaders(b"retry-after") or []
        return max(1.0, float(values[0]))
    except (AttributeError, IndexError, TypeError, ValueError):
        return 1.0


def _error_code(body: Any) -> str | None:
    if isinstance(body, Mapping) and isinstance(body.get("error"), Mapping):
        code = body["error"].get("code")
        return code if isinstance(code, str) else None
    return None


class AgentJobsHttp:
    """The two REST reads a poller needs from one agent, over an injected treq client."""

    def __init__(
        self, client: Any, address: AgentAddress, *, clock: IReactorTime, timeout: float
    ) -> None:
        self._client = client
        self._base = f"https://{address.host}:{address.port}/api/v1/jobs"
        self._timeout = timeout
        self._clock = clock
        #: None until known; False once the agent answered the events path with 405/404
        self.has_events_endpoint: bool | None = None

    async def _get(self, url: str) -> tuple[int, Any]:
        async def request() -> tuple[int, bytes, Any]:
            response = await self._client.get(url)
            return response.code, await response.content(), response.headers

        try:
            code, raw, headers = await Deferred.fromCoroutine(request()).addTimeout(
                self._timeout, self._clock
            )
        except CancelledError:
            raise  # the poller was stopped
        except TimeoutError:
            raise PollError(
                f"GET {url}: no answer within {self._timeout:g}s", transport=True
            ) from None
        except Exception as error:  # connection refused, TLS failure, reset …
            raise PollError(
                f"GET {url}: {error.__class__.__name__}: {error}", transport=True
            ) from None
        if code == 429:
            raise PollError(f"GET {url}: rate limited (429)", retry_after=_retry_after(headers))
        if len(raw) > MAX_BODY_BYTES:
            raise PollError(f"GET {url}: body of {len(raw)} bytes is too large")
        body: Any = None
        if raw.strip():
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
        return code, body

    async def fetch(self, agent_job_id: str, after_seq: int) -> PollOutcome:
        """New events of ``agent_job_id`` after ``after_seq`` (or a snapshot); raises PollError."""
        if self.has_events_endpoint is not False:
            url = f"{self._base}/{agent_job_id}/events?after={after_seq}"
            code, body = await self._get(url)
            error_code = _error_code(body)
            if code == 200 and isinstance(body, Mapping) and isinstance(body.get("data"), Mapping):
                self.has_events_endpoint = True
                return PollOutcome(events=self._events(agent_job_id, body["data"].get("events")))
            if code == 410 and error_code == "EVENTS_EXPIRED":
                self.has_events_endpoint = True
                details = body["error"].get("details")
                return PollOutcome(events=(snapshot_event(agent_job_id, details),))
            if error_code == "JOB_NOT_FOUND":
                return PollOutcome(
                    gone=f"the agent does not know job {agent_job_id} (JOB_NOT_FOUND)"
                )
            if code not in (404, 405):
                raise PollError(f"GET {url}: HTTP {code} {error_code or ''}".rstrip())
            self.has_events_endpoint = False
            _log.info(
                "agent {agent} has no events endpoint (HTTP {code}): polling job details",
                agent=self._base,
                code=code,
            )
        url = f"{self._base}/{agent_job_id}"
        code, body = await self._get(url)
        if code == 404:
            return PollOutcome(gone=f"the agent does not know job {agent_job_id} (HTTP 404)")
        if (
            code != 200
            or not isinstance(body, Mapping)
            or not isinstance(body.get("data"), Mapping)
        ):
            raise PollError(f"GET {url}: HTTP {code} {_error_code(body) or ''}".rstrip())
        try:
            return PollOutcome(events=(snapshot_event(agent_job_id, body["data"]),))
        except ValueError as error:
            raise PollError(f"GET {url}: unreadable job detail: {error}") from None

    def _events(self, agent_job_id: str, wires: Any) -> tuple[JobEvent, ...]:
        if not isinstance(wires, list):
            raise PollError("events response without a data.events list")
        events = []
        for wire in wires:
            try:
                event = JobEvent.from_wire(wire)
            except ValueError as error:
                _log.warn(
                    "agent {agent} sent a bad event: {error}", agent=self._base, error=str(error)
                )
                continue
            if event.job_id == agent_job_id:
                events.append(event)
        return tuple(sorted(events, key=lambda e: e.seq or 0))


class IPollTarget(Interface):
    """What a poller feeds: the agent link."""

    def poll_jobs() -> Sequence[tuple[HostJob, int]]:
        """The host jobs to poll now, each with the seq to poll after."""

    def poll_events(host_job: HostJob, events: Sequence[JobEvent]) -> None:
        """Events read for ``host_job`` (to apply)."""

    def poll_give_up(host_job: HostJob, reason: str) -> None:
        """End ``host_job`` failed: the agent forgot it or stayed unreachable too long."""


class IAgentPoller(Interface):
    """Polling one agent's jobs for an :class:`IPollTarget`."""

    def start(now: bool = True) -> None:
        """Start the loop (first pass now unless ``now`` is False)."""

    def stop() -> None:
        """Stop the loop and cancel an in-flight request."""


@implementer(IAgentPoller)
class AgentPoller:
    """A ``LoopingCall`` polling every followed job of one agent; errors back off."""

    def __init__(
        self,
        http: AgentJobsHttp,
        target: IPollTarget,
        *,
        clock: IReactorTime,
        interval: float,
        max_interval: float,
        deadline: float,
    ) -> None:
        self._http = http
        self._target = target
        self._clock = clock
        self.base_interval = interval
        self.max_interval = max(interval, max_interval)
        self.deadline = deadline
        self.interval = interval
        self._failing_since: dict[str, float] = {}
        self._loop: LoopingCall | None = None
        self._tick_deferred: Deferred | None = None
        self._stopped = False

    @property
    def running(self) -> bool:
        return self._loop is not None

    def start(self, now: bool = True) -> None:
        if self._loop is None:
            self._stopped = False
            self._run_loop(self.interval, now)

    def stop(self) -> None:
        """Stop polling; an in-flight request is cancelled."""
        self._stopped = True
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        tick, self._tick_deferred = self._tick_deferred, None
        if tick is not None:
            tick.cancel()

    def _run_loop(self, interval: float, now: bool) -> None:
        loop = LoopingCall(self._tick)
        loop.clock = self._clock
        self._loop = loop
        loop.start(interval, now=now).addErrback(
            lambda f: _log.failure("poll loop of {agent} died", f, agent=self._http._base)
        )

    def _tick(self) -> Deferred:
        tick = Deferred.fromCoroutine(self.poll_once())
        self._tick_deferred = tick

        def done(result: object) -> None:
            if self._tick_deferred is tick:
                self._tick_deferred = None
            if isinstance(result, Failure) and not result.check(CancelledError):
                _log.failure("poll tick of {agent} failed", result, agent=self._http._base)

        tick.addBoth(done)
        return tick

    async def poll_once(self) -> None:
        """One pass over the agent's followed jobs."""
        jobs = list(self._target.poll_jobs())
        now = self._clock.seconds()
        failed = False
        unreachable: str | None = None
        wait: float | None = None
        for host_job, after_seq in jobs:
            if unreachable is not None:
                self._failing(host_job, unreachable, now)
                continue
            if wait is not None:
                continue  # rate limited: the rest of the pass waits for the next tick
            try:
                outcome = await self._http.fetch(host_job.agent_job_id, after_seq)
            except PollError as error:
                if self._stopped:
                    return
                failed = True
                if error.retry_after is not None:
                    wait = error.retry_after
                    _log.info(
                        "agent {agent} rate-limits polls; waiting {wait:g}s",
                        agent=self._http._base,
                        wait=wait,
                    )
                    continue
                _log.warn(
                    "poll of job {agent_job_id} on {agent} failed: {reason}",
                    agent_job_id=host_job.agent_job_id,
                    agent=self._http._base,
                    reason=str(error),
                )
                self._failing(host_job, str(error), now)
                if error.transport:
                    unreachable = str(error)
                continue
            if self._stopped:
                return
            self._failing_since.pop(host_job.row_id, None)
            if outcome.gone is not None:
                self._target.poll_give_up(host_job, outcome.gone)
            elif outcome.events:
                self._target.poll_events(host_job, outcome.events)
        followed = {host_job.row_id for host_job, _ in jobs}
        for row_id in list(self._failing_since):
            if row_id not in followed:
                del self._failing_since[row_id]
        self._reschedule(failed, wait)

    def _failing(self, host_job: HostJob, reason: str, now: float) -> None:
        since = self._failing_since.setdefault(host_job.row_id, now)
        if now - since >= self.deadline:
            del self._failing_since[host_job.row_id]
            self._target.poll_give_up(
                host_job,
                f"agent unreachable for {now - since:.0f}s (deadline {self.deadline:g}s): {reason}",
            )

    def _reschedule(self, failed: bool, wait: float | None = None) -> None:
        interval = min(self.max_interval, self.interval * 2) if failed else self.base_interval
        if wait is not None:
            interval = max(interval, wait)
        if interval != self.interval and self._loop is not None:
            self.interval = interval
            self._loop.stop()
            self._run_loop(interval, now=False)
        self.interval = interval


def make_agent_http_client(
    reactor: Any, tls_options_for: Callable[[str], Any], *, pool: Any = None
) -> Any:
    """A treq ``HTTPClient`` whose every HTTPS connection uses ``tls_options_for(host)`` (mTLS)."""
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool
    from twisted.web.iweb import IPolicyForHTTPS
    from zope.interface import implementer

    @implementer(IPolicyForHTTPS)
    class _AgentTlsPolicy:
        def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
            return tls_options_for(hostname.decode("ascii"))

    if pool is None:
        pool = HTTPConnectionPool(reactor, persistent=True)
    return HTTPClient(Agent(reactor, contextFactory=_AgentTlsPolicy(), pool=pool))
