"""The scan: one link per agent with running rows; add, remove, disconnect; failures."""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from lpa.relay.interfaces import AgentAddress, HostJob
from lpa.relay.scanner import START_BATCH, Scanner
from tests.fakes_relay import FakeRelayStore

ONE = AgentAddress("agent1.example", 12443)
TWO = AgentAddress("agent2.example", 12444)


class FakeLink:
    def __init__(self, address: AgentAddress) -> None:
        self.address = address
        self.started: list[str] | None = None
        self.updates: list[list[str]] = []
        self.stopped = False

    def start(self, host_jobs: list[HostJob]) -> None:
        self.started = [h.row_id for h in host_jobs]

    def update(self, host_jobs: list[HostJob]) -> None:
        self.updates.append([h.row_id for h in host_jobs])

    def stop(self) -> Deferred[None]:
        self.stopped = True
        return succeed(None)


class ScannerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = FakeRelayStore()
        self.made: list[FakeLink] = []

        def make_link(address: AgentAddress) -> FakeLink:
            link = FakeLink(address)
            self.made.append(link)
            return link

        self.scanner = Scanner(self.store, make_link, clock=self.clock, interval=10)
        self.addCleanup(self.scanner.stop_scanning)

    def add(self, row_id: str, agent: AgentAddress, status: str = "running") -> None:
        self.store.add_host_job(
            row_id=row_id,
            job_id="j1",
            host_id=row_id,
            agent_job_id=f"a-{row_id}",
            agent=agent,
            status=status,
        )

    def test_groups_rows_by_agent(self) -> None:
        """Running rows are grouped per agent address (port honoured); one link per agent."""
        self.add("r1", ONE)
        self.add("r2", ONE)
        self.add("r3", TWO)
        self.add("r4", AgentAddress("agent1.example", 9999), status="succeeded")
        self.scanner.start()
        self.assertEqual(
            {link.address: link.started for link in self.made}, {ONE: ["r1", "r2"], TWO: ["r3"]}
        )

    def test_rescan_updates_and_disconnects(self) -> None:
        """The next scan updates existing links and stops links whose agent has no running row."""
        self.add("r1", ONE)
        self.add("r3", TWO)
        self.scanner.start()
        self.add("r2", ONE)
        self.store.rows["r3"] = self.store.rows["r3"].__class__(
            status="failed", agent_job_id="a-r3"
        )
        self.clock.advance(10)
        one, two = self.made
        self.assertEqual((one.updates, one.stopped, two.stopped), ([["r1", "r2"]], False, True))
        self.assertEqual(set(self.scanner.links), {ONE})

    def test_failing_scan_goes_on(self) -> None:
        """A failed read is logged, keeps the links, and the loop scans again next interval."""
        self.add("r1", ONE)
        self.scanner.start()
        self.store.error = RuntimeError("db down")
        self.clock.advance(10)
        self.assertEqual((len(self.made), self.made[0].stopped), (1, False))
        self.store.error = None
        self.clock.advance(10)
        self.assertEqual(self.made[0].updates, [["r1"]])
        self.assertEqual(len([c for c in self.store.calls if c.method == "running_host_jobs"]), 3)

    def test_stop_links(self) -> None:
        """stop_scanning ends the loop; stop_links stops every link."""
        self.add("r1", ONE)
        self.scanner.start()
        self.scanner.stop_scanning()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.successResultOf(self.scanner.stop_links())
        self.assertTrue(self.made[0].stopped)
        self.assertEqual(self.scanner.links, {})

    def test_link_that_cannot_start_is_retried(self) -> None:
        """A link whose start raises (unreadable certificates) is dropped; the next scan retries."""
        self.add("r1", ONE)
        original = FakeLink.start
        attempts = []

        def failing_start(link: FakeLink, host_jobs: list[HostJob]) -> None:
            attempts.append(link)
            if len(attempts) == 1:
                raise OSError("client.key: No such file or directory")
            original(link, host_jobs)

        self.patch(FakeLink, "start", failing_start)
        self.scanner.start()
        self.assertEqual((self.scanner.links, self.made[0].stopped), ({}, True))
        self.clock.advance(10)
        self.assertEqual(self.scanner.links, {ONE: self.made[1]})
        self.assertEqual(self.made[1].started, ["r1"])


class OwnershipTests(SynchronousTestCase):
    """With membership, the scanner follows only the agents this relay owns."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.store = FakeRelayStore()
        self.made: list[FakeLink] = []

        def make_link(address: AgentAddress) -> FakeLink:
            link = FakeLink(address)
            self.made.append(link)
            return link

        self.scanner = Scanner(self.store, make_link, clock=self.clock, interval=10)
        self.addCleanup(self.scanner.stop_scanning)
        for row_id, agent in (("r1", ONE), ("r2", TWO)):
            self.store.add_host_job(
                row_id=row_id, job_id="j1", host_id=row_id, agent_job_id=f"a-{row_id}", agent=agent
            )

    def scans(self) -> int:
        return len([c for c in self.store.calls if c.method == "running_host_jobs"])

    def test_only_owned_agents_are_followed(self) -> None:
        """Running rows of agents another relay owns are left alone."""
        self.scanner.set_owned(frozenset({ONE}))
        self.scanner.start()
        self.assertEqual([link.address for link in self.made], [ONE])

    def test_lost_agent_is_dropped_at_once_without_the_database(self) -> None:
        """An agent no longer ours is disconnected now, even while the database is down."""
        self.scanner.set_owned(frozenset({ONE, TWO}))
        self.scanner.start()
        self.store.error = RuntimeError("db down")
        self.scanner.set_owned(frozenset({TWO}))
        self.assertEqual((self.made[0].stopped, self.made[1].stopped), (True, False))
        self.assertEqual(set(self.scanner.links), {TWO})
        self.assertEqual(self.scans(), 1)

    def test_gained_agent_is_scanned_now(self) -> None:
        """A newly owned agent is followed at once, from a fresh read of its rows."""
        self.scanner.set_owned(frozenset())
        self.scanner.start()
        self.assertEqual(self.made, [])
        self.scanner.set_owned(frozenset({TWO}))
        self.assertEqual(self.scans(), 2)
        self.assertEqual([link.address for link in self.made], [TWO])
        self.assertEqual(self.clock.getDelayedCalls()[0].getTime(), 10)  # the loop's own pace

    def test_scan_asked_for_during_a_scan_runs_after_it(self) -> None:
        """A scan asked for while one is in flight runs once more right after it."""
        self.store.hold()
        self.scanner.set_owned(frozenset({ONE}))
        self.scanner.start()
        self.scanner.set_owned(frozenset({ONE, TWO}))
        self.assertEqual(self.scans(), 1)
        self.store.release()
        self.assertEqual(self.scans(), 2)
        self.assertEqual({link.address for link in self.made}, {ONE, TWO})


class BatchTests(SynchronousTestCase):
    def test_many_new_links_start_a_batch_per_turn(self) -> None:
        """Thousands of new agents: START_BATCH links per reactor turn, the loop stays free."""
        clock = Clock()
        store = FakeRelayStore()
        made: list[FakeLink] = []
        for n in range(START_BATCH * 2 + 50):
            store.add_host_job(row_id=f"r{n}", job_id="j1", host_id=f"h{n}",
                               agent_job_id=f"a{n}", agent=AgentAddress(f"agent{n}", 12443))

        def make_link(address: AgentAddress) -> FakeLink:
            made.append(FakeLink(address))
            return made[-1]

        scanner = Scanner(store, make_link, clock=clock, interval=10)
        scanner.start()
        self.assertEqual(len(made), START_BATCH)
        turns = [c for c in clock.getDelayedCalls() if c.getTime() == 0]
        self.assertEqual(len(turns), 1)  # the rest waits for the next reactor turn
        scanner.stop_scanning()
        self.assertEqual(clock.getDelayedCalls(), [])  # the waiting starts are dropped
        self.assertEqual(len(scanner.links), START_BATCH)

    def test_the_rest_start_in_later_turns(self) -> None:
        """Every waiting link starts once the turns come."""
        clock = Clock()
        store = FakeRelayStore()
        for n in range(START_BATCH + 7):
            store.add_host_job(row_id=f"r{n}", job_id="j1", host_id=f"h{n}",
                               agent_job_id=f"a{n}", agent=AgentAddress(f"agent{n}", 12443))
        scanner = Scanner(store, FakeLink, clock=clock, interval=10)
        self.addCleanup(scanner.stop_scanning)
        scanner.start()
        clock.advance(0)
        self.assertEqual(len(scanner.links), START_BATCH + 7)
