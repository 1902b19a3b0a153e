"""Mutual TLS for the agent (server side) and its clients (relay, CLI, tests).

Everything is built on pyOpenSSL through :mod:`twisted.internet.ssl`, with cryptography objects
handed to OpenSSL wherever pyOpenSSL accepts them, so that pyOpenSSL 26 raises no
DeprecationWarning on our paths (pyOpenSSL 26 deprecates its X509/PKey objects).

Server handshake policy (the original's, with its gaps closed):

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

The package by file: :mod:`~lpa.tls.files` reads certificates, keys and CRLs;
:mod:`~lpa.tls.trust` is what both ends trust; :mod:`~lpa.tls.server` the agent's listener
options, verify callback and CRL; :mod:`~lpa.tls.client` the clients' options;
:mod:`~lpa.tls.peer` who is on the other end.  Import from :mod:`lpa.tls` itself.
"""


from __future__ import annotations

from lpa.tls.client import client_tls_options
from lpa.tls.files import (
    AGENT_KEYS,
    DEFAULT_LABELS,
    load_certificate,
    load_certificates,
    load_crl,
    load_key_pair,
    load_private_key,
    signed_by,
)
from lpa.tls.peer import PeerIdentity, identity_allowed, negotiated_protocol, peer_identity
from lpa.tls.server import CrlSummary, ServerTLSOptions, crl_health, server_tls_options
from lpa.tls.trust import HTTP11, CATrustRoot

__all__ = [
    "AGENT_KEYS",
    "DEFAULT_LABELS",
    "HTTP11",
    "CATrustRoot",
    "CrlSummary",
    "PeerIdentity",
    "ServerTLSOptions",
    "client_tls_options",
    "crl_health",
    "identity_allowed",
    "load_certificate",
    "load_certificates",
    "load_crl",
    "load_key_pair",
    "load_private_key",
    "negotiated_protocol",
    "peer_identity",
    "server_tls_options",
    "signed_by",
]
