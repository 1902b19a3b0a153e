"""``lpa db migrate``: create the relay's tables and columns in the manager's database.

``--dsn`` wins; otherwise the ``[database] url`` of the manager's ``config.toml`` (``--config``,
default ``$PATCH_MANAGER_CONFIG`` or ``/etc/patch-manager/config.toml``) is used.  It prints, per
migration file, what it created or added, or that the file was already in place.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from lpa.relay.config import load_relay_config
from lpa.relay.schema import DEFAULT_LOCK_TIMEOUT_MS, Applied, migrate


def add_parser(subparsers: Any) -> None:
    """Register ``lpa db migrate``."""
    parser = subparsers.add_parser(
        "db", help="manage the relay's PostgreSQL schema",
        description="Manage the relay's PostgreSQL schema in the manager's database.")
    actions = parser.add_subparsers(dest="db_action", metavar="ACTION", required=True)
    migrate_parser = actions.add_parser(
        "migrate", help="create missing tables and relay columns (idempotent)",
        description="Apply the relay's migration files in order, in one transaction: create the "
        "manager's job tables when absent and add the relay's relay_* columns to "
        "patch_job_hosts when missing. Prints what each file created or added. Safe to run "
        "twice and against a live manager database.")
    migrate_parser.add_argument(
        "--dsn", help="PostgreSQL URL (default: [database] url of the config file)")
    migrate_parser.add_argument(
        "--config", help="the manager's config.toml (default $PATCH_MANAGER_CONFIG or "
        "/etc/patch-manager/config.toml); used only without --dsn")
    migrate_parser.add_argument(
        "--lock-timeout-ms", type=int, default=DEFAULT_LOCK_TIMEOUT_MS,
        help="give up if a table lock is not granted in this time "
        f"(default {DEFAULT_LOCK_TIMEOUT_MS})")
    migrate_parser.set_defaults(func=_main)


def report(applied: list[Applied], database: str) -> str:
    """What ``lpa db migrate`` prints: each file's changes, then one summary line."""
    lines = []
    for step in applied:
        if step.changes:
            lines.append(f"{step.name}:")
            lines.extend(f"    {change}" for change in step.changes)
        else:
            lines.append(f"{step.name}: already in place, nothing to do")
    changed = [step.name for step in applied if step.changes]
    if changed:
        lines.append(f"lpa: schema of database {database} migrated ({', '.join(changed)} "
                     "changed it); it is up to date")
    else:
        lines.append(f"lpa: schema of database {database} was already up to date; nothing changed")
    return "\n".join(lines) + "\n"


def _database_name(dsn: str) -> str:
    from psycopg2.extensions import parse_dsn

    try:
        return parse_dsn(dsn).get("dbname") or "(default)"
    except Exception:  # only for the message; connecting reports a bad DSN
        return "(default)"


def _main(args: argparse.Namespace, out: TextIO | None = None) -> int:
    dsn = args.dsn or load_relay_config(args.config).database_url
    applied = migrate(dsn, lock_timeout_ms=args.lock_timeout_ms)
    (out or sys.stdout).write(report(applied, _database_name(dsn)))
    return 0
