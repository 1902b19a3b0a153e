"""Human output of the ``lpa`` command: aligned tables with a header, and ``key: value`` lists.

Machine output is ``--json``: the envelope's ``data`` as the agent sent it, indented and with
sorted keys, so it stays stable whatever the human layout becomes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """Lines of a left-aligned table; the header is upper case, ``None`` shows as ``-``."""
    cells = [[str(h).upper() for h in headers]]
    cells += [[_cell(value) for value in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return ["  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)).rstrip()
            for row in cells]


def pairs(items: Iterable[tuple[str, Any]]) -> list[str]:
    """``key: value`` lines with the values aligned."""
    items = list(items)
    width = max((len(key) for key, _ in items), default=0) + 1
    return [f"{key + ':':<{width}} {_cell(value)}" for key, value in items]


def scalars(data: Mapping[str, Any], first: Sequence[str] = ()) -> list[tuple[str, Any]]:
    """The scalar members of ``data``: those named in ``first`` in that order, then the rest
    sorted; lists of scalars are joined with commas, objects are left to ``--json``."""
    keys = [key for key in first if key in data]
    keys += sorted(key for key in data if key not in keys)
    found = []
    for key in keys:
        value = data[key]
        if isinstance(value, list) and all(not isinstance(v, (dict, list)) for v in value):
            value = ", ".join(str(v) for v in value) or "-"
        elif isinstance(value, (dict, list)):
            continue
        found.append((key, value))
    return found


def to_json(data: Any) -> str:
    """The stable machine-readable form."""
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False)


def yes_no(value: Any) -> str:
    """``yes``/``no`` for booleans, ``-`` when unknown (an agent that does not say)."""
    if value is True:
        return "yes"
    if value is False:
        return "no"
    return "-"


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return yes_no(value)
    return " ".join(str(value).split())
