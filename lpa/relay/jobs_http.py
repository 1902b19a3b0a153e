"""The REST reads a poller makes of one agent, and what each answer means for the relay.

::

    GET /api/v1/jobs/{id}/events?after=N        lpa agents
      200 data.events                → the events (data.incarnation when the agent sends one)
      200 no events, but data.last_seq < N, or data.terminal
                                     → the agent ended or numbers below our cursor (an agent
                                       that lost or renumbered events): GET /jobs/{id} → snapshot
      409 EVENTS_AHEAD               → N is above the job's last seq: error.details.job is the
                                       snapshot, at error.details.last_seq
      410 EVENTS_EXPIRED             → the job detail in error.details, applied as a snapshot
      404 JOB_NOT_FOUND              → the agent does not know the job
      405 / other 404                → the agent lacks the path (the original): remember, and
    GET /api/v1/jobs/{id}                        → one KIND_SNAPSHOT event; 404 → not known

Every failure is a :class:`PollError` whose message is one sentence naming the agent
(``host:port``), the request and the cause in plain words (never a ``Failure`` repr).
The HTTP client is an injected treq ``HTTPClient``; production builds it over an ``Agent`` whose
TLS policy returns :func:`lpa.tls.client_tls_options` (see :func:`make_agent_http_client`).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping

import attr
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from lpa.events import KIND_SNAPSHOT, JobEvent, normalise_status
from lpa.relay.interfaces import AgentAddress
from lpa.relay.reasons import describe_error

_log = Logger()

#: bodies larger than this are refused (an agent keeps at most a bounded event window)
MAX_BODY_BYTES = 16 * 1024 * 1024

JOBS_PATH = "/api/v1/jobs"


class PollError(Exception):
    """One poll request failed; ``transport`` is True when the agent could not be reached.

    ``retry_after`` (seconds) is set when the agent rate-limited us (429): that is an agent
    that answers, so it never counts toward the unreachable deadline.  ``cause`` is the reason
    alone, in plain words ("connection refused"), for sentences built around it.
    """

    def __init__(
        self,
        message: str,
        *,
        transport: bool = False,
        retry_after: float | None = None,
        cause: str | None = None,
    ) -> None:
        super().__init__(message)
        self.transport = transport
        self.retry_after = retry_after
        self.cause = cause or message


@attr.s(frozen=True, slots=True, auto_attribs=True)
class PollOutcome:
    """What one poll of one job found.

    ``events`` to apply (possibly none: the agent knows the job and has nothing new), or
    ``gone``: the agent said it does not know the job (the reason, one sentence).
    ``incarnation``: the agent's incarnation when its answer carried one.
    """

    events: tuple[JobEvent, ...] = ()
    gone: str | None = None
    incarnation: str | None = None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def incarnation_of(document: Any) -> str | None:
    """The ``incarnation`` member of a frame or answer, when it is a non-empty string."""
    if isinstance(document, Mapping):
        value = document.get("incarnation")
        if isinstance(value, str) and value:
            return value
    return None


def snapshot_event(agent_job_id: str, detail: Mapping[str, Any], seq: Any = None) -> JobEvent:
    """A job detail (``GET /jobs/{id}``, a 409/410's details, a ``resync``) as a snapshot event.

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
    if _int(seq) is None or seq < 1:
        seq = None
    progress = _int(detail.get("progress", 0)) or 0
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


def _error(body: Any) -> Mapping[str, Any]:
    if isinstance(body, Mapping) and isinstance(body.get("error"), Mapping):
        return body["error"]
    return {}


def _error_code(body: Any) -> str | None:
    code = _error(body).get("code")
    return code if isinstance(code, str) else None


def _data(body: Any) -> Mapping[str, Any] | None:
    if isinstance(body, Mapping) and isinstance(body.get("data"), Mapping):
        return body["data"]
    return None


class _JobGone(Exception):
    """The agent does not know the job (the message is the sentence saying so)."""


class AgentJobsHttp:
    """The REST reads a poller needs from one agent, over an injected treq client."""

    def __init__(
        self, client: Any, address: AgentAddress, *, clock: IReactorTime, timeout: float
    ) -> None:
        self._client = client
        self.label = f"{address.host}:{address.port}"
        self._origin = f"https://{address.host}:{address.port}"
        self._timeout = timeout
        self._clock = clock
        #: None until known; False once the agent answered the events path with 405/404
        self.has_events_endpoint: bool | None = None

    def _refused(self, request: str, cause: str, **kwargs: Any) -> PollError:
        return PollError(
            f"agent {self.label} answered {request} with {cause}", cause=cause, **kwargs
        )

    async def _get(self, path: str) -> tuple[int, Any]:
        request_text = f"GET {path}"

        async def request() -> tuple[int, bytes, Any]:
            response = await self._client.get(self._origin + path)
            return response.code, await response.content(), response.headers

        try:
            code, raw, headers = await Deferred.fromCoroutine(request()).addTimeout(
                self._timeout, self._clock
            )
        except CancelledError:
            raise  # the poller was stopped
        except TimeoutError:
            cause = f"no answer within {self._timeout:g}s"
            raise PollError(
                f"agent {self.label} did not answer {request_text}: {cause}",
                transport=True,
                cause=cause,
            ) from None
        except Exception as error:  # connection refused, TLS failure, reset …
            cause = describe_error(error)
            raise PollError(
                f"agent {self.label} did not answer {request_text}: {cause}",
                transport=True,
                cause=cause,
            ) from None
        if code == 429:
            raise self._refused(
                request_text, "429 (rate limited)", retry_after=_retry_after(headers)
            )
        if len(raw) > MAX_BODY_BYTES:
            raise self._refused(request_text, f"a body of {len(raw)} bytes, too large to read")
        body: Any = None
        if raw.strip():
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
        return code, body

    def _snapshot(self, request: str, agent_job_id: str, detail: Any, seq: Any = None) -> JobEvent:
        try:
            return snapshot_event(agent_job_id, detail, seq)
        except ValueError as error:
            raise self._refused(request, f"an unreadable job detail ({error})") from None

    async def fetch(self, agent_job_id: str, after_seq: int) -> PollOutcome:
        """New events of ``agent_job_id`` after ``after_seq`` (or a snapshot); raises PollError."""
        try:
            return await self._fetch(agent_job_id, after_seq)
        except _JobGone as gone:
            return PollOutcome(gone=str(gone))

    async def _fetch(self, agent_job_id: str, after_seq: int) -> PollOutcome:
        if self.has_events_endpoint is not False:
            path = f"{JOBS_PATH}/{agent_job_id}/events?after={after_seq}"
            request = f"GET {path}"
            code, body = await self._get(path)
            error_code = _error_code(body)
            details = _error(body).get("details")
            data = _data(body)
            if code == 200 and data is not None:
                self.has_events_endpoint = True
                incarnation = incarnation_of(data)
                events = self._events(agent_job_id, data.get("events"), request)
                last_seq = _int(data.get("last_seq"))
                below = last_seq is not None and last_seq < after_seq
                if not events and (below or data.get("terminal") is True):
                    # the job ended at or below our cursor, or the agent numbers below it (one
                    # that lost or renumbered events and does not say 409): its detail is final
                    snapshot = await self._detail(agent_job_id, last_seq if below else None)
                    return PollOutcome(events=(snapshot,), incarnation=incarnation)
                return PollOutcome(events=events, incarnation=incarnation)
            if code == 409 and error_code == "EVENTS_AHEAD" and isinstance(details, Mapping):
                self.has_events_endpoint = True
                snapshot = self._snapshot(
                    request, agent_job_id, details.get("job"), details.get("last_seq")
                )
                return PollOutcome(events=(snapshot,), incarnation=incarnation_of(details))
            if code == 410 and error_code == "EVENTS_EXPIRED":
                self.has_events_endpoint = True
                snapshot = self._snapshot(request, agent_job_id, details)
                return PollOutcome(events=(snapshot,), incarnation=incarnation_of(details))
            if error_code == "JOB_NOT_FOUND":
                raise _JobGone(f"agent {self.label} does not know job {agent_job_id}")
            if code not in (404, 405):
                raise self._refused(request, f"HTTP {code} {error_code or ''}".rstrip())
            self.has_events_endpoint = False
            _log.info(
                "agent {agent} has no events endpoint (HTTP {code}): polling job details",
                agent=self.label,
                code=code,
            )
        return PollOutcome(events=(await self._detail(agent_job_id),))

    async def _detail(self, agent_job_id: str, seq: int | None = None) -> JobEvent:
        """``GET /jobs/{id}`` as a snapshot (at ``seq`` when given); raises _JobGone on 404."""
        path = f"{JOBS_PATH}/{agent_job_id}"
        request = f"GET {path}"
        code, body = await self._get(path)
        data = _data(body)
        if code == 404:
            raise _JobGone(f"agent {self.label} does not know job {agent_job_id}")
        if code != 200 or data is None:
            raise self._refused(request, f"HTTP {code} {_error_code(body) or ''}".rstrip())
        return self._snapshot(request, agent_job_id, data, seq)

    def _events(self, agent_job_id: str, wires: Any, request: str) -> tuple[JobEvent, ...]:
        if not isinstance(wires, list):
            raise self._refused(request, "an answer without a data.events list")
        events = []
        for wire in wires:
            try:
                event = JobEvent.from_wire(wire)
            except ValueError as error:
                _log.warn(
                    "agent {agent} sent a bad event: {error}", agent=self.label, error=str(error)
                )
                continue
            if event.job_id == agent_job_id:
                events.append(event)
        return tuple(sorted(events, key=lambda e: e.seq or 0))


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
