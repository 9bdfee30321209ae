"""OpenAI-style errors, shared by the chat endpoint and the API server (no torch here: the API server
runs from the operator image)."""

from __future__ import annotations

from aiohttp import web


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind


def error_response(status: int, message: str, kind: str, param: str | None = None, code: str | None = None):
    return web.json_response({"error": {"message": message, "type": kind, "param": param, "code": code}}, status=status)
