"""The ``lpa`` command as a process: Ctrl-C, a closed pipe, an unreachable agent, its exit codes."""

from __future__ import annotations

import io
import os
import shutil
import sys
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.trial.unittest import TestCase

from lpa.agent.model import Patch
from lpa.tools import agentcli
from tests.agentclient import start_agent
from tests.certs import make_test_pki
from tests.fakes import FakeBackend
from tests.loopback import listen_tcp, port_number, stop
from tests.system import CHECKOUT
from tests.test_cli import agentcli_parser


def _child_env(pki: Any) -> dict[str, str]:
    root = CHECKOUT
    env = {k: v for k, v in os.environ.items() if not k.startswith("LPA_")}
    env.update(PYTHONPATH=root, LPA_CERT=pki.good.cert, LPA_KEY=pki.good.key,
               LPA_CA=pki.ca_cert)
    return env


class _Collect(ProcessProtocol):
    """Collects a child's output; ``on_first_out`` runs once when stdout first has data."""

    def __init__(self, on_first_out: Any = None) -> None:
        self.out, self.err = b"", b""
        self.ended: Deferred[Any] = Deferred()
        self._first = on_first_out

    def outReceived(self, data: bytes) -> None:
        self.out += data
        if self._first is not None:
            first, self._first = self._first, None
            first(self.transport)

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(reason.value)


class ProcessTests(TestCase):
    """The `lpa` command in its own process against a real agent: pipes, Ctrl-C, errors."""

    timeout = 90

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="lpa-cli-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.pki = make_test_pki(os.path.join(self.tmp, "pki"))

    async def spawn(self, argv: list[str], on_first_out: Any = None) -> tuple[Any, str, str]:
        collect = _Collect(on_first_out)
        reactor.spawnProcess(collect, argv[0], argv, env=_child_env(self.pki), path=self.tmp)
        ended = await collect.ended
        return ended, collect.out.decode(errors="replace"), collect.err.decode(errors="replace")

    async def test_closed_pipe(self) -> None:
        """`lpa agent … patches | head -n 1` ends without a traceback, like other tools."""
        patches = [Patch(name=f"package-{n:05d}", current_version="1.0-" + "x" * 40,
                         available_version="2.0-" + "y" * 40) for n in range(3000)]
        _, port = await start_agent(self, self.pki, self.tmp, backend=FakeBackend(patches=patches))
        script = ('"$0" -m lpa agent "localhost:$1" patches 2>"$2" | head -n 1; '
                  'echo "status ${PIPESTATUS[0]}"')
        err_file = os.path.join(self.tmp, "stderr")
        _, out, _ = await self.spawn(["/bin/bash", "-c", script, sys.executable, str(port),
                                      err_file])
        self.assertEqual(out.splitlines()[0].split()[:3], ["PACKAGE", "CURRENT", "AVAILABLE"])
        self.assertEqual(out.splitlines()[-1], "status 141")
        with open(err_file) as handle:
            self.assertEqual(handle.read(), "")

    async def test_ctrl_c(self) -> None:
        """Ctrl-C during watch: one line, exit 130, no traceback; the agent job goes on."""
        backend = FakeBackend()
        backend.script("patch_apply", progress=[(30, "Unpacking")], commands=[["sleep", "60"]])
        _, port = await start_agent(self, self.pki, self.tmp, backend=backend)
        ended, out, err = await self.spawn(
            [sys.executable, "-m", "lpa", "agent", f"localhost:{port}", "apply", "--watch"],
            on_first_out=lambda transport: transport.signalProcess("INT"))
        self.assertEqual((ended.exitCode, err), (130, "lpa: interrupted\n"), out)
        self.assertTrue(out.startswith("job "), out)
        # the job went on running on the agent: end it (and its `sleep`) before cleaning up
        job_id = out.split()[1]
        cancel = agentcli_parser().parse_args(
            ["agent", f"localhost:{port}", "cancel", job_id, "--watch", "--interval", "0.1"])
        code = await agentcli.execute(cancel, reactor=reactor, out=io.StringIO(),
                                      err=io.StringIO(), environ=_child_env(self.pki))
        self.assertEqual(code, 0)

    async def test_unreachable(self) -> None:
        """An agent that is not there: one error line naming it, exit 1."""
        closed = listen_tcp(Factory())
        port = port_number(closed)
        await stop(closed)
        ended, out, err = await self.spawn(
            [sys.executable, "-m", "lpa", "agent", f"localhost:{port}", "health"])
        self.assertEqual((ended.exitCode, out), (1, ""))
        self.assertEqual(err, f"lpa: error: cannot reach the agent at localhost:{port}: "
                              "connection refused\n")
