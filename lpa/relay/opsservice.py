"""Builds the relay's ops port (:mod:`lpa.relay.ops`) and the feed behind it.

::

    OpsService.startService: feed.start() (connect, LISTEN; retries in the background)
                             → listen on [ops] bind:port (plain HTTP, or mTLS)
    OpsService.stopService:  end every event stream → stop listening → feed.stop()

A port that cannot be opened (taken, not permitted) is one error line and the relay goes on
relaying: the ops port reports on the relay, it is not what the relay is for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client.metrics_core import Metric
from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from lpa.metricsweb import gauge
from lpa.relay.feed import JobUpdateFeed
from lpa.relay.metrics import RelayMetrics
from lpa.relay.ops import OpsRoot, Readiness, make_ops_site, ops_endpoint_description

_log = Logger()


class OpsService(Service):
    """The ops listener and its feed, started and stopped in the order above."""

    def __init__(
        self,
        *,
        feed: JobUpdateFeed,
        root: OpsRoot,
        endpoint: Any,
        where: str,
        scheme: str,
        readiness: Readiness,
    ) -> None:
        self.feed = feed
        self.root = root
        self.readiness = readiness
        self._endpoint = endpoint
        self._where = where
        self._scheme = scheme
        self.port: Any = None
        #: fires with the listening port (or None when it could not listen)
        self.listening: Deferred[Any] = Deferred()

    @property
    def url(self) -> str | None:
        """``http://127.0.0.1:PORT/`` once listening."""
        if self.port is None:
            return None
        address = self.port.getHost()
        host = f"[{address.host}]" if ":" in address.host else address.host
        return f"{self._scheme}://{host}:{address.port}/"

    def startService(self) -> None:
        super().startService()
        self.feed.start().addErrback(lambda f: _log.failure("ops feed did not start", f))
        listening = self._endpoint.listen(make_ops_site(self.root))
        listening.addCallbacks(self._listening, self._cannot_listen)

    def _listening(self, port: Any) -> None:
        self.port = port
        if not self.running:
            port.stopListening()
            self.port = None
        else:
            _log.info("ops port: status page, /metrics, /healthz and /readyz on {url}",
                      url=self.url)
        self.listening.callback(self.port)

    def _cannot_listen(self, failure: Failure) -> None:
        _log.error(
            "ops port {where} cannot listen ({reason}); the relay goes on without its status "
            "page, metrics and probes: set [ops] port to a free port or [ops] enabled = false",
            where=self._where,
            reason=failure.getErrorMessage(),
        )
        self.listening.callback(None)

    def stopService(self) -> Deferred[object]:
        super().stopService()
        self.root.events.close_all()
        port, self.port = self.port, None
        stopping = maybeDeferred(port.stopListening) if port is not None else succeed(None)

        def stop_feed(result: object) -> object:
            self.feed.stop()
            return result

        return stopping.addBoth(stop_feed)


def _tls_endpoint(reactor: Any, port: int, bind: str, options: Any) -> Any:
    from twisted.internet.interfaces import IStreamServerEndpoint
    from twisted.protocols.tls import TLSMemoryBIOFactory
    from zope.interface import implementer

    tcp_class = TCP6ServerEndpoint if ":" in bind else TCP4ServerEndpoint
    tcp = tcp_class(reactor, port, interface=bind)

    @implementer(IStreamServerEndpoint)
    class _TLS:
        def listen(self, factory: Any) -> Deferred[Any]:
            listening: Deferred[Any] = tcp.listen(TLSMemoryBIOFactory(options, False, factory))
            return listening

    return _TLS()


def make_ops_service(
    config: Any,
    *,
    reactor: Any,
    clock: Any,
    metrics: RelayMetrics,
    links: Callable[[], Iterable[Any]],
    database_up: Callable[[], bool | None],
    pool_stats: Callable[[], dict[str, int] | None],
    connection_factory: Callable[[], Any] | None = None,
    sample_interval: float = 15.0,
) -> OpsService:
    """The ops port of ``config`` (a :class:`~lpa.relay.config.RelayConfig`).

    :param links: the scanner's current links (for the agents gauge).
    :param database_up: whether the store has a live connection (None: it cannot say, the
        feed's own connection is asked instead).
    :param pool_stats: the store's pool figures (see :meth:`RelayMetrics.watch_pool`).
    :raises ConfigError: ``[ops]`` TLS files that are missing or do not parse.
    """
    if connection_factory is None:
        from lpa.relay.store import default_connection_factory

        connection_factory = default_connection_factory(reactor, clock)
    feed = JobUpdateFeed(
        config.database_url,
        clock=clock,
        connection_factory=connection_factory,
        sample_interval=sample_interval,
        on_notification=metrics.listen_notifications.inc,
        on_reconnect=metrics.listen_reconnects.inc,
    )

    def database() -> str | None:
        up = database_up()
        if up is None:
            up = feed.listening
        return None if up else "no database connection"

    readiness = Readiness([("database", database)])
    root = OpsRoot(feed=feed, readiness=readiness, registry=metrics.registry, clock=clock)

    def read() -> Iterable[Metric]:
        yield gauge("lpa_relay_ready", "1 when /readyz answers 200", int(readiness.ready))
        yield gauge("lpa_relay_notification_queue_usage",
                    "pg_notification_queue_usage(): fraction of the NOTIFY queue in use",
                    feed.queue_usage)
        yield gauge("lpa_relay_running_rows", "patch_job_hosts rows in running (database-wide)",
                    feed.running_rows)
        yield gauge("lpa_relay_oldest_running_row_seconds",
                    "Age of the oldest running patch_job_hosts row (since started_at)",
                    feed.oldest_running_seconds)
        yield gauge("lpa_relay_status_stream_clients", "Browsers following the status page",
                    root.events.client_count)

    metrics.watch_links(links)
    metrics.watch_pool(pool_stats)
    metrics.watch("ops", read)
    service = OpsService(
        feed=feed,
        root=root,
        endpoint=_endpoint(config, reactor),
        where=ops_endpoint_description(config.ops_bind, config.ops_port),
        scheme="https" if config.ops_tls_cert_path else "http",
        readiness=readiness,
    )
    return service


def _endpoint(config: Any, reactor: Any) -> Any:
    if config.ops_tls_cert_path:
        from lpa.tls import server_tls_options

        options = server_tls_options(
            ca_cert_path=config.ops_client_ca_path or config.ca_cert_path,
            cert_path=config.ops_tls_cert_path,
            key_path=config.ops_tls_key_path,
            crl_path=None,
            min_tls_version="1.2",
        )
        return _tls_endpoint(reactor, config.ops_port, config.ops_bind, options)
    endpoint_class = TCP6ServerEndpoint if ":" in config.ops_bind else TCP4ServerEndpoint
    return endpoint_class(reactor, config.ops_port, interface=config.ops_bind)
