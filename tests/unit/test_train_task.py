"""The train task when Kiln's database fails before the run is claimed: retried while it is out of reach (tested
with a real worker in tests/integration/test_frozen_database.py), not when it cannot run the statement at all."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import create_engine
from sqlalchemy.exc import OperationalError

from services.trainer import tasks, training
from shared.db.session import make_session_factory


def test_a_train_message_meeting_a_database_without_kilns_tables_fails_once_rather_than_come_back_for_good(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SQLite file replaced by an empty one, or never migrated: every try fails alike on the missing table."""
    engine = create_engine(f"sqlite:///{tmp_path / 'kiln.db'}")
    context: Any = SimpleNamespace(
        settings=SimpleNamespace(run_lease_s=30.0), sessions=make_session_factory(engine), outbox_senders=dict
    )
    tries: list[str] = []

    def counted(run_id: str, _context: Any, *, worker: str | None = None) -> str:
        tries.append(run_id)
        if len(tries) > 3:
            raise RuntimeError("the message came back again and again")
        return training.run_training(run_id, context, worker=worker)

    monkeypatch.setattr(tasks, "worker_context", lambda: context)
    monkeypatch.setattr(tasks, "run_training", counted)

    result = tasks.train.apply(args=["run_0123456789abcdef", "acme"])
    engine.dispose()

    assert tries == ["run_0123456789abcdef"]
    assert isinstance(result.result, OperationalError) and "no such table" in str(result.result)
