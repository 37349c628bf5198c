"""Org keys on the predictor: checked like the api does, remembered for a short while to keep the hot path free
of database round trips."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.exc import OperationalError, TimeoutError
from sqlalchemy.orm import Session

from services.predictor.outage import DatabaseOutage
from shared.errors import DatabaseUnavailable, InvalidKey, NotFound
from shared.keys import Principal, find_principal, principal_without_lookup

log = logging.getLogger(__name__)

MAX_ENTRIES = 10_000


class KeyCache:
    """Each token's last answer, for ttl_s. Tokens that name a key and tokens that name none are kept apart: the
    second kind is anyone's to make up, and a flood of them must not push out the keys of the org's callers.

    Through a database outage (services/predictor/outage.py) a key looked up before keeps its last answer."""

    def __init__(
        self,
        sessions: Callable[[], Session],
        admin_token: str,
        ttl_s: float,
        *,
        outage: DatabaseOutage,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        self.sessions = sessions
        self.admin_token = admin_token
        self.ttl_s = ttl_s
        self.outage = outage
        self.max_entries = max_entries
        self._keys: dict[str, tuple[float, Principal]] = {}
        self._refused: dict[str, float] = {}
        self._lock = threading.Lock()

    def cached(self, token: str) -> tuple[bool, Principal | None]:
        """(hit, principal) without touching the database."""
        now = time.monotonic()
        known = self._keys.get(token)
        if known is not None:
            return (True, known[1]) if known[0] >= now else (False, None)
        refused_until = self._refused.get(token)
        return (refused_until is not None and refused_until >= now), None

    def lookup(self, token: str) -> Principal | None:
        """The key's principal, from the database. While it cannot answer, a token looked up before keeps its last
        answer, for another ttl_s: the models loaded go on serving their callers through an outage, at the cost of
        a key revoked just before it working until the database is back. A token never looked up gets 503."""
        answered, principal = principal_without_lookup(token, self.admin_token)
        if answered:
            self._remember(token, principal)
            return principal
        try:
            with self.outage.attempt(), self.sessions() as session:
                principal = find_principal(session, token=token, admin_token=self.admin_token)
        except DatabaseUnavailable:
            return self._last_answer(token)
        except (OperationalError, TimeoutError):
            log.warning("the database cannot check keys; they keep their last answers", exc_info=True)
            return self._last_answer(token)
        self._remember(token, principal)
        return principal

    def _last_answer(self, token: str) -> Principal | None:
        known = self._keys.get(token)
        if known is None and token not in self._refused:
            raise DatabaseUnavailable()
        principal = None if known is None else known[1]
        self._remember(token, principal)
        return principal

    def _remember(self, token: str, principal: Principal | None) -> None:
        until = time.monotonic() + self.ttl_s
        with self._lock:
            if principal is None:
                self._keys.pop(token, None)
                _bounded(self._refused, self.max_entries)[token] = until
            else:
                self._refused.pop(token, None)
                _bounded(self._keys, self.max_entries)[token] = (until, principal)


def _bounded(entries: dict[str, Any], max_entries: int) -> dict[str, Any]:
    """`entries`, emptied when full: a flood of tokens cannot grow it without end."""
    if len(entries) >= max_entries:
        entries.clear()
    return entries


def check_org(principal: Principal | None, org_id: str) -> None:
    if principal is None:
        raise InvalidKey()
    if not principal.is_platform_admin and principal.org_id != org_id:
        raise NotFound(f"model {org_id!r} not found")
