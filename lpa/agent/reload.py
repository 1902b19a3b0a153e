"""Re-reading the CRL and the IP whitelist: hourly, and on SIGHUP (``systemctl reload``).

Each re-read logs one line saying what was read, so an operator who revoked a certificate or
edited the whitelist sees that the agent took it::

    SIGHUP: re-read CRL /etc/lpa/crl.pem: 3 revoked serials, next update 2027-01-01T00:00:00+00:00;
    IP whitelist /etc/lpa/whitelist.yaml: 4 networks          (one line)

A file that turns unusable fails closed (the TLS options refuse every client, the whitelist
every address) and the line is an error saying so and what to fix.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from lpa.agent.whitelist import IPWhitelist

_log = Logger()

#: how often the CRL and the IP whitelist are re-read without a SIGHUP
RELOAD_INTERVAL_SECONDS = 3600.0


class Reloader:
    """Re-reads the CRL (``tls_options.reload_crl``) and the IP whitelist, and says so."""

    def __init__(
        self, tls_options: Any, whitelist: IPWhitelist | None, whitelist_path: str | None = None
    ) -> None:
        self._tls_options = tls_options
        self._whitelist = whitelist
        self._whitelist_path = whitelist_path
        self._started = False

    def reload(self, trigger: str | None = None) -> bool:
        """Re-read both files; False when either is now unusable (and every peer refused).

        ``trigger`` leads the log line (``SIGHUP``); by default the first call (the timer's, at
        start) is ``start`` and later ones ``hourly``.
        """
        if trigger is None:
            trigger = "hourly" if self._started else "start"
        self._started = True
        read: list[str] = []
        failed: list[str] = []
        if self._tls_options is None:
            read.append("no CRL (TLS off)")
        else:
            ok = self._tls_options.reload_crl()
            summary = self._tls_options.crl_summary.describe()
            (read if ok else failed).append(summary)
        if self._whitelist is None:
            read.append("no IP whitelist")
        elif self._whitelist.reload():
            read.append(
                f"IP whitelist {self._whitelist_path}: {len(self._whitelist.networks)} networks"
            )
        else:
            failed.append(
                f"IP whitelist unusable, denying every address: {self._whitelist.deny_reason}"
            )
        if failed:
            _log.error(
                "{trigger}: re-read failed, fix the file and reload again: {failed}{rest}",
                trigger=trigger,
                failed="; ".join(failed),
                rest=f" (also re-read: {'; '.join(read)})" if read else "",
            )
            return False
        _log.info(
            "{trigger}: {verb} {read}",
            trigger=trigger,
            verb="read" if trigger == "start" else "re-read",
            read="; ".join(read),
        )
        return True
