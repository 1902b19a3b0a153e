"""make_peer_check: the IP whitelist and the client-certificate allowlist, answered with 403."""

from __future__ import annotations

from typing import Any

from lpa.agent.http.api import make_peer_check
from lpa.agent.whitelist import IPWhitelist
from lpa.tls import PeerIdentity, identity_allowed
from tests.api_helpers import ApiTestCase


class _Whitelist:
    def __init__(self, *allowed: str) -> None:
        self.allowed = set(allowed)
        self.asked: list[str] = []

    def allows(self, ip: str) -> bool:
        self.asked.append(ip)
        return ip in self.allowed


class PeerCheckTests(ApiTestCase):
    def use(self, whitelist: Any, allowed_clients: list[str], identity: Any = None) -> None:
        self.identity = identity
        self.build(
            peer_check=make_peer_check(
                whitelist, allowed_clients, lambda request: self.identity, identity_allowed
            )
        )

    def test_whitelisted_ip_allowed(self) -> None:
        """A peer whose IP is whitelisted is served; the check sees the peer's address."""
        whitelist = _Whitelist("127.0.0.1")
        self.use(whitelist, [])
        self.assertEqual(self.call("GET", "/api/v1/jobs").code, 200)
        self.assertEqual(whitelist.asked, ["127.0.0.1"])

    def test_ip_not_whitelisted(self) -> None:
        """A peer outside the whitelist is 403 FORBIDDEN in the envelope, even on /health."""
        self.use(_Whitelist("10.0.0.1"), [])
        for path in ("/health", "/api/v1/jobs", "/nowhere"):
            self.assertError(self.call("GET", path), 403, "FORBIDDEN")

    def test_real_whitelist_failing_closed(self) -> None:
        """An unloadable whitelist (deny-all) refuses every peer."""
        self.use(IPWhitelist.deny_all("file unreadable"), [])
        self.assertError(self.call("POST", "/api/v1/patches/apply", {}), 403, "FORBIDDEN")
        self.assertEqual(self.jobs.submitted, [])

    def test_allowed_client_identity(self) -> None:
        """A certificate whose CN or SAN is in auth.allowed_clients is served."""
        self.use(None, ["relay.example"], PeerIdentity("other", dns_names=("relay.example",)))
        self.assertEqual(self.call("GET", "/api/v1/jobs").code, 200)
        self.identity = PeerIdentity("relay.example")
        self.assertEqual(self.call("GET", "/api/v1/jobs").code, 200)

    def test_client_not_allowed(self) -> None:
        """Another client of the same CA, or no identity at all, is 403 and nothing runs."""
        self.use(None, ["relay.example"], PeerIdentity("intruder.example"))
        reply = self.call("PUT", "/api/v1/packages/vim")
        self.assertError(reply, 403, "FORBIDDEN")
        self.identity = None
        self.assertError(self.call("PUT", "/api/v1/packages/vim"), 403, "FORBIDDEN")
        self.assertEqual(self.jobs.submitted, [])

    def test_empty_allowlist_allows_any_client(self) -> None:
        """Without auth.allowed_clients any client the CA vouches for is served."""
        self.use(None, [], PeerIdentity("anyone"))
        self.assertEqual(self.call("GET", "/api/v1/jobs").code, 200)

    def test_ip_checked_before_identity(self) -> None:
        """The IP whitelist is asked first; an allowed identity cannot bypass it."""
        self.use(_Whitelist(), ["relay.example"], PeerIdentity("relay.example"))
        reply = self.call("GET", "/api/v1/jobs")
        self.assertError(reply, 403, "FORBIDDEN")
        self.assertEqual(reply.error["details"], {"ip": "127.0.0.1"})
