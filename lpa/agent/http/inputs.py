"""Reading what a REST client sent: JSON bodies, fields, query arguments, package lists.

Everything here raises an :class:`~lpa.errors.ApiError` naming the bad member, so nothing
malformed reaches the job engine.  Unknown members of a body are refused by name: the original's
own end-to-end test sent ``{"patches": [], "options": {}}`` to ``/patches/apply``; both members
were silently ignored, ``packages`` was therefore absent, and the agent applied EVERYTHING.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterable
from typing import Any

from twisted.web.iweb import IRequest

from lpa import validation
from lpa.agent.model import PackageSpec
from lpa.errors import InvalidJsonError, PayloadTooLargeError, ValidationError

#: more names than this in one request is refused (a patch run names a few hundred at most)
MAX_PACKAGES = 2000
#: upper bound for delays in seconds (one week)
MAX_DELAY_SECONDS = 7 * 24 * 3600
#: deepest nesting of arrays and objects a body may have (ours nest three levels at most)
MAX_JSON_DEPTH = 32


def body_size(request: IRequest) -> int:
    content = request.content
    if content is None:
        return 0
    position = content.tell()
    content.seek(0, 2)
    size = content.tell()
    content.seek(position)
    return int(size)


def check_body_size(request: IRequest, max_bytes: int) -> None:
    """413 when the declared or the received body is larger than ``max_bytes``."""
    if getattr(request, "body_too_large", False):
        raise PayloadTooLargeError(
            f"Request body larger than {max_bytes} bytes", {"max_bytes": max_bytes}
        )
    declared = request.getHeader(b"content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            length = -1
        if length > max_bytes:
            raise PayloadTooLargeError(
                f"Request body larger than {max_bytes} bytes", {"max_bytes": max_bytes}
            )
    if body_size(request) > max_bytes:
        raise PayloadTooLargeError(
            f"Request body larger than {max_bytes} bytes", {"max_bytes": max_bytes}
        )


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def json_object(request: IRequest, *, empty_ok: bool = False) -> dict[str, Any]:
    """The body as a JSON object; ``{}`` for an empty body when ``empty_ok``."""
    content = request.content
    raw = b""
    if content is not None:
        content.seek(0)
        raw = content.read()
    if not raw.strip():
        if empty_ok:
            return {}
        raise InvalidJsonError("Request body must be a JSON object")
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError) as error:
        raise InvalidJsonError("Request body is not valid JSON", {"reason": str(error)}) from None
    except RecursionError:
        # the C decoder recurses once per level and gives up near the interpreter's limit
        raise _too_deep() from None
    if not isinstance(body, dict):
        raise InvalidJsonError("Request body must be a JSON object")
    if _depth(body) > MAX_JSON_DEPTH:
        raise _too_deep()
    return body


def _too_deep() -> InvalidJsonError:
    return InvalidJsonError(
        f"Request body nests arrays and objects deeper than {MAX_JSON_DEPTH} levels",
        {"max_depth": MAX_JSON_DEPTH},
    )


def _depth(value: Any) -> int:
    """How deep arrays and objects nest in a decoded body, without recursing."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Iterable[Any] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_JSON_DEPTH:
            return deepest
        stack.extend((child, level + 1) for child in children)
    return deepest


def refuse_unknown(body: dict[str, Any], allowed: Iterable[str], where: str = "body") -> None:
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise ValidationError(
            f"Unknown field(s) in {where}: {', '.join(unknown)}",
            {"unknown_fields": unknown, "allowed_fields": sorted(allowed)},
        )


def boolean(body: dict[str, Any], key: str, default: bool = False) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValidationError(f"{key} must be true or false", {"field": key})
    return value


def seconds(body: dict[str, Any], key: str, default: int = 0) -> int:
    value = body.get(key, default)
    if value is None:
        return default
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or value < 0
        or value > MAX_DELAY_SECONDS
    ):
        raise ValidationError(
            f"{key} must be an integer from 0 to {MAX_DELAY_SECONDS}", {"field": key}
        )
    return value


def package_specs(
    value: Any, key: str = "packages", *, empty_ok: bool = False
) -> tuple[PackageSpec, ...]:
    """A list of names or ``{name, version?}`` objects, validated, duplicates dropped; empty
    only when ``empty_ok``."""
    if not isinstance(value, list):
        raise ValidationError(f"{key} must be a list", {"field": key})
    if not value:
        if empty_ok:
            return ()
        raise ValidationError(f"{key} must name at least one package", {"field": key})
    if len(value) > MAX_PACKAGES:
        raise ValidationError(f"{key} names more than {MAX_PACKAGES} packages", {"field": key})
    specs: dict[str, PackageSpec] = {}
    for item in value:
        if isinstance(item, str):
            spec = PackageSpec(validation.package_name(item))
        elif isinstance(item, dict):
            refuse_unknown(item, ("name", "version"), f"{key} entry")
            version = item.get("version")
            spec = PackageSpec(
                validation.package_name(item.get("name")),
                validation.package_version(version) if version is not None else None,
            )
        else:
            raise ValidationError(
                f"each entry of {key} must be a package name or {{name, version}}", {"field": key}
            )
        if spec.name in specs and specs[spec.name] != spec:
            raise ValidationError(
                f"package {spec.name} is named twice with different versions", {"name": spec.name}
            )
        specs[spec.name] = spec
    return tuple(specs.values())


def uri_query(request: IRequest) -> dict[str, str]:
    """The request URI's query arguments, last value each (never a form body's fields, which
    twisted.web mixes into ``request.args`` for a form-encoded POST)."""
    query_string = urllib.parse.urlsplit(request.uri or b"").query
    pairs = urllib.parse.parse_qsl(query_string, keep_blank_values=True)
    return {
        name.decode("utf-8", "replace"): value.decode("utf-8", "replace") for name, value in pairs
    }


def refuse_unknown_query(request: IRequest, allowed: Iterable[str] = ()) -> None:
    """400 for query arguments a mutating endpoint does not know: a misspelt option (say
    ``?dryrun=1``) must not be ignored while the request mutates."""
    known = set(allowed)
    unknown = sorted(name for name in uri_query(request) if name not in known)
    if unknown:
        raise ValidationError(
            f"Unknown query argument(s): {', '.join(n[:40] for n in unknown[:10])}",
            {"unknown_query_arguments": unknown[:10], "allowed_query_arguments": sorted(known)},
        )


def dry_run(request: IRequest, body: dict[str, Any]) -> bool:
    """``dry_run`` from the body or the query (``?dry_run=true``); both given must agree."""
    in_body = boolean(body, "dry_run")
    raw = uri_query(request).get("dry_run")
    in_query = None if raw is None else _parse_bool("dry_run", raw)
    if in_query is not None and body.get("dry_run") is not None and in_query != in_body:
        raise ValidationError(
            "dry_run in the query and in the body disagree", {"field": "dry_run"}
        )
    return in_body or in_query is True


def query(request: IRequest, name: str) -> str | None:
    """The last value of a query argument, decoded (None when absent)."""
    values = (request.args or {}).get(name.encode("ascii"))
    if not values:
        return None
    value: bytes = values[-1]
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise ValidationError(f"query argument {name} is not UTF-8", {"field": name}) from None


def query_bool(request: IRequest, name: str) -> bool | None:
    value = query(request, name)
    if value is None:
        return None
    return _parse_bool(name, value)


def _parse_bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ValidationError(f"query argument {name} must be true or false", {"field": name})


def query_int(request: IRequest, name: str, default: int, low: int, high: int) -> int:
    value = query(request, name)
    if value is None:
        return default
    try:
        number = int(value.strip())
    except ValueError:
        number = low - 1
    if not low <= number <= high:
        raise ValidationError(
            f"query argument {name} must be an integer from {low} to {high}", {"field": name}
        )
    return number
