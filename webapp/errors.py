"""Domain errors: services raise these, one handler turns them into JSON or a page."""

from __future__ import annotations


class AppError(Exception):
    """Base of the errors a user can meet; each has a status, a code and a plain message."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.message = message
        self.details = details


class ValidationError(AppError):
    status = 422
    code = "validation_error"


class NotFoundError(AppError):
    status = 404
    code = "not_found"


class TaskNotFoundError(NotFoundError):
    def __init__(self, task_id: int | str):
        super().__init__(f"Task {task_id} does not exist or is not yours.")


class ConflictError(AppError):
    status = 409
    code = "conflict"


class AuthError(AppError):
    status = 401
    code = "unauthorized"


class ForbiddenError(AppError):
    status = 403
    code = "forbidden"


class RateLimitedError(AppError):
    """Too many requests: the answer carries Retry-After, in whole seconds."""

    status = 429
    code = "rate_limited"

    def __init__(self, message: str, retry_after: int, details: dict | None = None):
        super().__init__(message, details)
        self.retry_after = max(1, int(retry_after))


class BudgetExceededError(AppError):
    """The work would not fit in what is left of its owner's monthly budget."""

    status = 402
    code = "budget_exceeded"


class PayloadTooLargeError(AppError):
    """An upload over a limit of its own (a file over FILE_MAX_BYTES)."""

    status = 413
    code = "payload_too_large"
