"""OpenAI-style errors, shared by the chat endpoint and the API server (no torch here: the API server
runs from the operator image)."""

from __future__ import annotations

import sys

from aiohttp import web


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind
        self.headers = headers  # e.g. Retry-After, which the openai client honours


def error_response(status: int, message: str, kind: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None):
    return web.json_response({"error": {"message": message, "type": kind, "param": param, "code": code}}, status=status,
                             headers=headers)


def middleware(failure: str):
    """OpenAI-shaped errors for a whole app: RequestError as raised, aiohttp's own (404, 405, 413...) in
    the same shape, anything else a 500 naming only the exception's type (its text may quote user data)."""

    @web.middleware
    async def openai_errors(request: web.Request, handler):
        try:
            return await handler(request)
        except RequestError as e:
            return error_response(e.status, str(e), e.kind, e.param, e.code, e.headers)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return error_response(e.status, e.reason, "invalid_request_error" if e.status < 500 else "server_error")
        except Exception as e:
            print(f"{request.method} {request.path} failed: {type(e).__name__}", file=sys.stderr, flush=True)
            return error_response(500, f"{failure} ({type(e).__name__})", "server_error")

    return openai_errors
