"""SQL pieces the relay's statements share: the terminal statuses, and arrays as literals."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: ``status NOT IN`` this: a row or job that has not ended (word for word the predicate of the
#: partial index ``relay_open_host_rows``, so the planner can use it)
TERMINAL_SQL = "('succeeded', 'failed', 'cancelled')"


def _element(value: Any) -> str:
    if value is None:
        return "NULL"
    if value is True or value is False:
        return "t" if value else "f"
    if type(value) is int:
        return str(value)
    text = str(value)
    if "\\" in text or '"' in text:
        text = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + text + '"'


def array(values: Sequence[Any]) -> str:
    """``values`` as ONE PostgreSQL array literal (``{"a",NULL,…}``), cast in the SQL.

    psycopg2 would send a list as ``ARRAY[$1, $2, …]``: one constant per element, so every batch
    size is a new statement for the server to parse and plan (tens of milliseconds for a few
    hundred rows).  One literal per array keeps each statement's text constant.
    """
    return "{" + ",".join([_element(value) for value in values]) + "}"
