"""The lpa-agent daemon as an operator runs it: real mTLS listener, real engine.

These are the agent's acceptance checks, on loopback: health over mTLS, a dry-run patch apply
that ends ``completed`` (over this machine's apt: tests/system/test_backend_apt_live.py), a
name with shell metacharacters refused, clients refused at the handshake, history kept across a
restart (a bad configuration stopping twistd with one line: tests/system/test_twistd.py).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import ResponseNeverReceived

from lpa.agent.config import parse_agent_config
from lpa.agent.service import make_agent_service
from lpa.events import COMPLETED, EVENT_JOB_COMPLETE
from tests.agentclient import mtls_client
from tests.certs import make_test_pki
from tests.fakes import FakeBackend, FakeSystem
from tests.loopback import port_number, started_port


def _config_text(
    pki: Any,
    state_dir: str,
    extra: str = "",
    *,
    port: int = 0,
    timeout_seconds: int | None = None,
    **files: str,
) -> str:
    """An agent config on 127.0.0.1 over the test PKI; ``files`` replace tls.* paths."""
    tls = {
        "ca_cert": pki.ca_cert,
        "server_cert": pki.server_cert,
        "server_key": pki.server_key,
        "crl_path": pki.crl,
        **files,
    }
    timeout = f"  timeout_seconds: {timeout_seconds}\n" if timeout_seconds else ""
    return (
        f"server:\n  bind: 127.0.0.1\n  port: {port}\n{timeout}"
        "tls:\n" + "".join(f"  {key}: {value}\n" for key, value in tls.items())
        + f"state_dir: {state_dir}\n" + extra
    )


class _DaemonCase(TestCase):
    timeout = 120
    #: server.timeout_seconds of the daemons this case starts (None: the default)
    timeout_seconds: int | None = None

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="lpa-agent-svc-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.pki = make_test_pki(os.path.join(self.tmp, "pki"))
        self.state_dir = os.path.join(self.tmp, "state")

    async def _start(self, extra: str = "", **inject: Any) -> Any:
        text = _config_text(self.pki, self.state_dir, extra, timeout_seconds=self.timeout_seconds)
        config = parse_agent_config(text, "test")
        service = make_agent_service(config, reactor=reactor, **inject)
        service.startService()
        port = await started_port(service.listener)
        self.port = port_number(port)

        async def stop() -> None:
            if service.running:
                await service.stopService()

        self.addCleanup(lambda: defer.ensureDeferred(stop()))
        return service

    def _client(self, which: str = "good") -> Any:
        client, pool = mtls_client(self.pki.client_options(which))
        self.addCleanup(pool.closeCachedConnections)
        return client

    def _url(self, path: str) -> str:
        return f"https://localhost:{self.port}{path}"

    async def _json(self, response: Any) -> dict[str, Any]:
        body = await response.content()
        document: dict[str, Any] = json.loads(body)
        return document

    async def _wait_terminal(self, client: Any, job_id: str) -> dict[str, Any]:
        # Half a second between polls stays inside the read rate limit (burst 30, 120/min).
        for _ in range(200):
            response = await client.get(self._url(f"/api/v1/jobs/{job_id}"))
            body = await self._json(response)
            self.assertEqual(response.code, 200, body)
            detail: dict[str, Any] = body["data"]
            if detail["status"] in ("completed", "failed", "cancelled", "timed_out"):
                return detail
            await task.deferLater(reactor, 0.5, lambda: None)
        self.fail(f"job {job_id} did not end")


class AgentDaemonTests(_DaemonCase):
    async def test_health_over_mtls(self) -> None:
        """A client holding a certificate of the CA gets /api/v1/health in the envelope."""
        await self._start(backend=FakeBackend(), system=FakeSystem())
        response = await self._client().get(self._url("/api/v1/health"))
        self.assertEqual(response.code, 200)
        body = await self._json(response)
        self.assertTrue(body["success"])
        self.assertEqual(body["data"]["status"], "healthy")
        self.assertEqual(body["data"]["crl_status"], "valid")
        self.assertIsInstance(body["data"]["crl_age_seconds"], int)
        self.assertEqual(set(body), {"success", "request_id", "timestamp", "data", "error"})

    async def test_refused_clients_at_handshake(self) -> None:
        """Expired, revoked and foreign-CA client certificates never reach the API."""
        await self._start(backend=FakeBackend(), system=FakeSystem())
        for which in ("expired", "revoked", "other_ca"):
            failure = None
            try:
                await self._client(which).get(self._url("/api/v1/health"))
            except Exception:
                failure = Failure()
            self.assertIsNotNone(failure, f"{which} client was served")

    async def test_revocation_applies_on_reload(self) -> None:
        """A client revoked while the agent runs is refused after a reload, without a restart."""
        from lpa.tools.pki import revoke

        service = await self._start(backend=FakeBackend(), system=FakeSystem())
        response = await self._client().get(self._url("/api/v1/health"))
        self.assertEqual(response.code, 200)
        await response.content()
        revoke(self.pki.directory, self.pki.good.cert)
        service.reloader.reload()
        with self.assertRaises(ResponseNeverReceived):
            await self._client().get(self._url("/api/v1/health"))

    async def test_metacharacters_refused_nothing_submitted(self) -> None:
        """A package name carrying shell metacharacters is a 400 VALIDATION_ERROR; no job made."""
        backend = FakeBackend()
        service = await self._start(backend=backend, system=FakeSystem())
        response = await self._client().post(
            self._url("/api/v1/patches/apply"),
            json={"packages": ["vim; rm -rf /"], "dry_run": True},
        )
        self.assertEqual(response.code, 400)
        body = await self._json(response)
        self.assertEqual(body["error"]["code"], "VALIDATION_ERROR")
        self.assertEqual(service.jobs.list_jobs(), [])
        self.assertEqual(backend.executed, [])

    async def test_history_survives_restart(self) -> None:
        """A finished job and its numbered events are served again after the daemon restarts."""
        service = await self._start(backend=FakeBackend(), system=FakeSystem())
        client = self._client()
        response = await client.post(self._url("/api/v1/patches/apply"), json={"dry_run": True})
        self.assertEqual(response.code, 202)
        job_id = (await self._json(response))["data"]["job_id"]
        detail = await self._wait_terminal(client, job_id)
        self.assertEqual(detail["status"], COMPLETED)
        before = [e.to_wire() for e in service.jobs.events.kept(job_id)]
        await service.stopService()

        await self._start(backend=FakeBackend(), system=FakeSystem())
        response = await self._client().get(self._url(f"/api/v1/jobs/{job_id}/events?after=0"))
        events = (await self._json(response))["data"]["events"]
        self.assertEqual(events, before)
        self.assertEqual(events[-1]["event"], EVENT_JOB_COMPLETE)
        self.assertEqual([e["seq"] for e in events], list(range(1, len(events) + 1)))


class CrlHealthTests(TestCase):
    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="lpa-crl-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.pki = make_test_pki(os.path.join(self.tmp, "pki"))

    def test_states(self) -> None:
        """The CRL health fields: missing, valid, expired, and invalid for garbage or another CA."""
        import time

        from lpa.tls import crl_health

        now = time.time()
        self.assertEqual(crl_health(None, self.pki.ca_cert, now)["crl_status"], "missing")
        self.assertEqual(
            crl_health(os.path.join(self.tmp, "none.pem"), self.pki.ca_cert, now)["crl_status"],
            "missing",
        )
        valid = crl_health(self.pki.crl, self.pki.ca_cert, now)
        self.assertEqual(valid["crl_status"], "valid")
        self.assertIsNotNone(valid["crl_next_update"])
        self.assertEqual(
            crl_health(self.pki.crl, self.pki.ca_cert, now + 10 * 365 * 86400)["crl_status"],
            "expired",
        )
        self.assertEqual(
            crl_health(self.pki.crl, self.pki.other_ca_cert, now)["crl_status"], "invalid"
        )
        garbage = os.path.join(self.tmp, "garbage.pem")
        with open(garbage, "w") as handle:
            handle.write("not a crl")
        self.assertEqual(crl_health(garbage, self.pki.ca_cert, now)["crl_status"], "invalid")


class AlpnTests(TestCase):
    def test_site_offers_http11_only(self) -> None:
        """The agent's Site offers only http/1.1 in ALPN, even where h2 is importable."""
        from lpa.agent.http.api import AgentApi
        from tests.fakes_jobs import FakeJobManager

        api = AgentApi(
            jobs=FakeJobManager(task.Clock()), backend=FakeBackend(), system=FakeSystem(),
            clock=task.Clock(), version="t", rate_limiter=None,
        )
        self.assertEqual(api.site().acceptableProtocols(), [b"http/1.1"])
