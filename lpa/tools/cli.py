"""The ``lpa`` console script: one argparse tree, one module per subcommand.

Each module in :data:`_SUBCOMMAND_MODULES` exposes ``add_parser(subparsers) -> None`` that adds
its subcommand and sets ``func`` (``args -> int`` exit status) with ``set_defaults``.  Add a
subcommand by appending its module name to the tuple.

An :class:`~lpa.errors.LpaError` raised by a subcommand prints ``lpa: error: <one line>`` and
exits 2 for a :class:`~lpa.errors.ConfigError` (bad configuration or input files), 1 otherwise;
never a traceback.  Ctrl-C (``KeyboardInterrupt``, also raised by :mod:`lpa.tools.runner` for a
subcommand on the reactor) prints ``lpa: interrupted`` and exits 130.  A closed pipe
(``lpa agent … patches | head``) ends quietly with 141, as a tool killed by SIGPIPE would.
Unexpected exceptions keep their traceback: they are bugs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Sequence

from lpa import __version__
from lpa.errors import ConfigError, LpaError

#: modules that each add one subcommand; others append theirs here
_SUBCOMMAND_MODULES: tuple[str, ...] = (
    "lpa.tools.pki",
    "lpa.tools.configcheck",
    "lpa.relay.migrate",
    "lpa.relay.status",
    "lpa.tools.agentcli",
    "lpa.tools.dispatch",
    "lpa.tools.demo",
)

EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a process killed by SIGPIPE


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
        code = int(func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except ConfigError as e:
        _error(e)
        return EXIT_CONFIG
    except LpaError as e:
        _error(e)
        return EXIT_ERROR
    except KeyboardInterrupt:
        _say("lpa: interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _discard_stdout()
        return EXIT_BROKEN_PIPE


def _discard_stdout() -> None:
    """The reader went away: send what is still buffered to /dev/null so the interpreter's
    final flush does not print a BrokenPipeError (the recipe of Python's ``signal`` docs)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (AttributeError, OSError, ValueError):  # not a real file (a test's StringIO)
        pass


def _say(line: str) -> None:
    with contextlib.suppress(BrokenPipeError, ValueError):
        print(line, file=sys.stderr)


def _error(error: Exception) -> None:
    text = " ".join(str(error).split()) or type(error).__name__
    _say(f"lpa: error: {text}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
