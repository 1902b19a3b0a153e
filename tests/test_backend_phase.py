"""Which commands of each backend are package transactions, and the repair before a mutation.

The transaction markers are checked against the managers' real output where a capture exists
(zypper's ``--xmlout``; dnf's "Running transaction" is what dnf 4 logs before rpm runs); each
backend hands its mutating command a watch, never its dry run or its queries.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from lpa.agent import phase
from lpa.agent.backends.apk import ApkBackend
from lpa.agent.backends.apt import AptBackend
from lpa.agent.backends.dnf import DnfBackend
from lpa.agent.backends.pacman import PacmanBackend
from lpa.agent.backends.yum import YumBackend
from lpa.agent.backends.zypper import ZypperBackend
from lpa.errors import CommandNotFoundError
from tests.fakes_backends import FakeJobContext, ScriptedRunner, fixture, make_job

#: keyword arguments of every backend: no reboot marker, no kernel modules directory
NOWHERE: dict[str, Any] = {"reboot_marker": "/nonexistent", "modules_dir": "/nonexistent"}
DUPLICATE = "lpademo-1.1-1.noarch is a duplicate with lpademo-1.0-1.noarch\n"


def execute(backend: object, runner: ScriptedRunner, job: object) -> FakeJobContext:
    """Run the job to its end (whatever it is: the commands are what these tests check)."""
    ctx = FakeJobContext(runner, job)  # type: ignore[arg-type]
    done = backend.execute(job, ctx)  # type: ignore[attr-defined]
    done.addErrback(lambda failure: ctx.output.append(f"ended: {failure.value}"))
    assert done.called, "a scripted job ends at once"
    return ctx


def watches(ctx: FakeJobContext) -> dict[str, object]:
    """First word(s) of each command → its watch."""
    return {" ".join(argv[:3]): watch for argv, watch in ctx.transactions}


class MarkerTests(SynchronousTestCase):
    def test_apt_status_fd(self) -> None:
        """apt's transaction begins with the first pmstatus line on fd 3, not dlstatus."""
        self.assertFalse(phase.APT.begins(3, "dlstatus:1:10.0000:Retrieving file 1 of 3"))
        self.assertFalse(phase.APT.begins(1, "pmstatus:vim:20.0000:Installing vim"))
        self.assertTrue(phase.APT.begins(3, "pmstatus:dpkg-exec:0.0000:Running dpkg"))
        self.assertTrue(phase.ALWAYS.always)

    def test_zypper_real_output(self) -> None:
        """zypper's captured --xmlout install: the transaction begins at install-resolvable,
        after the download and the file conflict check."""
        lines = fixture("zypper", "install_real.xml").splitlines()
        first = next(i for i, line in enumerate(lines) if phase.ZYPPER.begins(1, line))
        self.assertIn('id="install-resolvable"', lines[first])
        self.assertTrue(any("Retrieving package" in line for line in lines[:first]))
        self.assertTrue(phase.ZYPPER.begins(1, "(1/3) Installing: foo-1.0-1.x86_64 ...[done]"))

    def test_dnf_and_others(self) -> None:
        """dnf/yum: "Running transaction" (not its check or test); dnf 5's numbered steps;
        apk's numbered steps; pacman's package changes."""
        self.assertFalse(phase.DNF.begins(1, "Running transaction check"))
        self.assertFalse(phase.DNF.begins(1, "Running transaction test"))
        self.assertTrue(phase.DNF.begins(1, "Running transaction"))
        self.assertTrue(phase.DNF.begins(1, "Running Transaction"))  # yum 3
        self.assertFalse(phase.DNF.begins(1, "[1/3] Verify package files"))
        self.assertTrue(phase.DNF.begins(1, "[2/3] Prepare transaction"))
        apk = fixture("apk", "upgrade_simulate.txt").splitlines()
        self.assertTrue(phase.APK.begins(1, apk[0]))
        self.assertFalse(phase.PACMAN.begins(1, ":: Retrieving packages..."))
        self.assertTrue(phase.PACMAN.begins(1, ":: Processing package changes..."))


class BackendWatchTests(SynchronousTestCase):
    def test_apt(self) -> None:
        """apt-get -y carries the status-fd watch; the repair is a transaction throughout;
        the simulation and the audit carry none."""
        runner = ScriptedRunner()
        runner.on("dpkg", "--audit", times=1,
                  stdout="The following packages are only half configured\n x  foo\n")
        ctx = execute(AptBackend(runner, **NOWHERE), runner, make_job("install", "vim"))
        argvs = [argv for argv, _ in ctx.transactions]
        kinds = [watch for _, watch in ctx.transactions]
        self.assertEqual(kinds[argvs.index(("dpkg", "--force-confdef", "--force-confold",
                                             "--configure", "-a"))], phase.ALWAYS)
        mutation = next(i for i, argv in enumerate(argvs) if "-y" in argv)
        self.assertEqual(kinds[mutation], phase.APT)
        self.assertEqual([w for a, w in ctx.transactions if "-s" in a or "--audit" in a],
                         [None] * sum(1 for a in argvs if "-s" in a or "--audit" in a))
        repair = "The package database was left interrupted; repairing it first with "
        self.assertIn((1, repair + "dpkg --configure -a"), ctx.progress_reports)

    def test_dry_runs_carry_no_watch(self) -> None:
        """A dry run is no transaction, whatever the manager."""
        for backend in (DnfBackend, ZypperBackend, ApkBackend):
            runner = ScriptedRunner()
            runner.on("upgrade", exit_code=1, stdout=fixture("dnf", "upgrade_assumeno.txt"))
            ctx = execute(backend(runner, **NOWHERE), runner,
                          make_job("patch_apply", "x", dry_run=True))
            self.assertEqual({w for _, w in ctx.transactions}, {None}, backend)

    def test_real_runs_of_the_other_managers(self) -> None:
        """dnf, zypper, apk and pacman mutations carry their manager's watch."""
        cases = [
            (DnfBackend, "dnf upgrade -y", phase.DNF),
            (ZypperBackend, "zypper --non-interactive --xmlout", phase.ZYPPER),
            (ApkBackend, "apk upgrade --", phase.APK),
            (PacmanBackend, "pacman -S --needed", phase.PACMAN),
        ]
        for backend, command, watch in cases:
            runner = ScriptedRunner()
            ctx = execute(backend(runner, **NOWHERE), runner, make_job("patch_apply", "x"))
            self.assertIn(watches(ctx).get(command, "missing"), (watch,),
                          (backend, ctx.transactions))


class RpmRepairTests(SynchronousTestCase):
    def test_dnf_duplicates_are_cleaned_up_first(self) -> None:
        """dnf check --duplicates names some: a progress event, dnf remove --duplicates (a
        transaction), then the job's own command."""
        runner = ScriptedRunner()
        runner.on("check", "--duplicates", exit_code=1, stdout=DUPLICATE)
        ctx = execute(DnfBackend(runner, **NOWHERE), runner, make_job("install", "vim"))
        self.assertEqual(runner.argvs[:3], [
            ("dnf", "check", "--duplicates"),
            ("dnf", "remove", "--duplicates", "-y"),
            ("dnf", "install", "-y", "--", "vim"),
        ])
        self.assertEqual(ctx.transactions[1][1], phase.DNF)
        self.assertEqual(len(ctx.progress_reports), 1)
        self.assertIn("1 duplicate package(s)", ctx.progress_reports[0][1])

    def test_clean_or_unknown_check_repairs_nothing(self) -> None:
        """No duplicates, or a dnf without the check command (exit 1 or 2): no repair."""
        for rule in ({"exit_code": 0}, {"exit_code": 1, "stderr": "No such command: check"},
                     {"exit_code": 2, "stderr": "Unknown argument"}):
            runner = ScriptedRunner()
            runner.on("check", **rule)
            execute(DnfBackend(runner, **NOWHERE), runner, make_job("install", "vim"))
            self.assertNotIn(("dnf", "remove", "--duplicates", "-y"), runner.argvs, rule)
            self.assertIn(("dnf", "install", "-y", "--", "vim"), runner.argvs, rule)

    def test_yum_uses_package_cleanup_and_goes_on_without_it(self) -> None:
        """yum: yum check duplicates, package-cleanup --cleandupes; without yum-utils the
        job goes on."""
        runner = ScriptedRunner()
        runner.on("check", "duplicates", exit_code=1, stdout=DUPLICATE)
        runner.on("package-cleanup", error=CommandNotFoundError("package-cleanup: not found"))
        execute(YumBackend(runner, **NOWHERE), runner, make_job("install", "vim"))
        self.assertEqual(runner.argvs[:3], [
            ("yum", "check", "duplicates"),
            ("package-cleanup", "--cleandupes", "-y"),
            ("yum", "install", "-y", "--", "vim"),
        ])

    def test_dry_run_repairs_nothing(self) -> None:
        """A dry run neither checks nor repairs."""
        runner = ScriptedRunner()
        runner.on("install", exit_code=1, stdout=fixture("dnf", "install_assumeno.txt"))
        execute(DnfBackend(runner, **NOWHERE), runner, make_job("install", "x", dry_run=True))
        self.assertNotIn(("dnf", "check", "--duplicates"), runner.argvs)
