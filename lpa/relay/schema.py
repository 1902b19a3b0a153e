"""Apply the relay's schema (``lpa/sql/NNN_*.sql``, in order) to a database, in one transaction.

Every file is idempotent and additive: ``001_relay.sql`` creates the manager's
``job_status``/``job_kind`` enums and ``hosts``, ``patch_jobs``, ``patch_job_hosts`` only when
absent, and adds the relay's ``relay_*`` columns to ``patch_job_hosts`` only when missing;
``002_relay_writepath.sql`` adds the roll-up's ``relay_*_count`` columns to ``patch_jobs``, the
``relay_output_pending`` table and the partial index ``relay_open_host_rows`` (see the comments
in each file).  A new migration is one more file, ``002_….sql``: :func:`migration_names`
finds it.  All files run in ONE transaction with ``lock_timeout`` set, so against a busy live
manager database they either apply entirely or fail fast with nothing changed, instead of queueing
behind (and blocking) the manager's writers.

What each file did is read off the catalog before and after it (tables, columns, enum types and
values, indexes, constraints, functions, triggers), so ``lpa db migrate`` can say "created table
…, added column …" or "already in place" per file without the SQL having to report anything.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import Any

import attr
from twisted.logger import Logger

from lpa.errors import LpaError

_log = Logger()

DEFAULT_LOCK_TIMEOUT_MS = 5000
_MIGRATION_NAME = re.compile(r"\d{3}_[A-Za-z0-9_]+\.sql\Z")


def migration_names() -> tuple[str, ...]:
    """The packaged ``lpa/sql/NNN_*.sql`` files, in the order they are applied.

    :raises RuntimeError: a ``.sql`` file not named ``NNN_name.sql`` (it would never be applied).
    """
    directory = resources.files("lpa").joinpath("sql")
    names = [entry.name for entry in directory.iterdir() if entry.name.endswith(".sql")]
    for name in names:
        if not _MIGRATION_NAME.match(name):
            raise RuntimeError(f"lpa/sql/{name}: migration files are named NNN_name.sql")
    return tuple(sorted(names))


#: applied in this order; each file is idempotent on its own
MIGRATIONS: tuple[str, ...] = migration_names()

#: the columns ``001_relay.sql`` adds to ``patch_job_hosts``
RELAY_COLUMNS: tuple[str, ...] = (
    "relay_last_seq",
    "relay_agent_job_id",
    "relay_transport",
    "relay_last_event_at",
    "relay_progress",
    "relay_message",
)

#: the columns ``004_relay_deadline.sql`` adds to ``patch_job_hosts`` (the JOB_NOT_FOUND deadline)
RELAY_DEADLINE_COLUMNS: tuple[str, ...] = ("relay_missing_since", "relay_missing_agent_job_id")

#: the columns ``005_relay_unreachable.sql`` adds to ``patch_job_hosts`` (the unreachable deadline)
RELAY_UNREACHABLE_COLUMNS: tuple[str, ...] = (
    "relay_unreachable_since",
    "relay_unreachable_agent_job_id",
)

#: the columns ``002_relay_writepath.sql`` adds to ``patch_job_hosts``
RELAY_WRITEPATH_COLUMNS: tuple[str, ...] = ("relay_output_end", "relay_snapshot_digest")

#: the columns ``002_relay_writepath.sql`` adds to ``patch_jobs`` (the roll-up's counts)
RELAY_JOB_COLUMNS: tuple[str, ...] = (
    "relay_host_count",
    "relay_succeeded_count",
    "relay_failed_count",
    "relay_cancelled_count",
)


class MigrationError(LpaError):
    """The schema could not be applied; nothing was changed (the transaction rolled back)."""


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Applied:
    """One migration file and what it changed (empty: it was already in place)."""

    name: str
    changes: tuple[str, ...]


def migration_sql(name: str) -> str:
    """The text of one packaged SQL file."""
    return resources.files("lpa").joinpath("sql", name).read_text(encoding="utf-8")


# --- what a file changed ----------------------------------------------------------------------

#: kind -> query returning one text per object of the public schema
_CATALOG: dict[str, str] = {
    "enum types": "SELECT typname FROM pg_type WHERE typnamespace = 'public'::regnamespace "
                  "AND typtype = 'e'",
    "enum values": "SELECT t.typname || '.' || e.enumlabel FROM pg_enum e "
                   "JOIN pg_type t ON t.oid = e.enumtypid "
                   "WHERE t.typnamespace = 'public'::regnamespace",
    "tables": "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace "
              "AND relkind IN ('r', 'p')",
    "columns": "SELECT c.relname || '.' || a.attname FROM pg_attribute a "
               "JOIN pg_class c ON c.oid = a.attrelid "
               "WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p') "
               "AND a.attnum > 0 AND NOT a.attisdropped",
    "indexes": "SELECT t.relname || '.' || i.relname FROM pg_index x "
               "JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid "
               "WHERE t.relnamespace = 'public'::regnamespace",
    "constraints": "SELECT c.relname || '.' || k.conname FROM pg_constraint k "
                   "JOIN pg_class c ON c.oid = k.conrelid "
                   "WHERE k.connamespace = 'public'::regnamespace",
    "functions": "SELECT proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace",
    "triggers": "SELECT c.relname || '.' || t.tgname FROM pg_trigger t "
                "JOIN pg_class c ON c.oid = t.tgrelid "
                "WHERE c.relnamespace = 'public'::regnamespace AND NOT t.tgisinternal",
}

#: kinds reported only for objects that existed before (a new table brings its own columns)
_OF_EXISTING_OBJECT = {"enum values": "enum types", "columns": "tables", "indexes": "tables",
                       "constraints": "tables", "triggers": "tables"}


def _catalog(cursor: Any) -> dict[str, set[str]]:
    found = {}
    for kind, sql in _CATALOG.items():
        cursor.execute(sql)
        found[kind] = {row[0] for row in cursor.fetchall()}
    return found


def _changes(before: dict[str, set[str]], after: dict[str, set[str]]) -> tuple[str, ...]:
    lines = []
    for kind in _CATALOG:
        added = after[kind] - before[kind]
        owner = _OF_EXISTING_OBJECT.get(kind)
        if owner is not None:  # "table.column": only where the table was there before
            added = {name for name in added if name.split(".", 1)[0] in before[owner]}
        if added:
            verb = "added" if owner else "created"
            lines.append(f"{verb} {kind}: {', '.join(sorted(added))}")
        removed = before[kind] - after[kind]
        if removed:
            lines.append(f"removed {kind}: {', '.join(sorted(removed))}")
    return tuple(lines)


# --- applying ---------------------------------------------------------------------------------


def migrate_connection(
    connection: Any, *, lock_timeout_ms: int = DEFAULT_LOCK_TIMEOUT_MS,
    names: tuple[str, ...] | None = None,
) -> list[Applied]:
    """Apply every migration on an open psycopg2 ``connection`` in ONE transaction.

    :returns: what each file changed, in order.
    :raises MigrationError: nothing was changed (rolled back); the first line of the reason.
    """
    import psycopg2

    names = MIGRATIONS if names is None else names
    previous_autocommit = connection.autocommit
    connection.autocommit = False
    applied = []
    try:
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL lock_timeout = %s", (f"{int(lock_timeout_ms)}ms",))
            before = _catalog(cursor)
            for name in names:
                cursor.execute(migration_sql(name))
                after = _catalog(cursor)
                applied.append(Applied(name, _changes(before, after)))
                before = after
        connection.commit()
    except psycopg2.Error as error:
        connection.rollback()
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise MigrationError(f"schema migration failed, nothing changed: {first_line}") from error
    finally:
        connection.autocommit = previous_autocommit
    return applied


def migrate(dsn: str, *, lock_timeout_ms: int = DEFAULT_LOCK_TIMEOUT_MS) -> list[Applied]:
    """Connect to ``dsn`` and apply the schema (blocking: for the CLI, tests and the demo)."""
    import psycopg2

    try:
        connection = psycopg2.connect(dsn)
    except psycopg2.Error as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise MigrationError(f"cannot connect to the database: {first_line}") from error
    try:
        applied = migrate_connection(connection, lock_timeout_ms=lock_timeout_ms)
    finally:
        connection.close()
    for step in applied:
        _log.info("relay schema {name}: {changes}", name=step.name,
                  changes="; ".join(step.changes) or "already in place")
    return applied
