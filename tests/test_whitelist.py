"""The IP whitelist: IPv4 and IPv6, hostnames through the resolver, failing closed."""

from __future__ import annotations

import os
from collections.abc import Sequence

from twisted.logger import LogEvent, LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from lpa.agent.whitelist import IPWhitelist, system_resolver


class _Resolver:
    """A resolver answering from a dict; unknown names raise like getaddrinfo."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.asked: list[str] = []

    def __call__(self, name: str) -> list[str]:
        self.asked.append(name)
        if name not in self.table:
            raise OSError(-2, "Name or service not known")
        return self.table[name]


class WhitelistTests(SynchronousTestCase):
    """IPWhitelist.from_file, allows and reload."""

    def setUp(self) -> None:
        self.path = self.mktemp()
        self.resolver = _Resolver({"host.internal": ["10.9.9.9", "fd00::9"]})

    def write(self, text: str) -> None:
        with open(self.path, "w") as f:
            f.write(text)

    def load(self) -> IPWhitelist:
        return IPWhitelist.from_file(self.path, resolver=self.resolver)

    def test_original_format(self) -> None:
        """Addresses, CIDR blocks and hostnames of the original's file are allowed."""
        self.write('entries: ["192.168.1.0/24", "10.0.0.5", "host.internal"]\n')
        wl = self.load()
        for ip in ("192.168.1.1", "192.168.1.254", "10.0.0.5", "10.9.9.9", "fd00::9"):
            self.assertTrue(wl.allows(ip), ip)
        for ip in ("192.168.2.1", "10.0.0.6", "fd00::8", "::1"):
            self.assertFalse(wl.allows(ip), ip)
        self.assertEqual(self.resolver.asked, ["host.internal"])

    def test_ipv6(self) -> None:
        """IPv6 addresses and blocks work (the original denied every IPv6 peer)."""
        self.write("entries: ['2001:db8::/32', '::1']\n")
        wl = self.load()
        self.assertTrue(wl.allows("2001:db8::42"))
        self.assertTrue(wl.allows("::1"))
        self.assertTrue(wl.allows("fe80::1%eth0") is False)
        self.assertFalse(wl.allows("2001:db9::1"))
        self.assertFalse(wl.allows("127.0.0.1"))

    def test_ipv4_mapped(self) -> None:
        """An IPv4-mapped IPv6 peer (dual-stack socket) is checked as its IPv4 address."""
        self.write("entries: ['10.0.0.0/8']\n")
        wl = self.load()
        self.assertTrue(wl.allows("::ffff:10.1.2.3"))
        self.assertFalse(wl.allows("::ffff:11.1.2.3"))

    def test_garbage_peer(self) -> None:
        """A peer address that does not parse is denied."""
        self.write("entries: ['0.0.0.0/0', '::/0']\n")
        wl = self.load()
        self.assertTrue(wl.allows("8.8.8.8"))
        self.assertFalse(wl.allows("not-an-ip"))
        self.assertFalse(wl.allows(""))

    def test_unresolvable_hostname_skipped(self) -> None:
        """A hostname that does not resolve is skipped with a warning; the rest still applies."""
        self.write("entries: ['gone.internal', '10.0.0.5']\n")
        with capturedLogs() as events:
            wl = self.load()
        self.assertIsNone(wl.deny_reason)
        self.assertTrue(wl.allows("10.0.0.5"))
        self.assertTrue(any("gone.internal" in str(e.get("problem")) for e in events))

    def assertDeniesAll(
        self, wl: IPWhitelist, events: Sequence[LogEvent], fragment: str
    ) -> None:
        self.assertIsNotNone(wl.deny_reason)
        self.assertIn(fragment, wl.deny_reason)
        self.assertFalse(wl.allows("10.0.0.5"))
        self.assertFalse(wl.allows("127.0.0.1"))
        self.assertTrue(any(e["log_level"] == LogLevel.error for e in events))

    def test_missing_file_denies_all(self) -> None:
        """A missing file denies every address and logs an error (fail closed)."""
        with capturedLogs() as events:
            wl = self.load()
        self.assertDeniesAll(wl, events, "not found")

    def test_unreadable_file_denies_all(self) -> None:
        """An unreadable path denies every address."""
        os.mkdir(self.path)
        with capturedLogs() as events:
            wl = self.load()
        self.assertDeniesAll(wl, events, "cannot read")

    def test_invalid_files_deny_all(self) -> None:
        """Bad YAML, a wrong shape or an invalid entry deny every address."""
        for text, fragment in (
            ("entries: [10.0.0.5\n", "invalid YAML"),
            ("- 10.0.0.5\n", "mapping"),
            ("entries: 10.0.0.5\n", "list"),
            ("entires: ['10.0.0.5']\n", "unknown key entires"),
            ("entries: ['10.0.0.5/33']\n", "10.0.0.5/33"),
            ("entries: ['300.1.1.1']\n", "300.1.1.1"),
            ("entries: ['bad host!']\n", "bad host!"),
            ("entries: [5]\n", "5"),
        ):
            self.write(text)
            with capturedLogs() as events:
                wl = self.load()
            self.assertDeniesAll(wl, events, fragment)

    def test_empty_entries_allow_nobody(self) -> None:
        """An empty list is a whitelist of nobody (warned), not 'everyone'."""
        self.write("entries: []\n")
        wl = self.load()
        self.assertIsNone(wl.deny_reason)
        self.assertFalse(wl.allows("127.0.0.1"))

    def test_reload(self) -> None:
        """reload() applies a changed file, and a broken one makes it deny all until fixed."""
        self.write("entries: ['10.0.0.5']\n")
        wl = self.load()
        self.assertTrue(wl.allows("10.0.0.5"))
        self.write("entries: ['10.0.0.6']\n")
        self.assertTrue(wl.reload())
        self.assertFalse(wl.allows("10.0.0.5"))
        self.assertTrue(wl.allows("10.0.0.6"))
        self.write("entries: [\n")
        with capturedLogs():
            self.assertFalse(wl.reload())
        self.assertFalse(wl.allows("10.0.0.6"))
        self.write("entries: ['10.0.0.6']\n")
        self.assertTrue(wl.reload())
        self.assertTrue(wl.allows("10.0.0.6"))

    def test_deny_all(self) -> None:
        """IPWhitelist.deny_all refuses everything and keeps its reason."""
        wl = IPWhitelist.deny_all("because")
        self.assertEqual(wl.deny_reason, "because")
        self.assertFalse(wl.allows("127.0.0.1"))

    def test_system_resolver_localhost(self) -> None:
        """The production resolver returns addresses without zone suffixes."""
        addresses = system_resolver("localhost")
        self.assertIn("127.0.0.1", addresses)
        self.assertTrue(all("%" not in a for a in addresses))
