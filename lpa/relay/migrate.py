"""``lpa db migrate``: create the relay's tables and columns in the manager's database.

``--dsn`` wins; otherwise the ``[database] url`` of the manager's ``config.toml`` (``--config``,
default ``$PATCH_MANAGER_CONFIG`` or ``/etc/patch-manager/config.toml``) is used.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from lpa.relay.config import load_relay_config
from lpa.relay.schema import DEFAULT_LOCK_TIMEOUT_MS, MIGRATIONS, migrate


def add_parser(subparsers: Any) -> None:
    """Register ``lpa db migrate``."""
    parser = subparsers.add_parser(
        "db", help="manage the relay's PostgreSQL schema",
        description="Manage the relay's PostgreSQL schema in the manager's database.")
    actions = parser.add_subparsers(dest="db_action", metavar="ACTION", required=True)
    migrate_parser = actions.add_parser(
        "migrate", help="create missing tables and relay columns (idempotent)",
        description="Create the manager's job tables when absent and add the relay's relay_* "
        "columns to patch_job_hosts when missing, in one transaction. Safe to run twice and "
        "against a live manager database.")
    migrate_parser.add_argument(
        "--dsn", help="PostgreSQL URL (default: [database] url of the config file)")
    migrate_parser.add_argument(
        "--config", help="the manager's config.toml (default $PATCH_MANAGER_CONFIG or "
        "/etc/patch-manager/config.toml); used only without --dsn")
    migrate_parser.add_argument(
        "--lock-timeout-ms", type=int, default=DEFAULT_LOCK_TIMEOUT_MS,
        help=f"give up if a table lock is not granted in this time (default {DEFAULT_LOCK_TIMEOUT_MS})")
    migrate_parser.set_defaults(func=_main)


def _main(args: argparse.Namespace, out: TextIO | None = None) -> int:
    dsn = args.dsn or load_relay_config(args.config).database_url
    migrate(dsn, lock_timeout_ms=args.lock_timeout_ms)
    print(f"lpa: schema up to date ({', '.join(MIGRATIONS)})", file=out or sys.stdout)
    return 0
