"""Host commands' argv and stderr stay on the host: logged with the request id, never answered.

The real apt backend and the real HostSystem run over a scripted process runner whose failing
commands print a marker on stderr; every synchronous endpoint that runs a host command is asked,
and the marker, the command line and the binary's path must be absent from the answer and present
in one warn line carrying the answer's request id.
"""

from __future__ import annotations

from twisted.internet.defer import fail
from twisted.logger import formatEvent

from lpa.agent.backends.apt import AptBackend
from lpa.agent.cache import PatchCache
from lpa.agent.model import CommandResult
from lpa.agent.system import HostSystem
from lpa.errors import CommandFailedError, PackageManagerError
from tests.api_helpers import ApiTestCase, Reply
from tests.fakes_backends import ScriptedRunner
from tests.logcheck import capture_events

SECRET = "E: /var/lib/dpkg/secret-marker is locked by pid 4242"


class HostCommandEchoTests(ApiTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.events = capture_events(self)
        self.runner = ScriptedRunner()
        self.runner.on("apt", exit_code=100, stderr=f"W: something\n{SECRET}")
        self.runner.on("apt-cache", exit_code=100, stderr=SECRET)
        self.runner.on("systemctl", exit_code=1, stderr=f"Failed to connect to bus: {SECRET}")
        backend = AptBackend(
            self.runner, reboot_marker="/nonexistent/reboot-required", modules_dir="/nonexistent"
        )
        self.host = HostSystem(self.runner, which=lambda name: f"/usr/bin/{name}")
        self.cache = PatchCache(self.clock, backend, stale_threshold_secs=3600)
        self.build(backend=backend, system=self.host)

    def assertHidden(self, reply: Reply, status: int, code: str) -> None:
        """The answer names the failure only; the log line has the rest and the request id."""
        self.assertError(reply, status, code)
        text = str(reply.body)
        for leaked in ("secret", "4242", "apt", "dpkg", "systemctl", "/usr/bin", "argv", "stderr"):
            self.assertNotIn(leaked, text)
        request_id = reply.body["request_id"]
        lines = [e for e in self.events if e.get("request_id") == request_id]
        self.assertEqual(len(lines), 1, [formatEvent(e) for e in self.events])
        line = lines[0]
        self.assertEqual(line["log_level"].name, "warn")
        self.assertIn(SECRET, formatEvent(line))
        self.assertIn(request_id, formatEvent(line))
        self.assertTrue(line["argv"])
        self.assertIn(SECRET, line["stderr"][-1])

    def test_packages(self) -> None:
        """GET /packages with a failing apt: 500 PKG_MANAGER_ERROR without argv or stderr."""
        self.assertHidden(self.call("GET", "/api/v1/packages"), 500, "PKG_MANAGER_ERROR")

    def test_one_package(self) -> None:
        """GET /packages/{name} with a failing apt-cache: no argv or stderr either."""
        self.assertHidden(self.call("GET", "/api/v1/packages/vim"), 500, "PKG_MANAGER_ERROR")

    def test_patches(self) -> None:
        """GET /patches through the patch cache: no argv or stderr either."""
        self.assertHidden(self.call("GET", "/api/v1/patches"), 500, "PKG_MANAGER_ERROR")

    def test_service_status(self) -> None:
        """GET /system/services/{name} with a failing systemctl: 500 without its stderr."""
        self.assertHidden(
            self.call("GET", "/api/v1/system/services/ssh.service"), 500, "SERVICE_STATUS_ERROR"
        )

    def test_system_info(self) -> None:
        """GET /system/info when a host command fails: 500 without its output."""
        result = CommandResult(argv=("dpkg", "--audit"), exit_code=2, stdout="", stderr=SECRET)
        failed = CommandFailedError("dpkg --audit exited with status 2", result)
        self.patch(self.host, "system_info", lambda: fail(failed))
        self.assertHidden(self.call("GET", "/api/v1/system/info"), 500, "SYSTEM_INFO_ERROR")


class RunReadTests(ApiTestCase):
    def test_error_carries_command_as_cause(self) -> None:
        """A failed read-only query names only its kind; argv and stderr are its cause's."""
        runner = ScriptedRunner()
        runner.on("apt", exit_code=100, stderr=SECRET)
        backend = AptBackend(runner, reboot_marker="/x", modules_dir="/x")
        error = self.failureResultOf(backend.list_packages(), PackageManagerError).value
        self.assertEqual(
            (error.message, error.details), ("The package manager query failed", {"exit_code": 100})
        )
        self.assertIsInstance(error.__cause__, CommandFailedError)
        self.assertIn("apt", error.__cause__.message)
        self.assertEqual(error.__cause__.log_fields()["stderr"], [SECRET])
