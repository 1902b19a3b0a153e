"""The cost of durability: the agent's write-ahead event log against its peers, in one run.

Run by hand (not part of the trial suite)::

    .venv/bin/python bench/wal.py [--quick] [--events 20000] [--clients 50] [--dir DIR]

Engines, each the real :class:`~lpa.agent.jobs.JobManager` with one job running (a
``tests.fakes.FakeBackend`` job held open), fed through ``job_output`` as a package manager's
lines would be:

``wal`` (lpa)
    the write-ahead log in a temporary directory under ``--dir`` (default: the system's temp
    directory; the filesystem type is printed, tmpfs would make fdatasync free): each event is
    published once its batch is written and ``fdatasync``-ed on the log's writer thread.
``wal-nosync`` (peer: the same engine, sync disabled)
    identical, but ``WriteAheadLog(sync=False)``: what the syncs cost.
``timer`` (peer: the old persistence)
    events published at once (``VolatileJournal``), and the whole job history saved at most once
    per second (the former ``persist_interval_seconds`` of 1.0) by the former single-document
    ``JsonJobStore(background=True)``, loaded verbatim from git (``OLD_STORE_REF``).  It saves
    events up to a second late, i.e. it is not durable: the ratio says what durability costs.

Phases:

1. throughput: ``--events`` output lines appended in chunks of 50 per reactor turn (a chatty
   ``apt`` run), as fast as the reactor allows; events/s = events / (last publication − first
   append).  Also: fdatasync calls and events per sync, and the reactor's worst lateness seen by
   a 5 ms ``LoopingCall`` (does the disk ever stall the reactor?).
2. fan-out: ``--clients`` WebSocket clients in a child process (the ``Tally`` and
   ``ChildProtocol`` of ``bench/ws_fanout.py``; the clients offer ``lpa.protocol.SUBPROTOCOL``)
   subscribed to one job through the real ``JobStreamFactory``; 50 events/s for ``--seconds``;
   each event's message carries ``time.monotonic()`` at append → p50/p99 append→receipt delay.
3. start-up: a history of ``--history-jobs`` finished jobs of 1000 events each; seconds for the
   whole engine start over one file per job, against the former ``JsonJobStore.load`` of the
   same history as one document.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
import uuid
from collections.abc import Sequence
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import ws_fanout  # noqa: E402  (the fan-out harness: Tally, ChildProtocol, pct, with_timeout)
from twisted.internet import defer, task  # noqa: E402

CHUNK = 50
LINE = "Setting up libexample:amd64 (1.2.3-1+deb12u1) ... Processing triggers for man-db"
#: the commit whose lpa/agent/store.py is the former timer-saved history (the peer)
OLD_STORE_REF = "708cff2"
MODES = ("wal", "wal-nosync", "timer")
NAMES = {"wal": "wal (lpa)", "wal-nosync": "wal, sync off (peer)", "timer": "timer 1 s (old)"}


def filesystem_of(path: str) -> str:
    best = ("", "?")
    with open("/proc/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if path.startswith(fields[1]) and len(fields[1]) >= len(best[0]):
                best = (fields[1], fields[2])
    return best[1]


def old_store_module() -> types.ModuleType | None:
    """The former lpa.agent.store, from git (None when git or the commit is not there)."""
    try:
        source = subprocess.run(
            ["git", "-C", os.path.dirname(HERE), "show", f"{OLD_STORE_REF}:lpa/agent/store.py"],
            capture_output=True, text=True, check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    spec = importlib.util.spec_from_loader("lpa_old_store", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    exec(compile(source, f"{OLD_STORE_REF}:lpa/agent/store.py", "exec"), module.__dict__)
    return module


class TimerPersistence:
    """The former engine's saving: at most once per interval, the whole history, off-thread."""

    def __init__(self, reactor: Any, manager: Any, path: str, interval: float = 1.0) -> None:
        module = old_store_module()
        if module is None:
            raise SystemExit(f"timer peer: `git show {OLD_STORE_REF}:lpa/agent/store.py` failed")
        self._store = module.JsonJobStore(path, background=True)
        self._reactor = reactor
        self._manager = manager
        self._interval = interval
        self._call: Any = None
        self.saves = 0
        manager.events.subscribe(self._on_event)

    def _on_event(self, event: Any) -> None:
        if self._call is None or not self._call.active():
            self._call = self._reactor.callLater(self._interval, self.save)

    def save(self) -> None:
        jobs = list(self._manager._history.jobs.values())
        entries = [(job, self._manager.events.kept(job.id)) for job in jobs]
        views = [job.view for job in jobs]
        for job in jobs:
            job.view = None  # a field the former Job did not have (its store would write it)
        try:
            self._store.save(entries)  # encodes now, writes on its own thread
        finally:
            for job, view in zip(jobs, views, strict=True):
                job.view = view
        self.saves += 1

    def close(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self.save()
        self._store.close()


class Engine:
    """A JobManager in one mode with one job held running."""

    def __init__(self, reactor: Any, mode: str, directory: str, keep: int) -> None:
        from lpa.agent.jobs import JobManager
        from lpa.agent.model import JobRequest
        from lpa.agent.store import JobFileStore
        from lpa.agent.wal import VolatileJournal, WriteAheadLog
        from tests.fakes import FakeBackend, FakeProcessRunner, FakeSystem

        self.reactor = reactor
        self.mode = mode
        self.journal: Any = VolatileJournal()
        if mode != "timer":
            self.journal = WriteAheadLog(
                os.path.join(directory, "journal"), clock=reactor, sync=mode == "wal"
            )
        self.backend = FakeBackend()
        self.backend.script("patch_apply", gate=True)
        ids = itertools.count(1)
        self.manager = JobManager(
            backend=self.backend, system=FakeSystem(), runner=FakeProcessRunner(),
            store=JobFileStore(os.path.join(directory, "jobs")), clock=reactor,
            journal=self.journal, max_events_per_job=keep,
            uuid_factory=lambda: uuid.UUID(int=next(ids)),
        )
        self.manager.start()
        self.timer = None
        if mode == "timer":
            self.timer = TimerPersistence(
                reactor, self.manager, os.path.join(directory, "jobs_history.json")
            )
        self.job = self.manager.submit(JobRequest(operation="patch_apply"))

    async def running(self) -> None:
        while self.job.status != "running":
            await task.deferLater(self.reactor, 0, lambda: None)

    def output(self, line: str) -> None:
        self.manager.job_output(self.job, line)

    def finish(self) -> None:
        self.backend.gates[self.job.id].callback(None)

    async def close(self) -> None:
        if self.timer is not None:
            self.timer.close()
        await self.manager.stop()


async def throughput(reactor: Any, mode: str, options: argparse.Namespace) -> dict[str, Any]:
    directory = tempfile.mkdtemp(prefix=f"lpa-bench-wal-{mode}-", dir=options.dir)
    try:
        engine = Engine(reactor, mode, directory, keep=1000)
        await engine.running()
        published: list[float] = []
        engine.manager.events.subscribe(
            lambda event: event.kind == "output" and published.append(time.monotonic())
        )
        lateness = [0.0]
        last = [time.monotonic()]

        def beat() -> None:
            now = time.monotonic()
            lateness[0] = max(lateness[0], now - last[0] - 0.005)
            last[0] = now

        heartbeat = task.LoopingCall(beat)
        heartbeat.clock = reactor
        heartbeat.start(0.005, now=True)
        syncs_before = getattr(engine.journal, "syncs", 0)
        start = time.monotonic()
        cpu = time.process_time()
        for i in range(0, options.events, CHUNK):
            for _ in range(min(CHUNK, options.events - i)):
                engine.output(LINE)
            await task.deferLater(reactor, 0, lambda: None)
        while len(published) < options.events:
            await task.deferLater(reactor, 0.001, lambda: None)
        elapsed = published[options.events - 1] - start
        cpu = time.process_time() - cpu
        heartbeat.stop()
        syncs = getattr(engine.journal, "syncs", 0) - syncs_before
        saves = engine.timer.saves if engine.timer is not None else 0
        engine.finish()
        await engine.close()
        return {
            "rate": options.events / elapsed,
            "syncs": syncs,
            "per_sync": options.events / syncs if syncs else float("nan"),
            "lateness_ms": lateness[0] * 1000,
            "cpu_us": cpu / options.events * 1e6,
            "saves": saves,
        }
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def fanout(reactor: Any, mode: str, options: argparse.Namespace) -> dict[str, Any]:
    from lpa.agent.http.api import AgentApi
    from lpa.agent.ws import JobStreamFactory, make_ws_resource
    from tests.fakes import FakeBackend, FakeSystem

    directory = tempfile.mkdtemp(prefix=f"lpa-bench-wal-{mode}-", dir=options.dir)
    keep = int(options.rate * options.seconds) + 100
    engine = Engine(reactor, mode, directory, keep=keep)
    await engine.running()
    factory = JobStreamFactory(engine.manager.events, engine.manager, clock=reactor,
                               max_connections=options.clients + 8, send_buffer_events=keep + 100)
    api = AgentApi(jobs=engine.manager, backend=FakeBackend(), system=FakeSystem(),
                   clock=reactor, version="bench", rate_limiter=None,
                   ws_resource=make_ws_resource(factory))
    port = reactor.listenTCP(0, api.site(), interface="127.0.0.1")
    child = ws_fanout.ChildProtocol()
    process = None
    try:
        argv = [sys.executable, os.path.abspath(__file__), "--client",
                "--port", str(port.getHost().port), "--jobs", engine.job.id,
                "--clients", str(options.clients)]
        process = reactor.spawnProcess(child, sys.executable, argv, env=os.environ.copy())
        await ws_fanout.with_timeout(reactor, child.wait("ready"), 60, f"{mode}: clients")
        await task.deferLater(reactor, 0.5, lambda: None)
        paced = int(options.rate * options.seconds)
        started = time.monotonic()
        for i in range(paced):
            wait = started + i / options.rate - time.monotonic()
            if wait > 0:
                await task.deferLater(reactor, wait, lambda: None)
            engine.output(f"t={time.monotonic():.6f} {LINE}")
        engine.finish()
        results = await ws_fanout.with_timeout(reactor, child.wait("results"), 60,
                                               f"{mode}: end")
    finally:
        if process is not None and process.pid is not None:
            process.closeStdin()
            try:
                await ws_fanout.with_timeout(reactor, child.ended, 10, f"{mode}: client exit")
            except TimeoutError:
                process.signalProcess("KILL")
                await child.ended
        await port.stopListening()
        await engine.close()
        shutil.rmtree(directory, ignore_errors=True)
    delays = results["delays"][engine.job.id]
    return {
        "p50": ws_fanout.pct(delays, 0.5) * 1000,
        "p99": ws_fanout.pct(delays, 0.99) * 1000,
        "got": len(delays),
        "expected": paced * options.clients,
    }


async def startup(reactor: Any, options: argparse.Namespace) -> dict[str, float]:
    """Seconds to load a full history: the former single document against one file per job
    (the whole engine start, events left undecoded until asked for)."""
    from lpa.agent.jobs import JobManager
    from lpa.agent.model import Job, JobRequest
    from lpa.agent.store import JobFileStore
    from lpa.agent.wal import WriteAheadLog
    from lpa.events import JobEvent
    from tests.fakes import FakeBackend, FakeProcessRunner, FakeSystem

    module = old_store_module()
    directory = tempfile.mkdtemp(prefix="lpa-bench-history-", dir=options.dir)
    try:
        entries = []
        for j in range(options.history_jobs):
            job_id = str(uuid.UUID(int=j + 1))
            stamp = f"2026-11-25T20:{j // 60 % 60:02d}:{j % 60:02d}.000001+00:00"
            job = Job(id=job_id, operation="patch_apply", status="completed", created_at=stamp,
                      updated_at=stamp, completed_at=stamp,
                      request=JobRequest(operation="patch_apply"),
                      logs=[f"{LINE} {n}" for n in range(500)], seq=1000)
            events = [JobEvent(job_id=job_id, seq=n, status="running", progress=50,
                               message=f"{LINE} {n}", timestamp=stamp, kind="output",
                               incarnation="bench:1") for n in range(1, 1001)]
            entries.append((job, events))
        JobFileStore(os.path.join(directory, "jobs")).save(entries)
        figures: dict[str, float] = {}
        if module is not None:
            legacy = os.path.join(directory, "jobs_history.json")
            for job, _ in entries:
                job.incarnation = None
            module.JsonJobStore(legacy).save(entries)
            started = time.perf_counter()
            module.JsonJobStore(legacy).load()
            figures["old"] = time.perf_counter() - started
        del entries
        manager = JobManager(
            backend=FakeBackend(), system=FakeSystem(), runner=FakeProcessRunner(),
            store=JobFileStore(os.path.join(directory, "jobs")), clock=reactor,
            journal=WriteAheadLog(os.path.join(directory, "journal"), clock=reactor),
            history_limit=options.history_jobs,
        )
        started = time.perf_counter()
        manager.start()
        figures["new"] = time.perf_counter() - started
        await manager.stop()
        return figures
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# -- the client process ---------------------------------------------------------------------


async def client_main(reactor: Any, options: argparse.Namespace) -> None:
    """K WebSocket clients (offering the job stream's subprotocol) feeding a ws_fanout Tally."""
    import threading

    from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol

    from lpa.protocol import SUBPROTOCOL

    jobs = options.jobs.split(",")
    tally = ws_fanout.Tally(options.clients, jobs)
    protocols: list[Any] = []

    class Client(WebSocketClientProtocol):
        def onOpen(self) -> None:
            protocols.append(self)
            for job_id in jobs:
                self.sendMessage(json.dumps({"action": "subscribe", "job_id": job_id}).encode())

        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            received = time.monotonic()
            frame = json.loads(payload)
            if frame.get("event") == "subscribed":
                tally.became_ready()
            elif frame.get("event") == "job_status":
                tally.event(frame["job_id"], frame.get("message", ""), received)
            elif frame.get("event") == "job_complete":
                tally.end(frame["job_id"])

    factory = WebSocketClientFactory(
        f"ws://localhost:{options.port}/api/v1/ws/jobs", protocols=[SUBPROTOCOL]
    )
    factory.protocol = Client
    factory.setProtocolOptions(autoPingInterval=0, openHandshakeTimeout=30)
    for _ in range(options.clients):
        reactor.connectTCP("127.0.0.1", options.port, factory)
        await task.deferLater(reactor, 0.002, lambda: None)
    finished: defer.Deferred[None] = defer.Deferred()

    def watch_stdin() -> None:
        sys.stdin.buffer.read()
        reactor.callFromThread(finished.callback, None)

    threading.Thread(target=watch_stdin, daemon=True).start()
    await finished
    for proto in protocols:
        proto.dropConnection(abort=True)


# -- main ---------------------------------------------------------------------------------


async def agent_main(reactor: Any, options: argparse.Namespace) -> None:
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    for repeat in range(options.repeat):
        # interleaved, each round in another order: drift of a busy machine hits every mode
        shift = repeat % len(MODES)
        for mode in MODES[shift:] + MODES[:shift]:
            runs[mode].append(await throughput(reactor, mode, options))
    results: dict[str, Any] = {}
    for mode in MODES:
        results[mode] = {
            "throughput": {
                key: statistics.median(run[key] for run in runs[mode]) for key in runs[mode][0]
            }
        }
    for mode in MODES:
        results[mode]["fanout"] = await fanout(reactor, mode, options)
    results["startup"] = await startup(reactor, options)
    print("RESULT " + json.dumps(results))


def main(options: argparse.Namespace) -> None:
    import twisted

    directory = options.dir or tempfile.gettempdir()
    print(f"wal: {options.events} events appended by one job in chunks of {CHUNK} (median of "
          f"{options.repeat} runs per engine); fan-out "
          f"{options.rate:.0f} events/s for {options.seconds:.0f} s to {options.clients} "
          f"WebSocket clients; {os.cpu_count()} CPUs; Python {sys.version.split()[0]}, "
          f"Twisted {twisted.__version__}")
    print(f"log directory under {directory} ({filesystem_of(os.path.realpath(directory))})")
    argv = [sys.executable, os.path.abspath(__file__), "--agent", "--events", str(options.events),
            "--repeat", str(options.repeat), "--history-jobs", str(options.history_jobs),
            "--clients", str(options.clients), "--rate", str(options.rate),
            "--seconds", str(options.seconds)] + (["--dir", options.dir] if options.dir else [])
    completed = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    lines = [x for x in completed.stdout.splitlines() if x.startswith("RESULT ")]
    if completed.returncode != 0 or not lines:
        print(completed.stdout[-2000:], completed.stderr[-3000:], sep="\n")
        raise SystemExit(f"agent process failed ({completed.returncode})")
    results = json.loads(lines[-1][len("RESULT "):])
    print(f"\n{'':24}{'events/s':>10}{'syncs':>8}{'ev/sync':>9}{'CPU us/ev':>11}"
          f"{'max lag ms':>12}{'fan-out p50 ms':>16}{'p99 ms':>9}{'delivered':>14}")
    for mode in MODES:
        t, f = results[mode]["throughput"], results[mode]["fanout"]
        print(f"{NAMES[mode]:24}{t['rate']:>10.0f}{t['syncs']:>8}{t['per_sync']:>9.1f}"
              f"{t['cpu_us']:>11.1f}{t['lateness_ms']:>12.1f}{f['p50']:>16.2f}{f['p99']:>9.2f}"
              f"{str(f['got']) + '/' + str(f['expected']):>14}")
    wal, nosync, timer = (results[m]["throughput"]["rate"] for m in MODES)
    print(f"\nratio wal/timer events/s: {wal / timer:.2f} (target >= 0.80: the write-ahead log "
          f"costs {max(0.0, 1 - wal / timer) * 100:.0f} %); wal/wal-nosync: {wal / nosync:.2f}")
    print("max lag: worst lateness of a 5 ms LoopingCall on the agent's reactor during the "
          "throughput phase")
    start = results["startup"]
    old = f"{start['old']:.2f} s" if "old" in start else "n/a (no git)"
    print(f"\nstart-up with {options.history_jobs} finished jobs of 1000 events: engine start "
          f"{start['new']:.2f} s (one file per job); the former JsonJobStore.load {old}")


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (about 20 s)")
    parser.add_argument("--events", type=int, default=None,
                        help="throughput events (default 20000, quick 5000)")
    parser.add_argument("--clients", type=int, default=None, help="K (default 50, quick 10)")
    parser.add_argument("--rate", type=float, default=50.0, help="fan-out events/s")
    parser.add_argument("--seconds", type=float, default=None,
                        help="fan-out phase in s (default 8, quick 3)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="throughput runs per engine, median shown (default 5, quick 3)")
    parser.add_argument("--history-jobs", type=int, default=None,
                        help="jobs in the start-up history (default 500, quick 100)")
    parser.add_argument("--dir", default=None, help="where the logs go (default: temp dir)")
    parser.add_argument("--agent", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--jobs", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    options.events = options.events or (5000 if options.quick else 20000)
    options.repeat = options.repeat or (3 if options.quick else 5)
    options.history_jobs = options.history_jobs or (100 if options.quick else 500)
    options.clients = options.clients or (10 if options.quick else 50)
    options.seconds = options.seconds or (3.0 if options.quick else 8.0)
    return options


if __name__ == "__main__":
    parsed = parse(sys.argv[1:])
    if parsed.client:
        task.react(lambda reactor: defer.Deferred.fromCoroutine(client_main(reactor, parsed)))
    elif parsed.agent:
        task.react(lambda reactor: defer.Deferred.fromCoroutine(agent_main(reactor, parsed)))
    else:
        main(parsed)
