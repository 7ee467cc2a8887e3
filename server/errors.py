"""Error codes of the wire protocol and the typed exceptions that carry them.

Both sides use these: the server raises them while handling a request and turns
them into ``{ok: false, error: {code, message}}``; the clients raise them when a
response says ``ok: false``. Catch ``RecserveError`` for all of them, or a
subclass (``BadRequest``, ``NotFound``, ...) for one code.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Every ``error.code`` the server sends (PROTOCOL.md says when)."""

    BAD_REQUEST = "bad_request"
    NOT_FOUND = "not_found"
    TOO_LARGE = "too_large"
    OVERLOADED = "overloaded"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    UNAUTHORIZED = "unauthorized"
    INTERNAL = "internal"


class RecserveError(Exception):
    """An error response (or a request the server would refuse): ``code`` and ``message``."""

    code: str = ErrorCode.INTERNAL

    def __init__(self, code: str | None = None, message: str = "") -> None:
        if code is not None:
            self.code = code
        self.message = message
        super().__init__(f"{self.code}: {message}")

    @staticmethod
    def from_code(code: object, message: object) -> RecserveError:
        """The subclass for ``code`` (plain RecserveError for a code this version lacks)."""
        text = message if isinstance(message, str) else repr(message)
        kind = _BY_CODE.get(code) if isinstance(code, str) else None
        if kind is None:
            return RecserveError(str(code), text)
        return kind(message=text)


class BadRequest(RecserveError):
    """The request is malformed or does not match the model's inputs."""

    code = ErrorCode.BAD_REQUEST


class NotFound(RecserveError):
    """Unknown model or model version."""

    code = ErrorCode.NOT_FOUND


class TooLarge(RecserveError):
    """A frame or a request is above a configured limit."""

    code = ErrorCode.TOO_LARGE


class Overloaded(RecserveError):
    """The server is at its admission limit; retry later or elsewhere."""

    code = ErrorCode.OVERLOADED


class DeadlineExceeded(RecserveError):
    """The request's deadline passed before it was scored."""

    code = ErrorCode.DEADLINE_EXCEEDED


class Unauthorized(RecserveError):
    """The op needs a valid admin token."""

    code = ErrorCode.UNAUTHORIZED


class InternalError(RecserveError):
    """The server failed while handling a valid request."""

    code = ErrorCode.INTERNAL


_BY_CODE: dict[str, type[RecserveError]] = {
    cls.code: cls
    for cls in (BadRequest, NotFound, TooLarge, Overloaded, DeadlineExceeded, Unauthorized,
                InternalError)
}
