"""Every fake of the test suite keeps to its interface, and so does the production class.

A fake that drifts from the seam it stands in for makes tests pass against code that would fail
in production.  So:

* every class under ``tests/`` declared with ``@implementer(...)`` is listed in :data:`FAKES`
  with how to make one, and ``verifyObject`` checks the instance against each interface it
  declares (a module that declares a class :data:`FAKES` does not list fails the test: list it);
* every interface a fake stands in for, and every zope interface declared under ``lpa/``, has
  its production object in :data:`REAL`, checked the same way;
* an interface has one fake, except those in :data:`SECOND_FAKES`, each with the reason.
"""

from __future__ import annotations

import ast
import importlib
import os
from collections.abc import Callable
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import providedBy
from zope.interface.interface import InterfaceClass
from zope.interface.verify import verifyObject

from lpa.agent.backends.apt import AptBackend
from lpa.agent.context import JobContext
from lpa.agent.detached import DetachedCommands, DetachedRun
from lpa.agent.eventlog import EventLog
from lpa.agent.interfaces import (
    ICommandRun,
    IEventJournal,
    IJobCommands,
    IJobContext,
    IJobManager,
    IJobStore,
    IPackageBackend,
    IProcessRunner,
    IStreamChannel,
    ISystem,
)
from lpa.agent.jobs import JobManager
from lpa.agent.metrics import MeteredChannel
from lpa.agent.model import JobRequest, PackageSpec
from lpa.agent.piped import PipedCommands, PipedRun
from lpa.agent.process import ProcessRunner
from lpa.agent.store import JobFileStore
from lpa.agent.system import HostSystem
from lpa.agent.wal import VolatileJournal, WriteAheadLog
from lpa.agent.walfiles import IWalFiles, OsWalFiles
from lpa.agent.ws import JobStreamFactory
from lpa.relay.backoff import HandshakeGate
from lpa.relay.feed import IJobUpdateFeed, JobUpdateFeed
from lpa.relay.interfaces import AgentAddress, IRelayStore
from lpa.relay.jobs_http import AgentJobsHttp
from lpa.relay.machine import AgentLink
from lpa.relay.membership import IMembershipDatabase
from lpa.relay.membership_db import PostgresMembershipDatabase
from lpa.relay.metered import MeteredListener, MeteredStore
from lpa.relay.metrics import RelayMetrics
from lpa.relay.missing_record import (
    IMissingRecord,
    PostgresMissingRecord,
    PostgresUnreachableRecord,
)
from lpa.relay.poller import AgentPoller, IAgentPoller, IPollTarget
from lpa.relay.pressure import StoreGauge
from lpa.relay.store import PostgresRelayStore
from lpa.relay.ws_client import AgentWebSocket, IAgentWebSocket, IWebSocketListener
from lpa.tools.client import AgentTLSPolicy, Credentials
from tests.agentclient import FixedTLSPolicy
from tests.fakes import (
    FakeBackend,
    FakeJobCommands,
    FakeJobStore,
    FakeProcessRunner,
    FakeRun,
    FakeSystem,
)
from tests.fakes_backends import FakeJobContext, ScriptedRunner, make_job
from tests.fakes_jobs import FakeJobManager, RecordingChannel
from tests.fakes_membership import FakeMembershipDatabase
from tests.fakes_relay import FakeMissingRecord, FakeRelayStore
from tests.fakes_wal import FakeWalFiles
from tests.test_relay_machine import FakePoller, FakeWebSocket
from tests.test_relay_metrics import FakeListener
from tests.test_relay_ops import FakeFeed
from tests.test_relay_poller import RecordingTarget
from tests.test_relay_ws_client import Listener

TESTS = os.path.dirname(os.path.abspath(__file__))
LPA = os.path.join(os.path.dirname(TESTS), "lpa")
ADDRESS = AgentAddress("agent.example", 12443)
DSN = "postgresql://lpa@db.example/lpa"


# -- the fakes ---------------------------------------------------------------------------------

#: ``module:Class`` of every ``@implementer`` class under tests/ -> a factory of one
FAKES: dict[str, Callable[[], Any]] = {
    "tests.agentclient:FixedTLSPolicy": lambda: FixedTLSPolicy(object()),
    "tests.fakes:FakeProcessRunner": FakeProcessRunner,
    "tests.fakes:FakeRun": lambda: FakeRun(1, ["true"], 0.0),
    "tests.fakes:FakeJobCommands": FakeJobCommands,
    "tests.fakes:FakeBackend": FakeBackend,
    "tests.fakes:FakeSystem": FakeSystem,
    "tests.fakes:FakeJobStore": FakeJobStore,
    "tests.fakes_jobs:FakeJobManager": lambda: FakeJobManager(Clock()),
    "tests.fakes_jobs:RecordingChannel": RecordingChannel,
    "tests.fakes_backends:ScriptedRunner": ScriptedRunner,
    "tests.fakes_backends:FakeJobContext": lambda: FakeJobContext(
        ScriptedRunner(), make_job("install", "vim")
    ),
    "tests.fakes_membership:FakeMembershipDatabase": FakeMembershipDatabase,
    "tests.fakes_relay:FakeRelayStore": FakeRelayStore,
    "tests.fakes_relay:FakeMissingRecord": FakeMissingRecord,
    "tests.fakes_wal:FakeWalFiles": FakeWalFiles,
    "tests.test_relay_machine:FakeWebSocket": lambda: FakeWebSocket(ADDRESS, agent_link()),
    "tests.test_relay_machine:FakePoller": lambda: FakePoller(ADDRESS, agent_link()),
    "tests.test_relay_metrics:FakeListener": FakeListener,
    "tests.test_relay_poller:RecordingTarget": RecordingTarget,
    "tests.test_relay_ws_client:Listener": Listener,
    "tests.test_relay_ops:FakeFeed": FakeFeed,
}

#: interfaces with two fakes for now, and why
SECOND_FAKES: dict[InterfaceClass, str] = {
    IProcessRunner: "FakeProcessRunner (engine tests) and ScriptedRunner (backend tests) are "
    "to become one, now that the process runner's rewrite has landed",
    IWebSocketListener: "the relay metrics tests' FakeListener and the WebSocket client tests' "
    "Listener are the same recorder, to become one in tests/fakes_relay.py",
}


# -- the production objects ----------------------------------------------------------------------


def agent_link() -> AgentLink:
    """A relay link over a fake store that never dials nor polls."""
    return AgentLink(
        ADDRESS, store=FakeRelayStore(), clock=Clock(),
        dial=lambda address, listener: None, make_poller=lambda address, target: None,
    )


def job_manager() -> JobManager:
    return JobManager(
        backend=FakeBackend(), system=FakeSystem(), runner=FakeProcessRunner(),
        store=FakeJobStore(), clock=Clock(),
    )


def job_context() -> JobContext:
    manager = job_manager()
    job = manager.submit(JobRequest(operation="install", packages=(PackageSpec("vim"),)))
    return JobContext(job, runner=FakeProcessRunner(), sink=manager)


def stream_protocol() -> Any:
    clock = Clock()
    factory = JobStreamFactory(EventLog(clock), FakeJobManager(clock), clock=clock)
    return factory.buildProtocol(None)


def agent_web_socket() -> AgentWebSocket:
    clock = Clock()
    return AgentWebSocket(
        ADDRESS, agent_link(), reactor=clock, clock=clock, tls_options=object(),
        gate=HandshakeGate(1), handshake_timeout=5.0, initial_delay=1.0, max_delay=30.0,
    )


def detached_commands(test: SynchronousTestCase) -> DetachedCommands:
    return DetachedCommands(Clock(), test.mktemp(), systemd=False)


def agent_poller() -> AgentPoller:
    clock = Clock()
    http = AgentJobsHttp(object(), ADDRESS, clock=clock, timeout=5.0)
    return AgentPoller(
        http, agent_link(), clock=clock, interval=1.0, max_interval=30.0, deadline=60.0
    )


#: interface -> factories of its production objects (given the test, for temporary paths)
REAL: dict[InterfaceClass, list[Callable[[SynchronousTestCase], Any]]] = {
    IProcessRunner: [lambda t: ProcessRunner(Clock())],
    ICommandRun: [
        lambda t: PipedRun(FakeProcessRunner(), 1, ["true"]),
        lambda t: DetachedRun(detached_commands(t), "job", 1, t.mktemp()),
    ],
    IJobCommands: [lambda t: PipedCommands(FakeProcessRunner()), detached_commands],
    IPackageBackend: [lambda t: AptBackend(FakeProcessRunner())],
    ISystem: [lambda t: HostSystem(FakeProcessRunner())],
    IJobStore: [lambda t: JobFileStore(t.mktemp())],
    IJobManager: [lambda t: job_manager()],
    IJobContext: [lambda t: job_context()],
    IStreamChannel: [
        lambda t: stream_protocol(),
        lambda t: MeteredChannel(RecordingChannel(), lambda code: None),
    ],
    IEventJournal: [
        lambda t: WriteAheadLog(t.mktemp(), clock=Clock(), files=FakeWalFiles()),
        lambda t: VolatileJournal(),
    ],
    IWalFiles: [lambda t: OsWalFiles()],
    IRelayStore: [
        lambda t: PostgresRelayStore(
            DSN, clock=Clock(), reactor=Clock(), connection_factory=lambda: None
        ),
        lambda t: MeteredStore(FakeRelayStore(), RelayMetrics(), clock=Clock()),
        lambda t: StoreGauge(
            FakeRelayStore(), high=10, low=5, pause=lambda: None, resume=lambda: None
        ),
    ],
    IMembershipDatabase: [
        lambda t: PostgresMembershipDatabase(
            DSN, relay_id="relay-1", lease_ttl=10.0, clock=Clock(), reactor=Clock(),
            connection_factory=lambda: None,
        )
    ],
    IMissingRecord: [
        lambda t: PostgresMissingRecord(DSN, reactor=Clock()),
        lambda t: PostgresUnreachableRecord(DSN, reactor=Clock()),
    ],
    IAgentWebSocket: [lambda t: agent_web_socket()],
    IWebSocketListener: [
        lambda t: agent_link(),
        lambda t: MeteredListener(agent_link(), RelayMetrics()),
    ],
    IPollTarget: [lambda t: agent_link()],
    IAgentPoller: [lambda t: agent_poller()],
    IJobUpdateFeed: [
        lambda t: JobUpdateFeed(DSN, clock=Clock(), connection_factory=lambda: None)
    ],
    IPolicyForHTTPS: [lambda t: AgentTLSPolicy(Credentials())],
}


# -- finding declarations in the source ------------------------------------------------------


def _decorated_with_implementer(node: ast.ClassDef) -> bool:
    for decorator in node.decorator_list:
        call = decorator.func if isinstance(decorator, ast.Call) else decorator
        name = call.attr if isinstance(call, ast.Attribute) else getattr(call, "id", None)
        if name == "implementer":
            return True
    return False


def implementer_classes(directory: str, package: str) -> tuple[list[str], list[str]]:
    """``module:Class`` of the ``@implementer`` classes in ``directory``'s modules, and those
    declared inside a function (which no test can make on its own)."""
    found: list[str] = []
    nested: list[str] = []
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".py"):
            continue
        module = f"{package}.{name[:-3]}"
        with open(os.path.join(directory, name), encoding="utf-8") as source:
            tree = ast.parse(source.read(), name)
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and _decorated_with_implementer(node):
                (found if id(node) in top else nested).append(f"{module}:{node.name}")
    return found, nested


def declared_interfaces(directory: str) -> list[str]:
    """Names of the classes deriving from ``Interface`` in the modules under ``directory``."""
    names = []
    for root, _, files in os.walk(directory):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            with open(os.path.join(root, name), encoding="utf-8") as source:
                tree = ast.parse(source.read(), name)
            names += [
                node.name
                for node in ast.walk(tree)
                if isinstance(node, ast.ClassDef)
                and any(getattr(base, "id", None) == "Interface" for base in node.bases)
            ]
    return sorted(names)


def _declared_by(obj: Any) -> list[InterfaceClass]:
    return list(providedBy(obj))


class FakesTests(SynchronousTestCase):
    def test_every_implementer_class_is_listed(self) -> None:
        """Each class declared with @implementer under tests/ is listed in FAKES, at the top of
        its module, and each listed one still exists."""
        found, nested = implementer_classes(TESTS, "tests")
        self.assertEqual(nested, [], "declare fakes at the top of a module so they can be made")
        self.assertEqual(sorted(found), sorted(FAKES))

    def test_fakes_keep_to_their_interfaces(self) -> None:
        """verifyObject passes on an instance of every fake, for each interface it declares."""
        for name, make in sorted(FAKES.items()):
            module, _, cls = name.partition(":")
            fake = make()
            self.assertIs(type(fake), getattr(importlib.import_module(module), cls), name)
            interfaces = _declared_by(fake)
            self.assertTrue(interfaces, name)
            for interface in interfaces:
                self.assertTrue(verifyObject(interface, fake), f"{name} {interface.__name__}")

    def test_one_fake_per_interface(self) -> None:
        """No interface has two fakes, but for those SECOND_FAKES names with the reason."""
        fakes: dict[InterfaceClass, list[str]] = {}
        for name, make in FAKES.items():
            for interface in _declared_by(make()):
                fakes.setdefault(interface, []).append(name)
        doubled = {i: names for i, names in fakes.items() if len(names) > 1}
        self.assertEqual(sorted(i.__name__ for i in doubled),
                         sorted(i.__name__ for i in SECOND_FAKES), doubled)


class RealClassesTests(SynchronousTestCase):
    def test_every_faked_and_declared_interface_has_its_production_object(self) -> None:
        """Each interface a fake stands in for, and each declared under lpa/, is in REAL."""
        faked = {i.__name__ for make in FAKES.values() for i in _declared_by(make())}
        listed = {i.__name__ for i in REAL}
        self.assertEqual(sorted((faked | set(declared_interfaces(LPA))) - listed), [])

    def test_production_objects_keep_to_their_interfaces(self) -> None:
        """verifyObject passes on the production object of every interface in REAL."""
        for interface, makers in REAL.items():
            for make in makers:
                real = make(self)
                label = f"{type(real).__name__} {interface.__name__}"
                self.assertTrue(interface.providedBy(real), label)
                self.assertTrue(verifyObject(interface, real), label)
