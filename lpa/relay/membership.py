"""Relays share the fleet: heartbeats, agent leases and self-fencing, on the injected clock.

Every ``heartbeat_interval``, on a fixed cadence (a slow rebalance never delays the next beat;
a beat still in flight is not doubled)::

    heartbeat ──ok──▶ fence moved to (send time + lease_ttl - heartbeat_interval)
        │                 │
        │ failed          ▼
        │             rebalance (one transaction, see membership_db; also soon after another
        │             relay joins, leaves or sheds agents): expired relays dropped,
        │             target = ceil(agents with running jobs / live relays), shed the excess,
        │             claim up to the target ──▶ on_change(owned agents) when it changed
        ▼
    keep the agents we have until the fence; past it on_change(∅): our leases may be
    expiring, and another relay must not find us still following what it takes over --
    unless the last rebalance found no other relay: then nobody can take over (a relay that
    starts meanwhile may follow the same agents until we are back, which is harmless), and
    dropping every agent would only stop the one relay there is, as the relay did before
    relays shared the fleet

The fence is measured on our own clock from the moment the last successful heartbeat was SENT:
the database stamped it no earlier, so our row lives at least ``lease_ttl`` past that moment,
and we stop ``heartbeat_interval`` before that (docs/architecture.rst, "Relays share the fleet").

The module is a little over 400 lines because the heartbeat, the fence and the rebalance
share one timer and one state; the database side lives in :mod:`lpa.relay.membership_db`.
"""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Callable
from typing import Any

import attr
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface

from lpa.relay.interfaces import AgentAddress

_log = Logger()

#: wake-ups (another relay joined, left or shed agents) tick after a random delay below this,
#: so the relays that hear one notification do not all take the claim lock at the same moment
WAKE_SPREAD = 0.25
#: the claim lock was busy: try again after a random delay below this
BUSY_RETRY = 0.3
#: leaving gives up after this long (a hung database must not hang SIGTERM)
LEAVE_TIMEOUT = 5.0


def default_relay_id() -> str:
    """``host name-pid``: unique per process; a restarted relay is a new member."""
    return f"{socket.gethostname()}-{os.getpid()}"


@attr.s(frozen=True, slots=True, auto_attribs=True, kw_only=True)
class Rebalance:
    """What one rebalance transaction saw and did."""

    owned: frozenset[AgentAddress]
    agents: int = 0  # agents with running jobs
    members: int = 1  # live relays, this one included
    target: int = 0  # ceil(agents / members): what this relay may follow
    claimed: int = 0
    shed: int = 0
    expired: tuple[str, ...] = ()  # relays whose membership expired, removed by this transaction
    #: another relay held the claim lock: owned is what we hold, nothing was claimed or shed
    busy: bool = False


class RelayIdInUse(Exception):
    """Another live relay process registered under our relay id."""


class IMembershipDatabase(Interface):
    """The membership tables behind :class:`RelayMembership` (PostgreSQL in production)."""

    def connect() -> Deferred[None]:
        """Open the connection; fires once the first attempt ended (never errbacks)."""

    def heartbeat() -> Deferred[bool]:
        """Renew our row (insert it when absent or expired); fire True when we just joined.

        Errbacks :class:`RelayIdInUse` when another live process holds our relay id.
        """

    def rebalance() -> Deferred[Rebalance]:
        """Drop expired relays, shed or claim agents towards our share; fire a Rebalance."""

    def leave() -> Deferred[object]:
        """Delete our row (our leases go with it) and tell the other relays; fires when done."""

    def set_wakeup(callback: Callable[[], None]) -> None:
        """Call ``callback()`` when another relay joins, leaves or sheds agents."""

    def close() -> None:
        """Close the connection and stop reconnecting."""


def _reason(failure: Failure) -> str:
    """One line: the exception's class and first line (a failed rollback: what caused it)."""
    original = getattr(failure.value, "originalFailure", None)  # txpostgres RollbackFailed
    if isinstance(original, Failure):
        failure = original
    name = type(failure.value).__name__
    text = (str(failure.value).strip().splitlines() or [name])[0]
    return f"{name}: {text}"


class RelayMembership:
    """This relay's membership: heartbeats, rebalances, fencing (see the module docstring).

    :param on_change: called with the agents this relay follows from now on, each time that set
        changes (an empty set when fenced).
    :param jitter: a float in ``[0, 1)``; spreads wake-ups and busy retries.
    """

    def __init__(
        self,
        database: Any,
        *,
        clock: IReactorTime,
        relay_id: str,
        heartbeat_interval: float,
        lease_ttl: float,
        on_change: Callable[[frozenset[AgentAddress]], None],
        jitter: Callable[[], float] = random.random,
    ) -> None:
        if not heartbeat_interval > 0 or lease_ttl < 3 * heartbeat_interval:
            raise ValueError("lease_ttl must be at least three heartbeat intervals")
        self._db: IMembershipDatabase = database
        self._clock = clock
        self.relay_id = relay_id
        self.interval = heartbeat_interval
        self.lease_ttl = lease_ttl
        #: how long after a heartbeat was sent we may follow agents without a newer one
        self.fence_after = lease_ttl - heartbeat_interval
        self._on_change = on_change
        self._jitter = jitter
        self.owned: frozenset[AgentAddress] = frozenset()
        self.fenced = True  # nothing followed before the first heartbeat
        self._running = False
        # the database's Deferreds, whose results change along their callback chains
        self._beating: Deferred[Any] | None = None
        self._rebalancing: Deferred[Any] | None = None
        self._again = False
        self._next_beat: IDelayedCall | None = None
        self._next_rebalance: IDelayedCall | None = None
        self._fence: IDelayedCall | None = None
        self._failing: str | None = None  # the outage being reported, if any
        self._in_use = False
        self._joined_once = False
        #: the last rebalance saw no other live relay
        self.alone = False
        self._kept_alone = False

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Connect, then beat now and every ``heartbeat_interval``; fires once connected."""
        self._running = True
        self._db.set_wakeup(self.wake)
        connecting = self._db.connect()
        return connecting.addCallback(lambda _: self._beat() if self._running else None)

    def stop(self) -> None:
        """Stop beating (links stay as they are; :meth:`leave` hands them over)."""
        self._running = False
        for call in (self._next_beat, self._next_rebalance, self._fence):
            if call is not None and call.active():
                call.cancel()
        self._next_beat = self._next_rebalance = self._fence = None

    def leave(self) -> Deferred[None]:
        """Hand our agents to the other relays at once; then close. Never errbacks.

        Work in flight is not awaited: a rebalance that commits later cannot claim for a
        relay whose row is gone (the lease's foreign key), and a hung database gives up after
        ``LEAVE_TIMEOUT`` so that it cannot hang a stop.
        """
        self.stop()

        def left(_: object) -> None:
            _log.info(
                "relay {relay_id} left: its agents go to the other relays", relay_id=self.relay_id
            )

        def failed(failure: Failure) -> None:
            _log.warn(
                "relay {relay_id} could not leave ({reason}); its agents go to the other relays "
                "when its membership expires in at most {ttl:g}s",
                relay_id=self.relay_id,
                reason=_reason(failure),
                ttl=self.lease_ttl,
            )

        leaving = self._db.leave()
        leaving.addTimeout(LEAVE_TIMEOUT, self._clock)
        leaving.addCallbacks(left, failed)
        return leaving.addBoth(lambda _: self._db.close())

    def readiness(self) -> str | None:
        """Why our membership is not current and what we follow meanwhile (``/readyz``)."""
        if not self.fenced:
            return None
        if self._in_use:
            return f"relay id {self.relay_id} is in use by another running relay: following nothing"
        if not self._joined_once:
            return "not yet registered with the relays sharing the database: following nothing"
        if self.owned:  # the only relay at the last rebalance keeps its agents (module doc)
            count, plural = len(self.owned), "" if len(self.owned) == 1 else "s"
            return ("our membership lapsed (no heartbeat within the lease); as the only relay it "
                    f"keeps following its {count} agent{plural}")
        return "our membership lapsed (no heartbeat within the lease): following nothing"

    # -- heartbeats -------------------------------------------------------------------------

    def _beat(self) -> None:
        self._next_beat = None
        if not self._running:
            return
        self._next_beat = self._clock.callLater(self.interval, self._beat)
        if self._beating is not None:
            return  # the last one still hangs: the fence decides, no pile-up
        sent = self._clock.seconds()
        self._beating = self._db.heartbeat()
        self._beating.addCallbacks(
            self._beaten, self._heartbeat_failed, callbackArgs=(sent,), errbackArgs=(sent,)
        )
        self._beating.addErrback(lambda f: _log.failure("relay heartbeat handling failed", f))

        def done(_: object) -> None:
            self._beating = None

        self._beating.addBoth(done)

    def _beaten(self, joined: bool, sent: float) -> None:
        if not self._running:
            return
        took = self._clock.seconds() - sent
        if took > self.interval:
            _log.warn(
                "relay {relay_id}: a heartbeat took {took:.1f}s (more than the {interval:g}s "
                "interval): the database or this relay is overloaded; past {fence:g}s the "
                "relay stops following its agents",
                relay_id=self.relay_id,
                took=took,
                interval=self.interval,
                fence=self.fence_after,
            )
        if self._failing is not None or self._in_use:
            _log.info("relay {relay_id}: the database is reachable again", relay_id=self.relay_id)
        self._failing = None
        self._in_use = False
        self._kept_alone = False
        if joined:
            _log.info(
                "relay {relay_id} {verb} the relays sharing the database "
                "(heartbeat every {interval:g}s, lease {ttl:g}s)",
                relay_id=self.relay_id,
                verb="rejoined" if self._joined_once else "joined",
                interval=self.interval,
                ttl=self.lease_ttl,
            )
            self._joined_once = True
        remaining = sent + self.fence_after - self._clock.seconds()
        if remaining <= 0:
            return  # too late to count: the fence already fired or is due
        self.fenced = False
        if self._fence is not None and self._fence.active():
            self._fence.cancel()
        self._fence = self._clock.callLater(remaining, self._fenced)
        self._rebalance()

    def _heartbeat_failed(self, failure: Failure, sent: float) -> None:
        if failure.check(RelayIdInUse):
            if not self._in_use:
                _log.error(
                    "relay id {relay_id} is in use by another running relay: {reason}; give "
                    "each relay its own [worker] ws_relay_id (or leave it unset)",
                    relay_id=self.relay_id,
                    reason=str(failure.value),
                )
            self._in_use = True
            self._fenced(force=True)
            return
        reason = _reason(failure)
        if self._failing is None:
            _log.warn(
                "relay {relay_id}: heartbeat failed ({reason}); it stops following its agents "
                "if the database stays unreachable",
                relay_id=self.relay_id,
                reason=reason,
            )
        self._failing = reason

    def _fenced(self, force: bool = False) -> None:
        self._fence = None
        self.fenced = True
        if self.alone and not force:
            if self.owned and not self._kept_alone:
                _log.warn(
                    "relay {relay_id}: no heartbeat reached the database for {fence:g}s; it "
                    "is the only relay, so it keeps following its {count} agents",
                    relay_id=self.relay_id,
                    fence=self.fence_after,
                    count=len(self.owned),
                )
            self._kept_alone = True
            return
        if self.owned:
            _log.warn(
                "relay {relay_id}: no heartbeat reached the database for {fence:g}s; stopped "
                "following {count} agents so that the other relays can take them over",
                relay_id=self.relay_id,
                fence=self.fence_after,
                count=len(self.owned),
            )
        self._set_owned(frozenset())

    # -- rebalancing ------------------------------------------------------------------------

    def wake(self) -> None:
        """Another relay joined, left or shed agents: rebalance soon, not at the next beat."""
        if self._running and not self.fenced:
            self._rebalance_later(WAKE_SPREAD * self._jitter())

    def _rebalance_later(self, delay: float) -> None:
        call = self._next_rebalance
        if call is not None and call.active():
            if call.getTime() <= self._clock.seconds() + delay:
                return
            call.cancel()
        self._next_rebalance = self._clock.callLater(delay, self._rebalance)

    def _rebalance(self) -> None:
        self._next_rebalance = None
        if not self._running or self.fenced:
            return
        if self._rebalancing is not None:
            self._again = True
            return
        self._rebalancing = self._db.rebalance()
        self._rebalancing.addCallbacks(self._rebalanced, self._rebalance_failed)
        self._rebalancing.addErrback(lambda f: _log.failure("relay rebalance handling failed", f))

        def done(_: object) -> None:
            self._rebalancing = None
            if self._again and self._running:
                self._again = False
                self._rebalance_later(WAKE_SPREAD * self._jitter())

        self._rebalancing.addBoth(done)

    def _rebalanced(self, result: Rebalance) -> None:
        if not self._running or self.fenced:
            return  # fenced while it ran: what it says may no longer be ours to follow
        self._report(result)
        if not result.busy:
            self.alone = result.members <= 1
        self._set_owned(result.owned)
        if result.busy:
            self._rebalance_later(BUSY_RETRY * self._jitter())

    def _rebalance_failed(self, failure: Failure) -> None:
        _log.warn(
            "relay {relay_id}: rebalance failed, keeping the agents it follows: {reason}",
            relay_id=self.relay_id,
            reason=_reason(failure),
        )

    def _report(self, result: Rebalance) -> None:
        for relay_id in result.expired:
            _log.warn(
                "relay {expired} stopped heartbeating; its agents go to the live relays",
                expired=relay_id,
            )
        if result.claimed or result.shed:
            _log.info(
                "relay {relay_id}: claimed {claimed} and handed over {shed} agents; follows "
                "{owned} of {agents} agents with running jobs ({members} live relays, "
                "share {target})",
                relay_id=self.relay_id,
                claimed=result.claimed,
                shed=result.shed,
                owned=len(result.owned),
                agents=result.agents,
                members=result.members,
                target=result.target,
            )

    def _set_owned(self, owned: frozenset[AgentAddress]) -> None:
        if owned == self.owned:
            return
        self.owned = owned
        try:
            self._on_change(owned)
        except Exception:  # a bug: logged with its traceback, heartbeats go on
            _log.failure("relay membership: applying the agents to follow failed")
