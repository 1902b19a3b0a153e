"""Why a TLS handshake failed, in words an operator knows.

OpenSSL says little on the server side: a refused client certificate ends the handshake with
"certificate verify failed", whatever the cause.  The server's verify callback
(:mod:`lpa.tls`) therefore records its verdict per connection with :func:`record_refusal`, and
:func:`handshake_failure_reason` reads it back when the connection ends, falling back to
OpenSSL's own error for what no callback saw (no certificate at all, a TLS version below the
minimum, plain HTTP on the TLS port, the client refusing the agent's certificate)::

    verify callback ─▶ record_refusal(connection, "certificate revoked", "CN=… serial=…")
    handshake fails ─▶ channel.connectionLost(SSL.Error) ─▶ handshake_failure_reason(…)
                                                         ─▶ one throttled warn line
"""

from __future__ import annotations

import weakref
from typing import Any

import attr
from OpenSSL import SSL

#: OpenSSL X509_V_ERR_* codes and what they mean for a client certificate
_VERIFY_KINDS = {
    2: "unknown CA",  # unable to get issuer certificate
    3: "no CRL for the certificate's issuer",
    7: "bad certificate signature",
    9: "certificate not yet valid",
    10: "certificate expired",
    18: "unknown CA",  # self-signed certificate
    19: "unknown CA",  # self-signed certificate in chain
    20: "unknown CA",  # unable to get local issuer certificate
    21: "unknown CA",  # unable to verify the first certificate
    23: "certificate revoked",
}

#: OpenSSL reason strings (lower case, substring) and what they mean on the server side
_SSL_REASONS = (
    ("peer did not return a certificate", "no client certificate"),
    ("certificate required", "no client certificate"),
    ("http request", "plain HTTP on the TLS port"),
    ("wrong version number", "not a TLS client"),
    ("unknown protocol", "not a TLS client"),
    ("packet length too long", "not a TLS client"),
    ("unsupported protocol", "TLS version below tls.min_tls_version"),
    ("version too low", "TLS version below tls.min_tls_version"),
    ("no protocols available", "TLS version below tls.min_tls_version"),
    ("no shared cipher", "no common cipher"),
    ("no suitable signature algorithm", "no common signature algorithm"),
    ("no application protocol", "no common ALPN protocol (the agent speaks http/1.1)"),
    ("alert unknown ca", "the client does not trust the agent's certificate"),
    ("alert bad certificate", "the client does not trust the agent's certificate"),
    ("alert certificate unknown", "the client does not trust the agent's certificate"),
    ("alert certificate expired", "the client does not trust the agent's certificate"),
    ("alert handshake failure", "the client gave up the handshake"),
    ("certificate verify failed", "client certificate not accepted"),
)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class HandshakeRefusal:
    """A refused handshake: ``kind`` groups (and throttles) log lines, ``detail`` names more."""

    kind: str
    detail: str = ""

    def describe(self) -> str:
        return f"{self.kind} ({self.detail})" if self.detail else self.kind


_verdicts: weakref.WeakKeyDictionary[Any, HandshakeRefusal] = weakref.WeakKeyDictionary()


def record_refusal(connection: SSL.Connection, kind: str, detail: str = "") -> None:
    """Called by the verify callback: this connection is refused for ``kind``."""
    if connection not in _verdicts:  # the first refusal (the leaf's) is the one to report
        _verdicts[connection] = HandshakeRefusal(kind, detail)


def verify_error_kind(errno: int) -> str:
    """An operator's name for an X509 verification error of a client certificate."""
    return _VERIFY_KINDS.get(errno) or f"certificate not accepted: {verify_error_string(errno)}"


def verify_error_string(errno: int) -> str:
    """OpenSSL's text for an X509_V_ERR_* code."""
    try:
        from OpenSSL._util import ffi, lib

        text: str = ffi.string(lib.X509_verify_cert_error_string(errno)).decode("ascii", "replace")
        return text
    except Exception:  # pragma: no cover - cosmetic
        return f"X509 error {errno}"


def _ssl_reason_text(error: SSL.Error) -> str:
    parts = []
    for entry in error.args[0] if error.args and isinstance(error.args[0], list) else []:
        if isinstance(entry, tuple) and entry:
            parts.append(str(entry[-1]))
    return "; ".join(parts) or str(error)


def handshake_failure_reason(transport: Any, failure: Any) -> HandshakeRefusal | None:
    """Why the handshake on ``transport`` failed, or None when nothing refused it.

    ``failure`` is the reason the connection ended.  A client that closes before finishing
    (a port probe, a client giving up) is None: nothing was refused.
    """
    handle = None
    get_handle = getattr(transport, "getHandle", None)
    if get_handle is not None:
        try:
            handle = get_handle()
        except Exception:
            handle = None
    if handle is not None:
        try:
            recorded = _verdicts.pop(handle, None)
        except TypeError:  # not weak-referenceable: not an OpenSSL connection
            recorded = None
        if recorded is not None:
            return recorded
    error = getattr(failure, "value", failure)
    if not isinstance(error, SSL.Error):
        return None
    text = _ssl_reason_text(error)
    lowered = text.lower()
    for needle, kind in _SSL_REASONS:
        if needle in lowered:
            return HandshakeRefusal(kind, "" if kind == "no client certificate" else text)
    return HandshakeRefusal("TLS error", text)
