"""The mTLS handshake matrix over real loopback, and lpa.tls's file and identity helpers."""

from __future__ import annotations

import os
import socket
import ssl as stdlib_ssl
from pathlib import Path
from typing import Any

from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.ssl import TLSVersion, optionsForClientTLS
from twisted.logger import formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource

from lpa import tls
from lpa.agent.http.envelope import Enveloper
from lpa.agent.http.site import AgentSite
from lpa.errors import ConfigError
from tests.certs import TestPki, make_test_pki
from tests.logcheck import capture_events
from tests.loopback import listen_ssl, port_number, stop
from tests.rawhttp import eventually


class _Whoami(Resource):
    """Answers ``CN|ALPN`` of the peer, as the agent's API would see them."""

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        transport = request.channel.transport
        identity = tls.peer_identity(transport)
        proto = tls.negotiated_protocol(transport) or b"-"
        cn = identity.common_name if identity else "-"
        return f"{cn}|".encode() + proto


class _TrackingSite(AgentSite):  # the agent's Site: ALPN http/1.1 only, refusals logged
    """A Site that can wait until every connection it accepted is closed."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(
            resource,
            enveloper=Enveloper(reactor),
            max_body_bytes=1 << 20,
            timeout_seconds=30,
            clock=reactor,
        )
        self.open_connections: list[Deferred[None]] = []

    def buildProtocol(self, addr: Any) -> Any:
        proto = super().buildProtocol(addr)
        done: Deferred[None] = Deferred()
        self.open_connections.append(done)
        original = proto.connectionLost

        def connectionLost(reason: Failure) -> None:
            original(reason)
            done.callback(None)

        proto.connectionLost = connectionLost
        return proto


class _Fetch(Protocol):
    """Send one HTTP/1.0 GET and collect the answer until the connection closes."""

    def __init__(self) -> None:
        self.data = b""
        self.done: Deferred[tuple[bytes, Failure]] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.done.callback((self.data, reason))


class HandshakeMatrixTests(TestCase):
    """Real loopback handshakes against ``server_tls_options`` behind a trivial site."""

    def setUp(self) -> None:
        self.pki: TestPki = make_test_pki(self.mktemp())
        self.events = capture_events(self)

    def refusals(self) -> list[str]:
        """The server's logged lines about refused handshakes."""
        return [
            formatEvent(e)
            for e in self.events
            if e.get("log_format", "").startswith("TLS handshake from")
        ]

    def listen(self, options: Any) -> int:
        site = _TrackingSite(_Whoami())
        port = listen_ssl(site, options)

        async def cleanup() -> None:
            await stop(port)
            for done in site.open_connections:
                await done

        self.addCleanup(lambda: Deferred.fromCoroutine(cleanup()))
        return port_number(port)

    async def fetch(self, port: int, client_options: Any) -> bytes:
        endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", port, client_options)
        proto = _Fetch()
        await connectProtocol(endpoint, proto)
        data, _reason = await proto.done
        return data

    async def assertServed(self, port: int, client_options: Any, body: bytes) -> None:
        data = await self.fetch(port, client_options)
        self.assertIn(b"200 OK", data)
        self.assertTrue(data.endswith(b"\r\n\r\n" + body), data)

    async def assertRefused(self, port: int, client_options: Any) -> None:
        data = await self.fetch(port, client_options)
        self.assertEqual(data, b"")

    async def test_good_client_served(self) -> None:
        """A client certificate from the CA is accepted and its CN reaches the application."""
        port = self.listen(self.pki.server_options())
        await self.assertServed(port, self.pki.client_options("good"), b"lpa-relay|http/1.1")

    async def test_no_client_certificate_refused(self) -> None:
        """A client presenting no certificate is refused at the handshake."""
        port = self.listen(self.pki.server_options())
        from twisted.internet.ssl import Certificate

        ca = Certificate.loadPEM(Path(self.pki.ca_cert).read_bytes())
        await self.assertRefused(port, optionsForClientTLS("localhost", trustRoot=ca))
        await eventually(self.refusals)
        [line] = self.refusals()
        self.assertRegex(
            line, r"^TLS handshake from 127\.0\.0\.1:\d+ refused: no client certificate$"
        )

    async def test_other_ca_refused(self) -> None:
        """A client certificate from another CA is refused."""
        port = self.listen(self.pki.server_options())
        await self.assertRefused(port, self.pki.client_options("other_ca"))
        await eventually(self.refusals)
        [line] = self.refusals()
        self.assertIn("refused: unknown CA (CN=", line)
        self.assertIn("unable to get local issuer certificate", line)

    async def test_expired_refused(self) -> None:
        """An expired client certificate is refused."""
        port = self.listen(self.pki.server_options())
        await self.assertRefused(port, self.pki.client_options("expired"))
        await eventually(self.refusals)
        [line] = self.refusals()
        self.assertIn("refused: certificate expired (CN=", line)

    async def test_revoked_refused(self) -> None:
        """A client certificate listed in the CRL is refused; the good one still passes."""
        port = self.listen(self.pki.server_options())
        await self.assertRefused(port, self.pki.client_options("revoked"))
        await eventually(self.refusals)
        [line] = self.refusals()
        self.assertIn("refused: certificate revoked (CN=revoked-client serial=", line)
        await self.assertServed(port, self.pki.client_options("good"), b"lpa-relay|http/1.1")

    async def test_missing_crl_allows_revoked(self) -> None:
        """Without a CRL file the revoked client is let in (warned at load), as the original."""
        os.unlink(self.pki.crl)
        port = self.listen(self.pki.server_options())
        await self.assertServed(
            port, self.pki.client_options("revoked"), b"revoked-client|http/1.1"
        )

    async def test_corrupt_crl_refuses_everyone(self) -> None:
        """A CRL that does not parse makes every handshake fail (fail closed)."""
        with open(self.pki.crl, "wb") as f:
            f.write(b"-----BEGIN X509 CRL-----\nnot a crl\n-----END X509 CRL-----\n")
        port = self.listen(self.pki.server_options())
        await self.assertRefused(port, self.pki.client_options("good"))
        await eventually(self.refusals)
        self.assertIn("CN=lpa-relay", " ".join(self.refusals()))
        self.assertIn("not a PEM or DER certificate revocation list", " ".join(self.refusals()))

    async def test_crl_from_other_ca_refuses_everyone(self) -> None:
        """A CRL not signed by the configured CA makes every handshake fail."""
        from lpa.tools import pki

        other_cert, other_key = pki.make_ca("other CA")
        crl = pki.make_crl(other_cert, other_key)
        from cryptography.hazmat.primitives.serialization import Encoding

        pki.write_file(self.pki.crl, crl.public_bytes(Encoding.PEM))
        port = self.listen(self.pki.server_options())
        await self.assertRefused(port, self.pki.client_options("good"))

    async def test_reload_crl(self) -> None:
        """reload_crl applies a new revocation to later handshakes; a broken CRL fails closed."""
        from lpa.tools import pki

        options = self.pki.server_options()
        port = self.listen(options)
        await self.assertServed(port, self.pki.client_options("good"), b"lpa-relay|http/1.1")
        pki.revoke(self.pki.directory, self.pki.good.cert)
        self.assertTrue(options.reload_crl())
        await self.assertRefused(port, self.pki.client_options("good"))
        with open(self.pki.crl, "wb") as f:
            f.write(b"garbage")
        self.assertFalse(options.reload_crl())
        self.assertIn(self.pki.crl, options.fail_closed_reason)

    async def test_expired_crl_still_used(self) -> None:
        """A CRL past its nextUpdate still refuses what it lists and lets the rest in."""
        import datetime

        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.serialization import Encoding, load_pem_private_key

        from lpa.tools import pki

        past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
        ca = tls.load_certificate(self.pki.ca_cert)
        key = load_pem_private_key(Path(self.pki.ca_key).read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        crl = pki.make_crl(ca, key, [(self.pki.revoked.serial, past)], now=past, days=1)
        pki.write_file(self.pki.crl, crl.public_bytes(Encoding.PEM))
        port = self.listen(self.pki.server_options())
        self.assertTrue(any("expired" in e.get("log_format", "") for e in self.events))
        await self.assertRefused(port, self.pki.client_options("revoked"))
        await self.assertServed(port, self.pki.client_options("good"), b"lpa-relay|http/1.1")

    async def test_tls_1_1_refused(self) -> None:
        """A client limited to TLS 1.1 gets no service even when the minimum is 1.2."""
        port = self.listen(self.pki.server_options(min_tls_version="1.2"))
        options = _client_with_versions(self.pki, TLSVersion.TLSv1_1, TLSVersion.TLSv1_1)
        await self.assertRefused(port, options)

    async def test_min_1_2_accepts_1_2_client(self) -> None:
        """With min_tls_version 1.2, a TLS 1.2-only client is served."""
        port = self.listen(self.pki.server_options(min_tls_version="1.2"))
        options = _client_with_versions(self.pki, TLSVersion.TLSv1_2, TLSVersion.TLSv1_2)
        await self.assertServed(port, options, b"lpa-relay|http/1.1")

    async def test_default_refuses_1_2_client(self) -> None:
        """The default minimum (1.3) refuses a TLS 1.2-only client."""
        port = self.listen(self.pki.server_options())
        options = _client_with_versions(self.pki, TLSVersion.TLSv1_2, TLSVersion.TLSv1_2)
        await self.assertRefused(port, options)

    async def test_alpn_http11_even_if_h2_offered_first(self) -> None:
        """ALPN settles on http/1.1 even when the client prefers h2."""
        port = self.listen(self.pki.server_options())
        options = self.pki.client_options("good", acceptable_protocols=(b"h2", b"http/1.1"))
        await self.assertServed(port, options, b"lpa-relay|http/1.1")

    async def test_wrong_hostname_fails(self) -> None:
        """client_tls_options refuses a server whose certificate does not name the host."""
        port = self.listen(self.pki.server_options())
        await self.assertRefused(port, self.pki.client_options("good", "agent.example"))

    async def test_ip_hostname_verified(self) -> None:
        """client_tls_options accepts the server by its IP SAN."""
        port = self.listen(self.pki.server_options())
        await self.assertServed(
            port, self.pki.client_options("good", "127.0.0.1"), b"lpa-relay|http/1.1"
        )

    async def test_stdlib_ssl_client(self) -> None:
        """A non-Twisted client (stdlib ssl, another OpenSSL) is served with a good cert and
        refused with a revoked one."""
        port = self.listen(self.pki.server_options())
        good = await threads.deferToThread(_stdlib_fetch, self.pki, port, "good")
        self.assertIn(b"200 OK", good)
        self.assertTrue(good.endswith(b"lpa-relay|http/1.1"))
        revoked = await threads.deferToThread(_stdlib_fetch, self.pki, port, "revoked")
        self.assertEqual(revoked, b"")


def _client_with_versions(pki: TestPki, low: TLSVersion, high: TLSVersion) -> Any:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    ca = tls.load_certificates(pki.ca_cert)
    cert = tls.load_certificate(pki.good.cert)
    key = load_pem_private_key(Path(pki.good.key).read_bytes(), None)
    return optionsForClientTLS(
        "localhost",
        trustRoot=tls.CATrustRoot(ca),
        acceptableProtocols=[b"http/1.1"],
        extraCertificateOptions={
            "privateKey": key,
            "certificate": cert,
            "insecurelyLowerMinimumTo": low,
            "lowerMaximumSecurityTo": high,
        },
    )


def _stdlib_fetch(pki: TestPki, port: int, which: str) -> bytes:
    """Blocking GET with the stdlib; b"" when the server drops the handshake."""
    ctx = stdlib_ssl.create_default_context(cafile=pki.ca_cert)
    files = pki.client(which)
    ctx.load_cert_chain(files.cert, files.key)
    ctx.set_alpn_protocols(["http/1.1"])
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                s.sendall(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
                while chunk := s.recv(65536):
                    data += chunk
        except (stdlib_ssl.SSLError, ConnectionError):
            return data
    return data


class OptionErrorTests(SynchronousTestCase):
    """Bad files and values give a one-line ConfigError naming the path or key."""

    def setUp(self) -> None:
        self.pki = make_test_pki(self.mktemp())

    def build(self, **overrides: Any) -> Any:
        kwargs: dict[str, Any] = {
            "ca_cert_path": self.pki.ca_cert,
            "cert_path": self.pki.server_cert,
            "key_path": self.pki.server_key,
            "crl_path": self.pki.crl,
        }
        kwargs.update(overrides)
        return tls.server_tls_options(**kwargs)

    def assertOneLine(self, error: ConfigError, *fragments: str) -> None:
        text = str(error)
        self.assertNotIn("\n", text)
        for fragment in fragments:
            self.assertIn(fragment, text)

    def test_missing_ca(self) -> None:
        """A missing CA file is named with 'no such file'."""
        path = os.path.join(self.pki.directory, "nope.pem")
        e = self.assertRaises(ConfigError, self.build, ca_cert_path=path)
        self.assertOneLine(e, path, "no such file")

    def test_bad_pem_cert(self) -> None:
        """A server certificate that is not PEM is named."""
        path = os.path.join(self.pki.directory, "junk.pem")
        with open(path, "w") as f:
            f.write("hello\n")
        e = self.assertRaises(ConfigError, self.build, cert_path=path)
        self.assertOneLine(e, path, "not a PEM")

    def test_bad_key(self) -> None:
        """A key file that is not a key is named."""
        e = self.assertRaises(ConfigError, self.build, key_path=self.pki.server_cert)
        self.assertOneLine(e, self.pki.server_cert, "private key")

    def test_key_mismatch(self) -> None:
        """A key that does not belong to the certificate is refused."""
        e = self.assertRaises(ConfigError, self.build, key_path=self.pki.good.key)
        self.assertOneLine(e, self.pki.good.key, "does not match", self.pki.server_cert)

    def test_unreadable(self) -> None:
        """A directory in place of a file is 'cannot read'."""
        e = self.assertRaises(ConfigError, self.build, ca_cert_path=self.pki.directory)
        self.assertOneLine(e, self.pki.directory, "cannot read")

    def test_bad_min_version(self) -> None:
        """min_tls_version other than 1.2/1.3 is refused, naming the key."""
        for bad in ("1.1", "1.0", "tls1.3", ""):
            e = self.assertRaises(ConfigError, self.build, min_tls_version=bad)
            self.assertOneLine(e, "tls.min_tls_version")

    def test_options_have_no_deprecation_warnings(self) -> None:
        """Building server and client contexts raises no DeprecationWarning (pyOpenSSL 26)."""
        self.build().getContext()
        client = self.pki.client_options("good")
        creator = client._createConnection  # type: ignore[attr-defined]  # private, no API
        creator.__self__.getContext()
        warnings = [w for w in self.flushWarnings() if w["category"] is DeprecationWarning]
        self.assertEqual(warnings, [])

    def test_client_options_errors(self) -> None:
        """client_tls_options reports missing files the same way."""
        path = os.path.join(self.pki.directory, "missing.key")
        e = self.assertRaises(
            ConfigError,
            tls.client_tls_options,
            "localhost",
            ca_cert_path=self.pki.ca_cert,
            cert_path=self.pki.good.cert,
            key_path=path,
        )
        self.assertOneLine(e, path, "no such file")


class _FakeTLSTransport:
    def __init__(self, cert: Any, protocol: bytes | None = b"http/1.1") -> None:
        self._cert = cert
        self.negotiatedProtocol = protocol

    def getPeerCertificate(self) -> Any:
        return self._cert


class IdentityTests(SynchronousTestCase):
    """peer_identity, identity_allowed and negotiated_protocol."""

    def setUp(self) -> None:
        self.pki = make_test_pki(self.mktemp())

    def test_peer_identity_from_pyopenssl_cert(self) -> None:
        """A pyOpenSSL X509 from getPeerCertificate gives CN, SANs and serial."""
        from OpenSSL import crypto

        cert = tls.load_certificate(self.pki.server_cert)
        identity = tls.peer_identity(_FakeTLSTransport(crypto.X509.from_cryptography(cert)))
        self.assertEqual(
            identity,
            tls.PeerIdentity("localhost", ("localhost",), ("127.0.0.1",), cert.serial_number),
        )

    def test_no_tls(self) -> None:
        """A transport without TLS, or without a peer certificate, has no identity."""
        self.assertIsNone(tls.peer_identity(object()))
        self.assertIsNone(tls.peer_identity(_FakeTLSTransport(None)))

    def test_identity_allowed(self) -> None:
        """Empty list allows any; otherwise CN or a SAN must match (IPs compared as IPs)."""
        ident = tls.PeerIdentity("lpa-relay", ("relay.example",), ("10.0.0.1",), 7)
        self.assertTrue(tls.identity_allowed(ident, []))
        self.assertTrue(tls.identity_allowed(ident, ["lpa-relay"]))
        self.assertTrue(tls.identity_allowed(ident, ["other", "RELAY.example."]))
        self.assertTrue(tls.identity_allowed(ident, ["10.0.0.01".replace("01", "1")]))
        self.assertFalse(tls.identity_allowed(ident, ["lpa-relay2", "10.0.0.2"]))
        self.assertFalse(tls.identity_allowed(None, ["lpa-relay"]))
        self.assertTrue(tls.identity_allowed(None, []))

    def test_negotiated_protocol(self) -> None:
        """The ALPN result is read from the transport, None when absent."""
        self.assertEqual(tls.negotiated_protocol(_FakeTLSTransport(None, b"http/1.1")), b"http/1.1")
        self.assertIsNone(tls.negotiated_protocol(_FakeTLSTransport(None, None)))
        self.assertIsNone(tls.negotiated_protocol(object()))


class InterfaceTests(SynchronousTestCase):
    """Our trust root satisfies Twisted's interface."""

    def test_trust_root_interface(self) -> None:
        """CATrustRoot provides IOpenSSLTrustRoot."""
        from twisted.internet._sslverify import IOpenSSLTrustRoot
        from zope.interface.verify import verifyObject

        pki = make_test_pki(self.mktemp())
        self.assertTrue(
            verifyObject(IOpenSSLTrustRoot, tls.CATrustRoot(tls.load_certificates(pki.ca_cert)))
        )
