"""Every failure at the HTTP edge as an OpenAI error body `{"error": {message, type, param, code}}`, plus the
request-body size limit. These handlers never put request content or exception text in a response or a log line.
"""

from __future__ import annotations

import contextlib
import logging
import typing
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic_core.core_schema import ErrorType
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

# pydantic's own error types; any other type comes from server.protocol's validators and is already an OpenAI code.
_PYDANTIC_ERROR_TYPES = frozenset(typing.get_args(ErrorType))
# Locations FastAPI puts before a field's path.
_REQUEST_PARTS = ("body", "query", "path", "header", "cookie")


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object; also what a stream sends as its last event when generation fails mid-way."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class APIError(Exception):
    """An error the client should see as-is: raise it anywhere under a route."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def to_response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    # The common cases, with the type and code strings OpenAI's API returns in the same situations.

    @classmethod
    def invalid_request(cls, message: str, param: str | None = None, code: str | None = None) -> APIError:
        return cls(400, message, param=param, code=code)

    @classmethod
    def authentication(cls, message: str = "Invalid or missing API key.") -> APIError:
        return cls(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    @classmethod
    def permission_denied(cls, message: str) -> APIError:
        return cls(403, message, code="permission_denied")

    @classmethod
    def model_not_found(cls, model: str, available: str | None = None) -> APIError:
        listing = f" Available models: {available}." if available else ""
        return cls(404, f"The model '{model}' does not exist.{listing}", param="model", code="model_not_found")

    @classmethod
    def request_too_large(cls, max_body_bytes: int) -> APIError:
        return cls(413, f"The request body exceeds the limit of {max_body_bytes} bytes.", code="request_too_large")

    @classmethod
    def rate_limited(cls, message: str, retry_after_s: int) -> APIError:
        # OpenAI's type for request-rate limits is "requests"; the SDK waits for Retry-After before it retries.
        return cls(429, message, type="requests", code="rate_limit_exceeded",
                   headers={"Retry-After": str(retry_after_s)})

    @classmethod
    def service_unavailable(cls, message: str, retry_after_s: int | None = None) -> APIError:
        headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
        return cls(503, message, type="server_error", code="service_unavailable", headers=headers)

    @classmethod
    def server_error(cls, message: str = "The server had an error while processing your request.") -> APIError:
        return cls(500, message, type="server_error")


def install_error_handlers(app: FastAPI, max_body_bytes: int) -> None:
    """Answer every error the OpenAI way (APIError as raised, validation as 400, HTTP errors with their status,
    anything else as a logged 500) and refuse request bodies over `max_body_bytes` with 413."""
    app.add_exception_handler(APIError, _handle_api_error)
    app.add_exception_handler(RequestValidationError, _handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, _handle_http_exception)
    app.add_exception_handler(Exception, _handle_unexpected_error)
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=max_body_bytes)
    _document_errors(app)


# What every error response carries, for /openapi.json.
_ERROR_SCHEMA: dict[str, Any] = {
    "title": "ErrorResponse",
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}},
    }},
}


def _document_errors(app: FastAPI) -> None:
    """Make /openapi.json describe the errors these handlers send: an OpenAI error body under any 4xx or 5xx status,
    and no FastAPI 422 (invalid requests answer 400). Clients and schema-driven fuzzers rely on the description."""
    build_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build_openapi()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        components["ErrorResponse"] = _ERROR_SCHEMA
        error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                responses["4XX"] = {"description": "The request was refused", **error}
                responses["5XX"] = {"description": "The server could not answer", **error}
        return schema

    app.openapi = openapi


async def _handle_api_error(request: Request, exc: APIError) -> JSONResponse:
    return exc.to_response()


async def _handle_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    # OpenAI reports one problem at a time; the first is the first field in declaration order.
    first = exc.errors()[0]
    return validation_error_to_api_error(first, request.headers.get("content-type")).to_response()


def validation_error_to_api_error(error: Mapping[str, Any], content_type: str | None) -> APIError:
    """One pydantic/FastAPI error dict as a 400 naming the field (`messages[0].role`) in a sentence a person can act on.

    The offending value itself is never echoed: it may be long, or private.
    """
    kind = str(error["type"])
    context = error.get("ctx") or {}
    if kind == "json_invalid":
        reason = context.get("error", "invalid JSON")
        return APIError.invalid_request(f"We could not parse the JSON body of your request: {reason}.",
                                        code="invalid_json")
    param = context.get("param") if kind not in _PYDANTIC_ERROR_TYPES else None
    param = param or _format_param(error.get("loc", ()))
    if param is None:
        if kind == "missing":
            return APIError.invalid_request("The request body is empty: send a JSON object.", code="invalid_json")
        hint = "" if content_type and "json" in content_type else " with 'Content-Type: application/json'"
        return APIError.invalid_request(f"The request body must be a JSON object{hint}.", code="invalid_json")
    detail = str(error.get("msg", "invalid value"))
    if kind not in _PYDANTIC_ERROR_TYPES:
        message, code = f"Invalid '{param}': {detail}.", kind
    elif kind == "missing":
        message, code = f"Missing required parameter '{param}'.", "missing_required_parameter"
    elif kind.endswith("_type"):
        message, code = f"Invalid type for '{param}': {detail}.", "invalid_type"
    else:
        message, code = f"Invalid value for '{param}': {detail}.", "invalid_value"
    return APIError.invalid_request(message, param=param, code=code)


def _format_param(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """("body", "messages", 0, "role") -> "messages[0].role", OpenAI's notation; None for the body as a whole."""
    parts = list(loc)
    if parts and parts[0] in _REQUEST_PARTS:
        parts = parts[1:]
    param = ""
    for part in parts:
        param += f"[{part}]" if isinstance(part, int) else (f".{part}" if param else str(part))
    return param or None


async def _handle_http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    status = exc.status_code
    message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(status).phrase
    if isinstance(exc.__cause__, UnicodeDecodeError):  # FastAPI's generic "error parsing the body"
        message = "The request body is not valid UTF-8."
    elif status in (HTTPStatus.NOT_FOUND, HTTPStatus.METHOD_NOT_ALLOWED):
        message = f"{message} ({request.method} {request.url.path})"
    error_type = "server_error" if status >= 500 else "invalid_request_error"
    return APIError(status, message, type=error_type, headers=exc.headers).to_response()


async def _handle_unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # Method and path only: a body or query string may hold a user's prompt or a key.
    logger.error("unhandled %s on %s %s", type(exc).__name__, request.method, request.url.path, exc_info=exc)
    return APIError.server_error().to_response()


class _BodyTooLargeError(Exception):
    """Raised into the app from `receive` to stop it reading an over-limit body."""


class BodySizeLimitMiddleware:
    """413 for a request body over `max_body_bytes`: at once from Content-Length, without reading the body, or, for
    a chunked body, as soon as the bytes received pass the limit. Middleware it wraps sees only the limited body."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if _declared_length(scope) > self.max_body_bytes:
            await self._send_too_large(scope, receive, send)
            return
        guard = _BodyGuard(receive, send, self.max_body_bytes)
        # The app may let the aborted read escape rather than answer it itself; either way the 413 follows.
        with contextlib.suppress(_BodyTooLargeError):
            await self.app(scope, guard.receive, guard.send)
        if guard.exceeded and not guard.response_started:
            await self._send_too_large(scope, receive, send)

    async def _send_too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = APIError.request_too_large(self.max_body_bytes).to_response()
        # The rest of the body stays unread, so the connection cannot carry another request.
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


def _declared_length(scope: Scope) -> int:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0  # the server rejects a malformed length; counting the bytes still bounds the body
    return 0


class _BodyGuard:
    """Counts body bytes through `receive`; once past the limit, stops the read and suppresses the app's response
    (the app answers a failed read with an error of its own, which the 413 replaces)."""

    def __init__(self, receive: Receive, send: Send, max_body_bytes: int) -> None:
        self._receive = receive
        self._send = send
        self._max_body_bytes = max_body_bytes
        self._num_bytes = 0
        self.exceeded = False
        self.response_started = False

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request":
            self._num_bytes += len(message.get("body", b""))
            if self._num_bytes > self._max_body_bytes:
                self.exceeded = True
                raise _BodyTooLargeError
        return message

    async def send(self, message: Message) -> None:
        if self.exceeded:
            return
        if message["type"] == "http.response.start":
            self.response_started = True
        await self._send(message)
