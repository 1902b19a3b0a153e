"""The job stream protocol as its transport's push producer, and the factory's wall clock.

The transport says when its buffer is full (``pauseProducing``), drained (``resumeProducing``)
or gone (``stopProducing``); the protocol passes that on to its session, which queues, flushes
or stops.  Over ``twisted.test.iosim`` with a task.Clock, as in tests.test_ws.
"""

from __future__ import annotations

import datetime
import json
import time

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from lpa.agent.eventlog import EventLog
from lpa.agent.ws import JobStreamFactory, JobStreamProtocol
from lpa.errors import TooManyConnectionsError
from lpa.events import RUNNING
from tests.fakes_jobs import FakeJobManager, new_job
from tests.test_ws import CLIENT_ADDRESS, ProtocolTestBase, build, fake_transport


class PushProducerTests(ProtocolTestBase):
    def test_registered_as_the_transports_producer(self) -> None:
        """Once open, the protocol itself is its transport's streaming producer."""
        _client, server, _pump = self.connect()
        transport = fake_transport(server)
        self.assertIs(transport.producer, server)
        self.assertTrue(transport.streamingProducer)

    def test_pause_holds_frames_and_resume_writes_them_in_order(self) -> None:
        """While paused nothing is written (the engine goes on); on resume the held frames
        are written, in order, and later ones follow directly."""
        client, server, pump = self.connect(subscribe_all=True)
        client.take()
        server.pauseProducing()
        job = new_job(self.jobs)
        self.jobs.step(job, RUNNING, 50, "half way")
        pump.flush()
        self.assertEqual(client.take(), [])
        assert server.session is not None
        self.assertEqual(server.session.queued, 2)
        self.assertEqual(self.events.last_seq(job), 2)
        server.resumeProducing()
        pump.flush()
        self.assertEqual([(m["seq"], m["progress"]) for m in client.take()], [(1, 0), (2, 50)])
        self.jobs.step(job, RUNNING, 60, "on")
        pump.flush()
        self.assertEqual([m["seq"] for m in client.take()], [3])

    def test_stop_ends_the_session(self) -> None:
        """stopProducing (the transport is gone) stops the session: it leaves the EventLog,
        drops what it held, and writes nothing more."""
        client, server, pump = self.connect(subscribe_all=True)
        client.take()
        server.pauseProducing()
        new_job(self.jobs)
        self.assertEqual(self.events.subscriber_count(), 1)
        server.stopProducing()
        self.assertEqual(self.events.subscriber_count(), 0)
        assert server.session is not None
        self.assertEqual((server.session.closed, server.session.queued), (True, 0))
        server.resumeProducing()
        new_job(self.jobs)
        pump.flush()
        self.assertEqual(client.take(), [])

    def test_signals_before_the_session_change_nothing(self) -> None:
        """Pause, resume or stop before the opening handshake completed (no session yet) are
        harmless and not carried over: the session made at open starts unpaused and live."""
        server = build(self.factory, JobStreamProtocol, CLIENT_ADDRESS)
        server.stopProducing()
        server.resumeProducing()
        server.pauseProducing()
        self.assertIsNone(server.session)
        client, server, pump = self.connect(server=server, subscribe_all=True)
        self.assertEqual([m["event"] for m in client.take()], ["connected", "subscribed"])
        new_job(self.jobs)
        pump.flush()
        self.assertEqual([m["event"] for m in client.take()], ["job_status"])


class WallClockTests(SynchronousTestCase):
    def test_refusal_stamped_with_the_wall_clock(self) -> None:
        """A factory built without a clock stamps its HTTP refusals with the wall clock."""
        engine_clock = Clock()  # the engine's; the factory gets none
        events = EventLog(engine_clock)
        clock_free = JobStreamFactory(events, FakeJobManager(engine_clock, events=events))
        before = time.time()
        raw = clock_free.http_error(TooManyConnectionsError("full"))
        after = time.time()
        stamp = json.loads(raw.partition(b"\r\n\r\n")[2])["timestamp"]
        when = datetime.datetime.fromisoformat(stamp).timestamp()
        self.assertTrue(before - 1e-6 <= when <= after + 1e-6, (before, stamp, after))
