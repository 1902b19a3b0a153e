"""Live, read-only apt tests through the real ProcessRunner and the whole agent daemon (skipped
where apt is absent).

Nothing here changes the host: queries, and dry runs that run only ``apt-get -s``; each dry run
checks that ``dpkg-query`` reports exactly the same packages before and after.
"""

from __future__ import annotations

import shutil
import subprocess

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from lpa.agent.backends.apt import AptBackend
from lpa.agent.model import CommandResult
from lpa.errors import PackageNotFoundError, ValidationError
from lpa.events import COMPLETED
from tests.fakes_backends import FakeJobContext, make_job
from tests.test_agent_service import _DaemonCase


def _installed_packages() -> str:
    return subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package} ${Version} ${Status}\n"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


DPKG_QUERY = ["dpkg-query", "-W", "-f", "${Package} ${Version} ${db:Status-Abbrev}\\n"]


class AptLiveTests(TestCase):
    timeout = 240

    def setUp(self) -> None:
        if not (shutil.which("apt-get") and shutil.which("dpkg-query")):
            raise self.skipTest("apt is not installed here")
        from lpa.agent.process import ProcessRunner

        self.runner = ProcessRunner(reactor)
        self.backend = AptBackend(self.runner, reboot_marker="/nonexistent/reboot-required",
                                  modules_dir="/nonexistent")

    async def installed_state(self) -> str:
        result: CommandResult = await self.runner.run(DPKG_QUERY, timeout=60)
        self.assertEqual(result.exit_code, 0)
        return result.stdout

    async def test_list_packages(self) -> None:
        """list_packages matches what dpkg says is installed, apt itself included."""
        packages = await self.backend.list_packages()
        names = {p.name for p in packages}
        self.assertIn("apt", names)
        state = await self.installed_state()
        installed = {line.split()[0].split(":")[0] for line in state.splitlines()
                     if line.endswith(" ii ")}
        self.assertLessEqual(len(names ^ installed), len(installed) // 20,
                             sorted(names ^ installed)[:20])

    async def test_get_package(self) -> None:
        """get_package finds apt installed and refuses an unknown name."""
        package = await self.backend.get_package("apt")
        self.assertIn(package.status, ("Installed", "Upgradable"))
        self.assertTrue(package.version)
        with self.assertRaises(PackageNotFoundError):
            await self.backend.get_package("lpa-no-such-package-xyz")

    async def test_list_patches(self) -> None:
        """Patches have differing versions; security ones come from a -security suite."""
        patches = await self.backend.list_patches()
        for patch in patches:
            self.assertNotEqual(patch.current_version, patch.available_version)
            self.assertEqual(patch.security, "-security" in patch.source)

    async def test_dry_run_patch_apply_changes_nothing(self) -> None:
        """A dry-run apply of everything lists the pending upgrades and leaves dpkg untouched."""
        before = await self.installed_state()
        patches = await self.backend.list_patches()
        job = make_job("patch_apply", dry_run=True, allow_reboot=True)
        ctx = FakeJobContext(self.runner, job)
        outcome = await self.backend.execute(job, ctx)
        self.assertEqual(await self.installed_state(), before)
        changed = {c["name"] for c in outcome.changes}
        self.assertTrue({p.name for p in patches} <= changed,
                        "every upgradable package would change")
        self.assertFalse(outcome.reboot_required)
        self.assertIn("Dry run", outcome.message)

    async def test_dry_run_install_and_security(self) -> None:
        """Dry-run install of a missing package and a security-only dry run change nothing."""
        before = await self.installed_state()
        job = make_job("install", "sl", dry_run=True)
        outcome = await self.backend.execute(job, FakeJobContext(self.runner, job))
        if "sl " not in before:
            self.assertEqual([c["action"] for c in outcome.changes if c["name"] == "sl"],
                             ["install"])
        job = make_job("patch_apply", dry_run=True, security_only=True)
        outcome = await self.backend.execute(job, FakeJobContext(self.runner, job))
        security = {p.name for p in await self.backend.list_patches(security_only=True)}
        self.assertTrue(security <= {c["name"] for c in outcome.changes})
        self.assertEqual(len(outcome.changes) > 0, bool(security))
        self.assertEqual(await self.installed_state(), before)

    async def test_metacharacters_refused(self) -> None:
        """A name with shell metacharacters is refused before anything runs."""
        job = make_job("install", "sl;touch /tmp/lpa-pwned", dry_run=True)
        with self.assertRaises(ValidationError):
            await self.backend.execute(job, FakeJobContext(self.runner, job))


class AgentDaemonAptTests(_DaemonCase):
    """The same daemon over this machine's real apt, read-only and dry-run only."""

    def setUp(self) -> None:
        if not shutil.which("apt-get") or not shutil.which("dpkg-query"):
            raise self.skipTest("apt is not installed here")
        super().setUp()

    async def test_dry_run_apply_changes_nothing(self) -> None:
        """A dry-run apply is accepted, runs apt-get -s, ends completed, and dpkg is unchanged."""
        before = _installed_packages()
        await self._start()
        client = self._client()
        response = await client.post(self._url("/api/v1/patches/apply"), json={"dry_run": True})
        self.assertEqual(response.code, 202)
        job_id = (await self._json(response))["data"]["job_id"]
        detail = await self._wait_terminal(client, job_id)
        self.assertEqual(detail["status"], COMPLETED, detail.get("error"))
        self.assertTrue(detail["dry_run"])
        self.assertIsInstance(detail["changes"], list)
        for change in detail["changes"]:
            self.assertEqual(set(change) >= {"name", "action"}, True)
        self.assertEqual(_installed_packages(), before)
