"""The fault-test harness itself: a real agent process whose package manager is a stand-in."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile

from twisted.trial.unittest import SynchronousTestCase, TestCase

from lpa.relay.config import parse_relay_config
from tests import pg, standin
from tests.agentproc import AgentProcess, RelayProcess, relay_toml, wait_until
from tests.certs import make_test_pki
from tests.pgutil import Seeder


def _installed() -> bytes:
    return subprocess.run(["dpkg-query", "-W"], capture_output=True, check=True).stdout


class AgentProcessTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="lpa-agentproc-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.pki = make_test_pki(os.path.join(self.tmp, "pki"))

    async def test_mutating_job_reaches_only_the_standins(self) -> None:
        """A real patch job runs the stand-in apt-get in its phases; the host's dpkg is intact."""
        before = _installed()
        agent = AgentProcess(os.path.join(self.tmp, "a"), self.pki, download_seconds=0.2,
                             dpkg_seconds=0.3)
        self.addCleanup(agent.cleanup)
        await agent.start()
        code, body = await agent.request("POST", "/api/v1/patches/apply", json={})
        self.assertEqual(code, 202, body)
        job_id = body["data"]["job_id"]

        async def ended() -> bool:
            _, detail = await agent.request("GET", f"/api/v1/jobs/{job_id}")
            return detail["data"]["status"] in ("completed", "failed")

        await wait_until(ended, "the job to end")
        _, detail = await agent.request("GET", f"/api/v1/jobs/{job_id}")
        self.assertEqual(detail["data"]["status"], "completed", detail["data"])
        records = agent.record()
        calls = standin.mutating_calls(records)
        self.assertEqual(len(calls), 1, calls)
        self.assertIn("dist-upgrade", calls[0])
        phases = [r["phase"] for r in records if r.get("event") == "phase"]
        self.assertEqual(phases, ["dpkg"])
        self.assertEqual(_installed(), before)

    async def test_kill_and_restart_keep_port_and_state(self) -> None:
        """SIGKILL ends the agent; a restart answers on the same port with the same history."""
        agent = AgentProcess(os.path.join(self.tmp, "a"), self.pki)
        self.addCleanup(agent.cleanup)
        await agent.start()
        code, body = await agent.request("POST", "/api/v1/patches/apply", json={"dry_run": True})
        self.assertEqual(code, 202, body)
        job_id = body["data"]["job_id"]

        async def ended() -> bool:
            _, detail = await agent.request("GET", f"/api/v1/jobs/{job_id}")
            return bool(detail["data"]["status"] == "completed")

        await wait_until(ended, "the dry run to complete")
        agent.kill()
        self.assertFalse(agent.running)
        await agent.restart()
        code, detail = await agent.request("GET", f"/api/v1/jobs/{job_id}")
        self.assertEqual((code, detail["data"]["status"]), (200, "completed"))
        self.assertEqual(standin.mutating_calls(agent.record()), [])
        # twistd re-raises the signal it stopped on after a clean shutdown (systemd's success)
        self.assertEqual(await agent.stop(), -signal.SIGTERM)
        self.assertIn("Server Shut Down", agent.log_text())

    async def test_relay_process_follows_an_agent_process(self) -> None:
        """A relay process follows a patch job of an agent process into its row, to succeeded."""
        dsn = pg.database(self, migrated=True)
        seeder = Seeder(dsn)
        self.addCleanup(seeder.close)
        agent = AgentProcess(os.path.join(self.tmp, "a"), self.pki, download_seconds=0.5,
                             dpkg_seconds=1.0)
        self.addCleanup(agent.cleanup)
        await agent.start()
        code, body = await agent.request("POST", "/api/v1/patches/apply", json={})
        self.assertEqual(code, 202, body)
        job_id = seeder.job()
        row = seeder.host_job(job_id, seeder.host("localhost", "127.0.0.1", agent.port),
                              body["data"]["job_id"])
        relay = RelayProcess(os.path.join(self.tmp, "r"), relay_toml(dsn, self.pki))
        self.addCleanup(relay.cleanup)
        await relay.start()
        await wait_until(lambda: seeder.row(row.row_id)["status"] != "running", "the row to end")
        self.assertEqual(seeder.row(row.row_id)["status"], "succeeded")
        self.assertEqual(seeder.job_status(job_id), "succeeded")
        self.assertNotIn("ops port", relay.log_text())  # none asked for, none tried


class RelayTomlTests(SynchronousTestCase):
    def test_ops_port_off_unless_asked(self) -> None:
        """Test relays have no ops port (side by side they would all try 12480), unless a test
        asks for one (0: any free port)."""
        pki = make_test_pki(os.path.abspath(self.mktemp()))
        plain = parse_relay_config(relay_toml("postgresql:///pm", pki), "relay.toml", {})
        asked = parse_relay_config(relay_toml("postgresql:///pm", pki, ops_port=0), "r", {})
        self.assertEqual((plain.ops_enabled, asked.ops_enabled, asked.ops_port),
                         (False, True, 0))
