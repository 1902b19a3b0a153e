"""The membership SQL against a real PostgreSQL: join, share, rebalance, expiry, leave, ids."""

from __future__ import annotations

import math

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from lpa.relay.interfaces import AgentAddress
from lpa.relay.membership import Rebalance, RelayIdInUse
from lpa.relay.membership_db import CLAIM_LOCK, MembershipTablesMissing, PostgresMembershipDatabase
from tests import pg
from tests.pgutil import Seeder


class MembershipDatabaseTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.dsn = pg.database(self, migrated=True)
        self.seed = Seeder(self.dsn)
        self.addCleanup(self.seed.close)
        self.job = self.seed.job("running")
        self.rows: dict[AgentAddress, str] = {}

    def agents(self, count: int, start: int = 0) -> list[AgentAddress]:
        """``count`` agents, each with one running host row."""
        made = []
        for n in range(start, start + count):
            address = AgentAddress("localhost", 20000 + n)
            host = self.seed.host("localhost", f"192.0.2.{n % 250 + 1}", address.port)
            self.rows[address] = self.seed.host_job(self.job, host, f"agent-job-{n}").row_id
            made.append(address)
        return made

    async def relay(self, relay_id: str, ttl: float = 30.0) -> PostgresMembershipDatabase:
        database = PostgresMembershipDatabase(
            self.dsn, relay_id=relay_id, lease_ttl=ttl, clock=reactor, reactor=reactor
        )
        await database.connect()
        self.addCleanup(database.close)
        return database

    async def settle(self, *relays: PostgresMembershipDatabase) -> list[Rebalance]:
        """Heartbeat all, then rebalance each until nothing moves."""
        for relay in relays:
            await relay.heartbeat()
        results: list[Rebalance] = []
        for _ in range(5):
            results = [await relay.rebalance() for relay in relays]
            if not any(r.claimed or r.shed or r.busy for r in results):
                break
        return results

    def leases(self) -> dict[str, int]:
        return dict(self.seed.all("SELECT relay_id, count(*) FROM relay_agent_leases GROUP BY 1"))

    async def test_join_is_reported_once(self) -> None:
        """The first heartbeat joins (True), later ones renew (False); expiry is ttl ahead."""
        relay = await self.relay("relay-a", ttl=30)
        self.assertTrue(await relay.heartbeat())
        self.assertFalse(await relay.heartbeat())
        left = self.seed.one(
            "SELECT extract(epoch FROM expires_at - now()) FROM relay_members WHERE relay_id = %s",
            ("relay-a",),
        )[0]
        self.assertTrue(28 < left <= 30, left)

    async def test_three_relays_share_thirty_agents_evenly(self) -> None:
        """30 agents, 3 relays: 10 each, every agent leased exactly once."""
        everyone = set(self.agents(30))
        relays = [await self.relay(f"relay-{n}") for n in "abc"]
        results = await self.settle(*relays)
        self.assertEqual([len(r.owned) for r in results], [10, 10, 10])
        self.assertEqual(set().union(*(r.owned for r in results)), everyone)
        self.assertEqual(results[0].members, 3)

    async def test_a_fourth_relay_takes_only_what_it_must(self) -> None:
        """A fourth relay: the others shed down to ceil(30/4) = 8; 6 agents move, no more."""
        self.agents(30)
        relays = [await self.relay(f"relay-{n}") for n in "abc"]
        first = await self.settle(*relays)
        held = {relay.relay_id: result.owned for relay, result in zip(relays, first, strict=True)}
        fourth = await self.relay("relay-d")
        relays.append(fourth)
        after = await self.settle(*relays)
        counts = sorted(len(r.owned) for r in after)
        self.assertEqual(counts, [6, 8, 8, 8])
        moved = sum(
            len(held[relay.relay_id] - result.owned)
            for relay, result in zip(relays, after, strict=True)
            if relay.relay_id in held
        )
        self.assertEqual(moved, 6)

    async def test_expired_relay_loses_its_agents_to_the_live_ones(self) -> None:
        """A relay that stopped heartbeating is removed by the next rebalance; its agents move."""
        self.agents(10)
        a, b = await self.relay("relay-a"), await self.relay("relay-b")
        await self.settle(a, b)
        self.seed.execute(
            "UPDATE relay_members SET expires_at = now() - interval '1 second' "
            "WHERE relay_id = 'relay-b'"
        )
        await a.heartbeat()
        result = await a.rebalance()
        self.assertEqual((result.expired, len(result.owned), result.members), (("relay-b",), 10, 1))
        self.assertEqual(self.leases(), {"relay-a": 10})

    async def test_leave_hands_over_at_once_and_wakes_the_others(self) -> None:
        """leave() deletes the row and its leases and NOTIFYs; the others claim on their wake-up."""
        self.agents(6)
        a, b = await self.relay("relay-a"), await self.relay("relay-b")
        woken: Deferred[None] = Deferred()
        a.set_wakeup(lambda: None if woken.called else woken.callback(None))
        await self.settle(a, b)
        await b.leave()
        await woken
        self.assertEqual(self.leases(), {"relay-a": 3})
        result = await a.rebalance()
        self.assertEqual((len(result.owned), result.claimed), (6, 3))

    async def test_agents_without_running_jobs_are_released(self) -> None:
        """When an agent's last running row ends, its lease goes away."""
        agents = self.agents(4)
        a = await self.relay("relay-a")
        await self.settle(a)
        self.seed.execute(
            "UPDATE patch_job_hosts SET status = 'succeeded' WHERE id = %s", (self.rows[agents[0]],)
        )
        result = await a.rebalance()
        self.assertEqual(result.owned, frozenset(agents[1:]))

    async def test_same_id_from_another_live_process_is_refused(self) -> None:
        """A second process with a live relay's id cannot heartbeat; once it expires, it can."""
        first = await self.relay("relay-a")
        await first.heartbeat()
        second = await self.relay("relay-a")
        with self.assertRaises(RelayIdInUse) as caught:
            await second.heartbeat()
        self.assertIn("pid", str(caught.exception))
        self.seed.execute("UPDATE relay_members SET expires_at = now() - interval '1 second'")
        self.assertTrue(await second.heartbeat())

    async def test_busy_claim_lock_returns_what_we_hold(self) -> None:
        """While another session holds the claim lock, a rebalance changes nothing and says busy."""
        self.agents(2)
        a = await self.relay("relay-a")
        await self.settle(a)
        holder = Seeder(self.dsn)
        self.addCleanup(holder.close)
        holder.connection.autocommit = False
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (CLAIM_LOCK,))
        self.agents(1, start=2)
        result = await a.rebalance()
        holder.connection.rollback()
        self.assertTrue(result.busy)
        self.assertEqual(len(result.owned), 2)

    async def test_target_is_the_rounded_up_share(self) -> None:
        """No relay holds more than ceil(agents / relays) after a settle, for uneven counts too."""
        self.agents(11)
        relays = [await self.relay(f"relay-{n}") for n in "abc"]
        results = await self.settle(*relays)
        self.assertEqual(sum(len(r.owned) for r in results), 11)
        self.assertLessEqual(max(len(r.owned) for r in results), math.ceil(11 / 3))

    async def test_missing_tables_say_run_migrate(self) -> None:
        """On a database without the membership tables, the heartbeat says to run lpa db migrate."""
        self.dsn = pg.database(self)
        relay = await self.relay("relay-a")
        with self.assertRaises(MembershipTablesMissing) as caught:
            await relay.heartbeat()
        self.assertIn("lpa db migrate", str(caught.exception))
