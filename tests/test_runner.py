"""Tests for lpa.tools.runner: a coroutine on react with an exit status, errors and Ctrl-C."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from lpa.errors import LpaError
from lpa.tools import runner


class FakeReactor:
    """Just what ``react`` uses; ``during_run`` runs once the reactor is up."""

    def __init__(self, during_run: Callable[[], None] = lambda: None) -> None:
        self.running = False
        self.stopped = False
        self.waiting: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self.during_run = during_run

    def callWhenRunning(self, f: Callable[..., Any], *args: Any) -> None:
        if self.running:
            f(*args)
        else:
            self.waiting.append((f, args))

    def addSystemEventTrigger(self, phase: str, event: str, f: Callable[..., Any]) -> None:
        pass

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        f(*args)

    def run(self) -> None:
        self.running = True
        for f, args in self.waiting:
            f(*args)
        if not self.stopped:
            self.during_run()

    def stop(self) -> None:
        self.stopped = True


class RunTests(SynchronousTestCase):
    def setUp(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.addCleanup(signal.signal, signum, signal.getsignal(signum))

    def test_exit_status(self) -> None:
        """The coroutine's return value is the exit status; the reactor is stopped once."""
        reactor = FakeReactor()

        async def main(given: Any) -> int:
            self.assertIs(given, reactor)
            return 3

        self.assertEqual(runner.run(main, _reactor=reactor), 3)
        self.assertTrue(reactor.stopped)

    def test_error_raised_again(self) -> None:
        """An error of the coroutine is raised by run() itself, for the CLI to map."""
        async def main(reactor: Any) -> int:
            raise LpaError("the agent said no")

        error = self.assertRaises(LpaError, runner.run, main, _reactor=FakeReactor())
        self.assertEqual(str(error), "the agent said no")

    def test_ctrl_c_cancels(self) -> None:
        """SIGINT cancels the coroutine (its finally runs) and run() raises KeyboardInterrupt."""
        cleaned: list[str] = []

        async def main(reactor: Any) -> int:
            try:
                await Deferred()
            finally:
                cleaned.append("closed")
            return 0

        def press_ctrl_c() -> None:
            handler = signal.getsignal(signal.SIGINT)
            assert callable(handler), handler
            handler(signal.SIGINT, None)

        reactor = FakeReactor(press_ctrl_c)
        self.assertRaises(KeyboardInterrupt, runner.run, main, _reactor=reactor)
        self.assertEqual(cleaned, ["closed"])

    def test_second_ctrl_c_stops(self) -> None:
        """A second SIGINT while the clean-up hangs stops the reactor at once."""
        async def main(reactor: Any) -> int:
            try:
                await Deferred()
            finally:
                await Deferred()  # a clean-up that never ends
            return 0

        def press_twice() -> None:
            handler = signal.getsignal(signal.SIGTERM)
            assert callable(handler), handler
            handler(signal.SIGTERM, None)
            handler(signal.SIGTERM, None)

        reactor = FakeReactor(press_twice)
        self.assertRaises(KeyboardInterrupt, runner.run, main, _reactor=reactor)
        self.assertTrue(reactor.stopped)
