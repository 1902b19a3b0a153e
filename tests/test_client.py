"""Tests for ``lpa agent``: URL and credential handling, the envelope, watch over WS and polling."""

from __future__ import annotations

import argparse
import http.server
import io
import json
import threading
from typing import Any, Iterator

from twisted.trial.unittest import SynchronousTestCase

from lpa.tools import client
from lpa.tools.client import (
    AgentClient,
    AgentUrl,
    ClientError,
    Credentials,
    HandshakeFailed,
    JobProgress,
    JobWatcher,
    ProgressPrinter,
)

JOB = "0b0c1f9e-5a43-4a4e-9d51-6f3c1d8e2a10"


def envelope(data: Any = None, error: dict[str, Any] | None = None) -> bytes:
    return json.dumps({"success": error is None, "request_id": "r", "timestamp": "t",
                       "data": data, "error": error}).encode()


def event(seq: int, status: str, progress: int = 0, message: str = "", *,
          name: str = "job_status", job_id: str = JOB) -> dict[str, Any]:
    return {"event": name, "job_id": job_id, "seq": seq, "kind": "status", "status": status,
            "progress": progress, "message": message, "timestamp": "t"}


class FakeAgent:
    """A transport answering from a table of (method, path) -> list of (status, body)."""

    def __init__(self, answers: dict[tuple[str, str], list[tuple[int, bytes]]]) -> None:
        self.answers = answers
        self.requests: list[tuple[str, str, Any]] = []

    def __call__(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        self.requests.append((method, path, None if body is None else json.loads(body)))
        queue = self.answers[(method, path)]
        return queue.pop(0) if len(queue) > 1 else queue[0]


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="lpa")
    client.add_parser(top.add_subparsers(dest="command", required=True))
    return top


class UrlTests(SynchronousTestCase):
    def test_forms(self) -> None:
        """Bare host, host:port and URLs parse; the default port is the original's 12443."""
        self.assertEqual(AgentUrl.parse("web1"), AgentUrl("web1", 12443, True))
        self.assertEqual(AgentUrl.parse("web1:8443"), AgentUrl("web1", 8443, True))
        self.assertEqual(AgentUrl.parse("http://127.0.0.1:80"), AgentUrl("127.0.0.1", 80, False))
        self.assertEqual(AgentUrl.parse("https://[::1]:9").ws_url(), "wss://[::1]:9/api/v1/ws/jobs")

    def test_bad(self) -> None:
        """A path, a bad scheme or a bad port is a one-line error."""
        for text in ("https://h/api", "ftp://h", "h:notaport"):
            self.assertRaises(ClientError, AgentUrl.parse, text)


class CredentialsTests(SynchronousTestCase):
    def test_env_fallback(self) -> None:
        """Options win over LPA_CERT/LPA_KEY/LPA_CA, which fill what is missing."""
        env = {"LPA_CERT": "/e/c", "LPA_KEY": "/e/k", "LPA_CA": "/e/ca"}
        self.assertEqual(Credentials.resolve("/o/c", None, None, env),
                         Credentials("/o/c", "/e/k", "/e/ca"))

    def test_missing_file(self) -> None:
        """A certificate path that does not exist is named in the error."""
        credentials = Credentials("/nonexistent.pem", "/x", None)
        error = self.assertRaises(ClientError, credentials.ssl_context)
        self.assertIn("/nonexistent.pem", str(error))

    def test_no_certificate(self) -> None:
        """Without any client certificate the error says how to give one."""
        error = self.assertRaises(ClientError, Credentials().ssl_context)
        self.assertIn("LPA_CERT", str(error))

    def test_cert_without_key(self) -> None:
        """A certificate without a key is refused before any connection."""
        path = self.mktemp()
        open(path, "w").close()
        self.assertRaises(ClientError, Credentials(path, None, None).ssl_context)


class EnvelopeTests(SynchronousTestCase):
    def test_data(self) -> None:
        """A success envelope yields its data."""
        agent = FakeAgent({("GET", "/api/v1/health"): [(200, envelope({"status": "healthy"}))]})
        self.assertEqual(AgentClient(agent).health(), {"status": "healthy"})

    def test_error_envelope(self) -> None:
        """An error envelope becomes a ClientError with code, status and details."""
        agent = FakeAgent({("POST", f"/api/v1/jobs/{JOB}/cancel"): [
            (409, envelope(error={"code": "CANCEL_NOT_ALLOWED", "message": "job is completed",
                                  "details": {"status": "completed"}, "retryable": False}))]})
        error = self.assertRaises(ClientError, AgentClient(agent).cancel, JOB)
        self.assertEqual((error.status, error.code), (409, "CANCEL_NOT_ALLOWED"))
        self.assertEqual(str(error), "CANCEL_NOT_ALLOWED: job is completed (HTTP 409)")

    def test_not_an_envelope(self) -> None:
        """A non-JSON answer (the original's 405 has an empty body) is reported with its status."""
        agent = FakeAgent({("GET", "/api/v1/jobs"): [(405, b"")]})
        error = self.assertRaises(ClientError, AgentClient(agent).jobs)
        self.assertEqual(error.status, 405)
        self.assertIn("HTTP 405", str(error))

    def test_apply_body(self) -> None:
        """apply sends dry_run/security_only and packages only when given."""
        agent = FakeAgent({("POST", "/api/v1/patches/apply"): [(202, envelope({"job_id": JOB}))]})
        AgentClient(agent).apply(dry_run=True)
        AgentClient(agent).apply(security_only=True, packages=["curl"])
        self.assertEqual([r[2] for r in agent.requests], [
            {"dry_run": True, "security_only": False},
            {"dry_run": False, "security_only": True, "packages": ["curl"]}])


class ProgressTests(SynchronousTestCase):
    def test_duplicates_and_other_jobs(self) -> None:
        """Events with an old seq or another job id are ignored."""
        state = JobProgress(JOB)
        self.assertTrue(state.apply_event(event(1, "pending")))
        self.assertFalse(state.apply_event(event(1, "running")))
        self.assertFalse(state.apply_event(event(2, "failed", job_id="other")))
        self.assertEqual((state.seq, state.status), (1, "pending"))

    def test_plain_lines(self) -> None:
        """Without a terminal each event is one line and the end names the final status."""
        out = io.StringIO()
        printer, state = ProgressPrinter(out, tty=False), JobProgress(JOB)
        state.apply_event(event(1, "running", 40, "Unpacking curl"))
        printer.show(state, event(1, "running"))
        printer.finish(state)
        self.assertEqual(out.getvalue().splitlines(),
                         ["seq=1 running 40% [status] Unpacking curl", f"job {JOB} running"])

    def test_bar(self) -> None:
        """On a terminal the line is a redrawn bar."""
        out = io.StringIO()
        state = JobProgress(JOB, progress=50, status="running")
        ProgressPrinter(out, tty=True, width=10).show(state)
        self.assertTrue(out.getvalue().startswith("\r[#####-----]  50% running"))


class WatcherTests(SynchronousTestCase):
    def watcher(self, agent: FakeAgent, ws: Any, out: io.StringIO, logs: list[str]) -> JobWatcher:
        return JobWatcher(AgentClient(agent), ProgressPrinter(out, tty=False), ws_events=ws,
                          sleep=lambda s: None, log=logs.append)

    def test_websocket(self) -> None:
        """Over the WebSocket the watcher subscribes from seq 0 and stops at job_complete."""
        asked: list[tuple[str, int]] = []

        def ws(job_id: str, after: int) -> Iterator[dict[str, Any]]:
            asked.append((job_id, after))
            yield {"event": "connected", "job_id": "", "status": "connected"}
            yield event(1, "pending")
            yield event(2, "running", 50)
            yield event(2, "running", 50)
            yield event(3, "completed", 100)
            yield event(4, "completed", 100, name="job_complete")
            raise AssertionError("read past job_complete")

        out, logs = io.StringIO(), []
        state = self.watcher(FakeAgent({}), ws, out, logs).watch(JOB)
        self.assertEqual((state.status, state.seq, state.complete), ("completed", 4, True))
        self.assertEqual(asked, [(JOB, 0)])
        self.assertEqual(len(out.getvalue().splitlines()), 5)

    def test_fallback_to_events(self) -> None:
        """A failed handshake falls back to polling the events endpoint from the last seq."""
        def ws(job_id: str, after: int) -> Iterator[dict[str, Any]]:
            raise HandshakeFailed("InvalidStatus: 404")
            yield {}

        base = f"/api/v1/jobs/{JOB}/events?after="
        agent = FakeAgent({
            ("GET", base + "0"): [
                (200, envelope({"events": [event(1, "running")], "terminal": False}))],
            ("GET", base + "1"): [(200, envelope({"events": [
                event(2, "completed", 100), event(3, "completed", 100, name="job_complete")],
                "terminal": True}))],
        })
        out, logs = io.StringIO(), []
        watcher = self.watcher(agent, ws, out, logs)
        state = watcher.watch(JOB)
        self.assertEqual((state.status, state.seq, watcher.transport), ("completed", 3, "poll"))
        self.assertIn("polling instead", logs[0])

    def test_stream_closed_resumes_by_polling(self) -> None:
        """A WebSocket closed mid-job is followed up by polling from the last seq seen."""
        def ws(job_id: str, after: int) -> Iterator[dict[str, Any]]:
            yield event(1, "running")
            yield event(2, "running", 10)
            raise client.StreamClosed("the agent closed the WebSocket: 1008 too slow")

        agent = FakeAgent({("GET", f"/api/v1/jobs/{JOB}/events?after=2"): [(200, envelope({
            "events": [event(3, "completed", 100), event(4, "completed", 100, name="job_complete")],
            "terminal": True}))]})
        out, logs = io.StringIO(), []
        state = self.watcher(agent, ws, out, logs).watch(JOB)
        self.assertEqual((state.status, state.seq), ("completed", 4))
        self.assertIn("polling from seq 2", logs[0])

    def test_expired_then_old_agent(self) -> None:
        """410 EVENTS_EXPIRED resyncs from the job detail; an agent without events is polled."""
        expired = envelope(error={"code": "EVENTS_EXPIRED", "message": "gone", "retryable": False,
                                  "details": {"job_id": JOB, "status": "running", "seq": 900,
                                              "progress": 10, "message": "m"}})
        agent = FakeAgent({
            ("GET", f"/api/v1/jobs/{JOB}/events?after=0"): [(410, expired)],
            ("GET", f"/api/v1/jobs/{JOB}/events?after=900"): [(405, b"")],
            ("GET", f"/api/v1/jobs/{JOB}"): [
                (200, envelope({"job_id": JOB, "status": "running", "progress": 10})),
                (200, envelope({"job_id": JOB, "status": "timedout", "progress": 10,
                                "error": "took too long"}))],
        })
        out, logs = io.StringIO(), []
        state = self.watcher(agent, None, out, logs).watch(JOB)
        self.assertEqual((state.status, state.error), ("timed_out", "took too long"))
        self.assertIn(f"job {JOB} timed_out: took too long", out.getvalue())

    def test_unknown_job(self) -> None:
        """JOB_NOT_FOUND while polling is an error, not a switch to snapshots."""
        agent = FakeAgent({("GET", f"/api/v1/jobs/{JOB}/events?after=0"): [(404, envelope(
            error={"code": "JOB_NOT_FOUND", "message": "no such job", "retryable": False}))]})
        watcher = self.watcher(agent, None, io.StringIO(), [])
        error = self.assertRaises(ClientError, watcher.watch, JOB)
        self.assertEqual(error.code, "JOB_NOT_FOUND")

    def test_timeout(self) -> None:
        """Polling gives up after the timeout with a clear error."""
        now = [0.0]
        agent = FakeAgent({("GET", f"/api/v1/jobs/{JOB}/events?after=0"): [
            (200, envelope({"events": [], "terminal": False}))]})

        def sleep(seconds: float) -> None:
            now[0] += seconds

        watcher = JobWatcher(AgentClient(agent), ProgressPrinter(io.StringIO(), tty=False),
                             ws_events=None, sleep=sleep, monotonic=lambda: now[0], timeout=10)
        self.assertRaises(ClientError, watcher.watch, JOB)
        self.assertEqual(now[0], 10.0)


class CommandLineTests(SynchronousTestCase):
    def run_cli(self, argv: list[str], agent: FakeAgent, **kw: Any) -> tuple[int, str]:
        args = parser().parse_args(argv)
        out = io.StringIO()
        code = client.run(args, out=out, err=io.StringIO(), transport=agent, environ={}, **kw)
        return code, out.getvalue()

    def test_help(self) -> None:
        """Every action has --help text."""
        for action in ("health", "patches", "apply", "jobs", "job", "cancel", "watch"):
            out = io.StringIO()
            import contextlib
            with contextlib.redirect_stdout(out):
                self.assertRaises(SystemExit, parser().parse_args, ["agent", "h", action, "--help"])
            self.assertIn("usage: lpa agent", out.getvalue())

    def test_apply_watch(self) -> None:
        """apply --dry-run --watch prints the job id, follows it and exits 0 on completed."""
        agent = FakeAgent({("POST", "/api/v1/patches/apply"): [(202, envelope({"job_id": JOB}))]})

        def ws(job_id: str, after: int) -> Iterator[dict[str, Any]]:
            yield event(1, "completed", 100)
            yield event(2, "completed", 100, name="job_complete")

        code, out = self.run_cli(["agent", "http://h:1", "apply", "--dry-run", "--packages",
                                  "curl", "--watch"], agent, ws_events=ws)
        self.assertEqual(code, 0)
        self.assertEqual(out.splitlines()[0], JOB)
        self.assertEqual(agent.requests[0][2],
                         {"dry_run": True, "security_only": False, "packages": ["curl"]})

    def test_watch_failed_exit(self) -> None:
        """watch exits 1 when the job did not complete."""
        def ws(job_id: str, after: int) -> Iterator[dict[str, Any]]:
            yield event(1, "failed")
            yield event(2, "failed", name="job_complete")

        code, _ = self.run_cli(["agent", "http://h:1", "watch", JOB], FakeAgent({}), ws_events=ws)
        self.assertEqual(code, 1)

    def test_patches_and_cancel(self) -> None:
        """patches --security asks for security updates and prints a table; cancel prints status."""
        agent = FakeAgent({
            ("GET", "/api/v1/patches?security=true"): [(200, envelope({
                "patches": [{"name": "openssl", "current_version": "3.0.1",
                             "available_version": "3.0.2", "severity": "critical"}],
                "security_updates": 1, "requires_reboot": True}))],
            ("POST", f"/api/v1/jobs/{JOB}/cancel"): [(200, envelope({"status": "cancelled"}))],
        })
        code, out = self.run_cli(["agent", "http://h:1", "patches", "--security"], agent)
        self.assertEqual(code, 0)
        self.assertTrue(out.startswith("openssl "))
        self.assertEqual(out.splitlines()[-1], "1 patches (1 security); reboot required: yes")
        code, out = self.run_cli(["agent", "http://h:1", "cancel", JOB], agent)
        self.assertEqual(out, f"job {JOB} cancelled\n")

    def test_jobs_table(self) -> None:
        """jobs prints one line per job and a count."""
        agent = FakeAgent({("GET", "/api/v1/jobs?status=running&limit=5"): [(200, envelope(
            {"jobs": [{"job_id": JOB, "status": "running", "operation": "patch_apply"}]}))]})
        code, out = self.run_cli(["agent", "http://h:1", "jobs", "--status", "running",
                                  "--limit", "5"], agent)
        self.assertEqual((code, out.splitlines()[-1]), (0, "1 jobs"))


class _Handler(http.server.BaseHTTPRequestHandler):
    """A tiny agent: health, and 404 for everything else (including a WebSocket upgrade)."""

    def do_GET(self) -> None:  # noqa: N802 (framework hook)
        if self.path == "/api/v1/health":
            body, status = envelope({"status": "healthy"}), 200
        else:
            body, status = envelope(error={"code": "NOT_FOUND", "message": "nope"}), 404
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class LoopbackTests(SynchronousTestCase):
    def serve(self) -> AgentUrl:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        self.addCleanup(thread.join)
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        return AgentUrl("127.0.0.1", server.server_address[1], secure=False)

    def test_http_transport(self) -> None:
        """The real transport talks HTTP to a loopback server and parses the envelope."""
        url = self.serve()
        agent = AgentClient(client.http_transport(url, None, 5))
        self.assertEqual(agent.health(), {"status": "healthy"})
        self.assertEqual(self.assertRaises(ClientError, agent.jobs).code, "NOT_FOUND")

    def test_refused(self) -> None:
        """A closed port is one line naming the address."""
        url = self.serve()
        transport = client.http_transport(AgentUrl("127.0.0.1", 1, False), None, 5)
        error = self.assertRaises(ClientError, AgentClient(transport).health)
        self.assertIn("127.0.0.1:1", str(error))
        del url

    def test_handshake_failure(self) -> None:
        """A server answering the upgrade with 404 raises HandshakeFailed (the poll trigger)."""
        url = self.serve()
        self.assertRaises(HandshakeFailed, list, client.websocket_events(url, None, JOB, 0,
                                                                          open_timeout=5))

    def test_websocket_loopback(self) -> None:
        """A real websockets server receives the subscribe and its events are yielded."""
        from websockets.sync.server import serve

        received: list[Any] = []

        def handler(connection: Any) -> None:
            received.append(connection.subprotocol)
            received.append(json.loads(connection.recv()))
            connection.send(json.dumps(event(1, "completed", 100)))
            connection.send(json.dumps(event(2, "completed", 100, name="job_complete")))
            for _ in connection:  # until the client closes normally
                pass

        offered = ["lpa.jobs.v1"]
        server = serve(handler, "127.0.0.1", 0, subprotocols=offered)  # type: ignore[arg-type]
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        self.addCleanup(thread.join)
        self.addCleanup(server.shutdown)
        url = AgentUrl("127.0.0.1", server.socket.getsockname()[1], secure=False)
        watcher = JobWatcher(AgentClient(lambda *a: (500, b"")), ProgressPrinter(io.StringIO()),
                             ws_events=lambda j, a: client.websocket_events(url, None, j, a))
        state = watcher.watch(JOB)
        self.assertEqual((state.status, state.seq), ("completed", 2))
        self.assertEqual(
            received, ["lpa.jobs.v1", {"action": "subscribe", "job_id": JOB, "after_seq": 0}]
        )


class TlsLoopbackTests(SynchronousTestCase):
    """The real transport over mutual TLS, against a stdlib server requiring client certs."""

    def serve(self) -> tuple[Any, int]:
        import ssl

        from tests.certs import make_test_pki

        pki = make_test_pki(self.mktemp())
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pki.server_cert, pki.server_key)
        context.load_verify_locations(pki.ca_cert)
        context.verify_mode = ssl.CERT_REQUIRED
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        self.addCleanup(thread.join)
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        return pki, server.server_address[1]

    def test_mutual_tls(self) -> None:
        """With the relay's certificate from LPA_* variables the client gets the envelope."""
        pki, port = self.serve()
        env = {"LPA_CERT": pki.good.cert, "LPA_KEY": pki.good.key, "LPA_CA": pki.ca_cert}
        args = parser().parse_args(["agent", f"localhost:{port}", "health"])
        out = io.StringIO()
        self.assertEqual(client.run(args, out=out, environ=env), 0)
        self.assertEqual(json.loads(out.getvalue()), {"status": "healthy"})

    def test_other_ca(self) -> None:
        """A server from another CA is refused with a one-line TLS error."""
        pki, port = self.serve()
        creds = Credentials(pki.good.cert, pki.good.key, pki.other_ca_cert)
        transport = client.http_transport(AgentUrl("localhost", port), creds.ssl_context(), 5)
        error = self.assertRaises(ClientError, AgentClient(transport).health)
        self.assertIn("TLS handshake", str(error))
