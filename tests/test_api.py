"""The agent's REST API: health, system, the WebSocket route and the gate, always in the envelope.

The package and patch routes are tested in ``tests.test_api_packages``, the job routes in
``tests.test_api_jobs``.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.defer import Deferred, fail
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyRequest

from lpa.errors import (
    ForbiddenError,
    MutationInProgressError,
    RebootBlockedError,
    UpgradeRequiredError,
)
from tests.api_helpers import ApiTestCase


class HealthTests(ApiTestCase):
    def test_health_both_paths(self) -> None:
        """/health and /api/v1/health answer the same data with host and agent uptime."""
        self.clock.advance(42)
        short = self.call("GET", "/health")
        long = self.call("GET", "/api/v1/health")
        self.assertEqual(short.code, 200)
        self.assertEqual(short.data, long.data)
        self.assertEqual(short.data["status"], "healthy")
        self.assertEqual(short.data["uptime_seconds"], 1234)
        self.assertEqual(short.data["agent_uptime_seconds"], 42)
        self.assertEqual(short.data["version"], "9.9.9")
        self.assertEqual(short.data["cache_status"], "stale")
        self.assertIsNone(short.data["last_cache_update"])
        self.assertIn("crl_status", short.data)

    def test_health_has_no_side_effects(self) -> None:
        """Health with a stale cache neither submits a job, emits an event, nor asks the backend."""
        self.call("GET", "/api/v1/health")
        self.assertEqual(self.jobs.submitted, [])
        self.assertEqual(self.jobs.jobs, {})
        self.assertEqual(self.backend.calls, [])

    def test_cache_status_follows_patches(self) -> None:
        """After GET /patches the cache is fresh with its update time; an hour later stale."""
        self.call("GET", "/api/v1/patches")
        data = self.call("GET", "/health").data
        self.assertEqual(data["cache_status"], "fresh")
        self.assertEqual(data["last_cache_update"], "2027-01-15T08:00:00+00:00")
        self.clock.advance(3600)
        self.assertEqual(self.call("GET", "/health").data["cache_status"], "stale")

    def test_health_extra_merged_and_degrades(self) -> None:
        """health_extra fields are reported, and an invalid CRL makes the status degraded."""
        self.extra = {"crl_status": "valid", "crl_age_seconds": 5, "gpg_key_status": "valid"}
        data = self.call("GET", "/health").data
        self.assertEqual((data["status"], data["crl_age_seconds"]), ("healthy", 5))
        self.extra["crl_status"] = "invalid"
        self.assertEqual(self.call("GET", "/health").data["status"], "degraded")
        self.extra = {"repo_config_synced": False}
        self.assertEqual(self.call("GET", "/health").data["status"], "degraded")

    def test_health_extra_failure_still_answers(self) -> None:
        """A failing health_extra is logged; health still answers 200, degraded."""

        def broken() -> dict[str, Any]:
            raise RuntimeError("boom")

        self.build(health_extra=broken)
        reply = self.call("GET", "/health")
        self.assertEqual((reply.code, reply.data["status"]), (200, "degraded"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class SystemTests(ApiTestCase):
    def test_system_info(self) -> None:
        """System info is the system's dict in the envelope."""
        reply = self.call("GET", "/api/v1/system/info")
        self.assertEqual((reply.code, reply.data["hostname"]), (200, "fakehost"))

    def test_system_info_failure(self) -> None:
        """An unexpected failure reading system info is 500 SYSTEM_INFO_ERROR, details hidden."""
        self.patch(self.system, "system_info", lambda: fail(OSError("/etc/os-release: secret")))
        reply = self.call("GET", "/api/v1/system/info")
        self.assertError(reply, 500, "SYSTEM_INFO_ERROR")
        self.assertNotIn("secret", str(reply.body))

    def test_service_status(self) -> None:
        """A known service's status is answered; an unknown one is 404 SERVICE_NOT_FOUND."""
        self.system.services["ssh.service"] = {"name": "ssh.service", "healthy": True}
        reply = self.call("GET", "/api/v1/system/services/ssh.service")
        self.assertEqual((reply.code, reply.data["healthy"]), (200, True))
        self.assertError(self.call("GET", "/api/v1/system/services/nope"), 404, "SERVICE_NOT_FOUND")

    def test_service_name_validated(self) -> None:
        """A service name that is not a unit name is 400 INVALID_SERVICE_NAME."""
        self.assertError(
            self.call("GET", "/api/v1/system/services/-bad"), 400, "INVALID_SERVICE_NAME"
        )

    def test_service_status_failure(self) -> None:
        """An unexpected failure reading a service is 500 SERVICE_STATUS_ERROR."""
        self.patch(self.system, "service_status", lambda name: fail(OSError("dbus")))
        self.assertError(
            self.call("GET", "/api/v1/system/services/ssh"), 500, "SERVICE_STATUS_ERROR"
        )

    def test_reboot_accepted(self) -> None:
        """A reboot is 202 with scheduled_at = now + delay, and the request carries the options."""
        reply = self.call(
            "POST",
            "/api/v1/system/reboot",
            {
                "delay_seconds": 60,
                "force": True,
                "acknowledge_package_database_corruption_risk": True,
            },
        )
        self.assertEqual(reply.code, 202)
        self.assertEqual(reply.data["operation"], "reboot")
        self.assertEqual(reply.data["status"], "pending")
        self.assertEqual(reply.data["scheduled_at"], "2027-01-15T08:01:00+00:00")
        self.assertEqual((reply.data["delay_seconds"], reply.data["force"]), (60, True))
        [request] = self.jobs.submitted
        self.assertEqual(request.reboot_delay_seconds, 60)
        self.assertTrue(request.force and request.acknowledge_package_database_corruption_risk)

    def test_reboot_empty_body_defaults(self) -> None:
        """A reboot without a body is an unforced, immediate reboot."""
        reply = self.call("POST", "/api/v1/system/reboot")
        self.assertEqual((reply.code, reply.data["delay_seconds"]), (202, 0))
        self.assertFalse(self.jobs.submitted[0].force)

    def test_reboot_bad_input(self) -> None:
        """A negative delay, a non-boolean force or an unknown field is 400, nothing submitted."""
        for body in ({"delay_seconds": -1}, {"force": "yes"}, {"delay": 5}):
            self.assertError(
                self.call("POST", "/api/v1/system/reboot", body), 400, "VALIDATION_ERROR"
            )
        self.assertEqual(self.jobs.submitted, [])

    def test_reboot_dry_run_refused(self) -> None:
        """A reboot has no dry run: dry_run in the body or the query is 400, nothing scheduled."""
        for path, body in (
            ("/api/v1/system/reboot", {"dry_run": True}),
            ("/api/v1/system/reboot", {"dry_run": False}),
            ("/api/v1/system/reboot?dry_run=true", {}),
            ("/api/v1/system/reboot?dryrun=1", {}),
        ):
            reply = self.call("POST", path, body)
            self.assertError(reply, 400, "VALIDATION_ERROR")
        self.assertIn("no dry run", self.call("POST", "/api/v1/system/reboot?dry_run=1").error[
            "message"])
        self.assertEqual(self.jobs.submitted, [])

    def test_reboot_refusals(self) -> None:
        """The engine's reboot refusals keep their 409 codes and details."""
        self.jobs.refuse_with = RebootBlockedError("blocked", {"active_jobs": 2})
        reply = self.call("POST", "/api/v1/system/reboot", {})
        self.assertError(reply, 409, "REBOOT_BLOCKED")
        self.assertEqual(reply.error["details"], {"active_jobs": 2})
        self.jobs.refuse_with = MutationInProgressError("busy")
        self.assertError(
            self.call("POST", "/api/v1/system/reboot", {"force": True}),
            409,
            "PACKAGE_DB_MUTATION_IN_PROGRESS",
        )


class _Upgraded(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.setResponseCode(299)
        return b"handed over"


class WebSocketRouteTests(ApiTestCase):
    def test_disabled(self) -> None:
        """Without a WebSocket resource the endpoint is 404 in the envelope."""
        self.assertError(self.call("GET", "/api/v1/ws/jobs"), 404, "NOT_FOUND")

    def test_upgrade_required(self) -> None:
        """A plain GET is 426 UPGRADE_REQUIRED with Upgrade: websocket."""
        self.build(ws_resource=_Upgraded())
        reply = self.call("GET", "/api/v1/ws/jobs")
        self.assertError(reply, 426, "UPGRADE_REQUIRED")
        # twisted's HTTP client hides hop-by-hop headers: look at the error and the server side
        failure = self.failureResultOf(
            Deferred.fromCoroutine(self.api.websocket(DummyRequest([b"api"]))), UpgradeRequiredError
        )
        request = DummyRequest([b"api"])
        # DummyRequest has what the enveloper uses but does not declare IRequest
        self.api._enveloper.write_error(cast(IRequest, request), failure)
        self.assertEqual(request.responseCode, 426)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"upgrade"), [b"websocket"])

    def test_upgrade_handed_over(self) -> None:
        """A request with Upgrade: websocket is rendered by the WebSocket resource."""
        self.build(ws_resource=_Upgraded())
        response = self.successResultOf(
            self.treq.get(
                "https://agent.test/api/v1/ws/jobs",
                headers={b"Upgrade": [b"WebSocket"], b"Connection": [b"Upgrade"]},
            )
        )
        self.assertEqual(response.code, 299)
        self.assertEqual(self.successResultOf(self.treq.content(response)), b"handed over")


class GateTests(ApiTestCase):
    def test_unknown_path(self) -> None:
        """An unknown path, also under /api/v1, is 404 NOT_FOUND in the envelope."""
        for path in (
            "/",
            "/api/v1/nothing",
            "/api/v1/jobs/",
            "/api/v2/health",
            "/api/v1//jobs",
            "/api/v1/packages/%2Fetc",
        ):
            self.assertError(self.call("GET", path), 404, "NOT_FOUND")

    def test_method_not_allowed(self) -> None:
        """A known path with another method is 405 in the envelope with Allow."""
        reply = self.call("PATCH", "/api/v1/packages/vim")
        self.assertError(reply, 405, "METHOD_NOT_ALLOWED")
        self.assertEqual(reply.header("Allow"), "DELETE, GET, HEAD, PUT")
        reply = self.call("GET", "/api/v1/patches/apply")
        self.assertEqual((reply.code, reply.header("Allow")), (405, "POST"))

    def test_options_never_runs_a_handler(self) -> None:
        """OPTIONS on a mutating path is 405 and submits nothing."""
        self.assertError(self.call("OPTIONS", "/api/v1/patches/apply"), 405, "METHOD_NOT_ALLOWED")
        self.assertEqual(self.jobs.submitted, [])

    def test_head(self) -> None:
        """HEAD is served where GET is."""
        response = self.successResultOf(self.treq.head("https://agent.test/api/v1/health"))
        self.assertEqual(response.code, 200)

    def test_body_too_large(self) -> None:
        """A body over max_body_bytes is 413 and nothing is submitted."""
        reply = self.call("POST", "/api/v1/patches/apply", {"packages": ["a" * 200] * 30})
        self.assertError(reply, 413, "PAYLOAD_TOO_LARGE")
        self.assertEqual(self.jobs.submitted, [])

    def test_duplicate_critical_headers(self) -> None:
        """Repeating Content-Type or Authorization is 400, as the original refused."""
        for name in ("Content-Type", "Authorization"):
            reply = self.call(
                "POST",
                "/api/v1/patches/apply",
                raw=b"{}",
                headers={name: ["application/json", "text/plain"]},
            )
            self.assertError(reply, 400, "DUPLICATE_HEADERS")
        self.assertEqual(self.jobs.submitted, [])

    def test_peer_check_first(self) -> None:
        """A refused peer gets 403 on every path, before routing, and nothing runs."""
        self.peer_error = ForbiddenError("Client certificate not allowed")
        for method, path in (
            ("GET", "/health"),
            ("GET", "/nothing"),
            ("POST", "/api/v1/patches/apply"),
        ):
            self.assertError(self.call(method, path, {}), 403, "FORBIDDEN")
        self.assertEqual((self.jobs.submitted, self.backend.calls), ([], []))

    def test_peer_check_crash_fails_closed(self) -> None:
        """A crashing peer check is a logged 500 that leaks nothing and runs nothing."""

        def broken(request: object) -> None:
            raise RuntimeError("secret internals")

        self.build(peer_check=broken)
        reply = self.call("POST", "/api/v1/patches/apply", {})
        self.assertError(reply, 500, "INTERNAL_ERROR")
        self.assertNotIn("secret", str(reply.body))
        self.assertEqual(self.jobs.submitted, [])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_unexpected_error(self) -> None:
        """An unexpected exception in a handler is a logged 500 INTERNAL_ERROR without internals."""
        self.jobs.refuse_with = RuntimeError("password=hunter2")
        reply = self.call("PUT", "/api/v1/packages/vim")
        self.assertError(reply, 500, "INTERNAL_ERROR")
        self.assertEqual(reply.error["message"], "Internal server error")
        self.assertNotIn("hunter2", str(reply.body))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_request_ids_are_fresh(self) -> None:
        """Every answer has its own request id."""
        ids = {self.call("GET", "/health").body["request_id"] for _ in range(3)}
        self.assertEqual(len(ids), 3)


class RateLimitThroughApiTests(ApiTestCase):
    rate_limiter_enabled = True

    def test_destructive_tier(self) -> None:
        """After the burst of 10 mutations the 11th is 429 with Retry-After; reads still pass."""
        for _ in range(10):
            self.assertEqual(self.call("PUT", "/api/v1/packages/vim").code, 202)
        reply = self.call("PUT", "/api/v1/packages/vim")
        self.assertError(reply, 429, "RATE_LIMITED")
        self.assertEqual(reply.header("Retry-After"), "3")
        self.assertIs(reply.error["retryable"], True)
        self.assertEqual(len(self.jobs.submitted), 10)
        self.assertEqual(self.call("GET", "/api/v1/jobs").code, 200)
        self.clock.advance(3)
        self.assertEqual(self.call("PUT", "/api/v1/packages/vim").code, 202)

    def test_read_tier_and_exemptions(self) -> None:
        """After 30 reads the next is 429, system info included; health stays exempt."""
        for _ in range(30):
            self.assertEqual(self.call("GET", "/api/v1/jobs").code, 200)
        reply = self.call("GET", "/api/v1/jobs")
        self.assertError(reply, 429, "RATE_LIMITED")
        self.assertEqual(reply.header("Retry-After"), "1")
        for path in ("/health", "/api/v1/health"):
            self.assertEqual(self.call("GET", path).code, 200)
        self.assertError(self.call("GET", "/api/v1/system/info"), 429, "RATE_LIMITED")

    def test_limited_before_routing(self) -> None:
        """Unknown paths also spend tokens, so probing cannot bypass the limiter."""
        for _ in range(30):
            self.call("GET", "/nothing")
        self.assertError(self.call("GET", "/api/v1/jobs"), 429, "RATE_LIMITED")
