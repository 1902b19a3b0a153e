"""What an operator sees of the agent daemon: one line for each start-up fact or fault.

The start-up line (version, address, port, TLS, backend); a port in use as one line (exit 75 under
twistd: tests/system/test_twistd.py) instead of a traceback; state_dir made private; TLS file
errors naming the configuration key; SIGHUP saying what it re-read; a refused handshake logged with
the peer; server.timeout_seconds answering 408 to a client that holds a request open over mutual
TLS.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import SSL4ClientEndpoint, TCP4ClientEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.logger import formatEvent
from twisted.web.client import ResponseNeverReceived

from lpa.agent import tap
from lpa.agent.config import parse_agent_config
from lpa.agent.listening import EX_TEMPFAIL, ListenError
from lpa.agent.service import make_agent_service
from lpa.errors import ConfigError
from tests.fakes import FakeBackend, FakeSystem
from tests.logcheck import capture_events
from tests.loopback import started_port, stop
from tests.rawhttp import eventually, exchange
from tests.test_agent_service import _config_text, _DaemonCase


class _Logged(_DaemonCase):
    def setUp(self) -> None:
        super().setUp()
        self.events = capture_events(self)

    def lines(self, start: str) -> list[str]:
        return [
            formatEvent(e) for e in self.events if e.get("log_format", "").startswith(start)
        ]

    def build(self, extra: str = "", **text: Any) -> Any:
        config = parse_agent_config(_config_text(self.pki, self.state_dir, extra, **text), "t")
        return make_agent_service(
            config, reactor=reactor, backend=FakeBackend(), system=FakeSystem()
        )


class StartUpTests(_Logged):
    async def test_start_up_line(self) -> None:
        """Once bound, one info line gives version, address, port, TLS and backend."""
        await self._start(backend=FakeBackend(), system=FakeSystem())
        [line] = self.lines("lpa-agent {version} listening")
        self.assertEqual(
            line,
            f"lpa-agent 0.1.0 listening on 127.0.0.1:{self.port} (TLS on, client certificates "
            "required, minimum 1.3; backend fake)",
        )
        event = next(e for e in self.events if "listening on" in e.get("log_format", ""))
        self.assertEqual((event["bind"], event["port"]), ("127.0.0.1", self.port))

    def test_port_in_use(self) -> None:
        """A port in use is a ListenError naming address, port and what to do; exit 75."""
        holder = socket.socket()
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        service = self.build(port=port)
        error = self.assertRaises(ListenError, service.privilegedStartService)
        self.assertEqual(error.exit_status, EX_TEMPFAIL)
        self.assertEqual(
            str(error),
            f"cannot listen on 127.0.0.1:{port}: address already in use; another process "
            f"holds the port (ss -ltnp 'sport = :{port}' shows which): stop it, or set "
            "server.port",
        )

    def test_state_dir_made_private(self) -> None:
        """An existing state_dir with mode 0755 is set to 0700, and the log says so."""
        os.makedirs(self.state_dir, mode=0o755)
        os.chmod(self.state_dir, 0o755)
        self.build()
        self.assertEqual(stat.S_IMODE(os.stat(self.state_dir).st_mode), 0o700)
        [line] = self.lines("state_dir")
        self.assertEqual(
            line,
            f"state_dir {self.state_dir} had mode 0755; set it to 0700 because it holds job logs",
        )
        self.events.clear()
        self.build()
        self.assertEqual(self.lines("state_dir"), [])

    def test_tls_file_errors_name_the_key(self) -> None:
        """A missing, unparseable or mismatched TLS file is one line naming key and path."""
        missing = os.path.join(self.tmp, "nope.pem")
        garbage = os.path.join(self.tmp, "garbage.pem")
        with open(garbage, "w") as handle:
            handle.write("not a certificate\n")
        cases = [
            ({"server_cert": missing}, f"tls.server_cert: {missing}: no such file"),
            ({"ca_cert": garbage}, f"tls.ca_cert: {garbage}: not a PEM or DER certificate"),
            ({"server_key": garbage}, f"tls.server_key: {garbage}: not a PEM or DER private key"),
            (
                {"server_key": self.pki.good.key},
                (
                    f"tls.server_key: {self.pki.good.key}: does not match the certificate of "
                    f"tls.server_cert ({self.pki.server_cert})"
                ),
            ),
        ]
        for files, message in cases:
            error = self.assertRaises(ConfigError, self.build, **files)
            self.assertEqual(str(error), message)


class ReloadTests(_Logged):
    async def test_sighup_says_what_it_read(self) -> None:
        """SIGHUP logs what was re-read, or why it failed (and that every client is refused)."""
        service = await self._start(backend=FakeBackend(), system=FakeSystem())
        previous = signal.getsignal(signal.SIGHUP)
        self.addCleanup(signal.signal, signal.SIGHUP, previous)
        tap._reload_on_sighup(reactor, service)

        async def hup() -> str:
            before = len(self.events)
            os.kill(os.getpid(), signal.SIGHUP)

            def handled() -> list[dict[str, Any]]:
                return [e for e in self.events[before:] if e.get("trigger") == "SIGHUP"]

            await eventually(handled)
            return formatEvent(handled()[0])

        line = await hup()
        self.assertRegex(
            line,
            rf"^SIGHUP: re-read CRL {self.pki.crl}: 1 revoked serials, next update \S+; "
            r"no IP whitelist$",
        )
        with open(self.pki.crl, "w") as handle:
            handle.write("garbage")
        line = await hup()
        self.assertIn("SIGHUP: re-read failed, fix the file and reload again: CRL unusable", line)
        self.assertIn(f"tls.crl_path: {self.pki.crl}: not a PEM or DER", line)
        self.flushLoggedErrors()


class RefusalAndTimeoutTests(_Logged):
    async def test_refused_handshakes_logged(self) -> None:
        """Each refused client is one warn line with its address and the reason."""
        await self._start(backend=FakeBackend(), system=FakeSystem())
        for which in ("expired", "revoked", "other_ca"):
            with self.assertRaises(ResponseNeverReceived):
                await self._client(which).get(self._url("/api/v1/health"))
        await eventually(lambda: len(self.lines("TLS handshake from")) >= 3)
        lines = self.lines("TLS handshake from")
        self.assertEqual(len(lines), 3, lines)
        for line, reason in zip(
            lines, ("certificate expired", "certificate revoked", "unknown CA"), strict=True
        ):
            self.assertRegex(line, rf"^TLS handshake from 127\.0\.0\.1:\d+ refused: {reason} \(")

    async def test_held_request_answered_408(self) -> None:
        """A client with a good certificate that never finishes its request gets 408 and is
        closed after server.timeout_seconds."""
        self.timeout_seconds = 1
        await self._start(backend=FakeBackend(), system=FakeSystem())
        endpoint = SSL4ClientEndpoint(
            reactor, "127.0.0.1", self.port, self.pki.client_options("good")
        )
        answer = await exchange(endpoint, b"GET /api/v1/health HTTP/1.1\r\nHost: a", guard=10)
        self.assertFalse(answer.held)
        self.assertEqual(answer.status, 408)
        self.assertEqual(answer.envelope()["error"]["code"], "REQUEST_TIMEOUT")


def _free_port() -> int:
    """A loopback port nothing listens on right now (metrics.local_port 0 means "off")."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class MetricsPortTests(_Logged):
    async def _get(self, port: int, path: str) -> Any:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        return await exchange(endpoint, request.encode("ascii"), guard=10)

    async def test_metrics_only_in_plain_http(self) -> None:
        """metrics.local_port opens a plain-HTTP port on 127.0.0.1 that answers /metrics with
        the agent's gauges in the Prometheus text format (the CRL's among them) and 404 without
        a traceback for anything else; it closes when the agent stops."""
        port = _free_port()
        service = await self._start(
            f"metrics:\n  local_port: {port}\n", backend=FakeBackend(), system=FakeSystem()
        )
        self.assertFalse(service.metrics_listener.factory.displayTracebacks)
        listening = await started_port(service.metrics_listener)
        self.assertEqual(listening.getHost(), IPv4Address("TCP", "127.0.0.1", port))

        answer = await self._get(port, "/metrics")
        self.assertEqual(answer.status, 200)
        self.assertTrue(answer.header(b"content-type").startswith(b"text/plain; version=0.0.4"))
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(answer.body.decode("utf-8"))
            for sample in family.samples
        }
        self.assertEqual(samples[("lpa_agent_jobs_running", ())], 0)
        self.assertEqual(samples[("lpa_agent_job_timeout_seconds", ())], 1800)
        self.assertEqual(samples[("lpa_agent_crl_status", (("status", "valid"),))], 1)
        self.assertGreaterEqual(samples[("lpa_agent_crl_age_seconds", ())], 0)

        for path in ("/", "/api/v1/health", "/api/v1/ws/jobs"):
            answer = await self._get(port, path)
            self.assertEqual(answer.status, 404, path)
            self.assertNotIn(b"Traceback", answer.body)
            self.assertNotIn(b"lpa_agent", answer.body)

        await service.stopService()
        answer = None
        with self.assertRaises(ConnectionRefusedError):
            answer = await self._get(port, "/metrics")
        self.assertIsNone(answer)

    async def test_metrics_port_in_use(self) -> None:
        """metrics.local_port in use is a ListenError naming that port and metrics.local_port
        (not the API's port and server.port); exit 75."""
        holder = socket.socket()
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        service = self.build(f"metrics:\n  local_port: {port}\n")
        error = self.assertRaises(ListenError, service.privilegedStartService)
        # the API's port (started first) got a port: let it go
        await stop(await started_port(service.listener))
        self.assertEqual(error.exit_status, EX_TEMPFAIL)
        self.assertEqual(
            str(error),
            f"cannot listen on 127.0.0.1:{port}: address already in use; another process "
            f"holds the port (ss -ltnp 'sport = :{port}' shows which): stop it, or set "
            "metrics.local_port",
        )

    def test_off_by_default(self) -> None:
        """Without metrics.local_port the agent opens no plain-HTTP port."""
        service = self.build()
        self.assertIsNone(service.metrics_listener)
        self.assertEqual(
            [child for child in service if isinstance(child, StreamServerEndpointService)],
            [service.listener],
        )
