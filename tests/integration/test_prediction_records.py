"""Prediction records of orgs sharing one predictor process: one org's heavy traffic neither gets another's records
dropped nor holds them back behind its own, and each org's records are written in the order they were answered."""

from __future__ import annotations

import secrets
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import BigInteger, Engine, create_engine, literal_column, select
from sqlalchemy.orm import Session

from services.predictor import records
from services.predictor.records import PredictionRecorder
from shared.db.models import Prediction
from shared.db.session import make_session_factory
from tests.integration.conftest import OrgKeys, create_org_with_keys
from tests.support.servers import free_port


def answers(count: int, first_score: float = 0.0) -> list[dict[str, Any]]:
    """`count` answers whose scores number them, so that the order they are written in shows."""
    return [{"score": first_score + index, "label": "ok", "riskLevel": "low"} for index in range(count)]


def written(engine: Engine, org_id: str) -> list[tuple[float, int]]:
    """The org's records as (score, the transaction that wrote them), in the order they were written."""
    with Session(engine) as session:
        transaction = literal_column("xmin::text::bigint", BigInteger)  # PostgreSQL's id of the row's writer
        query = select(Prediction.score, transaction).where(Prediction.org_id == org_id).order_by(Prediction.id)
        return [(score, transaction_id) for score, transaction_id in session.execute(query)]


@pytest.fixture
def other_org(api: TestClient) -> OrgKeys:
    return create_org_with_keys(api, "org-" + secrets.token_hex(4))


def test_an_org_filling_the_queue_gets_no_other_orgs_records_dropped(
    engine: Engine, org: OrgKeys, other_org: OrgKeys
) -> None:
    """One limit for the whole process: the org that came when another had filled it lost all its records."""
    recorder = PredictionRecorder(make_session_factory(engine), flush_s=60, max_waiting_rows=1000)
    for _ in range(3):
        recorder.add(org_id=org.org_id, version="v1", answers=answers(500), latency_ms=1.0)
    for index in range(20):
        recorder.add(org_id=other_org.org_id, version="v1", answers=answers(1, index), latency_ms=1.0)

    assert (recorder.flush(), recorder.dropped) == (1020, 500)
    assert [score for score, _ in written(engine, other_org.org_id)] == list(range(20))


def test_a_large_request_is_written_in_batches_with_other_orgs_records_among_the_first(
    engine: Engine, org: OrgKeys, other_org: OrgKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Written whole, a request of 180,000 rows took one transaction of ~30 s, and the records of every org that
    came after it waited for it, and for the rest of its org's backlog."""
    monkeypatch.setattr(records, "BATCH_ROWS", 100)
    recorder = PredictionRecorder(make_session_factory(engine), flush_s=60)
    for _ in range(3):
        recorder.add(org_id=org.org_id, version="v1", answers=answers(1000), latency_ms=1.0)
    recorder.add(org_id=other_org.org_id, version="v1", answers=answers(5), latency_ms=1.0)

    assert recorder.flush() == 3005
    heavy = {transaction for _, transaction in written(engine, org.org_id)}
    light = {transaction for _, transaction in written(engine, other_org.org_id)}
    assert len(heavy) >= 3000 // 100 and light == {min(heavy)}


def test_each_orgs_records_are_written_in_the_order_answered_across_batches_and_outages(
    engine: Engine, org: OrgKeys, other_org: OrgKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch the database could not take went back behind the records answered after it."""
    monkeypatch.setattr(records, "BATCH_ROWS", 100)
    unreachable = create_engine(f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/kiln", pool_pre_ping=False)
    recorder = PredictionRecorder(make_session_factory(unreachable), flush_s=60)
    for first in range(0, 300, 60):
        recorder.add(org_id=org.org_id, version="v1", answers=answers(60, first), latency_ms=1.0)
        recorder.add(org_id=other_org.org_id, version="v1", answers=answers(7, first), latency_ms=1.0)
    assert (recorder.flush(), recorder.dropped) == (0, 0)
    recorder.add(org_id=org.org_id, version="v1", answers=answers(60, 300), latency_ms=1.0)

    recorder.sessions = make_session_factory(engine)
    assert (recorder.flush(), recorder.dropped) == (360 + 35, 0)
    assert [score for score, _ in written(engine, org.org_id)] == list(range(360))
    assert [score for score, _ in written(engine, other_org.org_id)] == [
        first + index for first in range(0, 300, 60) for index in range(7)
    ]
