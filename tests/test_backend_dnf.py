"""dnf and yum backends: parsers on real dnf 4 outputs (scratch installroot), argv, dry run."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from lpa.agent.backends import dnf
from lpa.agent.backends.dnf import DnfBackend
from lpa.agent.backends.yum import YumBackend
from lpa.agent.interfaces import IPackageBackend
from lpa.agent.model import Job, JobOutcome
from lpa.errors import CommandFailedError, PackageNotFoundError, ValidationError
from tests.fakes_backends import FakeJobContext, ScriptedRunner, fixture, make_job

RPM_QA = fixture("dnf", "rpm_qa.txt")
CHECK_UPDATE = fixture("dnf", "check_update.txt")
UPDATEINFO = fixture("dnf", "updateinfo_list.txt")
UPDATEINFO_CVE = fixture("dnf", "updateinfo_list_cve.txt")


def scripted() -> ScriptedRunner:
    runner = ScriptedRunner()
    runner.on("rpm", "-qa", stdout=RPM_QA)
    runner.on("check-update", exit_code=100, stdout=CHECK_UPDATE)
    runner.on("updateinfo", "--with-cve", stdout=UPDATEINFO_CVE)
    runner.on("updateinfo", stdout=UPDATEINFO)
    return runner


class DnfParserTests(SynchronousTestCase):
    def test_rpm_qa(self) -> None:
        """Our rpm query format parses into installed packages (zero epoch dropped)."""
        [package] = dnf.parse_rpm_qa(RPM_QA)
        self.assertEqual((package.name, package.version, package.status),
                         ("lpademo", "1.0-1", "Installed"))
        self.assertEqual(package.description, "lpa demo package lpademo")

    def test_check_update(self) -> None:
        """check-update rows give name → (version, repo)."""
        self.assertEqual(dnf.parse_check_update(CHECK_UPDATE), {"lpademo": ("1.1-1", "lpa")})

    def test_check_update_wrapped_and_obsoletes(self) -> None:
        """A long name wrapped onto its own line is joined; the Obsoleting section is ignored."""
        text = (
            "\nvery-long-package-name-that-wraps.x86_64\n"
            "                          2.0-1.fc40                     updates\n"
            "kernel.x86_64   6.9.7-200.fc40   updates\n"
            "Obsoleting Packages\n"
            "grub2-tools.x86_64  1:2.06-1  updates\n"
        )
        self.assertEqual(
            dnf.parse_check_update(text),
            {"very-long-package-name-that-wraps": ("2.0-1.fc40", "updates"),
             "kernel": ("6.9.7-200.fc40", "updates")},
        )

    def test_updateinfo(self) -> None:
        """updateinfo rows give security, mapped severity and advisory/CVE ids."""
        self.assertEqual(
            dnf.parse_updateinfo(UPDATEINFO),
            {"lpademo": {"security": True, "severity": "high", "ids": ["LPA-2026-0001"]}},
        )
        self.assertEqual(dnf.parse_updateinfo(UPDATEINFO_CVE)["lpademo"]["ids"], ["CVE-2026-12345"])

    def test_updateinfo_bugfix_is_not_security(self) -> None:
        """A bugfix advisory is not a security signal."""
        info = dnf.parse_updateinfo("FEDORA-2024-1 bugfix bash-5.2.26-3.fc40.x86_64\n")
        self.assertFalse(info["bash"]["security"])

    def test_updateinfo_other_layouts(self) -> None:
        """yum 3's trailing "updateinfo list done" is skipped; dnf 5's severity column is read."""
        info = dnf.parse_updateinfo(
            "RHSA-2024:1234 Important/Sec. openssl-1:1.0.2k-26.el7_9.x86_64\nupdateinfo list done\n"
            "Name Type Severity Package Issued\n"
            "FEDORA-2024-0d7d security Critical kernel-6.9.7-200.fc40.x86_64 2024-06-30 01:02:03\n"
        )
        self.assertEqual(sorted(info), ["kernel", "openssl"])
        self.assertEqual(info["kernel"]["severity"], "critical")
        self.assertEqual(info["openssl"]["severity"], "high")

    def test_split_nevra(self) -> None:
        """NEVRA strings split into name and version, epochs kept when not zero."""
        self.assertEqual(dnf.split_nevra("openssl-1:3.0.7-25.el9.x86_64"),
                         ("openssl", "1:3.0.7-25.el9"))
        self.assertEqual(dnf.split_nevra("lpademo-1.1-1.noarch"), ("lpademo", "1.1-1"))

    def test_transaction_tables(self) -> None:
        """The --assumeno transaction table lists installs, upgrades and removals."""
        self.assertEqual(
            dnf.parse_transaction_table(fixture("dnf", "upgrade_assumeno.txt")),
            [{"name": "lpademo", "from": None, "to": "1.1-1", "action": "upgrade"}],
        )
        self.assertEqual(
            dnf.parse_transaction_table(fixture("dnf", "install_assumeno.txt")),
            [{"name": "lpatool", "from": None, "to": "2.0-1", "action": "install"}],
        )
        self.assertEqual(
            dnf.parse_transaction_table(fixture("dnf", "remove_assumeno.txt")),
            [{"name": "lpademo", "from": "1.0-1", "to": None, "action": "remove"}],
        )


class DnfReadTests(SynchronousTestCase):
    def test_interface(self) -> None:
        """Both rpm backends implement IPackageBackend."""
        verifyObject(IPackageBackend, DnfBackend(ScriptedRunner()))
        verifyObject(IPackageBackend, YumBackend(ScriptedRunner()))

    def test_list_packages_marks_upgradable(self) -> None:
        """Installed packages with a check-update row are Upgradable (exit 100 is success)."""
        runner = scripted()
        [package] = self.successResultOf(DnfBackend(runner).list_packages())
        self.assertEqual((package.status, package.latest_version), ("Upgradable", "1.1-1"))
        self.assertIn(("dnf", "-q", "check-update"), runner.argvs)

    def test_patches_use_advisories(self) -> None:
        """Patches carry the advisory's security flag, severity and CVE ids."""
        [patch] = self.successResultOf(DnfBackend(scripted()).list_patches(security_only=True))
        self.assertEqual((patch.name, patch.current_version, patch.available_version),
                         ("lpademo", "1.0-1", "1.1-1"))
        self.assertTrue(patch.security)
        self.assertEqual(patch.severity, "high")
        self.assertEqual(patch.cve_ids, ("CVE-2026-12345",))
        self.assertIn("LPA-2026-0001", patch.description)

    def test_patches_without_updateinfo_fall_back(self) -> None:
        """Without advisory data, severity is the name heuristic and nothing is security."""
        runner = ScriptedRunner()
        runner.on("rpm", "-qa", stdout=RPM_QA)
        runner.on("check-update", exit_code=100,
                  stdout="kernel-core.x86_64  6.9.7-200.fc40  updates\n")
        runner.on("updateinfo", exit_code=1, stderr="Error: no updateinfo")
        [patch] = self.successResultOf(DnfBackend(runner).list_patches())
        self.assertEqual(patch.severity, "critical")
        self.assertFalse(patch.security)
        self.assertTrue(patch.requires_reboot)

    def test_get_available_and_missing(self) -> None:
        """A not-installed package is looked up in the repos; absent everywhere → not found."""
        runner = ScriptedRunner()
        runner.on("list", "--available", stdout=fixture("dnf", "list_available.txt"))
        package = self.successResultOf(DnfBackend(runner).get_package("lpatool"))
        self.assertEqual((package.status, package.version), ("Available", "2.0-1"))
        runner = ScriptedRunner()
        runner.on("list", "--available", exit_code=1,
                  stdout="Error: No matching Packages to list\n")
        self.failureResultOf(DnfBackend(runner).get_package("nopkg"), PackageNotFoundError)


class DnfExecuteTests(SynchronousTestCase):
    def run_job(
        self, backend: DnfBackend, runner: ScriptedRunner, job: Job
    ) -> Deferred[JobOutcome]:
        return backend.execute(job, FakeJobContext(runner, job))

    def test_install_argv(self) -> None:
        """install: -y, weak deps off, --allowerasing for force, pins as name-version after --."""
        runner = ScriptedRunner()
        job = make_job("install", "lpatool", "bash", versions={"bash": "5.2.26-3.fc40"},
                       force=True, no_recommends=True)
        backend = DnfBackend(runner, reboot_marker="/nonexistent", modules_dir="/nonexistent")
        self.successResultOf(self.run_job(backend, runner, job))
        self.assertEqual(runner.calls[0].argv, ("dnf", "check", "--duplicates"))
        argv = runner.calls[1].argv
        self.assertEqual(argv[:3], ("dnf", "install", "-y"))
        self.assertIn("--setopt=install_weak_deps=False", argv)
        self.assertIn("--allowerasing", argv)
        self.assertNotIn("--nogpgcheck", argv)
        self.assertEqual(argv[-3:], ("--", "lpatool", "bash-5.2.26-3.fc40"))

    def test_dry_run_security_patch(self) -> None:
        """A dry-run security apply uses --assumeno --security, accepts exit 1, reports changes."""
        runner = ScriptedRunner()
        runner.on("upgrade", exit_code=1, stdout=fixture("dnf", "upgrade_assumeno.txt"))
        job = make_job("patch_apply", dry_run=True, security_only=True)
        outcome = self.successResultOf(self.run_job(DnfBackend(runner), runner, job))
        self.assertEqual(runner.calls[0].argv, ("dnf", "upgrade", "--assumeno", "--security"))
        self.assertEqual(outcome.changes,
                         ({"name": "lpademo", "from": None, "to": "1.1-1", "action": "upgrade"},))
        self.assertEqual(len(runner.calls), 1)

    def test_dry_run_resolution_error_fails(self) -> None:
        """A dry run that could not resolve (exit 1, no table) is a failure, not "nothing to do"."""
        runner = ScriptedRunner()
        runner.on("install", exit_code=1, stdout=fixture("dnf", "install_missing.txt"))
        job = make_job("install", "nopkg", dry_run=True)
        failure = self.failureResultOf(self.run_job(DnfBackend(runner), runner, job),
                                       CommandFailedError)
        self.assertIn("Unable to find a match", failure.value.message)

    def test_real_apply_and_needs_restarting(self) -> None:
        """A real apply runs dnf upgrade -y; needs-restarting -r exit 1 means reboot required."""
        runner = ScriptedRunner()
        runner.on("upgrade", stdout=fixture("dnf", "upgrade_assumeno.txt"))
        runner.on("needs-restarting", exit_code=1,
                  stdout="Reboot is required to fully utilize these updates.\n")
        job = make_job("patch_apply", "lpademo")
        backend = DnfBackend(runner, reboot_marker="/nonexistent", modules_dir="/nonexistent")
        outcome = self.successResultOf(self.run_job(backend, runner, job))
        self.assertEqual(runner.calls[0].argv, ("dnf", "check", "--duplicates"))
        self.assertEqual(runner.calls[1].argv, ("dnf", "upgrade", "-y", "--", "lpademo"))
        self.assertEqual(runner.calls[2].argv, ("dnf", "needs-restarting", "-r"))
        self.assertTrue(outcome.reboot_required)

    def test_yum_spellings(self) -> None:
        """yum uses update, -C, no weak-deps/allowerasing options, and needs-restarting -r."""
        runner = ScriptedRunner()
        runner.on("needs-restarting", exit_code=0)
        job = make_job("patch_apply", security_only=True, force=True, no_recommends=True)
        yum = YumBackend(runner, reboot_marker="/nonexistent", modules_dir="/nonexistent")
        outcome = self.successResultOf(self.run_job(yum, runner, job))
        self.assertEqual(runner.calls[0].argv, ("yum", "check", "duplicates"))
        self.assertEqual(runner.calls[1].argv, ("yum", "update", "-y", "--security"))
        self.assertEqual(runner.calls[2].argv, ("needs-restarting", "-r"))
        self.assertFalse(outcome.reboot_required)
        read = ScriptedRunner()
        self.successResultOf(YumBackend(read).list_patches())
        self.assertIn(("yum", "-q", "check-update"), read.argvs)
        self.assertIn(("yum", "-q", "updateinfo", "list", "cves"), read.argvs)

    def test_metacharacters_refused(self) -> None:
        """Shell metacharacters in a name stop the job before any argv is built."""
        runner = ScriptedRunner()
        self.failureResultOf(self.run_job(DnfBackend(runner), runner, make_job("remove", "a&&b")),
                             ValidationError)
        self.assertEqual(runner.calls, [])
