"""Relays sharing the fleet: 1, 2 and 3 ``lpa-relay`` processes following N simulated agents.

Run by hand (not part of the trial suite)::

    .venv/bin/python bench/relays.py [--quick] [--agents 5000] [--relays 1,2,3]

Everything runs on this machine and is removed at exit (also after Ctrl-C): a throwaway
PostgreSQL cluster (``lpa.tools.pgcluster``: unix socket, fsync off), a test PKI
(``tests/certs.py``), two agent processes and the relay processes.

Agents
    ``--agents`` simulated agents split over two processes (this script with
    ``--agent-process``), each agent a :class:`tests.fakeagents.LpaTestAgent` on its own
    127.0.0.1 port with mutual TLS: the lpa job stream (``lpa.jobs.v1``, subscribe with
    ``after_seq``, replay, live events) and its REST twin.  Each scenario gives every agent one
    running job, rows ``running`` in ``patch_job_hosts`` (50 hosts per patch job).  The agents
    emit output events at a rate the controller sets, and timestamp each with
    ``time.monotonic()`` (one clock for every process on Linux).
Relays
    ``twistd -n lpa-relay --config relay-K.toml``, the defaults except the database URL and the
    certificate paths: heartbeat 2 s, lease 8 s, scan 10 s.

For K = 1, 2, 3 relays, on a fresh database each:

1. **Follow**: start K relays, wait until they registered, take each relay's RSS (baseline);
   dispatch the jobs and wait until every agent has a WebSocket subscribed to its job (the
   agents report it).  Then wait ``--steady`` seconds (default 65: past the first backstop
   sweep, whose keep-alive HTTPS connection is part of what a followed agent costs) and take
   RSS again: (RSS − baseline) / agents the relay follows (its leases).
2. **Freshness** at a fixed offered load (``--rate``, default 200 events/s over all agents):
   for every event, the time from its emission to the first ``job_update`` host notification
   of its job with a ``seq`` at or above it (a LISTEN session in this process).
3. **Saturation**: offered rates rising from ``--rate`` (doubling, up to ``--saturate``, default
   3200 events/s), ``--seconds`` each; applied events/s of a step is the rise of
   ``sum(relay_last_seq)`` over its second half.  The ramp stops at the first step applying
   less than 80 % of what it was offered; the figure is the highest applied rate seen, with the
   freshness p99 of that step.
4. **Failover** (K ≥ 2): at 100 events/s, ``kill -9`` one relay; the time until every agent
   again has a subscribed WebSocket.

The named peer is the single relay (K = 1), measured in the same run: ratios are against it.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

HOSTS_PER_JOB = 50


# -- the agent process ------------------------------------------------------------------------


def agent_process(count: int, pki_dir: str) -> None:
    """Serve ``count`` test agents; obey one JSON command per stdin line, answer on stdout."""
    from twisted.internet import reactor, stdio
    from twisted.internet.task import LoopingCall
    from twisted.protocols.basic import LineReceiver

    from lpa import events as ev
    from lpa.tls import server_tls_options
    from lpa.tools.pki import PkiPaths
    from tests.fakeagents import LpaTestAgent

    paths = PkiPaths.in_directory(pki_dir)  # written by the controller (tests/certs.py)
    options = server_tls_options(
        ca_cert_path=paths.ca_cert,
        cert_path=paths.server_cert,
        key_path=paths.server_key,
        crl_path=None,
        min_tls_version="1.3",
    )
    agents = []
    for _ in range(count):
        agent = LpaTestAgent(reactor, max_events_per_job=100_000)
        agent.listen(options)
        agents.append(agent)
    state: dict[str, Any] = {"jobs": [None] * count, "rate": 0.0, "credit": 0.0, "next": 0,
                             "times": []}

    def emit_some() -> None:
        state["credit"] += state["rate"] * 0.05
        while state["credit"] >= 1:
            state["credit"] -= 1
            index = state["next"] % count
            state["next"] += 1
            job = state["jobs"][index]
            if job is None:
                continue
            agent = agents[index]
            event = agent.emit(job, ev.RUNNING, "x" * 60, kind=ev.KIND_OUTPUT)
            state["times"].append((job, event.seq, time.monotonic()))

    LoopingCall(emit_some).start(0.05)

    class Commands(LineReceiver):
        delimiter = b"\n"
        MAX_LENGTH = 1 << 24

        def connectionMade(self) -> None:
            self.answer({"ports": [agent.port_number for agent in agents]})

        def answer(self, document: Any) -> None:
            self.sendLine(json.dumps(document).encode())

        def lineReceived(self, line: bytes) -> None:
            command = json.loads(line)
            name = command["cmd"]
            if name == "jobs":
                for index, agent in enumerate(agents):
                    job = agent.add_job()
                    agent.emit(job, ev.RUNNING, "Job started")
                    state["jobs"][index] = job
                self.answer({"jobs": state["jobs"]})
            elif name == "rate":
                state["rate"] = float(command["rate"])
                self.answer({"ok": True})
            elif name == "followed":
                followed = sum(
                    1
                    for agent, job in zip(agents, state["jobs"], strict=True)
                    if job is not None and any(job in s.subscribed for s in agent.sockets)
                )
                sockets = sum(len(agent.sockets) for agent in agents)
                self.answer({"followed": followed, "sockets": sockets})
            elif name == "times":
                times, state["times"] = state["times"], []
                self.answer({"times": times})
            elif name == "quit":
                reactor.stop()

    stdio.StandardIO(Commands())
    reactor.run()


class AgentProcess:
    """The controller's handle on one agent process."""

    def __init__(self, count: int, pki_dir: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--agent-process", str(count),
             "--pki", pki_dir],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT, text=True, bufsize=1,
        )
        self.ports: list[int] = self.read()["ports"]

    def read(self) -> Any:
        line = self.process.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError("an agent process died; see its stderr above")
        return json.loads(line)

    def ask(self, **command: Any) -> Any:
        self.process.stdin.write(json.dumps(command) + "\n")  # type: ignore[union-attr]
        return self.read()

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write('{"cmd": "quit"}\n')  # type: ignore[union-attr]
                self.process.stdin.flush()  # type: ignore[union-attr]
                self.process.wait(timeout=20)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()


# -- the controller ---------------------------------------------------------------------------


class Notifications(threading.Thread):
    """A LISTEN session: for each agent job, (arrival, seq) of every host notification."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        import psycopg2

        self.connection = psycopg2.connect(dsn)
        self.connection.autocommit = True
        self.connection.cursor().execute("LISTEN job_update")
        self.seen: dict[str, list[tuple[float, int]]] = {}
        self.lock = threading.Lock()
        self.running = True
        self.start()

    def run(self) -> None:
        while self.running:
            if select.select([self.connection], [], [], 0.2)[0]:
                self.connection.poll()
                now = time.monotonic()
                with self.lock:
                    while self.connection.notifies:
                        payload = json.loads(self.connection.notifies.pop(0).payload)
                        if payload.get("event_type") == "host" and payload.get("seq"):
                            self.seen.setdefault(payload["agent_job_id"], []).append(
                                (now, int(payload["seq"]))
                            )

    def freshness(self, times: list[tuple[str, int, float]]) -> list[float]:
        """Seconds from each emission to the first notification covering it (inf: none)."""
        with self.lock:
            seen = {job: list(arrivals) for job, arrivals in self.seen.items()}
        delays = []
        for job, seq, emitted in times:
            covering = [when for when, notified in seen.get(job, ()) if notified >= seq]
            delays.append(min(covering) - emitted if covering else math.inf)
        return delays

    def stop(self) -> None:
        self.running = False
        self.join(timeout=2)
        self.connection.close()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Scenario:
    """K relays on a fresh database following every agent (see the module docstring)."""

    def __init__(self, options: argparse.Namespace, cluster: Any, pki: Any,
                 agents: list[AgentProcess], relays: int, workdir: str) -> None:
        from lpa.relay.schema import migrate

        self.options = options
        self.agents = agents
        self.total = sum(len(a.ports) for a in agents)
        self.count = relays
        self.workdir = workdir
        self.pki = pki
        self.dsn = cluster.create_database(f"bench_relays_{relays}")
        migrate(self.dsn)
        self.processes: dict[str, subprocess.Popen] = {}
        self.result: dict[str, Any] = {"relays": relays}

    # -- relays ---------------------------------------------------------------------------

    def start_relay(self, relay_id: str) -> None:
        config = os.path.join(self.workdir, f"{relay_id}.toml")
        with open(config, "w", encoding="utf-8") as handle:
            handle.write(
                f'[database]\nurl = "{self.dsn}"\n[worker]\nws_relay_id = "{relay_id}"\n'
                f'[security]\nagent_client_cert_path = "{self.pki.good.cert}"\n'
                f'agent_client_key_path = "{self.pki.good.key}"\n'
                f'ca_cert_path = "{self.pki.ca_cert}"\n[logging]\nformat = "text"\n'
                "[ops]\nenabled = false\n"
            )
        env = {k: v for k, v in os.environ.items() if not k.startswith("PATCH_MANAGER")}
        env["PYTHONPATH"] = ROOT
        self.processes[relay_id] = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
             "--pidfile=", f"--logfile={os.path.join(self.workdir, relay_id + '.log')}",
             "lpa-relay", "--config", config],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )

    def live(self) -> dict[str, int]:
        from lpa.relay.status import fleet_status

        return {r.relay_id: r.agents for r in fleet_status(self.dsn).relays if r.live}

    def followed(self) -> int:
        return sum(agent.ask(cmd="followed")["followed"] for agent in self.agents)

    def wait(self, predicate: Any, what: str, timeout: float) -> float:
        started = time.monotonic()
        while not predicate():
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}")
            time.sleep(0.2)
        return time.monotonic() - started

    def set_rate(self, rate: float) -> None:
        share = rate / len(self.agents)
        for agent in self.agents:
            agent.ask(cmd="rate", rate=share)

    def times(self) -> list[tuple[str, int, float]]:
        collected: list[tuple[str, int, float]] = []
        for agent in self.agents:
            collected.extend(tuple(t) for t in agent.ask(cmd="times")["times"])
        return collected

    def applied(self) -> int:
        import psycopg2

        connection = psycopg2.connect(self.dsn)
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT COALESCE(sum(relay_last_seq), 0) FROM patch_job_hosts")
                return int(cursor.fetchone()[0])
        finally:
            connection.close()

    # -- phases ---------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        try:
            self.follow()
            self.fresh()
            self.saturate()
            if self.count >= 2:
                self.failover()
        finally:
            self.set_rate(0)
            for process in self.processes.values():
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            for process in self.processes.values():
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
        return self.result

    def dispatch(self) -> None:
        import psycopg2
        from psycopg2.extras import execute_values

        rows = []
        for agent in self.agents:
            jobs = agent.ask(cmd="jobs")["jobs"]
            rows.extend(zip(agent.ports, jobs, strict=True))
        connection = psycopg2.connect(self.dsn)
        with connection, connection.cursor() as cursor:
            for start in range(0, len(rows), HOSTS_PER_JOB):
                chunk = rows[start:start + HOSTS_PER_JOB]
                cursor.execute("INSERT INTO patch_jobs (status) VALUES ('running') RETURNING id")
                job_id = cursor.fetchone()[0]
                hosts = execute_values(
                    cursor,
                    "INSERT INTO hosts (fqdn, ip_address, agent_port) VALUES %s RETURNING id",
                    [("localhost", (f"10.{(start + n) // 65536}.{(start + n) // 256 % 256}."
                                    f"{(start + n) % 256}"), port)
                     for n, (port, _) in enumerate(chunk)],
                    fetch=True,
                )
                execute_values(
                    cursor,
                    "INSERT INTO patch_job_hosts (job_id, host_id, status, agent_job_id) VALUES %s",
                    [(job_id, host[0], "running", job)
                     for host, (_, job) in zip(hosts, chunk, strict=True)],
                )
        connection.close()

    def follow(self) -> None:
        names = [f"relay-{n + 1}" for n in range(self.count)]
        for name in names:
            self.start_relay(name)
        self.wait(lambda: set(self.live()) == set(names), "relays to register", 60)
        time.sleep(2)
        baseline = {name: rss_kib(self.processes[name].pid) for name in names}
        dispatched = time.monotonic()
        self.dispatch()
        self.wait(lambda: self.followed() == self.total, "every agent followed", 900)
        self.result["settle_s"] = time.monotonic() - dispatched
        time.sleep(self.options.steady)
        shares = self.live()
        per_agent = {
            name: (rss_kib(self.processes[name].pid) - baseline[name]) / max(1, shares[name])
            for name in names
        }
        self.result.update(
            shares=shares,
            rss_per_agent_kib=per_agent,
            rss_mib={name: rss_kib(self.processes[name].pid) / 1024 for name in names},
            baseline_mib={name: kib / 1024 for name, kib in baseline.items()},
        )

    def measure(self, rate: float, seconds: float) -> tuple[list[float], float]:
        listener = Notifications(self.dsn)
        try:
            self.times()  # forget earlier emissions
            start_applied = self.applied()
            self.set_rate(rate)
            time.sleep(seconds / 2)
            half_applied, half = self.applied(), time.monotonic()
            time.sleep(seconds / 2)
            end_applied, ended = self.applied(), time.monotonic()
            self.set_rate(0)
            times = self.times()
            emitted = len(times)
            self.wait(lambda: self.applied() >= start_applied + emitted, "the backlog", 300)
            time.sleep(1.0)
            delays = listener.freshness(times)
        finally:
            listener.stop()
        return delays, (end_applied - half_applied) / (ended - half)

    def fresh(self) -> None:
        delays, applied = self.measure(self.options.rate, self.options.seconds)
        self.result["fresh"] = (self.options.rate, percentile(delays, 0.5),
                                percentile(delays, 0.99), len(delays), applied)

    def saturate(self) -> None:
        best = (0.0, 0.0, math.nan)
        rate = self.options.rate
        while rate <= self.options.saturate:
            delays, applied = self.measure(rate, self.options.seconds)
            print(f"   offered {rate:.0f} ev/s: applied {applied:.0f} ev/s, p99 freshness "
                  f"{percentile(delays, 0.99):.3f} s", flush=True)
            if applied > best[1]:
                best = (rate, applied, percentile(delays, 0.99))
            if applied < 0.8 * rate:
                break
            rate *= 2
        self.result["saturated"] = best

    def failover(self) -> None:
        self.set_rate(100)
        time.sleep(2)
        victim = "relay-1"
        os.kill(self.processes[victim].pid, signal.SIGKILL)
        killed = time.monotonic()
        self.processes[victim].wait()
        self.wait(lambda: self.followed() < self.total, "the kill to be noticed", 30)
        self.wait(lambda: self.followed() == self.total, "the failover", 300)
        self.result["failover_s"] = time.monotonic() - killed
        self.result["lost"] = self.result["shares"][victim]
        self.set_rate(0)


def ratio(value: float, peer: float) -> str:
    return f"{value / peer:.2f}x" if peer else "n/a"


def max_rss(result: dict[str, Any]) -> float:
    return max(result["rss_per_agent_kib"].values())  # type: ignore[no-any-return]


def report(results: list[dict[str, Any]], options: argparse.Namespace) -> None:
    print()
    print("relays  agents followed per relay   settle   RSS KiB per followed agent   "
          f"freshness at {options.rate:.0f} ev/s    applied ev/s at saturation       failover")
    peer = results[0]
    for result in results:
        shares = "/".join(str(v) for v in result["shares"].values())
        per_agent = max(result["rss_per_agent_kib"].values())
        _rate, p50, p99, _count, _ = result["fresh"]
        offered, applied, sat_p99 = result["saturated"]
        failover = f"{result['failover_s']:.1f} s ({result['lost']} agents)" \
            if "failover_s" in result else "-"
        print(f"{result['relays']:<7} {shares:<27} {result['settle_s']:6.1f} s "
              f"{per_agent:10.1f} (max)              p50 {p50 * 1000:6.1f} ms p99 "
              f"{p99 * 1000:7.1f} ms  {applied:6.0f} of {offered:5.0f} (p99 {sat_p99:5.2f} s) "
              f"{failover}")
    print()
    for result in results[1:]:
        print(f"{result['relays']} relays / 1 relay: applied ev/s at saturation "
              f"{ratio(result['saturated'][1], peer['saturated'][1])}, p99 freshness "
              f"{ratio(result['fresh'][2], peer['fresh'][2])}, max RSS per agent "
              f"{ratio(max_rss(result), max_rss(peer))}")
    for result in results:
        print(f"{result['relays']} relays: RSS MiB {result['rss_mib']} (baseline "
              f"{result['baseline_mib']}); events measured for freshness {result['fresh'][3]}, "
              f"applied at {result['fresh'][0]:.0f} ev/s offered: {result['fresh'][4]:.0f}")


def main(options: argparse.Namespace) -> None:
    from lpa.tools.pgcluster import PostgresCluster
    from tests.certs import make_test_pki

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it
    if hard < 3 * options.agents + 1000:
        print(f"warning: fd limit {hard} is low for {options.agents} agents", file=sys.stderr)
    workdir = tempfile.mkdtemp(prefix="lpa-bench-relays-")
    atexit.register(shutil.rmtree, workdir, True)
    cluster = PostgresCluster()
    atexit.register(cluster.destroy)
    agents: list[AgentProcess] = []
    atexit.register(lambda: [agent.stop() for agent in agents])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    cluster.start()
    pki_dir = os.path.join(workdir, "pki")
    pki = make_test_pki(pki_dir)
    import twisted

    print(f"relays: {options.agents} agents in 2 processes, relays {options.relays}, "
          f"Python {sys.version.split()[0]}, Twisted {twisted.__version__}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    half = options.agents // 2
    agents.extend([AgentProcess(half, pki_dir), AgentProcess(options.agents - half, pki_dir)])
    results = []
    for count in options.relays:
        print(f"-- {count} relay(s)", flush=True)
        result = Scenario(options, cluster, pki, agents, count, workdir).run()
        print(json.dumps(result, default=str), flush=True)
        results.append(result)
    report(results, options)
    print(f"(load average at the end {os.getloadavg()[0]:.1f})")


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="300 agents, 5 s steady, 6 s per load (a few minutes)")
    parser.add_argument("--agents", type=int, default=None, help="simulated agents (5000)")
    parser.add_argument("--relays", default="1,2,3", help="relay counts to run (1,2,3)")
    parser.add_argument("--steady", type=float, default=None,
                        help="seconds to wait after settling before taking RSS (65)")
    parser.add_argument("--rate", type=float, default=200.0,
                        help="offered events/s for the freshness figure (200)")
    parser.add_argument("--saturate", type=float, default=3200.0,
                        help="the highest offered events/s of the saturation ramp (3200)")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per load (12)")
    parser.add_argument("--agent-process", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--pki", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    options.agents = options.agents or (300 if options.quick else 5000)
    options.steady = options.steady if options.steady is not None else (
        5.0 if options.quick else 65.0)
    options.seconds = options.seconds or (6.0 if options.quick else 12.0)
    options.relays = [int(n) for n in options.relays.split(",")]
    return options


if __name__ == "__main__":
    parsed = parse(sys.argv[1:])
    if parsed.agent_process:
        agent_process(parsed.agent_process, parsed.pki)
    else:
        main(parsed)
