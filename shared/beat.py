"""The base of Kiln's Celery beat schedulers: nothing static, every tick reads the database and fires what is due.

Subclasses say what firing means (services/trainer/beat.py: trainings; services/sync/beat.py: sync jobs and
retention purges). A failing tick is logged and tried again at the next one; beat itself never stops. Both beats
skip a fire time missed by more than GRACE (no beat was running), the same way.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from celery.beat import Scheduler
from sqlalchemy.orm import Session

from shared.audit import record_change
from shared.db.session import make_engine, make_session_factory
from shared.settings import Settings, build_settings

log = logging.getLogger(__name__)

GRACE = timedelta(minutes=10)


def missed(
    session: Session, *, org_id: str, due_at: datetime, now: datetime, action: str, detail: dict[str, Any] | None = None
) -> bool:
    """Whether the fire due at `due_at` was missed by more than GRACE, no beat running then. Such a fire is skipped,
    not made up (a beat back after a day does not start a day's work at once); the skip is logged and audited as
    `action`."""
    if now - due_at <= GRACE:
        return False
    log.warning("org %s: skipped the fire due at %s (%s), missed while no beat ran", org_id, due_at, action)
    record_change(session, org_id=org_id, actor="schedule", action=action, target=due_at.isoformat(), detail=detail)
    return True


class DatabaseBeat(Scheduler):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.settings: Settings = build_settings()
        self.engine = make_engine(self.settings.resolved_database_url)
        self.sessions = make_session_factory(self.engine)
        super().__init__(*args, **kwargs)

    def setup_schedule(self) -> None:
        """Nothing static: every tick reads the database."""

    def tick(self, *_args: Any, **_kwargs: Any) -> float:
        try:
            self.fire_due()
        except Exception:
            log.warning("%s: nothing fired this tick; trying again", type(self).__name__, exc_info=True)
        return self.settings.beat_tick_s

    def fire_due(self) -> None:
        """Fire what is due now; each beat says what that means."""
        raise NotImplementedError

    def close(self) -> None:
        super().close()
        self.engine.dispose()
