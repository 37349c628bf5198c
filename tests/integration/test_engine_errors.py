"""What a failed statement's error says: never the statement's parameters, which may be an org's records."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from shared.db.session import make_engine, make_org_engine
from shared.settings import Settings

RECORD = "patient 4411, diagnosis withheld"


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_a_failed_statement_s_error_does_not_quote_its_parameters(
    settings: Settings, tmp_path: Path, backend: str
) -> None:
    """SQLAlchemy appends `[parameters: ...]` to a failed statement's error, which went whole into the workers' logs
    and a job's recorded error: a sync batch's records, a sealed value or a plain one."""
    url = settings.database_url if backend == "postgresql" else f"sqlite:///{tmp_path / 'store.db'}"
    engines = [make_engine(url), make_org_engine(make_url(url), timeout_s=5)]
    for engine in engines:
        with engine.connect() as connection, pytest.raises(DBAPIError) as raised:
            connection.execute(text("SELECT 1 FROM no_such_table WHERE note = :note"), {"note": RECORD})
        engine.dispose()

        assert "no_such_table" in str(raised.value)
        assert RECORD not in str(raised.value)
