"""The org's audit trail, newest first."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import select

from services.api.deps import OrgViewer, SessionDep
from services.api.schemas import MAX_ROW_ID, AuditOut
from shared.db.models import AuditEntry
from shared.schemas import printable

router = APIRouter(prefix="/v1/orgs/{org}/audit", tags=["audit"])


@router.get("", response_model=list[AuditOut])
def audit_trail(
    access: OrgViewer,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    before: Annotated[
        int | None, Query(ge=1, le=MAX_ROW_ID, description="only entries older than this id, to page back")
    ] = None,
) -> list[AuditOut]:
    query = select(AuditEntry).where(AuditEntry.org_id == access.org_id)
    if before is not None:
        query = query.where(AuditEntry.id < before)
    rows = session.scalars(query.order_by(AuditEntry.id.desc()).limit(limit))
    # printable: an entry written before lone surrogates were refused (SQLite stored them) made every page holding
    # it answer 500, and the trail is append-only: such text is shown as its escape instead.
    return [
        AuditOut(
            id=row.id,
            actor=row.actor,
            action=row.action,
            target=printable(row.target),
            detail=printable(row.detail),
            at=row.at,
        )
        for row in rows
    ]
