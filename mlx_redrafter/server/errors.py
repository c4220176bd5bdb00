"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx status.

One exception type carries them from wherever a request is found wrong (the handler, the
worker) to the response; the official clients read `message` and map the status to their own
exception classes (400 BadRequestError, 401 AuthenticationError, 404 NotFoundError, ...).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    503: "server_unavailable",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    kind = STATUS_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def from_validation(error: ValidationError) -> APIError:
    """The first problem pydantic found, with its field path: `messages.0.role: ...`."""
    first = error.errors(include_url=False)[0]
    where = ".".join(str(part) for part in first.get("loc", ()))
    message = first.get("msg", "invalid request")
    message = message.removeprefix("Value error, ")
    if first.get("type") == "missing":
        message = "field required"
    return APIError(400, f"{where}: {message}" if where else message, param=where or None)
