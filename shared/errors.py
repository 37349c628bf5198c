"""Kiln's domain errors. Each carries the HTTP status it maps to; the services turn them into responses."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any


class KilnError(Exception):
    """Base of every error a client may see. `field` names the input at fault, when there is one."""

    status: HTTPStatus = HTTPStatus.INTERNAL_SERVER_ERROR

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        detail: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.field = field
        self.detail = detail or {}
        self.headers = headers or {}

    def to_payload(self) -> dict[str, Any]:
        payload: dict[str, Any] = {"error": self.message, "status": int(self.status)}
        if self.field is not None:
            payload["field"] = self.field
        payload.update(self.detail)
        return payload


class Stopped(KilnError):
    """Work was asked to stop (a training attempt cancelled, or its lease lost) while it waited on a data source or
    the object store: nothing it read counts."""


class InvalidInput(KilnError):
    status = HTTPStatus.UNPROCESSABLE_ENTITY


class BadRequest(KilnError):
    status = HTTPStatus.BAD_REQUEST


class PayloadTooLarge(KilnError):
    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class UnsupportedEncoding(KilnError):
    status = HTTPStatus.UNSUPPORTED_MEDIA_TYPE


class Unauthorized(KilnError):
    """No bearer key, or a header that is no `Authorization: Bearer <key>`."""

    status = HTTPStatus.UNAUTHORIZED


class InvalidKey(Unauthorized):
    """A bearer key was sent and is no live key: RFC 6750's `invalid_token`, which tells a client to get a new key
    rather than to send the one it has."""

    def __init__(self) -> None:
        super().__init__("the key is not valid", field="Authorization")


class Forbidden(KilnError):
    status = HTTPStatus.FORBIDDEN


class NotFound(KilnError):
    status = HTTPStatus.NOT_FOUND


class Conflict(KilnError):
    status = HTTPStatus.CONFLICT


class Gone(KilnError):
    """What was asked for existed and was erased on purpose: a model version's artifacts, say."""

    status = HTTPStatus.GONE


class NotOnPremises(Conflict):
    """Work that needs an org's premises (its folder of held-out rows) reached a worker not started for the org
    (KILN_WORKER_ORGS): it holds none of the org's files, so it can neither remove them nor say they are gone."""


class KeptOnPremises(Conflict):
    """An org keeping its data on its premises (dataResidency 'local'): no record of it goes up to the central store."""


class SourceBeingDeleted(Conflict):
    """A sync source whose deletion was asked for: it takes no new job, resync, URL or schedule change."""


class TooManyRequests(KilnError):
    status = HTTPStatus.TOO_MANY_REQUESTS


class Unavailable(KilnError):
    status = HTTPStatus.SERVICE_UNAVAILABLE


class DatabaseUnavailable(Unavailable):
    """The central database does not answer for now: what a request that needed it gets, told to try again soon."""

    def __init__(self) -> None:
        super().__init__("the database is unavailable, try again", headers={"Retry-After": "1"})


class ArtifactIntegrityError(KilnError):
    """A stored artifact is not what was recorded: its sha256 differs, or the model in it cannot serve."""

    status = HTTPStatus.INTERNAL_SERVER_ERROR


class TransientError(KilnError):
    """Something this needs is unreachable for now (object store, an org's database): trying again may work."""

    status = HTTPStatus.SERVICE_UNAVAILABLE


class SecretUnreadable(KilnError):
    """A stored secret (a password, a wrapped sync key, a backup) does not open: sealed under a platform key that is
    no longer configured, altered, or copied from where it belongs. The message says which, never the secret."""


class ConfigurationError(KilnError):
    """The process's KILN_* settings are not usable; the message names each variable, never its value."""


class MigrationError(KilnError):
    """The database could not be brought to the newest schema; the message says why, and nothing was applied."""
