"""The ``job_update`` NOTIFY payload: small, and always within ``pg_notify``'s limit.

A host payload says what changed in one transaction of one row: its status, seq, progress and
error, and in ``output`` only the output lines that are new since the row's previous notification
(never the whole text: the row keeps that, the browser fetches it by id).  The final JSON,
measured as UTF-8 bytes, never exceeds :data:`PAYLOAD_BUDGET` (1 KB; PostgreSQL refuses 8000 and
every notifying commit holds one cluster-wide lock, so smaller is cheaper for everyone): the error
keeps its head (the cause comes first) up to :data:`ERROR_BUDGET`, the new output keeps its tail
(the latest lines) in the rest, and ``output_truncated`` / ``error_truncated`` say so.

The original pm-worker put the agent's untruncated output and error in it, so a long one lost the
browser notification after the row had been updated.

Fields are the original's (``event_type`` host|job, ``job_id``, ``host_id``, ``status``, ``output``,
``error_message``, ``agent_job_id``, ``succeeded_count``, ``failed_count``, ``host_count``) plus
``seq``, ``transport``, ``progress`` and the two flags.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

CHANNEL = "job_update"
EVENT_HOST = "host"
EVENT_JOB = "job"

#: PostgreSQL's hard limit (exclusive) in the default build
PG_NOTIFY_LIMIT = 8000
#: what we allow ourselves (UTF-8 bytes of the whole JSON text)
PAYLOAD_BUDGET = 1024
#: the error keeps at most this many bytes; output gets the rest of the budget
ERROR_BUDGET = 512


def _encoded_len(value: Any) -> int:
    return len(json.dumps(value, ensure_ascii=False).encode("utf-8"))


def _dumps(payload: dict[str, Any]) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def _fit(text: str, budget: int, cut: Callable[[str, int], str]) -> str:
    """The longest ``cut(text, n)`` whose JSON encoding is at most ``budget`` bytes."""
    if len(text) <= budget and _encoded_len(text) <= budget:  # a char is at least one byte
        return text
    low, high = 0, min(len(text), max(budget, 0))
    while low < high:
        middle = (low + high + 1) // 2
        if _encoded_len(cut(text, middle)) <= budget:
            low = middle
        else:
            high = middle - 1
    return cut(text, low)


def _head(text: str, count: int) -> str:
    return text[:count]


def _tail(text: str, count: int) -> str:
    return text[len(text) - count :] if count else ""


def build_payload(
    *,
    event_type: str,
    job_id: str,
    status: str,
    host_id: str = "",
    agent_job_id: str = "",
    output: str | None = None,
    error_message: str | None = None,
    seq: int | None = None,
    transport: str | None = None,
    progress: int | None = None,
    succeeded_count: int | None = None,
    failed_count: int | None = None,
    host_count: int | None = None,
    budget: int = PAYLOAD_BUDGET,
) -> str:
    """The JSON text for ``pg_notify('job_update', …)``; at most ``budget`` UTF-8 bytes."""
    payload: dict[str, Any] = {
        "event_type": event_type,
        "job_id": job_id,
        "host_id": host_id,
        "status": status,
        "output": None,
        "error_message": None,
        "agent_job_id": agent_job_id,
        "succeeded_count": succeeded_count,
        "failed_count": failed_count,
        "host_count": host_count,
        "seq": seq,
        "transport": transport,
        "progress": progress,
        "output_truncated": False,
        "error_truncated": False,
    }
    if output is not None or error_message is not None:  # the common case: it all fits
        whole = _dumps(dict(payload, output=output, error_message=error_message))
        if len(whole) <= budget and len(whole.encode("utf-8")) <= budget:
            return whole
    # "" placeholders: their two quote bytes are counted again by _encoded_len below
    skeleton = dict(payload, output="" if output is not None else None)
    skeleton["error_message"] = "" if error_message is not None else None
    room = budget - len(_dumps(skeleton).encode("utf-8"))
    room += (2 if output is not None else 0) + (2 if error_message is not None else 0)
    if error_message is not None:
        fitted = _fit(error_message, min(ERROR_BUDGET, max(room, 2)), _head)
        payload["error_message"] = fitted
        payload["error_truncated"] = fitted != error_message
        room -= _encoded_len(fitted)
    if output is not None:
        fitted = _fit(output, max(room, 2), _tail)
        payload["output"] = fitted
        payload["output_truncated"] = fitted != output
    text = _dumps(payload)
    if len(text.encode("utf-8")) > budget:  # only ids longer than the budget can get here
        raise ValueError(f"notify payload of {len(text.encode('utf-8'))} bytes exceeds {budget}")
    return text
