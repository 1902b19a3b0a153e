"""Run the docs' ``.. shell: run`` blocks against ``lpa demo --keep`` (for test_docs.py).

``python -m tests.system.docrun PLAN RESULT`` (run by the test inside ``unshare -n``, so the demo's
agent gets port 12443 and nothing else on the machine is reachable or disturbed): brings up
loopback, starts ``lpa demo --keep --state-dir .demo`` in the plan's directory, runs each block
with bash (``set -euo pipefail``; exported variables carry over to the next block, as in one
terminal), then ``lpa demo --stop``, and writes what happened as JSON to RESULT.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

STATE_DIR = ".demo"


def _run(argv: list[str], *, cwd: str, env: dict[str, str], timeout: float) -> dict[str, Any]:
    started = time.monotonic()
    try:
        done = subprocess.run(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout, check=False)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as expired:
        code = -1
        parts = [part.decode(errors="replace") if isinstance(part, bytes) else part or ""
                 for part in (expired.output, expired.stderr)]
        output = "".join(parts) + f"\n(timed out after {timeout:g} s)"
    return {"code": code, "output": output, "seconds": round(time.monotonic() - started, 1)}


def main(plan_path: str, result_path: str) -> int:
    with open(plan_path, encoding="utf-8") as handle:
        plan = json.load(handle)
    cwd, env = plan["cwd"], dict(plan["env"])
    result: dict[str, Any] = {"blocks": []}
    lo = _run(["ip", "link", "set", "lo", "up"], cwd=cwd, env=env, timeout=30)
    if lo["code"] != 0:
        result["setup"] = lo
        return _write(result_path, result)
    lpa = [sys.executable, "-m", "lpa"]
    result["demo"] = _run([*lpa, "demo", "--keep", "--state-dir", STATE_DIR,
                           "--timeout", str(plan["demo_timeout"])],
                          cwd=cwd, env=env, timeout=plan["demo_timeout"] + 120)
    try:
        if result["demo"]["code"] == 0:
            with open(os.path.join(cwd, STATE_DIR, "demo.json"), encoding="utf-8") as handle:
                env["DATABASE_URL"] = json.load(handle)["dsn"]
            env_file = os.path.join(cwd, ".docrun-env")
            open(env_file, "w").close()
            for block in plan["blocks"]:
                script = (f'set -euo pipefail\nsource "{env_file}"\n{block["text"]}\n'
                          f'export -p > "{env_file}"\n')
                outcome = _run(["bash", "-c", script], cwd=cwd, env=env,
                               timeout=plan["block_timeout"])
                result["blocks"].append({"where": block["where"], **outcome})
    finally:
        result["stop"] = _run([*lpa, "demo", "--stop", "--state-dir", STATE_DIR],
                              cwd=cwd, env=env, timeout=120)
    return _write(result_path, result)


def _write(path: str, result: dict[str, Any]) -> int:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
