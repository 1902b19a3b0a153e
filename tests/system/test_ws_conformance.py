"""RFC 6455 conformance of the agent's WebSocket: Autobahn|Testsuite cases 1–7 and 10 via kosoku.

The cases expect an echo server, so the testee is :mod:`tests.wsecho`: the agent's own
``JobStreamFactory`` (default options: 64 KiB frame/message limit, 5 s/10 s heartbeat, handshake
timeouts, 64 connections, no permessage-deflate) with an echoing protocol subclass, served by
``make_ws_resource`` on a twisted.web ``Site``.  kosoku always requests ``/``, so the resource is
mounted at ``/`` and at ``/api/v1/ws/jobs``.  The fuzzing clients offer no subprotocol, so the
echo accepts a handshake without ``lpa.jobs.v1`` (the agent's own protocol refuses it;
``tests.test_ws`` pins that).

kosoku 0.1.0 has no TLS options (``kosoku --help``: address, -i/-x/-p/-s/-o only), so this runs
over plain ``ws://`` on loopback; TLS does not change framing, and the wss path is covered by the
``websockets`` interop tests in ``tests.test_ws_tls``.

Reference run (manual, optional; not in CI): ``wstest`` from ``autobahntestsuite`` needs Python
2.7.  With a Python 2.7 interpreter (e.g. pyenv's 2.7.18):
``pip install --target D virtualenv==16.7.12``; ``PYTHONPATH=D python2.7 -m virtualenv venv27``;
``venv27/bin/pip install -r autobahntestsuite.egg-info/requires.txt`` from the sdist;
``venv27/bin/pip install --no-deps autobahntestsuite-25.10.1.tar.gz``; start the echo site with
``python -m tests.system.test_ws_conformance 9377`` (from the checkout) and run
``wstest -m fuzzingclient -s spec.json`` with ``{"outdir": "reports", "servers": [{"agent":
"lpa", "url": "ws://127.0.0.1:9377/api/v1/ws/jobs"}], "cases": ["1.*", "2.*", "3.*", "4.*", "5.*",
"6.*", "7.*", "10.*"], "exclude-cases": [], "exclude-agent-cases": {}}``.

Results on 2026-11-25 (autobahn 26.10.2 with NVX, loopback, 2 cores):

* kosoku 0.1.0 at ``/``: 247 cases, 244 OK, 3 INFORMATIONAL, 0 NON-STRICT, 0 FAILED, ~7 s.
* wstest 25.10.1 (Python 2.7.18) at ``/api/v1/ws/jobs``: 247 cases, 244 OK, 3 INFORMATIONAL
  (7.1.6, 7.13.1, 7.13.2), 0 FAILED, ~16 s; close behaviour likewise.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.server import Site

from lpa.agent.eventlog import EventLog
from tests.fakes_jobs import FakeJobManager
from tests.loopback import listen_tcp, port_number
from tests.wsecho import echo_site_root, make_echo_factory

ACCEPTED = {"OK", "NON-STRICT", "INFORMATIONAL"}


def find_kosoku() -> str | None:
    """kosoku next to this interpreter (the venv's bin), else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "kosoku")
    if os.access(beside, os.X_OK):
        return beside
    return shutil.which("kosoku")


def serve_echo(port: int = 0) -> Any:
    """Listen with the echo site on loopback; return the listening port."""
    events = EventLog(reactor)
    factory = make_echo_factory(events, FakeJobManager(reactor, events=events), clock=reactor)
    return listen_tcp(Site(echo_site_root(factory)), port)


class KosokuConformanceTests(TestCase):
    timeout = 180

    async def test_cases_1_to_7_and_10(self) -> None:
        """Every case of 1–7 and 10 is OK, NON-STRICT or INFORMATIONAL, behaviour and close."""
        kosoku = find_kosoku()
        if kosoku is None:
            raise SkipTest("kosoku is not installed (pip install kosoku) so cases are not run")
        port = serve_echo()
        self.addCleanup(port.stopListening)
        outdir = self.mktemp()
        address = f"127.0.0.1:{port_number(port)}"
        out, err, code = await getProcessOutputAndValue(
            kosoku,
            ["-m", "fuzzingclient", "-x", "9.*", "-x", "12.*", "-x", "13.*", "-o", outdir, address],
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        )
        self.assertEqual(code, 0, (out[-2000:], err[-2000:]))
        with open(os.path.join(outdir, "index.json")) as f:
            report = json.load(f)[address]
        outcomes = collections.Counter(case["behavior"] for case in report.values())
        bad = {
            case_id: (case["behavior"], case["behaviorClose"])
            for case_id, case in report.items()
            if case["behavior"] not in ACCEPTED or case["behaviorClose"] not in ACCEPTED
        }
        self.assertEqual(bad, {})
        self.assertGreaterEqual(len(report), 247, outcomes)
        self.assertTrue(any(case_id.startswith("10.") for case_id in report))
        print(f"\nkosoku cases 1-7, 10: {len(report)} cases, {dict(outcomes)}", file=sys.stderr)
        # let the server side of the last connections finish closing
        await _settle()


async def _settle() -> None:
    from twisted.internet.task import deferLater

    for _ in range(3):
        await deferLater(reactor, 0.05, lambda: None)


if __name__ == "__main__":
    serve_echo(int(sys.argv[1]) if len(sys.argv) > 1 else 9377)
    reactor.run()
