"""The documents are valid reStructuredText: docutils parses each without a warning.

A table whose text runs into a column margin, a title underline shorter than its title or a
literal left open renders wrongly (or not at all) on any site that shows the file, while the
text still reads fine in an editor; only a parser sees it.
"""

from __future__ import annotations

import glob
import io
import os

import docutils.core
import docutils.utils
from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def documents() -> list[str]:
    """README.rst, docs/*.rst and bench/README.rst, relative to the checkout."""
    found = ["README.rst", "bench/README.rst", *sorted(glob.glob("docs/*.rst", root_dir=ROOT))]
    return [path for path in found if os.path.exists(os.path.join(ROOT, path))]


def problems(text: str, name: str) -> list[str]:
    """docutils' warnings and errors about ``text`` (``name`` is the path they name)."""
    stream = io.StringIO()
    docutils.core.publish_doctree(
        text,
        source_path=name,
        settings_overrides={
            "report_level": docutils.utils.Reporter.WARNING_LEVEL,
            "halt_level": docutils.utils.Reporter.SEVERE_LEVEL + 1,
            "warning_stream": stream,
        },
    )
    return [line for line in stream.getvalue().splitlines() if line.startswith(name + ":")]


class DocumentTests(SynchronousTestCase):
    def test_every_document_parses_cleanly(self) -> None:
        """README.rst, docs/ and bench/README.rst give docutils nothing to warn about."""
        names = documents()
        self.assertIn("docs/operations.rst", names)
        found = {}
        for name in names:
            with open(os.path.join(ROOT, name), encoding="utf-8") as handle:
                found[name] = problems(handle.read(), name)
        self.assertEqual({name: lines for name, lines in found.items() if lines}, {})

    def test_the_check_sees_broken_markup(self) -> None:
        """A short title underline, a table cell in a margin and an open literal are reported."""
        broken = (
            "Title here\n=====\n\n"
            "====  ====\na     b\n====  ====\nxx    a cell that runs into yy\nz     ``open\n"
            "====  ====\n"
        )
        reported = problems(broken, "x.rst")
        self.assertTrue(any("Title underline too short" in line for line in reported), reported)
        self.assertFalse(problems("Title\n=====\n\nplain ``literal`` text\n", "y.rst"))
