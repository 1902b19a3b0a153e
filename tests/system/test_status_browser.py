"""The relay's status page in headless Chromium while a job runs agent → relay → PostgreSQL.

The page must show the host ``running``, then ``succeeded``, updated live from the relay's
event stream: the marker the page sets when it loads survives (no reload), the document was
navigated once, and the snapshot was read a few times at most while many notifications were
applied (no polling loop).  A screenshot is kept in the trial temp directory.
"""

from __future__ import annotations

import json
import os

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests.logcheck import assert_no_unhandled, capture_events
from tests.system.browser import Chromium, Page, find_chromium
from tests.system.pipeline import Pipeline

HOST_STATUS = "document.querySelector('{section} tr.host[data-host=\"localhost\"] td.status')"


class StatusPageBrowserTests(TestCase):
    timeout = 150

    def setUp(self) -> None:
        find_chromium()  # skip with the reason before starting anything

    async def wait_for(self, page: Page, expression: str, what: str, timeout: float = 30.0) -> None:
        """Poll the DOM from the test (the page itself never polls) until ``expression``."""
        deadline = reactor.seconds() + timeout
        while not await page.evaluate(expression):
            if reactor.seconds() > deadline:
                await page.screenshot(os.path.abspath("status-page-timeout.png"))
                raise AssertionError(f"the page never showed {what}")
            await deferLater(reactor, 0.1, lambda: None)

    async def test_host_running_then_succeeded_without_reload(self) -> None:
        """The page shows the host running, then succeeded, live: no reload and no polling."""
        events = capture_events(self)
        pipeline = await Pipeline.start(self)
        browser = await Chromium.launch(self)
        page = await browser.page()
        job = await pipeline.dispatch()
        await pipeline.until(
            lambda: pipeline.seeder.row(job.row_id)["relay_progress"] == 40, "progress applied")

        await page.navigate(pipeline.ops_url)
        running = "#running"
        await self.wait_for(page, f"{HOST_STATUS.format(section=running)}?.textContent"
                            " === 'running'", "the host running")
        marker = await page.evaluate("window.lpaStatus.token")
        self.assertEqual(await page.evaluate(
            "document.getElementById('connection').dataset.state"), "live")
        self.assertEqual(await page.evaluate(
            "document.querySelector('#running tr.host td.transport').textContent"), "ws")
        self.assertIn("40", await page.evaluate(
            "document.querySelector('#running tr.host td.progress').textContent"))
        await page.screenshot(os.path.abspath("status-page-running.png"))

        pipeline.release(job)
        await self.wait_for(
            page, f"{HOST_STATUS.format(section='#finished')}?.textContent === 'succeeded'",
            "the host succeeded")
        await self.wait_for(page,
                            "document.querySelector('#finished article.job')?.dataset.status"
                            " === 'succeeded'", "the job succeeded")
        path = os.path.abspath("status-page.png")
        await page.screenshot(path)
        with open(path, "rb") as screenshot:
            self.assertEqual(screenshot.read(8), b"\x89PNG\r\n\x1a\n")

        state = json.loads(await page.evaluate("JSON.stringify(window.lpaStatus)"))
        self.assertEqual(state["token"], marker, "the page was reloaded")
        self.assertEqual(await page.evaluate(
            "performance.getEntriesByType('navigation').length"), 1)
        self.assertGreaterEqual(state["applied"], 2)  # the host row and the job, live
        self.assertLessEqual(state["snapshots"], 3)
        self.assertEqual(await page.evaluate(
            "document.querySelectorAll('#running article.job').length"), 0)
        self.assertEqual(await page.evaluate("document.getElementById('running-empty').hidden"),
                         False)
        self.assertIn("100", await page.evaluate(
            "document.querySelector('#finished tr.host td.progress').textContent"))
        requests = [e["params"]["request"]["url"] for e in page.events
                    if e.get("method") == "Network.requestWillBeSent"]
        self.assertTrue(all(url.startswith(pipeline.ops_url) for url in requests), requests)
        self.assertLessEqual(sum(url.endswith("/api/status") for url in requests), 3)
        assert_no_unhandled(events)
