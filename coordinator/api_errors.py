"""The one error type the HTTP API answers with (OpenAI's error object)."""

from __future__ import annotations


class APIError(Exception):
    """An error answered as an OpenAI-style JSON object with an HTTP status."""
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
