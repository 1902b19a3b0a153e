"""Apply the relay's schema (``lpa/sql/*.sql``) to a database: idempotent, one transaction.

The SQL creates the manager's ``job_status``/``job_kind`` enums and ``hosts``, ``patch_jobs``,
``patch_job_hosts`` only when absent, and adds the relay's ``relay_*`` columns to
``patch_job_hosts`` only when missing (see the comments in ``001_relay.sql``).  It runs in ONE
transaction with ``lock_timeout`` set, so against a busy live manager database it either applies
entirely or fails fast with nothing changed, instead of queueing behind (and blocking) the
manager's writers.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from twisted.logger import Logger

from lpa.errors import LpaError

_log = Logger()

#: applied in this order; each file is idempotent on its own
MIGRATIONS: tuple[str, ...] = ("001_relay.sql",)
DEFAULT_LOCK_TIMEOUT_MS = 5000

#: the columns ``001_relay.sql`` adds to ``patch_job_hosts``
RELAY_COLUMNS: tuple[str, ...] = (
    "relay_last_seq",
    "relay_agent_job_id",
    "relay_transport",
    "relay_last_event_at",
    "relay_progress",
    "relay_message",
)


class MigrationError(LpaError):
    """The schema could not be applied; nothing was changed (the transaction rolled back)."""


def migration_sql(name: str) -> str:
    """The text of one packaged SQL file."""
    return resources.files("lpa").joinpath("sql", name).read_text(encoding="utf-8")


def migrate_connection(connection: Any, *, lock_timeout_ms: int = DEFAULT_LOCK_TIMEOUT_MS) -> None:
    """Apply every migration on an open psycopg2 ``connection`` in ONE transaction."""
    import psycopg2

    previous_autocommit = connection.autocommit
    connection.autocommit = False
    try:
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL lock_timeout = %s", (f"{int(lock_timeout_ms)}ms",))
            for name in MIGRATIONS:
                cursor.execute(migration_sql(name))
        connection.commit()
    except psycopg2.Error as error:
        connection.rollback()
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise MigrationError(f"schema migration failed, nothing changed: {first_line}") from error
    finally:
        connection.autocommit = previous_autocommit


def migrate(dsn: str, *, lock_timeout_ms: int = DEFAULT_LOCK_TIMEOUT_MS) -> None:
    """Connect to ``dsn`` and apply the schema (blocking: for the CLI, tests and the demo)."""
    import psycopg2

    try:
        connection = psycopg2.connect(dsn)
    except psycopg2.Error as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise MigrationError(f"cannot connect to the database: {first_line}") from error
    try:
        migrate_connection(connection, lock_timeout_ms=lock_timeout_ms)
    finally:
        connection.close()
    _log.info("relay schema applied ({migrations})", migrations=", ".join(MIGRATIONS))
