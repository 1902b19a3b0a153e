"""An operator's REST client for one lpa-agent (or an original linux-patch-api), on treq.

:class:`AgentClient` sends one request per call over an injected treq ``HTTPClient`` (production:
:func:`make_http_client`, mutual TLS through :func:`lpa.tls.client_tls_options`, ALPN
``http/1.1``; tests: ``treq.testing.StubTreq``) and reads the answer with
:func:`lpa.protocol.parse_answer`.  Every failure is a :class:`ClientError` whose ``str()`` is
one line: the agent's error code and message, or what kept us from reaching it.

Certificates come from ``--cert/--key/--ca`` or the environment (``LPA_CERT``, ``LPA_KEY``,
``LPA_CA``); see :class:`Credentials`.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

import attr
from OpenSSL import SSL
from service_identity import VerificationError
from treq.client import HTTPClient
from twisted.internet import defer, ssl
from twisted.internet import error as neterror
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IReactorTime
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from lpa import protocol, tls
from lpa.errors import LpaError
from lpa.protocol import Answer

DEFAULT_PORT = 12443
DEFAULT_TIMEOUT = 30.0
ENV_CERT, ENV_KEY, ENV_CA = "LPA_CERT", "LPA_KEY", "LPA_CA"
#: answers larger than this are refused (an agent's largest answer is a bounded event window)
MAX_BODY_BYTES = 64 * 1024 * 1024


class ClientError(LpaError):
    """The agent answered with an error, or could not be reached; ``str()`` is one line."""

    def __init__(
        self, message: str, *, status: int | None = None, code: str | None = None,
        details: Any = None, retryable: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.details = details
        self.retryable = retryable


@attr.s(frozen=True, slots=True, auto_attribs=True)
class AgentUrl:
    """Where an agent listens; ``secure`` is False only for an explicit ``http://`` URL."""

    host: str
    port: int
    secure: bool = True

    @classmethod
    def parse(cls, text: str) -> AgentUrl:
        """``host``, ``host:port``, ``https://host[:port]`` or ``http://host[:port]``."""
        if "://" not in text:
            text = "https://" + text
        parsed = urllib.parse.urlsplit(text)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ClientError(f"not an agent URL: {text!r} (expected https://HOST[:PORT])")
        if parsed.path not in ("", "/"):
            raise ClientError(f"agent URL must not have a path: {text!r}")
        try:
            port = parsed.port or DEFAULT_PORT
        except ValueError:
            raise ClientError(f"bad port in agent URL {text!r}") from None
        return cls(parsed.hostname, port, parsed.scheme == "https")

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def http_url(self, path: str = "") -> str:
        return f"{'https' if self.secure else 'http'}://{self.netloc}{path}"

    def ws_url(self, path: str = protocol.WS_PATH) -> str:
        return f"{'wss' if self.secure else 'ws'}://{self.netloc}{path}"


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Credentials:
    """Client certificate, key and CA bundle file paths (any may be None)."""

    cert: str | None = None
    key: str | None = None
    ca: str | None = None

    @classmethod
    def resolve(
        cls, cert: str | None, key: str | None, ca: str | None,
        environ: Mapping[str, str] | None = None,
    ) -> Credentials:
        """Options first, then ``LPA_CERT``/``LPA_KEY``/``LPA_CA``."""
        env = os.environ if environ is None else environ
        return cls(cert or env.get(ENV_CERT) or None, key or env.get(ENV_KEY) or None,
                   ca or env.get(ENV_CA) or None)

    def check(self) -> None:
        """Refuse before any connection: no certificate, a missing file, a cert without key."""
        if self.cert is None and self.key is None:
            raise ClientError(f"no client certificate: agents require one; pass --cert and --key "
                              f"or set {ENV_CERT} and {ENV_KEY} (and --ca or {ENV_CA})")
        if (self.cert is None) != (self.key is None):
            raise ClientError("give both a client certificate and its key (--cert and --key)")
        for label, path in (("certificate", self.cert), ("key", self.key), ("CA", self.ca)):
            if path is not None and not os.path.isfile(path):
                raise ClientError(f"{label} file {path} does not exist")

    def tls_options(self, hostname: str) -> IOpenSSLClientConnectionCreator:
        """Verify the agent as ``hostname`` against ``ca`` (the system's roots without one),
        present our certificate, offer ALPN ``http/1.1`` only.

        :raises ClientError: see :meth:`check`; :raises ConfigError: a file does not parse.
        """
        self.check()
        assert self.cert is not None and self.key is not None
        if self.ca is not None:
            return tls.client_tls_options(
                hostname, ca_cert_path=self.ca, cert_path=self.cert, key_path=self.key)
        cert, key = tls.load_key_pair(self.cert, self.key)
        return ssl.optionsForClientTLS(
            hostname, trustRoot=ssl.platformTrust(), acceptableProtocols=[tls.HTTP11],
            extraCertificateOptions={"privateKey": key, "certificate": cert})


@implementer(IPolicyForHTTPS)
class AgentTLSPolicy:
    """treq's TLS policy: our credentials, checked against the name of each agent dialled."""

    def __init__(self, credentials: Credentials) -> None:
        self._credentials = credentials
        self._cache: dict[str, IOpenSSLClientConnectionCreator] = {}

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        name = hostname.decode("ascii")
        if name not in self._cache:
            self._cache[name] = self._credentials.tls_options(name)
        return self._cache[name]


def make_http_client(
    reactor: Any, credentials: Credentials, timeout: float = DEFAULT_TIMEOUT, *,
    secure: bool = True,
) -> tuple[HTTPClient, HTTPConnectionPool]:
    """A treq client over mutual TLS; close the pool with ``closeCachedConnections()``.

    ``secure=False`` is for an agent with ``tls.enabled: false`` (``http://`` URLs only).
    """
    if secure:
        credentials.check()
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 4
    agent = Agent(reactor, contextFactory=AgentTLSPolicy(credentials), pool=pool,
                  connectTimeout=timeout)
    return HTTPClient(agent), pool


def _reason(failure_value: BaseException) -> str:
    """The innermost readable cause of a request failure (treq wraps them in lists)."""
    reasons = getattr(failure_value, "reasons", None)
    if reasons:
        return _reason(reasons[0].value)
    text = str(failure_value).strip()
    if isinstance(failure_value, (SSL.Error, VerificationError)):
        return f"TLS: {text or failure_value.__class__.__name__}"
    return text or failure_value.__class__.__name__


def describe_transport_error(netloc: str, problem: BaseException) -> str:
    """One line for a request that got no answer."""
    if isinstance(problem, neterror.ConnectionRefusedError):
        return f"cannot reach the agent at {netloc}: connection refused"
    if isinstance(problem, neterror.DNSLookupError):
        return f"cannot reach the agent at {netloc}: the name does not resolve"
    if isinstance(problem, (neterror.TimeoutError, defer.TimeoutError)):
        return f"cannot reach the agent at {netloc}: no answer in time"
    reason = _reason(problem)
    if reason.startswith("TLS") or "certificate" in reason or "VerificationError" in reason:
        return (f"TLS handshake with {netloc} failed: {reason} "
                "(check --cert/--key/--ca and the agent's name)")
    return f"cannot reach the agent at {netloc}: {reason}"


class AgentClient:
    """The agent's REST API, one coroutine per endpoint; returns the envelope's ``data``.

    :param http: a treq ``HTTPClient`` (or ``StubTreq``)
    :param clock: bounds each request (connect, answer and body) to ``timeout`` seconds
    """

    def __init__(
        self, http: Any, url: AgentUrl, *, clock: IReactorTime,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self._http = http
        self.url = url
        self._clock = clock
        self._timeout = timeout

    async def answer(self, method: str, path: str, body: Any = None) -> Answer:
        """Send one request; any answer is returned, only a missing one raises ClientError."""
        async def exchange() -> tuple[int, bytes]:
            kwargs: dict[str, Any] = {"headers": {b"Accept": [b"application/json"],
                                                  b"User-Agent": [b"lpa-client"]}}
            if body is not None:
                kwargs["data"] = json.dumps(body).encode("utf-8")
                kwargs["headers"][b"Content-Type"] = [b"application/json"]
            response = await self._http.request(method, self.url.http_url(path), **kwargs)
            return response.code, await response.content()

        try:
            status, raw = await defer.Deferred.fromCoroutine(exchange()).addTimeout(
                self._timeout, self._clock)
        except defer.CancelledError:
            raise
        except Exception as problem:
            raise ClientError(describe_transport_error(self.url.netloc, problem)) from None
        if len(raw) > MAX_BODY_BYTES:
            raise ClientError(f"{method} {path}: answer of {len(raw)} bytes is too large")
        return protocol.parse_answer(status, raw)

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        """Send one request; raise :class:`ClientError` unless it is a success envelope."""
        answer = await self.answer(method, path, body)
        if answer.ok:
            return answer.data
        raise error_of(answer, f"{method} {path}")

    async def health(self) -> Any:
        return await self.request("GET", "/api/v1/health")

    async def info(self) -> Any:
        return await self.request("GET", "/api/v1/system/info")

    async def packages(
        self, *, name: str | None = None, status: str | None = None,
        upgradable: bool | None = None,
    ) -> Any:
        query = _query(name=name, status=status,
                       upgradable=None if upgradable is None else str(upgradable).lower())
        return await self.request("GET", "/api/v1/packages" + query)

    async def patches(self, *, security: bool = False) -> Any:
        return await self.request("GET", "/api/v1/patches" + ("?security=true" if security else ""))

    async def apply(
        self, *, dry_run: bool = False, security_only: bool = False,
        packages: Sequence[str] | None = None,
    ) -> Any:
        body: dict[str, Any] = {"dry_run": dry_run, "security_only": security_only}
        if packages is not None:
            body["packages"] = list(packages)
        return await self.request("POST", "/api/v1/patches/apply", body)

    async def jobs(self, *, status: str | None = None, limit: int | None = None) -> Any:
        return await self.request("GET", "/api/v1/jobs" + _query(status=status, limit=limit))

    async def job(self, job_id: str) -> Any:
        return await self.request("GET", protocol.job_path(_quote(job_id)))

    async def cancel(self, job_id: str) -> Any:
        return await self.request("POST", protocol.job_path(_quote(job_id)) + "/cancel")

    async def events(self, job_id: str, after: int = 0) -> Any:
        return await self.request("GET", protocol.events_path(_quote(job_id), after))


def error_of(answer: Answer, what: str) -> ClientError:
    """The ClientError for an answer that is not a success."""
    if answer.error is not None:
        return ClientError(answer.describe(), status=answer.status, code=answer.error.code,
                           details=answer.error.details, retryable=answer.error.retryable)
    return ClientError(f"{answer.describe()} from {what}", status=answer.status)


def _quote(job_id: str) -> str:
    return urllib.parse.quote(job_id, safe="")


def _query(**members: Any) -> str:
    present = {key: value for key, value in members.items() if value is not None}
    return f"?{urllib.parse.urlencode(present)}" if present else ""
