"""The seams of the relay.

Flow::

    scanner ──running_host_jobs()──▶ IRelayStore (PostgreSQL)
       │ groups rows by agent (address, port)
       ▼
    AgentLink (machine.py) ── WebSocket client ─┐  events (JobEvent)
       │ handshake failed → poller (treq) ──────┴──▶ apply_events(host_job, events, transport)
       ▼                                              each call in one transaction (shared with
    back to the WebSocket when it opens               other rows' calls): guarded update,
                                                      roll-up under lock, pg_notify
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attr
from twisted.internet.defer import Deferred
from zope.interface import Interface

TRANSPORT_WS = "ws"
TRANSPORT_POLL = "poll"


@attr.s(frozen=True, slots=True, auto_attribs=True)
class AgentAddress:
    """Where an agent listens: ``hosts.fqdn`` (else ``ip_address``) and ``hosts.agent_port``."""

    host: str
    port: int


@attr.s(frozen=True, slots=True, auto_attribs=True, kw_only=True)
class HostJob:
    """One running ``patch_job_hosts`` row the relay follows."""

    row_id: str  # patch_job_hosts.id
    job_id: str  # patch_jobs.id
    host_id: str
    agent_job_id: str
    agent: AgentAddress
    #: the last agent event seq applied to this row (0 when none)
    last_seq: int = 0
    #: the row held a JOB_NOT_FOUND time (``relay_missing_since``) when it was read: the first
    #: answer showing the job clears it (lpa.relay.missing); without one, starting to follow
    #: the row costs no write
    missing_recorded: bool = False


@attr.s(frozen=True, slots=True, auto_attribs=True, kw_only=True)
class ApplyResult:
    """What one ``apply_events`` call did."""

    applied: int  # events that changed the row (skipped duplicates not counted)
    last_seq: int  # the row's last applied seq afterwards
    row_status: str  # the row's job_status afterwards (DB spelling: running/succeeded/…)
    terminal: bool  # the row is terminal afterwards: stop following it
    notified: int = 0  # pg_notify calls made (host + job level)


class IRelayStore(Interface):
    """PostgreSQL behind the relay; every write is one transaction with its notifications."""

    def running_host_jobs() -> Deferred[Any]:
        """Fire with the list of ``HostJob`` rows that are ``running`` with an ``agent_job_id``."""

    def apply_events(host_job: HostJob, events: Sequence[Any], transport: str) -> Deferred[Any]:
        """Apply agent ``JobEvent``s of this row in order, in ONE transaction; fire ``ApplyResult``.

        Events whose ``job_id`` is not ``host_job.agent_job_id`` are refused (never touch the
        row); events with a seq at or below the row's last applied seq are skipped; a terminal
        row never changes.  A row changed by a transaction gets one host-level
        ``pg_notify('job_update')`` in it (the transaction may apply other rows' calls too) and,
        when the last host of the job ends, exactly one job-level notification.
        """

    def fail_host_job(host_job: HostJob, reason: str, transport: str) -> Deferred[Any]:
        """End the row ``failed`` with ``reason`` (agent unreachable, job unknown).

        Fires with an ``ApplyResult``.
        """
