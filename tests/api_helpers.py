"""Shared set-up for the REST API tests: an ``AgentApi`` over fakes, driven through ``StubTreq``."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from treq.testing import StubTreq
from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from lpa.agent.cache import PatchCache
from lpa.agent.http.api import AgentApi
from lpa.agent.http.ratelimit import RateLimiter
from tests.fakes import FakeBackend, FakeSystem
from tests.fakes_jobs import FakeJobManager

BASE = "https://agent.test:12443"
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?\+00:00\Z")


class Reply:
    """One answer: status, headers and the parsed envelope."""

    def __init__(self, code: int, headers: Any, body: dict[str, Any]) -> None:
        self.code = code
        self.headers = headers
        self.body = body

    @property
    def data(self) -> Any:
        return self.body["data"]

    @property
    def error(self) -> dict[str, Any]:
        error: dict[str, Any] = self.body["error"]
        return error

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name.encode("ascii"))
        return values[-1].decode("latin-1") if values else None


class ApiTestCase(SynchronousTestCase):
    """Builds the API on a ``task.Clock`` with fakes; ``call`` asserts the envelope every time."""

    rate_limiter_enabled = False

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(1_800_000_000)
        self.backend = FakeBackend()
        self.system = FakeSystem()
        self.jobs = FakeJobManager(self.clock)
        self.limiter = RateLimiter(self.clock, enabled=self.rate_limiter_enabled)
        self.cache = PatchCache(self.clock, self.backend, stale_threshold_secs=3600)
        self.peer_error: Any = None
        self.ws_resource: Any = None
        self.extra: dict[str, Any] = {}
        self.build()

    def build(self, **overrides: Any) -> None:
        kwargs: dict[str, Any] = {
            "jobs": self.jobs,
            "backend": self.backend,
            "system": self.system,
            "clock": self.clock,
            "version": "9.9.9",
            "rate_limiter": self.limiter,
            "peer_check": lambda request: self.peer_error,
            "ws_resource": self.ws_resource,
            "max_body_bytes": 4096,
            "cache": self.cache,
            "health_extra": lambda: dict(self.extra),
        }
        kwargs.update(overrides)
        self.api = AgentApi(**kwargs)
        # StubTreq binds treq's functions to its in-memory agent at run time: typed as Any
        self.treq: Any = StubTreq(self.api.resource())

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        headers: dict[str, Any] | None = None,
    ) -> Reply:
        """Send one request and check the envelope shape of whatever comes back."""
        data = raw
        send_headers = {
            name.encode("ascii"): [
                v.encode("latin-1") for v in (value if isinstance(value, list) else [value])
            ]
            for name, value in (headers or {}).items()
        }
        if body is not None:
            data = json.dumps(body).encode()
            send_headers.setdefault(b"Content-Type", [b"application/json"])
        response = self.successResultOf(
            self.treq.request(method, BASE + path, data=data, headers=send_headers or None)
        )
        content = self.successResultOf(self.treq.content(response))
        if method == "HEAD":
            return Reply(response.code, response.headers, {})
        self.assertEqual(
            response.headers.getRawHeaders(b"content-type"), [b"application/json"], content
        )
        envelope = json.loads(content)
        self.assertEnvelope(envelope, response.code)
        return Reply(response.code, response.headers, envelope)

    def assertEnvelope(self, envelope: dict[str, Any], code: int) -> None:
        """Every answer has exactly the envelope members, consistent with its status."""
        self.assertEqual(
            sorted(envelope), ["data", "error", "request_id", "success", "timestamp"], envelope
        )
        uuid.UUID(envelope["request_id"])
        self.assertRegex(envelope["timestamp"], _RFC3339)
        if code < 400:
            self.assertIs(envelope["success"], True)
            self.assertIsNone(envelope["error"])
        else:
            self.assertIs(envelope["success"], False)
            self.assertIsNone(envelope["data"])
            self.assertEqual(sorted(envelope["error"]), ["code", "details", "message", "retryable"])
            self.assertIsInstance(envelope["error"]["code"], str)
            self.assertIsInstance(envelope["error"]["retryable"], bool)

    def assertError(self, reply: Reply, status: int, code: str) -> None:
        self.assertEqual((reply.code, reply.error["code"]), (status, code), reply.body)
