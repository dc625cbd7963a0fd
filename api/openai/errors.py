"""OpenAI's error shape on every route of the OpenAI router: `{"error": {message, type, param,
code}}`; bad input is a 400 (as with OpenAI), a 429 keeps its Retry-After.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from api.protocol import refusals

# --- errors: OpenAI's shape on every route of this router -----------------------------------------


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class OpenAIError(Exception):
    """A refusal to answer as `{"error": ...}` with this status."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers  # Retry-After, for a 429


_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}
_CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded"}


def _error_type(status: int) -> str:
    return _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    info = ErrorInfo(message=message, type=_error_type(status), param=param, code=code or _CODES.get(status))
    return JSONResponse(ErrorResponse(error=info).model_dump(), status_code=status, headers=headers)


def _param(loc: Sequence[Any], renames: dict[str, str] | None = None) -> str | None:
    """("body", "messages", 0, "role") → "messages.0.role"; the request's own names for a JobSpec's."""
    parts = [str(p) for p in loc if p != "body"]
    if parts and renames:
        parts[0] = renames.get(parts[0], parts[0])
    return ".".join(parts) or None


def validation_error(errors: Sequence[Any], renames: dict[str, str] | None = None) -> OpenAIError:
    """Pydantic's errors (never echoing the input: it may be huge or not encodable) → one 400."""
    params = [_param(e.get("loc", ()), renames) for e in errors]
    message = "; ".join(
        f"{p}: {e.get('msg', '')}" if p else str(e.get("msg", ""))
        for p, e in zip(params, errors, strict=True)
    )
    return OpenAIError(400, message or "invalid request", params[0] if params else None)


def from_http(exc: HTTPException) -> JSONResponse:
    """The shared intake's and the auth dependency's refusals. Its 422s (over a limit, over the
    context) are bad input here: 400, as OpenAI and vLLM answer them."""
    status = 400 if exc.status_code == 422 else exc.status_code
    detail = exc.detail
    if isinstance(detail, list) and detail and all(isinstance(d, dict) for d in detail):
        e = validation_error(detail)
        return error_response(status, e.message, e.param, headers=exc.headers)
    return error_response(status, str(detail), headers=exc.headers)


class OpenAIRoute(APIRoute):
    """Answers every failure of its route (auth, validation, intake) in OpenAI's error format,
    leaving the app's handlers, and so every other route, as they are."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except OpenAIError as e:
                return error_response(e.status, e.message, e.param, e.code, e.headers)
            except RequestValidationError as e:
                v = validation_error(e.errors())
                return error_response(v.status, v.message, v.param)
            except HTTPException as e:
                return from_http(e)

        return route


ERRORS: dict[int | str, dict[str, Any]] = {
    **refusals(413),  # BodyGuard answers before the route: FastAPI's shape
    **{
        s: {"model": ErrorResponse, "description": d}
        for s, d in [
            (400, "Bad input, or an option this server does not support."),
            (401, "No or a bad API key."),
            (404, "Another model than the one served."),
            (409, "The Idempotency-Key was used with another body."),
            (429, "Rate limit or backlog full; see Retry-After."),
            (503, "The job queue is unavailable; try again."),
        ]
    },
}
