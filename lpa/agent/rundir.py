"""One package-manager run on disk: the files a run leaves for whoever follows it, and the
wrapper that runs the command outside the agent's lifetime.

::

    state_dir/runs/<job id>/<n>/     the job's n-th command (1, 2, …)
        meta.json    written by the agent before the launch: argv, start time, unit name
        lock         flock()ed by the wrapper for as long as it lives
        started      written by the wrapper once the command runs: its pid, the command's pgid
        out err fd3  the command's stdout, stderr and fd 3 (apt's status fd), appended to
        status       written by the wrapper when the command has exited: exit code or signal
        terminated   written by the agent before it signals the command (why: timed out …)

The wrapper (:data:`WRAPPER`, run as ``python -c``) holds the lock, starts the command in a
process group of its own with its fds on the files, waits for it and writes ``status``
atomically, then exits.  Nothing of it is a pipe to the agent: the agent may die, be killed or
restart, and the command neither notices nor stops; a restarted agent reads the files from where
its durable events end.  "The wrapper still runs" is "the lock is held" (:func:`lock_held`): a
lock dies with its process, so a reused pid can never pass for the wrapper (the pids in
``started`` are for signalling the command and for the operator only).

Launched detached (argument ``1``), the wrapper forks twice and starts a new session, so it is
no child of the agent's: the first process waits until the command has started (or failed to)
and exits with that answer, which is all the agent waits for.  Under systemd the wrapper is the
main process of a transient service unit instead, a child of PID 1 (see :mod:`lpa.agent.detached`).

This layout is read by the *next* agent process, which may be a newer version (the agent's own
package upgraded by the job): change it only in ways an older wrapper's files still satisfy.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from typing import Any

import attr

RUNS = "runs"
META, LOCK, STARTED, STATUS, TERMINATED = "meta.json", "lock", "started", "status", "terminated"
#: output files by the command fd they hold
OUTPUTS: dict[int, str] = {1: "out", 2: "err", 3: "fd3"}

WRAPPER = r"""
import fcntl, json, os, signal, sys

run_dir, detach, argv = sys.argv[1], sys.argv[2] == "1", sys.argv[3:]


def path(name):
    return os.path.join(run_dir, name)


def write(name, data):
    temporary = path(name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, json.dumps(data).encode())
    os.fsync(fd)
    os.close(fd)
    os.rename(temporary, path(name))
    fd = os.open(run_dir, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


answer = None
if detach:
    reader, answer = os.pipe()
    first = os.fork()
    if first:
        os.close(answer)
        os.waitpid(first, 0)
        word = os.read(reader, 64)
        os._exit(0 if word == b"ok" else 3)
    os.close(reader)
    os.setsid()
    if os.fork():
        os._exit(0)
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
for signum in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE):
    signal.signal(signum, signal.SIG_IGN)
lock = os.open(path("lock"), os.O_RDWR | os.O_CREAT, 0o600)
try:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
except OSError:
    os._exit(4)
outputs = [os.open(path(n), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
           for n in ("out", "err", "fd3")]
check_r, check_w = os.pipe()
child = os.fork()
if child == 0:
    try:
        os.setpgid(0, 0)
        os.close(check_r)
        os.dup2(null, 0)
        for fd, output in zip((1, 2, 3), outputs):
            os.dup2(output, fd)
        for signum in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE):
            signal.signal(signum, signal.SIG_DFL)
        os.execvp(argv[0], argv)
    except OSError as error:
        os.write(check_w, json.dumps([error.errno, error.strerror]).encode())
    os._exit(127)
os.close(check_w)
failed = b""
while True:
    chunk = os.read(check_r, 4096)
    if not chunk:
        break
    failed += chunk
if failed:
    os.waitpid(child, 0)
    number, text = json.loads(failed)
    write("status", {"exit_code": None, "signal": None, "exec_errno": number, "exec_error": text})
    if answer is not None:
        os.write(answer, b"ok")
    os._exit(0)
write("started", {"pid": os.getpid(), "pgid": child})
if answer is not None:
    os.write(answer, b"ok")
    os.close(answer)
_, status = os.waitpid(child, 0)
if os.WIFSIGNALED(status):
    write("status", {"exit_code": None, "signal": os.WTERMSIG(status)})
else:
    write("status", {"exit_code": os.WEXITSTATUS(status), "signal": None})
os._exit(0)
"""


def job_directory(root: str, job_id: str) -> str:
    return os.path.join(root, job_id)


def run_directory(root: str, job_id: str, number: int) -> str:
    return os.path.join(root, job_id, str(number))


@attr.s(frozen=True, slots=True, auto_attribs=True)
class RunFiles:
    """What a run's directory says about it, read at one moment."""

    directory: str
    number: int
    meta: dict[str, Any] | None
    started: dict[str, Any] | None
    status: dict[str, Any] | None
    terminated: dict[str, Any] | None
    alive: bool

    @property
    def argv(self) -> tuple[str, ...]:
        return tuple((self.meta or {}).get("argv", ()))

    @property
    def state(self) -> str:
        """``finished`` (a status), ``running`` (the wrapper holds its lock), ``vanished``
        (it started, then went without a status: host rebooted, wrapper killed) or
        ``never-started``."""
        if self.status is not None:
            return "finished"
        if self.alive:
            return "running"
        return "vanished" if self.started is not None else "never-started"


def read_json(path: str) -> dict[str, Any] | None:
    """A small JSON document, or None when it is missing or unreadable (being written)."""
    try:
        with open(path, "rb") as stream:
            value = json.loads(stream.read())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def write_json(path: str, data: dict[str, Any], *, sync: bool = True) -> None:
    """Atomically (temporary file, rename), synced with its directory unless ``sync`` is off."""
    write_file(path, json.dumps(data).encode(), sync=sync)


def write_file(path: str, data: bytes, *, sync: bool = True) -> None:
    """``data`` into ``path`` atomically (mode 0600), synced with its directory unless
    ``sync`` is off."""
    temporary = path + ".tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    if sync:
        directory = os.open(os.path.dirname(path), os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def lock_held(directory: str) -> bool:
    """Whether a wrapper holds the run's lock, i.e. is alive (the lock dies with it)."""
    try:
        fd = os.open(os.path.join(directory, LOCK), os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        raise
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def read_run(directory: str, number: int) -> RunFiles:
    # status before the lock: a wrapper writes its status, then lets go of the lock
    status = read_json(os.path.join(directory, STATUS))
    alive = status is None and lock_held(directory)
    if status is None and not alive:
        status = read_json(os.path.join(directory, STATUS))
    return RunFiles(
        directory=directory,
        number=number,
        meta=read_json(os.path.join(directory, META)),
        started=read_json(os.path.join(directory, STARTED)),
        status=status,
        terminated=read_json(os.path.join(directory, TERMINATED)),
        alive=alive,
    )


def recorded_runs(root: str, job_id: str) -> list[int]:
    """The run numbers a job has directories for, in order."""
    try:
        names = os.listdir(job_directory(root, job_id))
    except FileNotFoundError:
        return []
    return sorted(int(name) for name in names if name.isdigit())


def remove_job_runs(root: str, job_id: str) -> bool:
    """Delete a job's run directories unless one of them still runs; return whether it did."""
    directory = job_directory(root, job_id)
    for number in recorded_runs(root, job_id):
        if read_run(run_directory(root, job_id, number), number).state == "running":
            return False  # (a wrapper that wrote its status has nothing more to write)
    shutil.rmtree(directory, ignore_errors=True)
    return True


def output_path(directory: str, fd: int) -> str:
    return os.path.join(directory, OUTPUTS[fd])
