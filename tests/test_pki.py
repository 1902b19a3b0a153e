"""lpa.tools.pki: the files init writes, their modes and SANs, revocation, and the test PKI."""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import reactor
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase

from lpa import tls
from lpa.errors import ConfigError
from lpa.tools import pki
from tests.certs import make_test_pki
from tests.loopback import listen_ssl, port_number, stop
from tests.test_tls import _Fetch, _TrackingSite, _Whoami


def _sans(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ips = [str(i) for i in san.get_values_for_type(x509.IPAddress)]
    return san.get_values_for_type(x509.DNSName), ips


class InitTests(SynchronousTestCase):
    """init_pki and its files."""

    def setUp(self) -> None:
        self.dir = os.path.join(self.mktemp(), "pki")

    def test_files_and_modes(self) -> None:
        """Every file is written; keys are 0600, certificates and the CRL are not secret."""
        paths = pki.init_pki(self.dir)
        names = sorted(os.listdir(self.dir))
        self.assertEqual(
            names,
            sorted(["ca.pem", "ca.key", "server.pem", "server.key.pem", "client.crt",
                    "client.key", "crl.pem"]),
        )
        for key in (paths.ca_key, paths.server_key, paths.client_key):
            self.assertEqual(stat.S_IMODE(os.stat(key).st_mode), 0o600, key)
        for public in (paths.ca_cert, paths.server_cert, paths.client_cert, paths.crl):
            self.assertEqual(stat.S_IMODE(os.stat(public).st_mode), 0o644, public)
        self.assertEqual(paths, pki.PkiPaths.in_directory(self.dir))

    def test_default_sans_and_roles(self) -> None:
        """The server certificate names localhost and 127.0.0.1; the client is lpa-relay."""
        paths = pki.init_pki(self.dir)
        server = tls.load_certificate(paths.server_cert)
        self.assertEqual(_sans(server), (["localhost"], ["127.0.0.1"]))
        eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(eku), [ExtendedKeyUsageOID.SERVER_AUTH])
        client = tls.load_certificate(paths.client_cert)
        self.assertEqual(
            client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value, "lpa-relay"
        )
        ca = tls.load_certificate(paths.ca_cert)
        server.verify_directly_issued_by(ca)
        client.verify_directly_issued_by(ca)
        crl = tls.load_crl(paths.crl)
        self.assertEqual(len(crl), 0)
        key = ca.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        self.assertTrue(crl.is_signature_valid(key))

    def test_agent_hosts(self) -> None:
        """Names become DNS SANs and addresses (v4 and v6) IP SANs; the first is the CN."""
        paths = pki.init_pki(self.dir, ["agent1.example", "10.0.0.7", "fd00::7", "agent1"])
        server = tls.load_certificate(paths.server_cert)
        self.assertEqual(
            _sans(server),
            (["agent1.example", "agent1"], ["10.0.0.7", str(ipaddress.ip_address("fd00::7"))]),
        )
        self.assertEqual(tls.PeerIdentity.from_certificate(server).common_name, "agent1.example")

    def test_days(self) -> None:
        """--days sets the leaf validity."""
        now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
        paths = pki.init_pki(self.dir, days=10, now=now)
        server = tls.load_certificate(paths.server_cert)
        self.assertEqual(server.not_valid_after_utc, now + datetime.timedelta(days=10))
        self.assertRaises(pki.PkiError, pki.init_pki, self.dir, days=0, force=True)

    def test_refuses_overwrite_without_force(self) -> None:
        """A second init refuses to overwrite, changing nothing; --force replaces the CA."""
        paths = pki.init_pki(self.dir)
        before = Path(paths.ca_cert).read_bytes()
        e = self.assertRaises(pki.PkiError, pki.init_pki, self.dir)
        self.assertIn("already exists", str(e))
        self.assertEqual(Path(paths.ca_cert).read_bytes(), before)
        pki.init_pki(self.dir, force=True)
        self.assertNotEqual(Path(paths.ca_cert).read_bytes(), before)

    def test_no_hosts(self) -> None:
        """An empty host list is refused."""
        self.assertRaises(pki.PkiError, pki.init_pki, self.dir, ["", " "])


class RevokeTests(SynchronousTestCase):
    """revoke and issue_client."""

    def setUp(self) -> None:
        self.dir = self.mktemp()
        self.paths = pki.init_pki(self.dir)

    def test_revoke_updates_crl(self) -> None:
        """The serial lands in crl.pem, the CRL number rises, and revoking twice is a no-op."""
        serial = pki.revoke(self.dir, self.paths.client_cert)
        crl = tls.load_crl(self.paths.crl)
        self.assertEqual([r.serial_number for r in crl], [serial])
        self.assertEqual(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number, 2)
        cert_path, _ = pki.issue_client(self.dir, "ops")
        second = pki.revoke(self.dir, cert_path)
        pki.revoke(self.dir, cert_path)
        crl = tls.load_crl(self.paths.crl)
        self.assertEqual(sorted(r.serial_number for r in crl), sorted([serial, second]))
        ca = tls.load_certificate(self.paths.ca_cert)
        key = ca.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        self.assertTrue(crl.is_signature_valid(key))

    def test_revoke_foreign_certificate_refused(self) -> None:
        """A certificate from another CA is refused and the CRL is unchanged."""
        other = pki.init_pki(self.mktemp())
        before = Path(self.paths.crl).read_bytes()
        e = self.assertRaises(pki.PkiError, pki.revoke, self.dir, other.client_cert)
        self.assertIn("not issued by the CA", str(e))
        self.assertEqual(Path(self.paths.crl).read_bytes(), before)

    def test_revoke_missing_file(self) -> None:
        """A missing certificate is a one-line ConfigError naming it."""
        path = os.path.join(self.dir, "nope.crt")
        e = self.assertRaises(ConfigError, pki.revoke, self.dir, path)
        self.assertIn(path, str(e))

    def test_issue_client(self) -> None:
        """issue-client writes NAME.crt and a 0600 NAME.key, refusing to overwrite."""
        cert_path, key_path = pki.issue_client(self.dir, "ops-laptop")
        self.assertEqual(stat.S_IMODE(os.stat(key_path).st_mode), 0o600)
        identity = tls.PeerIdentity.from_certificate(tls.load_certificate(cert_path))
        self.assertEqual(identity.common_name, "ops-laptop")
        self.assertRaises(pki.PkiError, pki.issue_client, self.dir, "ops-laptop")
        self.assertRaises(pki.PkiError, pki.issue_client, self.dir, "../evil")


class TestPkiTests(SynchronousTestCase):
    """tests.certs builds what the handshake tests rely on."""

    def test_shapes(self) -> None:
        """Expired is expired, revoked is in the CRL, other_ca is not ours."""
        t = make_test_pki(self.mktemp())
        now = datetime.datetime.now(datetime.UTC)
        self.assertLess(tls.load_certificate(t.expired.cert).not_valid_after_utc, now)
        crl = tls.load_crl(t.crl)
        self.assertEqual([r.serial_number for r in crl], [t.revoked.serial])
        ca = tls.load_certificate(t.ca_cert)
        other = tls.load_certificate(t.other_ca.cert)
        self.assertRaises(ValueError, other.verify_directly_issued_by, ca)
        self.assertEqual(t.good.common_name, "lpa-relay")


class RevokedRefusedTests(TestCase):
    """A certificate revoked with lpa.tools.pki.revoke is refused at the handshake."""

    async def test_revoked_refused_over_loopback(self) -> None:
        """Before revoke the client is served; after revoke (new options) it is refused."""
        from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol

        directory = self.mktemp()
        paths = pki.init_pki(directory)

        def options() -> tls.ServerTLSOptions:
            return tls.server_tls_options(
                ca_cert_path=paths.ca_cert, cert_path=paths.server_cert,
                key_path=paths.server_key, crl_path=paths.crl,
            )

        client = tls.client_tls_options(
            "localhost", ca_cert_path=paths.ca_cert, cert_path=paths.client_cert,
            key_path=paths.client_key,
        )

        async def fetch(server_options: IOpenSSLContextFactory) -> bytes:
            site = _TrackingSite(_Whoami())
            port = listen_ssl(site, server_options)
            try:
                proto = _Fetch()
                endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", port_number(port), client)
                await connectProtocol(endpoint, proto)
                data, _ = await proto.done
            finally:
                await stop(port)
                for done in site.open_connections:
                    await done
            return data

        self.assertIn(b"lpa-relay|http/1.1", await fetch(options()))
        pki.revoke(directory, paths.client_cert)
        self.assertEqual(await fetch(options()), b"")
