"""A throw-away PKI for tests, built on :mod:`lpa.tools.pki` (EC P-256, so it takes milliseconds).

``make_test_pki(directory)`` writes into ``directory``:

* the CA (``ca.pem``/``ca.key``) and an empty-but-for-one-entry CRL (``crl.pem``);
* the agent server certificate (SANs ``localhost`` and ``127.0.0.1``);
* a good client (CN ``lpa-relay``), an expired client, a revoked client (already in the CRL),
  and a client from another CA (``other-ca.pem``).

Use :meth:`TestPki.server_options` / :meth:`TestPki.client_options` for handshakes::

    pki = make_test_pki(self.mktemp())
    port = listen_ssl(site, pki.server_options())             # tests.loopback
    endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", port, pki.client_options("good"))
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from pathlib import Path

import attr
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator

from lpa import tls as _tls
from lpa.tools import pki as _pki


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ClientFiles:
    """A client certificate and its key on disk."""

    cert: str
    key: str
    serial: int
    common_name: str


@attr.s(frozen=True, slots=True, auto_attribs=True)
class TestPki:
    """Paths of a test PKI; every client is keyed by a short name in :attr:`clients`."""

    directory: str
    ca_cert: str
    ca_key: str
    server_cert: str
    server_key: str
    crl: str
    other_ca_cert: str
    good: ClientFiles
    expired: ClientFiles
    revoked: ClientFiles
    other_ca: ClientFiles

    def client(self, which: str) -> ClientFiles:
        """``"good"``, ``"expired"``, ``"revoked"`` or ``"other_ca"``."""
        files = getattr(self, which)
        assert isinstance(files, ClientFiles), which
        return files

    def server_options(
        self, *, min_tls_version: str = "1.3", crl_path: str | object | None = attr.NOTHING
    ) -> _tls.ServerTLSOptions:
        """The agent's options over this PKI (CRL on by default; ``crl_path=None``: none)."""
        crl = self.crl if crl_path is attr.NOTHING else crl_path
        return _tls.server_tls_options(
            ca_cert_path=self.ca_cert,
            cert_path=self.server_cert,
            key_path=self.server_key,
            crl_path=crl if isinstance(crl, str) else None,
            min_tls_version=min_tls_version,
        )

    def client_options(
        self,
        which: str = "good",
        hostname: str = "localhost",
        *,
        acceptable_protocols: Sequence[bytes] = (b"http/1.1",),
        ca_cert: str | None = None,
    ) -> IOpenSSLClientConnectionCreator:
        """Client options presenting ``which`` client certificate and trusting our CA."""
        files = self.client(which)
        return _tls.client_tls_options(
            hostname,
            ca_cert_path=ca_cert or self.ca_cert,
            cert_path=files.cert,
            key_path=files.key,
            acceptable_protocols=acceptable_protocols,
        )


def _write_client(
    directory: str, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> ClientFiles:
    cert_path = os.path.join(directory, f"{stem}.crt")
    key_path = os.path.join(directory, f"{stem}.key")
    _pki.write_file(cert_path, _pki.cert_pem(cert))
    _pki.write_file(key_path, _pki.key_pem(key), 0o600)
    cn = cert.subject.rfc4514_string().removeprefix("CN=")
    return ClientFiles(cert_path, key_path, cert.serial_number, cn)


def make_test_pki(directory: str, *, now: datetime.datetime | None = None) -> TestPki:
    """Write a complete test PKI into ``directory`` (created if needed)."""
    start = now or datetime.datetime.now(datetime.UTC)
    paths = _pki.init_pki(directory, ("localhost", "127.0.0.1"), now=start, force=True)
    ca_cert = _tls.load_certificate(paths.ca_cert)
    ca_key = serialization.load_pem_private_key(Path(paths.ca_key).read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey), "lpa pki makes EC CA keys"
    good_cert = _tls.load_certificate(paths.client_cert)
    good = ClientFiles(
        paths.client_cert, paths.client_key, good_cert.serial_number, _pki.RELAY_COMMON_NAME
    )
    expired = _write_client(
        directory,
        "expired",
        *_pki.issue_certificate(
            ca_cert, ca_key, "expired-client",
            not_before=start - datetime.timedelta(days=10),
            not_after=start - datetime.timedelta(days=1),
        ),
    )
    revoked = _write_client(
        directory,
        "revoked",
        *_pki.issue_certificate(
            ca_cert, ca_key, "revoked-client", now=start
        ),
    )
    _pki.revoke(directory, revoked.cert, now=start)
    other_ca_cert, other_ca_key = _pki.make_ca("other CA", now=start)
    other_ca_path = os.path.join(directory, "other-ca.pem")
    _pki.write_file(other_ca_path, _pki.cert_pem(other_ca_cert))
    other = _write_client(
        directory,
        "other-ca-client",
        *_pki.issue_certificate(other_ca_cert, other_ca_key, _pki.RELAY_COMMON_NAME, now=start),
    )
    return TestPki(
        directory=directory,
        ca_cert=paths.ca_cert,
        ca_key=paths.ca_key,
        server_cert=paths.server_cert,
        server_key=paths.server_key,
        crl=paths.crl,
        other_ca_cert=other_ca_path,
        good=good,
        expired=expired,
        revoked=revoked,
        other_ca=other,
    )
