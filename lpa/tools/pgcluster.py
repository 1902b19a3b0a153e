"""A throwaway PostgreSQL cluster in a directory: for the test suite and the demo.

``initdb`` and ``postgres`` refuse to run as root, so when we are root every PostgreSQL command
runs as the ``postgres`` user (``runuser -u postgres --``) in a directory that user owns, socket
directory included.  The server listens on a unix socket only (``listen_addresses=''``), with
fsync off: fast, private, and nothing on the loopback network to collide with.

Usage::

    cluster = PostgresCluster()          # a fresh temporary directory
    cluster.start()
    dsn = cluster.create_database("relay_test")   # postgresql:///relay_test?host=/tmp/…&port=…
    …
    cluster.destroy()                    # stop and remove the directory

The calls block (``subprocess``): use them at set-up and tear-down, not inside a running service.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from urllib.parse import quote

from lpa.errors import LpaError

#: the socket-file number (``.s.PGSQL.<port>``); nothing listens on TCP
DEFAULT_PORT = 5432
SUPERUSER = "postgres"
_DB_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class PostgresNotFound(LpaError):
    """No ``initdb``/``pg_ctl`` in ``/usr/lib/postgresql/*/bin`` or on ``PATH``."""


class PostgresClusterError(LpaError):
    """A PostgreSQL command failed; the message holds its output and the log tail."""


def find_bin_dir() -> str:
    """The directory holding ``initdb`` and ``pg_ctl``: the newest Debian install, else PATH."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda path: [int(p) if p.isdigit() else 0 for p in path.split("/")[-2].split(".")],
        reverse=True,
    )
    for directory in candidates:
        if all(os.access(os.path.join(directory, tool), os.X_OK) for tool in ("initdb", "pg_ctl")):
            return directory
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return os.path.dirname(on_path)
    raise PostgresNotFound("PostgreSQL server binaries (initdb, pg_ctl) not found")


class PostgresCluster:
    """One private cluster: ``start()``, ``stop()``, ``restart()``, ``create_database(name)``."""

    def __init__(
        self,
        directory: str | None = None,
        *,
        bin_dir: str | None = None,
        port: int = DEFAULT_PORT,
    ) -> None:
        self.bin_dir = bin_dir or find_bin_dir()
        self._owns_directory = directory is None
        self.directory = directory or tempfile.mkdtemp(prefix="lpa-pg-")
        self.data_dir = os.path.join(self.directory, "data")
        self.socket_dir = os.path.join(self.directory, "sock")
        self.log_path = os.path.join(self.directory, "postgres.log")
        self.port = port
        self._as_postgres = os.geteuid() == 0
        self.running = False

    # -- commands ---------------------------------------------------------------------------

    def _command(self, tool: str, *args: str) -> list[str]:
        argv = [os.path.join(self.bin_dir, tool), *args]
        return ["runuser", "-u", SUPERUSER, "--", *argv] if self._as_postgres else argv

    def _run(self, tool: str, *args: str) -> str:
        completed = subprocess.run(
            self._command(tool, *args),
            cwd=self.directory,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            check=False,
        )
        if completed.returncode != 0:
            raise PostgresClusterError(
                f"{tool} exited {completed.returncode}: {completed.stdout.strip()[-2000:]}"
                f"{self._log_tail()}"
            )
        return completed.stdout

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as log:
                tail = log.read()[-2000:]
        except OSError:
            return ""
        return f"\n--- {self.log_path} ---\n{tail}"

    def _prepare(self) -> None:
        os.makedirs(self.socket_dir, exist_ok=True)
        if self._as_postgres:
            entry = pwd.getpwnam(SUPERUSER)
            for path in (self.directory, self.socket_dir):
                os.chown(path, entry.pw_uid, entry.pw_gid)
            os.chmod(self.directory, 0o700)
        self._run(
            "initdb", "-D", self.data_dir, "-U", SUPERUSER, "--auth=trust",
            "-E", "UTF8", "--locale=C", "--no-sync",
        )

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Initialise the data directory on first use and start the server (waits until up)."""
        if self.running:
            return
        if not os.path.exists(os.path.join(self.data_dir, "PG_VERSION")):
            self._prepare()
        options = (
            f"-k {self.socket_dir} -p {self.port} -c listen_addresses='' -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=100"
        )
        self._run("pg_ctl", "-D", self.data_dir, "-l", self.log_path, "-o", options, "-w", "start")
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast`` disconnects clients; ``immediate`` is a crash)."""
        if not self.running:
            return
        self._run("pg_ctl", "-D", self.data_dir, "-m", mode, "-w", "stop")
        self.running = False

    def restart(self) -> None:
        """Stop (fast) and start again: every client connection is dropped."""
        self.stop()
        self.start()

    def destroy(self) -> None:
        """Stop the server and remove the directory if this object created it."""
        try:
            self.stop()
        finally:
            if self._owns_directory:
                shutil.rmtree(self.directory, ignore_errors=True)

    # -- databases --------------------------------------------------------------------------

    def dsn(self, database: str = "postgres") -> str:
        """A libpq URL for ``database`` over this cluster's unix socket."""
        return (
            f"postgresql://{SUPERUSER}@/{database}"
            f"?host={quote(self.socket_dir, safe='')}&port={self.port}"
        )

    def create_database(self, name: str) -> str:
        """Create an empty database ``name`` (lowercase identifier) and return its DSN."""
        if not _DB_NAME.match(name):
            raise ValueError(f"database name must be a lowercase identifier, got {name!r}")
        import psycopg2  # here, so importing this module needs no driver

        connection = psycopg2.connect(self.dsn())
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """Drop ``name``, disconnecting its sessions first."""
        if not _DB_NAME.match(name):
            raise ValueError(f"database name must be a lowercase identifier, got {name!r}")
        import psycopg2

        connection = psycopg2.connect(self.dsn())
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            connection.close()
