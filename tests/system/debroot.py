"""A fresh minimal Debian root to install lpa's packages into, and the caches that keep it fast.

The root is made by ``mmdebstrap --variant=minbase`` from the Debian mirror this machine uses,
once a week, and kept as a tarball; each test extracts a copy.  Every command in the root runs
in its own mount and PID namespace::

    unshare --mount --pid --fork --kill-child --mount-proc=ROOT/proc
      └ sh: tmpfs on ROOT/run and ROOT/tmp, devpts, bind mounts (the .debs on /mnt, the
            PostgreSQL socket directory on /run/postgresql)
            exec chroot ROOT env -i PATH=… sh -c SCRIPT

so nothing is mounted in this machine's namespace (removing the root can never reach through a
mount into the host), /run and /tmp leave no trace in the root, and when the namespace's first
process ends, every process started in it ends too.  The unshare process dies with this one
(``PR_SET_PDEATHSIG``), so an interrupted test leaves no daemon behind.

Cache layout, under ``$LPA_TEST_CACHE`` or ``~/.cache/lpa-test``::

    bookworm-minbase-R-YYYY-Www.tar  the root of this ISO week (R: a hash of the recipe)
    apt-archives/                  what apt downloaded inside roots (python3 …), copied in and out
    debs/<source tree key>/        lpa's .debs per source tree (``debian/make-deb --cache``)
    lintian/<sha256 of the .debs>  lintian's output for those .debs
    logs/                          build and mmdebstrap logs
"""

from __future__ import annotations

import ctypes
import datetime
import glob
import hashlib
import http.client
import json
import os
import re
import shlex
import shutil
import signal
import ssl
import stat
import subprocess
import time
from collections.abc import Iterable, Sequence
from typing import Any

SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
#: bind-mount targets allowed inside the root: tmpfs (/run) or the empty /mnt
_BIND_TARGETS = ("/run/", "/mnt")
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: top-level directories whose content is not the root's files
_NOT_FILES = ("proc", "sys", "dev", "run", "tmp")


def cache_dir() -> str:
    """The test cache directory (created)."""
    path = os.environ.get("LPA_TEST_CACHE") or os.path.expanduser("~/.cache/lpa-test")
    os.makedirs(path, exist_ok=True)
    return path


def host_mirror(sources: Iterable[str] | None = None) -> str:
    """The Debian mirror this machine's apt uses for ``bookworm`` (deb822 or one-line files)."""
    paths = list(sources) if sources is not None else (
        glob.glob("/etc/apt/sources.list") + sorted(glob.glob("/etc/apt/sources.list.d/*"))
    )
    for path in paths:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        for stanza in re.split(r"\n\s*\n", text):
            fields = {
                m.group(1).lower(): m.group(2).strip()
                for m in re.finditer(r"^([A-Za-z-]+):[ \t]*(.*)$", stanza, re.M)
            }
            if SUITE in fields.get("suites", "").split() and "deb" in fields.get("types", ""):
                for uri in fields.get("uris", "").split():
                    if uri.rstrip("/").endswith("/debian"):
                        return uri.rstrip("/")
        for line in text.splitlines():
            words = list(re.sub(r"\[[^]]*\]", "", line).split())
            if (len(words) >= 3 and words[0] == "deb" and words[2] == SUITE
                    and words[1].rstrip("/").endswith("/debian")):
                return words[1].rstrip("/")
    return DEFAULT_MIRROR


def root_tarball(log: str) -> str:
    """This week's minbase root tarball, made with mmdebstrap when missing; others are removed."""
    year, week, _ = datetime.datetime.now(datetime.UTC).date().isocalendar()
    directory = cache_dir()
    mirror = host_mirror()
    # ca-certificates: every real host has it, and apt recommends it, so once a dependency
    # pulled it in (python3 recommends it) apt would keep it after a purge: not lpa's leftover
    options = [
        "--variant=minbase", "--include=ca-certificates", "--skip=cleanup/apt/lists",
        '--aptopt=Acquire::Languages "none"', "--format=tar",
    ]
    recipe = hashlib.sha256(" ".join([*options, mirror]).encode()).hexdigest()[:8]
    path = os.path.join(directory, f"{SUITE}-minbase-{recipe}-{year}-W{week:02d}.tar")
    if os.path.exists(path):
        return path
    partial = f"{path}.{os.getpid()}.partial"
    argv = ["mmdebstrap", *options, SUITE, partial, mirror]
    with open(log, "w") as out:
        completed = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, check=False)
    if completed.returncode != 0:
        raise AssertionError(f"mmdebstrap exited {completed.returncode}:\n{tail(log)}")
    os.replace(partial, path)
    for old in glob.glob(os.path.join(directory, f"{SUITE}-minbase-*.tar")):
        if old != path:
            os.remove(old)
    # a new week, a new package set: the downloads of the old one go
    shutil.rmtree(os.path.join(directory, "apt-archives"), ignore_errors=True)
    return path


def tail(path: str, lines: int = 40) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"


def _die_with_parent() -> None:
    """preexec_fn: the unshare process gets SIGKILL when this test process dies."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class RootProcess:
    """A long-running command in the root (a daemon): its log, its PID, a clean stop."""

    def __init__(self, popen: subprocess.Popen[bytes], log_path: str) -> None:
        self.popen = popen
        self.log_path = log_path

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    def init_pid(self) -> int | None:
        """The host PID of the namespace's first process (the daemon, which the script execs)."""
        try:
            with open(f"/proc/{self.popen.pid}/task/{self.popen.pid}/children") as f:
                children = f.read().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM to the daemon, wait for its exit; SIGKILL the namespace after ``timeout``."""
        pid = self.init_pid()
        if pid is not None and self.running:
            os.kill(pid, signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait(30)


class DebianRoot:
    """An extracted root directory and the way to run commands in it."""

    def __init__(self, path: str) -> None:
        self.path = path

    @classmethod
    def extract(cls, tarball: str, into: str) -> DebianRoot:
        os.makedirs(into, exist_ok=True)
        subprocess.run(["tar", "-xf", tarball, "-C", into, "--numeric-owner"], check=True)
        return cls(into)

    def host_path(self, path: str) -> str:
        """Where ``path`` of the root is on this machine."""
        return os.path.join(self.path, path.lstrip("/"))

    def _argv(self, script: str, binds: Sequence[tuple[str, str]]) -> list[str]:
        root = shlex.quote(self.path)
        lines = [
            "set -e",
            f"mount -t tmpfs -o mode=0755 lpa-run {root}/run",
            f"mount -t tmpfs -o mode=1777 lpa-tmp {root}/tmp",
            f"mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 lpa-pts {root}/dev/pts",
            f"mount --bind {root}/dev/pts/ptmx {root}/dev/ptmx",
        ]
        for source, target in binds:
            if not target.startswith(_BIND_TARGETS):
                raise ValueError(f"bind target {target} would change the root's files")
            lines.append(f"mkdir -p {root}{shlex.quote(target)}")
            lines.append(f"mount --bind {shlex.quote(source)} {root}{shlex.quote(target)}")
        lines.append(
            f"exec chroot {root} /usr/bin/env -i PATH={_PATH} HOME=/root LANG=C.UTF-8 "
            f"DEBIAN_FRONTEND=noninteractive /bin/sh -c {shlex.quote(script)}"
        )
        return [
            "unshare", "--mount", "--pid", "--fork", "--kill-child",
            f"--mount-proc={self.path}/proc", "/bin/sh", "-c", "\n".join(lines),
        ]

    def run(self, script: str, *, binds: Sequence[tuple[str, str]] = (), timeout: float = 900,
            check: bool = True) -> tuple[int, str]:
        """Run ``script`` (sh) in the root; its exit status and output (stdout and stderr)."""
        completed = subprocess.run(
            self._argv(script, binds), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, timeout=timeout, preexec_fn=_die_with_parent, check=False)
        output = completed.stdout.decode(errors="replace")
        if check and completed.returncode != 0:
            raise AssertionError(
                f"in the root, exit {completed.returncode}: {script}\n--- output ---\n{output}"
            )
        return completed.returncode, output

    def spawn(self, script: str, log_path: str, *,
              binds: Sequence[tuple[str, str]] = ()) -> RootProcess:
        """Start ``script`` in the background (it should ``exec`` the daemon); output to a log."""
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                self._argv(script, binds), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,  # noqa: PLW1509  # only sets PDEATHSIG
            )
        return RootProcess(popen, log_path)

    def files(self) -> dict[str, str]:
        """Every path of the root (``etc/lpa/agent.yaml``) with its kind: d, f, l or o."""
        found: dict[str, str] = {}
        for directory, dirs, names in os.walk(self.path):
            rel_dir = os.path.relpath(directory, self.path)
            if rel_dir == ".":
                dirs[:] = [d for d in dirs if d not in _NOT_FILES]
                rel_dir = ""
            for name in dirs + names:
                rel = os.path.join(rel_dir, name)
                mode = os.lstat(os.path.join(directory, name)).st_mode
                found[rel] = (
                    "l" if stat.S_ISLNK(mode) else "d" if stat.S_ISDIR(mode)
                    else "f" if stat.S_ISREG(mode) else "o"
                )
        return found


def unit_line(root: DebianRoot, package: str, key: str) -> str:
    """``key=`` of the unit the package installed (the test runs what systemd would)."""
    with open(root.host_path(f"/lib/systemd/system/{package}.service"), encoding="utf-8") as f:
        text = f.read()
    match = re.search(rf"^{key}=(.*)$", text, re.M)
    assert match is not None, f"{package}.service has no {key}="
    return match.group(1).strip()


class AgentClient:
    """An HTTPS client of the agent in the root, with the dev PKI's relay certificate."""

    def __init__(self, pki: str, port: int) -> None:
        self.pki = pki
        self.port = port

    def context(self, client_certificate: bool = True) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=os.path.join(self.pki, "ca.pem"))
        if client_certificate:
            context.load_cert_chain(os.path.join(self.pki, "client.crt"),
                                    os.path.join(self.pki, "client.key"))
        return context

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        connection = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=20,
                                                 context=self.context())
        try:
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            connection.request(method, path, body=payload, headers=headers)
            response = connection.getresponse()
            return response.status, json.loads(response.read() or b"null")
        finally:
            connection.close()

    def healthy(self) -> bool:
        try:
            return self.request("GET", "/api/v1/health")[0] == 200
        except (OSError, ssl.SSLError, http.client.HTTPException):
            return False

    def refuses_without_certificate(self) -> bool:
        """A client without a certificate gets no HTTP answer (the handshake is refused)."""
        connection = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=20,
                                                 context=self.context(client_certificate=False))
        try:
            connection.request("GET", "/api/v1/health")
            connection.getresponse().read()
        except (OSError, ssl.SSLError, http.client.HTTPException):
            return True
        finally:
            connection.close()
        return False


def wait_for(predicate: object, what: str, timeout: float = 60.0, step: float = 0.5) -> None:
    """Poll ``predicate()`` until it is true (a process start is not on a clock we own)."""
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(step)
