"""The HTTP server's error answers, in OpenAI's shape (runtime/services/http.py, api.py, tools.py). Torch-free."""

from __future__ import annotations


class ApiError(Exception):
    """An OpenAI-shaped error answer (``headers``: extra response headers, e.g. Retry-After)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
