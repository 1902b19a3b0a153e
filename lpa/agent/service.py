"""Builds the lpa-agent daemon from an :class:`~lpa.agent.config.AgentConfig`.

::

    AgentService (MultiService)
      ├─ JobManager.start()      read the job store and the event log, resume or finalise the
      │                          jobs left running, run (state_dir/jobs/, state_dir/journal/,
      │                          state_dir/incarnation, state_dir/runs/: the jobs' commands)
      ├─ listener                one port: Klein REST API + WebSocket at /api/v1/ws/jobs and
      │                          /metrics, behind mutual TLS (tls.enabled) on
      │                          server.bind:server.port
      └─ [metrics port]          plain HTTP, /metrics only, metrics.local_bind:local_port

Stop order is explicit: stop accepting connections first, then let the job engine freeze
admission, checkpoint and close its event log, so no job changes after the last write.

What an operator sees at start: one line once the port is bound (version, address, port, TLS,
backend), or one line saying why the port could not be bound (:mod:`lpa.agent.listening`); a
warning when ``state_dir`` had to be made private (0700: it holds job logs); a configuration
error naming the key (``tls.server_cert: PATH: no such file``).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

import lpa
from lpa.agent.backends import make_backend
from lpa.agent.backends.base import Timeouts
from lpa.agent.cache import PatchCache
from lpa.agent.config import AgentConfig
from lpa.agent.detached import DetachedCommands
from lpa.agent.eventlog import EventLog
from lpa.agent.http.api import AgentApi, make_peer_check
from lpa.agent.http.ratelimit import RateLimiter
from lpa.agent.incarnation import FileIncarnations
from lpa.agent.jobs import JobManager
from lpa.agent.listening import (
    LISTEN_BACKLOG,
    address,
    listen_error,
    metrics_listener,
    ssl6_endpoint,
)
from lpa.agent.metrics import (
    AgentMetrics,
    MeteredRateLimiter,
    MeteredResource,
    metered_sessions,
    readiness_fields,
    route_matcher,
)
from lpa.agent.process import ProcessRunner
from lpa.agent.reload import RELOAD_INTERVAL_SECONDS, Reloader
from lpa.agent.store import LEGACY_FILENAME, JobFileStore
from lpa.agent.system import HostSystem
from lpa.agent.wal import ThreadRunner, WriteAheadLog
from lpa.agent.whitelist import IPWhitelist
from lpa.agent.ws import JobStreamFactory, make_ws_resource
from lpa.errors import ConfigError
from lpa.metricsweb import MetricsPage
from lpa.throttle import LogThrottle
from lpa.tls import (
    AGENT_KEYS,
    crl_health,
    identity_allowed,
    peer_identity,
    server_tls_options,
)

_log = Logger()



class AgentService(MultiService):
    """The agent: a job engine and one listener, started and stopped in a fixed order.

    :param describe: what the start-up line says besides the address (backend, TLS, version).
    :raises ListenError: from ``privilegedStartService``/``startService`` when the port cannot
        be bound (twistd's tap turns it into one log line and an exit status).
    """

    #: the agent's metrics (lpa.agent.metrics)
    metrics: AgentMetrics | None = None
    #: the plain-HTTP /metrics port (metrics.local_port), when configured
    metrics_listener: StreamServerEndpointService | None = None

    reloader: Reloader | None = None

    def __init__(
        self,
        jobs: JobManager,
        listener: StreamServerEndpointService,
        *,
        bind: str = "0.0.0.0",
        port: int = 0,
        describe: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.jobs = jobs
        self.listener = listener
        self._bind = bind
        self._port = port
        self._describe = describe or {}
        self._announced = False
        listener.setServiceParent(self)

    @contextmanager
    def _listening(self) -> Iterator[None]:
        try:
            yield
        except CannotListenError as error:
            raise listen_error(error, self._bind, self._port) from None
        waiting = self.listener._waitingForPort
        if waiting is not None and not self._announced:
            self._announced = True
            waiting.addCallback(self._announce)

    def privilegedStartService(self) -> None:
        with self._listening():
            super().privilegedStartService()

    def startService(self) -> None:
        # The engine loads and recovers synchronously; the listener then starts accepting.
        d = self.jobs.start()
        d.addErrback(lambda f: _log.failure("job engine failed to start", f))
        with self._listening():
            super().startService()

    def _announce(self, port: Any) -> Any:
        host = port.getHost()
        _log.info(
            "lpa-agent {version} listening on {address} (TLS {tls}; backend {backend})",
            address=address(self._bind, host.port),
            bind=self._bind,
            port=host.port,
            **self._describe,
        )
        return port

    def stopService(self) -> Deferred[Any]:
        self.running = 0
        d = ensureDeferred(self._stop_in_order())
        d.addErrback(lambda f: _log.failure("agent did not stop cleanly", f))
        return d

    async def _stop_in_order(self) -> None:
        # Timers first, then stop accepting, then let the engine freeze admission and persist.
        for child in list(self):
            if child is not self.listener and child.running:
                await maybeDeferred(child.stopService)
        if self.listener.running:
            await self.listener.stopService()
        await self.jobs.stop()


def _state_dir(config: AgentConfig) -> str:
    """The state directory, created or made private (0700): it holds every job's logs."""
    path = config.state_dir
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"state_dir: cannot create {path}: {error.strerror}") from None
    if not os.access(path, os.W_OK):
        raise ConfigError(f"state_dir: {path} is not writable")
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        try:
            os.chmod(path, 0o700)
        except OSError as error:
            raise ConfigError(
                f"state_dir: {path} has mode {mode:04o} and cannot be made private (0700): "
                f"{error.strerror}; it holds job logs: fix its owner or mode"
            ) from None
        _log.warn(
            "state_dir {path} had mode {old}; set it to 0700 because it holds job logs",
            path=path,
            old=f"{mode:04o}",
        )
    return path


def make_agent_service(
    config: AgentConfig,
    *,
    reactor: Any = None,
    backend: Any = None,
    system: Any = None,
    runner: Any = None,
    store: Any = None,
    journal: Any = None,
    commands: Any = None,
) -> AgentService:
    """Build the daemon; every collaborator may be injected, the reactor included.

    :raises ConfigError: a file, directory or value the configuration names is unusable.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    for warning in config.warnings:
        _log.warn("config {source}: {problem}", source=config.source, problem=warning)

    state_dir = _state_dir(config)
    runner = runner or ProcessRunner(reactor)
    system = system or HostSystem(runner, clock=reactor)
    if backend is None:
        timeouts = config.jobs.command_timeouts
        backend = make_backend(
            config.package_manager.backend,
            runner,
            timeouts=Timeouts(
                refresh=timeouts.refresh_secs,
                package=timeouts.package_secs,
                quick=timeouts.quick_secs,
            ),
            lock_timeout=config.jobs.lock_timeout_secs,
        )
    # The event log and the job store write and sync on threads of their own, off the reactor;
    # JobManager.stop() checkpoints and closes both before the process exits.
    store = store or JobFileStore(
        os.path.join(state_dir, "jobs"),
        legacy_path=os.path.join(state_dir, LEGACY_FILENAME),
        run_blocking=ThreadRunner(reactor, "lpa-job-store"),
    )
    journal = journal or WriteAheadLog(os.path.join(state_dir, "journal"), clock=reactor)
    # package-manager commands of jobs outlive the agent (a transient systemd unit each, or a
    # detached wrapper) and write into state_dir/runs/, where a restarted agent finds them
    commands = commands or DetachedCommands(reactor, os.path.join(state_dir, "runs"))
    events = EventLog(reactor, config.jobs.max_events_per_job)
    jobs = JobManager(
        backend=backend,
        system=system,
        runner=runner,
        store=store,
        clock=reactor,
        events=events,
        journal=journal,
        commands=commands,
        incarnations=FileIncarnations(os.path.join(state_dir, "incarnation")),
        max_concurrent=config.jobs.max_concurrent,
        max_queue_depth=config.jobs.max_queue_depth,
        job_timeout_seconds=config.jobs.timeout_minutes * 60,
        history_limit=config.jobs.history_limit,
        max_events_per_job=config.jobs.max_events_per_job,
    )

    metrics = AgentMetrics(reactor)
    metrics.follow(events, jobs)

    def crl() -> dict[str, Any]:
        if not config.tls.enabled:
            return {}
        return crl_health(config.tls.crl_path, config.tls.ca_cert, reactor.seconds())

    started: list[AgentService] = []

    def not_ready() -> list[str]:
        reasons = []
        if not started or not started[0].running:
            reasons.append("the agent is starting or stopping")
        if crl().get("crl_status") == "invalid":
            reasons.append("the CRL is unusable: every client certificate is refused")
        return reasons

    ws_resource = None
    if config.websocket.enabled:
        ws = config.websocket
        factory = JobStreamFactory(
            events,
            jobs,
            ping_interval=ws.ping_interval_secs,
            ping_timeout=ws.ping_timeout_secs,
            max_message_bytes=ws.max_message_bytes,
            max_subscriptions=ws.max_subscriptions,
            max_connections=ws.max_connections,
            send_buffer_events=ws.send_buffer_events,
        )
        metered_sessions(factory, metrics)
        ws_resource = make_ws_resource(factory)

    whitelist = IPWhitelist.from_file(config.whitelist.path) if config.whitelist.path else None
    peer_check = make_peer_check(
        whitelist,
        config.auth.allowed_clients,
        # IRequest does not name the transport twisted.web's Request has (None: no TLS peer)
        lambda request: peer_identity(getattr(request, "transport", None)),
        identity_allowed,
    )
    rl = config.rate_limit
    api = AgentApi(
        jobs=jobs,
        backend=backend,
        system=system,
        clock=reactor,
        version=lpa.__version__,
        rate_limiter=MeteredRateLimiter(
            RateLimiter(
                reactor,
                destructive_per_minute=rl.destructive_per_minute,
                destructive_burst=rl.destructive_burst,
                read_per_minute=rl.read_per_minute,
                read_burst=rl.read_burst,
                enabled=rl.enabled,
            ),
            metrics,
        ),
        peer_check=peer_check,
        ws_resource=ws_resource,
        max_body_bytes=config.api.max_body_bytes,
        health_extra=lambda: {**crl(), **readiness_fields(not_ready())},
        metrics_resource=MetricsPage(metrics.registry),
        cache=PatchCache(
            reactor,
            backend,
            stale_threshold_secs=config.cache.stale_threshold_secs,
            state_path=os.path.join(state_dir, "cache.json"),
        ),
    )
    # A body past api.max_body_bytes is refused, never buffered; a client has
    # server.timeout_seconds to send each request (and to finish the TLS handshake).
    site = api.site(
        timeout_seconds=config.server.timeout_seconds, throttle=LogThrottle(reactor)
    )
    site.resource = MeteredResource(site.resource, metrics, route_matcher(AgentApi.app.url_map))
    site.on_handshake_refused = metrics.handshake_refused
    site.on_request_refused = metrics.request_refused

    server = config.server
    if config.tls.enabled:
        tls = config.tls
        context = server_tls_options(
            ca_cert_path=tls.ca_cert,
            cert_path=tls.server_cert,
            key_path=tls.server_key,
            crl_path=tls.crl_path,
            min_tls_version=tls.min_tls_version,
            labels=AGENT_KEYS,
        )
        endpoint: Any
        if ":" in server.bind:
            endpoint = ssl6_endpoint(reactor, server.port, context, server.bind)
        else:
            endpoint = SSL4ServerEndpoint(
                reactor, server.port, context, backlog=LISTEN_BACKLOG, interface=server.bind
            )
    else:
        # lpa.agent.config already warned that this is INSECURE.
        context = None
        endpoint_class = TCP6ServerEndpoint if ":" in server.bind else TCP4ServerEndpoint
        endpoint = endpoint_class(
            reactor, server.port, backlog=LISTEN_BACKLOG, interface=server.bind
        )
    listener = StreamServerEndpointService(endpoint, site)
    listener._raiseSynchronously = True
    if config.tls.enabled:
        tls_words = f"on, client certificates required, minimum {config.tls.min_tls_version}"
    else:
        tls_words = "OFF: plain HTTP, no client authentication"
    agent = AgentService(
        jobs,
        listener,
        bind=server.bind,
        port=server.port,
        describe={
            "version": lpa.__version__,
            "tls": tls_words,
            "backend": str(getattr(backend, "name", type(backend).__name__)),
        },
    )
    started.append(agent)
    agent.metrics = metrics
    metrics.watch(
        job_timeout_seconds=config.jobs.timeout_minutes * 60,
        ready=not_ready,
        crl=crl if config.tls.enabled else None,
        info={"version": lpa.__version__, "backend": str(getattr(backend, "name", "unknown"))},
    )
    if config.metrics.local_port:
        agent.metrics_listener = metrics_listener(reactor, config, metrics)
        agent.metrics_listener.setServiceParent(agent)
    reloader = Reloader(context, whitelist, config.whitelist.path)
    agent.reloader = reloader
    TimerService(RELOAD_INTERVAL_SECONDS, reloader.reload).setServiceParent(agent)
    return agent
