"""Errors as OpenAI answers them: every error a client can cause is a 4xx with the body
{"error": {"message", "type", "param", "code"}}.

APIError is what the server's code raises; install_error_handlers() makes an app answer it, FastAPI's JSON and
schema errors (400, with the offending field as `param`), Starlette's HTTP errors (404, 405, ...) and anything
unexpected (500, logged) in that body.
"""

from __future__ import annotations

import json
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qserve_lite.server.protocol import ErrorInfo, ErrorResponse

log = logging.getLogger("qserve_lite.server")

ERROR_RESPONSES = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 500, 503)}


class APIError(Exception):
    """An error answered as {"error": {...}} with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None, type_: str | None = None
) -> dict:
    e = APIError(status, message, param, code, type_)
    return ErrorResponse(
        error=ErrorInfo(message=e.message, type=e.type, param=e.param, code=e.code)
    ).model_dump()


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.status, e.message, e.param, e.code, e.type), status_code=e.status)


# ---- validation errors -> OpenAI errors ----

_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _param_of(loc) -> str | None:
    """'stop' / 'messages.0.content' from a pydantic location, without union-member tags."""
    parts = []
    for p in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(p, int) or (isinstance(p, str) and _IDENT.match(p) and p not in _TYPE_TAGS):
            parts.append(str(p))
    return ".".join(parts) or None


_EXPECTED = {  # pydantic's type errors, for values of the wrong JSON type (protocol.py's strict scalars)
    "int_type": "an integer", "float_type": "a number", "bool_type": "a boolean", "string_type": "a string",
}


def _json_type(value) -> str:
    """What a parsed JSON value is, in the words of a type error."""
    for kind, name in (
        (bool, "a boolean"), (int, "an integer"), (float, "a decimal number"), (str, "a string"),
        (list, "an array"), (dict, "an object"),
    ):
        if isinstance(value, kind):
            return name
    return "null" if value is None else type(value).__name__


def _message(e: dict) -> str:
    """pydantic's message, or for a value of the wrong JSON type: 'expected an integer, got a boolean'."""
    expected = _EXPECTED.get(e.get("type"))
    if expected is not None and "input" in e:
        return f"expected {expected}, got {_json_type(e['input'])}"
    return e.get("msg", "invalid value")


def validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        e = errors[0]
        detail = (e.get("ctx") or {}).get("error", "")
        return APIError(
            400,
            f"the request body is not valid JSON: {detail} (at position {e['loc'][-1]})",
            code="invalid_json",
        )
    if any(tuple(e.get("loc", ())) == ("body",) for e in errors):
        return APIError(400, "the request body must be a JSON object (send Content-Type: application/json)")
    seen, parts = set(), []
    for e in errors:
        param = _param_of(e.get("loc", ()))
        text = f"{param}: {_message(e)}" if param else _message(e)
        if text not in seen:
            seen.add(text)
            parts.append(text)
    param = _param_of(errors[0].get("loc", ())) if errors else None
    return APIError(400, "; ".join(parts[:4]) or "invalid request", param=param)


def http_error(exc: StarletteHTTPException) -> APIError:
    """Starlette's own errors (unknown route, wrong method, unreadable body) as API errors."""
    message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    if exc.status_code == 400 and "parsing the body" in message:
        message = "the request body could not be read as JSON (is it valid UTF-8?)"
    return APIError(exc.status_code, message)


# ---- the app's exception handlers ----


async def _api_error(request: Request, exc: APIError):
    return error_response(exc)


async def _validation_error(request: Request, exc: RequestValidationError):
    return error_response(validation_error(exc))


async def _http_error(request: Request, exc: StarletteHTTPException):
    return error_response(http_error(exc))


async def _internal_error(request: Request, exc: Exception):
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(APIError(500, "internal server error (see the server log)"))


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error in OpenAI's body (module docstring)."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
