"""Org keys on the predictor: checked like the api does, remembered for a short while to keep the hot path free
of database round trips."""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy.exc import OperationalError, TimeoutError

from shared.db.session import SessionFactory
from shared.errors import NotFound, Unauthorized
from shared.keys import Principal, find_principal

log = logging.getLogger(__name__)

MAX_ENTRIES = 10_000


class KeyCache:
    def __init__(self, sessions: SessionFactory, admin_token: str, ttl_s: float) -> None:
        self.sessions = sessions
        self.admin_token = admin_token
        self.ttl_s = ttl_s
        self._entries: dict[str, tuple[float, Principal | None]] = {}
        self._lock = threading.Lock()

    def cached(self, token: str) -> tuple[bool, Principal | None]:
        """(hit, principal) without touching the database."""
        entry = self._entries.get(token)
        if entry is None or entry[0] < time.monotonic():
            return False, None
        return True, entry[1]

    def lookup(self, token: str) -> Principal | None:
        """The key's principal, from the database. While it cannot answer, a key looked up before keeps its last
        answer, for another ttl_s before the next try: the models loaded go on serving their callers through an
        outage, at the cost of a key revoked just before it working until the database is back."""
        try:
            with self.sessions() as session:
                principal = find_principal(session, token=token, admin_token=self.admin_token)
        except (OperationalError, TimeoutError):
            known = self._entries.get(token)
            if known is None:
                raise
            log.warning("the database cannot check a key; it keeps its last answer for %s s", self.ttl_s)
            principal = known[1]
        with self._lock:
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.clear()  # bounded: a flood of made-up keys cannot grow it without end
            self._entries[token] = (time.monotonic() + self.ttl_s, principal)
        return principal


def check_org(principal: Principal | None, org_id: str) -> None:
    if principal is None:
        raise Unauthorized("the key is not valid", field="Authorization")
    if not principal.is_platform_admin and principal.org_id != org_id:
        raise NotFound(f"model {org_id!r} not found")
