"""The relay's client TLS to agents: one OpenSSL context for the whole fleet, names per connection.

``optionsForClientTLS(host, …)`` builds a new OpenSSL context for every call, and the relay asks
for options at every dial (so that rotated certificate files are picked up): about 34 KiB per
followed agent, more than the TLS connection itself (about 19 KiB).  Here one context holds
what is the same for every agent (the CA, the relay's client certificate and key, ALPN
``http/1.1``, TLS 1.2 minimum) and is rebuilt only when one of its three files changes; each
connection gets what differs per agent, as Twisted's own ``ClientTLSOptions`` does it: the SNI
name and a verify callback that checks the agent's certificate against the dialled host name
with ``service_identity`` (DNS name or IP address), failing the connection with the
``VerificationError`` so the reason reaches the log.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from typing import Any

import idna
from OpenSSL import SSL
from service_identity import CertificateError, VerificationError
from service_identity.hazmat import DNS_ID, IPAddress_ID, verify_service_identity
from service_identity.pyopenssl import extract_patterns
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from lpa.tls import HTTP11, CATrustRoot, load_certificates, load_key_pair

_log = Logger()


def _stamp(path: str) -> tuple[int, int, int]:
    try:
        status = os.stat(path)
    except OSError:
        return (0, 0, 0)  # the load that follows reports the file, in one line
    return (status.st_ino, status.st_size, status.st_mtime_ns)


class AgentTls:
    """Client connection creators for agents, sharing one context (see the module docstring).

    :raises ConfigError: (from :meth:`for_host`) a file is missing, unreadable or malformed.
    """

    def __init__(self, *, ca_cert_path: str, cert_path: str, key_path: str) -> None:
        self._paths = (ca_cert_path, cert_path, key_path)
        self._stamps: tuple[tuple[int, int, int], ...] | None = None
        self._options: ssl.CertificateOptions | None = None

    def _current(self) -> ssl.CertificateOptions:
        stamps = tuple(_stamp(path) for path in self._paths)
        if self._options is None or stamps != self._stamps:
            ca_cert_path, cert_path, key_path = self._paths
            ca_certs = load_certificates(ca_cert_path)
            cert, key = load_key_pair(cert_path, key_path)
            if self._options is not None:
                _log.info("agent client certificate files changed: new TLS context")
            # cryptography objects, as lpa.tls hands them over: no pyOpenSSL 26 deprecations
            self._options = ssl.CertificateOptions(
                privateKey=key,  # type: ignore[arg-type]
                certificate=cert,  # type: ignore[arg-type]
                trustRoot=CATrustRoot(ca_certs),
                acceptableProtocols=[HTTP11],
            )
            self._stamps = stamps
        return self._options

    def for_host(self, host: str) -> AgentConnectionCreator:
        """A connection creator that verifies the agent is ``host`` (the name the relay dials)."""
        return AgentConnectionCreator(self._current(), host)


@implementer(IOpenSSLClientConnectionCreator)
class AgentConnectionCreator:
    """One agent's connections: the shared context, SNI and a host name check of our own."""

    def __init__(self, options: ssl.CertificateOptions, host: str) -> None:
        self._options = options
        self.host = host
        try:
            ipaddress.ip_address(host)
        except ValueError:
            self._sni: bytes | None = idna.encode(host)
            self._ident: Any = DNS_ID(host)
        else:
            self._sni = None  # no SNI for IP literals (RFC 6066)
            self._ident = IPAddress_ID(host)

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection: SSL.Connection = self._options.clientConnectionForTLS(tlsProtocol)
        if self._sni is not None:
            connection.set_tlsext_host_name(self._sni)
        connection.set_verify(
            SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
            _verify_callback(tlsProtocol, self._ident),
        )
        return connection


def _verify_callback(tls_protocol: Any, ident: Any) -> Callable[..., bool]:
    """OpenSSL's chain verdict, plus the leaf checked against the dialled name."""
    protocol: list[Any] = [tls_protocol]  # dropped after the leaf, as Twisted does

    def verify(connection: Any, cert: Any, errno: int, depth: int, ok: int) -> bool:
        if depth != 0 or not protocol:
            return bool(ok)
        if not ok:  # the chain failed already: OpenSSL reports that
            protocol.clear()
            return False
        result = True
        try:
            verify_service_identity(extract_patterns(cert), [ident], [])
        except (VerificationError, CertificateError):  # wrong name, or no subjectAltName
            result = False
            protocol[0].failVerification(Failure())
        except BaseException:  # never let an exception vanish inside OpenSSL
            result = False
            _log.failure("while verifying an agent's certificate")
        protocol.clear()
        return result

    return verify
