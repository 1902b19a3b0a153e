"""One exception hierarchy for lpa.

Every :class:`ApiError` maps to exactly one API error code and HTTP status; the REST layer turns
them into the JSON envelope in one place (``lpa.agent.http.api``).  :class:`ConfigError` is for
start-up: it carries one line naming the key and the problem.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class LpaError(Exception):
    """Base of every error lpa raises on purpose."""


class ConfigError(LpaError):
    """A configuration file is missing, unreadable, or holds a bad key or value.

    ``str(error)`` is the single line printed before a non-zero exit.
    """


class ApiError(LpaError):
    """An error with a stable API code, an HTTP status and a retry hint."""

    code: str = "INTERNAL_ERROR"
    http_status: int = 500
    retryable: bool = False
    #: seconds for a ``Retry-After`` header, or None for no header
    retry_after: int | None = None
    #: other response headers the error needs (``Allow`` of a 405, ``Upgrade`` of a 426)
    headers: Mapping[str, str] | None = None

    def __init__(self, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_error_dict(self) -> dict[str, Any]:
        """The ``error`` member of the envelope."""
        return {
            "code": self.code,
            "message": self.message,
            "details": self.details,
            "retryable": self.retryable,
        }


class ValidationError(ApiError):
    code, http_status = "VALIDATION_ERROR", 400


class InvalidJsonError(ApiError):
    code, http_status = "INVALID_JSON", 400


class InvalidJobIdError(ApiError):
    code, http_status = "INVALID_JOB_ID", 400


class InvalidServiceNameError(ApiError):
    code, http_status = "INVALID_SERVICE_NAME", 400


class ForbiddenError(ApiError):
    code, http_status = "FORBIDDEN", 403


class NotFoundError(ApiError):
    code, http_status = "NOT_FOUND", 404


class JobNotFoundError(NotFoundError):
    code = "JOB_NOT_FOUND"


class PackageNotFoundError(NotFoundError):
    code = "PKG_NOT_FOUND"


class ServiceNotFoundError(NotFoundError):
    code = "SERVICE_NOT_FOUND"


class MethodNotAllowedError(ApiError):
    code, http_status = "METHOD_NOT_ALLOWED", 405


class ConflictError(ApiError):
    code, http_status = "CONFLICT", 409


class DeleteNotAllowedError(ConflictError):
    code = "DELETE_NOT_ALLOWED"


class CancelNotAllowedError(ConflictError):
    code = "CANCEL_NOT_ALLOWED"


class RebootBlockedError(ConflictError):
    code = "REBOOT_BLOCKED"


class MutationInProgressError(ConflictError):
    code = "PACKAGE_DB_MUTATION_IN_PROGRESS"


class UnsupportedOnLpaError(ConflictError):
    """A request of the original agent that lpa answers on purpose with a migration step
    (the manager's self-upgrade of ``linux-patch-api``)."""

    code = "UNSUPPORTED_ON_LPA"


class PayloadTooLargeError(ApiError):
    code, http_status = "PAYLOAD_TOO_LARGE", 413


class UpgradeRequiredError(ApiError):
    code, http_status = "UPGRADE_REQUIRED", 426


class SubprotocolRequiredError(ApiError):
    """A WebSocket handshake on the job stream that did not offer its subprotocol."""

    code, http_status = "SUBPROTOCOL_REQUIRED", 400


class WebSocketHandshakeError(ApiError):
    """Any other refused WebSocket opening handshake; the status is the one Autobahn chose."""

    code, http_status = "WEBSOCKET_HANDSHAKE_FAILED", 400

    def __init__(self, message: str, http_status: int = 400, details: Any = None) -> None:
        super().__init__(message, details)
        self.http_status = http_status


class TooManyConnectionsError(ApiError):
    """The job stream already holds ``websocket.max_connections`` connections."""

    code, http_status, retryable, retry_after = "TOO_MANY_CONNECTIONS", 503, True, 10


class RateLimitedError(ApiError):
    code, http_status, retryable = "RATE_LIMITED", 429, True

    def __init__(self, message: str, retry_after: int, details: Any = None) -> None:
        super().__init__(message, details)
        self.retry_after = max(1, int(retry_after))


class AdmissionError(ApiError):
    """The engine will not take a job now; the client should retry later."""

    retryable = True
    retry_after = 60


class QueueFullError(AdmissionError):
    code, http_status = "QUEUE_FULL", 429


class AdmissionFrozenError(AdmissionError):
    code, http_status = "ADMISSION_FROZEN", 409


class PackageManagerError(ApiError):
    code, http_status, retryable = "PKG_MANAGER_ERROR", 500, True


class SystemInfoError(ApiError):
    code, http_status = "SYSTEM_INFO_ERROR", 500


class ServiceStatusError(ApiError):
    code, http_status = "SERVICE_STATUS_ERROR", 500


class CommandError(LpaError):
    """A package-manager command did not succeed; ``result`` holds how it ended.

    Its message and output are for the log and for job details, never for an API error: an
    :class:`ApiError` raised because of one names only the kind of failure and is raised
    ``from`` it, and the API logs :meth:`log_fields` with the request id.
    """

    def __init__(self, message: str, result: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.result = result

    def log_fields(self, stderr_lines: int = 5) -> dict[str, Any]:
        """The command line, how it ended and the end of its stderr, for a log event."""
        result = self.result
        stderr = (getattr(result, "stderr", "") or "").strip().splitlines()
        return {
            "argv": list(getattr(result, "argv", ()) or ()),
            "exit_code": getattr(result, "exit_code", None),
            "stderr": stderr[-stderr_lines:],
        }


class CommandFailedError(CommandError):
    """The command exited with a status it was not allowed to."""


class CommandTimedOutError(CommandError):
    """The command outlived its deadline and was terminated (SIGTERM, then SIGKILL)."""


class CommandNotFoundError(CommandError):
    """The command could not be started (missing executable or no permission)."""


class JobCancelledError(LpaError):
    """The job was cancelled while it ran; its commands were terminated."""


class EventsGoneError(ApiError):
    """The job's events after the asked ``seq`` are no longer kept; ``details`` holds the job."""

    code, http_status = "EVENTS_EXPIRED", 410


class EventsAheadError(ConflictError):
    """Asked for events after a ``seq`` the job never reached: the agent lost or renumbered
    events (a restart, a restored backup).  ``details``: ``last_seq``, ``incarnation``, ``job``."""

    code = "EVENTS_AHEAD"


class DuplicateHeadersError(ApiError):
    """A request repeated Content-Type, Host or Authorization (as the original refused)."""

    code, http_status = "DUPLICATE_HEADERS", 400
