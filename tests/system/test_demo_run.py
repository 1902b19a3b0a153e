"""``lpa demo`` run as a user runs it: the whole pipeline in real processes, then nothing left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from lpa.tools import demo_processes
from tests.logcheck import assert_no_unhandled
from tests.procs import pid_alive, processes_mentioning
from tests.system import CHECKOUT


class EndToEndTests(SynchronousTestCase):
    def test_demo(self) -> None:
        """`lpa demo` without a terminal exits 0 with a succeeded summary and leaves no process."""
        state_dir = os.path.abspath(self.mktemp())
        main = "import sys; from lpa.tools.cli import main; sys.exit(main())"
        argv = [sys.executable, "-c", main, "demo", "--state-dir", state_dir, "--timeout", "240",
                "--agent-port", "0"]  # not 12443: leave it to test_etc and test_docs
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, start_new_session=True,
                                   cwd=CHECKOUT)
        try:
            output, _ = process.communicate(timeout=330)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            output, _ = process.communicate(timeout=30)
            self.fail("lpa demo did not finish:\n" + output.decode(errors="replace"))
        text = output.decode(errors="replace")
        self.assertEqual(process.returncode, 0, text)
        summary = [line for line in text.splitlines() if line.startswith("summary:")]
        self.assertEqual(len(summary), 1, text)
        self.assertIn(" succeeded: 1 of 1 host(s) succeeded", summary[0])
        self.assertIn("localhost: running", text)
        with open(os.path.join(state_dir, demo_processes.STATE_FILE)) as handle:
            state = json.load(handle)
        for name, pid in state["pids"].items():
            self.assertFalse(pid_alive(pid), f"{name} (pid {pid}) is still running")
        self.assertEqual(processes_mentioning(state_dir), [])
        self.assertEqual(processes_mentioning(state["postgres"]), [])
        self.assertFalse(os.path.exists(state["postgres"]))
        assert_no_unhandled(*(os.path.join(state_dir, name + suffix)
                              for name in ("lpa-agent", "lpa-relay")
                              for suffix in (".log", ".log.stdout")))
