"""What both ends of a connection trust: exactly the configured CA certificates (and, on the
agent's side, the CRL), installed into each new OpenSSL context's store; and the one
application protocol both speak.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography import x509
from OpenSSL import SSL, crypto
from twisted.internet._sslverify import IOpenSSLTrustRoot
from zope.interface import implementer

#: the only application protocol we speak (h2 breaks WebSocket upgrades)
HTTP11 = b"http/1.1"


@implementer(IOpenSSLTrustRoot)
class CATrustRoot:
    """Trust exactly these CA certificates; optionally check leaves against a CRL."""

    def __init__(
        self,
        ca_certs: Sequence[x509.Certificate],
        crl: x509.CertificateRevocationList | None = None,
    ) -> None:
        self._ca_certs = list(ca_certs)
        self._crl = crl

    def _addCACertsToContext(self, context: SSL.Context) -> None:
        store = context.get_cert_store()
        assert store is not None
        for cert in self._ca_certs:
            store.add_cert(crypto.X509.from_cryptography(cert))
        if self._crl is not None:
            store.add_crl(self._crl)
            store.set_flags(crypto.X509StoreFlags.CRL_CHECK)
