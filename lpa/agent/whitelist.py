"""The original's IP whitelist file (``whitelist.path``), IPv4 and IPv6, failing closed.

Format (unchanged from the original)::

    entries: ["192.168.1.0/24", "10.0.0.5", "fd00::/8", "host.internal"]

Addresses and CIDR blocks of either family are accepted (the original denied every IPv6 peer);
hostnames are resolved when the file is loaded, through an injectable resolver.  A hostname
that does not resolve is skipped with a warning.  A file that cannot be read or parsed, or holds
an entry that is neither an address, a block nor a hostname, gives a whitelist that denies
every address and logs why (fail closed).  :meth:`IPWhitelist.reload` re-reads the file; the
daemon calls it on SIGHUP or from a timer, and the same fail-closed rule applies.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Iterable, Sequence

import yaml
from twisted.logger import Logger

from lpa.errors import ConfigError

_log = Logger()

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
#: hostname -> the addresses it resolves to (strings); raises OSError when it does not resolve
Resolver = Callable[[str], Sequence[str]]

_HOSTNAME = re.compile(
    r"^(?=.{1,253}\.?$)([A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)"
    r"(\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*\.?$"
)


def system_resolver(hostname: str) -> list[str]:
    """Every address ``getaddrinfo`` gives for ``hostname`` (blocking: load time only)."""
    infos = socket.getaddrinfo(hostname, None, proto=socket.IPPROTO_TCP)
    return list(dict.fromkeys(str(info[4][0]).split("%", 1)[0] for info in infos))


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """Parse a peer address; IPv4-mapped IPv6 becomes IPv4, a ``%zone`` is dropped."""
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0].strip("[]"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def parse_entries(
    entries: Iterable[object], resolver: Resolver, source: str
) -> tuple[list[Network], list[str]]:
    """(networks, warnings) for the file's entries; ConfigError for an invalid entry."""
    networks: list[Network] = []
    warnings: list[str] = []
    for entry in entries:
        if not isinstance(entry, str) or not entry.strip():
            raise ConfigError(f"{source}: entry {entry!r} is not an address, block or hostname")
        text = entry.strip()
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
            continue
        except ValueError:
            pass
        looks_numeric = text.replace(".", "").isdigit()  # a bad IPv4 address, not a name
        if "/" in text or ":" in text or looks_numeric or not _HOSTNAME.match(text):
            raise ConfigError(f"{source}: entry {text!r} is not an address, block or hostname")
        try:
            resolved = resolver(text)
        except (OSError, UnicodeError) as e:
            warnings.append(f"{source}: hostname {text} does not resolve ({e}); skipped")
            continue
        for address in resolved:
            ip = _address(address)
            if ip is not None:
                networks.append(ipaddress.ip_network(ip))
    return networks, warnings


def parse_whitelist(text: str, source: str, resolver: Resolver) -> tuple[list[Network], list[str]]:
    """Parse the YAML file's text; ConfigError (one line) on anything invalid."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML: {str(e).splitlines()[0]}") from None
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise ConfigError(f"{source}: must be a mapping with an 'entries' list")
    unknown = sorted(str(k) for k in document if k != "entries")
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]} (only 'entries' is allowed)")
    entries = document.get("entries") or []
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: entries must be a list")
    return parse_entries(entries, resolver, source)


class IPWhitelist:
    """Which peer addresses may talk to the agent at all (checked before TLS identity)."""

    def __init__(
        self,
        networks: Sequence[Network],
        *,
        path: str | None = None,
        resolver: Resolver = system_resolver,
        deny_reason: str | None = None,
    ) -> None:
        self._networks = tuple(networks)
        self._path = path
        self._resolver = resolver
        self._deny_reason = deny_reason

    @classmethod
    def from_file(cls, path: str, *, resolver: Resolver = system_resolver) -> IPWhitelist:
        """Load ``path``; never raises: a bad file gives a deny-all whitelist that logged why."""
        whitelist = cls((), path=path, resolver=resolver, deny_reason="not loaded yet")
        whitelist.reload()
        return whitelist

    @classmethod
    def deny_all(cls, reason: str, *, path: str | None = None) -> IPWhitelist:
        """A whitelist that refuses every address."""
        return cls((), path=path, deny_reason=reason)

    @property
    def networks(self) -> tuple[Network, ...]:
        return self._networks

    @property
    def deny_reason(self) -> str | None:
        """Why every address is refused (file unusable), or None."""
        return self._deny_reason

    def reload(self) -> bool:
        """Re-read the file; True if it loaded.  On failure every address is denied."""
        if self._path is None:
            return self._deny_reason is None
        try:
            try:
                with open(self._path, encoding="utf-8") as f:
                    text = f.read()
            except FileNotFoundError:
                raise ConfigError(f"{self._path}: file not found") from None
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"{self._path}: cannot read: {e}") from None
            networks, warnings = parse_whitelist(text, self._path, self._resolver)
        except ConfigError as e:
            self._networks, self._deny_reason = (), str(e)
            _log.error(
                "IP whitelist unusable, denying every address (fail closed): {reason}",
                reason=str(e),
            )
            return False
        for warning in warnings:
            _log.warn("IP whitelist: {problem}", problem=warning)
        self._networks, self._deny_reason = tuple(networks), None
        if not networks:
            _log.warn("IP whitelist {path} allows no address", path=self._path)
        _log.info(
            "IP whitelist {path} loaded: {count} networks", path=self._path, count=len(networks)
        )
        return True

    def allows(self, ip: str) -> bool:
        """True if ``ip`` (v4, v6, v4-mapped v6) is in an allowed network."""
        if self._deny_reason is not None:
            return False
        address = _address(ip)
        if address is None:
            return False
        # `in` does not compare families (an IPv4 address is "in" ::/0): check the version too
        return any(
            address.version == network.version and address in network
            for network in self._networks
        )
