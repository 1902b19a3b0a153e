"""RelayMembership on a Clock: heartbeats, what it follows, self-fencing, wake-ups, leave."""

from __future__ import annotations

from typing import Any

import psycopg2
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyClass, verifyObject

from lpa.errors import ConfigError
from lpa.relay.config import parse_relay_config
from lpa.relay.interfaces import AgentAddress
from lpa.relay.membership import (
    BUSY_RETRY,
    LEAVE_TIMEOUT,
    WAKE_SPREAD,
    IMembershipDatabase,
    RelayIdInUse,
    RelayMembership,
    default_relay_id,
)
from lpa.relay.membership_db import PostgresMembershipDatabase
from tests.fakes_membership import FakeMembershipDatabase

ONE = AgentAddress("agent1.example", 12443)
TWO = AgentAddress("agent2.example", 12443)


class MembershipTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.db = FakeMembershipDatabase()
        self.db.owned = frozenset({ONE, TWO})
        self.changes: list[frozenset[AgentAddress]] = []
        self.membership = RelayMembership(
            self.db,
            clock=self.clock,
            relay_id="relay-a",
            heartbeat_interval=2,
            lease_ttl=8,
            on_change=self.changes.append,
            jitter=lambda: 0.5,
        )
        self.addCleanup(self.no_delayed_calls_left)

    def no_delayed_calls_left(self) -> None:
        self.membership.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def start(self) -> None:
        self.successResultOf(self.membership.start())
        self.clock.advance(0)

    def heartbeats(self) -> int:
        return self.db.calls.count("heartbeat")

    def test_interfaces(self) -> None:
        """The fake and the PostgreSQL implementation provide the same interface."""
        verifyObject(IMembershipDatabase, self.db)
        verifyClass(IMembershipDatabase, PostgresMembershipDatabase)

    def test_follows_what_the_first_rebalance_gives(self) -> None:
        """Nothing before the first heartbeat; then exactly the agents the rebalance returned."""
        self.assertEqual(self.membership.owned, frozenset())
        with capturedLogs() as logged:
            self.start()
        self.assertEqual(self.db.calls, ["connect", "heartbeat", "rebalance"])
        self.assertEqual(self.changes, [frozenset({ONE, TWO})])
        self.assertIn("relay relay-a joined", " ".join(formatEvent(e) for e in logged))

    def test_heartbeat_every_interval_and_changes_only_when_changed(self) -> None:
        """A tick every heartbeat_interval; on_change is called only when the set changes."""
        self.start()
        self.clock.advance(2)
        self.clock.advance(2)
        self.assertEqual(self.heartbeats(), 3)
        self.db.owned = frozenset({ONE})
        self.clock.advance(2)
        self.assertEqual(self.changes, [frozenset({ONE, TWO}), frozenset({ONE})])

    def test_fences_before_the_lease_can_expire(self) -> None:
        """Database down: the agents are dropped at ttl - interval after the last good send."""
        self.start()
        self.db.fail = psycopg2.OperationalError("server closed the connection unexpectedly")
        with capturedLogs() as logged:
            self.clock.advance(5.9)
            self.assertEqual(self.membership.owned, frozenset({ONE, TWO}))
            self.clock.advance(0.1)
        self.assertEqual(self.changes[-1], frozenset())
        self.assertTrue(self.membership.fenced)
        warnings = [e for e in logged if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 2)  # one "heartbeat failed", one "stopped following"
        self.assertIn("stopped following", warnings[1]["log_format"])
        self.assertLess(self.membership.fence_after, self.membership.lease_ttl)

    def test_the_only_relay_keeps_its_agents(self) -> None:
        """Alone at the last rebalance: no heartbeat for a while stops nothing (one warning);
        nobody else could take the agents, and the one relay there is keeps working."""
        self.db.members = 1
        self.start()
        self.db.fail = psycopg2.OperationalError("server closed the connection unexpectedly")
        with capturedLogs() as logged:
            self.clock.advance(20)
        self.assertEqual(self.membership.owned, frozenset({ONE, TWO}))
        kept = [e for e in logged if "is the only relay" in e["log_format"]]
        self.assertEqual(len(kept), 1)
        self.db.fail = RelayIdInUse("registered by host-b pid 4242")
        self.clock.advance(2)  # an id in use drops them even so
        self.assertEqual(self.membership.owned, frozenset())

    def test_readiness_says_what_is_followed(self) -> None:
        """/readyz's membership check: before joining, current, lapsed alone (agents kept) or
        not alone (nothing followed), id in use — each says what the relay follows."""
        readiness = self.membership.readiness
        self.assertEqual(readiness(), "not yet registered with the relays sharing the database: "
                                      "following nothing")
        self.db.members = 1
        self.start()
        self.assertIsNone(readiness())
        self.db.fail = psycopg2.OperationalError("server closed the connection unexpectedly")
        self.clock.advance(6)
        self.assertEqual(readiness(), "our membership lapsed (no heartbeat within the lease); as "
                                      "the only relay it keeps following its 2 agents")
        self.db.fail, self.db.members = None, 2
        self.clock.advance(2)
        self.assertIsNone(readiness())
        self.db.fail = psycopg2.OperationalError("server closed the connection unexpectedly")
        self.clock.advance(6)
        self.assertEqual(readiness(),
                         "our membership lapsed (no heartbeat within the lease): following nothing")
        self.db.fail = RelayIdInUse("registered by host-b pid 4242")
        self.clock.advance(2)
        self.assertEqual(readiness(), "relay id relay-a is in use by another running relay: "
                                      "following nothing")

    def test_fence_counts_from_the_send_not_the_answer(self) -> None:
        """A slow answer does not stretch the fence: it runs from the moment the beat was sent."""
        self.start()
        self.clock.advance(2)  # second heartbeat sent at t=2 ...
        self.db.hold()
        self.clock.advance(2)  # ... third sent at t=4, answered at t=7
        self.clock.advance(3)
        self.db.release()
        self.db.hold()  # the next beats hang
        self.clock.advance(2.9)  # t=9.9: 4 + 6 not reached
        self.assertEqual(self.membership.owned, frozenset({ONE, TWO}))
        self.clock.advance(0.1)  # t=10, not 7 + 6
        self.assertEqual(self.membership.owned, frozenset())

    def test_hanging_database_fences_and_recovers(self) -> None:
        """A heartbeat that never answers fences; when answers come back, the agents come back."""
        self.start()
        self.db.hold()
        self.clock.advance(2)
        self.clock.advance(10)
        self.assertEqual(self.heartbeats(), 2)  # ticks do not pile up behind a hung one
        self.assertEqual(self.membership.owned, frozenset())
        self.db.release()
        self.clock.advance(2)
        self.assertEqual(self.membership.owned, frozenset({ONE, TWO}))
        self.assertFalse(self.membership.fenced)

    def test_relay_id_in_use_follows_nothing(self) -> None:
        """Another live relay with our id: one error line naming the key, nothing followed."""
        self.db.fail = RelayIdInUse("registered by host-b pid 4242")
        with capturedLogs() as logged:
            self.start()
            self.clock.advance(2)
        errors = [e for e in logged if e["log_level"] == LogLevel.error]
        self.assertEqual(len(errors), 1)
        self.assertIn("ws_relay_id", errors[0]["log_format"])
        self.assertEqual(self.membership.owned, frozenset())
        self.assertNotIn("rebalance", self.db.calls)

    def test_wake_up_rebalances_soon(self) -> None:
        """Another relay joined or left: rebalance after a short spread, not a whole interval."""
        self.start()
        assert self.db.wakeup is not None
        self.db.wakeup()
        self.clock.advance(WAKE_SPREAD * 0.5)
        self.assertEqual((self.heartbeats(), self.db.calls.count("rebalance")), (1, 2))

    def test_slow_rebalance_does_not_delay_heartbeats(self) -> None:
        """Heartbeats keep their cadence while a rebalance hangs; the relay is not fenced."""
        self.start()
        self.db.rebalance_held = []
        self.clock.advance(2)
        for _ in range(5):
            self.clock.advance(2)
        self.assertEqual(self.heartbeats(), 7)
        self.assertEqual(self.db.calls.count("rebalance"), 2)  # no pile-up either
        self.assertFalse(self.membership.fenced)

    def test_slow_heartbeat_is_reported(self) -> None:
        """A heartbeat answered after more than one interval warns that something is overloaded."""
        self.start()
        self.db.hold()
        self.clock.advance(2)
        self.clock.advance(2.5)
        with capturedLogs() as logged:
            self.db.release()
        self.assertIn("a heartbeat took 2.5s", " ".join(formatEvent(e) for e in logged))

    def test_rebalance_says_what_it_moved(self) -> None:
        """A rebalance that claimed or shed agents is one info line with the counts, a relay it
        found expired one warning; a rebalance that moved nothing says nothing."""
        self.db.claimed, self.db.expired = 2, ("relay-b",)
        with capturedLogs() as logged:
            self.start()
        self.assertEqual(
            [(e["log_level"], formatEvent(e)) for e in logged if "relay-b" in formatEvent(e)
             or "claimed" in e["log_format"]],
            [(LogLevel.warn,
              "relay relay-b stopped heartbeating; its agents go to the live relays"),
             (LogLevel.info,
              ("relay relay-a: claimed 2 and handed over 0 agents; follows 2 of 2 agents with "
               "running jobs (2 live relays, share 2)"))])
        with capturedLogs() as logged:
            self.clock.advance(2)
        self.assertEqual(list(logged), [])
        self.db.owned, self.db.shed = frozenset({ONE}), 1
        with capturedLogs() as logged:
            self.clock.advance(2)
        self.assertEqual(self.db.calls.count("rebalance"), 3)
        self.assertEqual([formatEvent(e) for e in logged],
                         [("relay relay-a: claimed 0 and handed over 1 agents; follows 1 of 1 "
                           "agents with running jobs (2 live relays, share 1)")])

    def test_busy_claim_lock_retries_soon(self) -> None:
        """Another relay was rebalancing: try again after a short spread."""
        self.db.busy = True
        self.start()
        self.db.busy = False
        self.clock.advance(BUSY_RETRY * 0.5)
        self.assertEqual(self.db.calls.count("rebalance"), 2)

    def test_leave_hands_over_and_closes(self) -> None:
        """leave(): no more ticks, the row is deleted, the connection closed."""
        self.start()
        self.successResultOf(self.membership.leave())
        self.assertEqual(self.db.calls[-2:], ["leave", "close"])
        self.clock.advance(10)
        self.assertEqual(self.heartbeats(), 1)

    def test_leave_without_database_is_a_warning(self) -> None:
        """A leave that cannot reach the database warns (its row expires) and still closes."""
        self.start()
        self.db.fail = psycopg2.OperationalError("connection refused")
        with capturedLogs() as logged:
            self.successResultOf(self.membership.leave())
        self.assertTrue(self.db.closed)
        self.assertIn("could not leave", logged[-1]["log_format"])

    def test_leave_with_a_hung_database_gives_up(self) -> None:
        """A heartbeat that never answers cannot hang the stop: leave gives up and closes."""
        self.start()
        self.db.hold()
        self.clock.advance(2)
        with capturedLogs() as logged:
            leaving = self.membership.leave()
            self.assertNoResult(leaving)
            self.clock.advance(LEAVE_TIMEOUT)
        self.successResultOf(leaving)
        self.assertTrue(self.db.closed)
        self.assertIn("could not leave", logged[-1]["log_format"])

    def test_lease_must_outlast_three_heartbeats(self) -> None:
        """A lease shorter than three heartbeat intervals is refused."""
        kwargs: dict[str, Any] = {"clock": self.clock, "relay_id": "r", "on_change": print}
        self.assertRaises(
            ValueError, RelayMembership, self.db, heartbeat_interval=2, lease_ttl=5, **kwargs
        )


class ConfigTests(SynchronousTestCase):
    """The [worker] keys of the relays sharing a database."""

    BASE = '[database]\nurl = "postgres://x@localhost/db"\n[worker]\n'

    def test_defaults_fail_over_within_fifteen_seconds(self) -> None:
        """Defaults: id from host name and pid, 2 s heartbeats, 8 s leases (failover < 15 s)."""
        config = parse_relay_config(self.BASE, environ={})
        self.assertEqual((config.relay_id, config.heartbeat_interval, config.lease_ttl), ("", 2, 8))
        self.assertLessEqual(config.lease_ttl + config.heartbeat_interval, 15)
        self.assertRegex(default_relay_id(), r"^.+-\d+$")

    def test_keys_and_environment(self) -> None:
        """ws_relay_id, ws_relay_heartbeat_interval_secs, ws_relay_lease_ttl_secs; env wins."""
        text = self.BASE + (
            'ws_relay_id = "relay-east-1"\n'
            "ws_relay_heartbeat_interval_secs = 1\nws_relay_lease_ttl_secs = 4\n"
        )
        config = parse_relay_config(
            text, environ={"PATCH_MANAGER__WORKER__WS_RELAY_LEASE_TTL_SECS": "5"}
        )
        self.assertEqual((config.relay_id, config.heartbeat_interval, config.lease_ttl),
                         ("relay-east-1", 1, 5))

    def test_lease_shorter_than_three_heartbeats_is_refused(self) -> None:
        """A lease under three heartbeat intervals is a config error naming the key."""
        text = self.BASE + "ws_relay_heartbeat_interval_secs = 3\nws_relay_lease_ttl_secs = 8\n"
        error = self.assertRaises(ConfigError, parse_relay_config, text, "relay.toml", {})
        self.assertIn("worker.ws_relay_lease_ttl_secs", str(error))

    def test_bad_relay_id(self) -> None:
        """A relay id must be printable text."""
        error = self.assertRaises(
            ConfigError, parse_relay_config, self.BASE + "ws_relay_id = 7\n", "relay.toml", {}
        )
        self.assertIn("ws_relay_id", str(error))


class ReasonTests(SynchronousTestCase):
    def test_failed_rollback_names_its_cause(self) -> None:
        """A transaction cut by the server reads as the server's reason, in one line."""
        from twisted.python.failure import Failure
        from txpostgres.txpostgres import RollbackFailed

        from lpa.relay.membership import _reason

        cause = Failure(psycopg2.OperationalError(
            "terminating connection due to idle-in-transaction timeout\nSSL SYSCALL error"))
        self.assertEqual(
            _reason(Failure(RollbackFailed(None, cause))),
            "OperationalError: terminating connection due to idle-in-transaction timeout",
        )
