"""Stand-in package-manager executables for tests that run a real agent process.

A test that lets an agent *mutate* must never reach this machine's apt: :func:`install_standins`
writes one Python script per command (``apt-get``, ``apt``, ``apt-cache``, ``dpkg``,
``dpkg-query``, and the reboot commands ``shutdown``, ``reboot``, ``systemctl``) into a
directory; :mod:`tests.agentproc` bind-mounts each of them over the real executable inside a
private mount namespace, so only the agent sees them.

Every invocation appends one JSON line to the record file (``argv``, ``pid``, ``phase``…), which
tests read with :func:`read_record`.  The scenario is a JSON file read at every invocation, so a
test may change it between two runs (:func:`write_scenario`).  A mutating ``apt-get`` run goes
through two phases, each printing one line every ``interval`` seconds:

* ``download`` for ``download_seconds`` (``Get:`` lines, ``dlstatus`` on apt's status fd 3);
* ``dpkg`` for ``dpkg_seconds`` (``Unpacking``/``Setting up`` lines, ``pmstatus`` on fd 3),
  with ``state_dir/dpkg-running`` present while it lasts (never the real dpkg lock),

then exits ``exit_code``.  SIGTERM is recorded with the phase it arrived in.  ``apt-get -s``
prints ``Inst`` lines for the scenario's packages; ``apt list --upgradable`` lists them; the
package named :data:`PROBE_PACKAGE` is always installed, so a test can prove through the agent's
own API that the stand-ins are in effect before its first mutating request.

Two scenario options act like a real host's package runs:

* ``dpkg_command`` (an argv) is run, and waited for, once ``dpkg_command_at`` (a fraction, 0.5)
  of the dpkg phase has passed, as a maintainer script would run ``systemctl restart`` of the
  package it upgrades (:meth:`tests.agentproc.AgentProcess.restart_command` stops the agent);
  its exit status is recorded (``event: "command"``);
* ``interrupted: true`` makes ``dpkg --audit`` report a half-configured package until
  ``dpkg --configure -a`` has run once (it prints ``Setting up …`` and records the repair).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from typing import Any

#: the commands a stand-in replaces, with where the real one lives on Debian
COMMANDS: dict[str, tuple[str, ...]] = {
    "apt-get": ("/usr/bin/apt-get",),
    "apt": ("/usr/bin/apt",),
    "apt-cache": ("/usr/bin/apt-cache",),
    "dpkg": ("/usr/bin/dpkg",),
    "dpkg-query": ("/usr/bin/dpkg-query",),
    "shutdown": ("/usr/sbin/shutdown", "/sbin/shutdown"),
    "reboot": ("/usr/sbin/reboot", "/sbin/reboot"),
    "systemctl": ("/usr/bin/systemctl", "/bin/systemctl"),
}

#: installed in every scenario; ``GET /api/v1/packages/lpa-standin-probe`` proves the stand-ins
PROBE_PACKAGE = "lpa-standin-probe"

DEFAULT_SCENARIO: dict[str, Any] = {
    "packages": [{"name": f"standin-pkg{n}", "from": "1.0-1", "to": "1.1-1"} for n in range(1, 4)],
    "download_seconds": 1.0,
    "dpkg_seconds": 2.0,
    "interval": 0.05,
    "exit_code": 0,
    "dpkg_command": None,
    "dpkg_command_at": 0.5,
    "interrupted": False,
}

_SCRIPT = r'''#!{python}
# lpa test stand-in for a package-manager command; see tests/standin.py.  Never the real one.
import json, os, signal, subprocess, sys, time

SCENARIO = {scenario!r}
RECORD = {record!r}
STATE = {state!r}
PROBE = {probe!r}
name = os.path.basename(sys.argv[0])
args = sys.argv[1:]
with open(SCENARIO) as f:
    sc = json.load(f)
phase = ["start"]


def record(**fields):
    fields.update(command=name, argv=args, pid=os.getpid(), time=time.time())
    with open(RECORD, "a") as f:
        f.write(json.dumps(fields) + "\n")


def on_term(signum, frame):
    record(event="signal", signal=signum, phase=phase[0])
    sys.exit(128 + signum)


signal.signal(signal.SIGTERM, on_term)
record(event="start")
pkgs = sc.get("packages", [])
status_fd = None
if any(a == "APT::Status-Fd=3" for a in args):
    try:
        status_fd = os.fdopen(3, "w", buffering=1)
    except OSError:
        status_fd = None


def status(line):
    if status_fd is not None:
        status_fd.write(line + "\n")


def lines(seconds, make):
    interval = float(sc.get("interval", 0.05))
    count = max(1, int(float(seconds) / interval))
    for n in range(count):
        print(make(n, count), flush=True)
        time.sleep(interval)


def finish(code=0):
    record(event="exit", code=code, phase=phase[0])
    sys.exit(code)


if "--lpa-standin-probe" in args:
    print("lpa-standin " + name)
    finish(0)
if name == "apt-get":
    if "update" in args:
        print("Hit:1 http://deb.example stable InRelease")
        finish(0)
    if "-s" in args:
        for p in pkgs:
            print(f"Inst {{p['name']}} [{{p['from']}}] ({{p['to']}} Example:12/stable [amd64])")
        for p in pkgs:
            print(f"Conf {{p['name']}} ({{p['to']}} Example:12/stable [amd64])")
        finish(0)
    phase[0] = "download"
    names = [p["name"] for p in pkgs] or ["nothing"]

    def get(n, count):
        status(f"dlstatus:{{n + 1}}:{{100.0 * (n + 1) / count:.4f}}:Retrieving file {{n + 1}}")
        return f"Get:{{n + 1}} http://deb.example stable/main {{names[n % len(names)]}} [12 kB]"

    lines(sc.get("download_seconds", 1.0), get)
    phase[0] = "dpkg"
    marker = os.path.join(STATE, "dpkg-running")
    open(marker, "w").close()
    record(event="phase", phase="dpkg")

    def unpack(n, count):
        command = sc.get("dpkg_command")
        if command and n == int(count * float(sc.get("dpkg_command_at", 0.5))):
            done = subprocess.run(command, stdin=subprocess.DEVNULL)
            record(event="command", argv_run=command, code=done.returncode, phase="dpkg")
        pkg = names[n % len(names)]
        status(f"pmstatus:{{pkg}}:{{100.0 * (n + 1) / count:.4f}}:Installing {{pkg}}")
        verb = "Unpacking" if n % 2 == 0 else "Setting up"
        return f"{{verb}} {{pkg}} (1.1-1) [line {{n + 1}} of {{count}}] ..."

    lines(sc.get("dpkg_seconds", 2.0), unpack)
    os.unlink(marker)
    phase[0] = "done"
    finish(int(sc.get("exit_code", 0)))
if name == "apt":
    if "--upgradable" in args:
        print("Listing...")
        for p in pkgs:
            print(f"{{p['name']}}/stable {{p['to']}} amd64 [upgradable from: {{p['from']}}]")
        finish(0)
    print("Listing...")
    print(f"{{PROBE}}/stable,now 1.0-1 amd64 [installed]")
    for p in pkgs:
        print(f"{{p['name']}}/stable,now {{p['from']}} amd64 "
              f"[installed,upgradable to: {{p['to']}}]")
    finish(0)
if name == "apt-cache":
    target = args[-1] if args else ""
    print(f"{{target}}:\n  Installed: 1.0-1\n  Candidate: 1.0-1\n  Version table:\n"
          f" *** 1.0-1 500\n        500 http://deb.example stable/main amd64 Packages")
    finish(0)
if name == "dpkg":
    repaired = os.path.join(STATE, "repaired")
    if "--audit" in args:
        if sc.get("interrupted") and not os.path.exists(repaired):
            print("The following packages are only half configured, probably due to problems")
            print("configuring them the first time.  The configuration should be retried using")
            print("dpkg --configure <package> or the configure menu option in dselect:")
            print(" standin-pkg1         stand-in package")
        finish(0)
    if "--configure" in args:
        phase[0] = "configure"
        for p in pkgs:
            print(f"Setting up {{p['name']}} ({{p['to']}}) ...", flush=True)
        open(repaired, "w").close()
        finish(0)
    if "-s" in args:
        target = args[-1]
        if target == PROBE or any(p["name"] == target for p in pkgs):
            print(f"Package: {{target}}\nStatus: install ok installed\nVersion: 1.0-1\n"
                  f"Architecture: amd64\nDescription: stand-in package")
            finish(0)
        print(f"dpkg-query: package '{{target}}' is not installed", file=sys.stderr)
        finish(1)
    finish(0)
if name == "dpkg-query":
    print(f"{{PROBE}}\t1.0-1")
    finish(0)
if name == "systemctl" and args[:1] == ["show"]:
    print("Id=standin.service\nLoadState=not-found\nActiveState=inactive\nSubState=dead")
    finish(0)
finish(0)  # shutdown, reboot, systemctl reboot …: recorded, never carried out
'''


def write_scenario(directory: str, **overrides: Any) -> str:
    """Write (or rewrite) the scenario read by every stand-in invocation; return its path."""
    scenario = dict(DEFAULT_SCENARIO, **overrides)
    path = os.path.join(directory, "scenario.json")
    with open(path + ".tmp", "w") as stream:
        json.dump(scenario, stream)
    os.replace(path + ".tmp", path)
    return path


def install_standins(directory: str, **scenario: Any) -> dict[str, str]:
    """Write the stand-in scripts into ``directory/bin``; return {command: script path}.

    ``directory`` also holds ``scenario.json``, the ``record.jsonl`` of invocations and the
    ``state`` directory for phase markers.
    """
    bin_dir = os.path.join(directory, "bin")
    state = os.path.join(directory, "state")
    os.makedirs(bin_dir, exist_ok=True)
    os.makedirs(state, exist_ok=True)
    scenario_path = write_scenario(directory, **scenario)
    text = _SCRIPT.format(
        python=sys.executable,
        scenario=scenario_path,
        record=record_path(directory),
        state=state,
        probe=PROBE_PACKAGE,
    )
    scripts = {}
    for command in COMMANDS:
        path = os.path.join(bin_dir, command)
        with open(path, "w") as stream:
            stream.write(text)
        os.chmod(path, 0o755)
        scripts[command] = path
    return scripts


def record_path(directory: str) -> str:
    return os.path.join(directory, "record.jsonl")


def read_record(directory: str) -> list[dict[str, Any]]:
    """Every recorded invocation event, oldest first."""
    try:
        with open(record_path(directory)) as stream:
            return [json.loads(line) for line in stream if line.strip()]
    except FileNotFoundError:
        return []


def mutating_calls(records: Iterable[dict[str, Any]]) -> list[list[str]]:
    """argv of every recorded ``apt-get``/``dpkg`` start that would change the package database."""
    calls = []
    for entry in records:
        if entry.get("event") != "start":
            continue
        argv = entry["argv"]
        if entry["command"] == "apt-get" and "-s" not in argv and "update" not in argv:
            if "--lpa-standin-probe" not in argv:
                calls.append(argv)
        elif (entry["command"] == "dpkg"
              and any(a in argv for a in ("-i", "--configure", "-r", "-P"))):
            calls.append(argv)
    return calls
