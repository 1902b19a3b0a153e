"""The lpa console script: help everywhere, version, errors without tracebacks, a closed pipe
and Ctrl-C ending quietly (in a child process against a real agent: tests/system/
test_cli_process.py)."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
from collections.abc import Sequence

from twisted.trial.unittest import SynchronousTestCase

from lpa import __version__
from lpa.errors import ConfigError, LpaError
from lpa.tools import agentcli, cli


def _run(argv: Sequence[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(argv))
        except SystemExit as e:
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


def _subcommand_paths(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> list[tuple[str, ...]]:
    paths = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths.append((*prefix, name))
                paths.extend(_subcommand_paths(sub, (*prefix, name)))
    return paths


class CliTests(SynchronousTestCase):
    """cli.main."""

    def test_every_module_registers(self) -> None:
        """Every listed subcommand module imports and adds a subcommand (no warnings)."""
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            parser = cli.build_parser()
        self.assertEqual(err.getvalue(), "")
        top = {p[0] for p in _subcommand_paths(parser) if len(p) == 1}
        self.assertTrue({"pki", "config"} <= top, top)

    def test_help_everywhere(self) -> None:
        """--help works on the top level and on every subcommand, exiting 0."""
        paths = [(), *_subcommand_paths(cli.build_parser())]
        self.assertGreater(len(paths), 5)
        for path in paths:
            code, out, _ = _run([*path, "--help"])
            self.assertEqual(code, 0, path)
            self.assertIn("usage: lpa", out, path)

    def test_version(self) -> None:
        """--version prints the package version."""
        code, out, _ = _run(["--version"])
        self.assertEqual((code, out.strip()), (0, f"lpa {__version__}"))

    def test_usage_errors_exit_2(self) -> None:
        """No command, or an unknown one, is an argparse usage error (exit 2)."""
        for argv in ([], ["frobnicate"], ["pki"], ["pki", "init"]):
            code, _, err = _run(argv)
            self.assertEqual(code, 2, argv)
            self.assertIn("usage:", err)

    def test_pki_init_and_refusal(self) -> None:
        """pki init writes files; a second run fails with one 'lpa: error:' line, exit 1."""
        directory = self.mktemp()
        code, out, _ = _run(
            ["pki", "init", directory, "--agent-host", "agent1", "--agent-host", "10.1.1.1"]
        )
        self.assertEqual(code, 0)
        self.assertIn(os.path.join(directory, "server.key.pem"), out)
        code, out, err = _run(["pki", "init", directory])
        self.assertEqual(code, 1)
        self.assertEqual(err.count("\n"), 1)
        self.assertTrue(err.startswith("lpa: error: "), err)
        self.assertNotIn("Traceback", err)
        code, out, err = _run(["pki", "revoke", directory, os.path.join(directory, "client.crt")])
        self.assertEqual((code, err), (0, ""))
        self.assertIn("revoked serial", out)

    def test_config_check(self) -> None:
        """config check prints warnings and OK, or the one-line error with exit 2."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("jobs: {storage_path: /x}\n")
        code, out, _ = _run(["config", "check", "--no-files", path])
        self.assertEqual(code, 0)
        self.assertIn("warning: jobs.storage_path", out)
        self.assertIn(f"{path}: OK", out)
        with open(path, "w") as f:
            f.write("jobs: {max_concurent: 3}\n")
        code, out, err = _run(["config", "check", path])
        self.assertEqual(code, 2)
        self.assertEqual(
            err,
            f"lpa: error: {path}: unknown key jobs.max_concurent "
            "(did you mean jobs.max_concurrent?)\n",
        )

    def test_error_mapping(self) -> None:
        """ConfigError exits 2, another LpaError exits 1, both as one line; bugs still raise."""

        def add(
            subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
            name: str,
            exc: BaseException,
        ) -> None:
            def func(args: argparse.Namespace) -> int:
                raise exc

            subparsers.add_parser(name).set_defaults(func=func)

        original = cli.build_parser

        def build_parser() -> argparse.ArgumentParser:
            parser = original(())
            sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
            add(sub, "cfg", ConfigError("agent.yaml: server.port: bad\nsecond line"))
            add(sub, "other", LpaError("it broke"))
            add(sub, "bug", ZeroDivisionError("bug"))
            return parser

        self.patch(cli, "build_parser", build_parser)
        self.assertEqual(
            _run(["cfg"])[::2], (2, "lpa: error: agent.yaml: server.port: bad second line\n")
        )
        self.assertEqual(_run(["other"])[::2], (1, "lpa: error: it broke\n"))
        self.assertRaises(ZeroDivisionError, cli.main, ["bug"])

    def test_broken_module_left_out(self) -> None:
        """A subcommand module that fails to import is reported, the others still work."""
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            parser = cli.build_parser(("lpa.no_such_module", "lpa.tools.pki"))
        self.assertIn("lpa.no_such_module", err.getvalue())
        self.assertEqual(parser.parse_args(["pki", "revoke", "d", "c"]).cert, "c")

    def test_python_dash_m(self) -> None:
        """`python -m lpa` runs the same CLI in a fresh process, errors without a traceback."""
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        result = subprocess.run(
            [sys.executable, "-m", "lpa", "config", "check", "/nonexistent/agent.yaml"],
            check=False, cwd=root, capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(result.returncode, 2)
        self.assertEqual(
            result.stderr, "lpa: error: config file /nonexistent/agent.yaml: not found\n"
        )


class ExitTests(SynchronousTestCase):
    """How cli.main ends on a closed pipe and on Ctrl-C."""

    def run_raising(self, exc: BaseException) -> tuple[int, str, str]:
        original = cli.build_parser

        def build_parser() -> argparse.ArgumentParser:
            parser = original(())
            sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))

            def func(args: argparse.Namespace) -> int:
                raise exc

            sub.add_parser("boom").set_defaults(func=func)
            return parser

        self.patch(cli, "build_parser", build_parser)
        return _run(["boom"])

    def test_broken_pipe(self) -> None:
        """A closed pipe ends quietly with 141, as a tool killed by SIGPIPE."""
        self.assertEqual(self.run_raising(BrokenPipeError()), (141, "", ""))

    def test_interrupted(self) -> None:
        """Ctrl-C prints one line and exits 130."""
        self.assertEqual(self.run_raising(KeyboardInterrupt()), (130, "", "lpa: interrupted\n"))


def agentcli_parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="lpa")
    agentcli.add_parser(top.add_subparsers(dest="command", required=True))
    return top


