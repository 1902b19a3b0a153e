"""The config kit both daemons share: key checks, unknown keys, file checks, one-line errors.

``lpa/agent/config.py`` (YAML) and ``lpa/relay/config.py`` (TOML) each describe their keys with a
:class:`Schema` and build frozen attrs classes from what :func:`walk` returns::

    document (dict from YAML/TOML) ──walk(schema)──▶ {dotted key: checked value}, warnings
                                                     └▶ ConfigError "worker.ws_relay_pol: unknown
                                                        key (did you mean …?)"

* A key check is ``(key, raw value) -> value`` and raises :class:`~lpa.errors.ConfigError` with
  one line naming the key: :func:`integer`, :func:`number`, :func:`boolean`, :func:`text`,
  :func:`choice` …  Add a key to a daemon by adding one line to its schema.
* Keys of the programs lpa replaces that lpa does not use are *accepted* (listed one by one, each
  with the reason) and produce a warning; any other key in a section lpa checks is an error that
  suggests the closest known key (:mod:`difflib`).
* Files a config names (certificates, keys, CRLs) are checked by :func:`check_file` and
  :func:`check_key_pair` (from :mod:`lpa.configfiles`) at ``lpa config check`` and at daemon
  start, with errors that name the key: ``tls.server_cert: /etc/lpa/server.pem: no such file``.
* A daemon stops on a config error with one line on stderr and exit status :data:`EX_CONFIG`.
"""

from __future__ import annotations

import difflib
import math
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NoReturn

import attr

from lpa.configfiles import Pem as Pem
from lpa.configfiles import check_file as check_file
from lpa.configfiles import check_key_pair as check_key_pair
from lpa.configfiles import validity_warnings as validity_warnings
from lpa.errors import ConfigError

#: sysexits.h: "configuration error"; systemd shows it as ``status=78/CONFIG``
EX_CONFIG = 78

Check = Callable[[str, Any], Any]


def got(value: Any) -> str:
    """A short repr of a bad value for an error line."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- key checks --------------------------------------------------------------------------------


def integer(lo: int, hi: int) -> Check:
    """An int in ``[lo, hi]`` (``true`` is not an integer here)."""

    def check(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer, got {got(value)}")
        if not lo <= value <= hi:
            raise ConfigError(f"{key}: must be between {lo} and {hi}, got {value}")
        return value

    return check


def number(lo: float, hi: float) -> Check:
    """An int or float in ``[lo, hi]``, never NaN."""

    def check(key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ConfigError(f"{key}: must be a number, got {got(value)}")
        if not lo <= value <= hi:
            raise ConfigError(f"{key}: must be between {lo:g} and {hi:g}, got {value}")
        return value

    return check


def positive_seconds(key: str, value: Any) -> float:
    """A duration in seconds above zero (fractions allowed), as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{key}: must be a positive number of seconds, got {got(value)}")
    if math.isinf(value):
        raise ConfigError(f"{key}: must be a finite number of seconds, got {value}")
    return float(value)


def positive_integer(key: str, value: Any) -> int:
    """An integer of at least 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}: must be a positive integer, got {got(value)}")
    return value


def boolean(key: str, value: Any) -> bool:
    """``true`` or ``false``, nothing else."""
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: must be true or false, got {got(value)}")
    return value


def text(key: str, value: Any) -> str:
    """A non-blank string."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: must be a non-empty string, got {got(value)}")
    return value


def optional_text(key: str, value: Any) -> str | None:
    """A non-blank string, or None for ``null`` / ``""``."""
    if value is None or value == "":
        return None
    return text(key, value)


def path(key: str, value: Any) -> str:
    """A non-blank path string (whether the file is usable is :func:`check_file`'s business)."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: must be a non-empty path string, got {got(value)}")
    return value


def choice(*choices: str) -> Check:
    """One of ``choices``, case-insensitive; returned lower-case."""

    def check(key: str, value: Any) -> str:
        if not isinstance(value, str) or value.lower() not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(choices)}; got {got(value)}")
        return value.lower()

    return check


def names(key: str, value: Any) -> tuple[str, ...]:
    """A list of non-blank strings (``null`` is the empty list)."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"{key}: must be a list of names, got {got(value)}")
    return tuple(v.strip() for v in value)


def url(*schemes: str) -> Check:
    """A URL with one of ``schemes`` (``postgres://`` …)."""
    wanted = " or ".join(f"{scheme}://" for scheme in schemes)

    def check(key: str, value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{key}: must be a non-empty {wanted} URL, got {got(value)}")
        scheme = value.split("://", 1)[0].lower() if "://" in value else ""
        if scheme not in schemes:
            # never echo the value: a URL may carry a password
            raise ConfigError(f"{key}: must be a {wanted} URL, got scheme {scheme or 'none'!r}")
        return value

    return check


# --- unknown keys ------------------------------------------------------------------------------


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """`` (did you mean X?)`` for the closest of ``known``, or ``""``."""
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


@attr.s(frozen=True, slots=True, auto_attribs=True, kw_only=True)
class Schema:
    """What one daemon's config file may hold.

    :ivar keys: dotted key -> check, for every key lpa reads.
    :ivar accepted: dotted keys of the program lpa replaces that lpa does not use -> why; each
        present one is a warning, never an error.
    :ivar accepted_sections: whole sections lpa does not use -> why (one warning per section).
    :ivar foreign_sections: top-level sections that belong to another program sharing the file
        (the manager's ``[server]`` …): never looked into.
    :ivar other_sections: what to do with a top-level section not named anywhere above:
        ``"error"`` (the agent's own file) or ``"warn"`` (a file shared with the manager; a
        section name close to a known one is still an error).
    """

    keys: Mapping[str, Check]
    accepted: Mapping[str, str] = attr.Factory(dict)
    accepted_sections: Mapping[str, str] = attr.Factory(dict)
    foreign_sections: frozenset[str] = frozenset()
    other_sections: str = "error"

    def sections(self) -> set[str]:
        """Every section (and nested section) lpa checks key by key."""
        found: set[str] = set()
        for key in list(self.keys) + list(self.accepted):
            parts = key.split(".")[:-1]
            found.update(".".join(parts[: n + 1]) for n in range(len(parts)))
        return found

    def known(self) -> list[str]:
        """Every name a misspelt key may be close to."""
        return [*self.keys, *self.accepted, *sorted(self.sections()), *self.accepted_sections,
                *sorted(self.foreign_sections)]


def unknown_key(key: str, schema: Schema) -> ConfigError:
    return ConfigError(f"unknown key {key}{did_you_mean(key, schema.known())}")


def _flatten(
    mapping: Mapping[Any, Any], prefix: str, schema: Schema, sections: set[str],
    out: dict[str, Any], warnings: list[str],
) -> None:
    for raw_key, value in mapping.items():
        if not isinstance(raw_key, str):
            where = prefix.rstrip(".") or "top level"
            raise ConfigError(f"{where}: key {raw_key!r} is not a string")
        key = f"{prefix}{raw_key}"
        if key in schema.keys or key in schema.accepted:
            out[key] = value
        elif key in sections:
            if value is None:
                continue  # an empty section: all defaults
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key}: must be a section (a mapping), got {got(value)}")
            _flatten(value, key + ".", schema, sections, out, warnings)
        elif key in schema.accepted_sections:
            warnings.append(f"{key}.* is accepted but not used: {schema.accepted_sections[key]}")
        elif key in schema.foreign_sections:
            continue
        elif prefix or schema.other_sections == "error":
            raise unknown_key(key, schema)
        else:
            hint = did_you_mean(key, schema.known())
            if hint:
                raise ConfigError(f"unknown section {key}{hint}")
            warnings.append(f"section {key} is not one lpa knows; ignored")


def walk(document: Mapping[Any, Any], schema: Schema) -> tuple[dict[str, Any], list[str]]:
    """Check ``document`` against ``schema``.

    :returns: ``({dotted key: checked value}, warnings)``: only keys present in the document;
        accepted-but-unused keys with the same reason share one warning line.
    :raises ConfigError: an unknown key or section, a section that is not a mapping, or a value
        its check refuses (one line naming the key).
    """
    flat: dict[str, Any] = {}
    warnings: list[str] = []
    _flatten(document, "", schema, schema.sections(), flat, warnings)
    values: dict[str, Any] = {}
    unused: dict[str, list[str]] = {}
    for key, raw in flat.items():
        if key in schema.keys:
            values[key] = schema.keys[key](key, raw)
        else:
            unused.setdefault(schema.accepted[key], []).append(key)
    lines = [f"{', '.join(keys)} {'is' if len(keys) == 1 else 'are'} accepted but not used: {why}"
             for why, keys in unused.items()]
    return values, lines + warnings


def build(cls: type, values: Mapping[str, Any], prefix: str = "") -> Any:
    """An instance of the attrs class ``cls`` from dotted ``values``; nested attrs classes are
    sections (``jobs.command_timeouts.package_secs``); absent keys keep their defaults."""
    kwargs: dict[str, Any] = {}
    for field in attr.fields(cls):
        key = f"{prefix}{field.name}"
        if isinstance(field.type, type) and attr.has(field.type):
            kwargs[field.name] = build(field.type, values, key + ".")
        elif key in values:
            kwargs[field.name] = values[key]
    return cls(**kwargs)


# --- reading the file --------------------------------------------------------------------------


def read_config_text(file: str) -> str:
    """The config file's text; :class:`ConfigError` naming the file otherwise."""
    try:
        with open(file, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        raise ConfigError(f"config file {file}: not found") from None
    except OSError as error:
        raise ConfigError(f"config file {file}: cannot read: {error.strerror or error}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {file}: not UTF-8 text") from None


# --- stopping a daemon -------------------------------------------------------------------------


def exit_config_error(daemon: str, error: ConfigError) -> NoReturn:
    """One line on stderr and exit :data:`EX_CONFIG`: never a traceback for a bad config."""
    line = " ".join(str(error).split())
    sys.stderr.write(f"{daemon}: configuration error: {line}\n")
    sys.stderr.flush()
    raise SystemExit(EX_CONFIG)


#: twistd's own default, shared by every twistd daemon started in the same directory
TWISTD_DEFAULT_PIDFILE = "twistd.pid"


def own_pidfile(options: Any, daemon: str) -> None:
    """Give ``daemon`` its own default pid file (``lpa-agent.pid``) instead of ``twistd.pid``.

    Call from the plugin's ``postOptions``: twistd's own options are parsed by then and turned
    into an absolute path only after.  Two daemons started from one directory with twistd's
    default would refuse each other ("Another twistd server is running").  An explicit
    ``--pidfile`` (``--pidfile=`` for none, as under systemd) is kept.
    """
    parent = getattr(options, "parent", None)
    if parent is not None and parent.get("pidfile") == TWISTD_DEFAULT_PIDFILE:
        parent["pidfile"] = f"{daemon}.pid"
