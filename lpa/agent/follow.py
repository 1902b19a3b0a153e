"""Reading a growing output file line by line, each line with the file offset it ends at.

A run's output files (:mod:`lpa.agent.rundir`) are appended to by the command while the agent
reads them on its clock.  :class:`LineReader` hands out whole lines, each with ``end``: the
offset just past it.  The engine stores the ``end`` of the last line it turned into a durable
event with that event, so a restarted agent starts a new reader at exactly that offset and
neither repeats a line nor skips one::

    out: "Get:1 …\\nGet:2 …\\nUnpacking …\\nSetting up …\\n"
                   ▲ end of the last durable line: the next reader starts here

A line longer than ``max_line`` bytes is handed out in pieces (each with its own ``end``); the
text is decoded as UTF-8 with replacement, so any bytes give a line.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

#: bytes read from one file per read() call at most (the reactor is not held up by a flood)
READ_CHUNK = 256 * 1024


class LineReader:
    """Whole lines of one file from ``start`` on, as the file grows.

    :param path: the file (it may not exist yet: it then reads as empty).
    :param start: the offset to begin at.
    :param max_line: longest piece handed out, in bytes.
    """

    def __init__(self, path: str, start: int = 0, *, max_line: int = 8192) -> None:
        self.path = path
        #: offset just past the last line handed out
        self.position = start
        self._max = max_line
        self._buffer = bytearray()
        self._fd: int | None = None

    def read(self, limit: int = READ_CHUNK) -> Iterator[tuple[str, int]]:
        """The complete lines that have appeared since the last call: ``(text, end)``."""
        data = self._read(limit)
        if data:
            self._buffer += data
        yield from self._lines(final=False)

    def finish(self) -> Iterator[tuple[str, int]]:
        """Everything left, the last line even without its newline (the writer is done)."""
        while True:
            data = self._read(READ_CHUNK)
            if not data:
                break
            self._buffer += data
            yield from self._lines(final=False)
        yield from self._lines(final=True)
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _read(self, limit: int) -> bytes:
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                return b""
        try:
            return os.pread(self._fd, limit, self.position + len(self._buffer))
        except OSError:
            self.close()  # opened again at the next read
            raise

    def _lines(self, *, final: bool) -> Iterator[tuple[str, int]]:
        buffer = self._buffer
        while buffer:
            index = buffer.find(b"\n", 0, self._max + 1)
            if index >= 0:
                raw, used = bytes(buffer[:index]), index + 1
            elif len(buffer) > self._max:
                raw, used = bytes(buffer[: self._max]), self._max
            elif final:
                raw, used = bytes(buffer), len(buffer)
            else:
                return
            del buffer[:used]
            self.position += used
            yield raw.decode("utf-8", "replace").rstrip("\r"), self.position


def bounded_text(path: str, half: int) -> str:
    """The file's first and last ``half`` bytes (what the runner keeps of a stream), with
    what lies between counted, as :class:`lpa.agent.process.ProcessRunner` reports it."""
    try:
        with open(path, "rb") as stream:
            size = os.fstat(stream.fileno()).st_size
            if size <= 2 * half:
                return stream.read().decode("utf-8", "replace")
            head = stream.read(half)
            stream.seek(size - half)
            tail = stream.read(half)
    except FileNotFoundError:
        return ""
    dropped = size - 2 * half
    return (
        f"{head.decode('utf-8', 'replace')}\n... [{dropped} bytes omitted] ...\n"
        f"{tail.decode('utf-8', 'replace')}"
    )
