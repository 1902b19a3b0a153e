"""The demo's daemons as processes: started in their own sessions, stopped by group, and a
demo kept running by ``--keep`` found again (``lpa demo --stop``) from its state file.

A pid read back from the state file is signalled only while its command line still names the
demo's state directory, so a reused pid is never signalled.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TextIO

from lpa.errors import LpaError

#: the kept demo's pids and PostgreSQL cluster, in the state directory
STATE_FILE = "demo.json"


class DemoError(LpaError):
    """A step of the demo failed; ``str()`` is the one line printed before the non-zero exit."""


class Child(Protocol):
    """What the demo reads of a daemon it started (a ``subprocess.Popen``)."""

    @property
    def returncode(self) -> int | Any: ...

    def poll(self) -> int | None: ...


def free_port(host: str = "127.0.0.1", wanted: int = 0) -> int:
    """``wanted`` if it is free on ``host`` (0: any), else a port the system picks."""
    for port in (wanted, 0) if wanted else (0,):
        with socket.socket() as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return int(probe.getsockname()[1])
    raise DemoError(f"no free port on {host}")  # pragma: no cover - bind to port 0 failed



def _code_root() -> str:
    """The directory holding the ``lpa`` package (a checkout or site-packages)."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def daemon_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The daemons' environment: ours, lpa importable, no stray manager overrides."""
    env = dict(os.environ if environ is None else environ)
    for name in list(env):
        if name.startswith("PATCH_MANAGER__") or name == "PATCH_MANAGER_CONFIG":
            del env[name]
    paths = [_code_root()] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def twistd_argv(tapname: str, config: str, state_dir: str) -> list[str]:
    """``twistd -n TAP --config FILE`` with its own pid file and log file in the state dir."""
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
            f"--pidfile={os.path.join(state_dir, tapname + '.pid')}",
            f"--logfile={os.path.join(state_dir, tapname + '.log')}",
            tapname, "--config", config]


class Processes:
    """The daemons we started; each in its own session so it and its helpers stop together."""

    def __init__(self, popen: Callable[..., subprocess.Popen[bytes]] = subprocess.Popen) -> None:
        self._popen = popen
        self.started: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: Sequence[str], *, env: dict[str, str], cwd: str,
              log_path: str) -> subprocess.Popen[bytes]:
        with open(log_path + ".stdout", "ab") as output:
            process = self._popen(list(argv), env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                  stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        self.started[name] = process
        return process

    def stop_all(self, grace: float = 15.0) -> list[str]:
        """SIGTERM every group, wait up to ``grace``, then SIGKILL; return what had to be killed.

        Each daemon leads its own process group.  Signals go to a group only while its leader
        is alive or an unreaped zombie (``waitid`` with ``WNOWAIT``), so the group id cannot
        have been reused by an unrelated process; once the leader has exited, whatever is left
        of its group (a helper forked as the TERM arrived) gets SIGKILL, then the leader is
        reaped.
        """
        live = {name: p for name, p in self.started.items() if p.returncode is None}
        for process in live.values():
            _signal_group(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        killed = []
        for name, process in live.items():
            while not _exited(process.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if not _exited(process.pid):
                killed.append(name)
                _signal_group(process.pid, signal.SIGKILL)
                while not _exited(process.pid):
                    time.sleep(0.05)
            _signal_group(process.pid, signal.SIGKILL)  # leftovers; the zombie holds the id
            process.wait()
        self.started.clear()
        return killed


def _exited(pid: int) -> bool:
    """Whether child ``pid`` has exited, WITHOUT reaping it (its pid stays reserved)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # already reaped elsewhere
        return True


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def log_tail(path: str, lines: int = 15) -> str:
    collected: list[str] = []
    for candidate in (path, path + ".stdout"):
        try:
            with open(candidate, encoding="utf-8", errors="replace") as handle:
                collected.extend(handle.read().splitlines())
        except OSError:
            continue
    return "\n".join([line for line in collected if line.strip()][-lines:])


def check_alive(processes: Processes, state_dir: str) -> None:
    for name, process in processes.started.items():
        if process.poll() is not None:
            raise DemoError(f"{name} exited with status {process.returncode}; its log:\n"
                            f"{log_tail(os.path.join(state_dir, name + '.log'))}")


def lpa_command() -> str:
    """How to run ``lpa`` from this environment (the venv's script may not be on PATH)."""
    script = os.path.join(os.path.dirname(sys.executable), "lpa")
    if os.access(script, os.X_OK):
        return script if shutil.which("lpa") != script else "lpa"
    return f"{sys.executable} -m lpa"


def is_demo_daemon(pid: Any, state_dir: str) -> bool:
    """Whether ``pid`` is still a daemon of the demo in ``state_dir`` (its argv names the dir).

    A pid from a state file may have been reused by an unrelated process since; we never signal
    a process whose command line does not name our state directory.
    """
    try:
        with open(f"/proc/{int(pid)}/cmdline", "rb") as handle:
            argv = handle.read().split(b"\0")
    except (OSError, ValueError, TypeError):
        return False
    marker = os.path.abspath(state_dir).encode()
    return any(arg.startswith(b"--pidfile=" + marker + b"/") for arg in argv)


def kept_demo_running(state_dir: str) -> list[str]:
    """Names of daemons a previous ``--keep`` run left alive in ``state_dir``."""
    try:
        with open(os.path.join(os.path.abspath(state_dir), STATE_FILE), encoding="utf-8") as handle:
            pids = json.load(handle).get("pids", {})
    except (OSError, ValueError, AttributeError):
        return []
    return [name for name, pid in pids.items() if is_demo_daemon(pid, state_dir)]


def stop_kept(state_dir: str, out: TextIO) -> int:
    """Stop what ``lpa demo --keep`` left running (pids and cluster from the state file)."""
    path = os.path.join(os.path.abspath(state_dir), STATE_FILE)
    try:
        with open(path, encoding="utf-8") as handle:
            state = json.load(handle)
    except (OSError, ValueError):
        raise DemoError(f"no kept demo in {state_dir} ({path} missing or unreadable)") from None
    for name, pid in state.get("pids", {}).items():
        if not is_demo_daemon(pid, state_dir):
            out.write(f"demo: {name} (pid {pid}) was not running\n")
            continue
        _signal_group(int(pid), signal.SIGTERM)
        for _ in range(150):
            if not is_demo_daemon(pid, state_dir):
                break
            time.sleep(0.1)
        else:
            _signal_group(int(pid), signal.SIGKILL)
        out.write(f"demo: stopped {name} (pid {pid})\n")
    if state.get("postgres"):
        from lpa.tools.pgcluster import PostgresCluster

        cluster = PostgresCluster(state["postgres"], bin_dir=state.get("postgres_bin"))
        cluster.running = True
        try:
            cluster.stop()
        except LpaError as error:
            out.write(f"demo: PostgreSQL stop: {str(error).splitlines()[0]}\n")
        shutil.rmtree(state["postgres"], ignore_errors=True)
        out.write(f"demo: stopped PostgreSQL ({state['postgres']})\n")
    os.remove(path)
    return 0
