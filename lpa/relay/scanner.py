"""The scan: which agents the relay must follow, from the running rows in PostgreSQL.

Every ``scan_interval`` (a ``LoopingCall`` on the injected clock)::

    store.running_host_jobs() ─▶ group by AgentAddress
        ─▶ new agent      → make_link(address).start(rows)
        ─▶ known agent    → link.update(rows)
        ─▶ agent w/o rows → link.stop() (disconnect)

A failing scan (database down) is logged and the loop goes on; the links keep what they have.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from lpa.relay.interfaces import AgentAddress, HostJob, IRelayStore

_log = Logger()


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
        self._loop: LoopingCall | None = None
        self._stopping: list[Deferred] = []

    def start(self) -> None:
        if self._loop is not None:
            return
        self._loop = LoopingCall(self.scan_once)
        self._loop.clock = self._clock
        self._loop.start(self.interval, now=True).addErrback(
            lambda failure: _log.failure("relay scan loop died", failure)
        )

    def stop_scanning(self) -> None:
        """Stop the loop (links stay up)."""
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()

    def stop_links(self) -> Deferred:
        """Stop every link (and wait for links being stopped by earlier scans)."""
        waits = [link.stop() for link in self.links.values()] + self._stopping
        self.links = {}
        return DeferredList(waits, consumeErrors=True).addCallback(lambda _: None)

    async def scan_once(self) -> None:
        """One scan; failures are logged, never raised (the loop must go on)."""
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
            by_agent.setdefault(host_job.agent, []).append(host_job)
        for address, link in list(self.links.items()):
            if address not in by_agent:
                del self.links[address]
                _log.info(
                    "agent {agent} has no running job: disconnecting",
                    agent=f"{address.host}:{address.port}",
                )
                self._track_stop(link.stop())
        for address, host_jobs in by_agent.items():
            link = self.links.get(address)
            if link is None:
                self._start_link(address, host_jobs)
            else:
                link.update(host_jobs)

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

    def _track_stop(self, stopping: Deferred) -> None:
        self._stopping.append(stopping)

        def done(result: object) -> None:
            self._stopping.remove(stopping)

        stopping.addBoth(done)
