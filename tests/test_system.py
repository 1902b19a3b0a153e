"""HostSystem: host facts from injected files and commands, and against this machine."""

from __future__ import annotations

import os
import platform
from typing import Any

from twisted.internet import reactor, task
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from lpa.agent.interfaces import ISystem
from lpa.agent.system import HostSystem, parse_os_release, parse_systemctl_show, reboot_argv_for
from lpa.errors import InvalidServiceNameError, ServiceNotFoundError, ServiceStatusError
from tests.fakes import FakeProcessRunner
from tests.fakes_backends import ScriptedRunner

OS_RELEASE = '''PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
VERSION="12 (bookworm)"
# a comment
ID=debian
'''

#: documented ``systemctl show --property=…`` output (systemd is not PID 1 on this machine)
CRON_SHOW = """Id=cron.service
Description=Regular background program processing daemon
LoadState=loaded
ActiveState=active
SubState=running
UnitFileState=enabled
MainPID=612
"""
MISSING_SHOW = """Id=nope.service
Description=nope.service
LoadState=not-found
ActiveState=inactive
SubState=dead
UnitFileState=
MainPID=0
"""

#: documented dnf-plugins-core output; the second is what Debian's dnf without the plugin prints
NEEDS_RESTARTING_YES = """Core libraries or services have been updated since boot-up:
  * kernel

Reboot is required to fully utilize these updates.
More information: https://access.redhat.com/solutions/27943
"""
NO_SUCH_COMMAND = "No such command: needs-restarting. Please use /usr/bin/dnf --help\n"


class FakeUname:
    sysname, release, machine = "Linux", "6.1.0-9-amd64", "x86_64"


class HostSystemFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.runner = ScriptedRunner()

    def path(self, name: str, content: str | None = None) -> str:
        path = os.path.join(self.directory, name)
        if content is not None:
            with open(path, "w") as target:
                target.write(content)
        return path

    def system(
        self, present: tuple[str, ...] = ("dpkg", "systemctl", "shutdown"), **kwargs: Any
    ) -> HostSystem:
        defaults: dict[str, Any] = {
            "boot_id_path": self.path("boot_id", "0f4e0c2a-1111-2222-3333-444455556666\n"),
            "uptime_path": self.path("uptime", "12345.67 24000.00\n"),
            "os_release_paths": (
                self.path("missing-os-release"), self.path("os-release", OS_RELEASE)
            ),
            "reboot_marker": self.path("reboot-required"),
            "modules_dir": self.path("modules"),
            "which": lambda name: f"/usr/bin/{name}" if name in present else None,
            "uname": FakeUname,
            "hostname": lambda: "host1",
        }
        defaults.update(kwargs)
        return HostSystem(self.runner, **defaults)

    def test_interface(self) -> None:
        """HostSystem implements ISystem."""
        verifyObject(ISystem, self.system())

    def test_files(self) -> None:
        """Boot id and uptime come from their files; unreadable files give "" and 0."""
        system = self.system()
        self.assertEqual(system.boot_id(), "0f4e0c2a-1111-2222-3333-444455556666")
        self.assertEqual(system.uptime_seconds(), 12345)
        broken = self.system(
            boot_id_path=self.path("nope"), uptime_path=self.path("garbage", "x y")
        )
        self.assertEqual((broken.boot_id(), broken.uptime_seconds()), ("", 0))

    def test_os_release(self) -> None:
        """os-release values lose their quotes; comments are skipped."""
        fields = parse_os_release(OS_RELEASE + 'X="say \\"hi\\""\n')
        self.assertEqual(
            (fields["NAME"], fields["VERSION_ID"], fields["ID"]),
            ("Debian GNU/Linux", "12", "debian"),
        )
        self.assertEqual(fields["X"], 'say "hi"')

    def test_system_info(self) -> None:
        """system_info carries the original's fields plus package_db_clean from dpkg --audit."""
        info = self.successResultOf(self.system().system_info())
        self.assertEqual(info["hostname"], "host1")
        self.assertEqual((info["os"], info["os_version"]), ("Debian GNU/Linux", "12"))
        self.assertEqual((info["kernel"], info["architecture"]), ("6.1.0-9-amd64", "x86_64"))
        self.assertEqual((info["last_update_check"], info["last_update_apply"]), (None, None))
        self.assertIs(info["pending_reboot"], False)
        self.assertIs(info["package_db_clean"], True)
        self.assertIn(("dpkg", "--audit"), self.runner.argvs)

    def test_command_facts_kept_for_a_while(self) -> None:
        """dpkg --audit runs once per facts_ttl however often system info is asked."""
        clock = task.Clock()
        system = self.system(clock=clock, facts_ttl=30)
        for _ in range(5):
            self.successResultOf(system.system_info())
            clock.advance(5)
        self.assertEqual(self.runner.argvs.count(("dpkg", "--audit")), 1)
        clock.advance(5)
        self.successResultOf(system.system_info())
        self.assertEqual(self.runner.argvs.count(("dpkg", "--audit")), 2)

    def test_command_facts_shared_by_concurrent_callers(self) -> None:
        """Concurrent system info calls share one dpkg --audit; pending_reboot is never cached."""
        runner = FakeProcessRunner()
        system = HostSystem(
            runner,
            reboot_marker=self.path("reboot-required"),
            modules_dir=self.path("modules"),
            which=lambda name: "/usr/bin/dpkg" if name == "dpkg" else None,
            clock=task.Clock(),
        )
        first, second = system.system_info(), system.system_info()
        self.assertEqual([c.argv for c in runner.calls], [("dpkg", "--audit")])
        runner.last.finish(0)
        self.assertIs(self.successResultOf(first)["package_db_clean"], True)
        self.assertIs(self.successResultOf(second)["package_db_clean"], True)
        self.path("reboot-required", "")
        self.assertEqual(self.successResultOf(system.pending_reboot()), (True, []))

    def test_package_db_dirty_or_unknown(self) -> None:
        """Audit output means not clean; without dpkg the answer is None."""
        self.runner.on(
            "dpkg", "--audit", stdout="The following packages are only half configured:\n"
        )
        self.assertIs(self.successResultOf(self.system().system_info())["package_db_clean"], False)
        info = self.successResultOf(self.system(present=("systemctl",)).system_info())
        self.assertIsNone(info["package_db_clean"])

    def test_service_status(self) -> None:
        """``systemctl show`` properties map to the original's service fields."""
        self.runner.on("systemctl", "show", stdout=CRON_SHOW)
        status = self.successResultOf(self.system().service_status("cron"))
        self.assertEqual(
            status,
            {
                "name": "cron.service",
                "display_name": "Regular background program processing daemon",
                "active_state": "active",
                "sub_state": "running",
                "load_state": "loaded",
                "enabled_state": "enabled",
                "main_pid": 612,
                "healthy": True,
            },
        )
        argv = self.runner.argvs[0]
        self.assertEqual(argv[:3], ("systemctl", "show", "--no-pager"))
        self.assertEqual(argv[-2:], ("--", "cron"))

    def test_service_not_found(self) -> None:
        """LoadState=not-found is SERVICE_NOT_FOUND."""
        self.runner.on("systemctl", stdout=MISSING_SHOW)
        self.failureResultOf(self.system().service_status("nope"), ServiceNotFoundError)

    def test_service_systemctl_fails(self) -> None:
        """systemctl failing (no systemd) is SERVICE_STATUS_ERROR."""
        self.runner.on(
            "systemctl",
            exit_code=1,
            stderr="System has not been booted with systemd as init system (PID 1). "
            "Can't operate.",
        )
        self.failureResultOf(self.system().service_status("cron"), ServiceStatusError)

    def test_service_bad_names(self) -> None:
        """Names with / or .. or metacharacters are refused before systemctl runs."""
        for name in ("a/b", "..", "a..b", "x;reboot", "", "-H"):
            self.failureResultOf(self.system().service_status(name), InvalidServiceNameError)
        self.assertEqual(self.runner.calls, [])

    def test_parse_systemctl_show(self) -> None:
        """Values may contain '='."""
        self.assertEqual(parse_systemctl_show("ExecStart=a=b\nbad line\n"), {"ExecStart": "a=b"})

    def test_reboot_argv(self) -> None:
        """systemctl reboot now, shutdown -r +ceil(delay/60) later, reboot on Alpine."""
        def full(name: str) -> str:
            return "/x"

        self.assertEqual(reboot_argv_for(0, which=full), ["systemctl", "reboot"])
        self.assertEqual(reboot_argv_for(1, which=full), ["shutdown", "-r", "+1"])
        self.assertEqual(reboot_argv_for(60, which=full), ["shutdown", "-r", "+1"])
        self.assertEqual(reboot_argv_for(61, which=full), ["shutdown", "-r", "+2"])
        def alpine(name: str) -> None:
            return None

        self.assertEqual(reboot_argv_for(0, which=alpine), ["reboot"])
        self.assertEqual(reboot_argv_for(120, which=alpine), ["reboot"])
        self.assertEqual(self.system().reboot_argv(300), ["shutdown", "-r", "+5"])

    def test_pending_reboot_marker(self) -> None:
        """The Debian marker and its package list win."""
        self.path("reboot-required", "*** System restart required ***\n")
        self.path("reboot-required.pkgs", "linux-image-amd64\n")
        self.assertEqual(
            self.successResultOf(self.system().pending_reboot()), (True, ["linux-image-amd64"])
        )

    def test_pending_reboot_needs_restarting(self) -> None:
        """On RHEL, ``dnf needs-restarting -r`` exit 1 with its message means a reboot is needed."""
        self.runner.on("needs-restarting", exit_code=1, stdout=NEEDS_RESTARTING_YES)
        system = self.system(present=("dnf",))
        self.assertEqual(self.successResultOf(system.pending_reboot()), (True, []))
        self.assertEqual(self.runner.argvs, [("dnf", "needs-restarting", "-r")])

    def test_needs_restarting_missing_plugin(self) -> None:
        """dnf without the plugin (exit 1, "No such command", seen on this host) is no verdict."""
        self.runner.on("needs-restarting", exit_code=1, stderr=NO_SUCH_COMMAND)
        system = self.system(present=("dnf",))
        self.assertEqual(self.successResultOf(system.pending_reboot()), (False, []))

    def test_pending_reboot_kernel_fallback(self) -> None:
        """Elsewhere a newer installed kernel than the running one means reboot."""
        for release in ("6.1.0-9-amd64", "6.1.0-10-amd64"):
            os.makedirs(os.path.join(self.path("modules"), release))
        self.assertEqual(
            self.successResultOf(self.system(present=()).pending_reboot()), (True, ["kernel"])
        )
        self.assertEqual(self.runner.calls, [])


class HostSystemLiveTests(TestCase):
    """Against this machine, through the real ProcessRunner."""

    def setUp(self) -> None:
        from lpa.agent.process import ProcessRunner

        self.system = HostSystem(ProcessRunner(reactor))

    def test_boot_id_and_uptime(self) -> None:
        """The boot id is this kernel's and uptime is positive."""
        if not os.path.exists("/proc/sys/kernel/random/boot_id"):
            raise self.skipTest("no /proc boot id")
        with open("/proc/sys/kernel/random/boot_id") as source:
            self.assertEqual(self.system.boot_id(), source.read().strip())
        self.assertGreater(self.system.uptime_seconds(), 0)

    async def test_system_info(self) -> None:
        """system_info reads this host's os-release and uname."""
        info = await self.system.system_info()
        self.assertEqual(info["kernel"], platform.release())
        self.assertEqual(info["architecture"], platform.machine())
        with open("/etc/os-release") as source:
            release = parse_os_release(source.read())
        self.assertEqual(info["os"], release.get("NAME"))
        self.assertIn(info["package_db_clean"], (True, False, None))
