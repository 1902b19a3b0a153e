"""One patch job through agent → relay → PostgreSQL, held running until the test lets it end.

For the tests of what operators see (metrics, the status page): a real agent service on mTLS
with a scripted backend whose dry run waits on a gate, a real relay with its ops port, and a
throwaway database.  Everything is stopped at the test's cleanup::

    pipeline = await Pipeline.start(self)             # agent, relay (ops port 0), database
    job = await pipeline.dispatch()                   # a dry-run patch job on the agent,
                                                      # its patch_jobs and host rows running
    await pipeline.until(lambda: ..., "what")         # poll a condition (never sleeps blindly)
    pipeline.release(job)                             # the backend finishes the dry run
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from typing import Any

import attr
import treq
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from lpa.agent.config import parse_agent_config
from lpa.agent.model import JobOutcome
from lpa.agent.service import make_agent_service
from lpa.relay.config import RelayConfig
from lpa.relay.service import make_relay_service
from tests import pg
from tests.agentclient import mtls_client
from tests.certs import make_test_pki
from tests.fakes import FakeBackend, FakeSystem
from tests.loopback import port_number, started_port
from tests.pgutil import Seeder


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def until(predicate: Callable[[], Any], what: str, timeout: float = 30.0) -> None:
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await deferLater(reactor, 0.05, lambda: None)


@attr.s(auto_attribs=True, kw_only=True)
class Dispatched:
    agent_job_id: str
    job_id: str  # patch_jobs.id
    row_id: str


class Pipeline:
    """The running parts; see the module docstring."""

    def __init__(self, test: TestCase, dsn: str) -> None:
        self.test = test
        self.dsn = dsn
        self.seeder = Seeder(dsn)
        test.addCleanup(self.seeder.close)
        self.tmp = tempfile.mkdtemp(prefix="lpa-pipeline-")
        test.addCleanup(shutil.rmtree, self.tmp, True)
        self.pki = make_test_pki(os.path.join(self.tmp, "pki"))
        self.backend = FakeBackend()
        self.backend.script(
            "patch_apply",
            progress=[(10, "Reading package lists"), (40, "Simulating the upgrade")],
            lock_holder="unattended-upgr (pid 4242)",
            gate=True,
            outcome=JobOutcome(message="Dry run: 2 packages would be upgraded",
                               changes=({"name": "zip", "from": "3.0-12", "to": "3.0-13",
                                         "action": "upgrade"},)),
        )
        self.agent: Any = None
        self.relay: Any = None
        self.agent_port = 0
        self.metrics_port = free_port()
        self.client, pool = mtls_client(self.pki.client_options("good"))
        test.addCleanup(pool.closeCachedConnections)

    @classmethod
    async def start(cls, test: TestCase, *, scan_interval: float = 0.2) -> Pipeline:
        pipeline = cls(test, pg.database(test, migrated=True))
        await pipeline._start_agent()
        await pipeline._start_relay(scan_interval)
        return pipeline

    async def _start_agent(self) -> None:
        text = (
            "server:\n  bind: 127.0.0.1\n  port: 0\n"
            f"tls:\n  ca_cert: {self.pki.ca_cert}\n  server_cert: {self.pki.server_cert}\n"
            f"  server_key: {self.pki.server_key}\n  crl_path: {self.pki.crl}\n"
            f"state_dir: {os.path.join(self.tmp, 'agent')}\n"
            f"metrics:\n  local_port: {self.metrics_port}\n"
        )
        self.agent = make_agent_service(parse_agent_config(text, "agent.yaml"), reactor=reactor,
                                        backend=self.backend, system=FakeSystem())
        self.agent.startService()
        port = await started_port(self.agent.listener)
        self.agent_port = port_number(port)
        self.test.addCleanup(
            lambda: defer.ensureDeferred(self.agent.stopService()) if self.agent.running else None
        )

    async def _start_relay(self, scan_interval: float) -> None:
        config = RelayConfig(
            database_url=self.dsn,
            scan_interval=scan_interval,
            poll_interval=0.5,
            reconnect_initial_delay=0.2,
            reconnect_max_delay=1.0,
            client_cert_path=self.pki.good.cert,
            client_key_path=self.pki.good.key,
            ca_cert_path=self.pki.ca_cert,
            ops_port=0,
        )
        self.relay = make_relay_service(config, reactor=reactor, ops=True,
                                        ops_sample_interval=0.2)
        self.relay.startService()

        async def stop() -> None:
            if self.relay.running:
                await self.relay.stopService()
            await deferLater(reactor, 0.1, lambda: None)  # let closing connections finish

        self.test.addCleanup(lambda: defer.ensureDeferred(stop()))
        await self.relay.ops.listening
        await until(lambda: self.relay.ops.feed.listening, "ops feed listening")

    @property
    def ops_url(self) -> str:
        url: str = self.relay.ops.url
        return url

    @property
    def agent_url(self) -> str:
        return f"https://localhost:{self.agent_port}"

    async def dispatch(self) -> Dispatched:
        """A dry-run patch job on the agent, followed by the relay through its rows."""
        response = await self.client.post(f"{self.agent_url}/api/v1/patches/apply",
                                          json={"dry_run": True})
        body = json.loads(await response.content())
        assert response.code == 202, body
        agent_job_id = body["data"]["job_id"]
        job_id = self.seeder.job("running")
        host_id = self.seeder.host("localhost", "127.0.0.1", self.agent_port)
        row = self.seeder.host_job(job_id, host_id, agent_job_id)
        self.seeder.execute("UPDATE patch_job_hosts SET started_at = now() WHERE id = %s",
                            (row.row_id,))
        return Dispatched(agent_job_id=agent_job_id, job_id=job_id, row_id=row.row_id)

    def release(self, job: Dispatched) -> None:
        """The backend's dry run ends (it succeeds)."""
        self.backend.gates.setdefault(job.agent_job_id, defer.Deferred()).callback(None)

    async def until(self, predicate: Callable[[], Any], what: str, timeout: float = 30.0) -> None:
        await until(predicate, what, timeout)

    async def get(self, url: str, *, mtls: bool = False) -> tuple[int, bytes]:
        """GET ``url`` (over the test client's mTLS when ``mtls``)."""
        if mtls:
            response = await self.client.get(url)
        else:
            response = await treq.get(url, persistent=False)
        return response.code, await response.content()
