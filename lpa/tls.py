"""Mutual TLS for the agent (server side) and its clients (relay, CLI, tests).

Everything is built on pyOpenSSL through :mod:`twisted.internet.ssl`, with cryptography objects
handed to OpenSSL wherever pyOpenSSL accepts them, so that pyOpenSSL 26 raises no
DeprecationWarning on our paths (pyOpenSSL 26 deprecates its X509/PKey objects).

Server handshake policy (README D, with the original's gaps closed):

* TLS 1.2 minimum, 1.3 by default (the original hard-coded 1.3 and ignored the key);
* a client certificate is REQUIRED and must chain to the configured CA; expired ones fail;
* revoked ones fail through the CRL (``X509StoreFlags.CRL_CHECK``).  A CRL that exists but does
  not parse or is not signed by the CA makes every handshake fail (fail closed).  A missing CRL
  file is allowed with a warning.  An expired CRL is still used for revocation, as the original
  did, with a warning at load, rather than locking every client out;
* ALPN offers ``http/1.1`` only (h2 breaks WebSockets and loses the peer certificate).

A refused handshake is silent on the wire.  The verify callback records why it refused a
certificate; :func:`handshake_failure_reason` turns that (or OpenSSL's own error, e.g. no
certificate at all) into a reason an operator knows, for the agent's throttled log line.

Every file error is one line naming the configuration key when the caller passes one
(``labels``), then the path, worded as :mod:`lpa.configfiles` words the same checks at start:
``tls.server_cert: /etc/lpa/server.pem: no such file``.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attr
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from lpa.errors import ConfigError
from lpa.tlsaudit import record_refusal, verify_error_kind, verify_error_string

_log = Logger()

#: the only application protocol we speak (h2 breaks WebSocket upgrades)
HTTP11 = b"http/1.1"

#: Twisted annotates its TLS version constants as TLSVersion, so this table does too
_TLS_VERSIONS: dict[str, ssl.TLSVersion] = {
    "1.2": ssl.TLSVersion.TLSv1_2,
    "1.3": ssl.TLSVersion.TLSv1_3,
}

#: public key types that can sign a CRL
_SIGNING_KEYS = (
    dsa.DSAPublicKey, ec.EllipticCurvePublicKey, ed448.Ed448PublicKey, ed25519.Ed25519PublicKey,
    rsa.RSAPublicKey,
)

# OpenSSL X509_V_ERR_* codes the verify callback treats specially
_X509_V_ERR_CRL_NOT_YET_VALID = 11
_X509_V_ERR_CRL_HAS_EXPIRED = 12


# --------------------------------------------------------------------------------------------
# Loading files: every failure is ONE line naming the path.


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ConfigError(f"{_label(what)} {path}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{_label(what)} {path}: cannot read: {e.strerror or e}") from None


def load_certificate(path: str, what: str = "certificate") -> x509.Certificate:
    """The first PEM (or DER) certificate in ``path``; :class:`ConfigError` otherwise."""
    data = _read(path, what)
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError:
        raise ConfigError(f"{_label(what)} {path}: not a PEM or DER certificate") from None


def load_certificates(path: str, what: str = "CA certificate") -> list[x509.Certificate]:
    """Every PEM certificate in ``path`` (a CA bundle may hold several)."""
    data = _read(path, what)
    try:
        if b"-----BEGIN" in data:
            certs = x509.load_pem_x509_certificates(data)
        else:
            certs = [x509.load_der_x509_certificate(data)]
    except ValueError:
        raise ConfigError(f"{_label(what)} {path}: not a PEM or DER certificate") from None
    return certs


def load_private_key(path: str, what: str = "private key") -> PrivateKeyTypes:
    """An unencrypted PEM (or DER) private key; :class:`ConfigError` otherwise."""
    data = _read(path, what)
    try:
        if b"-----BEGIN" in data:
            return serialization.load_pem_private_key(data, password=None)
        return serialization.load_der_private_key(data, password=None)
    except TypeError:
        raise ConfigError(f"{_label(what)} {path}: encrypted keys are not supported") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{_label(what)} {path}: not a PEM or DER private key") from None


def load_crl(path: str, what: str = "CRL") -> x509.CertificateRevocationList:
    """A PEM or DER CRL; :class:`ConfigError` if it does not parse."""
    data = _read(path, what)
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError:
        raise ConfigError(
            f"{_label(what)} {path}: not a PEM or DER certificate revocation list"
        ) from None


def signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    """Whether ``ca``'s key signed ``crl`` (never for a key that cannot sign, e.g. X25519)."""
    key = ca.public_key()
    if not isinstance(key, _SIGNING_KEYS):
        return False
    return crl.is_signature_valid(key)


def _public_bytes(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_key_pair(
    cert_path: str,
    key_path: str,
    *,
    cert_label: str = "certificate",
    key_label: str = "private key",
) -> tuple[x509.Certificate, PrivateKeyTypes]:
    """A certificate and its private key, checked to belong together."""
    cert = load_certificate(cert_path, cert_label)
    key = load_private_key(key_path, key_label)
    if _public_bytes(key.public_key()) != _public_bytes(cert.public_key()):
        raise ConfigError(
            f"{_label(key_label)} {key_path}: does not match the certificate of {cert_label} "
            f"({cert_path})"
        )
    return cert, key


_CONFIG_KEY = re.compile(r"[a-z_]+(\.[a-z0-9_]+)+")


def _label(what: str) -> str:
    """A configuration key leads its line with a colon (``tls.ca_cert: PATH: …``); a description
    such as ``CA certificate`` reads on without one."""
    return f"{what}:" if _CONFIG_KEY.fullmatch(what) else what


#: what :func:`server_tls_options` calls its files when the caller names no keys
DEFAULT_LABELS: Mapping[str, str] = {
    "ca_cert": "CA certificate",
    "server_cert": "certificate",
    "server_key": "private key",
    "crl_path": "CRL",
}
#: the agent's configuration keys for the same files
AGENT_KEYS: Mapping[str, str] = {
    "ca_cert": "tls.ca_cert",
    "server_cert": "tls.server_cert",
    "server_key": "tls.server_key",
    "crl_path": "tls.crl_path",
}


# --------------------------------------------------------------------------------------------
# Trust root: CA certificates (and the CRL) installed into each new context's store.


@implementer(IOpenSSLTrustRoot)
class _CATrustRoot:
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


def _cert_label(cert: crypto.X509) -> str:
    try:
        c = cert.to_cryptography()
        cns = c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        value = cns[0].value if cns else "?"
        cn = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        return f"CN={cn} serial={c.serial_number:x}"
    except Exception:  # pragma: no cover - only for a log line
        return "?"


def _make_verify_callback(fail_closed_reason: str | None) -> Callable[..., bool]:
    """A verify callback that records refusals, tolerates a stale CRL, and can refuse everyone.

    It does not log: the agent's Site logs each refused handshake once, with the peer address,
    throttled (:mod:`lpa.tlsaudit`).
    """

    def verify(
        connection: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int
    ) -> bool:
        if fail_closed_reason is not None:
            if depth > 0 and ok:
                return True  # refuse at the leaf, so the log names the client
            record_refusal(
                connection,
                "every client refused: the CRL is unusable",
                f"{_cert_label(cert)}; {fail_closed_reason}",
            )
            return False
        if not ok and errno in (_X509_V_ERR_CRL_HAS_EXPIRED, _X509_V_ERR_CRL_NOT_YET_VALID):
            return True  # still checked against the stale CRL's entries; warned at load
        if not ok:
            where = f" at chain depth {depth}" if depth else ""
            record_refusal(
                connection,
                verify_error_kind(errno),
                f"{_cert_label(cert)}{where}: {verify_error_string(errno)}",
            )
        return bool(ok)

    return verify


@attr.s(frozen=True, slots=True, auto_attribs=True)
class CrlSummary:
    """What a (re)load of the CRL found, for the log line that says so."""

    path: str | None
    revoked: int | None = None
    next_update: datetime.datetime | None = None
    #: why every client is refused (unusable CRL), or None
    refuse_all: str | None = None

    def describe(self) -> str:
        if self.path is None:
            return "no CRL configured (revoked certificates are not refused)"
        if self.refuse_all is not None:
            return f"CRL unusable, refusing every client: {self.refuse_all}"
        if self.revoked is None:
            return f"CRL {self.path} missing (revoked certificates are not refused)"
        when = self.next_update.isoformat() if self.next_update is not None else "none"
        return f"CRL {self.path}: {self.revoked} revoked serials, next update {when}"


class ServerTLSOptions(ssl.CertificateOptions):
    """CertificateOptions whose contexts carry our verify callback, with a reloadable CRL."""

    def __init__(
        self,
        *,
        ca_certs: Sequence[x509.Certificate],
        crl_path: str | None,
        now: Callable[[], datetime.datetime],
        crl_label: str = "CRL",
        **kwargs: Any,
    ) -> None:
        self._ca_certs = list(ca_certs)
        self._crl_path = crl_path
        self._crl_label = crl_label
        self._now = now
        crl, refuse_all = _check_crl(crl_path, self._ca_certs, now(), crl_label)
        super().__init__(trustRoot=_CATrustRoot(self._ca_certs, crl), **kwargs)
        self._verify_callback = _make_verify_callback(refuse_all)
        self.fail_closed_reason: str | None = refuse_all
        self.crl_summary = _summary(crl_path, crl, refuse_all)

    def reload_crl(self) -> bool:
        """Re-read the CRL (after ``lpa pki revoke`` or a fetch) for connections from now on.

        Returns False when the new CRL fails closed (every client is then refused, and that
        was logged); :attr:`crl_summary` says what was read.  The daemon calls this on SIGHUP
        or from a timer.
        """
        crl, refuse_all = _check_crl(self._crl_path, self._ca_certs, self._now(), self._crl_label)
        self.trustRoot = _CATrustRoot(self._ca_certs, crl)
        self._verify_callback = _make_verify_callback(refuse_all)
        self.fail_closed_reason = refuse_all
        self.crl_summary = _summary(self._crl_path, crl, refuse_all)
        self._context = None  # the next handshake builds a context with the new store
        return refuse_all is None

    def _makeContext(self, skipCiphers: bool = False) -> SSL.Context:
        ctx = super()._makeContext(skipCiphers=skipCiphers)
        ctx.set_verify(
            SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT | SSL.VERIFY_CLIENT_ONCE,
            self._verify_callback,
        )
        return ctx


def _tls_version(min_tls_version: str) -> ssl.TLSVersion:
    try:
        return _TLS_VERSIONS[str(min_tls_version)]
    except KeyError:
        raise ConfigError(
            f"tls.min_tls_version: must be \"1.2\" or \"1.3\", got {min_tls_version!r}"
        ) from None


def _summary(
    path: str | None, crl: x509.CertificateRevocationList | None, refuse_all: str | None
) -> CrlSummary:
    if crl is None:
        return CrlSummary(path, refuse_all=refuse_all)
    return CrlSummary(path, len(list(crl)), crl.next_update_utc, refuse_all)


def _check_crl(
    crl_path: str | None,
    ca_certs: Sequence[x509.Certificate],
    now: datetime.datetime,
    label: str = "CRL",
) -> tuple[x509.CertificateRevocationList | None, str | None]:
    """(crl to install, reason to refuse everyone)."""
    if crl_path is None:
        _log.warn("TLS: no CRL configured; revoked client certificates are NOT refused")
        return None, None
    if not os.path.exists(crl_path):
        _log.warn(
            "TLS: {label} {crl_path} is missing; revoked client certificates are NOT refused",
            label=label,
            crl_path=crl_path,
        )
        return None, None
    try:
        crl = load_crl(crl_path, label)
    except ConfigError as e:
        _log.error("TLS: {error}; refusing every client (fail closed)", error=str(e))
        return None, str(e)
    if not any(
        crl.issuer == ca.subject
        and signed_by(crl, ca)
        for ca in ca_certs
    ):
        reason = f"{_label(label)} {crl_path}: not signed by the configured CA"
        _log.error("TLS: {error}; refusing every client (fail closed)", error=reason)
        return None, reason
    next_update = crl.next_update_utc
    if next_update is not None and next_update < now:
        _log.warn(
            "TLS: CRL {crl_path} expired at {next_update}; still refusing the serials it lists",
            crl_path=crl_path,
            next_update=next_update.isoformat(),
        )
    return crl, None


def server_tls_options(
    *,
    ca_cert_path: str,
    cert_path: str,
    key_path: str,
    crl_path: str | None,
    min_tls_version: str = "1.3",
    now: Callable[[], datetime.datetime] | None = None,
    labels: Mapping[str, str] = DEFAULT_LABELS,
) -> ServerTLSOptions:
    """Options for the agent's mTLS listener (see the module docstring for the policy).

    Call :meth:`ServerTLSOptions.reload_crl` on the result to pick up a changed CRL.

    :param labels: what errors call each file (``ca_cert``, ``server_cert``, ``server_key``,
        ``crl_path``): :data:`AGENT_KEYS` names the agent's configuration keys.
    :raises ConfigError: a file is missing, unreadable or malformed, the key does not match the
        certificate, or ``min_tls_version`` is not ``"1.2"``/``"1.3"``.
    """
    names = {**DEFAULT_LABELS, **labels}
    minimum = _tls_version(min_tls_version)
    ca_certs = load_certificates(ca_cert_path, names["ca_cert"])
    cert, key = load_key_pair(
        cert_path, key_path, cert_label=names["server_cert"], key_label=names["server_key"]
    )
    clock = now or (lambda: datetime.datetime.now(datetime.UTC))
    current = clock()
    if cert.not_valid_after_utc < current:
        _log.warn(
            "TLS: {label} {cert_path} expired at {when}: clients will refuse the agent",
            label=names["server_cert"],
            cert_path=cert_path,
            when=cert.not_valid_after_utc.isoformat(),
        )
    return ServerTLSOptions(
        ca_certs=ca_certs,
        crl_path=crl_path,
        now=clock,
        crl_label=names["crl_path"],
        privateKey=key,
        certificate=cert,
        raiseMinimumTo=minimum,
        acceptableProtocols=[HTTP11],
    )


def client_tls_options(
    hostname: str,
    *,
    ca_cert_path: str,
    cert_path: str,
    key_path: str,
    acceptable_protocols: Sequence[bytes] = (HTTP11,),
    labels: Mapping[str, str] | None = None,
) -> IOpenSSLClientConnectionCreator:
    """Options for connecting to an agent: verify it against the CA and ``hostname`` (DNS or
    IP, via service-identity), and present our client certificate.

    :param labels: what errors call the ``ca_cert``, ``cert`` and ``key`` files (configuration
        keys, e.g. ``security.ca_cert_path``); descriptions by default.
    :raises ConfigError: a file is missing, unreadable or malformed, or the key does not match.
    """
    names = {"ca_cert": "CA certificate", "cert": "certificate", "key": "private key"}
    names.update(labels or {})
    ca_certs = load_certificates(ca_cert_path, names["ca_cert"])
    cert, key = load_key_pair(
        cert_path, key_path, cert_label=names["cert"], key_label=names["key"]
    )
    return ssl.optionsForClientTLS(
        hostname,
        trustRoot=_CATrustRoot(ca_certs),
        acceptableProtocols=list(acceptable_protocols) or None,
        extraCertificateOptions={"privateKey": key, "certificate": cert},
    )


# --------------------------------------------------------------------------------------------
# Who is on the other end.


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
