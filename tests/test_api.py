"""The agent's REST API: every endpoint's answer and error, always in the envelope."""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.defer import Deferred, fail
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyRequest

from lpa.agent.model import Package, PackageSpec, Patch
from lpa.errors import (
    AdmissionFrozenError,
    CommandFailedError,
    ForbiddenError,
    MutationInProgressError,
    QueueFullError,
    RebootBlockedError,
    UpgradeRequiredError,
)
from lpa.events import COMPLETED, RUNNING, TIMED_OUT
from tests.api_helpers import ApiTestCase
from tests.fakes_jobs import FakeJobManager

JOB_ID_UNKNOWN = "0b7d5c1e-9a7f-4a53-9a43-7f1c1e0c2a11"


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


def _package(name: str, version: str, status: str, upgradable: bool = False) -> Package:
    return Package(name=name, version=version, status=status, upgradable=upgradable)


class PackageTests(ApiTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.backend.packages = [
            _package("vim", "9.0", "Installed"),
            _package("bash", "5.2", "Upgradable", upgradable=True),
            _package("zsh", "5.9", "Available"),
        ]

    def names(self, path: str) -> list[str]:
        reply = self.call("GET", path)
        self.assertEqual(reply.code, 200)
        self.assertEqual(reply.data["total"], len(reply.data["packages"]))
        return [p["name"] for p in reply.data["packages"]]

    def test_list_sorted_by_name(self) -> None:
        """Packages are listed by name ascending by default, descending on request."""
        self.assertEqual(self.names("/api/v1/packages"), ["bash", "vim", "zsh"])
        self.assertEqual(self.names("/api/v1/packages?order=desc"), ["zsh", "vim", "bash"])
        self.assertEqual(self.names("/api/v1/packages?sort=version"), ["bash", "zsh", "vim"])

    def test_list_filters(self) -> None:
        """status, upgradable and name filter the list; an unknown status means no filter."""
        self.assertEqual(self.names("/api/v1/packages?status=upgradable"), ["bash"])
        self.assertEqual(self.names("/api/v1/packages?upgradable=false"), ["vim", "zsh"])
        self.assertEqual(self.names("/api/v1/packages?upgradable=true"), ["bash"])
        self.assertEqual(self.names("/api/v1/packages?name=vi"), ["vim"])
        self.assertEqual(self.names("/api/v1/packages?status=whatever"), ["bash", "vim", "zsh"])

    def test_list_bad_query(self) -> None:
        """A non-boolean upgradable or a name with shell metacharacters is 400."""
        self.assertError(
            self.call("GET", "/api/v1/packages?upgradable=maybe"), 400, "VALIDATION_ERROR"
        )
        self.assertError(self.call("GET", "/api/v1/packages?name=vi%3Brm"), 400, "VALIDATION_ERROR")
        self.assertEqual(self.backend.calls, [])

    def test_list_backend_failure(self) -> None:
        """A failing package manager is 500 PKG_MANAGER_ERROR, retryable."""
        self.backend.read_error = CommandFailedError("apt list exploded")
        reply = self.call("GET", "/api/v1/packages")
        self.assertError(reply, 500, "PKG_MANAGER_ERROR")
        self.assertIs(reply.error["retryable"], True)
        self.assertNotIn("exploded", str(reply.body))

    def test_list_backend_crash(self) -> None:
        """A backend bug is logged and still answered as PKG_MANAGER_ERROR."""
        self.backend.read_error = KeyError("parser")
        self.assertError(self.call("GET", "/api/v1/packages"), 500, "PKG_MANAGER_ERROR")
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    def test_get_package(self) -> None:
        """One package by name; an unknown one is 404 PKG_NOT_FOUND; a bad name 400."""
        reply = self.call("GET", "/api/v1/packages/vim")
        self.assertEqual((reply.code, reply.data["version"]), (200, "9.0"))
        self.assertError(self.call("GET", "/api/v1/packages/emacs"), 404, "PKG_NOT_FOUND")
        self.assertError(self.call("GET", "/api/v1/packages/-rf"), 400, "VALIDATION_ERROR")

    def test_install_accepted(self) -> None:
        """Install is 202; names and versions reach the engine, options default to false."""
        reply = self.call(
            "POST",
            "/api/v1/packages",
            {"packages": [{"name": "vim", "version": "2:9.0-1"}, "nano"]},
        )
        self.assertEqual(reply.code, 202)
        self.assertEqual(reply.data["operation"], "install")
        self.assertEqual(reply.data["status"], "pending")
        self.assertEqual(reply.data["packages"], ["vim", "nano"])
        self.assertIn(reply.data["job_id"], self.jobs.jobs)
        [request] = self.jobs.submitted
        self.assertEqual(request.packages, (PackageSpec("vim", "2:9.0-1"), PackageSpec("nano")))
        self.assertEqual((request.force, request.no_recommends), (False, False))

    def test_install_options(self) -> None:
        """Each install option may be given alone."""
        self.call(
            "POST", "/api/v1/packages", {"packages": ["vim"], "options": {"no_recommends": True}}
        )
        self.assertEqual(
            (self.jobs.submitted[0].force, self.jobs.submitted[0].no_recommends), (False, True)
        )

    def test_install_shell_metacharacters_refused(self) -> None:
        """A name with shell metacharacters is 400 VALIDATION_ERROR and nothing is submitted."""
        for packages in (["vim; rm -rf /"], [{"name": "vim", "version": "1;reboot"}], ["--purge"]):
            reply = self.call("POST", "/api/v1/packages", {"packages": packages})
            self.assertError(reply, 400, "VALIDATION_ERROR")
        self.assertEqual(self.jobs.submitted, [])

    def test_install_bad_bodies(self) -> None:
        """Missing/empty packages, bad options or unknown fields are 400, nothing submitted."""
        body: Any
        for body in (
            {},
            {"packages": []},
            {"packages": ["vim"], "dry_run": "yes"},
            {"packages": "vim"},
            {"packages": [7]},
            {"packages": ["vim"], "options": {"force": "yes"}},
            {"packages": ["vim"], "options": {"purge": True}},
            {"packages": ["vim"], "purge": True},
            {"packages": [{"name": "vim", "arch": "amd64"}]},
        ):
            self.assertError(self.call("POST", "/api/v1/packages", body), 400, "VALIDATION_ERROR")
        self.assertEqual(self.jobs.submitted, [])

    def test_install_dry_run(self) -> None:
        """dry_run (body or query) reaches the engine and the 202 says so."""
        for path, body in (
            ("/api/v1/packages", {"packages": ["vim"], "dry_run": True}),
            ("/api/v1/packages?dry_run=true", {"packages": ["vim"]}),
        ):
            reply = self.call("POST", path, body)
            self.assertEqual((reply.code, reply.data["dry_run"]), (202, True))
        self.assertEqual([r.dry_run for r in self.jobs.submitted], [True, True])
        reply = self.call("POST", "/api/v1/packages", {"packages": ["vim"]})
        self.assertEqual((reply.data["dry_run"], self.jobs.submitted[-1].dry_run), (False, False))

    def test_update_and_remove_dry_run(self) -> None:
        """PUT and DELETE honour dry_run in a body or the query; 202 with dry_run true."""
        for method in ("PUT", "DELETE"):
            body = self.call(method, "/api/v1/packages/vim", {"dry_run": True})
            query = self.call(method, "/api/v1/packages/vim?dry_run=1")
            self.assertEqual((body.code, body.data["dry_run"]), (202, True))
            self.assertEqual((query.code, query.data["dry_run"]), (202, True))
        self.assertEqual(
            [(r.operation, r.dry_run) for r in self.jobs.submitted],
            [("update", True)] * 2 + [("remove", True)] * 2,
        )

    def test_update_and_remove_bad_bodies_refused(self) -> None:
        """A body PUT/DELETE cannot honour is 400, never ignored: unknown fields, a non-boolean
        dry_run, a non-object, broken JSON, an unknown query argument, disagreeing dry_runs."""
        for method in ("PUT", "DELETE"):
            for path, body in (
                ("/api/v1/packages/vim", {"dry_run": True, "version": "1.0"}),
                ("/api/v1/packages/vim", {"dry_run": "true"}),
                ("/api/v1/packages/vim?dryrun=true", None),
                ("/api/v1/packages/vim?dry_run=maybe", None),
                ("/api/v1/packages/vim?dry_run=false", {"dry_run": True}),
            ):
                self.assertError(self.call(method, path, body), 400, "VALIDATION_ERROR")
            for raw in (b"[true]", b"{not json"):
                reply = self.call(method, "/api/v1/packages/vim", raw=raw)
                self.assertError(reply, 400, "INVALID_JSON")
        self.assertEqual(self.jobs.submitted, [])

    def test_self_upgrade_unsupported(self) -> None:
        """The manager's self-upgrade (PUT linux-patch-api) and any change of lpa's own package
        are 409 UNSUPPORTED_ON_LPA naming the migration step; nothing is submitted."""
        for method, path, body in (
            ("PUT", "/api/v1/packages/linux-patch-api", None),
            ("PUT", "/api/v1/packages/linux-patch-api", {"target_version": "2.7.0"}),
            ("PUT", "/api/v1/packages/lpa-agent", {"dry_run": True}),
            ("DELETE", "/api/v1/packages/lpa-agent", None),
            ("POST", "/api/v1/packages", {"packages": ["curl", "linux-patch-api"]}),
            ("POST", "/api/v1/packages", {"packages": ["lpa-agent"]}),
        ):
            reply = self.call(method, path, body)
            self.assertError(reply, 409, "UNSUPPORTED_ON_LPA")
            self.assertIn("lpa-agent", reply.error["message"])
            self.assertIn("apt-get install --only-upgrade lpa-agent", reply.error["message"])
            self.assertFalse(reply.error["retryable"])
        self.assertEqual(reply.error["details"]["agent_version"], "9.9.9")
        self.assertEqual(self.jobs.submitted, [])

    def test_own_package_rules(self) -> None:
        """Which operations on which packages the agent refuses, directly."""
        from lpa.agent.http.ownpackage import refuse_own_package
        from lpa.errors import UnsupportedOnLpaError

        for operation, name in (
            ("update", "linux-patch-api"),
            ("install", "linux-patch-api"),
            ("update", "lpa-agent"),
            ("install", "lpa-agent"),
            ("remove", "lpa-agent"),
        ):
            self.assertRaises(UnsupportedOnLpaError, refuse_own_package, operation, [name], "1")
        for operation, name in (("remove", "linux-patch-api"), ("update", "lpa-agentx")):
            refuse_own_package(operation, [name], "1")

    def test_leftover_original_agent_may_be_removed(self) -> None:
        """Removing a leftover linux-patch-api package is an ordinary removal."""
        reply = self.call("DELETE", "/api/v1/packages/linux-patch-api")
        self.assertEqual((reply.code, reply.data["package"]), (202, "linux-patch-api"))

    def test_update_and_remove(self) -> None:
        """PUT is an update and DELETE a removal of the named package, both 202."""
        update = self.call("PUT", "/api/v1/packages/vim")
        remove = self.call("DELETE", "/api/v1/packages/vim")
        self.assertEqual(
            (update.code, update.data["operation"], update.data["package"]), (202, "update", "vim")
        )
        self.assertEqual((remove.code, remove.data["operation"]), (202, "remove"))
        self.assertEqual(
            [(r.operation, r.packages) for r in self.jobs.submitted],
            [("update", (PackageSpec("vim"),)), ("remove", (PackageSpec("vim"),))],
        )
        self.assertError(self.call("DELETE", "/api/v1/packages/.evil"), 400, "VALIDATION_ERROR")
        self.assertEqual(len(self.jobs.submitted), 2)

    def test_admission_refused_with_retry_after(self) -> None:
        """A full queue is 429 QUEUE_FULL and a frozen admission 409, both with Retry-After 60."""
        self.jobs.refuse_with = QueueFullError("full")
        reply = self.call("PUT", "/api/v1/packages/vim")
        self.assertError(reply, 429, "QUEUE_FULL")
        self.assertEqual(reply.header("Retry-After"), "60")
        self.assertIs(reply.error["retryable"], True)
        self.jobs.refuse_with = AdmissionFrozenError("rebooting")
        reply = self.call("POST", "/api/v1/patches/apply", {})
        self.assertError(reply, 409, "ADMISSION_FROZEN")
        self.assertEqual(reply.header("Retry-After"), "60")


class PatchTests(ApiTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.backend.patches = [
            Patch(
                name="openssl",
                current_version="1",
                available_version="2",
                severity="critical",
                security=True,
            ),
            Patch(
                name="linux-image", current_version="1", available_version="2", requires_reboot=True
            ),
            Patch(name="nano", current_version="1", available_version="2"),
        ]

    def test_list_patches(self) -> None:
        """Patches come with total, security count and whether any needs a reboot."""
        data = self.call("GET", "/api/v1/patches").data
        self.assertEqual([p["name"] for p in data["patches"]], ["openssl", "linux-image", "nano"])
        self.assertEqual(
            (data["total"], data["security_updates"], data["requires_reboot"]), (3, 1, True)
        )
        self.assertEqual(data["cache_status"], "fresh")

    def test_security_filter(self) -> None:
        """?security=true lists only security updates."""
        data = self.call("GET", "/api/v1/patches?security=true").data
        self.assertEqual(
            ([p["name"] for p in data["patches"]], data["requires_reboot"]), (["openssl"], False)
        )

    def test_cached_until_stale(self) -> None:
        """The backend is asked once while the list is fresh and again when it is stale."""
        self.call("GET", "/api/v1/patches")
        self.call("GET", "/api/v1/patches")
        self.assertEqual(self.backend.calls, [("list_patches", False)])
        self.clock.advance(3600)
        self.call("GET", "/api/v1/patches")
        self.assertEqual(len(self.backend.calls), 2)
        self.assertEqual(self.jobs.submitted, [])

    def test_finished_job_invalidates(self) -> None:
        """Once a job completes, GET /patches asks the backend again (it may have patched)."""
        self.call("GET", "/api/v1/patches")
        job_id = self.call("POST", "/api/v1/patches/apply", {}).data["job_id"]
        self.call("GET", "/api/v1/patches")
        self.assertEqual(len(self.backend.calls), 1)
        self.jobs.finish(job_id, COMPLETED)
        self.call("GET", "/api/v1/patches")
        self.assertEqual(len(self.backend.calls), 2)

    def test_list_failure(self) -> None:
        """With nothing cached a failing backend is 500 PKG_MANAGER_ERROR; health says failed."""
        self.backend.read_error = CommandFailedError("apt-get update failed")
        self.assertError(self.call("GET", "/api/v1/patches"), 500, "PKG_MANAGER_ERROR")
        self.assertEqual(self.call("GET", "/health").data["cache_status"], "failed")

    def test_apply_all(self) -> None:
        """No packages member means all: 202, and the engine gets packages=None."""
        reply = self.call("POST", "/api/v1/patches/apply", {"dry_run": True})
        self.assertEqual(reply.code, 202)
        self.assertEqual(
            (reply.data["operation"], reply.data["packages"], reply.data["all_packages"]),
            ("patch_apply", None, True),
        )
        [request] = self.jobs.submitted
        self.assertIsNone(request.packages)
        self.assertTrue(request.dry_run)

    def test_apply_named_with_options(self) -> None:
        """Named packages and every option reach the engine; reboot is an alias of allow_reboot."""
        reply = self.call(
            "POST",
            "/api/v1/patches/apply",
            {
                "packages": ["openssl", "nano", "openssl"],
                "security_only": True,
                "reboot": True,
                "reboot_delay_seconds": 30,
            },
        )
        self.assertEqual((reply.code, reply.data["packages"]), (202, ["openssl", "nano"]))
        [request] = self.jobs.submitted
        self.assertEqual(request.packages, (PackageSpec("openssl"), PackageSpec("nano")))
        self.assertTrue(request.security_only and request.allow_reboot)
        self.assertEqual((request.reboot_delay_seconds, request.dry_run), (30, False))

    def test_apply_empty_list_is_nothing(self) -> None:
        """packages: [] (the manager's body for a host with nothing selected) is 202 and reaches
        the engine as packages=() — apply nothing, never "all"."""
        body = {"packages": [], "allow_reboot": True, "reboot_delay_seconds": 0}
        reply = self.call("POST", "/api/v1/patches/apply", body)
        self.assertEqual(reply.code, 202)
        self.assertEqual((reply.data["packages"], reply.data["all_packages"]), ([], False))
        [request] = self.jobs.submitted
        self.assertEqual(request.packages, ())

    def test_apply_dry_run_in_query(self) -> None:
        """?dry_run=true on apply is honoured; a misspelt query argument is 400."""
        reply = self.call("POST", "/api/v1/patches/apply?dry_run=true", {"packages": []})
        self.assertEqual((reply.code, reply.data["dry_run"]), (202, True))
        self.assertError(
            self.call("POST", "/api/v1/patches/apply?dryrun=true", {}), 400, "VALIDATION_ERROR"
        )
        self.assertEqual(len(self.jobs.submitted), 1)

    def test_apply_unknown_fields_refused(self) -> None:
        """The original e2e body {patches, options} is refused naming both, not applied to all."""
        reply = self.call(
            "POST", "/api/v1/patches/apply", {"patches": [], "options": {"dry_run": True}}
        )
        self.assertError(reply, 400, "VALIDATION_ERROR")
        self.assertEqual(reply.error["details"]["unknown_fields"], ["options", "patches"])
        self.assertEqual(self.jobs.submitted, [])

    def test_apply_bad_values(self) -> None:
        """Bad names, non-booleans, bad delays, disagreeing aliases: 400, nothing submitted."""
        for body in (
            {"packages": ["vim; rm -rf /"]},
            {"packages": ["$(reboot)"]},
            {"dry_run": "true"},
            {"reboot_delay_seconds": -5},
            {"reboot_delay_seconds": 1.5},
            {"allow_reboot": True, "reboot": False},
        ):
            self.assertError(
                self.call("POST", "/api/v1/patches/apply", body), 400, "VALIDATION_ERROR"
            )
        self.assertEqual(self.jobs.submitted, [])

    def test_apply_broken_json(self) -> None:
        """Broken JSON, a non-object, NaN or an empty body are 400 INVALID_JSON."""
        for raw in (b"{not json", b"[1, 2]", b'{"dry_run": NaN}', b"", b"\xff\xfe"):
            reply = self.call(
                "POST",
                "/api/v1/patches/apply",
                raw=raw,
                headers={"Content-Type": "application/json"},
            )
            self.assertError(reply, 400, "INVALID_JSON")
        self.assertEqual(self.jobs.submitted, [])

    def test_deeply_nested_json(self) -> None:
        """JSON nested past the depth limit is 400 INVALID_JSON, never a 500 or a traceback."""
        self.build(max_body_bytes=1 << 20)
        deep_object = b'{"packages": ' + b'{"a": ' * 40 + b"1" + b"}" * 41
        for raw in (b"[" * 100_000, b'{"a": ' * 5000, deep_object):
            reply = self.call(
                "POST",
                "/api/v1/patches/apply",
                raw=raw,
                headers={"Content-Type": "application/json"},
            )
            self.assertError(reply, 400, "INVALID_JSON")
        self.assertIn("deeper than 32 levels", reply.error["message"])
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(self.jobs.submitted, [])


class JobTests(ApiTestCase):
    def submit(self, name: str = "vim") -> str:
        job_id: str = self.call("PUT", f"/api/v1/packages/{name}").data["job_id"]
        return job_id

    def test_list_jobs(self) -> None:
        """Jobs newest first with total; status filter accepts ours and the original's timedout."""
        first, second = self.submit("a"), self.submit("b")
        self.jobs.finish(first, TIMED_OUT)
        data = self.call("GET", "/api/v1/jobs").data
        self.assertEqual([j["job_id"] for j in data["jobs"]], [second, first])
        self.assertEqual(data["total"], 2)
        for spelling in ("timed_out", "timedout"):
            data = self.call("GET", f"/api/v1/jobs?status={spelling}").data
            self.assertEqual([j["job_id"] for j in data["jobs"]], [first])
            self.assertEqual(data["jobs"][0]["status"], "timed_out")

    def test_list_limit(self) -> None:
        """limit defaults to 50 and caps the list; total counts after the limit."""
        for _ in range(52):
            self.submit()
        self.assertEqual(self.call("GET", "/api/v1/jobs").data["total"], 50)
        self.assertEqual(self.call("GET", "/api/v1/jobs?limit=3").data["total"], 3)

    def test_list_bad_query(self) -> None:
        """An unknown status or a limit outside 1..1000 is 400."""
        for query in ("status=queuedish", "limit=0", "limit=1001", "limit=ten"):
            self.assertError(self.call("GET", f"/api/v1/jobs?{query}"), 400, "VALIDATION_ERROR")

    def test_get_job(self) -> None:
        """A job's detail by id; a non-UUID is 400 INVALID_JOB_ID, an unknown one 404."""
        job_id = self.submit()
        reply = self.call("GET", f"/api/v1/jobs/{job_id}")
        self.assertEqual(reply.data, self.jobs.get(job_id).to_detail())
        self.assertError(self.call("GET", "/api/v1/jobs/not-a-uuid"), 400, "INVALID_JOB_ID")
        self.assertError(self.call("GET", f"/api/v1/jobs/{JOB_ID_UNKNOWN}"), 404, "JOB_NOT_FOUND")

    def test_delete_job(self) -> None:
        """Only an ended job can be deleted (409 DELETE_NOT_ALLOWED before), then it is gone."""
        job_id = self.submit()
        reply = self.call("DELETE", f"/api/v1/jobs/{job_id}")
        self.assertError(reply, 409, "DELETE_NOT_ALLOWED")
        self.assertEqual(reply.error["details"], {"status": "pending"})
        self.jobs.finish(job_id, COMPLETED)
        reply = self.call("DELETE", f"/api/v1/jobs/{job_id}")
        self.assertEqual((reply.code, reply.data), (200, {"deleted": True, "job_id": job_id}))
        self.assertError(self.call("GET", f"/api/v1/jobs/{job_id}"), 404, "JOB_NOT_FOUND")
        self.assertError(self.call("DELETE", "/api/v1/jobs/x"), 400, "INVALID_JOB_ID")

    def test_cancel_job(self) -> None:
        """Cancel answers 200 with the cancelled job; cancelling it again is 409."""
        job_id = self.submit()
        reply = self.call("POST", f"/api/v1/jobs/{job_id}/cancel")
        self.assertEqual((reply.code, reply.data["status"]), (200, "cancelled"))
        self.assertError(
            self.call("POST", f"/api/v1/jobs/{job_id}/cancel"), 409, "CANCEL_NOT_ALLOWED"
        )
        self.assertError(
            self.call("POST", f"/api/v1/jobs/{JOB_ID_UNKNOWN}/cancel"), 404, "JOB_NOT_FOUND"
        )

    def test_job_id_canonicalised(self) -> None:
        """An upper-case job id finds the job."""
        job_id = self.submit()
        self.assertEqual(self.call("GET", f"/api/v1/jobs/{job_id.upper()}").code, 200)


class EventsTests(ApiTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.jobs = FakeJobManager(self.clock, max_events_per_job=5)
        self.build()
        self.job_id = self.call("PUT", "/api/v1/packages/vim").data["job_id"]
        self.jobs.emit(self.job_id, "Job started", status=RUNNING)
        self.jobs.output(self.job_id, "Reading package lists...")

    def events(self, after: str = "") -> dict[str, Any]:
        reply = self.call("GET", f"/api/v1/jobs/{self.job_id}/events{after}")
        self.assertEqual(reply.code, 200, reply.body)
        data: dict[str, Any] = reply.data
        return data

    def test_all_events(self) -> None:
        """Without after, every kept event: the same wire objects and seq as the EventLog's."""
        data = self.events()
        self.assertEqual(data["events"], [e.to_wire() for e in self.jobs.events.kept(self.job_id)])
        self.assertEqual([e["seq"] for e in data["events"]], [1, 2, 3])
        self.assertEqual(
            (data["job_id"], data["last_seq"], data["status"], data["terminal"]),
            (self.job_id, 3, "running", False),
        )

    def test_after(self) -> None:
        """after=N gives only later events; after at the end gives none (past it: a 409)."""
        self.assertEqual([e["seq"] for e in self.events("?after=1")["events"]], [2, 3])
        self.assertEqual(self.events("?after=3")["events"], [])
        reply = self.call("GET", f"/api/v1/jobs/{self.job_id}/events?after=99")
        self.assertError(reply, 409, "EVENTS_AHEAD")

    def test_terminal(self) -> None:
        """A finished job's events end with job_complete and say terminal."""
        self.jobs.finish(self.job_id, COMPLETED)
        data = self.events("?after=3")
        self.assertEqual([e["event"] for e in data["events"]], ["job_status", "job_complete"])
        self.assertEqual((data["status"], data["terminal"]), ("completed", True))

    def test_expired_resync(self) -> None:
        """Asking for events no longer kept is 410 EVENTS_EXPIRED with the job to resync from."""
        self.jobs.output(self.job_id, "a", "b", "c", "d")
        reply = self.call("GET", f"/api/v1/jobs/{self.job_id}/events?after=1")
        self.assertError(reply, 410, "EVENTS_EXPIRED")
        # details is the job detail itself, as GET /jobs/{id} answers it (what pollers apply)
        self.assertEqual(reply.error["details"], self.jobs.get(self.job_id).to_detail())
        self.assertIn("oldest kept: 3", reply.error["message"])
        self.assertEqual([e["seq"] for e in self.events("?after=2")["events"]], [3, 4, 5, 6, 7])

    def test_bad_after_and_ids(self) -> None:
        """A bad after is 400, a bad id 400 INVALID_JOB_ID, an unknown job 404."""
        for after in ("-1", "x", "1.5"):
            self.assertError(
                self.call("GET", f"/api/v1/jobs/{self.job_id}/events?after={after}"),
                400,
                "VALIDATION_ERROR",
            )
        self.assertError(self.call("GET", "/api/v1/jobs/nope/events"), 400, "INVALID_JOB_ID")
        self.assertError(
            self.call("GET", f"/api/v1/jobs/{JOB_ID_UNKNOWN}/events"), 404, "JOB_NOT_FOUND"
        )


class _Upgraded(Resource):
    isLeaf = True

    def render_GET(self, request):  # type: ignore[no-untyped-def]
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
