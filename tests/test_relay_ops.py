"""The relay's ops port: probes, static page, status JSON and the event stream, without I/O."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import getChildForRequest
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from lpa.relay.feed import (
    KIND_RESYNC,
    KIND_UPDATE,
    FeedUnavailable,
    IJobUpdateFeed,
    JobUpdateFeed,
    snapshot_from_rows,
)
from lpa.relay.metrics import RelayMetrics
from lpa.relay.ops import EventStream, OpsRoot, Readiness


@implementer(IJobUpdateFeed)
class FakeFeed:
    """Notifications pushed by the test; a snapshot or an outage."""

    def __init__(self) -> None:
        self.listening = True
        self.subscribers: list[Callable[[str, str], object]] = []
        self.document: dict[str, Any] | None = {"now": 1.0, "running": [], "finished": [],
                                                 "truncated": False}

    def subscribe(self, subscriber: Callable[[str, str], object]) -> Callable[[], None]:
        self.subscribers.append(subscriber)
        return lambda: self.subscribers.remove(subscriber)

    def snapshot(self) -> Deferred[dict[str, Any]]:
        if self.document is None:
            return defer.fail(FeedUnavailable("the ops feed has no database connection"))
        return defer.succeed(self.document)

    def push(self, kind: str, payload: str) -> None:
        for subscriber in list(self.subscribers):
            subscriber(kind, payload)


class _Request(DummyRequest):
    """A DummyRequest for ``path``, which it also keeps as ``path`` (as a real one does)."""

    def __init__(self, path: bytes) -> None:
        super().__init__(path.lstrip(b"/").split(b"/"))
        self.path = path


def get(root: Any, path: bytes) -> tuple[DummyRequest, Any]:
    request = _Request(path)
    resource = getChildForRequest(root, request)
    return request, resource.render(request)


def body(request: DummyRequest, rendered: Any) -> bytes:
    return rendered if rendered is not NOT_DONE_YET else b"".join(request.written)


class InterfaceTests(SynchronousTestCase):
    def test_fake_and_real_feed(self) -> None:
        """The fake feed and the real one provide the same interface."""
        verifyObject(IJobUpdateFeed, FakeFeed())
        verifyObject(IJobUpdateFeed, JobUpdateFeed("postgres://x@h/db", clock=Clock(),
                                                   connection_factory=lambda: None))


class ProbeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.feed = FakeFeed()
        self.up = True
        self.readiness = Readiness([("database", lambda: None if self.up else "no database")])
        self.root = OpsRoot(feed=self.feed, readiness=self.readiness,
                            registry=RelayMetrics().registry, clock=Clock())

    def test_healthz_always(self) -> None:
        """/healthz answers 200 while the process runs, database or not."""
        self.up = False
        request, rendered = get(self.root, b"/healthz")
        self.assertEqual(request.responseCode or 200, 200)
        self.assertEqual(json.loads(rendered), {"status": "alive"})

    def test_readyz_follows_checks(self) -> None:
        """/readyz is 200 when every check passes and 503 naming the failed ones otherwise."""
        request, rendered = get(self.root, b"/readyz")
        self.assertEqual((request.responseCode, json.loads(rendered)), (200, {"status": "ready"}))
        self.up = False
        request, rendered = get(self.root, b"/readyz")
        self.assertEqual(request.responseCode, 503)
        self.assertEqual(json.loads(rendered)["failed"], {"database": "no database"})

    def test_a_raising_check_is_not_ready(self) -> None:
        """A check that raises counts as not ready, with the error as its reason."""

        def broken() -> str | None:
            raise RuntimeError("boom")

        self.readiness.add("membership", broken)
        self.assertEqual(self.readiness.failures(), {"membership": "check failed: boom"})

    def test_index_is_self_contained(self) -> None:
        """The page loads only from the relay (CSP) and references no other origin."""
        request, rendered = get(self.root, b"/")
        self.assertIn(b"<title>lpa-relay", rendered)
        [csp] = request.responseHeaders.getRawHeaders(b"content-security-policy") or [b""]
        self.assertIn(b"default-src 'self'", csp)
        self.assertNotIn(b"http://", rendered)
        self.assertNotIn(b"https://", rendered)

    def test_static_files_only(self) -> None:
        """The script and style are served; other names and a listing are not."""
        request, rendered = get(self.root, b"/static/status.js")
        self.assertIn(b"EventSource", body(request, rendered))
        request, rendered = get(self.root, b"/static/")
        self.assertEqual(request.responseCode, 404)
        request, rendered = get(self.root, b"/static/../ops.py")
        self.assertEqual(request.responseCode, 404)

    def test_read_only(self) -> None:
        """Nothing on the ops port takes a POST."""
        request = DummyRequest([b"readyz"])
        request.method = b"POST"
        resource = getChildForRequest(self.root, request)
        from twisted.web.error import UnsupportedMethod

        self.assertRaises(UnsupportedMethod, resource.render, request)

    def test_status_json(self) -> None:
        """/api/status is the feed's snapshot; 503 with the reason while the feed is down."""
        request, rendered = get(self.root, b"/api/status")
        self.assertEqual(json.loads(body(request, rendered))["running"], [])
        self.feed.document = None
        request, rendered = get(self.root, b"/api/status")
        self.assertEqual(request.responseCode, 503)
        self.assertIn("no database connection", json.loads(body(request, rendered))["error"])


class EventStreamTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.feed = FakeFeed()
        self.stream = EventStream(self.feed, clock=self.clock, heartbeat=15, max_clients=2)

    def open(self) -> DummyRequest:
        request = DummyRequest([b"events"])
        self.assertIs(self.stream.render_GET(request), NOT_DONE_YET)
        return request

    def test_notifications_become_events(self) -> None:
        """Each job_update payload is one SSE event; a resync is its own event."""
        request = self.open()
        self.assertEqual(
            request.responseHeaders.getRawHeaders(b"content-type"),
            [b"text/event-stream; charset=utf-8"])
        self.feed.push(KIND_UPDATE, '{"job_id":"j1"}')
        self.feed.push(KIND_RESYNC, "")
        text = b"".join(request.written).decode()
        self.assertTrue(text.startswith("retry: 3000\n\n"))
        self.assertIn('event: job_update\ndata: {"job_id":"j1"}\n\n', text)
        self.assertIn("event: resync\ndata: {}\n\n", text)

    def test_heartbeat_says_whether_the_feed_listens(self) -> None:
        """A ping every heartbeat carries the feed's state; it stops with the last client."""
        request = self.open()
        self.feed.listening = False
        self.clock.advance(15)
        self.assertIn(b'event: ping\ndata: {"listening": false}\n\n', request.written[-1])
        request.processingFailed(Exception("client gone"))
        self.assertEqual((self.feed.subscribers, self.clock.getDelayedCalls()), ([], []))
        self.assertEqual(self.stream.client_count, 0)
        self.flushLoggedErrors()

    def test_client_bound(self) -> None:
        """Past max_clients a new stream gets 503 with Retry-After."""
        self.open()
        self.open()
        request = DummyRequest([b"events"])
        self.stream.render_GET(request)
        self.assertEqual(request.responseCode, 503)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"retry-after"), [b"30"])
        self.stream.close_all()
        self.assertEqual((self.stream.client_count, self.clock.getDelayedCalls()), (0, []))

    def test_multiline_payload_stays_one_event(self) -> None:
        """A payload with line breaks is split over data lines, never into two events."""
        request = self.open()
        self.feed.push(KIND_UPDATE, "a\nb")
        self.assertIn(b"event: job_update\ndata: a\ndata: b\n\n", request.written[-1])
        self.stream.close_all()


class SnapshotShapeTests(SynchronousTestCase):
    def test_rows_grouped_by_job(self) -> None:
        """Query rows become jobs with their hosts, split into running and finished."""
        rows = [
            ("j1", "patch_apply", "running", 10.0, None, "r1", "h1", "web1", "running", 40,
             "ws", 99.0, None, "Inst x", 7, "a1", 11.0, None),
            ("j1", "patch_apply", "running", 10.0, None, "r2", "h2", "web2", "failed", None,
             "poll", 98.0, "agent unreachable", None, 0, "a2", 11.0, 50.0),
            ("j2", "patch_apply", "succeeded", 5.0, 9.0, None, None, None, None, None, None,
             None, None, None, None, None, None, None),
        ]
        document = snapshot_from_rows(rows, 100.0)
        self.assertEqual([job["job_id"] for job in document["running"]], ["j1"])
        self.assertEqual([job["job_id"] for job in document["finished"]], ["j2"])
        hosts = document["running"][0]["hosts"]
        self.assertEqual([(h["host"], h["status"], h["transport"]) for h in hosts],
                         [("web1", "running", "ws"), ("web2", "failed", "poll")])
        self.assertEqual(document["finished"][0]["hosts"], [])


class OpsConfigTests(SynchronousTestCase):
    BASE = '[database]\nurl = "postgresql:///pm"\n'

    def parse(self, text: str, environ: dict[str, str] | None = None) -> Any:
        from lpa.relay.config import parse_relay_config

        return parse_relay_config(self.BASE + text, "relay.toml", environ or {})

    def test_loopback_by_default(self) -> None:
        """Without an [ops] section the port is on, on loopback, plain HTTP."""
        config = self.parse("")
        self.assertEqual((config.ops_enabled, config.ops_bind, config.ops_port,
                          config.ops_tls_cert_path), (True, "127.0.0.1", 12480, None))

    def test_tls_needs_certificate_and_key(self) -> None:
        """A certificate without its key (or the reverse) is one error naming both keys."""
        from lpa.errors import ConfigError

        error = self.assertRaises(ConfigError, self.parse, '[ops]\ntls_cert_path = "/c.pem"\n')
        self.assertIn("ops.tls_cert_path and ops.tls_key_path", str(error))

    def test_bad_values_and_overrides(self) -> None:
        """A port out of range is refused; PATCH_MANAGER__OPS__* variables override."""
        from lpa.errors import ConfigError

        error = self.assertRaises(ConfigError, self.parse, "[ops]\nport = 70000\n")
        self.assertIn("ops.port", str(error))
        config = self.parse("", {"PATCH_MANAGER__OPS__PORT": "9187",
                                 "PATCH_MANAGER__OPS__ENABLED": "false"})
        self.assertEqual((config.ops_port, config.ops_enabled), (9187, False))
