"""The audit trail: one append-only row per change, written in the same transaction as the change itself."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from shared.db.models import AuditEntry


def record_change(
    session: Session, *, org_id: str, actor: str, action: str, target: str, detail: dict[str, Any] | None = None
) -> None:
    session.add(AuditEntry(org_id=org_id, actor=actor, action=action, target=target, detail=detail or {}))
