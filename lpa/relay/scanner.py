"""The scan: which agents the relay must follow, from the running rows in PostgreSQL.

Every ``scan_interval`` (a ``LoopingCall`` on the injected clock)::

    store.running_host_jobs() ─▶ group by AgentAddress ─▶ keep the agents this relay owns
        ─▶ new agent      → make_link(address).start(rows)
        ─▶ known agent    → link.update(rows)
        ─▶ agent w/o rows → link.stop() (disconnect)

Which agents this relay owns comes from :mod:`lpa.relay.membership` through :meth:`set_owned`:
an agent no longer ours is disconnected at once (from memory: the database may be down, and
another relay may be taking it over); a newly owned one triggers a scan now, so that it is
followed from the ``relay_last_seq`` in the database rather than from an older scan.  Without
:meth:`set_owned` the scanner follows every agent.

New links start at most :data:`START_BATCH` per reactor turn: a relay that takes over thousands
of agents at once stays responsive (its heartbeats must go out on time) while it builds them.

A failing scan (database down) is logged and the loop goes on; the links keep what they have.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from lpa.relay.interfaces import AgentAddress, HostJob, IRelayStore

_log = Logger()

#: new links started per reactor turn
START_BATCH = 100


class Scanner:
    """Keeps one link per agent that has running rows; see the module docstring."""

    def __init__(
        self,
        store: IRelayStore,
        make_link: Callable[[AgentAddress], Any],
        *,
        clock: IReactorTime,
        interval: float,
    ) -> None:
        self._store = store
        self._make_link = make_link
        self._clock = clock
        self.interval = interval
        self.links: dict[AgentAddress, Any] = {}
        #: the agents this relay may follow; None: every agent (a relay on its own)
        self.owned: frozenset[AgentAddress] | None = None
        self._loop: LoopingCall | None = None
        self._stopping: list[Deferred[None]] = []
        self._scanning = False
        self._scan_again = False
        #: agents whose link waits for its turn to start
        self._to_start: dict[AgentAddress, list[HostJob]] = {}
        self._starting: Any = None

    def start(self) -> None:
        if self._loop is not None:
            return
        self._loop = LoopingCall(self.scan_once)
        self._loop.clock = self._clock
        self._loop.start(self.interval, now=True).addErrback(
            lambda failure: _log.failure("relay scan loop died", failure)
        )

    def stop_scanning(self) -> None:
        """Stop the loop and the starts still waiting (links stay up)."""
        starting, self._starting = self._starting, None
        if starting is not None and starting.active():
            starting.cancel()
        self._to_start = {}
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()

    def stop_links(self) -> Deferred[None]:
        """Stop every link (and wait for links being stopped by earlier scans)."""
        waits = [link.stop() for link in self.links.values()] + self._stopping
        self.links = {}
        return DeferredList(waits, consumeErrors=True).addCallback(lambda _: None)

    def set_owned(self, owned: frozenset[AgentAddress]) -> None:
        """Follow only ``owned`` from now on: drop the others now, scan for new ones now."""
        self.owned = owned
        for address in [a for a in self._to_start if a not in owned]:
            del self._to_start[address]
        for address, link in list(self.links.items()):
            if address not in owned:
                del self.links[address]
                _log.info(
                    "agent {agent} is not this relay's to follow now: disconnecting",
                    agent=f"{address.host}:{address.port}",
                )
                self._track_stop(link.stop())
        if self._loop is not None and any(address not in self.links for address in owned):
            Deferred.fromCoroutine(self.scan_once())

    async def scan_once(self) -> None:
        """One scan; failures are logged, never raised (the loop must go on).

        A scan asked for while one runs runs once more right after it.
        """
        if self._scanning:
            self._scan_again = True
            return
        self._scanning = True
        try:
            await self._scan()
            while self._scan_again and self._loop is not None:
                self._scan_again = False
                await self._scan()
        finally:
            self._scanning = False
            self._scan_again = False

    async def _scan(self) -> None:
        try:
            rows = await self._store.running_host_jobs()
        except Exception as error:
            _log.warn(
                "relay scan failed, keeping current links: {error}",
                error=f"{error.__class__.__name__}: {error}",
            )
            return
        if self._loop is None:
            return  # stopped while the query ran
        try:
            self._reconcile(rows)
        except Exception:
            _log.failure("relay scan could not reconcile links")

    def _reconcile(self, rows: list[HostJob]) -> None:
        by_agent: dict[AgentAddress, list[HostJob]] = {}
        for host_job in rows:
            if self.owned is None or host_job.agent in self.owned:
                by_agent.setdefault(host_job.agent, []).append(host_job)
        for address, link in list(self.links.items()):
            if address not in by_agent:
                del self.links[address]
                _log.info(
                    "agent {agent} has no running job: disconnecting",
                    agent=f"{address.host}:{address.port}",
                )
                self._track_stop(link.stop())
        for address in [a for a in self._to_start if a not in by_agent]:
            del self._to_start[address]
        for address, host_jobs in by_agent.items():
            link = self.links.get(address)
            if link is None:
                self._to_start[address] = host_jobs
            else:
                link.update(host_jobs)
        if self._starting is None:
            self._start_some()

    def _start_some(self) -> None:
        """Start up to START_BATCH waiting links; the rest in the next reactor turns."""
        self._starting = None
        for _ in range(min(START_BATCH, len(self._to_start))):
            address = next(iter(self._to_start))
            self._start_link(address, self._to_start.pop(address))
        if self._to_start and self._loop is not None:
            self._starting = self._clock.callLater(0, self._start_some)

    def _start_link(self, address: AgentAddress, host_jobs: list[HostJob]) -> None:
        """A new link; if it cannot start (e.g. certificate files gone), the next scan retries."""
        link = self._make_link(address)
        try:
            link.start(host_jobs)
        except Exception as error:
            _log.error(
                "cannot follow agent {agent}: {error}; retrying at the next scan",
                agent=f"{address.host}:{address.port}",
                error=f"{error.__class__.__name__}: {error}",
            )
            self._track_stop(link.stop())
            return
        self.links[address] = link

    def _track_stop(self, stopping: Deferred[None]) -> None:
        self._stopping.append(stopping)

        def done(result: object) -> None:
            self._stopping.remove(stopping)

        stopping.addBoth(done)
