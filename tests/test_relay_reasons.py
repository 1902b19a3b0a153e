"""lpa.relay.reasons: why a request or a WebSocket to an agent failed, never a Failure repr.

(The WebSocket sentences of each cause are also pinned in ``test_relay_ws_client``.)
"""

from __future__ import annotations

from OpenSSL import SSL
from twisted.internet import error as neterror
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import ResponseFailed, ResponseNeverReceived

from lpa.relay.reasons import describe_error, describe_transport_failure


class DescribeErrorTests(SynchronousTestCase):
    def test_plain_causes(self) -> None:
        """Connect errors name their cause in a few words."""
        cases = [
            (neterror.ConnectionRefusedError("x"), "connection refused"),
            (neterror.DNSLookupError("agent.example"), "host name not found"),
            (neterror.TCPTimedOutError(), "the TCP connection timed out"),
            (neterror.TimeoutError(), "timed out"),
            (neterror.ConnectionLost(), "the connection was lost"),
        ]
        self.assertEqual([describe_error(e) for e, _ in cases], [words for _, words in cases])

    def test_wrappers_are_unwrapped(self) -> None:
        """The web client's lists of Failures are unwrapped to the first cause."""
        lost = ResponseNeverReceived([Failure(neterror.ConnectionDone())])
        failed = ResponseFailed([Failure(neterror.ConnectionRefusedError())])
        self.assertEqual(describe_error(lost), "the connection was lost before an answer")
        self.assertEqual(describe_error(Failure(failed)), "connection refused")

    def test_tls_failure(self) -> None:
        """An OpenSSL error reads as a TLS handshake failure with OpenSSL's reason strings."""
        tls = SSL.Error([("SSL routines", "", "certificate verify failed")])
        wrapped = ResponseNeverReceived([Failure(tls)])
        self.assertEqual(
            describe_error(wrapped), "TLS handshake failed (certificate verify failed)"
        )

    def test_unknown_error_has_no_failure_repr(self) -> None:
        """Anything else is its class and first line; a Failure repr is never passed through."""
        self.assertEqual(describe_error(ValueError("bad\nmore")), "ValueError: bad")
        odd = RuntimeError(f"[{Failure(KeyError('k'))!r}]")
        self.assertEqual(describe_error(odd), "RuntimeError")


class TransportFailureTests(SynchronousTestCase):
    def test_connect_timeout_is_named_our_stop_is_not(self) -> None:
        """A connect timeout (a UserError in Twisted) is named; our own stop adds nothing."""
        self.assertEqual(describe_transport_failure(Failure(neterror.TimeoutError())),
                         "TCP connect timed out")
        self.assertIsNone(describe_transport_failure(Failure(neterror.UserError())))
        self.assertIsNone(describe_transport_failure(None))

    def test_one_tls_reading_two_lines(self) -> None:
        """The same OpenSSL reasons lead both lines; the WebSocket sentence adds the hint."""
        tls = SSL.Error([("SSL routines", "", "tlsv1 alert unknown ca")])
        self.assertEqual(describe_error(tls), "TLS handshake failed (tlsv1 alert unknown ca)")
        self.assertEqual(
            describe_transport_failure(Failure(tls)),
            "TLS handshake failed: tlsv1 alert unknown ca (the agent does not trust the CA of "
            "the relay's client certificate)",
        )

    def test_other_causes_are_one_line(self) -> None:
        """Anything else is its class and first line."""
        self.assertEqual(describe_transport_failure(Failure(OSError("no\nmore"))),
                         "OSError: no")
