"""Why a connection to an agent failed, as one sentence an operator can act on.

Twisted hands the relay the transport's cause as a :class:`~twisted.python.failure.Failure`
(an OpenSSL error list, a ``service_identity`` verification error, a refused connect …) and
Autobahn adds its own close text ("peer dropped the TCP connection without previous WebSocket
closing handshake"), which is true of every failure and names none.  This module turns the
cause into the part of the log line that says what happened and, where we know, what to do.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import error
from twisted.python.failure import Failure

#: OpenSSL alert texts the agent sends when it refuses us, and what they mean for an operator
_ALERT_HINTS = (
    ("certificate required", "the agent wants the relay's client certificate"),
    ("unknown ca", "the agent does not trust the CA of the relay's client certificate"),
    ("certificate revoked", "the agent's CRL lists the relay's client certificate"),
    ("certificate expired", "a certificate has expired"),
    ("bad certificate", "the agent refused the relay's client certificate"),
    ("certificate verify failed", "the agent's certificate is not signed by ca_cert_path"),
    ("no application protocol", "the agent offers no http/1.1 in ALPN"),
)

#: causes that say nothing beyond "the connection ended"
_GENERIC = (error.ConnectionDone, error.ConnectionLost, error.ConnectionAborted)


def _openssl_reasons(value: Any) -> list[str]:
    reasons: list[str] = []
    for entry in value.args[0] if value.args and isinstance(value.args[0], list) else []:
        if isinstance(entry, tuple) and entry:
            reasons.append(str(entry[-1]))
    return reasons or [str(value)]


def _tls_sentence(value: Any) -> str:
    reasons = [reason for reason in _openssl_reasons(value) if reason]
    text = "; ".join(reasons) or value.__class__.__name__
    for needle, hint in _ALERT_HINTS:
        if needle in text.lower():
            return f"TLS handshake failed: {text} ({hint})"
    return f"TLS handshake failed: {text}"


def _verification_sentence(value: Any) -> str:
    names = []
    kinds = []
    for mismatch in getattr(value, "errors", ()) or ():
        kinds.append(mismatch.__class__.__name__)
        ident = getattr(mismatch, "mismatched_id", None)
        for attribute in ("hostname", "ip"):
            name = getattr(ident, attribute, None)
            if isinstance(name, bytes):
                name = name.decode("ascii", "replace")
            if name is not None:
                names.append(str(name))
    wanted = ", ".join(repr(name) for name in names) or "the name the relay dials"
    return (
        f"TLS: the agent's certificate is not valid for {wanted} "
        f"({', '.join(kinds) or 'service_identity verification failed'}); its subjectAltName "
        "must carry the hosts.fqdn (or IP address) the relay dials"
    )


def describe_transport_failure(failure: Failure | None) -> str | None:
    """One sentence for the transport's cause, or None when it says nothing useful."""
    if failure is None:
        return None
    value = failure.value
    if failure.check(*_GENERIC):
        return None
    if isinstance(value, VerificationError):
        return _verification_sentence(value)
    if isinstance(value, SSL.Error):
        return _tls_sentence(value)
    if failure.check(error.ConnectionRefusedError):
        return "connection refused: nothing listens on the agent's port"
    if failure.check(error.DNSLookupError):
        return f"cannot resolve the agent's host name ({value})"
    if failure.check(error.TimeoutError):
        return "TCP connect timed out"
    if failure.check(error.UserError):
        return None  # we stopped the attempt ourselves; our own reason is reported instead
    text = str(value).strip() or repr(value)
    return f"{value.__class__.__name__}: {text}"
