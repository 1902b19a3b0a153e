"""Backpressure: past the high-water mark of events waiting for the store, agents are not read."""

from __future__ import annotations

from typing import Any

from twisted.logger import capturedLogs
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from txaio.testutil import replace_loop
from zope.interface.verify import verifyObject

from lpa.relay.backoff import HandshakeGate
from lpa.relay.interfaces import AgentAddress, IRelayStore
from lpa.relay.pressure import StoreGauge
from lpa.relay.ws_client import WebSocketDialer
from tests.fakes_relay import FakeRelayStore
from tests.memnet import MemoryNetwork
from tests.pgutil import event
from tests.test_relay_ws_client import Listener, agent_factory

ONE = AgentAddress("agent1.example", 12443)


class GaugeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = FakeRelayStore()
        self.host_job = self.store.add_host_job(
            row_id="r1", job_id="j1", host_id="h1", agent_job_id="a1"
        )
        self.calls: list[str] = []
        self.gauge = StoreGauge(
            self.store,
            high=4,
            low=2,
            pause=lambda: self.calls.append("pause"),
            resume=lambda: self.calls.append("resume"),
        )

    def apply(self, first: int, count: int) -> Any:
        events = [event("a1", seq, "running") for seq in range(first, first + count)]
        return self.gauge.apply_events(self.host_job, events, "ws")

    def test_is_a_store(self) -> None:
        """The gauge stands where the store stood."""
        verifyObject(IRelayStore, self.gauge)

    def test_pauses_above_high_and_resumes_below_low(self) -> None:
        """Over ``high`` events in flight: pause once; back under ``low``: resume once."""
        self.store.hold()
        with capturedLogs():
            self.apply(1, 3)
            self.assertEqual(self.calls, [])
            self.apply(4, 2)
            self.apply(6, 1)
            self.assertEqual((self.calls, self.gauge.in_flight), (["pause"], 6))
            self.store.release()
        self.assertEqual((self.calls, self.gauge.in_flight), (["pause", "resume"], 0))

    def test_failures_are_counted_out_too(self) -> None:
        """A call that fails leaves the count as well (and its failure reaches the caller)."""
        self.store.error = RuntimeError("db down")
        self.failureResultOf(self.apply(1, 10), RuntimeError)
        self.assertEqual(self.gauge.in_flight, 0)


class PauseReadingTests(SynchronousTestCase):
    def test_dialer_pauses_open_and_new_sockets(self) -> None:
        """pause_reading stops reading open sockets and ones opened later; resume restarts them."""
        network = MemoryNetwork()
        loop = replace_loop(network)
        loop.__enter__()
        self.addCleanup(loop.__exit__, None, None, None)
        network.listen(ONE.host, ONE.port, agent_factory())
        dialer = WebSocketDialer(
            reactor=network, clock=network, tls_options_for=lambda host: "tls",
            gate=HandshakeGate(4), handshake_timeout=5, initial_delay=1, max_delay=2, jitter=0,
            negotiated_protocol=lambda transport: "http/1.1",
        )
        paused: list[str] = []
        self.patch(iosim.FakeTransport, "pauseProducing", lambda t: paused.append("pause"))
        self.patch(iosim.FakeTransport, "resumeProducing", lambda t: paused.append("resume"))
        dialer.pause_reading()
        websocket = dialer(ONE, Listener())
        network.flush()
        self.assertEqual(paused, ["pause"])  # opened while paused: paused once open
        dialer.resume_reading()
        dialer.pause_reading()
        self.assertEqual(paused, ["pause", "resume", "pause"])
        stopping = websocket.stop(close_timeout=1)
        network.run(2)
        self.successResultOf(stopping)
        self.assertEqual(paused[-1], "resume")  # the close handshake reads
