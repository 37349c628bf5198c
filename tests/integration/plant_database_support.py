"""A plant's own database as training reads it: AI4I rows under a historian's tag names, from a fixed start."""

from __future__ import annotations

from datetime import UTC, datetime

import pyarrow as pa
from sqlalchemy import Column, DateTime, Float, Integer, MetaData, Table, create_engine, insert

from deploy.local import ai4i

START = datetime(2024, 1, 1, tzinfo=UTC)


def write_scada_table(url: str, table: pa.Table) -> None:
    """AI4I rows as a plant's historian keeps them: tag names, and a timestamp column."""
    engine = create_engine(url)
    readings = Table(
        "readings",
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("recorded_at", DateTime(timezone=url.startswith("postgresql"))),
        *(Column(f"TAG_{name.upper()}", Float) for name in ai4i.FEATURES),
        Column("failure", Integer),
    )
    readings.metadata.create_all(engine)
    naive = not url.startswith("postgresql")
    rows = [
        {
            "recorded_at": row["timestamp"].replace(tzinfo=None) if naive else row["timestamp"],
            **{f"TAG_{name.upper()}": row[name] for name in ai4i.FEATURES},
            "failure": row[ai4i.TARGET],
        }
        for row in table.to_pylist()
    ]
    with engine.begin() as connection:
        connection.execute(insert(readings), rows)
    engine.dispose()
