"""Checks of the files a config names: exist, readable, parse, key matches certificate.

Used through :mod:`lpa.configkit` by ``lpa config check`` and by both daemons at start.  Every
error is one line naming the config key and the file: ``tls.server_cert: /etc/lpa/server.pem: no
such file``, ``security.agent_client_key_path: …: does not match the certificate of …``.
"""

from __future__ import annotations

import datetime
import enum
from typing import Any

from lpa.errors import ConfigError


class Pem(enum.Enum):
    """What a file a config names must hold."""

    CERTIFICATE = "a PEM or DER certificate"
    CERTIFICATES = "PEM or DER certificates"
    PRIVATE_KEY = "a PEM or DER private key"
    CRL = "a PEM or DER certificate revocation list"


def _read_named(key: str, file: str) -> bytes:
    try:
        with open(file, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise ConfigError(f"{key}: {file}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{key}: {file}: is a directory, not a file") from None
    except OSError as error:
        reason = (error.strerror or str(error)).lower()
        raise ConfigError(f"{key}: {file}: cannot read: {reason}") from None
    if not data.strip():
        raise ConfigError(f"{key}: {file}: the file is empty")
    return data


def check_file(key: str, file: str, kind: Pem) -> Any:
    """Read ``file`` (named by ``key``) and parse it as ``kind``; return what it holds.

    :raises ConfigError: ``"{key}: {file}: no such file"``, ``… cannot read: permission
        denied``, ``… not a PEM or DER certificate`` …
    """
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    data = _read_named(key, file)
    pem = b"-----BEGIN" in data
    try:
        if kind is Pem.CERTIFICATE:
            return (x509.load_pem_x509_certificate(data) if pem
                    else x509.load_der_x509_certificate(data))
        if kind is Pem.CERTIFICATES:
            return (x509.load_pem_x509_certificates(data) if pem
                    else [x509.load_der_x509_certificate(data)])
        if kind is Pem.CRL:
            return x509.load_pem_x509_crl(data) if pem else x509.load_der_x509_crl(data)
        if pem:
            return serialization.load_pem_private_key(data, password=None)
        return serialization.load_der_private_key(data, password=None)
    except TypeError:
        raise ConfigError(f"{key}: {file}: encrypted keys are not supported") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{key}: {file}: not {kind.value}") from None


def _spki(public_key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


def check_key_pair(cert_key: str, cert_file: str, key_key: str, key_file: str) -> list[str]:
    """Check a certificate and its private key: both parse and belong together.

    :returns: warnings (an expired or not yet valid certificate).
    """
    certificate = check_file(cert_key, cert_file, Pem.CERTIFICATE)
    private_key = check_file(key_key, key_file, Pem.PRIVATE_KEY)
    if _spki(private_key.public_key()) != _spki(certificate.public_key()):
        raise ConfigError(
            f"{key_key}: {key_file}: does not match the certificate of {cert_key} ({cert_file})")
    return validity_warnings(cert_key, cert_file, [certificate])


def validity_warnings(key: str, file: str, certificates: list[Any],
                      now: datetime.datetime | None = None) -> list[str]:
    """One warning per certificate outside its validity period."""
    now = now or datetime.datetime.now(datetime.UTC)
    found = []
    for certificate in certificates:
        subject = certificate.subject.rfc4514_string() or "(no subject)"
        if certificate.not_valid_after_utc < now:
            found.append(f"{key}: {file}: certificate {subject} expired on "
                         f"{certificate.not_valid_after_utc:%Y-%m-%d}")
        elif certificate.not_valid_before_utc > now:
            found.append(f"{key}: {file}: certificate {subject} is not valid before "
                         f"{certificate.not_valid_before_utc:%Y-%m-%d}")
    return found
