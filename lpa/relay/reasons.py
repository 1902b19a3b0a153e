"""Why a request to an agent failed, as a few plain words for log lines and ``error_message``.

Twisted's web client wraps the real cause in lists of ``Failure`` objects
(``ResponseNeverReceived([Failure(ConnectionLost(...))])``), whose ``str()`` is a ``repr`` no
operator should have to read.  :func:`describe_error` unwraps them and names the cause::

    ConnectionRefusedError          → "connection refused"
    ResponseNeverReceived([Failure(ConnectionLost)])
                                    → "the connection was lost before an answer"
    OpenSSL.SSL.Error([(…, 'certificate verify failed')])
                                    → "TLS handshake failed (certificate verify failed)"
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

_LOST = (neterror.ConnectionLost, neterror.ConnectionDone, neterror.ConnectionAborted)


def _cause(value: BaseException) -> BaseException:
    """The innermost cause inside Twisted's web client wrappers (the first one of a list)."""
    seen = 0
    while isinstance(value, _WRAPPERS) and seen < 10:
        reasons = getattr(value, "reasons", None) or []
        if not reasons:
            break
        first = reasons[0]
        value = first.value if isinstance(first, Failure) else first
        seen += 1
    return value


def _tls_reason(value: BaseException) -> str | None:
    """The OpenSSL reason strings of a TLS failure, or None when it is not one."""
    module = type(value).__module__
    if not (module.startswith("OpenSSL") or module.startswith("service_identity")):
        return None
    args: Any = value.args[0] if value.args else None
    if isinstance(args, list):
        texts = [str(entry[-1]) for entry in args if isinstance(entry, tuple) and entry]
        if texts:
            return ", ".join(texts)
    text = str(value).strip()
    return text.splitlines()[0] if text else type(value).__name__


def describe_error(value: BaseException | Failure) -> str:
    """A few lowercase words saying why a request failed (no trailing period)."""
    if isinstance(value, Failure):
        value = value.value
    lost_before_answer = isinstance(value, _newclient.ResponseNeverReceived)
    cause = _cause(value)
    tls = _tls_reason(cause)
    if tls is not None:
        return f"TLS handshake failed ({tls})"
    for kind, words in _PLAIN:
        if isinstance(cause, kind):
            return words
    if isinstance(cause, _LOST):
        return "the connection was lost before an answer" if lost_before_answer else (
            "the connection was lost"
        )
    text = str(cause).strip()
    if not text or "<twisted.python.failure.Failure" in text:
        return type(cause).__name__
    return f"{type(cause).__name__}: {text.splitlines()[0]}"
