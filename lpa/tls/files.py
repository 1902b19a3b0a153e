"""Reading certificates, keys and CRLs: every failure is ONE line naming the path.

Errors lead with the configuration key when the caller passes one (``labels``), then the path,
worded as :mod:`lpa.configfiles` words the same checks at start:
``tls.server_cert: /etc/lpa/server.pem: no such file``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

from lpa.errors import ConfigError

#: public key types that can sign a CRL
_SIGNING_KEYS = (
    dsa.DSAPublicKey, ec.EllipticCurvePublicKey, ed448.Ed448PublicKey, ed25519.Ed25519PublicKey,
    rsa.RSAPublicKey,
)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ConfigError(f"{label_of(what)} {path}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{label_of(what)} {path}: cannot read: {e.strerror or e}") from None


def load_certificate(path: str, what: str = "certificate") -> x509.Certificate:
    """The first PEM (or DER) certificate in ``path``; :class:`ConfigError` otherwise."""
    data = _read(path, what)
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError:
        raise ConfigError(f"{label_of(what)} {path}: not a PEM or DER certificate") from None


def load_certificates(path: str, what: str = "CA certificate") -> list[x509.Certificate]:
    """Every PEM certificate in ``path`` (a CA bundle may hold several)."""
    data = _read(path, what)
    try:
        if b"-----BEGIN" in data:
            certs = x509.load_pem_x509_certificates(data)
        else:
            certs = [x509.load_der_x509_certificate(data)]
    except ValueError:
        raise ConfigError(f"{label_of(what)} {path}: not a PEM or DER certificate") from None
    return certs


def load_private_key(path: str, what: str = "private key") -> PrivateKeyTypes:
    """An unencrypted PEM (or DER) private key; :class:`ConfigError` otherwise."""
    data = _read(path, what)
    try:
        if b"-----BEGIN" in data:
            return serialization.load_pem_private_key(data, password=None)
        return serialization.load_der_private_key(data, password=None)
    except TypeError:
        raise ConfigError(f"{label_of(what)} {path}: encrypted keys are not supported") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{label_of(what)} {path}: not a PEM or DER private key") from None


def load_crl(path: str, what: str = "CRL") -> x509.CertificateRevocationList:
    """A PEM or DER CRL; :class:`ConfigError` if it does not parse."""
    data = _read(path, what)
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError:
        raise ConfigError(
            f"{label_of(what)} {path}: not a PEM or DER certificate revocation list"
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
            f"{label_of(key_label)} {key_path}: does not match the certificate of {cert_label} "
            f"({cert_path})"
        )
    return cert, key


_CONFIG_KEY = re.compile(r"[a-z_]+(\.[a-z0-9_]+)+")


def label_of(what: str) -> str:
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
