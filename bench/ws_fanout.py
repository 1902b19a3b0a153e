"""Agent event delivery: the WebSocket job stream against REST polling at 1 s, measured in one run.

Run by hand (not part of the trial suite)::

    .venv/bin/python bench/ws_fanout.py [--quick] [--clients 100] [--tls]

Processes: this script (``main``, no reactor) runs one fresh agent process per mode
(``--agent ws|poll``, so a heap grown by one mode cannot hide the other's memory growth), and
each agent process spawns the clients' process (``--client``) and closes its stdin to end it.

The agent side runs on the reactor: the real :class:`~lpa.agent.http.api.AgentApi` (Klein routes
behind the gate, its ``site()``) with the real ``JobStreamFactory`` mounted through
``make_ws_resource`` at ``/api/v1/ws/jobs`` on 127.0.0.1, port 0: plain ws/http, or with
``--tls`` mutual TLS (``lpa.tls`` server options over a ``tests.certs`` PKI in a temporary
directory; the clients present the relay certificate).  The job engine is
``tests.fakes_jobs.FakeJobManager``: it numbers events through the real ``EventLog`` (what the
WebSocket sessions and the events endpoint read) and runs no package manager.  The rate limiter
is off (K pollers from one address would trip it) and there is no peer check.

The clients run in their own process so the agent's resident memory grows only by what the
server keeps per connection:

``ws`` (lpa)
    K Autobahn ``WebSocketClientProtocol`` connections, each subscribing to the two jobs by id.
``poll`` (the named peer: "REST polling at 1 s", the original relay's fallback and every
    poller's model)
    K treq pollers (one keep-alive connection each), each ``GET /api/v1/jobs/{id}/events?after=N``
    every 1.0 s from a random phase, N the last seq it holds.  The delay is MEASURED, not
    computed: append to the moment the poll that carried the event was read.  The model figure
    (measured poll round trip + interval/2) is printed next to it.

Each event's ``message`` carries ``time.monotonic()`` at append (one clock for both processes on
Linux), so a client computes the append→receipt delay per event.  Phases, same for both:

1. idle: K clients connected and subscribed → agent RSS delta / K (after ``gc.collect()``);
2. paced: R events/s on job 1 for D seconds (a chatty apt run), then its end → p50/p99 delay;
3. burst: E events on job 2 appended as fast as the reactor allows (50 per turn), then its end →
   events/s delivered = K×E / (last receipt − first append).
"""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, protocol, task

JOB_OP = "patch_apply"
CHUNK = 50
LINE = "Setting up libexample:amd64 (1.2.3-1+deb12u1) ... Processing triggers for man-db"


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def established(port: int) -> int:
    """Established TCP connections to ``port`` on this host (agent side), from /proc/net/tcp."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as lines:
                next(lines)
                for line in lines:
                    fields = line.split()
                    if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        count += 1
        except OSError:
            pass
    return count


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- the client process ------------------------------------------------------------------------


class Tally:
    """What every client of the child process received, per job."""

    def __init__(self, clients: int, jobs: Sequence[str]) -> None:
        self.clients = clients
        self.jobs = list(jobs)
        self.delays: dict[str, list[float]] = {j: [] for j in jobs}
        self.first_sent: dict[str, float] = {}
        self.last_receipt: dict[str, float] = dict.fromkeys(jobs, 0.0)
        self.ended: dict[str, int] = dict.fromkeys(jobs, 0)
        self.ready = 0
        self.round_trips: list[float] = []
        self.cpu_mark = 0.0

    def event(self, job_id: str, message: str, received: float) -> None:
        if message.startswith("t="):
            sent = float(message[2:].split(" ", 1)[0])
            self.delays[job_id].append(received - sent)
            self.first_sent[job_id] = min(self.first_sent.get(job_id, sent), sent)
            self.last_receipt[job_id] = max(self.last_receipt[job_id], received)

    def end(self, job_id: str) -> None:
        self.ended[job_id] += 1
        if self.ended[job_id] == self.clients:
            say({"phase": "done", "job_id": job_id})
            if job_id == self.jobs[0]:
                self.cpu_mark = time.process_time()
            if all(self.ended[j] == self.clients for j in self.jobs):
                say({"phase": "results", "delays": self.delays, "first_sent": self.first_sent,
                     "last_receipt": self.last_receipt, "round_trips": self.round_trips,
                     "burst_cpu": time.process_time() - self.cpu_mark})

    def became_ready(self) -> None:
        self.ready += 1
        if self.ready == self.clients:
            say({"phase": "ready"})


def say(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def client_main(reactor: Any, options: argparse.Namespace) -> None:
    jobs = options.jobs.split(",")
    tally = Tally(options.clients, jobs)
    finished: defer.Deferred[None] = defer.Deferred()
    if options.client == "ws":
        connections = start_ws_clients(reactor, options, tally)
    else:
        connections = start_pollers(reactor, options, tally)
    # the parent closes our stdin when it is done with us
    import threading

    def watch_stdin() -> None:
        sys.stdin.buffer.read()
        reactor.callFromThread(finished.callback, None)

    threading.Thread(target=watch_stdin, daemon=True).start()
    await finished
    await connections.close()


class WsClients:
    def __init__(self) -> None:
        self.protocols: list[Any] = []

    async def close(self) -> None:
        for proto in self.protocols:
            proto.dropConnection(abort=True)
        await task.deferLater(_reactor(), 0.1, lambda: None)


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def client_tls(options: argparse.Namespace) -> Any:
    """The relay's mTLS client options over the bench PKI (None for plain ws/http)."""
    if not options.pki:
        return None
    from lpa.tls import client_tls_options

    return client_tls_options(
        "localhost",
        ca_cert_path=os.path.join(options.pki, "ca.pem"),
        cert_path=options.client_cert,
        key_path=options.client_key,
    )


def start_ws_clients(reactor: Any, options: argparse.Namespace, tally: Tally) -> WsClients:
    from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol

    from lpa.protocol import SUBPROTOCOL

    jobs = options.jobs.split(",")
    clients = WsClients()

    class Client(WebSocketClientProtocol):
        acks = 0

        def onOpen(self) -> None:
            clients.protocols.append(self)
            for job_id in jobs:
                self.sendMessage(
                    json.dumps({"action": "subscribe", "job_id": job_id}).encode(), False
                )

        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            received = time.monotonic()
            frame = json.loads(payload)
            kind = frame.get("event")
            if kind == "subscribed":
                self.acks += 1
                if self.acks == len(jobs):
                    tally.became_ready()
            elif kind == "job_status":
                tally.event(frame["job_id"], frame.get("message", ""), received)
            elif kind == "job_complete":
                tally.end(frame["job_id"])

    tls = client_tls(options)
    scheme = "wss" if tls is not None else "ws"
    url = f"{scheme}://localhost:{options.port}/api/v1/ws/jobs"
    factory = WebSocketClientFactory(url, protocols=[SUBPROTOCOL])
    factory.protocol = Client
    factory.setProtocolOptions(autoPingInterval=0, openHandshakeTimeout=30)

    # open connections a few at a time: a burst of K handshakes is not what we measure
    async def dial() -> None:
        for _ in range(options.clients):
            if tls is not None:
                reactor.connectSSL("127.0.0.1", options.port, factory, tls)
            else:
                reactor.connectTCP("127.0.0.1", options.port, factory)
            await task.deferLater(reactor, 0.002, lambda: None)

    defer.Deferred.fromCoroutine(dial()).addErrback(lambda f: say({"error": str(f.value)}))
    return clients


class Pollers:
    def __init__(self) -> None:
        self.loops: list[task.LoopingCall] = []
        self.pools: list[Any] = []

    async def close(self) -> None:
        for loop in self.loops:
            if loop.running:
                loop.stop()
        for pool in self.pools:
            await pool.closeCachedConnections()


def start_pollers(reactor: Any, options: argparse.Namespace, tally: Tally) -> Pollers:
    import treq
    from twisted.web.client import Agent, HTTPConnectionPool

    jobs = options.jobs.split(",")
    tls = client_tls(options)
    policy = None
    if tls is not None:
        from twisted.web.iweb import IPolicyForHTTPS
        from zope.interface import implementer

        @implementer(IPolicyForHTTPS)
        class Policy:
            def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
                return tls

        policy = Policy()
    pollers = Pollers()
    base = f"{'https' if tls is not None else 'http'}://127.0.0.1:{options.port}/api/v1/jobs"

    def new_client() -> Any:
        """Each poller is its own relay: its own keep-alive connection, as in the field."""
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 1
        pollers.pools.append(pool)
        if policy is not None:
            return treq.client.HTTPClient(Agent(reactor, contextFactory=policy, pool=pool))
        return treq.client.HTTPClient(Agent(reactor, pool=pool))

    def make_poller() -> task.LoopingCall:
        client = new_client()
        after = dict.fromkeys(jobs, 0)
        ended: set[str] = set()
        first = [True]

        async def poll() -> None:
            for job_id in jobs:
                if job_id in ended:
                    continue
                sent = time.monotonic()
                response = await client.get(f"{base}/{job_id}/events?after={after[job_id]}")
                body = await response.json()
                received = time.monotonic()
                tally.round_trips.append(received - sent)
                data = body["data"]
                for wire in data["events"]:
                    after[job_id] = max(after[job_id], wire["seq"])
                    if wire["event"] == "job_status":
                        tally.event(job_id, wire.get("message", ""), received)
                    elif wire["event"] == "job_complete":
                        ended.add(job_id)
                        tally.end(job_id)
            if first[0]:
                first[0] = False
                tally.became_ready()
            if len(ended) == len(jobs):
                loop.stop()

        def tick() -> defer.Deferred[None]:
            d = defer.Deferred.fromCoroutine(poll())
            d.addErrback(lambda f: say({"error": repr(f.value)}))
            return d

        loop = task.LoopingCall(tick)
        loop.clock = reactor
        return loop

    for _ in range(options.clients):
        loop = make_poller()
        pollers.loops.append(loop)
        reactor.callLater(random.uniform(0, options.interval), loop.start, options.interval)
    return pollers


# -- the agent side (this process) ---------------------------------------------------------------


class ChildProtocol(protocol.ProcessProtocol):
    """Reads the child's JSON lines; ``waiting[phase]`` fires when that phase is reported."""

    def __init__(self) -> None:
        self.buffer = b""
        self.waiting: dict[str, defer.Deferred[dict[str, Any]]] = {}
        self.seen: dict[str, dict[str, Any]] = {}
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.errors = b""

    def wait(self, key: str) -> defer.Deferred[dict[str, Any]]:
        if key in self.seen:
            return defer.succeed(self.seen[key])
        return self.waiting.setdefault(key, defer.Deferred())

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            message = json.loads(line)
            if "error" in message:
                print(f"  client error: {message['error']}")
                continue
            key = message["phase"] + (":" + message["job_id"] if "job_id" in message else "")
            self.seen[key] = message
            waiting = self.waiting.pop(key, None)
            if waiting is not None:
                waiting.callback(message)

    def errReceived(self, data: bytes) -> None:
        self.errors += data

    def processEnded(self, reason: Any) -> None:
        for waiting in self.waiting.values():
            waiting.errback(RuntimeError("client process ended: "
                                         + self.errors.decode(errors="replace")[-2000:]))
        self.waiting.clear()
        self.ended.callback(None)


def with_timeout(reactor: Any, d: defer.Deferred[Any], seconds: float, what: str) -> Any:
    def timed_out(result: Any, timeout: float) -> Any:
        raise TimeoutError(f"{what}: no answer within {timeout:.0f} s")

    return d.addTimeout(seconds, reactor, onTimeoutCancel=timed_out)


async def run_mode(reactor: Any, mode: str, options: argparse.Namespace) -> dict[str, Any]:
    from lpa.agent.http.api import AgentApi
    from lpa.agent.model import JobRequest
    from lpa.agent.ws import JobStreamFactory, make_ws_resource
    from lpa.events import COMPLETED, KIND_OUTPUT, RUNNING
    from tests.fakes import FakeBackend, FakeSystem
    from tests.fakes_jobs import FakeJobManager

    keep = options.burst + options.rate * options.seconds + 100
    jobs = FakeJobManager(reactor, max_events_per_job=int(keep))
    factory = JobStreamFactory(jobs.events, jobs, clock=reactor,
                               max_connections=options.clients + 8,
                               send_buffer_events=int(keep) + 100)
    api = AgentApi(jobs=jobs, backend=FakeBackend(), system=FakeSystem(), clock=reactor,
                   version="bench", rate_limiter=None, ws_resource=make_ws_resource(factory))
    if options.pki_files is not None:
        port = reactor.listenSSL(0, api.site(), options.pki_files.server_options(),
                                 interface="127.0.0.1")
    else:
        port = reactor.listenTCP(0, api.site(), interface="127.0.0.1")
    job_ids = [jobs.submit(JobRequest(operation=JOB_OP, dry_run=True)).id for _ in range(2)]
    for job_id in job_ids:
        jobs.emit(job_id, "Job started", status=RUNNING)
    child = ChildProtocol()
    process = None
    try:
        gc.collect()
        before = rss_bytes()
        argv = [sys.executable, os.path.abspath(__file__), "--client", mode,
                "--port", str(port.getHost().port), "--jobs", ",".join(job_ids),
                "--clients", str(options.clients), "--interval", str(options.interval)]
        if options.pki_files is not None:
            files = options.pki_files
            argv += ["--pki", files.directory, "--client-cert", files.good.cert,
                     "--client-key", files.good.key]
        process = reactor.spawnProcess(child, sys.executable, argv, env=os.environ.copy())
        await with_timeout(reactor, child.wait("ready"), 60, f"{mode}: clients connecting")
        await task.deferLater(reactor, 0.5, lambda: None)  # let the handshakes settle
        gc.collect()
        after = rss_bytes()
        open_connections = established(port.getHost().port)

        # paced phase on job 1
        paced = int(options.rate * options.seconds)
        started = time.monotonic()
        for i in range(paced):
            due = started + i / options.rate
            wait = due - time.monotonic()
            if wait > 0:
                await task.deferLater(reactor, wait, lambda: None)
            jobs.emit(job_ids[0], f"t={time.monotonic():.6f} {LINE}", kind=KIND_OUTPUT)
        jobs.finish(job_ids[0], COMPLETED)
        await with_timeout(reactor, child.wait(f"done:{job_ids[0]}"), 30, f"{mode}: paced end")

        # burst phase on job 2
        cpu_before = time.process_time()
        for i in range(0, options.burst, CHUNK):
            for _ in range(min(CHUNK, options.burst - i)):
                jobs.emit(job_ids[1], f"t={time.monotonic():.6f} {LINE}", kind=KIND_OUTPUT)
            await task.deferLater(reactor, 0, lambda: None)
        jobs.finish(job_ids[1], COMPLETED)
        results = await with_timeout(reactor, child.wait("results"), 60, f"{mode}: burst end")
        results["agent_burst_cpu"] = time.process_time() - cpu_before
    finally:
        if process is not None and process.pid is not None:
            process.closeStdin()
            try:
                await with_timeout(reactor, child.ended, 10, f"{mode}: client exit")
            except TimeoutError:
                process.signalProcess("KILL")
                await child.ended
        await port.stopListening()  # the child's exit closed every connection
    results["rss_delta"] = after - before
    results["open_connections"] = open_connections
    results["jobs"] = job_ids
    results["paced"] = paced
    return results


def summarise(mode: str, r: dict[str, Any], options: argparse.Namespace) -> dict[str, float]:
    paced_job, burst_job = r["jobs"]
    paced = r["delays"][paced_job]
    burst = r["delays"][burst_job]
    expected_paced = options.clients * r["paced"]
    expected_burst = options.clients * options.burst
    span = r["last_receipt"][burst_job] - r["first_sent"][burst_job]
    summary = {
        "p50": pct(paced, 0.5) * 1000,
        "p99": pct(paced, 0.99) * 1000,
        "paced_got": len(paced),
        "paced_expected": expected_paced,
        "burst_got": len(burst),
        "burst_expected": expected_burst,
        "burst_rate": len(burst) / span if span > 0 else float("nan"),
        "burst_p50": pct(burst, 0.5) * 1000,
        "burst_p99": pct(burst, 0.99) * 1000,
        "per_conn_kib": r["rss_delta"] / options.clients / 1024,
        "open": r["open_connections"],
        "agent_cpu": r["agent_burst_cpu"],
        "client_cpu": r["burst_cpu"],
    }
    if r["round_trips"]:
        summary["rtt_ms"] = statistics.median(r["round_trips"]) * 1000
    return summary


async def agent_main(reactor: Any, options: argparse.Namespace) -> None:
    """One mode's agent side (``--agent ws|poll``): prints ``RESULT <json>``."""
    options.pki_files = None
    directory = None
    if options.tls:
        from tests.certs import make_test_pki

        directory = tempfile.mkdtemp(prefix="lpa-bench-pki-")
        atexit.register(shutil.rmtree, directory, True)  # also after Ctrl-C stops the reactor
        options.pki_files = make_test_pki(directory)
    try:
        results = await run_mode(reactor, options.agent, options)
    finally:
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
    print("RESULT " + json.dumps(results))


def main(options: argparse.Namespace) -> None:
    import autobahn
    import autobahn.websocket

    import twisted

    print(f"ws_fanout: {options.clients} clients in a child process, paced {options.rate:.0f} "
          f"events/s for {options.seconds:.0f} s, burst {options.burst} events; loopback; "
          f"{os.cpu_count()} CPUs")
    print(f"Python {sys.version.split()[0]}, Twisted {twisted.__version__}, autobahn "
          f"{autobahn.__version__}, autobahn.websocket.USES_NVX = {autobahn.websocket.USES_NVX}")
    if options.tls:
        print("transport: wss/https with mutual TLS (lpa.tls server options, TLS 1.3, CRL "
              "checked; tests/certs.py PKI)")
    else:
        print("transport: plain ws/http (add --tls for wss/https with mutual TLS)")
    summaries = {}
    for mode in ("ws", "poll"):
        # a fresh agent process per mode: a heap grown by the other mode would hide RSS growth
        argv = [sys.executable, os.path.abspath(__file__), "--agent", mode,
                "--clients", str(options.clients), "--rate", str(options.rate),
                "--seconds", str(options.seconds), "--burst", str(options.burst),
                "--interval", str(options.interval)] + (["--tls"] if options.tls else [])
        completed = subprocess.run(argv, capture_output=True, text=True, timeout=180,
                                   check=False)
        lines = [x for x in completed.stdout.splitlines() if x.startswith("RESULT ")]
        if completed.returncode != 0 or not lines:
            print(completed.stdout[-2000:], completed.stderr[-3000:], sep="\n")
            raise SystemExit(f"{mode}: agent process failed ({completed.returncode})")
        for line in completed.stdout.splitlines():
            if not line.startswith("RESULT "):
                print(f"  [{mode} agent] {line}")
        summaries[mode] = summarise(mode, json.loads(lines[-1][len("RESULT "):]), options)
    ws, poll = summaries["ws"], summaries["poll"]
    print(f"\n{'':24}{'p50 delay ms':>14}{'p99 delay ms':>14}{'delivered':>16}"
          f"{'burst ev/s':>12}{'burst p99 ms':>14}{'RSS/conn KiB':>14}{'conns':>7}")
    names = {"ws": "ws (lpa)", "poll": f"poll {options.interval:g} s (peer)"}
    for mode, s in summaries.items():
        delivered = f"{s['paced_got'] + s['burst_got']}/{s['paced_expected'] + s['burst_expected']}"
        print(f"{names[mode]:24}{s['p50']:>14.2f}{s['p99']:>14.2f}{delivered:>16}"
              f"{s['burst_rate']:>12.0f}{s['burst_p99']:>14.1f}{s['per_conn_kib']:>14.1f}"
              f"{s['open']:>7}")
    for mode, s in summaries.items():
        print(f"burst CPU seconds, {names[mode]}: agent {s['agent_cpu']:.2f}, "
              f"clients {s['client_cpu']:.2f}")
    print(f"\nratio ws/poll: p50 delay {ws['p50'] / poll['p50']:.4f}x "
          f"({poll['p50'] / ws['p50']:.0f}x lower), p99 {ws['p99'] / poll['p99']:.4f}x, "
          f"burst events/s {ws['burst_rate'] / poll['burst_rate']:.2f}x")
    print(f"poll model: median round trip {poll['rtt_ms']:.2f} ms + interval/2 "
          f"{options.interval * 500:.0f} ms = {poll['rtt_ms'] + options.interval * 500:.0f} ms "
          f"(measured p50 {poll['p50']:.0f} ms)")
    print("RSS/conn: agent resident memory after K clients connected and subscribed (idle), "
          "minus before, / K; poll = its keep-alive HTTP connections")


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (about 15 s)")
    parser.add_argument("--clients", type=int, default=None, help="K (default 100, quick 20)")
    parser.add_argument("--rate", type=float, default=50.0, help="paced events/s")
    parser.add_argument("--seconds", type=float, default=None,
                        help="paced phase in s (default 8, quick 3)")
    parser.add_argument("--burst", type=int, default=None,
                        help="burst events (default 500, quick 200)")
    parser.add_argument("--interval", type=float, default=1.0, help="poll interval of the peer")
    parser.add_argument("--tls", action="store_true", help="wss/https with mutual TLS")
    parser.add_argument("--client", choices=("ws", "poll"), help=argparse.SUPPRESS)
    parser.add_argument("--agent", choices=("ws", "poll"), help=argparse.SUPPRESS)
    parser.add_argument("--pki", help=argparse.SUPPRESS)
    parser.add_argument("--client-cert", help=argparse.SUPPRESS)
    parser.add_argument("--client-key", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--jobs", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    options.clients = options.clients or (20 if options.quick else 100)
    options.seconds = options.seconds or (3.0 if options.quick else 8.0)
    options.burst = options.burst or (200 if options.quick else 500)
    return options


if __name__ == "__main__":
    parsed = parse(sys.argv[1:])
    if parsed.client:
        task.react(lambda reactor: defer.Deferred.fromCoroutine(client_main(reactor, parsed)))
    elif parsed.agent:
        task.react(lambda reactor: defer.Deferred.fromCoroutine(agent_main(reactor, parsed)))
    else:
        main(parsed)
