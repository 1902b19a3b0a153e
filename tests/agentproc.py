"""Real ``lpa-agent`` and ``lpa-relay`` processes for fault tests (kill -9, restart, stop).

:class:`AgentProcess` runs ``twistd -n lpa-agent`` inside a private mount namespace
(``unshare --mount --propagation private``) in which every package-manager and reboot command is
a stand-in from :mod:`tests.standin`, bind-mounted over the real executable::

    unshare -m ─ sh: mount --bind standin/bin/apt-get /usr/bin/apt-get (… each command)
                     apt-get --lpa-standin-probe        (must print "lpa-standin apt-get")
                     exec twistd -n lpa-agent --config agent.yaml

:meth:`AgentProcess.start` returns only once the agent answers ``/api/v1/health`` over mutual TLS
*and* ``GET /api/v1/packages/lpa-standin-probe`` finds the probe package, i.e. the agent's own
runner reaches the stand-ins: no request can reach this machine's apt.  The agent keeps its port
and state directory across restarts.  :class:`RelayProcess` runs ``twistd -n lpa-relay`` the same
way without a namespace.

The agent runs each package-manager command detached, in a session of its own that outlives
it (``state_dir/runs/``): the stand-in keeps running through ``kill()`` and ``restart()``, as the
real one would, and :meth:`AgentProcess.cleanup` ends those sessions too.  A stand-in can stop
the agent from inside a job (as the maintainer script of an upgraded ``lpa-agent`` restarts it)
with :meth:`AgentProcess.restart_command`; the test then starts it again with ``start()``, as
systemd's restart would.

Both are for trial's async ``TestCase``; they wait for readiness by polling (a process start is
not driven by a clock we own), never to show that nothing happened.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shlex
import signal
import subprocess
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater

from lpa.tools.demo_processes import daemon_env, free_port
from tests import standin
from tests.agentclient import mtls_client
from tests.certs import TestPki

_TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n"]


class ProcessFailed(AssertionError):
    """A daemon exited or never became ready; the message carries the tail of its log."""


def _tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, errors="replace") as stream:
            return "".join(stream.readlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


async def wait_until(predicate: Any, what: str, timeout: float = 30.0, step: float = 0.1) -> None:
    """Poll ``predicate()`` (may return a Deferred/coroutine result) until true or ``timeout``."""
    deadline = reactor.seconds() + timeout
    while True:
        value = predicate()
        if hasattr(value, "__await__"):
            value = await value
        if value:
            return
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for: {what}")
        await deferLater(reactor, step, lambda: None)


class _Daemon:
    """One twistd daemon process in its own session (so its group can be signalled)."""

    tapname = ""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self.log_path = os.path.join(directory, f"{self.tapname}.log")
        self.config_path = ""
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def twistd_argv(self) -> list[str]:
        return [
            *_TWISTD,
            f"--pidfile={os.path.join(self.directory, self.tapname + '.pid')}",
            f"--logfile={self.log_path}",
            self.tapname,
            "--config",
            self.config_path,
        ]

    def argv(self) -> list[str]:
        return self.twistd_argv()

    def spawn(self) -> None:
        if self.running:
            raise RuntimeError(f"{self.tapname} is already running")
        self.starts += 1
        with open(self.log_path, "a") as log:
            log.write(f"--- start {self.starts} ---\n")
        # the child keeps its own copy of the descriptor; ours is closed once it is started
        with open(os.path.join(self.directory, "stdout.log"), "ab") as stdout:
            self.process = subprocess.Popen(
                self.argv(),
                env=daemon_env(),
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log_text(self) -> str:
        try:
            with open(self.log_path, errors="replace") as stream:
                return stream.read()
        except FileNotFoundError:
            return ""

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise ProcessFailed(
                f"{self.tapname} exited with {self.process.returncode}:\n{_tail(self.log_path)}"
                f"\nstdout:\n{_tail(os.path.join(self.directory, 'stdout.log'))}"
            )

    def kill(self, signum: int = signal.SIGKILL) -> None:
        """Signal the daemon process only (children in their own sessions are left alone)."""
        if self.running:
            os.kill(self.pid, signum)
            if signum == signal.SIGKILL:
                self.process.wait()  # type: ignore[union-attr]

    async def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait for the exit (SIGKILL after ``timeout``); return the exit status."""
        if not self.running:
            return self.process.returncode if self.process is not None else None
        os.kill(self.pid, signal.SIGTERM)
        try:
            await wait_until(lambda: not self.running, f"{self.tapname} to stop", timeout)
        except AssertionError:
            self.kill()
        assert self.process is not None
        return self.process.returncode

    def cleanup(self) -> None:
        """For addCleanup: kill the daemon's whole session, whatever state it is in."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def kill_runs(state_dir: str) -> None:
    """SIGKILL every package-manager command the agent left running, and its wrapper."""
    root = os.path.join(state_dir, "runs")
    for started in glob.glob(os.path.join(root, "*", "*", "started")):
        try:
            with open(started) as stream:
                pids = json.load(stream)
        except (OSError, ValueError):
            continue
        for kill, target in ((os.killpg, pids.get("pgid")), (os.kill, pids.get("pid"))):
            if isinstance(target, int) and target > 1:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    kill(target, signal.SIGKILL)


class AgentProcess(_Daemon):
    """An ``lpa-agent`` process with stand-in package-manager commands (see module docstring).

    :param directory: holds the config, state dir, log, and ``standin/`` (scripts, record,
        scenario).
    :param scenario: overrides of :data:`tests.standin.DEFAULT_SCENARIO`.
    :param extra_yaml: appended to the agent's YAML config (top-level keys).
    """

    tapname = "lpa-agent"

    def __init__(
        self, directory: str, pki: TestPki, *, extra_yaml: str = "", **scenario: Any
    ) -> None:
        super().__init__(directory)
        self.pki = pki
        self.port = free_port()
        self.state_dir = os.path.join(directory, "state")
        self.standin_dir = os.path.join(directory, "standin")
        self.scripts = standin.install_standins(self.standin_dir, **scenario)
        self.config_path = os.path.join(directory, "agent.yaml")
        with open(self.config_path, "w") as stream:
            stream.write(
                "server:\n  bind: 127.0.0.1\n"
                f"  port: {self.port}\n"
                f"tls:\n  ca_cert: {pki.ca_cert}\n  server_cert: {pki.server_cert}\n"
                f"  server_key: {pki.server_key}\n  crl_path: {pki.crl}\n"
                f"state_dir: {self.state_dir}\n"
                "package_manager:\n  backend: apt\n" + extra_yaml
            )
        self.url = f"https://localhost:{self.port}"

    def argv(self) -> list[str]:
        mounts = []
        for command, script in self.scripts.items():
            for target in standin.COMMANDS[command]:
                if os.path.exists(target) and not os.path.islink(target):
                    mounts.append(f"mount --bind {shlex.quote(script)} {shlex.quote(target)}")
        probe = (
            'test "$(apt-get --lpa-standin-probe)" = "lpa-standin apt-get" '
            '|| { echo "stand-ins not in effect" >&2; exit 97; }'
        )
        script = "set -e; " + "; ".join(mounts) + f"; {probe}; exec " + shlex.join(
            self.twistd_argv()
        )
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]

    @property
    def pidfile(self) -> str:
        return os.path.join(self.directory, self.tapname + ".pid")

    def restart_command(self) -> list[str]:
        """An argv that stops this agent as ``systemctl restart`` does its first half: SIGTERM
        to the pid in twistd's pidfile, then wait (up to 60 s) until that process is gone."""
        script = "\n".join([
            "import os, signal, sys, time",
            f"pid = int(open({self.pidfile!r}).read())",
            "os.kill(pid, signal.SIGTERM)",
            "deadline = time.time() + 60",
            "while time.time() < deadline:",
            "    try:",
            "        state = open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[0]",
            "    except OSError:",
            "        sys.exit(0)",
            "    if state == 'Z':",
            "        sys.exit(0)",
            "    time.sleep(0.05)",
            "sys.exit(1)",
        ])
        return [sys.executable, "-c", script]

    def cleanup(self) -> None:
        super().cleanup()
        kill_runs(self.state_dir)

    def set_scenario(self, **overrides: Any) -> None:
        """Change what the stand-ins do from their next invocation on."""
        standin.write_scenario(self.standin_dir, **overrides)

    def record(self) -> list[dict[str, Any]]:
        return standin.read_record(self.standin_dir)

    def client(self) -> Any:
        """A treq client with the good client certificate; its pool is closed at cleanup."""
        return mtls_client(self.pki.client_options("good"))

    async def request(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        """One request on a fresh connection: (status, decoded JSON envelope)."""
        http, pool = self.client()
        try:
            response = await http.request(method, self.url + path, **kwargs)
            body = await response.content()
        finally:
            await pool.closeCachedConnections()
        try:
            return response.code, json.loads(body)
        except ValueError:
            return response.code, body

    async def _answers(self) -> bool:
        self.check_alive()
        try:
            code, _ = await self.request("GET", "/api/v1/health")
        except Exception:
            return False
        return code == 200

    async def start(self, timeout: float = 30.0) -> None:
        """Spawn (or respawn) the agent; return once it answers and the stand-ins are proven."""
        self.spawn()
        await wait_until(self._answers, "the agent to answer /api/v1/health", timeout)
        code, body = await self.request("GET", f"/api/v1/packages/{standin.PROBE_PACKAGE}")
        if code != 200 or body["data"]["name"] != standin.PROBE_PACKAGE:
            self.cleanup()
            raise ProcessFailed(f"the agent does not see the stand-ins: {code} {body}")

    async def restart(self, timeout: float = 30.0) -> None:
        """Start again after a kill or a stop (same port, same state directory)."""
        if self.running:
            await self.stop()
        await self.start(timeout)


class RelayProcess(_Daemon):
    """An ``lpa-relay`` process from a manager-shaped TOML config.

    :param toml: the whole config text (``[database] url`` and the ``[security]`` paths).
    """

    tapname = "lpa-relay"

    def __init__(self, directory: str, toml: str) -> None:
        super().__init__(directory)
        self.config_path = os.path.join(directory, "relay.toml")
        with open(self.config_path, "w") as stream:
            stream.write(toml)

    async def start(self, ready_line: str = "relay store connected", timeout: float = 30.0) -> None:
        """Spawn (or respawn) the relay; return once its log says ``ready_line``."""
        before = self.log_text().count(ready_line)
        self.spawn()

        def ready() -> bool:
            self.check_alive()
            return self.log_text().count(ready_line) > before

        await wait_until(ready, f"the relay to log {ready_line!r}", timeout)


def relay_toml(dsn: str, pki: TestPki, *, ops_port: int | None = None, **worker: Any) -> str:
    """A manager-shaped relay config for tests: short intervals unless overridden.

    The ops port is off unless ``ops_port`` is given (0: any free port), so relays started side
    by side do not all try its default port.
    """
    keys = {
        "ws_relay_poll_interval_secs": 1,
        "ws_relay_scan_interval_secs": 1,
        "ws_relay_reconnect_initial_delay_secs": 1,
        "ws_relay_reconnect_max_delay_secs": 2,
        **worker,
    }
    lines = "\n".join(f"{key} = {json.dumps(value)}" for key, value in keys.items())
    return (
        f"[database]\nurl = {json.dumps(dsn)}\n\n[worker]\n{lines}\n\n"
        f"[security]\nagent_client_cert_path = {json.dumps(pki.good.cert)}\n"
        f"agent_client_key_path = {json.dumps(pki.good.key)}\n"
        f"ca_cert_path = {json.dumps(pki.ca_cert)}\n\n[logging]\nformat = \"text\"\n\n"
        + ("[ops]\nenabled = false\n" if ops_port is None else f"[ops]\nport = {ops_port}\n")
    )
