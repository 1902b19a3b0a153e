"""Running one ``lpa`` subcommand on the Twisted reactor, with a plain exit status.

:func:`run` wraps :func:`twisted.internet.task.react` so a subcommand is written as a coroutine
``main(reactor) -> int`` and behaves like any other subcommand for :mod:`lpa.tools.cli`:

* its return value is the exit status;
* an exception it raises (``LpaError``, ``BrokenPipeError``, a bug) is raised again by
  :func:`run` once the reactor has stopped, so the CLI maps it to one line (or a traceback for a
  bug) in one place, and nothing is logged as "main function encountered error";
* SIGINT (Ctrl-C) or SIGTERM cancels the coroutine (its ``finally`` blocks run: sockets close,
  pools drain) and :func:`run` raises :class:`KeyboardInterrupt`.

The reactor runs once per process: tests call the coroutine directly with their own reactor.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.task import react


def run(main: Callable[[Any], Awaitable[int]], *, _reactor: Any = None) -> int:
    """Run ``main(reactor)`` to completion; see the module docstring."""
    outcome: dict[str, Any] = {}
    interrupted: list[int] = []

    async def wrapped(reactor: Any) -> None:
        task = defer.Deferred.fromCoroutine(_call(main, reactor))

        def interrupt(signum: int, frame: Any) -> None:
            interrupted.append(signum)
            if len(interrupted) == 1:
                reactor.callFromThread(task.cancel)
            else:  # the clean-up hangs: stop now
                outcome.setdefault("error", KeyboardInterrupt())
                reactor.callFromThread(reactor.stop)

        def install() -> None:
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, interrupt)

        reactor.callWhenRunning(install)
        try:
            outcome["value"] = await task
        except defer.CancelledError:
            if interrupted:
                outcome["error"] = KeyboardInterrupt()
            else:
                raise
        except BaseException as error:  # handed to the caller after the reactor stopped
            outcome["error"] = error

    with contextlib.suppress(SystemExit):
        react(wrapped, _reactor=_reactor)
    if "error" in outcome:
        raise outcome["error"]
    return int(outcome.get("value") or 0)


async def _call(main: Callable[[Any], Awaitable[int]], reactor: Any) -> int:
    return await main(reactor)
