"""pacman backend: parsers on real pacman 6 outputs (scratch root), preview-then-apply argv."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from lpa.agent.backends import pacman
from lpa.agent.backends.pacman import PacmanBackend
from lpa.agent.interfaces import IPackageBackend
from lpa.agent.model import Job, JobOutcome
from lpa.errors import PackageNotFoundError, ValidationError
from tests.fakes_backends import FakeJobContext, ScriptedRunner, fixture, fixture_exit, make_job


def scripted() -> ScriptedRunner:
    runner = ScriptedRunner()
    runner.on("pacman", "-Q", stdout=fixture("pacman", "q.txt"))
    runner.on("pacman", "-Qu", stdout=fixture("pacman", "qu.txt"))
    return runner


class PacmanParserTests(SynchronousTestCase):
    def test_query_outputs(self) -> None:
        """-Q, -Qu and --print-format outputs parse into names and versions."""
        self.assertEqual(pacman.parse_pacman_q(fixture("pacman", "q.txt")), {"lpademo": "1.0-1"})
        self.assertEqual(pacman.parse_pacman_qu(fixture("pacman", "qu.txt")),
                         {"lpademo": ("1.0-1", "1.1-1")})
        self.assertEqual(pacman.parse_pacman_q(fixture("pacman", "sup_print.txt")),
                         {"lpademo": "1.1-1"})

    def test_info_blocks(self) -> None:
        """-Qi/-Si ``Key : value`` blocks parse, dependencies and sizes included."""
        local = pacman.parse_pacman_info(fixture("pacman", "qi_lpademo.txt"))
        self.assertEqual((local["Version"], local["Required By"]), ("1.0-1", "None"))
        remote = pacman.parse_pacman_info(fixture("pacman", "si_lpatool.txt"))
        self.assertEqual(remote["Depends On"], "lpademo")


class PacmanReadTests(SynchronousTestCase):
    def test_interface(self) -> None:
        """PacmanBackend implements IPackageBackend."""
        verifyObject(IPackageBackend, PacmanBackend(ScriptedRunner()))

    def test_list_and_patches(self) -> None:
        """-Q joined with -Qu marks upgradable packages; patches use the name heuristic."""
        runner = ScriptedRunner()
        runner.on("-Qu", stdout=fixture("pacman", "qu.txt"))
        runner.on("-Q", stdout=fixture("pacman", "q.txt"))
        [package] = self.successResultOf(PacmanBackend(runner).list_packages())
        self.assertEqual((package.status, package.latest_version), ("Upgradable", "1.1-1"))
        [patch] = self.successResultOf(PacmanBackend(runner).list_patches())
        self.assertEqual((patch.current_version, patch.available_version, patch.security),
                         ("1.0-1", "1.1-1", False))
        self.assertEqual(
            self.successResultOf(PacmanBackend(runner).list_patches(security_only=True)), []
        )

    def test_no_updates_exit_one(self) -> None:
        """``pacman -Qu`` exits 1 when nothing is pending: an empty list, not an error."""
        runner = ScriptedRunner()
        runner.on("-Qu", exit_code=1)
        self.assertEqual(self.successResultOf(PacmanBackend(runner).list_patches()), [])

    def test_available_list(self) -> None:
        """status=available lists sync packages not installed (-Sl)."""
        runner = ScriptedRunner()
        runner.on("-Sl", stdout=fixture("pacman", "sl.txt"))
        packages = self.successResultOf(PacmanBackend(runner).list_packages(status="available"))
        self.assertEqual([(p.name, p.status) for p in packages], [("lpatool", "Available")])

    def test_get_package(self) -> None:
        """Installed via -Qi, available via -Si, otherwise not found."""
        runner = ScriptedRunner()
        runner.on("-Qi", stdout=fixture("pacman", "qi_lpademo.txt"))
        runner.on("-Qu", stdout=fixture("pacman", "qu.txt"))
        package = self.successResultOf(PacmanBackend(runner).get_package("lpademo"))
        self.assertEqual((package.status, package.size_installed, package.dependencies),
                         ("Upgradable", 1024, ()))
        runner = ScriptedRunner()
        runner.on("-Qi", exit_code=1, stderr="error: package 'lpatool' was not found")
        runner.on("-Si", stdout=fixture("pacman", "si_lpatool.txt"))
        package = self.successResultOf(PacmanBackend(runner).get_package("lpatool"))
        self.assertEqual((package.status, package.dependencies), ("Available", ("lpademo",)))
        runner = ScriptedRunner()
        runner.on("-Qi", exit_code=fixture_exit("pacman", "qi_missing.txt"))
        runner.on("-Si", exit_code=fixture_exit("pacman", "si_missing.txt"))
        self.failureResultOf(PacmanBackend(runner).get_package("nopkg"), PackageNotFoundError)


class PacmanExecuteTests(SynchronousTestCase):
    def run_job(self, runner: ScriptedRunner, job: Job) -> Deferred[JobOutcome]:
        backend = PacmanBackend(runner, reboot_marker="/nonexistent", modules_dir="/nonexistent")
        return backend.execute(job, FakeJobContext(runner, job))

    def test_dry_run_apply_all_does_not_sync(self) -> None:
        """A dry-run apply previews with -Su --print (no -y) and runs nothing else."""
        runner = scripted()
        runner.on("--print", stdout=fixture("pacman", "sup_print.txt"))
        outcome = self.successResultOf(self.run_job(runner, make_job("patch_apply", dry_run=True)))
        self.assertEqual(runner.argvs[1], ("pacman", "-Su", "--print", "--print-format", "%n %v"))
        self.assertFalse(any("--noconfirm" in argv for argv in runner.argvs))
        self.assertEqual(
            outcome.changes,
            ({"name": "lpademo", "from": "1.0-1", "to": "1.1-1", "action": "upgrade"},),
        )

    def test_real_apply_all(self) -> None:
        """A real apply previews, then runs pacman -Syu --noconfirm."""
        runner = scripted()
        runner.on("--print", stdout=fixture("pacman", "sup_print.txt"))
        self.successResultOf(self.run_job(runner, make_job("patch_apply")))
        self.assertEqual(runner.argvs[-1], ("pacman", "-Syu", "--noconfirm"))

    def test_install_and_remove_argv(self) -> None:
        """install is -S --needed with names after --; remove is -R."""
        runner = scripted()
        runner.on("--print", "-S", stdout=fixture("pacman", "s_print_lpatool.txt"))
        outcome = self.successResultOf(self.run_job(runner, make_job("install", "lpatool")))
        self.assertEqual(runner.argvs[-1],
                         ("pacman", "-S", "--needed", "--noconfirm", "--", "lpatool"))
        self.assertEqual(outcome.changes[0]["action"], "install")
        runner = scripted()
        runner.on("--print", "-R", stdout=fixture("pacman", "r_print_lpademo.txt"))
        outcome = self.successResultOf(self.run_job(runner, make_job("remove", "lpademo")))
        self.assertEqual(runner.argvs[-1], ("pacman", "-R", "--noconfirm", "--", "lpademo"))
        self.assertEqual(
            outcome.changes,
            ({"name": "lpademo", "from": "1.0-1", "to": None, "action": "remove"},),
        )

    def test_refusals(self) -> None:
        """security_only and version pins are refused clearly, before any command."""
        runner = ScriptedRunner()
        failure = self.failureResultOf(
            self.run_job(runner, make_job("patch_apply", security_only=True)), ValidationError
        )
        self.assertEqual(failure.value.message, "security_only is not supported by pacman")
        failure = self.failureResultOf(
            self.run_job(runner, make_job("install", "a", versions={"a": "1.0-1"})), ValidationError
        )
        self.assertIn("version pins", failure.value.message)
        self.assertEqual(runner.calls, [])
