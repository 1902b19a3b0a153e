"""README.rst's and docs/'s commands run as written.

Every block of commands in the documents is marked with an rst comment (see docblocks.py):
``.. shell: run`` blocks are run, in document order, against ``lpa demo --keep`` inside a private
network namespace (docrun.py), from a scratch copy of the checkout; ``.. shell: skip,
REASON`` blocks are listed with their reason and not run.  To cover a new command, write it in a
block the docs test can run against the demo's services and mark it ``.. shell: run``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.logcheck import assert_no_unhandled
from tests.procs import processes_mentioning
from tests.system import CHECKOUT as ROOT
from tests.system.docblocks import Block, blocks, looks_like_commands, parse

#: top-level entries of the checkout the scratch copy leaves out
_NOT_COPIED = {".demo", ".venv", ".git", "build", "dist"}


class MarkerTests(SynchronousTestCase):
    def test_every_command_block_is_marked(self) -> None:
        """Each block of commands in README.rst and docs/ says whether the docs test runs it."""
        found, problems = blocks()
        self.assertEqual(problems, [])
        unmarked = [block.where for block in found
                    if looks_like_commands(block) and block.action is None]
        self.assertEqual(unmarked, [])

    def test_skips_say_why(self) -> None:
        """A skipped block names its reason; some blocks do run."""
        found, _ = blocks()
        self.assertEqual([b.where for b in found if b.action == "skip" and len(b.reason) < 10], [])
        self.assertGreaterEqual(len([b for b in found if b.action == "run"]), 2)

    def test_parse(self) -> None:
        """Blocks after '::' (nested in a definition list too) and code-block directives, their
        markers, and a marker left without a block."""
        text = (".. shell: run\n\nIntro::\n\n    lpa one\n      --flag\n\nAfter.\n\n"
                "``term``\n    Text.\n\n    .. shell: skip, needs root\n\n    Nested::\n\n"
                "        cp a b\n\n.. code-block:: sh\n   :caption: x\n\n   make test\n\n"
                "Trailing::\n\n    {\"json\": 1}\n\n.. shell: run\n")
        found, problems = parse(text, "x.rst")
        self.assertEqual(found, [
            Block("x.rst", 5, "lpa one\n  --flag\n", "run", ""),
            Block("x.rst", 17, "cp a b\n", "skip", "needs root"),
            Block("x.rst", 22, "make test\n", None, ""),
            Block("x.rst", 26, '{"json": 1}\n', None, ""),
        ])
        self.assertEqual(problems, ["x.rst:28: marker without a block after it"])
        self.assertEqual([looks_like_commands(b) for b in found], [True, True, True, False])


def _scratch_checkout(directory: str) -> None:
    """Links to the checkout's top level, so the docs' relative paths resolve; ``.demo`` is
    the test's own."""
    os.makedirs(directory)
    for entry in os.listdir(ROOT):
        if entry not in _NOT_COPIED and not entry.startswith("_trial_temp"):
            os.symlink(os.path.join(ROOT, entry), os.path.join(directory, entry))


def _environment() -> dict[str, str]:
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("PATCH_MANAGER", "LPA_"))}
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(
        [ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.pop("DATABASE_URL", None)
    return env


def _why_not_runnable() -> str | None:
    if os.geteuid() != 0:
        return "a private network namespace (unshare -n) needs root"
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare and ip (util-linux, iproute2) are needed for a private network namespace"
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return f"unshare -n is not allowed here: {probe.stderr.strip()}"
    from lpa.tools import pgcluster

    try:
        pgcluster.find_bin_dir()
    except pgcluster.PostgresNotFound as error:
        return f"the demo needs PostgreSQL server binaries: {error}"
    return None


class RunTests(SynchronousTestCase):
    def test_run_blocks_against_the_demo(self) -> None:
        """Every '.. shell: run' block exits 0 against lpa demo --keep; the daemons log no
        unhandled error; lpa demo --stop leaves nothing running."""
        reason = _why_not_runnable()
        if reason:
            raise SkipTest(reason)
        found, _ = blocks()
        runnable = [block for block in found if block.action == "run"]
        scratch = os.path.abspath(self.mktemp())
        _scratch_checkout(scratch)
        plan = os.path.join(os.path.dirname(scratch), "plan.json")
        result_path = os.path.join(os.path.dirname(scratch), "result.json")
        with open(plan, "w", encoding="utf-8") as handle:
            json.dump({"cwd": scratch, "env": _environment(), "demo_timeout": 240,
                       "block_timeout": 240,
                       "blocks": [{"where": b.where, "text": b.text} for b in runnable]}, handle)
        runner = subprocess.Popen(
            ["unshare", "-n", sys.executable, "-m", "tests.system.docrun", plan, result_path],
            cwd=ROOT, env=_environment(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True)
        try:
            output, _ = runner.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            os.killpg(runner.pid, signal.SIGKILL)
            runner.communicate()
            self.fail("the docs runner did not finish in 900 s")
        self.assertEqual(runner.returncode, 0, output.decode(errors="replace"))
        with open(result_path, encoding="utf-8") as handle:
            result = json.load(handle)
        self.assertNotIn("setup", result)
        self.assertEqual(result["demo"]["code"], 0, result["demo"]["output"][-3000:])
        failed = [f"{b['where']} exited {b['code']} after {b['seconds']} s:\n{b['output'][-1500:]}"
                  for b in result["blocks"] if b["code"] != 0]
        self.assertEqual(failed, [])
        self.assertEqual([b["where"] for b in result["blocks"]], [b.where for b in runnable])
        self.assertEqual(result["stop"]["code"], 0, result["stop"]["output"])
        state = os.path.join(scratch, ".demo")
        assert_no_unhandled(*(os.path.join(state, name + suffix)
                              for name in ("lpa-agent", "lpa-relay")
                              for suffix in (".log", ".log.stdout")))
        self.assertEqual(processes_mentioning(scratch), [])
