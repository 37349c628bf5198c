"""Where the premises half of a version's erasure goes: the org's premises queue, which only workers started for
the org (KILN_WORKER_ORGS) take, whatever its residency is now; a central worker handed it (a message an older api
queued on the org's training queue) sends it on instead of confirming anything."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from deploy.local import ai4i
from services.trainer import runs
from services.trainer.context import WorkerContext
from services.trainer.erasure import erase_here_or_forward
from shared.db.models import TrainingRun
from shared.db.session import SessionFactory, make_session_factory, session_scope
from shared.layout import HOLDOUT_FILE, model_prefix
from shared.org_queues import OrgQueues, PremisesQueues, TrainQueues
from shared.settings import Settings
from shared.storage import ObjectStore
from tests.integration.conftest import OrgKeys, submit, upload_table
from tests.integration.model_versions_support import (
    audit_of,
    erase,
    premises_version,
    queued_for_premises,
    set_residency,
)


def queues_step(kind: type[OrgQueues], engine: Engine, *, orgs: frozenset[str] = frozenset()) -> OrgQueues:
    """The consumer step of a worker started for `orgs` (KILN_WORKER_ORGS), or for none, without the worker."""
    step = kind(None)
    step.engine, step.only_orgs = engine, orgs
    return step


def test_an_org_moved_to_central_has_its_premises_queue_taken_by_its_own_workers_only(
    api: TestClient, org: OrgKeys, engine: Engine
) -> None:
    set_residency(api, org, "local")
    set_residency(api, org, "central")
    own = frozenset({org.org_id})

    assert org.org_id in queues_step(TrainQueues, engine).org_ids()  # the central workers train for it now
    assert org.org_id not in queues_step(PremisesQueues, engine).org_ids()
    assert queues_step(PremisesQueues, engine, orgs=own).org_ids() == [org.org_id]
    assert queues_step(TrainQueues, engine, orgs=own).org_ids() == [org.org_id]


def test_a_run_a_central_worker_fetched_before_its_org_turned_local_is_left_queued_for_the_orgs_own_workers(
    api: TestClient, org: OrgKeys, engine: Engine, tmp_path: Path
) -> None:
    """The central worker claimed it, read the org's data centrally, and kept its held-out rows in its own folder."""
    run_id = submit(api, org, upload_table(api, org, ai4i.generate(500, seed=1), tmp_path))
    set_residency(api, org, "local")
    sessions = make_session_factory(engine)
    queued_at = message_queued_at(sessions, run_id)

    with pytest.raises(runs.NotOnPremises, match="keeps its data on its premises: left to its own workers"):
        runs.claim_run(sessions, run_id, worker="central", lease_s=30)
    again_at = message_queued_at(sessions, run_id)
    own = runs.claim_run(sessions, run_id, worker="premises", lease_s=30, premises_orgs=frozenset({org.org_id}))

    assert again_at - queued_at >= runs.NOT_HERE_WAIT  # its message queued again, a little later
    assert own is not None and own.holdout_on_premises


def message_queued_at(sessions: SessionFactory, run_id: str) -> datetime:
    with session_scope(sessions) as session:
        queued_at = session.get_one(TrainingRun, run_id).message_queued_at
    assert queued_at is not None
    return queued_at


def test_a_central_worker_handed_a_premises_erasure_sends_it_on_to_the_orgs_own_workers(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore, worker: WorkerContext, settings: Settings
) -> None:
    version, premises = premises_version(api, org, engine, store, settings)
    assert erase(api, org, version).status_code == 202
    set_residency(api, org, "central")
    waiting = queued_for_premises(settings, org)

    assert erase_here_or_forward(org.org_id, version, worker, actor="a") == 0

    assert queued_for_premises(settings, org) == waiting + 1
    assert premises.exists(model_prefix(org.org_id, version) + HOLDOUT_FILE)
    assert audit_of(api, org, "model.erased.premises") == []


def test_a_judgement_of_a_version_whose_rows_stayed_on_the_premises_goes_to_the_orgs_own_workers(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore, settings: Settings
) -> None:
    """On the org's training queue, which central workers take once it moved to central, it could not find them."""
    version, _premises = premises_version(api, org, engine, store, settings)
    set_residency(api, org, "central")
    waiting = queued_for_premises(settings, org)

    judged = api.post(f"/v1/orgs/{org.org_id}/models/{version}/validate", headers=org.trainer)

    assert judged.status_code == 202, judged.text
    assert queued_for_premises(settings, org) == waiting + 1
