"""Validation of names that reach a package manager or systemd, as the original agent did.

Every user-supplied name is checked here before it can become an argv element, and argv puts
``--`` before such names anyway, so a name can never be read as an option.
"""

from __future__ import annotations

import re
import uuid

from lpa.errors import InvalidJobIdError, InvalidServiceNameError, ValidationError

MAX_NAME_LENGTH = 256
_PACKAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9+._-]*\Z")
_PACKAGE_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9+.:~_-]*\Z")
_SERVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@+-]*\Z")


def package_name(value: object) -> str:
    """Return ``value`` if it is a valid package name, else raise ``ValidationError``."""
    if not isinstance(value, str) or not value:
        raise ValidationError("package name must be a non-empty string", {"name": value})
    if len(value) > MAX_NAME_LENGTH:
        raise ValidationError(
            f"package name longer than {MAX_NAME_LENGTH} characters", {"length": len(value)}
        )
    if not _PACKAGE_NAME.match(value):
        raise ValidationError(
            "invalid package name: letters, digits and + . _ - only, "
            "starting with a letter or digit",
            {"name": value},
        )
    return value


def package_version(value: object) -> str:
    """Return ``value`` if it is a valid version string, else raise ``ValidationError``."""
    if not isinstance(value, str) or not value:
        raise ValidationError("package version must be a non-empty string", {"version": value})
    if len(value) > MAX_NAME_LENGTH:
        raise ValidationError(
            f"package version longer than {MAX_NAME_LENGTH} characters", {"length": len(value)}
        )
    if not _PACKAGE_VERSION.match(value):
        raise ValidationError(
            "invalid package version: letters, digits and + . : ~ _ - only", {"version": value}
        )
    return value


def service_name(value: object) -> str:
    """Return ``value`` if it is a valid systemd unit name, else ``InvalidServiceNameError``."""
    if (
        not isinstance(value, str)
        or not value
        or len(value) > MAX_NAME_LENGTH
        or not _SERVICE_NAME.match(value)
    ):
        raise InvalidServiceNameError("invalid service name", {"name": value})
    return value


def job_id(value: object) -> str:
    """Return the canonical form of a job id (a UUID), else raise ``InvalidJobIdError``."""
    if not isinstance(value, str):
        raise InvalidJobIdError("job id must be a UUID", {"job_id": value})
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise InvalidJobIdError("job id must be a UUID", {"job_id": value}) from None
