"""apk backend: parsers on documented-format outputs (apk-tools is not packaged for Debian)."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from lpa.agent.backends import apk
from lpa.agent.backends.apk import ApkBackend
from lpa.agent.interfaces import IPackageBackend
from lpa.errors import PackageNotFoundError, ValidationError
from tests.fakes_backends import FakeJobContext, ScriptedRunner, fixture, make_job


def scripted() -> ScriptedRunner:
    runner = ScriptedRunner()
    runner.on("--installed", stdout=fixture("apk", "list_installed.txt"))
    runner.on("--upgradable", stdout=fixture("apk", "list_upgradable.txt"))
    return runner


class ApkParserTests(SynchronousTestCase):
    def test_lists(self) -> None:
        """``apk list`` lines split name and version (names may hold dashes and underscores)."""
        installed = {e.name: e for e in apk.parse_apk_list(fixture("apk", "list_installed.txt"))}
        self.assertEqual(installed["ssl_client"].version, "1.36.1-r5")
        self.assertEqual(installed["libcrypto3"].version, "3.1.4-r1")
        self.assertTrue(all(e.installed for e in installed.values()))
        upgradable = {e.name: e for e in apk.parse_apk_list(fixture("apk", "list_upgradable.txt"))}
        self.assertEqual((upgradable["busybox"].version, upgradable["busybox"].upgradable_from),
                         ("1.36.1-r7", "1.36.1-r5"))
        available = apk.parse_apk_list(fixture("apk", "list_curl.txt"))
        self.assertEqual([(e.name, e.installed) for e in available],
                         [("curl", False), ("curl-doc", False)])

    def test_steps(self) -> None:
        """``(i/n) Verb name (versions)`` lines become changes."""
        self.assertEqual(
            apk.parse_apk_steps(fixture("apk", "upgrade_simulate.txt")),
            [
                {"name": "busybox", "from": "1.36.1-r5", "to": "1.36.1-r7", "action": "upgrade"},
                {"name": "libcrypto3", "from": "3.1.4-r1", "to": "3.1.4-r5", "action": "upgrade"},
            ],
        )
        self.assertEqual(apk.parse_apk_steps(fixture("apk", "add_simulate.txt"))[-1],
                         {"name": "curl", "from": None, "to": "8.5.0-r0", "action": "install"})
        self.assertEqual(apk.parse_apk_steps(fixture("apk", "del_simulate.txt")),
                         [{"name": "curl", "from": "8.5.0-r0", "to": None, "action": "remove"}])


class ApkBackendTests(SynchronousTestCase):
    def test_interface(self) -> None:
        """ApkBackend implements IPackageBackend."""
        verifyObject(IPackageBackend, ApkBackend(ScriptedRunner()))

    def test_packages_and_patches(self) -> None:
        """Installed packages join the upgradable list; patches use the name heuristic."""
        packages = {p.name: p for p in self.successResultOf(ApkBackend(scripted()).list_packages())}
        self.assertEqual((packages["busybox"].status, packages["busybox"].latest_version),
                         ("Upgradable", "1.36.1-r7"))
        self.assertEqual(packages["musl"].status, "Installed")
        patches = {p.name: p for p in self.successResultOf(ApkBackend(scripted()).list_patches())}
        self.assertEqual(patches["libcrypto3"].current_version, "3.1.4-r1")
        self.assertFalse(patches["libcrypto3"].security)

    def test_get_package(self) -> None:
        """A package not installed is Available if ``apk list NAME`` knows it, else not found."""
        runner = ScriptedRunner()
        runner.on("--installed", stdout="")
        runner.on("apk", "list", "curl", stdout=fixture("apk", "list_curl.txt"))
        package = self.successResultOf(ApkBackend(runner).get_package("curl"))
        self.assertEqual((package.status, package.version), ("Available", "8.5.0-r0"))
        self.failureResultOf(ApkBackend(ScriptedRunner()).get_package("nopkg"),
                             PackageNotFoundError)

    def test_execute_argv(self) -> None:
        """Dry runs add --simulate; pins are name=version after --; real apply updates first."""
        runner = ScriptedRunner()
        runner.on("add", stdout=fixture("apk", "add_simulate.txt"))
        job = make_job("install", "curl", versions={"curl": "8.5.0-r0"}, dry_run=True)
        outcome = self.successResultOf(ApkBackend(runner).execute(job, FakeJobContext(runner, job)))
        self.assertEqual(runner.argvs, [("apk", "add", "--simulate", "--", "curl=8.5.0-r0")])
        self.assertEqual(len(outcome.changes), 3)
        runner = ScriptedRunner()
        job = make_job("patch_apply")
        backend = ApkBackend(runner, reboot_marker="/nonexistent", modules_dir="/nonexistent")
        self.successResultOf(backend.execute(job, FakeJobContext(runner, job)))
        self.assertEqual(runner.argvs, [("apk", "update"), ("apk", "upgrade")])

    def test_security_only_refused(self) -> None:
        """apk has no security notion: security_only is refused with a clear message."""
        runner = ScriptedRunner()
        job = make_job("patch_apply", security_only=True)
        failure = self.failureResultOf(ApkBackend(runner).execute(job, FakeJobContext(runner, job)),
                                       ValidationError)
        self.assertEqual(failure.value.message, "security_only is not supported by apk")
        self.assertEqual(runner.calls, [])
