"""The clients' side of mutual TLS (relay, CLI, tests): verify the agent, show our certificate."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator

from lpa.tls.files import load_certificates, load_key_pair
from lpa.tls.trust import HTTP11, CATrustRoot


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
        trustRoot=CATrustRoot(ca_certs),
        acceptableProtocols=list(acceptable_protocols) or None,
        extraCertificateOptions={"privateKey": key, "certificate": cert},
    )
