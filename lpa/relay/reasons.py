"""Why a request or a connection to an agent failed, in words an operator can act on.

Twisted hands the relay the cause wrapped: the web client in lists of ``Failure`` objects
(``ResponseNeverReceived([Failure(ConnectionLost(...))])``, whose ``str()`` is a ``repr`` no
operator should read), the WebSocket transport as a ``Failure`` of an OpenSSL error list or a
``service_identity`` verification error; and Autobahn adds its own close text ("peer dropped the
TCP connection without previous WebSocket closing handshake"), true of every failure and naming
none.  One set of rules unwraps the cause and names it, for two kinds of line::

    describe_error(error)             a few lowercase words, for sentences built around them
                                      (a poll: "agent … did not answer GET …: connection refused")
        ConnectionRefusedError          → "connection refused"
        ResponseNeverReceived([Failure(ConnectionLost)])
                                        → "the connection was lost before an answer"
        OpenSSL.SSL.Error([(…, 'certificate verify failed')])
                                        → "TLS handshake failed (certificate verify failed)"

    describe_transport_failure(f)     one sentence for a WebSocket that failed, with what to do
                                      where we know; None when the cause says nothing beyond
                                      "the connection ended"
        ConnectionRefusedError          → "connection refused: nothing listens on the agent's port"
        OpenSSL alert "unknown ca"      → "TLS handshake failed: … (the agent does not trust …)"
        service_identity mismatch       → "TLS: the agent's certificate is not valid for …"
"""

from __future__ import annotations

from typing import Any

from twisted.internet import error as neterror
from twisted.python.failure import Failure
from twisted.web import _newclient

_WRAPPERS = (
    _newclient.ResponseNeverReceived,
    _newclient.ResponseFailed,
    _newclient.RequestTransmissionFailed,
    _newclient.RequestGenerationFailed,
)

#: checked in order: the first class the cause is an instance of names it
_PLAIN: tuple[tuple[type[BaseException], str], ...] = (
    (neterror.ConnectionRefusedError, "connection refused"),
    (neterror.DNSLookupError, "host name not found"),
    (neterror.NoRouteError, "no route to the host"),
    (neterror.TCPTimedOutError, "the TCP connection timed out"),
    (neterror.TimeoutError, "timed out"),
    (neterror.ConnectingCancelledError, "the connection attempt was cancelled"),
    (ConnectionRefusedError, "connection refused"),
    (ConnectionResetError, "the connection was reset"),
    (TimeoutError, "timed out"),
)

#: causes that say nothing beyond "the connection ended"
_LOST = (neterror.ConnectionLost, neterror.ConnectionDone, neterror.ConnectionAborted)

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


def _cause(value: BaseException) -> BaseException:
    """The innermost cause inside Twisted's web client wrappers (the first one of a list)."""
    seen = 0
    while isinstance(value, _WRAPPERS) and seen < 10:
        reasons = getattr(value, "reasons", None) or []
        if not reasons:
            break
        first = reasons[0]
        inner = first.value if isinstance(first, Failure) else first
        if not isinstance(inner, BaseException):
            break
        value = inner
        seen += 1
    return value


def _is_verification(value: BaseException) -> bool:
    return type(value).__module__.startswith("service_identity")


def _tls_reasons(value: BaseException) -> list[str] | None:
    """OpenSSL's reason strings of a TLS failure, or None when it is not one."""
    module = type(value).__module__
    if not (module.startswith("OpenSSL") or _is_verification(value)):
        return None
    args: Any = value.args[0] if value.args else None
    if isinstance(args, list):
        texts = [str(entry[-1]) for entry in args if isinstance(entry, tuple) and entry]
        if texts:
            return texts
    text = str(value).strip()
    return [text.splitlines()[0] if text else type(value).__name__]


def _first_line(value: BaseException) -> str:
    """``Class: first line`` of an error, never a ``Failure`` repr."""
    text = str(value).strip()
    if not text or "<twisted.python.failure.Failure" in text:
        return type(value).__name__
    return f"{type(value).__name__}: {text.splitlines()[0]}"


def describe_error(value: BaseException | Failure) -> str:
    """A few lowercase words saying why a request failed (no trailing period)."""
    error = value.value if isinstance(value, Failure) else value
    if error is None:  # a Failure always holds its exception; typed as optional
        return "an unknown error"
    lost_before_answer = isinstance(error, _newclient.ResponseNeverReceived)
    cause = _cause(error)
    tls = _tls_reasons(cause)
    if tls is not None:
        return f"TLS handshake failed ({', '.join(tls)})"
    for kind, words in _PLAIN:
        if isinstance(cause, kind):
            return words
    if isinstance(cause, _LOST):
        return "the connection was lost before an answer" if lost_before_answer else (
            "the connection was lost"
        )
    return _first_line(cause)


def describe_transport_failure(failure: Failure | None) -> str | None:
    """One sentence for the WebSocket transport's cause, or None when it says nothing useful."""
    if failure is None or failure.value is None:
        return None
    value = _cause(failure.value)
    if isinstance(value, _LOST):
        return None
    if _is_verification(value):
        return _verification_sentence(value)
    tls = _tls_reasons(value)
    if tls is not None:
        return _tls_sentence("; ".join(r for r in tls if r) or type(value).__name__)
    if isinstance(value, (neterror.ConnectionRefusedError, ConnectionRefusedError)):
        return "connection refused: nothing listens on the agent's port"
    if isinstance(value, neterror.DNSLookupError):
        return f"cannot resolve the agent's host name ({value})"
    if isinstance(value, neterror.TimeoutError):
        return "TCP connect timed out"
    if isinstance(value, neterror.UserError):
        return None  # we stopped the attempt ourselves; our own reason is reported instead
    return _first_line(value)


def _tls_sentence(text: str) -> str:
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
