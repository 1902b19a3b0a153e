"""zypper backend: parsers on real zypper 1.14 ``--xmlout`` outputs (scratch root), argv."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from lpa.agent.backends import zypper
from lpa.agent.backends.zypper import ZypperBackend
from lpa.agent.interfaces import IPackageBackend
from lpa.agent.model import Job, JobOutcome
from lpa.errors import (
    CommandFailedError,
    PackageManagerError,
    PackageNotFoundError,
    ValidationError,
)
from tests.fakes_backends import FakeJobContext, ScriptedRunner, fixture, fixture_exit, make_job

RPM_QA = fixture("dnf", "rpm_qa.txt")
LIST_UPDATES = fixture("zypper", "list_updates.xml")
LIST_PATCHES = fixture("zypper", "list_patches_security.xml")


def scripted() -> ScriptedRunner:
    runner = ScriptedRunner()
    runner.on("rpm", "-qa", stdout=RPM_QA)
    runner.on("list-updates", stdout=LIST_UPDATES)
    runner.on("list-patches", stdout=LIST_PATCHES)
    return runner


class ZypperParserTests(SynchronousTestCase):
    def test_list_updates(self) -> None:
        """list-updates XML gives name, new and old edition, repo alias."""
        [update] = zypper.parse_list_updates(LIST_UPDATES)
        self.assertEqual(
            (update["name"], update["edition"], update["edition-old"], update["repo"],
             update["kind"]),
            ("lpademo", "1.1-1", "1.0-1", "lpa", "package"),
        )

    def test_list_patches(self) -> None:
        """list-patches XML gives category, severity and CVE issues."""
        [patch] = zypper.parse_list_updates(LIST_PATCHES)
        self.assertEqual((patch["category"], patch["severity"], patch["cves"]),
                         ("security", "important", "CVE-2026-12345"))

    def test_install_summaries(self) -> None:
        """The install-summary of dry runs and real runs lists package changes (patches skipped)."""
        self.assertEqual(
            zypper.parse_install_summary(fixture("zypper", "update_dry_run.xml")),
            [{"name": "lpademo", "from": "1.0-1", "to": "1.1-1", "action": "upgrade"}],
        )
        self.assertEqual(
            zypper.parse_install_summary(fixture("zypper", "patch_security_dry_run.xml")),
            [{"name": "lpademo", "from": "1.0-1", "to": "1.1-1", "action": "upgrade"}],
        )
        self.assertEqual(
            zypper.parse_install_summary(fixture("zypper", "install_real.xml")),
            [{"name": "lpatool", "from": None, "to": "2.0-1", "action": "install"}],
        )
        self.assertEqual(
            zypper.parse_install_summary(fixture("zypper", "remove_dry_run.xml")),
            [{"name": "lpademo", "from": "1.0-1", "to": None, "action": "remove"}],
        )

    def test_bad_xml(self) -> None:
        """Unparseable output is a PackageManagerError for queries and no changes for summaries."""
        self.assertRaises(PackageManagerError, zypper.parse_list_updates, "<stream><update")
        self.assertEqual(zypper.parse_install_summary("no xml at all"), [])


class ZypperReadTests(SynchronousTestCase):
    def test_interface(self) -> None:
        """ZypperBackend implements IPackageBackend."""
        verifyObject(IPackageBackend, ZypperBackend(ScriptedRunner()))

    def test_packages(self) -> None:
        """Installed packages are Upgradable when list-updates has them; no refresh on queries."""
        runner = scripted()
        [package] = self.successResultOf(ZypperBackend(runner).list_packages(status="upgradable"))
        self.assertEqual((package.name, package.latest_version), ("lpademo", "1.1-1"))
        self.assertIn("--no-refresh", [a for argv in runner.argvs for a in argv])

    def test_patches(self) -> None:
        """Package updates plus security patches with real severity and CVEs."""
        patches = self.successResultOf(ZypperBackend(scripted()).list_patches())
        self.assertEqual([p.name for p in patches], ["lpademo", "LPA-2026-0001"])
        self.assertFalse(patches[0].security)
        self.assertEqual(patches[0].current_version, "1.0-1")
        security = patches[1]
        self.assertTrue(security.security)
        self.assertEqual((security.severity, security.cve_ids), ("high", ("CVE-2026-12345",)))
        only = self.successResultOf(ZypperBackend(scripted()).list_patches(security_only=True))
        self.assertEqual([p.name for p in only], ["LPA-2026-0001"])

    def test_get_package(self) -> None:
        """Not installed: found by an exact search, or PackageNotFoundError (exit 104)."""
        runner = scripted()
        runner.on("search", stdout=fixture("zypper", "search_lpatool.xml"))
        package = self.successResultOf(ZypperBackend(runner).get_package("lpatool"))
        self.assertEqual((package.status, package.version), ("Available", "2.0-1"))
        runner = scripted()
        runner.on("search", exit_code=fixture_exit("zypper", "search_missing.xml"),
                  stdout=fixture("zypper", "search_missing.xml"))
        self.failureResultOf(ZypperBackend(runner).get_package("nopkg"), PackageNotFoundError)


class ZypperExecuteTests(SynchronousTestCase):
    def run_job(self, runner: ScriptedRunner, job: Job) -> Deferred[JobOutcome]:
        backend = ZypperBackend(runner, reboot_marker="/nonexistent", modules_dir="/nonexistent")
        return backend.execute(job, FakeJobContext(runner, job))

    def test_install_argv(self) -> None:
        """install: non-interactive, xmlout, --no-recommends, --force-resolution, pins after --."""
        runner = ScriptedRunner()
        runner.on("install", stdout=fixture("zypper", "install_real.xml"))
        job = make_job("install", "lpatool", versions={"lpatool": "2.0-1"}, no_recommends=True,
                       force=True)
        outcome = self.successResultOf(self.run_job(runner, job))
        self.assertEqual(
            runner.calls[0].argv,
            ("zypper", "--non-interactive", "--xmlout", "install", "--no-recommends",
             "--force-resolution", "--", "lpatool=2.0-1"),
        )
        self.assertEqual(len(outcome.changes), 1)

    def test_security_dry_run(self) -> None:
        """A dry-run security apply is ``patch --dry-run --category security``, no refresh."""
        runner = ScriptedRunner()
        runner.on("patch", stdout=fixture("zypper", "patch_security_dry_run.xml"))
        job = make_job("patch_apply", dry_run=True, security_only=True)
        outcome = self.successResultOf(self.run_job(runner, job))
        self.assertEqual(runner.calls[0].argv, ("zypper", "--non-interactive", "--xmlout", "patch",
                                                "--dry-run", "--category", "security"))
        self.assertEqual(len(runner.calls), 1)
        self.assertEqual(outcome.changes[0]["name"], "lpademo")

    def test_security_with_names_refused(self) -> None:
        """Security patches cannot be combined with named packages on zypper."""
        runner = ScriptedRunner()
        self.failureResultOf(self.run_job(runner, make_job("patch_apply", "a", security_only=True)),
                             ValidationError)
        self.assertEqual(runner.calls, [])

    def test_apply_all_refreshes_and_reboot_exit(self) -> None:
        """A real apply refreshes first; exit 102 from zypper means reboot required."""
        runner = ScriptedRunner()
        runner.on("update", exit_code=102, stdout=fixture("zypper", "update_dry_run.xml"))
        outcome = self.successResultOf(self.run_job(runner, make_job("patch_apply")))
        self.assertEqual(runner.calls[0].argv, ("zypper", "--non-interactive", "refresh"))
        self.assertEqual(runner.calls[1].argv,
                         ("zypper", "--non-interactive", "--xmlout", "update"))
        self.assertTrue(outcome.reboot_required)

    def test_restart_zypper_runs_again(self) -> None:
        """Exit 103 (zypper updated itself) runs the same command once more."""
        runner = ScriptedRunner()
        runner.on("patch", exit_code=103, stdout=fixture("zypper", "patch_security_dry_run.xml"),
                  times=1)
        runner.on("patch", exit_code=0, stdout=fixture("zypper", "install_real.xml"))
        outcome = self.successResultOf(
            self.run_job(runner, make_job("patch_apply", security_only=True))
        )
        self.assertEqual(sum(1 for argv in runner.argvs if "patch" in argv), 2)
        self.assertEqual([c["name"] for c in outcome.changes], ["lpademo", "lpatool"])

    def test_missing_package_fails(self) -> None:
        """Exit 104 (no provider) fails the job."""
        runner = ScriptedRunner()
        runner.on("install", exit_code=fixture_exit("zypper", "install_missing.xml"),
                  stdout=fixture("zypper", "install_missing.xml"))
        self.failureResultOf(self.run_job(runner, make_job("install", "nopkg", dry_run=True)),
                             CommandFailedError)
