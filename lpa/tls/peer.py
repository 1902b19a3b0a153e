"""Who is on the other end of a connection: the peer's certificate identity, and whether the
agent's allowlist (``auth.allowed_clients``) admits it."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

import attr
from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import crypto


@attr.s(frozen=True, slots=True, auto_attribs=True)
class PeerIdentity:
    """The names a verified peer certificate carries."""

    common_name: str | None
    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()
    serial: int = 0

    @classmethod
    def from_certificate(cls, cert: x509.Certificate) -> PeerIdentity:
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        common_name = str(cns[0].value) if cns else None
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            dns = tuple(san.get_values_for_type(x509.DNSName))
            ips = tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
        except x509.ExtensionNotFound:
            dns, ips = (), ()
        return cls(common_name, dns, ips, cert.serial_number)

    def names(self) -> tuple[str, ...]:
        """CN first, then every SAN."""
        first = (self.common_name,) if self.common_name else ()
        return first + self.dns_names + self.ip_addresses


def peer_identity(transport: Any) -> PeerIdentity | None:
    """The identity of a TLS transport's peer, or None (no TLS, no certificate yet)."""
    get = getattr(transport, "getPeerCertificate", None)
    if get is None:
        return None
    try:
        cert = get()
    except Exception:
        return None
    if cert is None:
        return None
    if isinstance(cert, crypto.X509):
        cert = cert.to_cryptography()
    return PeerIdentity.from_certificate(cert)


def _same_name(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a.rstrip(".").lower() == b.rstrip(".").lower()


def identity_allowed(identity: PeerIdentity | None, allowed_clients: Sequence[str]) -> bool:
    """True if ``allowed_clients`` is empty (any client of the CA) or names the CN or a SAN."""
    if not allowed_clients:
        return True
    if identity is None:
        return False
    return any(
        _same_name(name, allowed) for name in identity.names() for allowed in allowed_clients
    )


def negotiated_protocol(transport: Any) -> bytes | None:
    """The ALPN protocol negotiated on a TLS transport, or None."""
    value = getattr(transport, "negotiatedProtocol", None)
    return value if isinstance(value, bytes) else None
