"""The REST reads a poller makes of one agent: one pass over a job, with the follower's rules.

:meth:`AgentJobsHttp.fetch` makes a :class:`~lpa.follower.JobFollower` of its own, starting at
the seq to poll after, and does what it says (:mod:`lpa.follower` holds what each answer
means: 200 pages, a page numbered below the cursor, 409 EVENTS_AHEAD, 410 EVENTS_EXPIRED,
JOB_NOT_FOUND, the original agent's 404/405 and ``GET /jobs/{id}``)::

    fetch(job, after=N) ─▶ GET follower.poll_path() ─▶ follower.receive_answer(answer)
          again (another endpoint at once: at most 3 requests) ─┘
      ─▶ PollOutcome(events, incarnation)   or PollOutcome(gone=…): the agent forgot the job
      ─▶ PollError: no usable answer (unreachable, 429 with Retry-After, an answer the
         follower cannot use)

The link's own follower then takes the outcome (``JobFollower.receive_polled``).  An agent that
answered the events path with 404/405 is remembered (:attr:`AgentJobsHttp.has_events_endpoint`):
its next passes start with the job's detail.

Every failure is a :class:`PollError` whose message is one sentence naming the agent
(``host:port``), the request and the cause in plain words (never a ``Failure`` repr).
The HTTP client is an injected treq ``HTTPClient``; production builds it over an ``Agent`` whose
TLS policy returns :func:`lpa.tls.client_tls_options` (see :func:`make_agent_http_client`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from lpa.events import JobEvent
from lpa.follower import DETAIL, JobFollower, PollOutcome
from lpa.protocol import Answer, parse_answer
from lpa.relay.interfaces import AgentAddress
from lpa.relay.reasons import describe_error

_log = Logger()

#: bodies larger than this are refused (an agent keeps at most a bounded event window)
MAX_BODY_BYTES = 16 * 1024 * 1024

#: requests one pass may make for one job (events, then the job's detail)
MAX_REQUESTS = 3


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


def _retry_after(headers: Any) -> float:
    """Seconds from a ``Retry-After`` header (1 when absent or unreadable)."""
    try:
        values = headers.getRawHeaders(b"retry-after") or []
        return max(1.0, float(values[0]))
    except (AttributeError, IndexError, TypeError, ValueError):
        return 1.0


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

    async def _get(self, path: str) -> Answer:
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
        except Exception as error:  # refused, TLS failure, reset …: any failure is a poll error
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
        return parse_answer(code, raw)

    async def fetch(self, agent_job_id: str, after_seq: int) -> PollOutcome:
        """New events of ``agent_job_id`` after ``after_seq`` (or a snapshot); raises PollError."""
        follower = JobFollower(
            agent_job_id, after_seq, events_endpoint=self.has_events_endpoint is not False
        )
        events: list[JobEvent] = []
        for _ in range(MAX_REQUESTS):
            path, on_events = follower.poll_path(), follower.polls_events
            answer = await self._get(path)
            step = follower.receive_answer(answer)
            for rejected in step.rejected:
                _log.warn("agent {agent} sent a bad event: {error}", agent=self.label,
                          error=rejected)
            if on_events:
                self._learn_endpoint(follower, answer)
            if follower.gone is not None:
                return PollOutcome(
                    gone=f"agent {self.label} does not know job {agent_job_id}",
                    incarnation=follower.seq.incarnation,
                )
            if step.problem is not None:
                raise PollError(f"agent {self.label} answered {step.problem}", cause=step.problem)
            events.extend(step.events)
            if not step.again:
                break
        return PollOutcome(events=tuple(events), incarnation=follower.seq.incarnation)

    def _learn_endpoint(self, follower: JobFollower, answer: Answer) -> None:
        """Remember whether the agent serves the events endpoint (an original agent does not)."""
        if follower.source == DETAIL:
            if self.has_events_endpoint is not False:
                _log.info(
                    "agent {agent} has no events endpoint (HTTP {code}): polling job details",
                    agent=self.label,
                    code=answer.status,
                )
            self.has_events_endpoint = False
        elif answer.ok or answer.status in (409, 410):
            self.has_events_endpoint = True


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
