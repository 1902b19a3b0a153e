"""Package runs that outlive the agent, with a real agent process and the stand-in apt-get.

``tests.agentproc`` runs ``twistd lpa-agent`` in a private mount namespace whose apt-get is the
stand-in (a download phase, then a dpkg phase with ``pmstatus`` lines on fd 3; every start,
signal and exit recorded).  What these tests pin, from the stand-in's record and the job's events:

* cancel during the download ends the job ``cancelled`` at once (SIGTERM in the download phase);
* cancel during dpkg lets the transaction finish (no signal, every line), then ``cancelled``;
* a timeout during dpkg gets an extension event, never a signal, then ``timed_out``;
* an interrupted package database is repaired first (``dpkg --configure -a``) as the job's events;
* the self-upgrade: the stand-in's "upgrade" stops the agent from inside the job, as the
  maintainer script of ``lpa-agent`` restarts it, the test starts it again (systemd's part), and
  the job still ends ``completed`` with its events continuous;
* with a relay and a throwaway PostgreSQL: the agent killed with SIGKILL in the download and
  again in dpkg, the host row ends ``succeeded``, notified once.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from twisted.trial.unittest import TestCase

from tests import pg
from tests.agentproc import AgentProcess, RelayProcess, relay_toml, wait_until
from tests.certs import make_test_pki
from tests.logcheck import assert_no_unhandled
from tests.pgutil import Listener, Seeder
from tests.system.jobfollow import (
    Follower,
    check_every_line_once,
    check_numbering,
    mutating_runs,
    output_seen,
)


class OutliveTestCase(TestCase):
    timeout = 180

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="lpa-outlive-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.pki = make_test_pki(os.path.join(self.tmp, "pki"))

    async def agent(self, extra_yaml: str = "", **scenario: Any) -> AgentProcess:
        self.scenario = scenario
        agent = AgentProcess(
            os.path.join(self.tmp, "agent"), self.pki,
            extra_yaml="rate_limit:\n  enabled: false\n" + extra_yaml, **scenario,
        )
        self.addCleanup(agent.cleanup)
        await agent.start()
        return agent

    async def submit(self, agent: AgentProcess) -> Follower:
        code, body = await agent.request("POST", "/api/v1/patches/apply", json={})
        self.assertEqual(code, 202, body)
        return Follower(agent, body["data"]["job_id"])

    async def cancel(self, follower: Follower) -> None:
        code, body = await follower.agent.request(
            "POST", f"/api/v1/jobs/{follower.job_id}/cancel"
        )
        self.assertEqual(code, 200, body)

    def terminal(self, follower: Follower) -> dict[str, Any]:
        events = [e for _, e in sorted(follower.seen.items())]
        check_numbering(self, events, follower.job_id)
        return events[-2]

    def run_record(self, agent: AgentProcess) -> list[dict[str, Any]]:
        runs = mutating_runs(agent)
        self.assertEqual(len([e for e in runs if e.get("event") == "start"]), 1, runs)
        return runs


class CancelAndTimeoutTests(OutliveTestCase):
    async def test_cancel_during_the_download_is_at_once(self) -> None:
        """Cancel while the package manager downloads: SIGTERM in the download phase, dpkg
        never starts, the job ends cancelled."""
        agent = await self.agent(download_seconds=6.0, dpkg_seconds=1.0, interval=0.05)
        follower = await self.submit(agent)
        await follower.follow_until(output_seen(r"^Get:3 "), timeout=60)
        await self.cancel(follower)
        await follower.follow_to_end()
        self.assertEqual(self.terminal(follower)["status"], "cancelled")
        record = self.run_record(agent)
        signals = [e for e in record if e.get("event") == "signal"]
        self.assertEqual([(e["signal"], e["phase"]) for e in signals], [(15, "download")])
        self.assertFalse(any(e.get("event") == "phase" for e in record), record)
        assert_no_unhandled(agent.log_path)

    async def test_cancel_during_dpkg_finishes_the_transaction(self) -> None:
        """Cancel while dpkg runs: an event says the transaction is being finished, the
        stand-in is never signalled and prints every line, then the job ends cancelled."""
        agent = await self.agent(download_seconds=0.5, dpkg_seconds=3.0, interval=0.05)
        follower = await self.submit(agent)
        await follower.follow_until(output_seen(r"\[line 5 of 60\]"), timeout=60)
        await self.cancel(follower)
        await follower.follow_to_end()
        terminal = self.terminal(follower)
        self.assertEqual(terminal["status"], "cancelled")
        check_every_line_once(self, follower, self.scenario, "cancelled in dpkg")
        notes = [e for e in follower.seen.values()
                 if e["message"] == "Cancel requested; finishing the current dpkg transaction"]
        self.assertEqual(len(notes), 1)
        last_line = max(s for s, e in follower.seen.items() if "[line 60 of 60]" in e["message"])
        self.assertLess(notes[0]["seq"], last_line)
        self.assertLess(last_line, terminal["seq"])
        record = self.run_record(agent)
        self.assertEqual([e for e in record if e.get("event") == "signal"], [])
        self.assertEqual([e["phase"] for e in record if e.get("event") == "exit"], ["done"])
        assert_no_unhandled(agent.log_path)

    async def test_a_timeout_during_dpkg_is_extended_never_killed(self) -> None:
        """The command's timeout falls in the dpkg phase: an extension event, no signal, the
        transaction finishes, then the job ends timed_out."""
        agent = await self.agent(
            "jobs:\n  command_timeouts:\n    package_secs: 3\n",
            download_seconds=0.5, dpkg_seconds=5.0, interval=0.05,
        )
        follower = await self.submit(agent)
        await follower.follow_to_end(timeout=90)
        self.assertEqual(self.terminal(follower)["status"], "timed_out")
        check_every_line_once(self, follower, self.scenario, "timed out in dpkg")
        extensions = [e["message"] for e in follower.seen.values()
                      if "timeout of 3s was reached during the dpkg transaction" in e["message"]]
        self.assertEqual(len(extensions), 1, follower.messages())
        record = self.run_record(agent)
        self.assertEqual([e for e in record if e.get("event") == "signal"], [])
        self.assertEqual([e["phase"] for e in record if e.get("event") == "exit"], ["done"])
        assert_no_unhandled(agent.log_path)


class RepairAndSelfUpgradeTests(OutliveTestCase):
    async def test_an_interrupted_database_is_repaired_first(self) -> None:
        """dpkg --audit reports interrupted work: dpkg --configure -a runs first, as the
        job's own events, then the patch run; the job completes."""
        agent = await self.agent(interrupted=True, download_seconds=0.2, dpkg_seconds=0.3)
        follower = await self.submit(agent)
        await follower.follow_to_end()
        self.assertEqual(self.terminal(follower)["status"], "completed")
        messages = follower.messages()
        repair = messages.index(
            "The package database was left interrupted; repairing it first with "
            "dpkg --configure -a"
        )
        self.assertEqual(messages[repair + 1], "Setting up standin-pkg1 (1.1-1) ...")
        starts = [e for e in agent.record() if e.get("event") == "start"]
        order = [e["command"] for e in starts if "--configure" in e["argv"]
                 or (e["command"] == "apt-get" and "-y" in e["argv"])]
        self.assertEqual(order, ["dpkg", "apt-get"])

    async def test_self_upgrade_restarts_the_agent_from_inside_the_job(self) -> None:
        """The stand-in's upgrade stops the agent in the middle of dpkg (as lpa-agent's
        maintainer script restarts it) and waits for it; the agent is started again; the job
        ends completed, its events continuous, every line once."""
        agent = await self.agent(download_seconds=0.5, dpkg_seconds=3.0, interval=0.05)
        agent.set_scenario(download_seconds=0.5, dpkg_seconds=3.0, interval=0.05,
                           dpkg_command=agent.restart_command(), dpkg_command_at=0.3)
        follower = await self.submit(agent)
        await follower.follow_until(output_seen(r"\[line 1 of 60\]"), timeout=60)
        await wait_until(lambda: not agent.running, "the upgrade to stop the agent", 60)
        self.assertIn("its command goes on and the next start resumes the job", agent.log_text())
        await agent.start()
        await follower.follow_to_end()
        self.assertEqual(self.terminal(follower)["status"], "completed")
        check_every_line_once(self, follower, self.scenario, "self-upgrade")
        notes = [m for m in follower.messages("status")
                 if m.startswith("Agent restarted; the job's package manager ")]
        self.assertEqual(len(notes), 1, follower.messages("status"))
        record = self.run_record(agent)
        self.assertEqual([e["code"] for e in record if e.get("event") == "command"], [0])
        self.assertEqual([e for e in record if e.get("event") == "signal"], [])
        assert_no_unhandled(agent.log_path)


class RelayTests(OutliveTestCase):
    timeout = 240

    async def test_row_succeeds_across_kills_in_both_phases(self) -> None:
        """kill -9 during the download, then during dpkg: the run goes on, the job completes
        and the relay's row ends succeeded, its terminal status notified once."""
        dsn = pg.database(self, migrated=True)
        seeder = Seeder(dsn)
        self.addCleanup(seeder.close)
        listener = Listener(dsn)
        self.addCleanup(listener.close)
        agent = await self.agent(download_seconds=2.0, dpkg_seconds=3.0, interval=0.05)
        relay = RelayProcess(os.path.join(self.tmp, "relay"), relay_toml(dsn, self.pki))
        self.addCleanup(relay.cleanup)
        await relay.start()
        follower = await self.submit(agent)
        job_id = seeder.job("running")
        row = seeder.host_job(job_id, seeder.host("localhost", "192.0.2.7", agent.port),
                              follower.job_id).row_id
        for pattern in (r"^Get:5 ", r"\[line 10 of 60\]"):
            await follower.follow_until(output_seen(pattern), timeout=60)
            agent.kill()
            await agent.restart()
        await follower.follow_to_end()
        self.assertEqual(self.terminal(follower)["status"], "completed")
        check_every_line_once(self, follower, self.scenario, "relay")
        await wait_until(lambda: seeder.row(row)["status"] == "succeeded",
                         "the row to end succeeded", 60)
        self.assertGreaterEqual(seeder.row(row)["relay_last_seq"], self.terminal(follower)["seq"])
        payloads = listener.collect(expected=1, timeout=5)
        ends = [p for p in payloads if p["event_type"] == "host"
                and p["status"] not in ("running", "pending")]
        self.assertEqual([p["status"] for p in ends], ["succeeded"])
        assert_no_unhandled(agent.log_path)
