"""``lpa demo``: the whole pipeline on this machine, on embedded defaults, then clean up.

::

    PostgreSQL (throwaway cluster) ◀── lpa db migrate
         ▲  pg_notify('job_update')          LISTEN job_update ──▶ progress lines, summary
         │
    lpa-relay (twistd) ──wss + mTLS──▶ lpa-agent (twistd, 127.0.0.1:free port, real apt, dry run)
                                          ▲
    lpa dispatch: job + host rows ────────┘ POST /api/v1/patches/apply {dry_run: true}

Everything lives in the state directory (``.demo/`` by default): dev PKI, generated
``agent.yaml`` and ``relay.toml``, the agent's state and both daemons' logs; the PostgreSQL
cluster lives in a private temporary directory (the ``postgres`` user must be able to reach it
when we are root).  Exit 0 when the job-level notification arrived and the job succeeded;
otherwise one line saying what went wrong and a non-zero exit.  Everything started is stopped on
the way out, also on Ctrl-C and SIGTERM, unless ``--keep``; ``lpa demo --stop`` stops a kept demo.

The demo runs on the reactor (:mod:`lpa.tools.runner`), as the agent client and ``lpa dispatch``
do; its one-shot set-up steps (PostgreSQL, PKI, starting the daemons) are plain blocking calls
made before anything else runs, and Ctrl-C or SIGTERM cancels it, which stops what it started.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from lpa.errors import LpaError
from lpa.tools import runner
from lpa.tools.client import AgentClient, AgentUrl, ClientError, Credentials, make_http_client
from lpa.tools.demo_config import (
    AGENT_HOST,
    DEFAULT_AGENT_PORT,
    DEFAULT_METRICS_PORT,
    DEFAULT_OPS_PORT,
    agent_yaml,
    relay_toml,
)
from lpa.tools.demo_processes import (
    STATE_FILE,
    Child,
    DemoError,
    Processes,
    check_alive,
    daemon_env,
    free_port,
    kept_demo_running,
    log_tail,
    lpa_command,
    stop_kept,
    twistd_argv,
)

DEFAULT_STATE_DIR = ".demo"
DEFAULT_TIMEOUT = 300.0


# --- steps ------------------------------------------------------------------------------------


def ensure_postgres(
    out: TextIO, *, run: Callable[..., Any] = subprocess.run,
    find_bin_dir: Callable[[], str] | None = None, is_root: bool | None = None,
    apt_get: str | None = None,
) -> None:
    """PostgreSQL server binaries, installed from the system's packages when missing and root."""
    from lpa.tools import pgcluster
    from lpa.tools.pgcluster import PostgresNotFound

    find_bin_dir = find_bin_dir or pgcluster.find_bin_dir
    is_root = os.geteuid() == 0 if is_root is None else is_root
    apt_get = shutil.which("apt-get") if apt_get is None else apt_get
    try:
        find_bin_dir()
        return
    except PostgresNotFound:
        pass
    if not is_root or not apt_get:
        raise DemoError("PostgreSQL server binaries not found: install them (Debian/Ubuntu: "
                        "sudo apt-get install -y postgresql) and run again")
    out.write("demo: installing PostgreSQL from the system's packages "
              "(apt-get install postgresql)\n")
    out.flush()
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (["apt-get", "install", "-y", "-q", "postgresql"],
                 ["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "postgresql"]):
        result = run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, check=False)
        if argv[1] == "install" and result.returncode == 0:
            break
    try:
        find_bin_dir()
    except PostgresNotFound:
        raise DemoError("PostgreSQL could not be installed: run `apt-get install -y postgresql` "
                        "and try again") from None


async def wait_for_agent(client: AgentClient, process: Child, log_path: str, *,
                         clock: IReactorTime, timeout: float = 60.0) -> dict[str, Any]:
    """Poll /api/v1/health until it answers; fail fast with the log tail if the agent died."""
    deadline = clock.seconds() + timeout
    last = "no answer"
    while clock.seconds() < deadline:
        if process.poll() is not None:
            raise DemoError(f"lpa-agent exited with status {process.returncode}; its log:\n"
                            f"{log_tail(log_path)}")
        try:
            return await client.health() or {}
        except ClientError as error:
            last = str(error)
        await deferLater(clock, 0.3, lambda: None)
    raise DemoError(f"lpa-agent did not answer /api/v1/health within {timeout:g} s ({last}); "
                    f"its log:\n{log_tail(log_path)}")


async def agent_failure(client: AgentClient, agent_job_id: str | None) -> str:
    """The agent's own account of a failed job (error and stderr tail), for the failure line."""
    if not agent_job_id:
        return ""
    try:
        detail = await client.job(agent_job_id) or {}
    except ClientError as error:
        return f" (the agent's job detail is unavailable: {error})"
    parts = [str(detail[key]).strip() for key in ("error_code", "error") if detail.get(key)]
    stderr = [line for line in str(detail.get("command_stderr") or "").splitlines() if line.strip()]
    if stderr:
        parts.append("stderr: " + " | ".join(stderr[-3:]))
    return f": {'; '.join(parts)}" if parts else ""


class Demo:
    """One run of the demo; :meth:`run` returns the exit status."""

    def __init__(self, state_dir: str, *, keep: bool, timeout: float, out: TextIO,
                 agent_port: int = DEFAULT_AGENT_PORT) -> None:
        self.state_dir = os.path.abspath(state_dir)
        self.agent_port = agent_port
        self.keep = keep
        self.timeout = timeout
        self.out = out
        self.processes = Processes()
        self.cluster: Any = None
        self.started_at = time.monotonic()
        #: the relay's ops port and the agent's plain-HTTP metrics port (chosen when run)
        self.ops_port = DEFAULT_OPS_PORT
        self.metrics_port = DEFAULT_METRICS_PORT

    def say(self, line: str) -> None:
        self.out.write(f"demo: {line}\n")
        self.out.flush()

    async def run(self, reactor: Any) -> int:
        """Run the demo; stop everything unless it succeeded under ``--keep``."""
        succeeded = False
        try:
            code = await self._run(reactor)
            succeeded = code == 0
            return code
        finally:
            if not (self.keep and succeeded):
                self.cleanup()

    def cleanup(self) -> None:
        killed = self.processes.stop_all()
        if killed:
            self.say(f"had to SIGKILL {', '.join(killed)}")
        if self.cluster is not None:
            try:
                self.cluster.destroy()
            except LpaError as error:
                self.say(f"could not stop PostgreSQL cleanly: {str(error).splitlines()[0]}")
            self.cluster = None

    async def _run(self, reactor: Any) -> int:
        from lpa.relay.schema import migrate
        from lpa.tools import dispatch
        from lpa.tools.pgcluster import PostgresCluster
        from lpa.tools.pki import init_pki

        running = kept_demo_running(self.state_dir)
        if running:
            raise DemoError(f"a demo kept with --keep is still running in {self.state_dir} "
                            f"({', '.join(running)}): stop it with "
                            f"`{lpa_command()} demo --stop --state-dir {self.state_dir}`")
        os.makedirs(self.state_dir, exist_ok=True)
        pki_dir = os.path.join(self.state_dir, "pki")
        agent_state = os.path.join(self.state_dir, "agent-state")
        os.makedirs(agent_state, exist_ok=True)
        for name in ("lpa-agent", "lpa-relay"):
            for suffix in (".log", ".log.stdout", ".pid"):
                with_suffix = os.path.join(self.state_dir, name + suffix)
                if os.path.exists(with_suffix):
                    os.remove(with_suffix)

        ensure_postgres(self.out)
        self.cluster = PostgresCluster()
        self.cluster.start()
        dsn = self.cluster.create_database("lpa_demo")
        migrate(dsn)
        self.say(f"PostgreSQL {self.cluster.directory} is up; schema migrated")

        init_pki(pki_dir, [AGENT_HOST, "127.0.0.1"], force=True)
        self.say(f"dev PKI written to {pki_dir}")

        port = free_port(wanted=self.agent_port)
        if self.agent_port and port != self.agent_port:
            self.say(f"port {self.agent_port} is in use here; the agent listens on {port}")
        self.ops_port = free_port(wanted=DEFAULT_OPS_PORT)
        self.metrics_port = free_port(wanted=DEFAULT_METRICS_PORT)
        agent_config = os.path.join(self.state_dir, "agent.yaml")
        relay_config = os.path.join(self.state_dir, "relay.toml")
        with open(agent_config, "w", encoding="utf-8") as handle:
            handle.write(agent_yaml(port=port, pki_dir=pki_dir, state_dir=agent_state,
                                    metrics_port=self.metrics_port))
        with open(relay_config, "w", encoding="utf-8") as handle:
            handle.write(relay_toml(dsn=dsn, pki_dir=pki_dir, ops_port=self.ops_port))
        env = daemon_env()
        agent_log = os.path.join(self.state_dir, "lpa-agent.log")
        agent = self.processes.start(
            "lpa-agent", twistd_argv("lpa-agent", agent_config, self.state_dir), env=env,
            cwd=self.state_dir, log_path=agent_log)
        credentials = Credentials(os.path.join(pki_dir, "client.crt"),
                                  os.path.join(pki_dir, "client.key"),
                                  os.path.join(pki_dir, "ca.pem"))
        http, pool = make_http_client(reactor, credentials, 30.0)
        try:
            return await self._follow(reactor, dispatch, dsn, port, pki_dir, agent, agent_log,
                                      AgentClient(http, AgentUrl(AGENT_HOST, port),
                                                  clock=reactor))
        finally:
            await pool.closeCachedConnections()

    async def _follow(self, reactor: Any, dispatch: Any, dsn: str, port: int, pki_dir: str,
                      agent: subprocess.Popen[bytes], agent_log: str, client: AgentClient) -> int:
        env = daemon_env()
        relay_config = os.path.join(self.state_dir, "relay.toml")
        health = await wait_for_agent(client, agent, agent_log, clock=reactor)
        self.say(f"lpa-agent {health.get('version', '')} is up on https://{AGENT_HOST}:{port} "
                 f"(pid {agent.pid})")
        relay = self.processes.start(
            "lpa-relay", twistd_argv("lpa-relay", relay_config, self.state_dir), env=env,
            cwd=self.state_dir, log_path=os.path.join(self.state_dir, "lpa-relay.log"))
        self.say(f"lpa-relay started (pid {relay.pid})")
        for line in self.urls(port):
            self.say(line)
        self._write_state(dsn, port, pki_dir)

        listener = dispatch.connect(dsn)
        writer = dispatch.connect(dsn)
        try:
            dispatch.listen(listener)
            target = dispatch.HostTarget(AGENT_HOST, "127.0.0.1", port)
            job = dispatch.create_job(writer, [target], packages=None, dry_run=True,
                                      notes="lpa demo (dry run)")
            results = await dispatch.start_on_agents(writer, job, lambda t: client,
                                                     packages=None, dry_run=True)
            if not results[0].agent_job_id:
                raise DemoError(results[0].error or "the agent refused the job")
            self.say(f"dispatched DRY-RUN patch job {job.job_id} → agent job "
                     f"{results[0].agent_job_id}; following job_update:")
            check_alive(self.processes, self.state_dir)
            transports: set[str] = set()
            final = await dispatch.watch_job(
                listener, job.job_id, self.out, reactor=reactor,
                names={job.hosts[0].host_id: AGENT_HOST},
                timeout=self.timeout,
                on_payload=lambda p: transports.add(p["transport"]) if p.get("transport") else None,
                on_idle=lambda: check_alive(self.processes, self.state_dir))
            summary = self._summary(writer, job.job_id, final, transports)
        except dispatch.DispatchError as error:
            check_alive(self.processes, self.state_dir)
            raise DemoError(f"{error}; relay log:\n"
                            f"{log_tail(os.path.join(self.state_dir, 'lpa-relay.log'))}") from None
        finally:
            listener.close()
            writer.close()
        self.out.write(summary + "\n")
        if final.get("recovered"):
            raise DemoError(f"the job ended {final.get('status')} but no job-level notification "
                            "arrived")
        if final.get("status") != "succeeded":
            raise DemoError(f"the job ended {final.get('status')}, not succeeded"
                            f"{await agent_failure(client, results[0].agent_job_id)} (see "
                            f"{self.state_dir}/lpa-agent.log)")
        if self.keep:
            self._print_keep(dsn, port, pki_dir)
        return 0

    def _summary(self, connection: Any, job_id: str, final: dict[str, Any],
                 transports: set[str]) -> str:
        with connection, connection.cursor() as cursor:
            cursor.execute("SELECT max(length(output)) FROM patch_job_hosts WHERE job_id = %s",
                           (job_id,))
            (longest,) = cursor.fetchone()
        elapsed = time.monotonic() - self.started_at
        return (f"summary: job {job_id} {final.get('status')}: {final.get('succeeded_count')} of "
                f"{final.get('host_count')} host(s) succeeded, {final.get('failed_count')} failed; "
                f"dry run, via {', '.join(sorted(transports)) or 'relay'}; "
                f"{longest or 0} characters of output kept; {elapsed:.1f} s")

    def _write_state(self, dsn: str, port: int, pki_dir: str) -> None:
        state = {"pids": {name: p.pid for name, p in self.processes.started.items()},
                 "postgres": self.cluster.directory, "postgres_bin": self.cluster.bin_dir,
                 "dsn": dsn, "agent_port": port, "pki": pki_dir}
        with open(os.path.join(self.state_dir, STATE_FILE), "w", encoding="utf-8") as handle:
            json.dump(state, handle, indent=2)

    def urls(self, port: int) -> list[str]:
        """Where to watch: the status page, both daemons' metrics, the relay's probes."""
        ops = f"http://127.0.0.1:{self.ops_port}"
        return [f"status page: {ops}/  (live; the relay's probes: {ops}/healthz {ops}/readyz)",
                (f"metrics:     relay {ops}/metrics  agent http://127.0.0.1:{self.metrics_port}"
                f"/metrics (and https://{AGENT_HOST}:{port}/metrics over mTLS)")]

    def _print_keep(self, dsn: str, port: int, pki_dir: str) -> None:
        d = self.state_dir
        lpa = lpa_command()
        self.out.write(
            "\nThe demo is still running (--keep):\n"
            f"  agent:    https://{AGENT_HOST}:{port}\n"
            f"            export LPA_CERT={pki_dir}/client.crt LPA_KEY={pki_dir}/client.key "
            f"LPA_CA={pki_dir}/ca.pem\n"
            f"            {lpa} agent {AGENT_HOST}:{port} health\n"
            f"            curl --cert $LPA_CERT --key $LPA_KEY --cacert $LPA_CA "
            f"https://{AGENT_HOST}:{port}/api/v1/health\n"
            f"  database: psql '{dsn}'   (then: LISTEN job_update;)\n"
            f"            {lpa} dispatch --dsn '{dsn}' --host {AGENT_HOST}:{port} "
            "--dry-run --watch\n"
            f"  watch:    {self.urls(port)[0]}\n"
            f"            {self.urls(port)[1]}\n"
            f"  logs:     {d}/lpa-agent.log  {d}/lpa-relay.log\n"
            f"  stop:     {lpa} demo --stop --state-dir {d}\n")


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = sys.stdout if out is None else out
    if args.stop:
        return stop_kept(args.state_dir, out)
    demo = Demo(args.state_dir, keep=args.keep, timeout=args.timeout, out=out,
                agent_port=args.agent_port)
    try:
        return runner.run(demo.run)
    except DemoError as error:
        out.flush()
        sys.stderr.write(f"lpa demo: FAILED: {error}\n")
        return 1
    except (KeyboardInterrupt, CancelledError):
        demo.keep = False
        demo.cleanup()
        sys.stderr.write("lpa demo: interrupted; everything it started was stopped\n")
        return 130


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``lpa demo``."""
    parser = subparsers.add_parser(
        "demo", help="run the whole pipeline on this machine (what `make demo` runs)",
        description="Start a throwaway PostgreSQL, a dev PKI, an lpa-agent using this machine's "
        "package manager in dry-run mode and an lpa-relay; dispatch a DRY-RUN patch job and show "
        "it flow agent → relay → pg_notify, then stop everything. Exits 0 when the job-level "
        "notification arrived and the job succeeded.")
    parser.add_argument("--keep", action="store_true",
                        help="leave everything running and print how to reach and stop it")
    parser.add_argument("--stop", action="store_true", help="stop a demo left running by --keep")
    parser.add_argument("--state-dir", default=DEFAULT_STATE_DIR,
                        help=f"where configs, PKI, logs and state go (default {DEFAULT_STATE_DIR})")
    parser.add_argument("--agent-port", type=int, default=DEFAULT_AGENT_PORT,
                        help=f"the agent's port on 127.0.0.1 (default {DEFAULT_AGENT_PORT}, or "
                        "a free one when it is taken; 0: any free port)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help=f"seconds to wait for the job (default {DEFAULT_TIMEOUT:g})")
    parser.set_defaults(func=run)
