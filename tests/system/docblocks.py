"""The shell blocks of README.rst and docs/*.rst, with what each is marked to do.

A literal block (after a paragraph ending in ``::``, or a ``.. code-block::`` directive) holding
commands is preceded, anywhere before its introducing paragraph, by an rst comment saying
whether the docs test runs it against the demo's services::

    .. shell: run

    Against the demo::

        lpa agent localhost:12443 health

    .. shell: skip, installs into /opt and needs root

A comment is invisible in the rendered document.  :func:`blocks` returns every literal block;
:func:`looks_like_commands` tells which need a marker.
"""

from __future__ import annotations

import os
import re

import attr

from tests.system import CHECKOUT as ROOT

_MARKER = re.compile(r"^\s*\.\. shell:\s*(?P<action>run|skip)\b[\s,:;—-]*(?P<reason>.*)$")
_DIRECTIVE = re.compile(r"^\s*\.\. (code-block|code|sourcecode)::")

#: first words of a command line (besides paths to executables and VAR=value)
COMMANDS = frozenset({
    "lpa", "twistd", "make", "python", "python3", "pip", "psql", "cp", "install", "systemctl",
    "useradd", "export", "curl", "openssl", "sudo", "apt-get", "cd", "journalctl", "git",
})


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Block:
    """One literal block: where it is, its text (dedented) and its marker, if any."""

    document: str
    line: int
    text: str
    action: str | None = None
    reason: str = ""

    @property
    def where(self) -> str:
        return f"{self.document}:{self.line}"


def documents() -> list[str]:
    """README.rst and every docs/*.rst, relative to the checkout."""
    docs = sorted(os.path.join("docs", name) for name in os.listdir(os.path.join(ROOT, "docs"))
                  if name.endswith(".rst"))
    return ["README.rst", *docs]


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def parse(text: str, document: str = "<rst>") -> tuple[list[Block], list[str]]:
    """Literal blocks of ``text`` with their markers, and problems (a marker with no block)."""
    lines = text.splitlines()
    found: list[Block] = []
    problems: list[str] = []
    pending: tuple[str, str, int] | None = None
    number = 0
    while number < len(lines):
        line = lines[number]
        marker = _MARKER.match(line)
        if marker:
            if pending is not None:
                problems.append(f"{document}:{pending[2]}: marker without a block before the "
                                f"next marker")
            pending = (marker["action"], marker["reason"].strip(), number + 1)
            number += 1
            continue
        directive = _DIRECTIVE.match(line) is not None
        starts = directive or (line.rstrip().endswith("::")
                               and not line.lstrip().startswith(".."))
        if not starts:
            number += 1
            continue
        outer = _indent(line)
        body = number + 1
        while body < len(lines) and (not lines[body].strip()
                                      or (directive and lines[body].lstrip().startswith(":"))):
            body += 1
        end = body
        while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > outer):
            end += 1
        content = lines[body:end]
        while content and not content[-1].strip():
            content.pop()
        if content and _indent(content[0]) > outer:
            depth = min(_indent(ln) for ln in content if ln.strip())
            block_text = "\n".join(ln[depth:] for ln in content) + "\n"
            action, reason = (pending[0], pending[1]) if pending else (None, "")
            found.append(Block(document, body + 1, block_text, action, reason))
            pending = None
        number = max(end, number + 1)
    if pending is not None:
        problems.append(f"{document}:{pending[2]}: marker without a block after it")
    return found, problems


def blocks() -> tuple[list[Block], list[str]]:
    """Every literal block of the documents, and every marker problem."""
    found: list[Block] = []
    problems: list[str] = []
    for document in documents():
        with open(os.path.join(ROOT, document), encoding="utf-8") as handle:
            more, wrong = parse(handle.read(), document)
        found += more
        problems += wrong
    return found, problems


def looks_like_commands(block: Block) -> bool:
    """Whether the block's first line is a command (so it must be marked run or skip)."""
    first = next((ln.strip() for ln in block.text.splitlines() if ln.strip()), "")
    word = first.removeprefix("$ ").split(" ", 1)[0]
    return (word in COMMANDS or word.startswith(("/", "./", ".venv/"))
            or re.match(r"^[A-Z_][A-Z0-9_]*=", word) is not None)
