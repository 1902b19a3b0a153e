"""The agent's REST API: packages and patches (list, show, install, update, remove, apply)."""

from __future__ import annotations

from typing import Any

from lpa.agent.model import Package, PackageSpec, Patch
from lpa.errors import (
    AdmissionFrozenError,
    CommandFailedError,
    QueueFullError,
)
from lpa.events import COMPLETED
from tests.api_helpers import ApiTestCase


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
