"""Job error codes follow the original's keyword rules and their order."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from lpa.agent.classify import classify, error_chain
from lpa.agent.model import CommandResult
from lpa.errors import (
    CommandFailedError,
    CommandNotFoundError,
    CommandTimedOutError,
    JobCancelledError,
)


def failed(
    stderr: str, message: str = "Command failed (exit 100): apt-get install -- x"
) -> CommandFailedError:
    return CommandFailedError(
        message, CommandResult(argv=("apt-get",), exit_code=100, stdout="", stderr=stderr)
    )


class ClassifyTests(SynchronousTestCase):
    def test_keyword_rules(self) -> None:
        """Each keyword family maps to its code."""
        cases = {
            "W: GPG error: http://deb NO_PUBKEY 1234": "GPG_ERROR",
            "The following signatures were invalid": "GPG_ERROR",
            "E: Unable to locate package nosuch": "PKG_NOT_FOUND",
            "Error: Unable to find a match / No match for argument: nosuch": "PKG_NOT_FOUND",
            "error: target not found: nosuch": "PKG_NOT_FOUND",
            "E: Failed to fetch http://deb/x.deb  404  Not Found": "NETWORK_ERROR",
            "Temporary failure resolving 'deb.debian.org'": "NETWORK_ERROR",
            "E: Unmet dependencies. Try 'apt --fix-broken install'": "DEPENDENCY_CONFLICT",
            "E: Error, pkgProblemResolver::Resolve generated breaks, held broken packages.":
                "DEPENDENCY_CONFLICT",
            "E: Could not open lock file /var/lib/dpkg/lock-frontend"
            " - open (13: Permission denied)": "PERMISSION_DENIED",
            "Failed to start reboot.target": "REBOOT_ERROR",
            "something odd": "PKG_MANAGER_ERROR",
        }
        for stderr, code in cases.items():
            self.assertEqual(classify(failed(stderr)), code, stderr)

    def test_order(self) -> None:
        """Timeout wins over output; GPG over network; a missing package over "not found"."""
        timed_out = CommandTimedOutError(
            "Command timed out after 5s: apt-get",
            CommandResult(argv=("apt-get",), exit_code=None, stdout="", stderr="404 gpg",
                          timed_out=True),
        )
        self.assertEqual(classify(timed_out), "TIMEOUT")
        self.assertEqual(classify(failed("GPG error ... 404 Not Found")), "GPG_ERROR")
        self.assertEqual(
            classify(failed("E: Unable to locate package x (404 not found)")), "PKG_NOT_FOUND"
        )
        self.assertEqual(classify(failed("404 Not Found, conflict")), "NETWORK_ERROR")

    def test_spawn_failures(self) -> None:
        """A program that cannot start is COMMAND_NOT_FOUND or PERMISSION_DENIED."""
        self.assertEqual(
            classify(CommandNotFoundError("cannot run apt-get: command not found")),
            "COMMAND_NOT_FOUND",
        )
        self.assertEqual(
            classify(CommandNotFoundError("cannot run /x: Permission denied")), "PERMISSION_DENIED"
        )

    def test_non_command_errors(self) -> None:
        """Errors outside the command family are UNKNOWN_ERROR unless a keyword matches."""
        self.assertEqual(classify(RuntimeError("boom")), "UNKNOWN_ERROR")
        self.assertEqual(classify(JobCancelledError("x")), "UNKNOWN_ERROR")
        self.assertEqual(classify(RuntimeError("cache refresh failed")), "CACHE_REFRESH_ERROR")

    def test_cause_chain_is_searched_and_reported(self) -> None:
        """Keywords in a cause count; error_chain lists the causes like the original."""
        try:
            try:
                raise failed("E: Unable to locate package zz")
            except CommandFailedError as inner:
                raise RuntimeError("install failed") from inner
        except RuntimeError as outer:
            error = outer
        self.assertEqual(classify(error), "PKG_NOT_FOUND")
        self.assertEqual(
            error_chain(error),
            "install failed\n\nCaused by:\n    0: Command failed (exit 100): apt-get install -- x",
        )
