"""Builds the relay daemon: store, membership, scanner, one link per agent; explicit stop order.

::

    RelayService.startService: [ops port] · membership.start() (heartbeats; it tells the
                               scanner which agents are ours) · store.start() (calls wait for
                               the pool) → scanner.start()
    RelayService.stopService:  [ops port closed: probes fail first] · stop heartbeats, stop
                               scanning → stop links (WebSocket close frames, pollers stopped,
                               queued events handed to the store) and, at the same time, leave
                               the membership (the other relays take our agents at once) →
                               store.stop() (applies or keeps what it was given) → close the
                               HTTP pool

``MultiService`` would stop children concurrently; the order above is what makes SIGTERM lose
nothing, so it is written out here.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.protocol import ReconnectingClientFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from lpa.relay.backoff import Backoff, HandshakeGate
from lpa.relay.config import RelayConfig
from lpa.relay.interfaces import AgentAddress, IRelayStore
from lpa.relay.jobs_http import AgentJobsHttp, make_agent_http_client
from lpa.relay.machine import AgentLink
from lpa.relay.membership import RelayMembership, default_relay_id
from lpa.relay.metered import MeteredStore, metered_dial
from lpa.relay.metrics import RelayMetrics
from lpa.relay.poller import AgentPoller
from lpa.relay.pressure import StoreGauge
from lpa.relay.scanner import Scanner
from lpa.relay.ws_client import WebSocketDialer

if TYPE_CHECKING:
    from lpa.relay.opsservice import OpsService  # imported when the ops port is wanted

_log = Logger()

#: one poll request (connect + TLS + answer) may take this long
POLL_REQUEST_TIMEOUT = 30.0


class RelayService(MultiService):
    """The relay: owns the scanner, its membership (if any) and the store unless injected."""

    def __init__(
        self,
        store: IRelayStore,
        scanner: Scanner,
        *,
        own_store: bool,
        membership: RelayMembership | None = None,
        on_stopped: Callable[[], Any] | None = None,
    ) -> None:
        super().__init__()
        self.store = store
        self.scanner = scanner
        self.membership = membership
        self._own_store = own_store
        self._on_stopped = on_stopped
        #: the relay's metrics (lpa.relay.metrics) and its ops port (lpa.relay.opsservice)
        self.metrics: RelayMetrics | None = None
        self.ops: OpsService | None = None

    def startService(self) -> None:
        super().startService()
        if self.ops is not None:
            self.ops.startService()
        if self.membership is not None:
            self.scanner.set_owned(frozenset())  # nothing is ours before the first heartbeat
            self.membership.start().addErrback(
                lambda failure: _log.failure("relay membership did not start", failure)
            )
        if not self._own_store:
            self._start_scanning()
            return
        # the first scan waits for the pool's first connection attempts (start never errbacks)
        starting = maybeDeferred(self.store.start)  # type: ignore[attr-defined,call-overload]
        starting.addErrback(lambda failure: _log.failure("relay store did not start", failure))
        starting.addCallback(lambda _: self._start_scanning())

    def _start_scanning(self) -> None:
        if not self.running:
            return
        self.scanner.start()
        if self.membership is None:
            _log.info(
                "lpa-relay started: scanning every {interval:g}s", interval=self.scanner.interval
            )
        else:
            _log.info(
                "lpa-relay started as relay {relay_id}: scanning every {interval:g}s, "
                "heartbeat every {heartbeat:g}s",
                relay_id=self.membership.relay_id,
                interval=self.scanner.interval,
                heartbeat=self.membership.interval,
            )

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        ops_stopped = maybeDeferred(self.ops.stopService) if self.ops is not None else None
        if self.membership is not None:
            self.membership.stop()
        self.scanner.stop_scanning()
        waits = [self.scanner.stop_links()]
        if self.membership is not None:
            waits.append(self.membership.leave())
        stopping = DeferredList(waits, consumeErrors=True)
        if ops_stopped is not None:
            stopping.addBoth(lambda result: ops_stopped.addBoth(lambda _: result))

        def stop_store(_: object) -> Any:
            if self._own_store:
                return self.store.stop()  # type: ignore[attr-defined]
            return None

        def cleanup(result: object) -> Any:
            if isinstance(result, Failure):
                _log.failure("relay stop failed", result)
            if self._on_stopped is not None:
                return maybeDeferred(self._on_stopped)
            return None

        stopping.addCallback(stop_store)
        stopping.addBoth(cleanup)
        return stopping.addCallback(lambda _: _log.info("lpa-relay stopped"))


def make_relay_service(
    config: RelayConfig,
    *,
    reactor: Any = None,
    clock: Any = None,
    store: IRelayStore | None = None,
    tls_options_for: Callable[[str], Any] | None = None,
    http_client: Any = None,
    dial: Callable[[AgentAddress, Any], Any] | None = None,
    jitter: Callable[[], float] = random.random,
    dial_jitter: float = ReconnectingClientFactory.jitter,
    backstop_interval: float | None = None,
    metrics: RelayMetrics | None = None,
    ops: bool = False,
    ops_connection_factory: Callable[[], Any] | None = None,
    ops_sample_interval: float = 15.0,
    membership_database: Any = None,
) -> RelayService:
    """The relay daemon for ``config``; every collaborator can be injected (tests, embedding).

    :param membership_database: the :class:`~lpa.relay.membership.IMembershipDatabase` of the
        relays sharing the fleet; default: the config's database when the store is ours, none
        (this relay follows every agent) when a store is injected without one.
    :param jitter: spreads the links' store retries and the membership's wake-ups.
    :param dial_jitter: ReconnectingClientFactory's relative jitter of WebSocket redials.

    :param tls_options_for: ``host -> IOpenSSLClientConnectionCreator``; default
        :class:`~lpa.relay.agent_tls.AgentTls` over the ``[security]`` files: one TLS context
        for every agent (ALPN http/1.1 only), rebuilt when a file changes, so rotated
        certificates are picked up.
    :param backstop_interval: how often a streaming link also sweeps its jobs over REST;
        default ``max(60, 6 * poll_interval)``.
    :param metrics: where the relay counts (a new registry of its own by default).
    :param ops: serve the ops port of ``config`` (status page, metrics, probes); the tap
        passes ``[ops] enabled``.
    :raises ConfigError: the certificate files cannot be loaded.
    """
    if backstop_interval is None:
        backstop_interval = max(60.0, 6 * config.poll_interval)
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    if clock is None:
        clock = reactor
    own_store = store is None
    missing_record = unreachable_record = None
    if store is None:
        from lpa.relay.missing_record import PostgresMissingRecord, PostgresUnreachableRecord
        from lpa.relay.store import PostgresRelayStore

        store = PostgresRelayStore(
            config.database_url,
            clock=clock,
            reactor=reactor,
            max_pending_events=config.max_pending_events,
        )
        missing_record = PostgresMissingRecord(config.database_url, reactor=reactor)
        unreachable_record = PostgresUnreachableRecord(config.database_url, reactor=reactor)
    if tls_options_for is None:
        from lpa.relay.agent_tls import AgentTls

        tls_options_for = AgentTls(
            ca_cert_path=config.ca_cert_path,
            cert_path=config.client_cert_path,
            key_path=config.client_key_path,
        ).for_host
        tls_options_for("localhost")  # fail at start-up, with one line, if the files are bad
    pool = None
    if http_client is None:
        from twisted.web.client import HTTPConnectionPool

        pool = HTTPConnectionPool(reactor, persistent=True)
        # a polling link reuses its connection every poll_interval; a streaming link's backstop
        # sweep (every backstop_interval, at least twice this) gets a fresh one rather than
        # keeping an idle TLS connection per followed agent in between
        pool.cachedConnectionTimeout = int(max(30.0, 3 * config.poll_interval))
        http_client = make_agent_http_client(reactor, tls_options_for, pool=pool)

    def make_backoff() -> Backoff:
        return Backoff(config.reconnect_initial_delay, config.reconnect_max_delay, jitter=jitter)

    if dial is None:
        dial = WebSocketDialer(
            reactor=reactor,
            clock=clock,
            tls_options_for=tls_options_for,
            gate=HandshakeGate(config.max_handshakes_in_flight),
            handshake_timeout=config.handshake_timeout,
            initial_delay=config.reconnect_initial_delay,
            max_delay=config.reconnect_max_delay,
            jitter=dial_jitter,
        )

    def make_poller(address: AgentAddress, target: Any, backstop: bool = False) -> AgentPoller:
        http = AgentJobsHttp(http_client, address, clock=clock, timeout=POLL_REQUEST_TIMEOUT)
        interval = backstop_interval if backstop else config.poll_interval
        return AgentPoller(
            http,
            target,
            clock=clock,
            interval=interval,
            max_interval=max(interval, config.reconnect_max_delay),
            deadline=config.unreachable_deadline,
            record=unreachable_record,
        )

    if metrics is None:
        metrics = RelayMetrics()
    # a store that reports its own transactions (rows, payload sizes) says so through
    # observe_transactions(callback); otherwise each answered call counts as one
    observe = getattr(store, "observe_transactions", None)
    if callable(observe):
        observe(metrics.committed)
    metered = MeteredStore(store, metrics, clock=clock, count_transactions=not callable(observe))
    # backpressure: past half the store's backlog, stop reading agents until a quarter is left
    link_store = StoreGauge(
        metered,
        high=max(2, config.max_pending_events // 2),
        low=max(1, config.max_pending_events // 4),
        pause=getattr(dial, "pause_reading", lambda: None),
        resume=getattr(dial, "resume_reading", lambda: None),
    )
    dial = metered_dial(dial, metrics)

    def make_link(address: AgentAddress) -> AgentLink:
        return AgentLink(
            address,
            store=link_store,
            clock=clock,
            dial=dial,
            make_poller=make_poller,
            make_backoff=make_backoff,
            max_queued_events=config.max_pending_events,
            missing_deadline=config.unreachable_deadline,
            missing_record=missing_record,
        )

    scanner = Scanner(store, make_link, clock=clock, interval=config.scan_interval)
    relay_id = config.relay_id or default_relay_id()
    if membership_database is None and own_store:
        from lpa.relay.membership_db import PostgresMembershipDatabase

        membership_database = PostgresMembershipDatabase(
            config.database_url,
            relay_id=relay_id,
            lease_ttl=config.lease_ttl,
            clock=clock,
            reactor=reactor,
        )
    membership = None
    if membership_database is not None:
        membership = RelayMembership(
            membership_database,
            clock=clock,
            relay_id=relay_id,
            heartbeat_interval=config.heartbeat_interval,
            lease_ttl=config.lease_ttl,
            on_change=scanner.set_owned,
            jitter=jitter,
        )
    service = RelayService(
        store,
        scanner,
        own_store=own_store,
        membership=membership,
        on_stopped=pool.closeCachedConnections if pool is not None else None,
    )
    service.metrics = metrics
    if ops:
        from lpa.relay.opsservice import make_ops_service

        service.ops = make_ops_service(
            config,
            reactor=reactor,
            clock=clock,
            metrics=metrics,
            links=lambda: scanner.links.values(),  # noqa: PLW0108  (stop replaces scanner.links)
            database_up=lambda: _ask(store, "database_up"),
            pool_stats=lambda: _ask(store, "pool_stats"),
            connection_factory=ops_connection_factory,
            sample_interval=ops_sample_interval,
        )
        if service.membership is not None:  # relays share the fleet: ready while it is current
            service.ops.readiness.add("membership", service.membership.readiness)
    return service


def _ask(store: Any, name: str) -> Any:
    """What the store says through an optional reporting method (None if it has none)."""
    method = getattr(store, name, None)
    return method() if callable(method) else None
