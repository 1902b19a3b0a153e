"""Headless Chromium for tests, driven over its DevTools protocol with Autobahn on the reactor.

Debian's ``chromium`` runs with a new profile in a temporary directory and every background
connection off (this machine's network refuses them)::

    browser = await Chromium.launch(self)        # SkipTest with the reason if not installed
    page = await browser.page()
    await page.navigate("http://127.0.0.1:12480/")
    await page.evaluate("document.title")
    await page.screenshot("status.png")

The process (its whole process group) is ended at the test's cleanup.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import treq
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, TestCase

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--window-size=1280,900",
    "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
]
CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str:
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    raise SkipTest("headless Chromium not found (Debian: apt-get install chromium; "
                   ".ci/run installs it)")


class _DevTools(WebSocketClientProtocol):
    """One DevTools connection: commands by id, their answers as Deferreds, events listed."""

    factory: _DevToolsFactory

    def onConnect(self, response: Any) -> None:
        self.factory.connected.callback(self)

    def onOpen(self) -> None:
        self.ids = itertools.count(1)
        self.waiting: dict[int, Deferred[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self.factory.opened.callback(self)

    def send_command(
        self, method: str, params: dict[str, Any] | None = None
    ) -> Deferred[dict[str, Any]]:
        number = next(self.ids)
        answer: Deferred[dict[str, Any]] = Deferred()
        self.waiting[number] = answer
        message = {"id": number, "method": method, "params": params or {}}
        self.sendMessage(json.dumps(message).encode("utf-8"))
        return answer

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        message = json.loads(payload)
        waiting = self.waiting.pop(message.get("id", -1), None)
        if waiting is None:
            self.events.append(message)
        elif "error" in message:
            waiting.errback(RuntimeError(f"DevTools: {message['error']}"))
        else:
            waiting.callback(message.get("result", {}))

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        for waiting in self.waiting.values():
            waiting.errback(RuntimeError(f"DevTools connection closed: {reason}"))
        self.waiting = {}
        if not self.factory.opened.called:
            self.factory.opened.errback(RuntimeError(f"DevTools handshake failed: {reason}"))
        self.factory.closed.callback(None)


class _DevToolsFactory(WebSocketClientFactory):
    """Makes the one _DevTools connection of a page and says when it connected, opened and
    closed."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.protocol = _DevTools
        self.connected: Deferred[_DevTools] = Deferred()
        self.opened: Deferred[_DevTools] = Deferred()
        self.closed: Deferred[None] = Deferred()


class Page:
    """One tab."""

    def __init__(self, protocol: _DevTools) -> None:
        self._protocol = protocol

    @property
    def events(self) -> list[dict[str, Any]]:
        return self._protocol.events

    def command(self, method: str, **params: Any) -> Deferred[dict[str, Any]]:
        return self._protocol.send_command(method, params)

    async def navigate(self, url: str) -> None:
        await self.command("Page.enable")
        await self.command("Network.enable")
        await self.command("Page.navigate", url=url)

    async def evaluate(self, expression: str) -> Any:
        result = await self.command("Runtime.evaluate", expression=expression,
                                    returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def screenshot(self, path: str) -> None:
        result = await self.command("Page.captureScreenshot", format="png")
        with open(path, "wb") as handle:
            handle.write(base64.b64decode(result["data"]))


class Chromium:
    """A headless Chromium process and its DevTools endpoint."""

    def __init__(self, test: TestCase, process: subprocess.Popen[bytes], profile: str) -> None:
        self._test = test
        self.process = process
        self.profile = profile
        self.port = 0

    @classmethod
    async def launch(cls, test: TestCase) -> Chromium:
        executable = find_chromium()
        profile = tempfile.mkdtemp(prefix="lpa-chromium-")
        test.addCleanup(shutil.rmtree, profile, True)
        process = subprocess.Popen(
            [executable, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        browser = cls(test, process, profile)
        test.addCleanup(browser.kill)
        browser.port = await browser._devtools_port()
        return browser

    async def _devtools_port(self, timeout: float = 30.0) -> int:
        marker = os.path.join(self.profile, "DevToolsActivePort")
        deadline = reactor.seconds() + timeout
        while not os.path.exists(marker) or not Path(marker).read_text().strip():
            if self.process.poll() is not None:
                raise AssertionError(f"chromium exited with {self.process.returncode}")
            if reactor.seconds() > deadline:
                raise AssertionError("chromium did not open its DevTools port")
            await deferLater(reactor, 0.1, lambda: None)
        with open(marker) as handle:
            return int(handle.readline())

    async def page(self) -> Page:
        response = await treq.get(f"http://127.0.0.1:{self.port}/json/list", persistent=False)
        targets = json.loads(await response.content())
        [target] = [t for t in targets if t.get("type") == "page"][:1]
        factory = _DevToolsFactory(target["webSocketDebuggerUrl"])
        factory.setProtocolOptions(autoPingInterval=0)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)
        await endpoint.connect(factory)
        protocol = await factory.opened

        async def close() -> None:
            if protocol.state != protocol.STATE_CLOSED:
                protocol.sendClose()
                await factory.closed

        self._test.addCleanup(lambda: defer.ensureDeferred(close()))
        return Page(protocol)

    def kill(self) -> None:
        """End the browser's whole process group and reap it."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
            except ProcessLookupError:
                pass
        with contextlib.suppress(ProcessLookupError):  # helpers (zygote, renderers) left behind
            os.killpg(self.process.pid, signal.SIGKILL)
