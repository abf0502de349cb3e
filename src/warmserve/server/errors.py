"""The server's one error type: an OpenAI-style error object with its HTTP status."""

from __future__ import annotations


class APIError(Exception):
    """Answered as `{"error": {"message", "type", "param", "code"}}` with `status`, and a
    Retry-After header where `retry_after_s` is set."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None,
                 retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = (
            status, message, kind, code, param)
        self.retry_after_s = retry_after_s
