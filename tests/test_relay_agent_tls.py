"""The relay's shared client TLS context, over real loopback: names, IPs, CAs, rotation."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, cast

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorSSL
from twisted.internet.protocol import ClientFactory, Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from lpa.errors import ConfigError
from lpa.relay.agent_tls import AgentTls
from lpa.tls import negotiated_protocol, server_tls_options
from tests.certs import make_test_pki
from tests.loopback import listen_ssl, port_number


class Probe(Protocol):
    """Reports how its TLS connection ended up: negotiated protocol, or the failure."""

    def __init__(self, done: Deferred[bytes | None]) -> None:
        self.done = done

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"ping")

    def dataReceived(self, data: bytes) -> None:
        if not self.done.called:
            self.done.callback(negotiated_protocol(self.transport))
        assert self.transport is not None
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.done.called:
            self.done.errback(reason)


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


class LoopbackTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="lpa-agent-tls-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.pki = make_test_pki(os.path.join(self.tmp, "pki"))
        self.tls = AgentTls(
            ca_cert_path=self.pki.ca_cert,
            cert_path=self.pki.good.cert,
            key_path=self.pki.good.key,
        )

    def serve(self, cert: str | None = None, key: str | None = None) -> int:
        options = server_tls_options(
            ca_cert_path=self.pki.ca_cert,
            cert_path=cert or self.pki.server_cert,
            key_path=key or self.pki.server_key,
            crl_path=None,
        )
        port = listen_ssl(Factory.forProtocol(Echo), options)
        self.addCleanup(port.stopListening)
        return port_number(port)

    async def dial(self, port: int, host: str) -> bytes | None:
        done: Deferred[bytes | None] = Deferred()
        # forProtocol is typed as returning a Factory whatever class it is called on
        factory = cast(ClientFactory, ClientFactory.forProtocol(lambda: Probe(done)))
        # connectSSL takes any IOpenSSLClientConnectionCreator; Twisted types it with one class
        creator: Any = self.tls.for_host(host)
        connector = IReactorSSL(reactor).connectSSL(
            "127.0.0.1", port, factory, creator, timeout=30, bindAddress=None
        )
        self.addCleanup(connector.disconnect)
        return await done

    async def test_agent_with_the_dialled_name(self) -> None:
        """The agent's certificate names localhost and 127.0.0.1: both dial, over http/1.1."""
        port = self.serve()
        self.assertEqual(await self.dial(port, "localhost"), b"http/1.1")
        self.assertEqual(await self.dial(port, "127.0.0.1"), b"http/1.1")

    async def test_other_name_or_address_is_refused(self) -> None:
        """A name or address the certificate does not carry fails with the VerificationError."""
        port = self.serve()
        for host in ("wrong.example", "10.9.9.9"):
            with self.assertRaises(VerificationError):
                await self.dial(port, host)

    async def test_agent_from_another_ca_is_refused(self) -> None:
        """An agent certificate that does not chain to ca_cert_path fails the handshake."""
        port = self.serve(self.pki.other_ca.cert, self.pki.other_ca.key)
        with self.assertRaises(SSL.Error) as caught:
            await self.dial(port, "localhost")
        self.assertIn("certificate verify failed", str(caught.exception))

    async def test_certificate_without_names_is_refused(self) -> None:
        """A certificate of our CA that names no host (a client certificate) is refused."""
        port = self.serve(self.pki.good.cert, self.pki.good.key)
        with self.assertRaises(SSL.Error):
            await self.dial(port, "localhost")
        self.assertEqual(self.flushLoggedErrors(), [])


class ContextTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="lpa-agent-tls-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.pki = make_test_pki(os.path.join(self.tmp, "pki"))

    def tls(self, **paths: str) -> AgentTls:
        settings = {
            "ca_cert_path": self.pki.ca_cert,
            "cert_path": self.pki.good.cert,
            "key_path": self.pki.good.key,
        }
        settings.update(paths)
        return AgentTls(**settings)

    def test_one_context_for_every_agent(self) -> None:
        """Creators for different agents share one context."""
        tls = self.tls()
        one, two = tls.for_host("agent1.example"), tls.for_host("192.0.2.7")
        self.assertIs(one._options, two._options)
        self.assertIs(one._options.getContext(), two._options.getContext())

    def test_changed_files_make_a_new_context(self) -> None:
        """A rotated client certificate (file changed) is used by the next connection."""
        tls = self.tls()
        before = tls.for_host("agent1.example")._options
        shutil.copy(self.pki.revoked.cert, self.pki.good.cert)
        shutil.copy(self.pki.revoked.key, self.pki.good.key)
        after = tls.for_host("agent1.example")._options
        self.assertIsNot(before, after)
        self.assertIs(tls.for_host("agent2.example")._options, after)

    def test_missing_file_is_one_line_naming_it(self) -> None:
        """A missing file is a ConfigError naming the path."""
        error = self.assertRaises(
            ConfigError, self.tls(ca_cert_path="/nonexistent/ca.pem").for_host, "agent1"
        )
        self.assertIn("/nonexistent/ca.pem", str(error))
