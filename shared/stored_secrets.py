"""The secrets Kiln stores in its database under the platform key, each bound to what it belongs to; which key each
is under (`kiln secrets status`) and moving them under the current one (`kiln secrets rewrap`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import InstrumentedAttribute, Session

from shared.audit import record_change
from shared.crypto import SecretBox, token_key_id
from shared.db.models import Base, DataSource, SyncKey, SyncSource
from shared.db.session import SessionFactory, session_scope
from shared.errors import SecretUnreadable

# What `kiln secrets status` counts a secret or backup under when it names no key: sealed before tokens did.
OLD_FORMAT = "old format"
REWRAPPED_ACTION = "secret.rewrapped"


def datasource_context(org_id: str) -> str:
    return f"datasource:{org_id}"


def sync_source_context(source_id: str) -> str:
    return f"sync-source:{source_id}"


def sync_key_context(org_id: str, key_id: str) -> str:
    return f"sync-key:{org_id}:{key_id}"


@dataclass(frozen=True)
class SecretKind:
    """One column of stored secrets: its rows, what each is bound to, and whose it is."""

    name: str
    model: type[Base]
    row_id: InstrumentedAttribute[str]
    column: InstrumentedAttribute[str | None]
    context: Callable[[Any], str]
    org_id: Callable[[Any], str]
    target: Callable[[Any], str]


KINDS = (
    SecretKind(
        name="datasource passwords",
        model=DataSource,
        row_id=DataSource.org_id,
        column=DataSource.password_encrypted,
        context=lambda row: datasource_context(row.org_id),
        org_id=lambda row: row.org_id,
        target=lambda row: "datasource",
    ),
    SecretKind(
        name="sync-source passwords",
        model=SyncSource,
        row_id=SyncSource.id,
        column=SyncSource.password_encrypted,
        context=lambda row: sync_source_context(row.id),
        org_id=lambda row: row.org_id,
        target=lambda row: row.id,
    ),
    SecretKind(
        name="sync envelope keys",
        model=SyncKey,
        row_id=SyncKey.id,
        column=SyncKey.wrapped,
        context=lambda row: sync_key_context(row.org_id, row.id),
        org_id=lambda row: row.org_id,
        target=lambda row: row.id,
    ),
)


def sealed_under(token: str) -> str:
    """The key id a stored secret names, or OLD_FORMAT."""
    return token_key_id(token) or OLD_FORMAT


def count_by_key(sessions: SessionFactory) -> dict[str, Counter[str]]:
    """Per kind, how many stored secrets each key id (or OLD_FORMAT) holds. Nothing is decrypted."""
    with session_scope(sessions) as session:
        return {kind.name: Counter(sealed_under(token) for token in session.scalars(_stored(kind))) for kind in KINDS}


@dataclass
class Rewrapped:
    """What a rewrap did to one kind: secrets moved under the current key, those already there, and why each of
    the others could not be opened."""

    moved: int = 0
    current: int = 0
    unreadable: list[str] = field(default_factory=list)


def rewrap_stored_secrets(sessions: SessionFactory, box: SecretBox, *, actor: str) -> dict[str, Rewrapped]:
    """Re-encrypt under the current key every stored secret that is not under it (a retired key, or the old
    format). Each secret goes in a transaction of its own, with its audit row: one row lock at a time, so a rewrap
    never deadlocks with a sync job holding its org's key rows, and a secret is either as it was or rewrapped.
    Running it again finds nothing to do."""
    return {kind.name: _rewrap_kind(sessions, box, kind, actor=actor) for kind in KINDS}


def _rewrap_kind(sessions: SessionFactory, box: SecretBox, kind: SecretKind, *, actor: str) -> Rewrapped:
    done = Rewrapped()
    with session_scope(sessions) as session:
        ids = session.execute(_stored(kind, kind.row_id)).all()
    for row_id, token in ids:
        if box.is_current(token):
            done.current += 1
            continue
        try:
            moved = _rewrap_one(sessions, box, kind, row_id, actor=actor)
        except SecretUnreadable as error:
            done.unreadable.append(error.message)
            continue
        done.moved += int(moved)
        done.current += int(not moved)
    return done


def _rewrap_one(sessions: SessionFactory, box: SecretBox, kind: SecretKind, row_id: str, *, actor: str) -> bool:
    """Rewrap one secret, read again under its row's lock (the api or a rotation may have changed it since it was
    listed); False when it is under the current key by then, or gone."""
    with session_scope(sessions) as session:
        row = session.get(kind.model, row_id, with_for_update=True)
        token = None if row is None else getattr(row, kind.column.key)
        if token is None or box.is_current(token):
            return False
        context = kind.context(row)
        setattr(row, kind.column.key, box.encrypt(box.decrypt(token, context=context), context=context))
        _audit(session, kind, row, actor=actor, was=sealed_under(token), now=box.current_id)
    return True


def _audit(session: Session, kind: SecretKind, row: Any, *, actor: str, was: str, now: str) -> None:
    detail = {"kind": kind.name, "from": was, "to": now}
    record_change(
        session, org_id=kind.org_id(row), actor=actor, action=REWRAPPED_ACTION, target=kind.target(row), detail=detail
    )


def _stored(kind: SecretKind, *also: Any) -> Any:
    """The kind's stored secrets (a tombstone's or a destroyed key's are gone), with any columns `also` named."""
    return select(*also, kind.column).where(kind.column.is_not(None))
