"""Tests for ``lpa agent URL ACTION`` (lpa.tools.agentcli): what each action prints, in human
form with headers and as --json, against a scripted agent (StubTreq) and a real agent over mTLS."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import tempfile
from typing import Any

from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from lpa.agent.model import CommandResult, JobOutcome, Patch
from lpa.errors import CommandFailedError
from lpa.tools import agentcli
from lpa.tools.client import ClientError
from tests.agentclient import start_agent
from tests.certs import make_test_pki
from tests.fakes import FakeBackend
from tests.test_client import JOB, ScriptedAgent, envelope
from tests.test_watch import FakeStream, completed, wire

READ_ACTIONS = ("health", "info", "packages", "patches", "jobs", "job", "events")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="lpa")
    agentcli.add_parser(top.add_subparsers(dest="command", required=True))
    return top


class ScriptedCommandTests(SynchronousTestCase):
    """Actions against a scripted agent through StubTreq, on a Clock."""

    def run_cli(self, argv: list[str], answers: dict[Any, Any], stream: Any = None,
                advance: int = 0) -> tuple[int, str, str]:
        self.agent = ScriptedAgent(answers)
        clock = Clock()
        out, err = io.StringIO(), io.StringIO()

        async def open_stream() -> Any:
            return stream

        running = Deferred.fromCoroutine(agentcli.execute(
            parser().parse_args(["agent", "agent.test", *argv]), reactor=None, clock=clock,
            out=out, err=err, environ={}, http=StubTreq(self.agent),
            open_stream=open_stream if stream is not None else None))
        for _ in range(advance):
            clock.advance(2)
        return self.successResultOf(running), out.getvalue(), err.getvalue()

    def test_help(self) -> None:
        """Every action has --help text, and every read action offers --json."""
        for action in (*READ_ACTIONS, "apply", "cancel", "watch"):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                self.assertRaises(SystemExit, parser().parse_args, ["agent", "h", action, "--help"])
            self.assertIn("usage: lpa agent", out.getvalue())
            self.assertIn("--json", out.getvalue(), action)

    def test_jobs_table(self) -> None:
        """jobs has a header and a dry-run column; --json is the agent's data."""
        data = {"jobs": [{"job_id": JOB, "status": "running", "operation": "patch_apply",
                          "dry_run": True, "created_at": "2026-11-25T20:15:18+00:00"},
                         {"job_id": "j2", "status": "failed", "operation": "install",
                          "error_code": "PKG_NOT_FOUND"}], "total": 2}
        answers = {("GET", "/api/v1/jobs?status=running&limit=5"): [(200, envelope(data))]}
        code, out, _ = self.run_cli(["jobs", "--status", "running", "--limit", "5"], answers)
        lines = out.splitlines()
        self.assertEqual(code, 0)
        self.assertEqual(lines[0].split(), ["JOB", "ID", "STATUS", "OPERATION", "DRY-RUN",
                                            "CREATED", "ERROR"])
        self.assertEqual(lines[1].split(), [JOB, "running", "patch_apply", "yes",
                                            "2026-11-25T20:15:18+00:00", "-"])
        self.assertEqual(lines[2].split(), ["j2", "failed", "install", "-", "-", "PKG_NOT_FOUND"])
        self.assertEqual(lines[-1], "2 jobs")
        _, out, _ = self.run_cli(["jobs", "--status", "running", "--limit", "5", "--json"],
                                 answers)
        self.assertEqual(json.loads(out), data)

    def test_patches_table(self) -> None:
        """patches has a header and a summary line."""
        answers = {("GET", "/api/v1/patches?security=true"): [(200, envelope({
            "patches": [{"name": "openssl", "current_version": "3.0.1", "available_version":
                         "3.0.2", "severity": "critical", "security": True}],
            "security_updates": 1, "requires_reboot": True}))]}
        code, out, _ = self.run_cli(["patches", "--security"], answers)
        lines = out.splitlines()
        self.assertEqual(code, 0)
        self.assertEqual(lines[0].split(), ["PACKAGE", "CURRENT", "AVAILABLE", "SEVERITY",
                                            "SECURITY", "REBOOT"])
        self.assertEqual(lines[1].split(), ["openssl", "3.0.1", "3.0.2", "critical", "yes", "-"])
        self.assertEqual(lines[-1], "1 patches (1 security); reboot required: yes")

    def test_json_on_every_read(self) -> None:
        """Every read action's --json prints the agent's data, whole, as stable JSON."""
        data = {"b": [1, {"nested": True}], "a": "x"}
        answers = {(m, p): [(200, envelope(data))] for m, p in (
            ("GET", "/api/v1/health"), ("GET", "/api/v1/system/info"),
            ("GET", "/api/v1/packages"), ("GET", "/api/v1/patches"), ("GET", "/api/v1/jobs"),
            ("GET", f"/api/v1/jobs/{JOB}"), ("GET", f"/api/v1/jobs/{JOB}/events?after=0"))}
        for action in READ_ACTIONS:
            argv = [action, JOB, "--json"] if action in ("job", "events") else [action, "--json"]
            code, out, err = self.run_cli(argv, answers)
            self.assertEqual((code, err), (0, ""), action)
            self.assertEqual(out, json.dumps(data, indent=2, sort_keys=True) + "\n", action)

    def test_human_reads(self) -> None:
        """health, info, packages, job and events have human forms with headers or labels."""
        answers = {
            ("GET", "/api/v1/health"): [(200, envelope({"status": "healthy", "version": "1"}))],
            ("GET", "/api/v1/system/info"): [(200, envelope({"hostname": "web1", "os": "Debian",
                                                              "pending_reboot": False}))],
            ("GET", "/api/v1/packages?upgradable=true"): [(200, envelope({"packages": [
                {"name": "curl", "version": "8.5", "status": "Upgradable",
                 "latest_version": "8.6"}]}))],
            ("GET", f"/api/v1/jobs/{JOB}"): [(200, envelope({
                "job_id": JOB, "status": "failed", "dry_run": False, "error": "exit 100",
                "error_code": "PKG_NOT_FOUND", "command_stderr": "E: Unable to locate package x",
                "logs": ["a", "b"], "changes": [{"name": "curl", "from": "1", "to": "2",
                                                 "action": "upgrade"}]}))],
            ("GET", f"/api/v1/jobs/{JOB}/events?after=1"): [(200, envelope({
                "events": [wire(2, message="Inst curl")], "last_seq": 2, "status": "running"}))],
        }
        self.assertEqual(self.run_cli(["health"], answers)[1],
                         "status:  healthy\nversion: 1\n")
        self.assertIn("hostname:       web1\nos:             Debian\npending_reboot: no",
                      self.run_cli(["info"], answers)[1])
        packages = self.run_cli(["packages", "--upgradable"], answers)[1].splitlines()
        self.assertEqual(packages[0].split(), ["NAME", "VERSION", "STATUS", "LATEST"])
        job = self.run_cli(["job", JOB], answers)[1]
        self.assertIn("error:     PKG_NOT_FOUND: exit 100", job)
        self.assertIn("  E: Unable to locate package x", job)
        self.assertIn("changes (1):", job)
        events = self.run_cli(["events", JOB, "--after", "1"], answers)[1].splitlines()
        self.assertEqual(events[0].split(), ["SEQ", "EVENT", "KIND", "STATUS", "PROGRESS",
                                             "MESSAGE"])
        self.assertEqual(events[-1], "1 events; last seq 2; status running")

    def test_cancel_running(self) -> None:
        """Cancelling a running job says the cancel was accepted, not 'job … running'."""
        answers = {("POST", f"/api/v1/jobs/{JOB}/cancel"): [
            (200, envelope({"job_id": JOB, "status": "running"}))]}
        code, out, _ = self.run_cli(["cancel", JOB], answers)
        self.assertEqual(code, 0)
        self.assertTrue(out.startswith(f"cancel of job {JOB} accepted; it was running and is "
                                       "stopping"), out)
        self.assertNotIn(f"job {JOB} running", out)

    def test_cancel_pending_and_too_late(self) -> None:
        """A pending job is cancelled at once; one that ended first says so (exit 1)."""
        path = ("POST", f"/api/v1/jobs/{JOB}/cancel")
        code, out, _ = self.run_cli(["cancel", JOB], {path: [(200, envelope(
            {"status": "cancelled"}))]})
        self.assertEqual((code, out), (0, f"job {JOB} cancelled\n"))
        code, out, _ = self.run_cli(["cancel", JOB], {path: [(200, envelope(
            {"status": "completed"}))]})
        self.assertEqual((code, out), (1, f"job {JOB} had already ended completed\n"))

    def test_cancel_watch_ends_with_final_state(self) -> None:
        """cancel --watch follows the job and ends with its final state, once."""
        stream = FakeStream([wire(1, message="Unpacking"),
                             wire(2, "cancelled", message="Job cancelled"),
                             wire(3, "cancelled", name="job_complete")])
        answers = {("POST", f"/api/v1/jobs/{JOB}/cancel"): [(200, envelope({"status": "running"}))],
                   ("GET", f"/api/v1/jobs/{JOB}"): [(200, envelope({"status": "cancelled",
                                                                    "dry_run": False}))]}
        code, out, _ = self.run_cli(["cancel", JOB, "--watch"], answers, stream)
        lines = out.splitlines()
        self.assertEqual(code, 0)
        self.assertEqual(lines[-1], f"job {JOB} cancelled: Job cancelled")
        self.assertEqual(sum(1 for line in lines if "cancelled" in line), 1)

    def test_apply_watch_final_state_once(self) -> None:
        """apply --dry-run --watch says DRY-RUN and prints the final state exactly once."""
        stream = FakeStream([wire(1, "pending"), wire(2, kind="output", message="Inst a"),
                             *completed(3)])
        answers = {("POST", "/api/v1/patches/apply"): [(202, envelope(
            {"job_id": JOB, "status": "pending"}))]}
        code, out, err = self.run_cli(["apply", "--dry-run", "--watch"], answers, stream)
        self.assertEqual((code, err), (0, ""))
        lines = out.splitlines()
        self.assertEqual(lines[0], f"job {JOB} pending (DRY-RUN)")
        self.assertEqual(lines[-1], f"job {JOB} completed (DRY-RUN): Job finished")
        self.assertEqual(sum(1 for line in lines if "completed" in line), 1)
        self.assertEqual(self.agent.requests[0][2], {"dry_run": True, "security_only": False})

    def test_watch_failure_reason(self) -> None:
        """watch shows why a job failed: error code, error and the package manager's E: line."""
        stream = FakeStream([wire(1, "failed", 100, "Command failed", error="exit 100",
                                  error_code="PKG_NOT_FOUND"),
                             wire(2, "failed", name="job_complete")])
        answers = {("GET", f"/api/v1/jobs/{JOB}"): [(200, envelope({
            "status": "failed", "dry_run": False, "command_stderr":
            "E: Unable to locate package nosuchpkg\n"}))]}
        code, out, _ = self.run_cli(["watch", JOB], answers, stream)
        self.assertEqual(code, 1)
        self.assertEqual(out.splitlines()[-2:], [
            f"job {JOB} failed: PKG_NOT_FOUND: exit 100",
            "  E: Unable to locate package nosuchpkg"])

    def test_watch_json(self) -> None:
        """watch --json prints each event as one JSON object and nothing else on stdout."""
        stream = FakeStream([wire(1), *completed(2)])
        code, out, _ = self.run_cli(["watch", JOB, "--json"], {}, stream)
        self.assertEqual(code, 0)
        self.assertEqual([json.loads(line)["seq"] for line in out.splitlines()], [1, 2, 3])
        self.assertEqual(self.agent.requests, [])

    def test_watch_poll(self) -> None:
        """--poll never opens the WebSocket."""
        answers = {("GET", f"/api/v1/jobs/{JOB}/events?after=0"): [(200, envelope({
            "events": completed(1), "last_seq": 2, "terminal": True}))],
            ("GET", f"/api/v1/jobs/{JOB}"): [(200, envelope({"dry_run": False}))]}
        stream = FakeStream([])
        code, _, err = self.run_cli(["watch", JOB, "--poll"], answers, stream)
        self.assertEqual((code, stream.sent, err), (0, [], "lpa: polling over REST (--poll)\n"))

    def test_errors_are_client_errors(self) -> None:
        """An error answer is raised for the CLI to print as one line."""
        self.agent = ScriptedAgent({})
        running = Deferred.fromCoroutine(agentcli.execute(
            parser().parse_args(["agent", "agent.test", "health"]), reactor=None, clock=Clock(),
            out=io.StringIO(), err=io.StringIO(), environ={}, http=StubTreq(self.agent)))
        self.assertIn("NOT_FOUND", str(self.failureResultOf(running, ClientError).value))


class RealAgentTests(TestCase):
    """The command against a real agent service over mutual TLS (FakeBackend behind it)."""

    timeout = 60

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="lpa-agentcli-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.pki = make_test_pki(os.path.join(self.tmp, "pki"))
        self.env = {"LPA_CERT": self.pki.good.cert, "LPA_KEY": self.pki.good.key,
                    "LPA_CA": self.pki.ca_cert}

    async def run_cli(self, port: int, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        args = parser().parse_args(["agent", f"localhost:{port}", *argv, "--interval", "0.1"]
                                   if argv[0] in ("watch", "apply", "cancel") else
                                   ["agent", f"localhost:{port}", *argv])
        code = await agentcli.execute(args, reactor=reactor, out=out, err=err, environ=self.env)
        return code, out.getvalue(), err.getvalue()

    async def test_dry_run_watch_and_jobs(self) -> None:
        """apply --dry-run --watch over the WebSocket, then jobs lists it as a dry run."""
        backend = FakeBackend(patches=[Patch(name="curl", current_version="1",
                                             available_version="2")])
        backend.script("patch_apply", outcome=JobOutcome(
            message="Dry run: 1 package(s) would change", changes=({"name": "curl"},)))
        _, port = await start_agent(self, self.pki, self.tmp, backend=backend)
        code, out, err = await self.run_cli(port, "apply", "--dry-run", "--watch")
        self.assertEqual((code, err), (0, ""))
        job_id = out.split()[1]
        self.assertEqual(out.splitlines()[-1],
                         f"job {job_id} completed (DRY-RUN): Dry run: 1 package(s) would change")
        self.assertEqual(out.count("completed"), 1)
        code, out, _ = await self.run_cli(port, "jobs")
        self.assertEqual(out.splitlines()[1].split()[:4],
                         [job_id, "completed", "patch_apply", "yes"])
        code, out, _ = await self.run_cli(port, "patches", "--json")
        self.assertEqual(json.loads(out)["patches"][0]["name"], "curl")

    async def test_failure_reason(self) -> None:
        """A job failing in the package manager: watch ends with its code, error and E: line."""
        backend = FakeBackend()
        result = CommandResult(argv=("apt-get", "install", "nosuchpkg"), exit_code=100,
                               stdout="Reading package lists...\n",
                               stderr="E: Unable to locate package nosuchpkg\n")
        backend.script("patch_apply", error=CommandFailedError(
            "apt-get install failed (exit 100)", result))
        _, port = await start_agent(self, self.pki, self.tmp, backend=backend)
        code, out, _ = await self.run_cli(port, "apply", "--packages", "nosuchpkg", "--watch")
        self.assertEqual(code, 1)
        self.assertEqual(out.splitlines()[-1], "  E: Unable to locate package nosuchpkg")
        self.assertRegex(out.splitlines()[-2], r"^job \S+ failed: PKG_NOT_FOUND: ")

    async def test_cancel_running_job(self) -> None:
        """Cancelling a running job is accepted; with --watch it ends 'cancelled' (exit 0)."""
        backend = FakeBackend()  # a real, harmless command the agent kills on cancel
        backend.script("patch_apply", progress=[(30, "Unpacking")], commands=[["sleep", "60"]])
        service, port = await start_agent(self, self.pki, self.tmp, backend=backend)
        code, out, _ = await self.run_cli(port, "apply")
        job_id = out.split()[1]
        while json.loads((await self.run_cli(port, "job", job_id, "--json"))[1])["status"] \
                != "running":
            await deferLater(reactor, 0.05, lambda: None)
        code, out, err = await self.run_cli(port, "cancel", job_id, "--watch")
        self.assertEqual((code, err), (0, ""), out)
        lines = out.splitlines()
        self.assertEqual(lines[0], f"cancel of job {job_id} accepted; it was running and is "
                                   "stopping")
        self.assertEqual(lines[-1], f"job {job_id} cancelled: Job cancelled")
        del service

    async def test_watch_over_polling(self) -> None:
        """With the WebSocket disabled watch polls the events endpoint and still ends once."""
        _, port = await start_agent(self, self.pki, self.tmp,
                                    extra="websocket:\n  enabled: false\n")
        code, out, _ = await self.run_cli(port, "apply", "--dry-run")
        job_id = out.split()[1]
        code, out, err = await self.run_cli(port, "watch", job_id)
        self.assertEqual(code, 0)
        self.assertIn("WebSocket handshake failed", err)
        self.assertEqual(out.count(f"job {job_id} completed (DRY-RUN)"), 1)

    async def test_watch_original_agent(self) -> None:
        """The original agent (stub handshake, no events path): watch polls the job detail."""
        from tests.fakeagents import StubHandshakeAgent

        stub = StubHandshakeAgent(reactor)
        port = stub.listen(self.pki.server_options(crl_path=None))
        self.addCleanup(stub.kill)
        job_id = stub.add_job(status="running")
        stub.set_state(job_id, "timedout", error="Job exceeded its timeout")
        code, out, err = await self.run_cli(port, "watch", job_id)
        self.assertEqual(code, 1)
        self.assertIn("WebSocket handshake failed", err)
        self.assertEqual(out.splitlines()[-1],
                         f"job {job_id} timed_out: Job exceeded its timeout")
        self.assertIn(f"/api/v1/jobs/{job_id}/events?after=0", stub.requests)
        self.assertIn(f"/api/v1/jobs/{job_id}", stub.requests)
