"""When a package-manager command starts changing the package database.

A mutating run has two phases.  While the manager resolves and downloads, stopping it changes
nothing on the host: cancel and timeout terminate it at once.  Once it has started its package
transaction (dpkg unpacking and configuring, rpm's transaction), stopping it leaves the database
half done ("dpkg was interrupted, you must manually run 'dpkg --configure -a'", or duplicate rpm
entries): from then on cancel and timeout let it finish (see :mod:`lpa.agent.context`).

A backend hands each mutating command a :class:`TransactionWatch` saying how its manager shows
that moment:

=====================  ===================================================================
``ALWAYS``             the whole command is the transaction (``dpkg --configure -a``)
apt (status fd 3)      the first ``pmstatus:`` line: apt hands the packages to dpkg
dnf, yum               ``Running transaction`` (dnf 5: ``[n/m] Prepare transaction``, …)
zypper                 the first package install or removal (``install-resolvable``)
apk, pacman            the first ``(n/m) Upgrading …`` / ``:: Processing package changes``
=====================  ===================================================================

The dpkg lock is no signal for apt: apt takes ``/var/lib/dpkg/lock`` when it starts, downloads
included, and passes it to dpkg only for the unpack; its status fd tells the two apart.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import attr


@attr.s(frozen=True, slots=True, auto_attribs=True)
class TransactionWatch:
    """Which output line of a command says its package transaction has begun.

    :param fd: the command fd whose lines are watched (1 stdout, 3 apt's status fd); 0 means
        the transaction starts with the command.
    :param patterns: regular expressions; a line matching one (``re.search``) starts it.
    :param name: what the transaction is, for the job's events ("dpkg", "rpm").
    """

    fd: int
    patterns: tuple[re.Pattern[str], ...] = ()
    name: str = "package"

    @property
    def always(self) -> bool:
        return self.fd == 0

    def begins(self, fd: int, line: str) -> bool:
        """Whether ``line`` (from ``fd``) says the transaction has begun."""
        return fd == self.fd and any(p.search(line) for p in self.patterns)


def watch(fd: int, patterns: Iterable[str], name: str, flags: int = 0) -> TransactionWatch:
    return TransactionWatch(fd, tuple(re.compile(p, flags) for p in patterns), name)


#: the command is a transaction from its first instruction (``dpkg --configure -a``)
ALWAYS = TransactionWatch(0, (), "dpkg")

#: apt with ``-o APT::Status-Fd=3``: dpkg's work is reported as ``pmstatus`` lines
APT = watch(3, [r"^pmstatus:"], "dpkg")

#: dnf 4 and yum log "Running transaction" right before rpm runs; dnf 5 numbers its steps
DNF = watch(
    1,
    [
        r"^\s*Running transaction\s*$",
        (
            r"^\[\s*\d+/\d+\] (Prepare transaction|Installing|Upgrading|Removing|Erasing|"
            r"Downgrading|Reinstalling)"
        ),
    ],
    "rpm",
    re.IGNORECASE,
)

#: zypper: plain output "(1/3) Installing: …", --xmlout <progress id="install-resolvable" …>
ZYPPER = watch(
    1,
    [r'id="(install|remove)-resolvable"', r"^\(\s*\d+/\d+\) (Installing|Removing)\b"],
    "rpm",
)

#: apk: "(1/5) Upgrading musl (…)"; it fetches each package right before installing it
APK = watch(
    1,
    [
        (
            r"^\(\s*\d+/\d+\) (Installing|Upgrading|Downgrading|Replacing|Reinstalling|"
            r"Purging|Removing|Updating)\b"
        ),
    ],
    "apk",
)

#: pacman: after the downloads and checks, ":: Processing package changes..."
PACMAN = watch(1, [r"^:: Processing package changes"], "pacman")
