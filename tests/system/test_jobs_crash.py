"""A real agent process killed with SIGKILL mid-job: the package run goes on, the job ends as
it did.

One ``twistd lpa-agent`` (tests.agentproc: private mount namespace, stand-in apt-get) runs real
(non-dry-run) patch jobs whose package run lasts a few seconds: a download phase, then a dpkg
phase.  A follower reads each job's events from ``GET /api/v1/jobs/{id}/events?after=N`` as they
come; the agent is killed with SIGKILL during the download, during dpkg, near the run's end and
at a random moment, and restarted on the same port and state directory.  After each restart:

* every event seen before the kill is served again, identical, by ``events?after=0``;
* the stand-in was never signalled and finished on its own, and the job ends ``completed``:
  seqs 1..N without a gap, every line the stand-in printed is one output event, once;
* the agent's incarnation changed; the terminal event is numbered above everything seen; no
  mutating run started twice.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from twisted.trial.unittest import TestCase

from tests.agentproc import AgentProcess
from tests.certs import make_test_pki
from tests.logcheck import assert_no_unhandled
from tests.system.jobfollow import (
    Follower,
    check_every_line_once,
    check_numbering,
    mutating_runs,
    output_seen,
)

SCENARIO: dict[str, Any] = {"download_seconds": 1.5, "dpkg_seconds": 2.5, "interval": 0.05}
DPKG_LINES = int(SCENARIO["dpkg_seconds"] / SCENARIO["interval"])


class KillNineTests(TestCase):
    timeout = 300

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="lpa-crash-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.pki = make_test_pki(os.path.join(self.tmp, "pki"))
        self.seed = random.randrange(1 << 30)
        self.random = random.Random(self.seed)

    async def test_sigkill_in_every_phase_the_run_goes_on(self) -> None:
        """kill -9 in the download, in dpkg, near the end and at a random moment: every event
        seen survives unchanged, the stand-in finishes unsignalled, the job ends completed with
        every line once, no run twice."""
        agent = AgentProcess(
            os.path.join(self.tmp, "agent"), self.pki,
            extra_yaml="rate_limit:\n  enabled: false\n", **SCENARIO,
        )
        self.addCleanup(agent.cleanup)
        await agent.start()
        total = int(SCENARIO["download_seconds"] / SCENARIO["interval"]) + DPKG_LINES
        target = self.random.randrange(3, total)
        moments: list[tuple[str, Callable[[Follower], bool]]] = [
            ("during the download", output_seen(r"^Get:3 http://deb\.example")),
            ("during dpkg", output_seen(r"\[line 5 of ")),
            ("near the end", output_seen(rf"\[line {DPKG_LINES - 3} of ")),
            (f"at a random moment (line {target})",
             lambda f: f.ended or len(f.messages("output")) >= target),
        ]
        for number, (when, moment) in enumerate(moments, 1):
            await self._kill_during_a_job(agent, number, when, moment)
        runs = [e for e in mutating_runs(agent) if e.get("event") == "start"]
        self.assertEqual(len(runs), len(moments), (runs, self.seed))
        assert_no_unhandled(agent.log_path)

    async def _kill_during_a_job(
        self, agent: AgentProcess, number: int, when: str, moment: Callable[[Follower], bool]
    ) -> None:
        why = f"job {number}, killed {when} (seed {self.seed})"
        code, body = await agent.request("POST", "/api/v1/patches/apply", json={})
        self.assertEqual(code, 202, body)
        follower = Follower(agent, body["data"]["job_id"])
        await follower.follow_until(moment, timeout=60)
        agent.kill()
        seen = dict(follower.seen)
        before = follower.incarnation
        await agent.restart()
        await follower.follow_to_end()
        code, body = await agent.request(
            "GET", f"/api/v1/jobs/{follower.job_id}/events?after=0"
        )
        self.assertEqual(code, 200, body)
        events = body["data"]["events"]
        served = {e["seq"]: e for e in events}
        for seq, event in seen.items():
            self.assertEqual(served.get(seq), event, f"{why}: seq {seq} changed")
        check_numbering(self, events, why)
        terminal = events[-2]
        self.assertEqual(terminal["status"], "completed", (why, terminal))
        if not any(e["event"] == "job_complete" for e in seen.values()):
            self.assertGreater(terminal["seq"], max(seen), why)  # (it may have ended before)
        check_every_line_once(self, follower, SCENARIO, why)
        self.assertNotEqual(body["data"]["incarnation"], before, why)
        self.assertEqual(terminal["incarnation"], body["data"]["incarnation"], why)
        code, detail = await agent.request("GET", f"/api/v1/jobs/{follower.job_id}")
        self.assertEqual(detail["data"]["seq"], events[-1]["seq"], why)
        self.assertEqual(detail["data"]["status"], "completed", why)
        run = mutating_runs(agent)
        self.assertEqual([e for e in run if e.get("event") == "signal"], [], why)
        exits = [e for e in run if e.get("event") == "exit"]
        self.assertEqual(exits[-1]["phase"], "done", why)
