"""The folders of versions being uploaded and not registered yet (CandidateFolder). An attempt records its
candidate's folder, fenced by its claim, before the first upload; registering the version, or removing the folder,
forgets it. A folder whose attempt no longer holds its run (its worker died, or the store failed the attempt's own
clean-up) is removed by the run's next attempt as it starts and by every worker's sweep; while the store does not
answer, the folder stays recorded for a later pass."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import ColumnElement, exists, false, or_, select
from sqlalchemy.orm import Session

from services.trainer import artifacts, runs
from services.trainer.runs import Attempt
from shared.db.models import CandidateFolder, TrainingRun
from shared.db.session import SessionFactory, session_scope
from shared.errors import TransientError
from shared.settings import Settings
from shared.storage import ObjectStore, open_object_store, premises_store

log = logging.getLogger(__name__)

# Folders one pass removes at most: a sweep runs in a worker's consumer, which waits for it.
SWEEP_LIMIT = 20


@dataclass(frozen=True)
class CandidateStores:
    """Where a worker can remove a candidate's files: the central store, and its own premises folder, which holds
    the held-out rows of the orgs it was started for (KILN_WORKER_ORGS) that keep their data at home."""

    central: ObjectStore
    premises: ObjectStore
    premises_orgs: frozenset[str]

    @classmethod
    def open(cls, settings: Settings) -> CandidateStores:
        return cls(open_object_store(settings), premises_store(settings), settings.worker_org_ids)

    def reachable(self) -> ColumnElement[bool]:
        """The folders this worker reaches whole: another org's premises folder is on another machine."""
        on_these_premises = CandidateFolder.org_id.in_(sorted(self.premises_orgs)) if self.premises_orgs else false()
        return or_(CandidateFolder.holdout_on_premises.is_(False), on_these_premises)

    def holding(self, folder: CandidateFolder) -> Sequence[ObjectStore]:
        return (self.central, self.premises) if folder.holdout_on_premises else (self.central,)


def record(sessions: SessionFactory, attempt: Attempt, prefix: str) -> None:
    """Record the candidate's folder before anything is uploaded to it. Raises LeaseLost, recording nothing, when
    the attempt no longer holds its run: it must upload nothing either."""
    with session_scope(sessions) as session:
        runs.check_held(session, attempt)
        session.add(
            CandidateFolder(
                prefix=prefix,
                run_id=attempt.run_id,
                org_id=attempt.org_id,
                claim_token=attempt.token,
                holdout_on_premises=attempt.holdout_on_premises,
            )
        )


def remove(sessions: SessionFactory, prefix: str, stores: Sequence[ObjectStore]) -> None:
    """Remove a candidate's files, then forget its folder; a store that fails leaves it recorded for the sweep."""
    artifacts.remove_version(prefix, *stores)
    with session_scope(sessions) as session:
        runs.forget_candidate(session, prefix)


def remove_abandoned(sessions: SessionFactory, stores: CandidateStores, *, run_id: str | None = None) -> list[str]:
    """Remove the folders whose attempt no longer holds its run (of `run_id` alone, if given) and return them. Each
    is locked as it is taken (SKIP LOCKED), so one worker alone acts on it; the pass stops at the first the store
    cannot reach (an outage); a folder it refuses to remove stays recorded, and the pass goes on with the others."""
    removed: list[str] = []
    with session_scope(sessions) as session:
        query = select(CandidateFolder).where(_abandoned(session), stores.reachable())
        if run_id is not None:
            query = query.where(CandidateFolder.run_id == run_id)
        folders = session.scalars(
            query.order_by(CandidateFolder.created_at).limit(SWEEP_LIMIT).with_for_update(skip_locked=True)
        ).all()
        for folder in folders:
            try:
                artifacts.remove_version(folder.prefix, *stores.holding(folder))
            except TransientError:  # the store out of reach: the others would wait as long, for nothing
                log.warning("the files of unregistered %s could not be removed yet", folder.prefix, exc_info=True)
                break
            except Exception:  # this folder refused (a permission, a held object): it waits, the others go on
                log.warning("the store refused to remove unregistered %s", folder.prefix, exc_info=True)
                continue
            runs.forget_candidate(session, folder.prefix)
            removed.append(folder.prefix)
    return removed


def _abandoned(session: Session) -> ColumnElement[bool]:
    """No attempt holds the folder's run by the folder's token: ended, handed back, taken over, or its lease out
    (a lease that ran out is never renewed, so that attempt can register nothing)."""
    held = exists().where(
        TrainingRun.id == CandidateFolder.run_id,
        TrainingRun.claim_token == CandidateFolder.claim_token,
        TrainingRun.status == "running",
        runs.lease_live(session),
    )
    return ~held
