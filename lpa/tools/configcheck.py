"""``lpa config check FILE``: check an agent or relay config as the daemon would at start-up.

The kind of file is told by ``--agent`` / ``--relay``, else by its name: ``.toml`` is a relay
config (the manager's ``config.toml`` shape), anything else an agent config (``.yaml``).  Keys and
values are checked, then the files the config names (certificates, keys, CRL) unless
``--no-files``.  Warnings go to stdout, then ``FILE: OK``; the first error is one line on stderr
(exit 2, through :mod:`lpa.tools.cli`).
"""

from __future__ import annotations

import argparse
import os
from typing import TextIO

AGENT = "agent"
RELAY = "relay"


def kind_of(file: str, flag: str | None) -> str:
    """``agent`` or ``relay``: the flag, else ``relay`` for a ``.toml`` file, else ``agent``."""
    if flag:
        return flag
    return RELAY if os.path.splitext(file)[1].lower() == ".toml" else AGENT


def check(file: str, kind: str, *, files: bool = True) -> tuple[str, list[str]]:
    """Check ``file`` as ``kind``; return ``(what was checked, warnings)``.

    :raises ~lpa.errors.ConfigError: the one line the daemon would stop with.
    """
    if kind == RELAY:
        from lpa.relay.config import check_relay_files, load_relay_config

        relay = load_relay_config(file)
        warnings = list(relay.warnings) + (check_relay_files(relay) if files else [])
        return "relay config", warnings
    from lpa.agent.config import check_agent_files, load_agent_config

    agent = load_agent_config(file)
    warnings = list(agent.warnings) + (check_agent_files(agent) if files else [])
    return "agent config", warnings


def _main(args: argparse.Namespace, out: TextIO | None = None) -> int:
    import sys

    out = out or sys.stdout
    what, warnings = check(args.file, kind_of(args.file, args.kind), files=args.files)
    for warning in warnings:
        print(f"warning: {warning}", file=out)
    print(f"{args.file}: OK ({what}{'' if args.files else ', files not checked'})", file=out)
    return 0


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``lpa config check``."""
    parser = subparsers.add_parser(
        "config", help="check an agent or relay configuration file",
        description="Work with the daemons' configuration files.")
    actions = parser.add_subparsers(dest="config_action", metavar="ACTION", required=True)
    command = actions.add_parser(
        "check", help="validate a config file as the daemon would and print its warnings",
        description="Check an agent config (YAML) or a relay config (TOML, the manager's "
        "config.toml shape, with this shell's PATCH_MANAGER__* overrides) as lpa-agent or "
        "lpa-relay would at start-up: every key and value, then the certificates, key and CRL "
        "it names (exist, readable, parse, key matches certificate). Prints each warning and "
        "'FILE: OK' and exits 0, or prints the one-line error and exits 2.")
    command.add_argument("file", metavar="FILE",
                         help="the file: a .toml file is a relay config, any other an agent config")
    kind = command.add_mutually_exclusive_group()
    kind.add_argument("--agent", dest="kind", action="store_const", const=AGENT,
                      help="FILE is an agent config whatever its name")
    kind.add_argument("--relay", dest="kind", action="store_const", const=RELAY,
                      help="FILE is a relay config whatever its name")
    command.add_argument("--no-files", dest="files", action="store_false",
                         help="check keys and values only, not the files they name (e.g. on a "
                         "machine that prepares configs for others)")
    command.set_defaults(func=_main)
