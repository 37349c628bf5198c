"""Org keys on the predictor: checked like the api does, remembered for a short while to keep the hot path free
of database round trips."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from sqlalchemy.exc import OperationalError, TimeoutError

from shared.db.session import SessionFactory
from shared.errors import NotFound, Unauthorized
from shared.keys import Principal, find_principal

log = logging.getLogger(__name__)

MAX_ENTRIES = 10_000


class KeyCache:
    """Each token's last answer, for ttl_s. Tokens that name a key and tokens that name none are kept apart: the
    second kind is anyone's to make up, and a flood of them must not push out the keys of the org's callers."""

    def __init__(
        self, sessions: SessionFactory, admin_token: str, ttl_s: float, *, max_entries: int = MAX_ENTRIES
    ) -> None:
        self.sessions = sessions
        self.admin_token = admin_token
        self.ttl_s = ttl_s
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
        answer, for another ttl_s before the next try: the models loaded go on serving their callers through an
        outage, at the cost of a key revoked just before it working until the database is back."""
        try:
            with self.sessions() as session:
                principal = find_principal(session, token=token, admin_token=self.admin_token)
        except (OperationalError, TimeoutError):
            if token not in self._keys and token not in self._refused:
                raise
            log.warning("the database cannot check a key; it keeps its last answer for %s s", self.ttl_s)
            known = self._keys.get(token)
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
        raise Unauthorized("the key is not valid", field="Authorization")
    if not principal.is_platform_admin and principal.org_id != org_id:
        raise NotFound(f"model {org_id!r} not found")
