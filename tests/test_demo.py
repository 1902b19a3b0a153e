"""Tests for ``lpa demo``: its generated configs and process handling.

The whole run, in real processes, is tests/system/test_demo_run.py.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from lpa.tools import demo, demo_config, demo_processes
from lpa.tools.demo_processes import DemoError, Processes
from lpa.tools.pgcluster import PostgresNotFound
from tests.procs import live_in_group


class ConfigTests(SynchronousTestCase):
    def test_relay_toml(self) -> None:
        """The generated relay.toml loads with the relay's loader, fast intervals, our files."""
        from lpa.relay.config import parse_relay_config

        config = parse_relay_config(
            demo_config.relay_toml(dsn="postgresql://postgres@/lpa_demo?host=%2Ftmp%2Fx&port=5432",
                            pki_dir="/s/pki"), "relay.toml", environ={})
        self.assertEqual(config.database_url,
                         "postgresql://postgres@/lpa_demo?host=%2Ftmp%2Fx&port=5432")
        self.assertEqual((config.poll_interval, config.scan_interval), (1.0, 1.0))
        self.assertEqual(config.client_cert_path, "/s/pki/client.crt")

    def test_agent_yaml(self) -> None:
        """The generated agent.yaml loads with the agent's loader on loopback with our PKI."""
        from lpa.agent.config import parse_agent_config

        text = demo_config.agent_yaml(port=4443, pki_dir="/s/pki", state_dir="/s/a")
        config = parse_agent_config(text)
        self.assertEqual((config.server.bind, config.server.port), ("127.0.0.1", 4443))
        self.assertEqual(config.tls.server_key, "/s/pki/server.key.pem")
        self.assertEqual(config.state_dir, "/s/a")
        self.assertEqual(tuple(config.warnings), ())

    def test_daemon_env(self) -> None:
        """The daemons get lpa on PYTHONPATH and none of the caller's manager overrides."""
        env = demo_processes.daemon_env({"PATCH_MANAGER__DATABASE__URL": "x",
                                         "PATCH_MANAGER_CONFIG": "y",
                                         "PYTHONPATH": "/extra", "HOME": "/h"})
        self.assertNotIn("PATCH_MANAGER__DATABASE__URL", env)
        self.assertNotIn("PATCH_MANAGER_CONFIG", env)
        self.assertEqual(env["PYTHONPATH"].split(os.pathsep)[1:], ["/extra"])
        self.assertTrue(os.path.isdir(os.path.join(env["PYTHONPATH"].split(os.pathsep)[0], "lpa")))

    def test_free_port(self) -> None:
        """The wanted port when free (README's commands use 12443), another one when taken."""
        port = demo_processes.free_port()
        self.assertEqual(demo_processes.free_port(wanted=port), port)
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            busy = taken.getsockname()[1]
            self.assertNotEqual(demo_processes.free_port(wanted=busy), busy)

    def test_twistd_argv(self) -> None:
        """Each daemon gets its own pid file and log file (two twistd in one cwd would clash)."""
        argv = demo_processes.twistd_argv("lpa-agent", "/s/agent.yaml", "/s")
        self.assertEqual(argv[1:4], ["-c", "from twisted.scripts.twistd import run; run()", "-n"])
        self.assertIn("--pidfile=/s/lpa-agent.pid", argv)
        self.assertEqual(argv[-3:], ["lpa-agent", "--config", "/s/agent.yaml"])


class EnsurePostgresTests(SynchronousTestCase):
    def missing(self) -> str:
        raise PostgresNotFound("no initdb")

    def test_not_root(self) -> None:
        """Without the binaries and without root: one line saying how to install them."""
        error = self.assertRaises(DemoError, demo.ensure_postgres, io.StringIO(),
                                  find_bin_dir=self.missing, is_root=False,
                                  apt_get="/usr/bin/apt-get")
        self.assertIn("apt-get install -y postgresql", str(error))

    def test_root_installs(self) -> None:
        """As root with apt-get, postgresql is installed non-interactively."""
        calls: list[list[str]] = []
        found: Iterator[Exception | str] = iter(
            [PostgresNotFound("no"), "/usr/lib/postgresql/15/bin"]
        )

        def find() -> str:
            item = next(found)
            if isinstance(item, Exception):
                raise item
            return item

        def run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
            calls.append(argv)
            env = kw["env"]
            assert isinstance(env, dict)
            self.assertEqual(env["DEBIAN_FRONTEND"], "noninteractive")
            return subprocess.CompletedProcess(argv, 0)

        out = io.StringIO()
        demo.ensure_postgres(out, run=run, find_bin_dir=find, is_root=True, apt_get="/x/apt-get")
        self.assertEqual(calls, [["apt-get", "install", "-y", "-q", "postgresql"]])
        self.assertIn("installing PostgreSQL", out.getvalue())


class ProcessesTests(SynchronousTestCase):
    def test_stop_all_group(self) -> None:
        """stop_all ends a daemon and the children of its session."""
        directory = self.mktemp()
        os.makedirs(directory)
        processes = Processes()
        process = processes.start(
            "sleeper", ["/bin/sh", "-c", "sleep 60 & sleep 60; wait"], env=dict(os.environ),
            cwd=directory, log_path=os.path.join(directory, "sleeper.log"))
        time.sleep(0.2)
        self.assertEqual(processes.stop_all(grace=5), [])
        self.assertIsNotNone(process.returncode)
        for _ in range(100):  # SIGKILL is delivered asynchronously
            if not live_in_group(process.pid):
                break
            time.sleep(0.02)
        self.assertEqual(live_in_group(process.pid), [])

    def test_stop_all_kills_stubborn(self) -> None:
        """A daemon ignoring SIGTERM is SIGKILLed after the grace period and named."""
        directory = self.mktemp()
        os.makedirs(directory)
        processes = Processes()
        processes.start("stubborn", ["/bin/sh", "-c", "trap '' TERM; sleep 60"],
                        env=dict(os.environ), cwd=directory,
                        log_path=os.path.join(directory, "stubborn.log"))
        time.sleep(0.2)
        self.assertEqual(processes.stop_all(grace=0.5), ["stubborn"])

    def test_log_tail(self) -> None:
        """log_tail returns the last lines of a daemon's log and its captured stdout."""
        path = self.mktemp()
        with open(path, "w") as handle:
            handle.write("\n".join(f"line {n}" for n in range(30)))
        with open(path + ".stdout", "w") as handle:
            handle.write("Traceback: boom\n")
        self.assertEqual(demo_processes.log_tail(path, 2), "line 29\nTraceback: boom")


class CommandLineTests(SynchronousTestCase):
    def test_help(self) -> None:
        """lpa demo --help says what it does."""
        top = argparse.ArgumentParser(prog="lpa")
        demo.add_parser(top.add_subparsers())
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            self.assertRaises(SystemExit, top.parse_args, ["demo", "--help"])
        self.assertIn("pg_notify", out.getvalue())

    def test_stop_without_state(self) -> None:
        """--stop with no kept demo is one clear line."""
        error = self.assertRaises(DemoError, demo_processes.stop_kept, self.mktemp(), io.StringIO())
        self.assertIn("no kept demo", str(error))


class KeptDemoTests(SynchronousTestCase):
    def test_running_kept_demo_refused(self) -> None:
        """A second demo over kept daemons that still run refuses; a reused pid is not ours."""
        state_dir = self.mktemp()
        os.makedirs(state_dir)
        # One process whose argv names the state dir, as a kept daemon's does.  Not `sh -c sleep`:
        # killing the shell would leave its sleep holding the test run's stdout for a minute.
        sleeper = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(60)",
             "--pidfile=" + os.path.abspath(state_dir) + "/x.pid"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        self.addCleanup(lambda: self.assertEqual(live_in_group(sleeper.pid), []))
        self.addCleanup(sleeper.wait)
        self.addCleanup(sleeper.kill)
        for _ in range(100):  # until the child has exec'd (its argv names the state dir)
            if demo_processes.is_demo_daemon(sleeper.pid, state_dir):
                break
            time.sleep(0.05)
        with open(os.path.join(state_dir, demo_processes.STATE_FILE), "w") as handle:
            json.dump({"pids": {"lpa-agent": sleeper.pid, "lpa-relay": os.getpid()}}, handle)
        self.assertEqual(demo_processes.kept_demo_running(state_dir), ["lpa-agent"])
        out = io.StringIO()
        running = Deferred.fromCoroutine(
            demo.Demo(state_dir, keep=False, timeout=1, out=out).run(reactor))
        self.assertIn("demo --stop", str(self.failureResultOf(running, DemoError).value))

    def test_stop_skips_reused_pid(self) -> None:
        """--stop never signals a pid from the state file that is not our daemon any more."""
        state_dir = self.mktemp()
        os.makedirs(state_dir)
        with open(os.path.join(state_dir, demo_processes.STATE_FILE), "w") as handle:
            json.dump({"pids": {"lpa-agent": os.getpid()}}, handle)
        out = io.StringIO()
        self.assertEqual(demo_processes.stop_kept(state_dir, out), 0)
        self.assertIn("was not running", out.getvalue())

    def test_nothing_kept(self) -> None:
        """No state file means nothing is running."""
        self.assertEqual(demo_processes.kept_demo_running(self.mktemp()), [])


class AgentFailureTests(SynchronousTestCase):
    def test_detail(self) -> None:
        """A failed job is explained with the agent's error code, error and stderr tail."""
        from tests.test_client import envelope, scripted

        client, _ = scripted({("GET", "/api/v1/jobs/j1"): [(200, envelope({
            "error_code": "DEPENDENCY_CONFLICT", "error": "Command failed (exit 100)",
            "command_stderr": "W: one\nE: Broken packages\n"}))]})
        explain = demo.agent_failure
        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(explain(client, "j1"))),
                         ": DEPENDENCY_CONFLICT; Command failed (exit 100); "
                         "stderr: W: one | E: Broken packages")
        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(explain(client, None))), "")
        self.assertIn("unavailable", self.successResultOf(Deferred.fromCoroutine(
            explain(client, "j2"))))


class WaitForAgentTests(SynchronousTestCase):
    class _Process:
        def __init__(self, returncode: int | None) -> None:
            self.returncode = returncode

        def poll(self) -> int | None:
            return self.returncode

    def test_polls_until_healthy(self) -> None:
        """Health is asked every 0.3 s on the clock until the agent answers."""
        from twisted.internet.task import Clock

        from tests.test_client import envelope, scripted

        clock = Clock()
        client, agent = scripted({("GET", "/api/v1/health"): [
            (503, envelope(error={"code": "STARTING", "message": "not yet"})),
            (200, envelope({"status": "healthy", "version": "1"}))]}, clock)
        waiting = Deferred.fromCoroutine(demo.wait_for_agent(
            client, self._Process(None), "/nonexistent.log", clock=clock))
        self.assertNoResult(waiting)
        clock.advance(0.3)
        self.assertEqual(self.successResultOf(waiting)["version"], "1")
        self.assertEqual(len(agent.requests), 2)

    def test_agent_died(self) -> None:
        """An agent that exited is reported with its status and log tail at once."""
        from twisted.internet.task import Clock

        from tests.test_client import scripted

        log = self.mktemp()
        with open(log, "w") as handle:
            handle.write("CRITICAL: port in use\n")
        client, _ = scripted({})
        waiting = Deferred.fromCoroutine(demo.wait_for_agent(
            client, self._Process(3), log, clock=Clock()))
        error = str(self.failureResultOf(waiting, DemoError).value)
        self.assertIn("exited with status 3", error)
        self.assertIn("port in use", error)
