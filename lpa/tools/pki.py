"""A small PKI for tests and quick starts: ``lpa pki init|revoke|issue-client``.

``init`` writes, into one directory, the files the agent and the relay read::

    ca.pem  ca.key (0600)                 the CA (EC P-256)
    server.pem  server.key.pem (0600)     the agent: DNS SANs for names, IP SANs for addresses
    client.crt  client.key (0600)         the relay, CN ``lpa-relay``
    crl.pem                               an empty CRL signed by the CA

``revoke`` adds a certificate's serial to ``crl.pem`` (re-signed, CRL number + 1).  This is not a
production CA: keys are unencrypted, and there is one CA and no intermediates.

Like every ``lpa`` tool module, this one holds the operations and the command that runs them;
it is a little over 400 lines because the certificate recipes (CA, leaf, CRL) are best read
next to the files they end up in.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence

import attr
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lpa.errors import ConfigError, LpaError
from lpa.tls import load_certificate, load_crl, load_key_pair, load_private_key, signed_by

DEFAULT_AGENT_HOSTS = ("localhost", "127.0.0.1")
RELAY_COMMON_NAME = "lpa-relay"
DEFAULT_DAYS = 825
CA_DAYS = 3650
CRL_DAYS = 365

Clock = Callable[[], datetime.datetime]


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class PkiError(LpaError):
    """A PKI command cannot proceed (file exists, wrong CA …); one line."""


@attr.s(frozen=True, slots=True, auto_attribs=True)
class PkiPaths:
    """Every file ``init_pki`` writes."""

    directory: str
    ca_cert: str
    ca_key: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    crl: str

    @classmethod
    def in_directory(cls, directory: str) -> PkiPaths:
        def j(name: str) -> str:
            return os.path.join(directory, name)

        return cls(
            directory=directory,
            ca_cert=j("ca.pem"),
            ca_key=j("ca.key"),
            server_cert=j("server.pem"),
            server_key=j("server.key.pem"),
            client_cert=j("client.crt"),
            client_key=j("client.key"),
            crl=j("crl.pem"),
        )

    def all_files(self) -> tuple[str, ...]:
        return (
            self.ca_cert, self.ca_key, self.server_cert, self.server_key,
            self.client_cert, self.client_key, self.crl,
        )


# --------------------------------------------------------------------------------------------
# Pure builders (cryptography objects in, cryptography objects out).


def generate_key() -> ec.EllipticCurvePrivateKey:
    """An EC P-256 key: small and fast to make, accepted by every TLS stack we talk to."""
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for host in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


def make_ca(
    common_name: str = "lpa CA",
    *,
    days: int = CA_DAYS,
    now: datetime.datetime | None = None,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA certificate and its key."""
    key = key or generate_key()
    start = now or _utcnow()
    name = _name(common_name)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - datetime.timedelta(minutes=5))
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue_certificate(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    *,
    hosts: Sequence[str] = (),
    server: bool = False,
    client: bool = True,
    days: int = DEFAULT_DAYS,
    now: datetime.datetime | None = None,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf certificate signed by the CA; ``hosts`` become DNS or IP SANs."""
    key = key or generate_key()
    start = now or _utcnow()
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
        [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or start - datetime.timedelta(minutes=5))
        .not_valid_after(not_after or start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if hosts:
        builder = builder.add_extension(_san(hosts), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def make_crl(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    revoked: Iterable[tuple[int, datetime.datetime]] = (),
    *,
    number: int = 1,
    days: int = CRL_DAYS,
    now: datetime.datetime | None = None,
) -> x509.CertificateRevocationList:
    """A CRL signed by the CA listing ``(serial, revocation date)`` pairs."""
    start = now or _utcnow()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(start - datetime.timedelta(minutes=5))
        .next_update(start + datetime.timedelta(days=days))
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    for serial, when in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    return builder.sign(ca_key, hashes.SHA256())


# --------------------------------------------------------------------------------------------
# Files.


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_file(path: str, data: bytes, mode: int = 0o644) -> None:
    """Write atomically (temp file + rename) with ``mode`` set before any byte lands."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def init_pki(
    directory: str,
    agent_hosts: Sequence[str] = DEFAULT_AGENT_HOSTS,
    *,
    days: int = DEFAULT_DAYS,
    force: bool = False,
    relay_name: str = RELAY_COMMON_NAME,
    now: datetime.datetime | None = None,
) -> PkiPaths:
    """Create a CA, an agent server certificate, a relay client certificate and an empty CRL.

    :raises PkiError: a file already exists and ``force`` is false, or ``agent_hosts`` is empty.
    """
    if days < 1:
        raise PkiError(f"--days must be at least 1, got {days}")
    hosts = list(dict.fromkeys(h.strip() for h in agent_hosts if h.strip()))
    if not hosts:
        raise PkiError("at least one --agent-host is needed")
    paths = PkiPaths.in_directory(directory)
    os.makedirs(directory, exist_ok=True)
    existing = [p for p in paths.all_files() if os.path.exists(p)]
    if existing and not force:
        raise PkiError(f"{existing[0]} already exists (use --force to overwrite)")
    start = now or _utcnow()
    ca_cert, ca_key = make_ca(days=max(days, CA_DAYS), now=start)
    server_cert, server_key = issue_certificate(
        ca_cert, ca_key, hosts[0], hosts=hosts, server=True, client=False, days=days, now=start
    )
    client_cert, client_key = issue_certificate(
        ca_cert, ca_key, relay_name, days=days, now=start
    )
    crl = make_crl(ca_cert, ca_key, now=start)
    write_file(paths.ca_key, key_pem(ca_key), 0o600)
    write_file(paths.ca_cert, cert_pem(ca_cert))
    write_file(paths.server_key, key_pem(server_key), 0o600)
    write_file(paths.server_cert, cert_pem(server_cert))
    write_file(paths.client_key, key_pem(client_key), 0o600)
    write_file(paths.client_cert, cert_pem(client_cert))
    write_file(paths.crl, crl.public_bytes(serialization.Encoding.PEM))
    return paths


def _load_ca(paths: PkiPaths) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert, key = load_key_pair(paths.ca_cert, paths.ca_key)
    if not isinstance(key, ec.EllipticCurvePrivateKey):  # pragma: no cover - our own files
        raise PkiError(f"{paths.ca_key}: only EC CA keys are supported")
    return cert, key


def issue_client(
    directory: str,
    name: str,
    *,
    days: int = DEFAULT_DAYS,
    force: bool = False,
    now: datetime.datetime | None = None,
) -> tuple[str, str]:
    """Issue a client certificate ``NAME.crt`` / ``NAME.key`` (0600) from the directory's CA."""
    if not name or "/" in name or name.startswith("."):
        raise PkiError(f"client name {name!r} must be a plain file name")
    paths = PkiPaths.in_directory(directory)
    ca_cert, ca_key = _load_ca(paths)
    cert_path = os.path.join(directory, f"{name}.crt")
    key_path = os.path.join(directory, f"{name}.key")
    for p in (cert_path, key_path):
        if os.path.exists(p) and not force:
            raise PkiError(f"{p} already exists (use --force to overwrite)")
    cert, key = issue_certificate(ca_cert, ca_key, name, days=days, now=now)
    write_file(key_path, key_pem(key), 0o600)
    write_file(cert_path, cert_pem(cert))
    return cert_path, key_path


def revoke(directory: str, cert_path: str, *, now: datetime.datetime | None = None) -> int:
    """Add the certificate's serial to the directory's ``crl.pem``; returns the serial.

    Revoking an already revoked certificate is a no-op.  A certificate from another CA is
    refused (its serial would mean nothing in this CRL).
    """
    paths = PkiPaths.in_directory(directory)
    ca_cert, ca_key = _load_ca(paths)
    cert = load_certificate(cert_path)
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise PkiError(
            f"{cert_path}: not issued by the CA in {directory} ({type(e).__name__})"
        ) from e
    start = now or _utcnow()
    revoked: dict[int, datetime.datetime] = {}
    number = 1
    if os.path.exists(paths.crl):
        old = load_crl(paths.crl)
        if not signed_by(old, ca_cert):
            raise PkiError(f"{paths.crl}: not signed by the CA in {directory}")
        for entry in old:
            revoked[entry.serial_number] = entry.revocation_date_utc
        try:
            number = old.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
        except x509.ExtensionNotFound:
            number = 1
    if cert.serial_number in revoked:
        return cert.serial_number
    revoked[cert.serial_number] = start
    crl = make_crl(ca_cert, ca_key, sorted(revoked.items()), number=number, now=start)
    write_file(paths.crl, crl.public_bytes(serialization.Encoding.PEM))
    return cert.serial_number


# --------------------------------------------------------------------------------------------
# CLI: ``lpa pki ...``


def _cmd_init(args: argparse.Namespace) -> int:
    paths = init_pki(
        args.directory, args.agent_host or DEFAULT_AGENT_HOSTS, days=args.days, force=args.force
    )
    for p in paths.all_files():
        print(p)
    return 0


def _cmd_revoke(args: argparse.Namespace) -> int:
    serial = revoke(args.directory, args.cert)
    print(f"revoked serial {serial:x}; CRL written to {PkiPaths.in_directory(args.directory).crl}")
    return 0


def _cmd_issue_client(args: argparse.Namespace) -> int:
    for p in issue_client(args.directory, args.name, days=args.days, force=args.force):
        print(p)
    return 0


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``lpa pki`` and its subcommands."""
    pki = subparsers.add_parser(
        "pki", help="make a test/quick-start CA, agent and relay certificates, CRL"
    )
    sub = pki.add_subparsers(dest="pki_command", metavar="COMMAND", required=True)

    init = sub.add_parser("init", help="create ca.pem, server.pem, client.crt, crl.pem and keys")
    init.add_argument("directory", metavar="DIR")
    init.add_argument(
        "--agent-host", action="append", metavar="NAME",
        help="agent DNS name or IP for the server certificate's SANs (repeatable; "
        "default: localhost and 127.0.0.1)",
    )
    init.add_argument("--days", type=int, default=DEFAULT_DAYS, help="leaf validity in days")
    init.add_argument("--force", action="store_true", help="overwrite existing files")
    init.set_defaults(func=_cmd_init)

    rev = sub.add_parser("revoke", help="add a certificate's serial to DIR/crl.pem")
    rev.add_argument("directory", metavar="DIR")
    rev.add_argument("cert", metavar="CERT", help="PEM certificate to revoke")
    rev.set_defaults(func=_cmd_revoke)

    issue = sub.add_parser("issue-client", help="issue DIR/NAME.crt and DIR/NAME.key")
    issue.add_argument("directory", metavar="DIR")
    issue.add_argument("name", metavar="NAME", help="client common name and file stem")
    issue.add_argument("--days", type=int, default=DEFAULT_DAYS)
    issue.add_argument("--force", action="store_true")
    issue.set_defaults(func=_cmd_issue_client)


__all__ = [
    "ConfigError",
    "PkiError",
    "PkiPaths",
    "generate_key",
    "init_pki",
    "issue_certificate",
    "issue_client",
    "load_private_key",
    "make_ca",
    "make_crl",
    "revoke",
]
