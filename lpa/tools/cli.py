"""The ``lpa`` console script: one argparse tree, one module per subcommand.

Each module in :data:`_SUBCOMMAND_MODULES` exposes ``add_parser(subparsers) -> None`` that adds
its subcommand and sets ``func`` (``args -> int`` exit status) with ``set_defaults``.  Add a
subcommand by appending its module name to the tuple.

An :class:`~lpa.errors.LpaError` raised by a subcommand prints ``lpa: error: <one line>`` and
exits 2 for a :class:`~lpa.errors.ConfigError` (bad configuration or input files), 1 otherwise;
never a traceback.  Unexpected exceptions keep their traceback: they are bugs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from lpa import __version__
from lpa.errors import ConfigError, LpaError

#: modules that each add one subcommand; others append theirs here
_SUBCOMMAND_MODULES: tuple[str, ...] = (
    "lpa.tools.pki",
    "lpa.tools.configcheck",
    "lpa.relay.migrate",
    "lpa.tools.client",
    "lpa.tools.dispatch",
    "lpa.tools.demo",
)

EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130


def build_parser(modules: Sequence[str] = _SUBCOMMAND_MODULES) -> argparse.ArgumentParser:
    """The full parser; a module that fails to import is reported and left out, not fatal."""
    parser = argparse.ArgumentParser(
        prog="lpa",
        description="lpa: a Linux patch agent and a live job-status relay (tools).",
    )
    parser.add_argument("--version", action="version", version=f"lpa {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            print(f"lpa: warning: subcommands of {name} unavailable: {e}", file=sys.stderr)
            continue
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lpa``; returns the exit status (argparse usage errors exit 2 itself)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:  # pragma: no cover - every subcommand sets func
        parser.print_help(sys.stderr)
        return EXIT_CONFIG
    try:
        return int(func(args) or 0)
    except ConfigError as e:
        _error(e)
        return EXIT_CONFIG
    except LpaError as e:
        _error(e)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("lpa: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _error(error: Exception) -> None:
    text = " ".join(str(error).split()) or type(error).__name__
    print(f"lpa: error: {text}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
