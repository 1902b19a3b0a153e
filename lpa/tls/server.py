"""The agent's side of mutual TLS: the listener's options, its verify callback and the CRL.

See :mod:`lpa.tls` for the policy.  :class:`ServerTLSOptions` builds each context with
:func:`_make_verify_callback` and a :class:`~lpa.tls.trust.CATrustRoot` holding the CRL that
:func:`_check_crl` accepted; :meth:`ServerTLSOptions.reload_crl` swaps both for later handshakes.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attr
from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.logger import Logger

from lpa.errors import ConfigError
from lpa.events import rfc3339
from lpa.tls.files import (
    DEFAULT_LABELS,
    label_of,
    load_certificates,
    load_crl,
    load_key_pair,
    signed_by,
)
from lpa.tls.trust import HTTP11, CATrustRoot
from lpa.tlsaudit import record_refusal, verify_error_kind, verify_error_string

_log = Logger()

#: Twisted annotates its TLS version constants as TLSVersion, so this table does too
_TLS_VERSIONS: dict[str, ssl.TLSVersion] = {
    "1.2": ssl.TLSVersion.TLSv1_2,
    "1.3": ssl.TLSVersion.TLSv1_3,
}

# OpenSSL X509_V_ERR_* codes the verify callback treats specially
_X509_V_ERR_CRL_NOT_YET_VALID = 11
_X509_V_ERR_CRL_HAS_EXPIRED = 12


def _cert_label(cert: crypto.X509) -> str:
    try:
        c = cert.to_cryptography()
        cns = c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        value = cns[0].value if cns else "?"
        cn = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        return f"CN={cn} serial={c.serial_number:x}"
    except Exception:  # pragma: no cover - only for a log line
        return "?"


def _make_verify_callback(fail_closed_reason: str | None) -> Callable[..., bool]:
    """A verify callback that records refusals, tolerates a stale CRL, and can refuse everyone.

    It does not log: the agent's Site logs each refused handshake once, with the peer address,
    throttled (:mod:`lpa.tlsaudit`).
    """

    def verify(
        connection: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int
    ) -> bool:
        if fail_closed_reason is not None:
            if depth > 0 and ok:
                return True  # refuse at the leaf, so the log names the client
            record_refusal(
                connection,
                "every client refused: the CRL is unusable",
                f"{_cert_label(cert)}; {fail_closed_reason}",
            )
            return False
        if not ok and errno in (_X509_V_ERR_CRL_HAS_EXPIRED, _X509_V_ERR_CRL_NOT_YET_VALID):
            return True  # still checked against the stale CRL's entries; warned at load
        if not ok:
            where = f" at chain depth {depth}" if depth else ""
            record_refusal(
                connection,
                verify_error_kind(errno),
                f"{_cert_label(cert)}{where}: {verify_error_string(errno)}",
            )
        return bool(ok)

    return verify


@attr.s(frozen=True, slots=True, auto_attribs=True)
class CrlSummary:
    """What a (re)load of the CRL found, for the log line that says so."""

    path: str | None
    revoked: int | None = None
    next_update: datetime.datetime | None = None
    #: why every client is refused (unusable CRL), or None
    refuse_all: str | None = None

    def describe(self) -> str:
        if self.path is None:
            return "no CRL configured (revoked certificates are not refused)"
        if self.refuse_all is not None:
            return f"CRL unusable, refusing every client: {self.refuse_all}"
        if self.revoked is None:
            return f"CRL {self.path} missing (revoked certificates are not refused)"
        when = self.next_update.isoformat() if self.next_update is not None else "none"
        return f"CRL {self.path}: {self.revoked} revoked serials, next update {when}"


class ServerTLSOptions(ssl.CertificateOptions):
    """CertificateOptions whose contexts carry our verify callback, with a reloadable CRL."""

    def __init__(
        self,
        *,
        ca_certs: Sequence[x509.Certificate],
        crl_path: str | None,
        now: Callable[[], datetime.datetime],
        crl_label: str = "CRL",
        **kwargs: Any,
    ) -> None:
        self._ca_certs = list(ca_certs)
        self._crl_path = crl_path
        self._crl_label = crl_label
        self._now = now
        crl, refuse_all = _check_crl(crl_path, self._ca_certs, now(), crl_label)
        super().__init__(trustRoot=CATrustRoot(self._ca_certs, crl), **kwargs)
        self._verify_callback = _make_verify_callback(refuse_all)
        self.fail_closed_reason: str | None = refuse_all
        self.crl_summary = _summary(crl_path, crl, refuse_all)

    def reload_crl(self) -> bool:
        """Re-read the CRL (after ``lpa pki revoke`` or a fetch) for connections from now on.

        Returns False when the new CRL fails closed (every client is then refused, and that
        was logged); :attr:`crl_summary` says what was read.  The daemon calls this on SIGHUP
        or from a timer.
        """
        crl, refuse_all = _check_crl(self._crl_path, self._ca_certs, self._now(), self._crl_label)
        self.trustRoot = CATrustRoot(self._ca_certs, crl)
        self._verify_callback = _make_verify_callback(refuse_all)
        self.fail_closed_reason = refuse_all
        self.crl_summary = _summary(self._crl_path, crl, refuse_all)
        self._context = None  # the next handshake builds a context with the new store
        return refuse_all is None

    def _makeContext(self, skipCiphers: bool = False) -> SSL.Context:
        ctx = super()._makeContext(skipCiphers=skipCiphers)
        ctx.set_verify(
            SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT | SSL.VERIFY_CLIENT_ONCE,
            self._verify_callback,
        )
        return ctx


def _tls_version(min_tls_version: str) -> ssl.TLSVersion:
    try:
        return _TLS_VERSIONS[str(min_tls_version)]
    except KeyError:
        raise ConfigError(
            f"tls.min_tls_version: must be \"1.2\" or \"1.3\", got {min_tls_version!r}"
        ) from None


def _summary(
    path: str | None, crl: x509.CertificateRevocationList | None, refuse_all: str | None
) -> CrlSummary:
    if crl is None:
        return CrlSummary(path, refuse_all=refuse_all)
    return CrlSummary(path, len(list(crl)), crl.next_update_utc, refuse_all)


def _check_crl(
    crl_path: str | None,
    ca_certs: Sequence[x509.Certificate],
    now: datetime.datetime,
    label: str = "CRL",
) -> tuple[x509.CertificateRevocationList | None, str | None]:
    """(crl to install, reason to refuse everyone)."""
    if crl_path is None:
        _log.warn("TLS: no CRL configured; revoked client certificates are NOT refused")
        return None, None
    if not os.path.exists(crl_path):
        _log.warn(
            "TLS: {label} {crl_path} is missing; revoked client certificates are NOT refused",
            label=label,
            crl_path=crl_path,
        )
        return None, None
    try:
        crl = load_crl(crl_path, label)
    except ConfigError as e:
        _log.error("TLS: {error}; refusing every client (fail closed)", error=str(e))
        return None, str(e)
    if not any(
        crl.issuer == ca.subject
        and signed_by(crl, ca)
        for ca in ca_certs
    ):
        reason = f"{label_of(label)} {crl_path}: not signed by the configured CA"
        _log.error("TLS: {error}; refusing every client (fail closed)", error=reason)
        return None, reason
    next_update = crl.next_update_utc
    if next_update is not None and next_update < now:
        _log.warn(
            "TLS: CRL {crl_path} expired at {next_update}; still refusing the serials it lists",
            crl_path=crl_path,
            next_update=next_update.isoformat(),
        )
    return crl, None


def server_tls_options(
    *,
    ca_cert_path: str,
    cert_path: str,
    key_path: str,
    crl_path: str | None,
    min_tls_version: str = "1.3",
    now: Callable[[], datetime.datetime] | None = None,
    labels: Mapping[str, str] = DEFAULT_LABELS,
) -> ServerTLSOptions:
    """Options for the agent's mTLS listener (see the module docstring for the policy).

    Call :meth:`ServerTLSOptions.reload_crl` on the result to pick up a changed CRL.

    :param labels: what errors call each file (``ca_cert``, ``server_cert``, ``server_key``,
        ``crl_path``): :data:`AGENT_KEYS` names the agent's configuration keys.
    :raises ConfigError: a file is missing, unreadable or malformed, the key does not match the
        certificate, or ``min_tls_version`` is not ``"1.2"``/``"1.3"``.
    """
    names = {**DEFAULT_LABELS, **labels}
    minimum = _tls_version(min_tls_version)
    ca_certs = load_certificates(ca_cert_path, names["ca_cert"])
    cert, key = load_key_pair(
        cert_path, key_path, cert_label=names["server_cert"], key_label=names["server_key"]
    )
    clock = now or (lambda: datetime.datetime.now(datetime.UTC))
    current = clock()
    if cert.not_valid_after_utc < current:
        _log.warn(
            "TLS: {label} {cert_path} expired at {when}: clients will refuse the agent",
            label=names["server_cert"],
            cert_path=cert_path,
            when=cert.not_valid_after_utc.isoformat(),
        )
    return ServerTLSOptions(
        ca_certs=ca_certs,
        crl_path=crl_path,
        now=clock,
        crl_label=names["crl_path"],
        privateKey=key,
        certificate=cert,
        raiseMinimumTo=minimum,
        acceptableProtocols=[HTTP11],
    )


def crl_health(crl_path: str | None, ca_path: str, now: float) -> dict[str, Any]:
    """The health fields of the original about the CRL: status, age and next update.

    ``missing`` (no CRL configured or no file: revocation is not enforced), ``invalid`` (does
    not parse or is not signed by the CA: every client is refused), ``expired`` (past its next
    update: the serials it lists are still refused) or ``valid``.
    """
    fields: dict[str, Any] = {
        "crl_status": "missing",
        "crl_age_seconds": None,
        "crl_next_update": None,
    }
    if not crl_path or not os.path.exists(crl_path):
        return fields
    try:
        crl = load_crl(crl_path)
        cas = load_certificates(ca_path)
    except ConfigError:
        fields["crl_status"] = "invalid"
        return fields
    if not any(signed_by(crl, ca) for ca in cas):
        fields["crl_status"] = "invalid"
        return fields
    fields["crl_age_seconds"] = max(0, int(now - crl.last_update_utc.timestamp()))
    next_update = crl.next_update_utc
    if next_update is not None:
        fields["crl_next_update"] = rfc3339(next_update)
    expired = next_update is not None and next_update.timestamp() < now
    fields["crl_status"] = "expired" if expired else "valid"
    return fields
