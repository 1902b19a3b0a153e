"""Backend selection and the shared helpers: request checks, reboot hints, kernel comparison."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from lpa.agent import backends
from lpa.agent.backends import base
from lpa.agent.interfaces import IPackageBackend
from lpa.agent.model import PackageSpec
from lpa.errors import ConfigError, ValidationError
from tests.fakes_backends import FakeJobContext, ScriptedRunner, make_job


def which_of(*present: str):  # type: ignore[no-untyped-def]
    return lambda name: f"/usr/bin/{name}" if name in present else None


class DetectionTests(SynchronousTestCase):
    def test_auto_order(self) -> None:
        """auto picks the first of apt, dnf, yum, zypper, apk, pacman that is installed."""
        self.assertEqual(backends.detect_backend("auto", which=which_of("apt-get", "dnf")), "apt")
        self.assertEqual(backends.detect_backend("auto", which=which_of("yum", "dnf")), "dnf")
        self.assertEqual(backends.detect_backend("auto", which=which_of("pacman", "zypper")),
                         "zypper")
        self.assertEqual(backends.detect_backend("auto", which=which_of("pacman", "apk")), "apk")

    def test_auto_nothing_found(self) -> None:
        """auto with no manager is a one-line ConfigError naming the key."""
        error = self.assertRaises(ConfigError, backends.detect_backend, "auto", which=which_of())
        self.assertIn("package_manager.backend", str(error))

    def test_explicit_missing_or_unknown(self) -> None:
        """An explicit backend that is not installed, or unknown, is a clear ConfigError."""
        error = self.assertRaises(ConfigError, backends.detect_backend, "dnf",
                                  which=which_of("apt-get"))
        self.assertIn("dnf was chosen but dnf is not installed", str(error))
        error = self.assertRaises(ConfigError, backends.detect_backend, "brew",
                                  which=which_of("apt-get"))
        self.assertIn("unknown backend", str(error))
        self.assertEqual(backends.detect_backend("Pacman", which=which_of("pacman")), "pacman")

    def test_make_backend(self) -> None:
        """make_backend builds the detected class with the timeouts and lock timeout given."""
        runner = ScriptedRunner()
        built = backends.make_backend("auto", runner, which=which_of("apt-get"), lock_timeout=42,
                                      timeouts=base.Timeouts(refresh=1, package=2, quick=3))
        self.assertIsInstance(built, backends.AptBackend)
        assert isinstance(built, backends.AptBackend)
        self.assertIn("DPkg::Lock::Timeout=42", built.apt_get("install"))
        for name, cls in backends.BACKENDS.items():
            instance = backends.make_backend(name, runner, which=lambda _: "/x")
            self.assertIsInstance(instance, cls)
            self.assertEqual(instance.name, name)
            verifyObject(IPackageBackend, instance)

    def test_timeouts_reach_commands(self) -> None:
        """The configured per-command timeouts are the ones commands run with."""
        runner = ScriptedRunner()
        built = backends.make_backend("dnf", runner, which=lambda _: "/x",
                                      reboot_marker="/nonexistent", modules_dir="/nonexistent",
                                      timeouts=base.Timeouts(refresh=11, package=22, quick=33))
        job = make_job("install", "a")
        self.successResultOf(built.execute(job, FakeJobContext(runner, job)))
        timeouts = {call.argv[1] if call.argv[0] == "dnf" else call.argv[0]: call.timeout
                    for call in runner.calls}
        self.assertEqual(timeouts["install"], 22)
        self.assertEqual(timeouts["needs-restarting"], 33)
        self.successResultOf(built.list_patches())
        check = [call for call in runner.calls if "check-update" in call.argv]
        self.assertEqual(check[0].timeout, 11)


class HelperTests(SynchronousTestCase):
    def test_checked_specs(self) -> None:
        """None means all, [] is refused (bug 24), bad names and versions are refused."""
        self.assertIsNone(base.checked_specs(None))
        self.assertRaises(ValidationError, base.checked_specs, [])
        self.assertRaises(ValidationError, base.checked_specs,
                          [PackageSpec("ok"), PackageSpec("`id`")])
        self.assertRaises(ValidationError, base.checked_specs, [PackageSpec("ok", "1 2")])
        self.assertEqual(base.checked_specs([PackageSpec("a", "1:2.0~rc1")]),
                         (PackageSpec("a", "1:2.0~rc1"),))

    def test_unknown_operation_refused(self) -> None:
        """A backend refuses operations it does not run (reboot is the engine's)."""
        runner = ScriptedRunner()
        job = make_job("reboot")
        backend = backends.make_backend("apk", runner, which=lambda _: "/x")
        self.failureResultOf(backend.execute(job, FakeJobContext(runner, job)), ValidationError)
        job = make_job("install")
        self.failureResultOf(backend.execute(job, FakeJobContext(runner, job)), ValidationError)
        self.assertEqual(runner.calls, [])

    def test_reboot_names(self) -> None:
        """The conservative reboot list matches kernels, libc, systemd, openssl, microcode."""
        for name in ("linux-image-6.1.0-28-amd64", "kernel-core", "glibc", "libc6", "systemd",
                     "dbus", "openssl", "libssl3", "intel-microcode"):
            self.assertTrue(base.package_requires_reboot(name), name)
        for name in ("bash", "curl", "vim"):
            self.assertFalse(base.package_requires_reboot(name), name)

    def test_name_severity(self) -> None:
        """The original's heuristic: kernel/ssl/security critical, lib high, else medium."""
        self.assertEqual(base.name_severity("kernel"), "critical")
        self.assertEqual(base.name_severity("libfoo"), "high")
        self.assertEqual(base.name_severity("bash"), "medium")

    def test_reboot_marker(self) -> None:
        """The marker file and its .pkgs list; a missing marker means no reboot."""
        directory = self.mktemp()
        os.makedirs(directory)
        marker = os.path.join(directory, "reboot-required")
        self.assertEqual(base.read_reboot_marker(marker), (False, []))
        open(marker, "w").close()
        self.assertEqual(base.read_reboot_marker(marker), (True, []))
        with open(marker + ".pkgs", "w") as pkgs:
            pkgs.write("linux-image-amd64\n\nlibc6\nlinux-image-amd64\n")
        self.assertEqual(base.read_reboot_marker(marker), (True, ["linux-image-amd64", "libc6"]))

    def test_newer_kernel(self) -> None:
        """A newer kernel in the modules directory means reboot; unknown running kernel does not."""
        directory = self.mktemp()
        for release in ("6.1.0-9-amd64", "6.1.0-10-amd64"):
            os.makedirs(os.path.join(directory, release))
        self.assertTrue(base.newer_kernel_installed("6.1.0-9-amd64", directory))
        self.assertFalse(base.newer_kernel_installed("6.1.0-10-amd64", directory))
        self.assertFalse(base.newer_kernel_installed("6.18.44-custom", directory))
        self.assertFalse(base.newer_kernel_installed("6.1.0-9-amd64", directory + "-missing"))

    def test_dry_run_never_requests_reboot(self) -> None:
        """A dry run that would touch the kernel says so but never sets reboot_required."""
        runner = ScriptedRunner()
        runner.on("-s", stdout="Inst linux-image-amd64 [1] (2 Debian:12/oldstable [amd64])\n")
        job = make_job("patch_apply", dry_run=True, allow_reboot=True)
        backend = backends.make_backend("apt", runner, which=lambda _: "/x")
        outcome = self.successResultOf(backend.execute(job, FakeJobContext(runner, job)))
        self.assertFalse(outcome.reboot_required)
        self.assertIn("reboot would be needed for linux-image-amd64", outcome.message)


#: options that would bypass signature checks or clobber files: never in any argv
FORBIDDEN = {"--allow-unauthenticated", "--nogpgcheck", "--no-gpg-checks", "--allow-untrusted",
             "--overwrite", "--force"}


def is_mutation(backend: str, argv: tuple[str, ...]) -> bool:
    """Whether ``argv`` could change the host (what a dry run must never run)."""
    if backend == "apt":
        return ((argv[0] == "apt-get" and ("-y" in argv or "update" in argv))
                or argv[:2] == ("dpkg", "--configure"))
    if backend in ("dnf", "yum"):
        return "-y" in argv or "makecache" in argv
    if backend == "zypper":
        return (any(v in argv for v in ("install", "update", "remove", "patch", "refresh"))
                and "--dry-run" not in argv)
    if backend == "apk":
        return (any(v in argv for v in ("add", "upgrade", "del", "update"))
                and "--simulate" not in argv)
    return any(op in argv for op in ("-S", "-R", "-Syu", "-Su")) and "--print" not in argv


class ArgvMatrixTests(SynchronousTestCase):
    """Every backend × operation × dry run: names after ``--``, no unsafe options, dry runs
    inert."""

    def run_everything(self, name: str, dry_run: bool) -> list[tuple[str, ...]]:
        argvs: list[tuple[str, ...]] = []
        for operation, packages in (("install", ("pkga", "pkgb")), ("update", ("pkga",)),
                                    ("remove", ("pkga",)), ("patch_apply", ("pkga", "pkgb")),
                                    ("patch_apply", ())):
            runner = ScriptedRunner()
            backend = backends.make_backend(name, runner, which=lambda _: "/x",
                                            reboot_marker="/nonexistent",
                                            modules_dir="/nonexistent")
            job = make_job(operation, *packages, dry_run=dry_run, force=True, no_recommends=True)
            self.successResultOf(backend.execute(job, FakeJobContext(runner, job)))
            self.assertTrue(runner.calls, f"{name} {operation} ran nothing")
            argvs += runner.argvs
        return argvs

    def test_names_after_double_dash_and_no_unsafe_options(self) -> None:
        """User-supplied names always follow ``--``; no signature bypass or overwrite options."""
        for name in backends.BACKENDS:
            for dry_run in (False, True):
                for argv in self.run_everything(name, dry_run):
                    self.assertFalse(FORBIDDEN & set(argv), (name, argv))
                    positions = [i for i, a in enumerate(argv) if a.startswith(("pkga", "pkgb"))]
                    if positions:
                        self.assertIn("--", argv, (name, argv))
                        self.assertLess(argv.index("--"), min(positions), (name, argv))

    def test_dry_runs_run_no_mutation(self) -> None:
        """A dry run never runs a command that could change the host, on any backend."""
        for name in backends.BACKENDS:
            argvs = self.run_everything(name, dry_run=True)
            self.assertEqual([a for a in argvs if is_mutation(name, a)], [], name)
            real = self.run_everything(name, dry_run=False)
            self.assertTrue([a for a in real if is_mutation(name, a)], name)
