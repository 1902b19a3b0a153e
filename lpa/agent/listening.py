"""The agent's one listening port: what to say and which status to exit with when it fails.

twistd turns a failed ``listen`` into a 40-line traceback; the agent says it in one line that
names the address, the port and what to do, and exits with a status systemd can act on::

    EADDRINUSE      75 (EX_TEMPFAIL)  another process holds the port; systemd retries
    EACCES          77 (EX_NOPERM)    a port below 1024 without the privilege
    EADDRNOTAVAIL   78 (EX_CONFIG)    server.bind is not an address of this host
    anything else   71 (EX_OSERR)
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.internet.error import CannotListenError

from lpa.errors import LpaError

EX_OSERR, EX_TEMPFAIL, EX_NOPERM, EX_CONFIG = 71, 75, 77, 78


class ListenError(LpaError):
    """The agent cannot listen; ``str()`` is the one line to log, ``exit_status`` the status."""

    def __init__(self, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.exit_status = exit_status


def address(host: str, port: int | str) -> str:
    """``host:port``, with brackets around an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen_error(error: CannotListenError, bind: str, port: int) -> ListenError:
    """The one-line explanation of a failed listen on ``bind:port``."""
    cause: Any = error.socketError
    number = getattr(cause, "errno", None)
    reason = getattr(cause, "strerror", None) or str(cause)
    where = address(bind, port)
    if number == errno.EADDRINUSE:
        advice = (
            f"another process holds the port (ss -ltnp 'sport = :{port}' shows which): stop it, "
            "or set server.port"
        )
        status = EX_TEMPFAIL
    elif number == errno.EACCES:
        advice = (
            "ports below 1024 need root or CAP_NET_BIND_SERVICE: grant it, or set server.port "
            "to 1024 or above"
        )
        status = EX_NOPERM
    elif number == errno.EADDRNOTAVAIL:
        advice = (
            f"{bind} is not an address of this host: set server.bind to one of its addresses "
            "(or 0.0.0.0 / ::)"
        )
        status = EX_CONFIG
    else:
        advice, status = "check server.bind and server.port", EX_OSERR
    return ListenError(f"cannot listen on {where}: {reason.lower()}; {advice}", status)
