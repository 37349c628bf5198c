"""The one place where errors become HTTP responses, for both HTTP services: the api and the predictor."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic.alias_generators import to_camel
from sqlalchemy import exc
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from shared.errors import DatabaseUnavailable, InvalidInput, InvalidKey, KilnError, Unauthorized
from shared.schemas import NUL, printable

log = logging.getLogger(__name__)

REQUEST_PARTS = {"body", "query", "path", "header", "form", "cookie"}
# nginx's status for a request whose client closed the connection first: no HTTP status says it, and no client
# receives it; access logs show it.
CLIENT_CLOSED_REQUEST = 499
# The challenge every 401 carries (RFC 9110 §15.5.2), in the Bearer scheme of RFC 6750 §3: it names the scheme a
# client should answer with, and says when the key it sent is at fault rather than missing.
CHALLENGE = 'Bearer realm="kiln"'
INVALID_KEY_CHALLENGE = CHALLENGE + ', error="invalid_token"'


def refuse_nul_in_url(request: Request) -> None:
    """PostgreSQL cannot compare text holding a NUL character: an id with one, in the path or the query (a list's
    `before`), failed its lookup with a 500. Refused with a 422 naming the parameter."""
    parameters = [(to_camel(name), value) for name, value in request.path_params.items()]  # as the docs name them
    if b"%00" in request.scope.get("query_string", b""):  # a NUL reaches a query only so: parsed only then
        parameters += request.query_params.multi_items()
    for name, value in parameters:
        if NUL in str(value):
            raise InvalidInput(f"{name} must not contain the NUL character {NUL!r}", field=name)


class BodyTooLarge(HTTPException):
    """A request body found over its limit while FastAPI reads it: an HTTPException, which FastAPI passes on to the
    handlers here, where any other error raised while it reads a body becomes its own 400."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(413, detail=message)
        self.field = field


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(KilnError, _kiln_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(exc.OperationalError, _database_unavailable)
    # No pooled connection came free in time: the database is too slow to answer, which a client should wait out too.
    app.add_exception_handler(exc.TimeoutError, _database_unavailable)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(Exception, _unexpected_error)


async def _kiln_error(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, KilnError)
    return _answer(error.to_payload(), status_code=int(error.status), headers=_headers_of(error))


def _headers_of(error: KilnError) -> dict[str, str]:
    if isinstance(error, Unauthorized):
        challenge = INVALID_KEY_CHALLENGE if isinstance(error, InvalidKey) else CHALLENGE
        return {**error.headers, "WWW-Authenticate": challenge}
    return error.headers


async def _http_error(_request: Request, error: Exception) -> JSONResponse:
    """Starlette's and FastAPI's own 4xx: an unknown route or method, a body they could not parse."""
    assert isinstance(error, HTTPException)
    payload: dict[str, Any] = {"error": str(error.detail), "status": error.status_code}
    if isinstance(error, BodyTooLarge):
        payload["field"] = error.field
    elif error.status_code == 400:
        # The only 400 they raise: a body they could not read (not UTF-8, nested past the JSON parser's limit, a
        # broken multipart form). Kiln's own 400s are KilnErrors, which name their field themselves.
        payload["field"] = "body"
    return _answer(payload, status_code=error.status_code, headers=error.headers)


async def _validation_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    if any(item.get("type") == "json_invalid" for item in error.errors()):
        return _unparsable_body()
    problems = [_describe(item) for item in error.errors()]
    if _not_sent_as_json(request, error):
        problems[0]["message"] = f"body: {_NOT_JSON} (it came as {request.headers.get('content-type') or 'no type'})"
    first = problems[0]
    payload = {"error": first["message"], "field": first["field"], "status": 422, "problems": problems}
    return _answer(payload, status_code=422)


_NOT_JSON = "send a JSON object with the header Content-Type: application/json"


def _not_sent_as_json(request: Request, error: RequestValidationError) -> bool:
    """FastAPI parses a body as JSON only when it says it is (curl's `-d` alone sends it as a form): the schema then
    meets text where it wants an object, and says only that, which does not tell the client what to change."""
    first = error.errors()[0]
    sent = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return tuple(first.get("loc", ())) == ("body",) and sent != "application/json" and not sent.endswith("+json")


def _unparsable_body() -> JSONResponse:
    """Broken JSON syntax is a body that cannot be parsed at all, as one not UTF-8 is: no field of it can be named,
    so a 400 naming `body`, as the predictor answers the same body, not a 422 of the schema."""
    payload = {"error": "the request body is not valid JSON", "field": "body", "status": 400}
    return _answer(payload, status_code=400)


async def _database_unavailable(request: Request, error: Exception) -> JSONResponse:
    log.error("database unavailable on %s %s", request.method, request.url.path, exc_info=error)
    unavailable = DatabaseUnavailable()
    return JSONResponse(unavailable.to_payload(), status_code=int(unavailable.status), headers=unavailable.headers)


async def _client_gone(request: Request, _error: Exception) -> Response:
    """The client hung up while its body was read: nothing failed here, and the answer has no one to go to."""
    log.info("client hung up during %s %s before its body had come", request.method, request.url.path)
    return Response(status_code=CLIENT_CLOSED_REQUEST)


async def _unexpected_error(request: Request, error: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=error)
    return JSONResponse({"error": "internal error", "status": 500}, status_code=500)


def _answer(payload: dict[str, Any], *, status_code: int, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """The error as JSON. A message may quote the input, and a lone surrogate in it (a \\ud800 escape without its
    pair) has no UTF-8 bytes: rendering it failed, and the client got a 500 instead of the refusal."""
    return JSONResponse(printable(payload), status_code=status_code, headers=headers)


def _describe(item: Any) -> dict[str, str]:
    """One pydantic error as `{field, message}` with the field spelled as the client sent it."""
    location = [str(part) for part in item.get("loc", ()) if str(part) not in REQUEST_PARTS]
    field = ".".join(location) or "body"
    kind = item.get("type", "")
    if kind == "extra_forbidden":
        noun = "hyperparameter" if location[:1] == ["hyperparameters"] else "field"
        message = f"unknown {noun} {location[-1]!r}"
    elif kind == "missing":
        message = f"{field} is required"
    elif _text_where_a_file_goes(item):
        message = f"{field} must be a file part of a multipart form (curl -F {field}=@path)"
    else:
        message = f"{field}: {str(item.get('msg', 'invalid value')).removeprefix('Value error, ')}"
    return {"field": field, "message": message}


def _text_where_a_file_goes(item: Any) -> bool:
    """A file field sent as text (`curl -F 'file=ts,x'`, or a urlencoded form): FastAPI says only `Expected
    UploadFile, received: <class 'str'>`, which does not tell the client what to send instead."""
    return isinstance(item.get("input"), str) and "Expected UploadFile" in str(item.get("msg", ""))
