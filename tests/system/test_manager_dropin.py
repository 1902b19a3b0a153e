"""A real lpa-agent beside the unchanged manager: what pm-worker's relay and job executor send.

The manager (Linux-Patch-Manager's pm-worker) keeps talking to a host whose agent became lpa:

* its relay opens ``/api/v1/ws/jobs`` over mTLS **without a subprotocol**, never subscribes, and
  polls ``GET /api/v1/jobs/{id}`` only when the handshake fails (as it always did against the
  original agent).  lpa refuses that handshake with the JSON envelope and closes the connection;
  polling works; a client offering ``lpa.jobs.v1`` gets the stream; a connection that never
  subscribed, or whose subscribe was rejected, gets no job's events;
* its job executor sends ``{"packages": [], "allow_reboot": …, "reboot_delay_seconds": …}`` for
  a host with nothing selected: 202, and the job completes with an empty change list;
* every mutating endpoint with ``dry_run: true`` mutates nothing, or is refused with 400.

The agent is the real daemon on loopback over mutual TLS.  For the WebSocket checks it runs in
this process (``make_agent_service``) with a gated fake backend, so a job is still running while
clients connect.  For everything that reaches the package manager it is a real ``lpa-agent``
process from :mod:`tests.agentproc`: apt, dpkg and the reboot commands are stand-ins
(:mod:`tests.standin`) bind-mounted over the real ones in a private mount namespace, each
invocation recorded, and proven in effect before the first request.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import tempfile
import uuid
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import blockingCallFromThread, deferToThread
from twisted.trial.unittest import TestCase
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Subprotocol

from lpa.agent.config import parse_agent_config
from lpa.agent.service import make_agent_service
from lpa.events import COMPLETED
from lpa.protocol import SUBPROTOCOL
from tests import standin
from tests.agentclient import mtls_client
from tests.agentproc import AgentProcess, wait_until
from tests.certs import make_test_pki
from tests.fakes import FakeBackend, FakeSystem
from tests.loopback import port_number, started_port

TERMINAL = ("completed", "failed", "cancelled", "timed_out")


def mutating(argv: Sequence[str]) -> bool:
    """Whether a recorded command could change the host: anything not known to be read-only
    (stricter than ``standin.mutating_calls``: ``apt-get update`` and reboots count too)."""
    name, args = argv[0], list(argv[1:])
    if name == "apt-get":
        return "-s" not in args
    if name == "dpkg":
        return args[:1] not in (["--audit"], ["-s"], ["-l"])
    if name in ("apt", "apt-cache", "dpkg-query"):
        return args[:1] not in (["list"], ["policy"], ["show"], ["-W"])
    return True  # systemctl, shutdown, reboot: never expected here


def client_context(pki: Any) -> ssl.SSLContext:
    """The manager's TLS: the CA, its client certificate, ALPN http/1.1."""
    context = ssl.create_default_context(cafile=pki.ca_cert)
    files = pki.client("good")
    context.load_cert_chain(files.cert, files.key)
    context.set_alpn_protocols(["http/1.1"])
    return context


class _AgentCase(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="lpa-dropin-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.pki = make_test_pki(os.path.join(self.tmp, "pki"))

    async def start_agent(self, **inject: Any) -> Any:
        config = parse_agent_config(
            "server:\n  bind: 127.0.0.1\n  port: 0\n"
            f"tls:\n  ca_cert: {self.pki.ca_cert}\n  server_cert: {self.pki.server_cert}\n"
            f"  server_key: {self.pki.server_key}\n  crl_path: {self.pki.crl}\n"
            f"state_dir: {os.path.join(self.tmp, 'state')}\n"
            "rate_limit:\n  enabled: false\n",
            "test",
        )
        service = make_agent_service(config, reactor=reactor, **inject)
        service.startService()
        self.port = port_number(await started_port(service.listener))

        async def stop() -> None:
            if service.running:
                await service.stopService()

        self.addCleanup(lambda: defer.ensureDeferred(stop()))
        client, pool = mtls_client(self.pki.client_options("good"))
        self.addCleanup(pool.closeCachedConnections)
        self.client = client
        self.service = service
        return service

    def url(self, path: str) -> str:
        return f"https://localhost:{self.port}{path}"

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        kwargs = {} if body is None else {"json": body}
        response = await self.client.request(method, self.url(path), **kwargs)
        return response.code, json.loads(await response.content())

    async def until_terminal(self, job_id: str) -> dict[str, Any]:
        """Poll ``GET /api/v1/jobs/{id}`` as the manager's relay falls back to doing."""
        for _ in range(400):
            code, body = await self.request("GET", f"/api/v1/jobs/{job_id}")
            self.assertEqual(code, 200, body)
            detail: dict[str, Any] = body["data"]
            if detail["status"] in TERMINAL:
                return detail
            await task.deferLater(reactor, 0.05, lambda: None)
        self.fail(f"job {job_id} did not end")


class ManagerRelayTests(_AgentCase):
    """The manager's relay (no subprotocol, never subscribes) against a real lpa-agent."""

    async def setUpAgent(self) -> None:
        self.backend = FakeBackend()
        self.backend.script("patch_apply", progress=[(10, "resolving")], gate=True)
        await self.start_agent(backend=self.backend, system=FakeSystem())

    async def submit_gated(self) -> str:
        code, body = await self.request(
            "POST",
            "/api/v1/patches/apply",
            {"packages": ["curl"], "allow_reboot": False, "reboot_delay_seconds": 0},
        )
        self.assertEqual(code, 202, body)
        job_id: str = body["data"]["job_id"]
        for _ in range(200):
            # started, and its "Job started" event durable (what REST shows follows the disk)
            if (
                job_id in self.backend.gates
                and self.service.jobs.get(job_id).to_detail()["status"] == "running"
            ):
                return job_id
            await task.deferLater(reactor, 0.01, lambda: None)
        self.fail(f"job {job_id} never started")

    def release(self, job_id: str) -> None:
        self.backend.gates[job_id].callback(None)

    def manager_relay_handshake(self) -> bytes:
        """What pm-worker's relay sends (tokio-tungstenite over rustls, ALPN http/1.1, no
        Sec-WebSocket-Protocol); returns all bytes read until the agent closed the socket."""
        context = client_context(self.pki)
        with (
            socket.create_connection(("127.0.0.1", self.port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(
                (
                    "GET /api/v1/ws/jobs HTTP/1.1\r\n"
                    f"Host: localhost:{self.port}\r\n"
                    "Connection: Upgrade\r\nUpgrade: websocket\r\n"
                    "Sec-WebSocket-Version: 13\r\n"
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
                ).encode()
            )
            received = b""
            while True:  # until EOF: the agent must close, not hold the socket
                try:
                    chunk = tls.recv(65536)
                except ssl.SSLZeroReturnError:
                    break
                if not chunk:
                    break
                received += chunk
        return received

    def connect(self) -> ClientConnection:
        return connect(
            f"wss://localhost:{self.port}/api/v1/ws/jobs",
            ssl=client_context(self.pki),
            proxy=None,
            open_timeout=10,
            subprotocols=[Subprotocol(SUBPROTOCOL)],
        )

    async def test_manager_relay_refused_and_polling_works(self) -> None:
        """The manager relay's handshake gets HTTP 400 with the envelope naming lpa.jobs.v1 and
        the agent closes the socket; no stream session exists; polling the job works to the end."""
        await self.setUpAgent()
        job_id = await self.submit_gated()
        received = await deferToThread(self.manager_relay_handshake)
        head, _, body = received.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 400 "), head)
        envelope = json.loads(body)
        self.assertEqual(set(envelope), {"success", "request_id", "timestamp", "data", "error"})
        self.assertEqual((envelope["success"], envelope["data"]), (False, None))
        self.assertEqual(envelope["error"]["code"], "SUBPROTOCOL_REQUIRED")
        self.assertEqual(envelope["error"]["details"]["subprotocol"], SUBPROTOCOL)
        # the patch cache and the metrics: no session of the manager's relay
        self.assertEqual(self.service.jobs.events.subscriber_count(), 2)

        code, polled = await self.request("GET", f"/api/v1/jobs/{job_id}")
        self.assertEqual((code, polled["data"]["status"]), (200, "running"))
        self.release(job_id)
        detail = await self.until_terminal(job_id)
        self.assertEqual(detail["status"], COMPLETED)

    async def test_stream_with_subprotocol_and_no_other_jobs(self) -> None:
        """With lpa.jobs.v1 the stream works (replay then live, in order, to job_complete); a
        connection that never subscribed, and one whose subscribe was rejected, get no job's
        events: before an acknowledgement sent after the job ended they got only their
        greeting (and the error)."""
        await self.setUpAgent()
        job_id = await self.submit_gated()
        missing = str(uuid.uuid4())

        def clients() -> dict[str, list[dict[str, Any]]]:
            out: dict[str, list[dict[str, Any]]] = {}
            with self.connect() as stream, self.connect() as idle, self.connect() as rejected:
                rejected.send(json.dumps({"action": "subscribe", "job_id": missing}))
                stream.send(json.dumps({"action": "subscribe", "job_id": job_id, "after_seq": 0}))
                frames = [json.loads(stream.recv(timeout=10))]
                while frames[-1]["event"] != "subscribed":
                    frames.append(json.loads(stream.recv(timeout=10)))
                blockingCallFromThread(IReactorFromThreads(reactor), self.release, job_id)
                while frames[-1]["event"] != "job_complete":
                    frames.append(json.loads(stream.recv(timeout=10)))
                out["stream"] = frames
                for name, ws in (("idle", idle), ("rejected", rejected)):
                    # a sentinel sent after every event of the job was published
                    ws.send(json.dumps({"action": "unsubscribe", "job_id": missing}))
                    got = [json.loads(ws.recv(timeout=10))]
                    while got[-1]["event"] != "unsubscribed":
                        got.append(json.loads(ws.recv(timeout=10)))
                    out[name] = got
            return out

        out = await deferToThread(clients)
        kept = [e.to_wire() for e in self.service.jobs.events.kept(job_id)]
        stream = [f for f in out["stream"] if f["event"] in ("job_status", "job_complete")]
        self.assertEqual(stream, kept)
        self.assertEqual([f["seq"] for f in stream], list(range(1, len(kept) + 1)))
        self.assertEqual([f["event"] for f in out["idle"]], ["connected", "unsubscribed"])
        self.assertEqual(
            [(f["event"], f.get("error_code")) for f in out["rejected"]],
            [("connected", None), ("error", "JOB_NOT_FOUND"), ("unsubscribed", None)],
        )

    async def test_websockets_client_without_subprotocol_falls_back(self) -> None:
        """A stock WebSocket client offering nothing sees the handshake fail (InvalidStatus 400)
        — the condition on which the manager's relay polls."""
        await self.setUpAgent()

        def attempt() -> int:
            try:
                connect(
                    f"wss://localhost:{self.port}/api/v1/ws/jobs",
                    ssl=client_context(self.pki),
                    proxy=None,
                    open_timeout=10,
                )
            except InvalidStatus as refused:
                return refused.response.status_code
            return 101

        self.assertEqual(await deferToThread(attempt), 400)


class _StandInAgentCase(TestCase):
    """A real ``lpa-agent`` process whose apt/dpkg/reboot commands are recording stand-ins."""

    timeout = 120

    async def start_stand_in_agent(self) -> None:
        tmp = tempfile.mkdtemp(prefix="lpa-dropin-")
        self.addCleanup(shutil.rmtree, tmp, True)
        pki = make_test_pki(os.path.join(tmp, "pki"))
        self.agent = AgentProcess(
            os.path.join(tmp, "agent"),
            pki,
            extra_yaml="rate_limit:\n  enabled: false\n",
            download_seconds=0.1,
            dpkg_seconds=0.1,
        )
        self.addCleanup(self.agent.cleanup)
        await self.agent.start()  # proves the stand-ins are in effect
        self.seen = len(self.agent.record())

    def recorded(self) -> list[list[str]]:
        """``[command, *argv]`` of every stand-in started since the last call."""
        records = self.agent.record()
        starts = [r for r in records[self.seen:] if r.get("event") == "start"]
        self.seen = len(records)
        return [[r["command"], *r["argv"]] for r in starts]

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return await self.agent.request(method, path, **({} if body is None else {"json": body}))

    async def accepted_job(self, method: str, path: str, body: Any) -> dict[str, Any]:
        code, answer = await self.request(method, path, body)
        self.assertEqual(code, 202, answer)
        job_id = answer["data"]["job_id"]
        detail: dict[str, Any] = {}

        async def ended() -> bool:
            _, polled = await self.request("GET", f"/api/v1/jobs/{job_id}")
            detail.update(polled["data"])
            return polled["data"]["status"] in TERMINAL

        await wait_until(ended, f"job {job_id} to end")
        return detail

    async def jobs(self) -> list[Any]:
        code, body = await self.request("GET", "/api/v1/jobs")
        self.assertEqual(code, 200)
        return list(body["data"]["jobs"])


class ManagerApplyTests(_StandInAgentCase):
    async def test_manager_empty_apply_completes(self) -> None:
        """The manager's exact body with ``packages: []`` (and with ``dry_run: true``) is 202;
        the job ends completed with an empty change list, no reboot, and no command run."""
        await self.start_stand_in_agent()
        for body in (
            {"packages": [], "allow_reboot": True, "reboot_delay_seconds": 0},
            {"packages": [], "allow_reboot": True, "reboot_delay_seconds": 0, "dry_run": True},
        ):
            detail = await self.accepted_job("POST", "/api/v1/patches/apply", body)
            self.assertEqual(detail["status"], COMPLETED, detail.get("error"))
            self.assertEqual((detail["changes"], detail["packages"]), ([], []))
            self.assertFalse(detail["reboot_required"])
            self.assertIn("othing to apply", detail["message"])
        self.assertEqual(self.recorded(), [])

    async def test_self_upgrade_is_unsupported(self) -> None:
        """The manager's self-upgrade, PUT /api/v1/packages/linux-patch-api, is 409
        UNSUPPORTED_ON_LPA naming lpa-agent's package; no job, no command."""
        await self.start_stand_in_agent()
        code, body = await self.request("PUT", "/api/v1/packages/linux-patch-api")
        self.assertEqual((code, body["error"]["code"]), (409, "UNSUPPORTED_ON_LPA"))
        self.assertIn("lpa-agent", body["error"]["message"])
        self.assertEqual(await self.jobs(), [])
        self.assertEqual(self.recorded(), [])


class DryRunMutatesNothingTests(_StandInAgentCase):
    async def check_dry_run(self, method: str, path: str, body: Any) -> None:
        """One endpoint: 202, completed with the stand-in's simulated change, only read-only
        commands recorded (and some were: the stand-ins really ran)."""
        self.recorded()
        detail = await self.accepted_job(method, path, body)
        self.assertEqual(detail["status"], COMPLETED, detail.get("error"))
        self.assertTrue(detail["dry_run"])
        self.assertTrue(detail["changes"], detail)
        calls = self.recorded()
        self.assertTrue(calls)
        self.assertEqual([argv for argv in calls if mutating(argv)], [], f"{method} {path}")

    async def test_install_dry_run(self) -> None:
        """POST /api/v1/packages with dry_run: true runs only apt-get -s."""
        await self.start_stand_in_agent()
        await self.check_dry_run(
            "POST", "/api/v1/packages", {"packages": ["curl"], "dry_run": True}
        )

    async def test_update_dry_run(self) -> None:
        """PUT /api/v1/packages/{name} honours a body's (or the query's) dry_run."""
        await self.start_stand_in_agent()
        await self.check_dry_run("PUT", "/api/v1/packages/curl", {"dry_run": True})
        await self.check_dry_run("PUT", "/api/v1/packages/curl?dry_run=true", None)

    async def test_remove_dry_run(self) -> None:
        """DELETE /api/v1/packages/{name} honours a body's dry_run."""
        await self.start_stand_in_agent()
        await self.check_dry_run("DELETE", "/api/v1/packages/curl", {"dry_run": True})

    async def test_apply_dry_run(self) -> None:
        """POST /api/v1/patches/apply with dry_run: true, all packages and named ones."""
        await self.start_stand_in_agent()
        await self.check_dry_run("POST", "/api/v1/patches/apply", {"dry_run": True})
        await self.check_dry_run(
            "POST", "/api/v1/patches/apply", {"packages": ["curl"], "dry_run": True}
        )

    async def test_reboot_dry_run_refused(self) -> None:
        """POST /api/v1/system/reboot has no dry run: 400, no job, nothing run."""
        await self.start_stand_in_agent()
        for path, body in (
            ("/api/v1/system/reboot", {"dry_run": True}),
            ("/api/v1/system/reboot?dry_run=true", {}),
        ):
            code, answer = await self.request("POST", path, body)
            self.assertEqual((code, answer["error"]["code"]), (400, "VALIDATION_ERROR"))
        self.assertEqual(await self.jobs(), [])
        self.assertEqual(self.recorded(), [])

    async def test_mutating_calls_are_seen(self) -> None:
        """Control: the same update without dry_run records apt-get -y, which the check flags,
        so a dry run that mutated would fail the tests above."""
        await self.start_stand_in_agent()
        detail = await self.accepted_job("PUT", "/api/v1/packages/curl", None)
        self.assertEqual(detail["status"], COMPLETED, detail.get("error"))
        flagged = [argv for argv in self.recorded() if mutating(argv)]
        self.assertIn("-y", flagged[0])
        self.assertEqual(flagged[0][-3:], ["--only-upgrade", "--", "curl"])
        self.assertEqual(standin.mutating_calls(self.agent.record()), [flagged[0][1:]])
