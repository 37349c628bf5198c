"""How large a request body the api takes, enforced before the route reads it.

FastAPI reads and parses a body (JSON in memory, a multipart form spooled to disk) before any dependency runs,
authentication included: without a bound, anyone, with no key, could make the api hold any amount. A dataset upload
may be as large as KILN_MAX_UPLOAD_MB, but only as a multipart form: any other form is parsed whole in memory, so
an upload's route takes one only up to BODY_LIMIT. Every other body is a few kilobytes of JSON (a training config, a
source's tables), so one over BODY_LIMIT is refused. A body is refused with 413 from its Content-Length before a byte is
read, or, sent without one (chunked), as soon as the bytes read pass the limit.
"""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.http_errors import BodyTooLarge

BODY_LIMIT = 1024 * 1024
_UPLOAD = re.compile(r"^/v1/orgs/[^/]+/datasets/?$")


class BodyLimits:
    def __init__(self, app: ASGIApp, *, upload_limit: int) -> None:
        self.app = app
        self.upload_limit = upload_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, what = self._limit(scope)
        await self.app(scope, _limited(receive, limit, what, declared=_declared_length(scope)), send)

    def _limit(self, scope: Scope) -> tuple[int, str]:
        if _UPLOAD.match(scope["path"]) and _header(scope, b"content-type").lower().startswith(b"multipart/form-data"):
            return self.upload_limit, "file"
        return BODY_LIMIT, "body"


def _declared_length(scope: Scope) -> int:
    value = _header(scope, b"content-length")
    return int(value) if value.isdigit() else 0


def _header(scope: Scope, name: bytes) -> bytes:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return b""


def _limited(receive: Receive, limit: int, what: str, *, declared: int) -> Receive:
    """`receive`, raising BodyTooLarge (a 413) at its first call when the Content-Length is over `limit`, so no byte
    is read, or once the bytes read pass it (a body sent chunked). Raised where the route reads the body, the
    app's handler answers it (shared/http_errors.py)."""
    read = 0

    async def receive_limited() -> Message:
        nonlocal read
        if declared > limit:
            raise BodyTooLarge(_too_large(what, limit), field=what)
        message = await receive()
        if message["type"] == "http.request":
            read += len(message.get("body", b""))
            if read > limit:
                raise BodyTooLarge(_too_large(what, limit), field=what)
        return message

    return receive_limited


def _too_large(what: str, limit: int) -> str:
    return f"the request's {what} is over {limit // (1024 * 1024)} MB"
