"""Following one job of a real agent process through its events endpoint, and checking what the
stand-in package manager's run became (tests that kill or restart the agent mid-job).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater

from tests import standin
from tests.agentproc import AgentProcess


class Follower:
    """Polls a job's events endpoint, keeping every event seen (by seq) and the answers."""

    def __init__(self, agent: AgentProcess, job_id: str) -> None:
        self.agent = agent
        self.job_id = job_id
        self.seen: dict[int, dict[str, Any]] = {}
        self.incarnation: str | None = None

    @property
    def last(self) -> int:
        return max(self.seen, default=0)

    @property
    def ended(self) -> bool:
        return any(e["event"] == "job_complete" for e in self.seen.values())

    def messages(self, kind: str | None = None) -> list[str]:
        return [e["message"] for _, e in sorted(self.seen.items())
                if kind is None or e["kind"] == kind]

    async def poll(self) -> None:
        code, body = await self.agent.request(
            "GET", f"/api/v1/jobs/{self.job_id}/events?after={self.last}"
        )
        if code != 200:
            raise AssertionError(f"events answered {code}: {body}")
        self.incarnation = body["data"]["incarnation"]
        for event in body["data"]["events"]:
            previous = self.seen.setdefault(event["seq"], event)
            if previous != event:
                raise AssertionError(f"seq {event['seq']} served twice, differently")

    async def follow_until(self, done: Callable[[Follower], bool], timeout: float) -> None:
        deadline = reactor.seconds() + timeout
        while not done(self):
            if reactor.seconds() > deadline:
                raise AssertionError(f"job {self.job_id}: gave up waiting (seen {self.last})")
            await self.poll()
            await deferLater(reactor, 0.02, lambda: None)

    async def follow_to_end(self, timeout: float = 60) -> None:
        """Poll (the agent may be restarting: connection errors are retried) until the job's
        ``job_complete`` was seen."""
        deadline = reactor.seconds() + timeout
        while not self.ended:
            if reactor.seconds() > deadline:
                raise AssertionError(f"job {self.job_id} did not end (seen {self.last})")
            try:
                await self.poll()
            except AssertionError:
                raise
            except Exception:
                pass
            await deferLater(reactor, 0.05, lambda: None)


def output_seen(pattern: str) -> Callable[[Follower], bool]:
    """Until an output event matching ``pattern`` has been seen (or the job ended)."""
    compiled = re.compile(pattern)
    return lambda f: f.ended or any(compiled.search(m) for m in f.messages("output"))


def line_numbers(messages: list[str], pattern: str) -> list[int]:
    """The numbers group 1 of ``pattern`` captures in ``messages``, in order."""
    compiled = re.compile(pattern)
    return [int(m.group(1)) for m in map(compiled.search, messages) if m]


def standin_lines(scenario: dict[str, Any]) -> tuple[int, int]:
    """How many lines the stand-in prints in its download and its dpkg phase."""
    interval = float(scenario.get("interval", standin.DEFAULT_SCENARIO["interval"]))
    return (
        max(1, int(float(scenario["download_seconds"]) / interval)),
        max(1, int(float(scenario["dpkg_seconds"]) / interval)),
    )


def check_every_line_once(case: Any, follower: Follower, scenario: dict[str, Any], why: str
                          ) -> None:
    """Every line the stand-in's mutating run printed is one output event, once, in order."""
    downloads, dpkg = standin_lines(scenario)
    output = follower.messages("output")
    case.assertEqual(
        line_numbers(output, r"^Get:(\d+) http://deb\.example stable/main"),
        list(range(1, downloads + 1)),
        why,
    )
    case.assertEqual(
        line_numbers(output, rf"\[line (\d+) of {dpkg}\]"), list(range(1, dpkg + 1)), why
    )


def check_numbering(case: Any, events: list[dict[str, Any]], why: str) -> None:
    """Seqs run 1..N without a gap; one job_complete, last."""
    case.assertEqual([e["seq"] for e in events], list(range(1, len(events) + 1)), why)
    case.assertEqual([e["event"] for e in events].count("job_complete"), 1, why)
    case.assertEqual(events[-1]["event"], "job_complete", why)


def mutating_runs(agent: AgentProcess) -> list[dict[str, Any]]:
    """The record's entries of the mutating ``apt-get`` runs (start, signal, exit …)."""
    entries = agent.record()
    pids = {e["pid"] for e in entries
            if e.get("event") == "start" and e["argv"] in standin.mutating_calls([e])
            and e["command"] == "apt-get"}
    return [e for e in entries if e["pid"] in pids]
