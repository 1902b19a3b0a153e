"""The agent's incarnation: a name for this start of the agent, ``"<boot_id>:<start counter>"``.

It changes on every start (the counter, kept in ``state_dir/incarnation``, goes up by one and is
synced before the agent serves anything) and on every boot (the boot id), so a client that sees
another incarnation knows the agent restarted in between.  Every event carries the incarnation
that numbered it; the job detail, ``resync`` frames and the events endpoint carry the current one.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

from twisted.logger import Logger

from lpa.agent.wal import IWalFiles, OsWalFiles

#: boot id in, incarnation out (called once per start)
Incarnations = Callable[[str], str]

_log = Logger()


def incarnation_name(boot_id: str, starts: int) -> str:
    return f"{boot_id or 'unknown-boot'}:{starts}"


class FileIncarnations:
    """The production :data:`Incarnations`: a start counter in a small JSON file.

    An unreadable file is reported and the counter continues from the Unix time, which is above
    any count of starts a real host reaches, so an incarnation is never handed out twice.
    """

    def __init__(
        self,
        path: str,
        *,
        files: IWalFiles | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self._files = files if files is not None else OsWalFiles()
        self._now = now

    def __call__(self, boot_id: str) -> str:
        starts = self._read() + 1
        try:
            os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
            self._files.replace(self.path, json.dumps({"starts": starts}).encode())
        except OSError as error:
            _log.error(
                "cannot save the agent's start counter in {path} ({reason}); the next start "
                "may repeat incarnation {starts}: make state_dir writable",
                path=self.path,
                reason=error.strerror or str(error),
                starts=starts,
            )
        return incarnation_name(boot_id, starts)

    def _read(self) -> int:
        try:
            with open(self.path, "rb") as stream:
                starts = json.loads(stream.read())["starts"]
            if not isinstance(starts, int) or isinstance(starts, bool) or starts < 0:
                raise ValueError(f"bad counter {starts!r}")
            return starts
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, TypeError, KeyError) as error:
            fallback = int(self._now())
            _log.error(
                "the agent's start counter {path} is unreadable ({reason}); continuing from "
                "{fallback}",
                path=self.path,
                reason=str(error),
                fallback=fallback,
            )
            return fallback


class MemoryIncarnations:
    """Incarnations counted in memory (an engine without a state directory, tests)."""

    def __init__(self) -> None:
        self.starts = 0

    def __call__(self, boot_id: str) -> str:
        self.starts += 1
        return incarnation_name(boot_id, self.starts)
