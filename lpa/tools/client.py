"""``lpa agent URL …``: an operator's client for one lpa-agent (or an original linux-patch-api).

A synchronous command-line client: stdlib ``http.client`` + ``ssl`` for REST, the ``websockets``
sync client for the job stream.  Certificates come from ``--cert/--key/--ca`` or the environment
(``LPA_CERT``, ``LPA_KEY``, ``LPA_CA``).

``watch`` follows a job the way the relay does::

    subscribe {job_id, after_seq: N} ──▶ job_status … job_status(terminal) ──▶ job_complete: done
          │ handshake fails (TLS, not 101, bad accept key, timeout)
          ▼
    every interval: GET /api/v1/jobs/{id}/events?after=N   (410 EVENTS_EXPIRED → jump to details)
          │ 404/405 (an original agent has no events endpoint)
          ▼
    every interval: GET /api/v1/jobs/{id}   until the status is terminal

Progress is a bar on a terminal and one plain line per event otherwise.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import ssl
import sys
import time
import urllib.parse
from typing import Any, Callable, Iterator, Mapping, Sequence, TextIO

import attr

from lpa.errors import LpaError
from lpa.events import TERMINAL_STATUSES, normalise_status

DEFAULT_PORT = 12443
ENV_CERT, ENV_KEY, ENV_CA = "LPA_CERT", "LPA_KEY", "LPA_CA"

#: (method, path, body or None) -> (HTTP status, response body bytes)
Transport = Callable[[str, str, "bytes | None"], "tuple[int, bytes]"]


class ClientError(LpaError):
    """The agent answered with an error, or could not be reached; ``str()`` is one line."""

    def __init__(
        self, message: str, *, status: int | None = None, code: str | None = None,
        details: Any = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.details = details


@attr.s(frozen=True, slots=True, auto_attribs=True)
class AgentUrl:
    """Where an agent listens; ``secure`` is False only for an explicit ``http://`` URL."""

    host: str
    port: int
    secure: bool = True

    @classmethod
    def parse(cls, text: str) -> "AgentUrl":
        """``host``, ``host:port``, ``https://host[:port]`` or ``http://host[:port]``."""
        if "://" not in text:
            text = "https://" + text
        parsed = urllib.parse.urlsplit(text)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ClientError(f"not an agent URL: {text!r} (expected https://HOST[:PORT])")
        if parsed.path not in ("", "/"):
            raise ClientError(f"agent URL must not have a path: {text!r}")
        try:
            port = parsed.port or DEFAULT_PORT
        except ValueError:
            raise ClientError(f"bad port in agent URL {text!r}") from None
        return cls(parsed.hostname, port, parsed.scheme == "https")

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def http_url(self) -> str:
        return f"{'https' if self.secure else 'http'}://{self.netloc}"

    def ws_url(self, path: str = "/api/v1/ws/jobs") -> str:
        return f"{'wss' if self.secure else 'ws'}://{self.netloc}{path}"


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Credentials:
    """Client certificate, key and CA bundle file paths (any may be None)."""

    cert: str | None = None
    key: str | None = None
    ca: str | None = None

    @classmethod
    def resolve(
        cls, cert: str | None, key: str | None, ca: str | None,
        environ: Mapping[str, str] | None = None,
    ) -> "Credentials":
        """Options first, then ``LPA_CERT``/``LPA_KEY``/``LPA_CA``."""
        env = os.environ if environ is None else environ
        return cls(cert or env.get(ENV_CERT) or None, key or env.get(ENV_KEY) or None,
                   ca or env.get(ENV_CA) or None)

    def ssl_context(self) -> ssl.SSLContext:
        """Verify the agent against ``ca`` (system roots without it); present the client cert."""
        for label, path in (("certificate", self.cert), ("key", self.key), ("CA", self.ca)):
            if path is not None and not os.path.isfile(path):
                raise ClientError(f"{label} file {path} does not exist")
        if self.cert is None and self.key is None:
            raise ClientError(f"no client certificate: agents require one; pass --cert and --key "
                              f"or set {ENV_CERT} and {ENV_KEY} (and --ca or {ENV_CA})")
        if (self.cert is None) != (self.key is None):
            raise ClientError("give both a client certificate and its key (--cert and --key)")
        try:
            context = ssl.create_default_context(cafile=self.ca)
            if self.cert is not None:
                context.load_cert_chain(self.cert, self.key)
        except (ssl.SSLError, OSError) as error:
            raise ClientError(f"cannot load TLS files: {error}") from None
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])
        return context


def http_transport(url: AgentUrl, context: ssl.SSLContext | None, timeout: float) -> Transport:
    """The production transport: one HTTP(S) connection per request."""

    def send(method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        connection: http.client.HTTPConnection
        if url.secure:
            connection = http.client.HTTPSConnection(
                url.host, url.port, timeout=timeout, context=context)
        else:
            connection = http.client.HTTPConnection(url.host, url.port, timeout=timeout)
        headers = {"Accept": "application/json", "User-Agent": "lpa-client"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        except ssl.SSLError as error:
            raise ClientError(f"TLS handshake with {url.netloc} failed: {error.reason or error}"
                              " (check --cert/--key/--ca)") from None
        except OSError as error:
            raise ClientError(f"cannot reach the agent at {url.netloc}: "
                              f"{error.strerror or error}") from None
        finally:
            connection.close()

    return send


class AgentClient:
    """The agent's REST API, one method per endpoint; returns the envelope's ``data``."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """Send one request; raise :class:`ClientError` for an error envelope or a bad answer."""
        payload = None if body is None else json.dumps(body).encode("utf-8")
        status, raw = self._transport(method, path, payload)
        try:
            envelope = json.loads(raw.decode("utf-8")) if raw else None
        except (UnicodeDecodeError, ValueError):
            envelope = None
        if not isinstance(envelope, dict) or "success" not in envelope:
            text = raw[:200].decode("utf-8", "replace").strip()
            raise ClientError(f"HTTP {status} from {method} {path}"
                              + (f": {text}" if text else " with no body"), status=status)
        if not envelope.get("success") or status >= 400:
            error = envelope.get("error") or {}
            code = error.get("code") or "UNKNOWN_ERROR"
            message = error.get("message") or f"HTTP {status}"
            raise ClientError(f"{code}: {message} (HTTP {status})", status=status, code=code,
                              details=error.get("details"))
        return envelope.get("data")

    def health(self) -> Any:
        return self.request("GET", "/api/v1/health")

    def patches(self, *, security: bool = False) -> Any:
        return self.request("GET", "/api/v1/patches" + ("?security=true" if security else ""))

    def apply(
        self, *, dry_run: bool = False, security_only: bool = False,
        packages: Sequence[str] | None = None,
    ) -> Any:
        body: dict[str, Any] = {"dry_run": dry_run, "security_only": security_only}
        if packages is not None:
            body["packages"] = list(packages)
        return self.request("POST", "/api/v1/patches/apply", body)

    def jobs(self, *, status: str | None = None, limit: int | None = None) -> Any:
        query = urllib.parse.urlencode(
            {k: v for k, v in (("status", status), ("limit", limit)) if v is not None})
        return self.request("GET", "/api/v1/jobs" + (f"?{query}" if query else ""))

    def job(self, job_id: str) -> Any:
        return self.request("GET", f"/api/v1/jobs/{urllib.parse.quote(job_id, safe='')}")

    def cancel(self, job_id: str) -> Any:
        return self.request("POST", f"/api/v1/jobs/{urllib.parse.quote(job_id, safe='')}/cancel")

    def events(self, job_id: str, after: int) -> Any:
        return self.request(
            "GET", f"/api/v1/jobs/{urllib.parse.quote(job_id, safe='')}/events?after={after}")


# --- following a job -----------------------------------------------------------------------


@attr.s(auto_attribs=True)
class JobProgress:
    """What a watcher knows about one job; fed by events, snapshots and resyncs."""

    job_id: str
    seq: int = 0
    status: str = "pending"
    progress: int = 0
    message: str = ""
    error: str | None = None
    complete: bool = False

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def apply_event(self, wire: Mapping[str, Any]) -> bool:
        """Take one job event; False when it is a duplicate (seq already seen) or another job's."""
        if wire.get("job_id") != self.job_id:
            return False
        seq = wire.get("seq")
        if isinstance(seq, int) and not isinstance(seq, bool):
            if seq <= self.seq:
                return False
            self.seq = seq
        self._take(wire)
        if wire.get("event") == "job_complete":
            self.complete = True
        return True

    def apply_snapshot(self, detail: Mapping[str, Any]) -> None:
        """Take a job detail (``GET /jobs/{id}``, a 410 or a ``resync``)."""
        seq = detail.get("seq")
        if isinstance(seq, int) and not isinstance(seq, bool) and seq > self.seq:
            self.seq = seq
        self._take(detail)
        if self.terminal:
            self.complete = True

    def _take(self, wire: Mapping[str, Any]) -> None:
        status = wire.get("status")
        if isinstance(status, str):
            try:
                self.status = normalise_status(status)
            except ValueError:
                pass
        progress = wire.get("progress")
        if isinstance(progress, int) and not isinstance(progress, bool):
            self.progress = max(0, min(100, progress))
        message = wire.get("message")
        if isinstance(message, str):
            self.message = message
        if wire.get("error"):
            self.error = str(wire["error"])


class ProgressPrinter:
    """A redrawn bar on a terminal, one plain line per event otherwise."""

    def __init__(self, out: TextIO, *, tty: bool | None = None, width: int = 30) -> None:
        self._out = out
        self._tty = out.isatty() if tty is None else tty
        self._width = width
        self._drawn = False

    def show(self, state: JobProgress, wire: Mapping[str, Any] | None = None) -> None:
        if self._tty:
            filled = state.progress * self._width // 100
            bar = "#" * filled + "-" * (self._width - filled)
            line = f"\r[{bar}] {state.progress:3d}% {state.status:<9} {state.message[:60]}"
            self._out.write(line.ljust(110))
            self._drawn = True
        else:
            kind = (wire or {}).get("kind", "snapshot" if wire is None else "status")
            self._out.write(f"seq={state.seq} {state.status} {state.progress}% [{kind}] "
                            f"{state.message}\n")
        self._out.flush()

    def finish(self, state: JobProgress) -> None:
        if self._drawn:
            self._out.write("\n")
        line = f"job {state.job_id} {state.status}"
        if state.error:
            line += f": {state.error}"
        self._out.write(line + "\n")
        self._out.flush()


class HandshakeFailed(Exception):
    """The WebSocket could not be opened; the watcher falls back to polling."""


class StreamClosed(ClientError):
    """An open WebSocket closed before the job completed; the watcher polls from its last seq."""


def websocket_events(
    url: AgentUrl, context: ssl.SSLContext | None, job_id: str, after_seq: int,
    *, open_timeout: float = 10.0,
) -> Iterator[dict[str, Any]]:
    """Yield every JSON object the agent sends after subscribing to ``job_id`` from ``after_seq``.

    Raises :class:`HandshakeFailed` when the opening handshake fails, and
    :class:`ClientError` when an open connection breaks.
    """
    from websockets.exceptions import ConnectionClosed, InvalidHandshake
    from websockets.sync.client import connect
    from websockets.typing import Subprotocol

    from lpa.protocol import SUBPROTOCOL

    try:
        connection = connect(url.ws_url(), ssl=context if url.secure else None,
                             subprotocols=[Subprotocol(SUBPROTOCOL)],
                             open_timeout=open_timeout, max_size=2**22,
                             user_agent_header="lpa-client")
    except (InvalidHandshake, OSError, TimeoutError, ssl.SSLError) as error:
        raise HandshakeFailed(f"{type(error).__name__}: {error}") from None
    try:
        connection.send(json.dumps(
            {"action": "subscribe", "job_id": job_id, "after_seq": after_seq}))
        for message in connection:
            if isinstance(message, bytes):
                continue
            try:
                decoded = json.loads(message)
            except ValueError:
                continue
            if isinstance(decoded, dict):
                yield decoded
    except ConnectionClosed as error:
        raise StreamClosed(f"the agent closed the WebSocket: {error}") from None
    finally:
        connection.close()  # a normal 1000 close, also when the caller stops early
    raise StreamClosed("the agent closed the WebSocket before the job completed")


EventSource = Callable[[str, int], Iterator[dict[str, Any]]]


class JobWatcher:
    """Follow one job to its end over the WebSocket, else by polling; returns the final state."""

    def __init__(
        self, client: AgentClient, printer: ProgressPrinter, *,
        ws_events: EventSource | None, poll_interval: float = 2.0,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        timeout: float | None = None, log: Callable[[str], None] | None = None,
    ) -> None:
        self._client = client
        self._printer = printer
        self._ws_events = ws_events
        self._interval = poll_interval
        self._sleep = sleep
        self._monotonic = monotonic
        self._timeout = timeout
        self._log = log or (lambda line: None)
        self.transport = "ws"

    def watch(self, job_id: str) -> JobProgress:
        state = JobProgress(job_id)
        deadline = None if self._timeout is None else self._monotonic() + self._timeout
        if self._ws_events is not None:
            try:
                self._follow_ws(state)
                return self._done(state)
            except HandshakeFailed as why:
                self._log(f"WebSocket handshake failed ({why}); polling instead")
            except StreamClosed as why:
                self._log(f"{why}; polling from seq {state.seq}")
        else:
            self._log("polling over REST (--poll)")
        self.transport = "poll"
        self._poll(state, deadline)
        return self._done(state)

    def _done(self, state: JobProgress) -> JobProgress:
        self._printer.finish(state)
        return state

    def _follow_ws(self, state: JobProgress) -> None:
        assert self._ws_events is not None
        for wire in self._ws_events(state.job_id, state.seq):
            event = wire.get("event")
            if event == "error":
                raise ClientError(f"the agent refused the subscription: "
                                  f"{wire.get('status')}: {wire.get('message')}")
            if event == "resync":
                snapshot = wire.get("job") or wire.get("snapshot") or wire.get("detail") or wire
                state.apply_snapshot(snapshot)
                self._printer.show(state)
            elif event in ("job_status", "job_complete") and state.apply_event(wire):
                self._printer.show(state, wire)
            if state.complete:
                return

    def _poll(self, state: JobProgress, deadline: float | None) -> None:
        use_events = True
        while True:
            if use_events:
                try:
                    data = self._client.events(state.job_id, state.seq)
                except ClientError as error:
                    if error.code == "EVENTS_EXPIRED" and isinstance(error.details, dict):
                        state.apply_snapshot(error.details)
                        self._printer.show(state)
                    elif error.status in (404, 405) and error.code != "JOB_NOT_FOUND":
                        self._log("the agent has no events endpoint; polling the job itself")
                        use_events = False
                        continue
                    else:
                        raise
                else:
                    for wire in (data or {}).get("events", []):
                        if state.apply_event(wire):
                            self._printer.show(state, wire)
                    if (data or {}).get("terminal") and state.terminal:
                        state.complete = True
            else:
                detail = self._client.job(state.job_id)
                before = (state.status, state.progress, state.message)
                state.apply_snapshot(detail)
                if (state.status, state.progress, state.message) != before:
                    self._printer.show(state)
            if state.complete:
                return
            if deadline is not None and self._monotonic() >= deadline:
                raise ClientError(f"job {state.job_id} still {state.status} after the timeout")
            self._sleep(self._interval)


# --- the command line ----------------------------------------------------------------------


def _print_json(data: Any, out: TextIO) -> None:
    out.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _format_patches(data: Any, out: TextIO) -> None:
    patches = (data or {}).get("patches", [])
    for patch in patches:
        out.write(f"{patch.get('name', '?'):<40} {patch.get('current_version') or '-':<24} -> "
                  f"{patch.get('available_version') or '-':<24} {patch.get('severity', '')}\n")
    out.write(f"{len(patches)} patches ({(data or {}).get('security_updates', 0)} security); "
              f"reboot required: {'yes' if (data or {}).get('requires_reboot') else 'no'}\n")


def _format_jobs(data: Any, out: TextIO) -> None:
    jobs = (data or {}).get("jobs", [])
    for job in jobs:
        out.write(f"{job.get('job_id')}  {job.get('status', '?'):<9} "
                  f"{job.get('operation', '?'):<12}"
                  f" {job.get('created_at', '')}\n")
    out.write(f"{len(jobs)} jobs\n")


def run(
    args: argparse.Namespace, *, out: TextIO | None = None, err: TextIO | None = None,
    transport: Transport | None = None, ws_events: EventSource | None = None,
    environ: Mapping[str, str] | None = None, sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Run one ``lpa agent`` action; collaborators injectable for tests."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    url = AgentUrl.parse(args.url)
    context = None
    if url.secure and (transport is None or ws_events is None):
        context = Credentials.resolve(args.cert, args.key, args.ca, environ).ssl_context()
    if transport is None:
        transport = http_transport(url, context, args.timeout)
    client = AgentClient(transport)
    action = args.action
    if action == "health":
        _print_json(client.health(), out)
    elif action == "patches":
        data = client.patches(security=args.security)
        _print_json(data, out) if args.json else _format_patches(data, out)
    elif action == "apply":
        data = client.apply(dry_run=args.dry_run, security_only=args.security_only,
                            packages=args.packages)
        job_id = (data or {}).get("job_id")
        out.write(f"{job_id}\n")
        if args.watch and job_id:
            return _watch(client, url, context, job_id, args, out, err, ws_events, sleep)
    elif action == "jobs":
        data = client.jobs(status=args.status, limit=args.limit)
        _print_json(data, out) if args.json else _format_jobs(data, out)
    elif action == "job":
        _print_json(client.job(args.job_id), out)
    elif action == "cancel":
        data = client.cancel(args.job_id)
        out.write(f"job {args.job_id} {(data or {}).get('status', 'cancel requested')}\n")
    elif action == "watch":
        return _watch(client, url, context, args.job_id, args, out, err, ws_events, sleep)
    return 0


def _watch(
    client: AgentClient, url: AgentUrl, context: ssl.SSLContext | None, job_id: str,
    args: argparse.Namespace, out: TextIO, err: TextIO, ws_events: EventSource | None,
    sleep: Callable[[float], None],
) -> int:
    if ws_events is None and not args.poll:
        def ws_events(job: str, after: int) -> Iterator[dict[str, Any]]:
            return websocket_events(url, context, job, after, open_timeout=args.timeout)

    def log(line: str) -> None:
        err.write(f"lpa: {line}\n")
        err.flush()

    watcher = JobWatcher(client, ProgressPrinter(out), ws_events=None if args.poll else ws_events,
                         poll_interval=args.interval, sleep=sleep, log=log)
    state = watcher.watch(job_id)
    return 0 if state.status == "completed" else 1


def add_parser(subparsers: Any) -> None:
    """Register ``lpa agent``."""
    parser = subparsers.add_parser(
        "agent", help="talk to one agent's REST API and follow its jobs",
        description="Talk to one lpa-agent (or linux-patch-api) over mutual TLS. Certificates "
        f"come from --cert/--key/--ca or ${ENV_CERT}, ${ENV_KEY}, ${ENV_CA}.")
    parser.add_argument("url", metavar="URL",
                        help="the agent: HOST, HOST:PORT or https://HOST[:PORT] "
                        f"(port {DEFAULT_PORT})")
    parser.add_argument("--cert", help=f"client certificate PEM (default ${ENV_CERT})")
    parser.add_argument("--key", help=f"client private key PEM (default ${ENV_KEY})")
    parser.add_argument("--ca", help=f"CA bundle that signed the agent (default ${ENV_CA})")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds for each request and the WebSocket handshake (default 30)")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    actions.add_parser("health", help="print the agent's health",
                       description="Print GET /api/v1/health as JSON.")
    patches = actions.add_parser("patches", help="list pending patches",
                                 description="List the patches the agent would apply.")
    patches.add_argument("--security", action="store_true", help="security updates only")
    patches.add_argument("--json", action="store_true", help="print the raw JSON")

    apply = actions.add_parser(
        "apply", help="start a patch job and print its id",
        description="POST /api/v1/patches/apply: start a patch job (all pending patches unless "
        "--packages) and print its job id; --watch follows it to its end.")
    apply.add_argument("--dry-run", action="store_true",
                       help="report what would change; change nothing")
    apply.add_argument("--security-only", action="store_true", help="security updates only")
    apply.add_argument("--packages", nargs="+", metavar="NAME", help="only these packages")
    _add_watch_options(apply)
    apply.add_argument("--watch", action="store_true", help="follow the job until it ends")

    jobs = actions.add_parser("jobs", help="list recent jobs", description="List the agent's jobs.")
    jobs.add_argument("--status", help="only jobs in this status (pending, running, completed …)")
    jobs.add_argument("--limit", type=int, help="at most this many (agent default 50)")
    jobs.add_argument("--json", action="store_true", help="print the raw JSON")

    for name, help_text in (("job", "print one job's details as JSON"),
                            ("cancel", "cancel a pending or running job")):
        sub = actions.add_parser(name, help=help_text, description=help_text.capitalize() + ".")
        sub.add_argument("job_id", metavar="ID", help="the agent's job id")
    watch = actions.add_parser(
        "watch", help="follow a job to its end",
        description="Follow a job over the WebSocket (a progress bar on a terminal, one line per "
        "event otherwise); poll the events endpoint when the WebSocket handshake fails. Exits 0 "
        "when the job completed, 1 otherwise.")
    watch.add_argument("job_id", metavar="ID", help="the agent's job id")
    _add_watch_options(watch)
    parser.set_defaults(func=_main, watch=False)


def _add_watch_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--poll", action="store_true",
                        help="poll over REST; do not try the WebSocket")
    parser.add_argument("--interval", type=float, default=2.0,
                        help="seconds between polls (default 2)")


def _main(args: argparse.Namespace) -> int:
    return run(args)
