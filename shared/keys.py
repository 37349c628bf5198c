"""API keys: random secrets shown once, stored as sha256 digests and looked up by digest."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.db.models import ApiKey
from shared.errors import Unauthorized

ROLES = ("admin", "trainer", "viewer")
KEY_PREFIX = "kiln_"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the platform admin (org_id None) or a key of one org with one role."""

    key_id: str
    org_id: str | None
    role: str

    @property
    def is_platform_admin(self) -> bool:
        return self.org_id is None


PLATFORM_ADMIN = Principal(key_id="admin-token", org_id=None, role="admin")


def new_key() -> str:
    # 256 random bits: an unsalted digest is enough, there is nothing to guess from it.
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key_id() -> str:
    return "key_" + secrets.token_hex(8)


def bearer_token(authorization: str | None) -> str:
    """The key of an `Authorization: Bearer <key>` header; Unauthorized for any other header, or none."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("send `Authorization: Bearer <key>`", field="Authorization")
    return token.strip()


def is_metrics_token(token: str, metrics_token: str) -> bool:
    """Whether `token` is KILN_METRICS_TOKEN, which reads /metrics and nothing else (never when it is unset)."""
    return bool(metrics_token) and hmac.compare_digest(token.encode(), metrics_token.encode())


def principal_without_lookup(token: str, admin_token: str) -> tuple[bool, Principal | None]:
    """(answered, principal) for a token whose answer needs no read of the keys table: the admin token, and a token
    that has no key's shape (None); (False, None) for any other."""
    if admin_token and hmac.compare_digest(token.encode(), admin_token.encode()):
        return True, PLATFORM_ADMIN
    return not token.startswith(KEY_PREFIX), None


def find_principal(session: Session, *, token: str, admin_token: str) -> Principal | None:
    """The principal a bearer token stands for, or None when it is no live key."""
    answered, principal = principal_without_lookup(token, admin_token)
    if answered:
        return principal
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(token), ApiKey.revoked_at.is_(None)))
    if row is None:
        return None
    return Principal(key_id=row.id, org_id=row.org_id, role=row.role)
