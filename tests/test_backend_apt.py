"""apt backend: parsers on outputs captured from this Debian 12 host, argv building, safety."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from lpa.agent.backends import apt
from lpa.agent.backends.apt import AptBackend, AptProgress
from lpa.agent.context import lock_holder
from lpa.agent.interfaces import IJobContext, IPackageBackend, IProcessRunner
from lpa.errors import (
    CommandFailedError,
    PackageManagerError,
    PackageNotFoundError,
    ValidationError,
)
from tests.fakes_backends import FakeJobContext, ScriptedRunner, fixture, fixture_exit, make_job

INSTALLED = fixture("apt", "list_installed.txt")
UPGRADABLE = fixture("apt", "list_upgradable.txt")
DIST_UPGRADE = fixture("apt", "sim_dist_upgrade.txt")
POLICY = fixture("apt", "policy_several.txt")
DPKG_S_BASH = fixture("apt", "dpkg_s_bash.txt")
#: dpkg --audit wording for interrupted work (documented format; this host's audit is clean)
#: dpkg's repair as the backend runs it
CONFIGURE = ("dpkg", "--force-confdef", "--force-confold", "--configure", "-a")
HALF_CONFIGURED = (
    "The following packages are only half configured, probably due to problems\n"
    "configuring them the first time.\n x   some package\n"
)


class AptParserTests(SynchronousTestCase):
    def test_installed_list_keeps_upgradable(self) -> None:
        """``apt list --installed`` marks "installed,upgradable to:" packages upgradable
        (bug 25)."""
        entries = apt.parse_apt_list(INSTALLED)
        self.assertEqual(len(entries), 710)
        upgradable = {e.name: e for e in entries if e.upgradable_to}
        self.assertEqual(len(upgradable), 136)
        self.assertEqual(upgradable["bash"].version, "5.2.15-2+b8")
        self.assertEqual(upgradable["bash"].upgradable_to, "5.2.15-2+b13")
        self.assertTrue(all(e.installed for e in entries))

    def test_local_packages_have_no_suite(self) -> None:
        """A locally installed package (``now`` only) parses with no suites."""
        entries = {e.name: e for e in apt.parse_apt_list(INSTALLED)}
        local = entries["google-cloud-cli-anthoscli"]
        self.assertEqual(local.suites, ())
        self.assertFalse(local.security)

    def test_upgradable_security_origins(self) -> None:
        """``apt list --upgradable`` suites ending in -security mark security updates."""
        entries = {e.name: e for e in apt.parse_apt_list(UPGRADABLE)}
        self.assertEqual(len(entries), 136)
        self.assertEqual(sum(e.security for e in entries.values()), 81)
        self.assertTrue(entries["apt"].security)
        self.assertEqual(entries["apt"].upgradable_from, "2.6.1")
        self.assertFalse(entries["bash"].security)

    def test_simulation_changes(self) -> None:
        """``apt-get -s dist-upgrade`` Inst lines become upgrade changes with from/to."""
        changes = apt.parse_apt_simulation(DIST_UPGRADE)
        self.assertEqual(len(changes), 136)
        self.assertIn(
            {"name": "base-files", "from": "12.4+deb12u11", "to": "12.4+deb12u15",
             "action": "upgrade"},
            changes,
        )

    def test_simulation_install_and_nothing(self) -> None:
        """A new package is an install change; "not installed, so not removed" is no change."""
        self.assertEqual(
            apt.parse_apt_simulation(fixture("apt", "sim_install_sl.txt")),
            [{"name": "sl", "from": None, "to": "5.02-1+b1", "action": "install"}],
        )
        self.assertEqual(apt.parse_apt_simulation(fixture("apt", "sim_remove_nano.txt")), [])

    def test_simulation_remove_lines(self) -> None:
        """``Remv``/``Purg`` lines (documented format) become remove/purge changes."""
        text = "Remv nano [7.2-1+deb12u1]\nPurg vim-tiny [2:9.0.1378-2]\n"
        self.assertEqual(
            apt.parse_apt_simulation(text),
            [
                {"name": "nano", "from": "7.2-1+deb12u1", "to": None, "action": "remove"},
                {"name": "vim-tiny", "from": "2:9.0.1378-2", "to": None, "action": "purge"},
            ],
        )

    def test_policy_candidate_origins(self) -> None:
        """``apt-cache policy`` gives installed/candidate and the candidate's origins."""
        policies = apt.parse_apt_policy(POLICY)
        self.assertEqual(policies["bash"].installed, "5.2.15-2+b8")
        self.assertEqual(policies["bash"].candidate, "5.2.15-2+b13")
        self.assertFalse(policies["bash"].security)
        self.assertTrue(policies["apt"].security)
        self.assertTrue(policies["libgcrypt20-dev"].security)

    def test_dpkg_status_fields(self) -> None:
        """``dpkg -s`` fields and flattened dependency names."""
        fields = apt.parse_dpkg_status(DPKG_S_BASH)
        self.assertEqual(fields["Version"], "5.2.15-2+b8")
        self.assertEqual(fields["Status"], "install ok installed")
        self.assertEqual(apt.dependency_names(fields["Depends"]), ("base-files", "debianutils"))

    def test_status_fd_lines(self) -> None:
        """``pmstatus``/``dlstatus`` lines parse; the description may contain colons."""
        self.assertEqual(
            apt.parse_status_fd("pmstatus:libc6:amd64:50.0000:Unpacking libc6:amd64"),
            ("pmstatus", "libc6:amd64", 50.0, "Unpacking libc6:amd64"),
        )
        self.assertEqual(
            apt.parse_status_fd("pmstatus:libc6:50.0:Unpacking libc6: now"),
            ("pmstatus", "libc6", 50.0, "Unpacking libc6: now"),
        )
        self.assertIsNone(apt.parse_status_fd("garbage"))

    def test_progress_counts_packages(self) -> None:
        """Status-fd lines become progress with "package i of n"."""
        ctx = FakeJobContext(ScriptedRunner(), make_job("install", "a"))
        progress = AptProgress(ctx, 2)
        progress("dlstatus:1:50:Retrieving file 1 of 2")
        progress("pmstatus:alpha:10:Preparing alpha")
        progress("pmstatus:beta:60:Unpacking beta")
        progress("not a status line")
        self.assertEqual(ctx.progress_reports[0], (15, "Downloading: Retrieving file 1 of 2"))
        self.assertEqual(ctx.progress_reports[1], (36, "Preparing alpha (package 1 of 2)"))
        self.assertEqual(ctx.progress_reports[2], (71, "Unpacking beta (package 2 of 2)"))
        self.assertEqual(len(ctx.progress_reports), 3)

    def test_lock_wait_line_is_recognised(self) -> None:
        """apt's real "Waiting for cache lock" line (captured here) names the holder to the
        context."""
        line = fixture("apt", "lock_wait_stdout.txt").splitlines()[0]
        self.assertIn("python", lock_holder(line) or "")


def backend(runner: ScriptedRunner, **kwargs: object) -> AptBackend:
    return AptBackend(runner, reboot_marker="/nonexistent/reboot-required",
                      modules_dir="/nonexistent", **kwargs)  # type: ignore[arg-type]


class AptReadTests(SynchronousTestCase):
    def test_interfaces(self) -> None:
        """The backend and the fakes implement their interfaces."""
        runner = ScriptedRunner()
        verifyObject(IPackageBackend, backend(runner))
        verifyObject(IProcessRunner, runner)
        verifyObject(IJobContext, FakeJobContext(runner, make_job("install", "a")))

    def test_list_upgradable(self) -> None:
        """status=upgradable lists installed packages with a newer candidate as Upgradable."""
        runner = ScriptedRunner()
        runner.on("apt", "list", "--installed", stdout=INSTALLED)
        packages = self.successResultOf(backend(runner).list_packages(status="upgradable"))
        self.assertEqual(len(packages), 136)
        bash = next(p for p in packages if p.name == "bash")
        self.assertEqual((bash.status, bash.upgradable, bash.latest_version),
                         ("Upgradable", True, "5.2.15-2+b13"))
        env = runner.calls[0].env
        assert env is not None
        self.assertEqual(env["LC_ALL"], "C")

    def test_list_with_filter(self) -> None:
        """A name filter is a substring match over installed packages."""
        runner = ScriptedRunner()
        runner.on("apt", "list", "--installed", stdout=INSTALLED)
        packages = self.successResultOf(backend(runner).list_packages(name_filter="bash"))
        expected = {e.name for e in apt.parse_apt_list(INSTALLED) if "bash" in e.name}
        self.assertEqual({p.name for p in packages}, expected)
        self.assertIn("bash", expected)

    def test_bad_filter_refused(self) -> None:
        """A filter with shell metacharacters is refused before any command runs."""
        runner = ScriptedRunner()
        self.failureResultOf(backend(runner).list_packages(name_filter="x;rm -rf /"),
                             ValidationError)
        self.assertEqual(runner.calls, [])

    def test_get_installed_upgradable(self) -> None:
        """get_package joins ``dpkg -s`` and the ``apt-cache policy`` candidate."""
        runner = ScriptedRunner()
        runner.on("apt-cache", "policy", stdout=POLICY)
        runner.on("dpkg", "-s", stdout=DPKG_S_BASH)
        package = self.successResultOf(backend(runner).get_package("bash"))
        self.assertEqual(package.status, "Upgradable")
        self.assertEqual(package.latest_version, "5.2.15-2+b13")
        self.assertEqual(package.size_installed, 7164 * 1024)
        self.assertIn("libc6", package.dependencies)
        self.assertIn(("apt-cache", "policy", "--", "bash"), runner.argvs)

    def test_get_missing(self) -> None:
        """An unknown package is PackageNotFoundError."""
        runner = ScriptedRunner()
        runner.on("dpkg", "-s", exit_code=1, stderr="dpkg-query: package 'nope' is not installed")
        self.failureResultOf(backend(runner).get_package("nope"), PackageNotFoundError)

    def test_get_available(self) -> None:
        """A package with a candidate but not installed is Available."""
        runner = ScriptedRunner()
        runner.on("apt-cache", stdout=(
            "sl:\n  Installed: (none)\n  Candidate: 5.02-1+b1\n  Version table:\n"
            "     5.02-1+b1 500\n"
            "        500 http://deb.debian.org/debian bookworm/main amd64 Packages\n"
        ))
        runner.on("dpkg", "-s", exit_code=1)
        package = self.successResultOf(backend(runner).get_package("sl"))
        self.assertEqual((package.status, package.version), ("Available", "5.02-1+b1"))

    def test_patches_security_and_severity(self) -> None:
        """Patches from a -security suite are security, high (critical for reboot packages)."""
        runner = ScriptedRunner()
        runner.on("apt", "list", "--upgradable", stdout=UPGRADABLE)
        patches = {p.name: p for p in self.successResultOf(backend(runner).list_patches())}
        self.assertEqual(len(patches), 136)
        self.assertEqual((patches["apt"].security, patches["apt"].severity), (True, "high"))
        self.assertEqual(patches["bash"].severity, "medium")
        self.assertFalse(patches["bash"].security)
        self.assertEqual(patches["bash"].current_version, "5.2.15-2+b8")
        openssl = patches.get("openssl") or patches.get("libssl3")
        if openssl is not None and openssl.security:
            self.assertEqual(openssl.severity, "critical")
            self.assertTrue(openssl.requires_reboot)
        security = self.successResultOf(backend(runner).list_patches(security_only=True))
        self.assertEqual(len(security), 81)

    def test_read_failure(self) -> None:
        """A failing query is a retryable PackageManagerError."""
        runner = ScriptedRunner()
        runner.on("apt", exit_code=100, stderr="E: broken")
        failure = self.failureResultOf(backend(runner).list_patches(), PackageManagerError)
        self.assertTrue(failure.value.retryable)


class AptExecuteTests(SynchronousTestCase):
    def run_job(self, runner: ScriptedRunner, job: object, **kwargs: object):  # type: ignore[no-untyped-def]
        ctx = FakeJobContext(runner, job)  # type: ignore[arg-type]
        return ctx, backend(runner, **kwargs).execute(job, ctx)

    def test_install_argv(self) -> None:
        """install: simulate, dpkg --configure -a, apt-get with safe options, names after --,
        audit."""
        runner = ScriptedRunner()
        runner.on("-s", "install", stdout=fixture("apt", "sim_install_sl.txt"))
        job = make_job("install", "sl", "curl", versions={"curl": "7.88.1-10+deb12u15"},
                       no_recommends=True, force=True)
        _ctx, d = self.run_job(runner, job, lock_timeout=120)
        outcome = self.successResultOf(d)
        self.assertEqual(runner.argvs[0], ("dpkg", "--audit"))
        self.assertIn("-s", runner.argvs[1])
        self.assertEqual(runner.argvs[3], ("dpkg", "--audit"))
        self.assertEqual(len(runner.calls), 4)
        real = runner.calls[2].argv
        self.assertEqual(real[0], "apt-get")
        for option in ("Dpkg::Options::=--force-confdef", "Dpkg::Options::=--force-confold",
                       "DPkg::Lock::Timeout=120", "APT::Status-Fd=3"):
            self.assertIn(option, real)
        self.assertIn("-y", real)
        self.assertIn("--no-install-recommends", real)
        self.assertIn("--allow-downgrades", real)
        self.assertNotIn("--allow-unauthenticated", real)
        self.assertEqual(real[-3:], ("--", "sl", "curl=7.88.1-10+deb12u15"))
        self.assertTrue(runner.calls[2].had_status_fd)
        env = runner.calls[2].env
        assert env is not None
        self.assertEqual(env["DEBIAN_FRONTEND"], "noninteractive")
        self.assertEqual(runner.calls[2].timeout, 1800.0)
        self.assertEqual(outcome.changes,
                         ({"name": "sl", "from": None, "to": "5.02-1+b1", "action": "install"},))
        self.assertFalse(outcome.reboot_required)

    def test_dry_run_install_changes_nothing(self) -> None:
        """A dry run runs only ``apt-get -s`` and reports what would change."""
        runner = ScriptedRunner()
        runner.on("-s", stdout=fixture("apt", "sim_install_sl.txt"))
        _ctx, d = self.run_job(runner, make_job("install", "sl", dry_run=True))
        outcome = self.successResultOf(d)
        self.assertEqual(len(runner.calls), 1)
        self.assertIn("-s", runner.calls[0].argv)
        self.assertNotIn("-y", runner.calls[0].argv)
        self.assertEqual(len(outcome.changes), 1)
        self.assertIn("Dry run", outcome.message)

    def test_metacharacters_refused_before_argv(self) -> None:
        """A name with shell metacharacters is a ValidationError and no command runs."""
        for name in ("sl;reboot", "$(id)", "-oFoo", "a b", "x|y"):
            runner = ScriptedRunner()
            _ctx, d = self.run_job(runner, make_job("install", name))
            self.failureResultOf(d, ValidationError)
            self.assertEqual(runner.calls, [])

    def test_bad_version_refused(self) -> None:
        """A version with metacharacters is refused."""
        runner = ScriptedRunner()
        _ctx, d = self.run_job(runner, make_job("install", "sl", versions={"sl": "1;id"}))
        self.failureResultOf(d, ValidationError)
        self.assertEqual(runner.calls, [])

    def test_empty_package_list_applies_nothing(self) -> None:
        """``packages: []`` on patch_apply runs no command at all (the original ran
        ``apt-get install -y --``) and completes with an empty change list and no reboot."""
        for dry_run in (False, True):
            runner = ScriptedRunner()
            _ctx, d = self.run_job(
                runner, make_job("patch_apply", empty=True, dry_run=dry_run, allow_reboot=True)
            )
            outcome = self.successResultOf(d)
            self.assertEqual((outcome.changes, outcome.reboot_required), ((), False))
            self.assertIn("othing to apply", outcome.message)
            self.assertEqual(runner.calls, [])

    def test_empty_package_list_refused_elsewhere(self) -> None:
        """An empty package list for install never builds an argv."""
        runner = ScriptedRunner()
        _ctx, d = self.run_job(runner, make_job("install", empty=True))
        self.failureResultOf(d, ValidationError)
        self.assertEqual(runner.calls, [])

    def test_patch_apply_all(self) -> None:
        """patch_apply of everything: apt-get update, simulate, configure, dist-upgrade, audit."""
        runner = ScriptedRunner()
        runner.on("-s", "dist-upgrade", stdout=DIST_UPGRADE)
        ctx, d = self.run_job(runner, make_job("patch_apply"))
        outcome = self.successResultOf(d)
        self.assertEqual(runner.calls[0].argv[-1], "update")
        self.assertEqual(runner.calls[0].timeout, 300.0)
        self.assertIn("dist-upgrade", runner.calls[3].argv)
        self.assertIn("-y", runner.calls[3].argv)
        self.assertEqual(len(outcome.changes), 136)
        self.assertEqual(ctx.progress_reports[0][1], "Refreshing package lists")

    def test_patch_apply_dry_run_reads_only(self) -> None:
        """A dry-run apply runs no update, no dpkg, only ``apt-get -s dist-upgrade``."""
        runner = ScriptedRunner()
        runner.on("-s", "dist-upgrade", stdout=DIST_UPGRADE)
        _ctx, d = self.run_job(runner, make_job("patch_apply", dry_run=True, allow_reboot=True))
        outcome = self.successResultOf(d)
        self.assertEqual(len(runner.calls), 1)
        self.assertEqual(len(outcome.changes), 136)
        self.assertFalse(outcome.reboot_required)

    def test_security_only_installs_security_names(self) -> None:
        """security_only installs exactly the upgradable packages from a -security suite."""
        runner = ScriptedRunner()
        runner.on("apt", "list", "--upgradable", stdout=UPGRADABLE)
        _ctx, d = self.run_job(runner, make_job("patch_apply", security_only=True))
        self.successResultOf(d)
        real = next(c.argv for c in runner.calls if c.argv[0] == "apt-get" and "-y" in c.argv)
        names = real[real.index("--") + 1:]
        self.assertEqual(len(names), 81)
        self.assertIn("apt", names)
        self.assertNotIn("bash", names)
        self.assertIn("--only-upgrade", real)

    def test_security_only_named_intersection(self) -> None:
        """security_only with names applies only named packages that have security updates."""
        runner = ScriptedRunner()
        runner.on("apt", "list", "--upgradable", stdout=UPGRADABLE)
        _ctx, d = self.run_job(runner, make_job("patch_apply", "apt", "bash", security_only=True,
                                                dry_run=True))
        self.successResultOf(d)
        simulate = runner.calls[-1].argv
        self.assertEqual(simulate[simulate.index("--") + 1:], ("apt",))

    def test_security_only_nothing_pending(self) -> None:
        """No security updates: nothing is run after the listing."""
        runner = ScriptedRunner()
        runner.on("apt", "list", "--upgradable", stdout="Listing...\n")
        _ctx, d = self.run_job(runner, make_job("patch_apply", security_only=True))
        outcome = self.successResultOf(d)
        self.assertEqual(outcome.message, "No security updates pending")
        self.assertFalse(any("-y" in c.argv for c in runner.calls))

    def test_configure_failure_needs_manual_intervention(self) -> None:
        """Interrupted dpkg work is finished first; if that fails the job fails before apt-get."""
        runner = ScriptedRunner()
        runner.on("dpkg", "--audit", stdout=HALF_CONFIGURED)
        runner.on("dpkg", "--configure", exit_code=1, stderr="dpkg: error processing package x")
        _ctx, d = self.run_job(runner, make_job("remove", "sl"))
        failure = self.failureResultOf(d, CommandFailedError)
        self.assertIn("requires manual intervention", failure.value.message)
        self.assertEqual(runner.argvs, [("dpkg", "--audit"), CONFIGURE])

    def test_configure_lock_held(self) -> None:
        """``dpkg --configure -a`` meeting a held lock (real message) says so, not "manual"."""
        runner = ScriptedRunner()
        runner.on("dpkg", "--audit", stdout=HALF_CONFIGURED)
        runner.on(
            "dpkg", "--configure",
            exit_code=fixture_exit("apt", "dpkg_configure_locked.txt"),
            stderr=fixture("apt", "dpkg_configure_locked.txt"),
        )
        _ctx, d = self.run_job(runner, make_job("remove", "sl"))
        failure = self.failureResultOf(d, CommandFailedError)
        self.assertIn("another package manager holds it", failure.value.message)

    def test_clean_database_skips_configure(self) -> None:
        """With a clean ``dpkg --audit`` no ``dpkg --configure -a`` runs (it would not wait for
        the lock)."""
        runner = ScriptedRunner()
        _ctx, d = self.run_job(runner, make_job("remove", "sl"))
        self.successResultOf(d)
        self.assertNotIn(CONFIGURE, runner.argvs)

    def test_dependency_error_fix_broken_retry(self) -> None:
        """A dependency error runs ``apt-get -f install`` and retries once."""
        runner = ScriptedRunner()
        runner.on("-y", "install", "sl", exit_code=100,
                  stdout="E: Unmet dependencies. Try 'apt --fix-broken install'", times=1)
        _ctx, d = self.run_job(runner, make_job("install", "sl"))
        self.successResultOf(d)
        mutations = [c.argv for c in runner.calls if "-y" in c.argv]
        self.assertEqual(len(mutations), 3)
        self.assertEqual(mutations[1][-2:], ("-f", "install"))
        self.assertEqual(mutations[2][-1], "sl")

    def test_other_failure_cleans_up_and_fails(self) -> None:
        """A non-dependency failure runs ``dpkg --configure -a`` to clean up and fails."""
        runner = ScriptedRunner()
        runner.on("-y", "remove", exit_code=100,
                  stderr="E: Sub-process /usr/bin/dpkg returned an error code (1)")
        _ctx, d = self.run_job(runner, make_job("remove", "sl"))
        self.failureResultOf(d, CommandFailedError)
        self.assertEqual(runner.calls[-1].argv, CONFIGURE)

    def test_audit_problems_repaired_or_fail(self) -> None:
        """``dpkg --audit`` problems: configure and audit again; still there → failure."""
        runner = ScriptedRunner()
        runner.on("dpkg", "--audit", times=1)
        runner.on("dpkg", "--audit", stdout=HALF_CONFIGURED, times=1)
        _ctx, d = self.run_job(runner, make_job("remove", "sl"))
        self.successResultOf(d)
        self.assertEqual(runner.argvs[-3:], [("dpkg", "--audit"), CONFIGURE, ("dpkg", "--audit")])
        runner = ScriptedRunner()
        runner.on("dpkg", "--audit", times=1)
        runner.on("dpkg", "--audit", stdout=HALF_CONFIGURED)
        _ctx, d = self.run_job(runner, make_job("remove", "sl"))
        failure = self.failureResultOf(d, CommandFailedError)
        self.assertIn("dpkg --audit", failure.value.message)

    def test_fetch_error_refresh_and_retry(self) -> None:
        """A fetch error during apply refreshes the lists and retries once."""
        runner = ScriptedRunner()
        runner.on("-y", "dist-upgrade", exit_code=100,
                  stderr="E: Failed to fetch http://x/y.deb 404 Not Found", times=1)
        _ctx, d = self.run_job(runner, make_job("patch_apply"))
        self.successResultOf(d)
        updates = [c for c in runner.calls if c.argv[-1] == "update"]
        self.assertEqual(len(updates), 2)

    def test_reboot_marker_after_apply(self) -> None:
        """The reboot-required marker and its .pkgs file make the outcome ask for a reboot."""
        directory = self.mktemp()
        os.makedirs(directory)
        marker = os.path.join(directory, "reboot-required")
        with open(marker, "w") as f:
            f.write("*** System restart required ***\n")
        with open(marker + ".pkgs", "w") as f:
            f.write("libc6\nlibc6\n")
        runner = ScriptedRunner()
        job = make_job("update", "sl")
        ctx = FakeJobContext(runner, job)
        apt_backend = AptBackend(runner, reboot_marker=marker, modules_dir="/nonexistent")
        outcome = self.successResultOf(apt_backend.execute(job, ctx))
        self.assertTrue(outcome.reboot_required)
        self.assertEqual(outcome.reboot_packages, ("libc6",))

    def test_reboot_by_package_name(self) -> None:
        """Changing a kernel package conservatively needs a reboot."""
        runner = ScriptedRunner()
        runner.on("-s",
                  stdout="Inst linux-image-amd64 [6.1.1] (6.1.2 Debian:12/oldstable [amd64])\n")
        _ctx, d = self.run_job(runner, make_job("update", "linux-image-amd64"))
        outcome = self.successResultOf(d)
        self.assertTrue(outcome.reboot_required)
        self.assertEqual(outcome.reboot_packages, ("linux-image-amd64",))

    def test_newer_kernel_after_apply(self) -> None:
        """Without other signals, a newer installed kernel than the running one means reboot."""
        modules = self.mktemp()
        for release in ("6.1.0-9-amd64", "6.1.0-10-amd64"):
            os.makedirs(os.path.join(modules, release))
        runner = ScriptedRunner()
        job = make_job("update", "sl")
        backend = AptBackend(runner, reboot_marker="/nonexistent", modules_dir=modules,
                             running_kernel=lambda: "6.1.0-9-amd64")
        outcome = self.successResultOf(backend.execute(job, FakeJobContext(runner, job)))
        self.assertEqual((outcome.reboot_required, outcome.reboot_packages), (True, ("kernel",)))

    def test_status_fd_progress_during_apply(self) -> None:
        """Status-fd lines of the real command reach ctx.progress with package counts."""
        runner = ScriptedRunner()
        runner.on("-s", stdout=fixture("apt", "sim_install_sl.txt"))
        runner.on("-y", "install", fd3=("pmstatus:sl:40:Unpacking sl",))
        ctx, d = self.run_job(runner, make_job("install", "sl"))
        self.successResultOf(d)
        self.assertIn((57, "Unpacking sl (package 1 of 1)"), ctx.progress_reports)

    def test_remove_with_version_refused(self) -> None:
        """remove takes names only."""
        runner = ScriptedRunner()
        _ctx, d = self.run_job(runner, make_job("remove", "sl", versions={"sl": "1"}))
        self.failureResultOf(d, ValidationError)

    def test_security_only_elsewhere_refused(self) -> None:
        """security_only is a patch_apply option only."""
        runner = ScriptedRunner()
        _ctx, d = self.run_job(runner, make_job("install", "sl", security_only=True))
        self.failureResultOf(d, ValidationError)
