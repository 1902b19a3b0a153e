"""An in-memory :class:`~lpa.relay.membership.IMembershipDatabase` driven by the test.

Each call is recorded and answered from what the test set: ``owned`` (the agents the next
rebalance returns), ``members`` (live relays it reports, 2 by default), ``fail`` (an exception
every heartbeat raises: the database is down),
``hold`` (heartbeats and leave stay pending until ``release()``: the database hangs),
``rebalance_held`` (rebalances stay pending), ``claimed``/``shed``/``expired`` (what the next
rebalance says it moved; later ones move nothing).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from zope.interface import implementer

from lpa.relay.interfaces import AgentAddress
from lpa.relay.membership import IMembershipDatabase, Rebalance


@implementer(IMembershipDatabase)
class FakeMembershipDatabase:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.owned: frozenset[AgentAddress] = frozenset()
        self.busy = False
        #: live relays the next rebalance reports (1: this relay is alone)
        self.members = 2
        self.joined_next = True
        self.fail: Exception | None = None
        self.held: list[Deferred[Any]] | None = None  # heartbeats (bool) and leaves
        #: when a list, rebalances stay pending (appended here)
        self.rebalance_held: list[Deferred[Rebalance]] | None = None
        self.wakeup: Callable[[], None] | None = None
        self.closed = False
        #: what the next rebalance reports it claimed, shed and found expired
        self.claimed = 0
        self.shed = 0
        self.expired: tuple[str, ...] = ()

    def connect(self) -> Deferred[None]:
        self.calls.append("connect")
        return defer.succeed(None)

    def heartbeat(self) -> Deferred[bool]:
        self.calls.append("heartbeat")
        if self.held is not None:
            waiting: Deferred[bool] = Deferred()
            self.held.append(waiting)
            return waiting
        if self.fail is not None:
            return defer.fail(self.fail)
        joined, self.joined_next = self.joined_next, False
        return defer.succeed(joined)

    def hold(self) -> None:
        self.held = []

    def release(self) -> None:
        held, self.held = self.held or [], None
        for waiting in held:
            if self.fail is not None:
                waiting.errback(self.fail)
            else:
                waiting.callback(False)

    def rebalance(self) -> Deferred[Rebalance]:
        self.calls.append("rebalance")
        if self.rebalance_held is not None:
            waiting: Deferred[Rebalance] = Deferred()
            self.rebalance_held.append(waiting)
            return waiting
        moved = Rebalance(owned=self.owned, agents=len(self.owned), target=len(self.owned),
                          members=self.members, busy=self.busy, claimed=self.claimed,
                          shed=self.shed, expired=self.expired)
        self.claimed, self.shed, self.expired = 0, 0, ()
        return defer.succeed(moved)

    def leave(self) -> Deferred[object]:
        self.calls.append("leave")
        if self.held is not None:
            waiting: Deferred[object] = Deferred()
            self.held.append(waiting)
            return waiting
        if self.fail is not None:
            return defer.fail(self.fail)
        return defer.succeed(None)

    def set_wakeup(self, callback: Callable[[], None]) -> None:
        self.wakeup = callback

    def close(self) -> None:
        self.calls.append("close")
        self.closed = True
