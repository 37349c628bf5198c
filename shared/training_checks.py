"""Checks a TrainingConfig must pass against what the org has, before a run is queued (by a POST or a schedule)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from shared.db.models import Dataset, DataSource
from shared.errors import Conflict, InvalidInput
from shared.lookups import get_owned
from shared.schemas import TrainingConfig


def check_source(session: Session, config: TrainingConfig, *, org_id: str, within: str = "") -> str | None:
    """The dataset the run reads (None: the org's datasource), checked so a bad run is refused before queueing.
    `within` prefixes the fields an error names: a schedule's config is its `trainingConfig.`."""
    if config.dataset_id is not None:
        return _dataset_for(session, config, org_id=org_id, within=within).id
    datasource = session.get(DataSource, org_id)
    if datasource is None:
        raise InvalidInput(
            "datasetId is required: upload a dataset or configure the datasource", field=f"{within}datasetId"
        )
    if config.data_range is not None and datasource.timestamp_column is None:
        raise InvalidInput(
            "dataRange needs the datasource's timestampColumn, and none is set", field=f"{within}dataRange"
        )
    return None


def _dataset_for(session: Session, config: TrainingConfig, *, org_id: str, within: str) -> Dataset:
    assert config.dataset_id is not None
    # Held: an erasure committing after this check would leave the run queued on rows that are gone.
    dataset = get_owned(session, Dataset, config.dataset_id, org_id=org_id, field=f"{within}datasetId", held=True)
    if dataset.erased_at is not None:
        raise Conflict(
            f"dataset {dataset.id} was erased at {dataset.erased_at.isoformat()}: its rows are gone; upload them "
            "again, or name another dataset",
            field=f"{within}datasetId",
        )
    columns = {column["name"]: column for column in dataset.columns}
    if config.target_column not in columns:
        raise InvalidInput(
            f"targetColumn {config.target_column!r} is not a column of dataset {dataset.id}",
            field=f"{within}targetColumn",
        )
    if config.target_column == dataset.timestamp_column:
        raise InvalidInput(
            f"targetColumn {config.target_column!r} is dataset {dataset.id}'s timestampColumn: the time of a row is "
            "no label to learn",
            field=f"{within}targetColumn",
        )
    if columns[config.target_column].get("label") is False:  # datasets uploaded before 2026-11-28 do not say
        raise InvalidInput(
            f"targetColumn {config.target_column!r} is {columns[config.target_column]['type']}: a target's classes "
            "are integers, floats, booleans or text",
            field=f"{within}targetColumn",
        )
    missing = [name for name in config.feature_columns if name not in columns]
    if missing:
        raise InvalidInput(
            f"featureColumns not in dataset {dataset.id}: {', '.join(missing)}", field=f"{within}featureColumns"
        )
    non_numeric = [
        f"{name} ({columns[name]['type']})" for name in config.feature_columns if not columns[name]["numeric"]
    ]
    if non_numeric:
        raise InvalidInput(
            f"featureColumns hold non-numeric values: {', '.join(non_numeric)}", field=f"{within}featureColumns"
        )
    if config.data_range is not None and dataset.timestamp_column is None:
        raise InvalidInput(
            f"dataRange needs a timestamp column, and dataset {dataset.id} was uploaded without timestampColumn",
            field=f"{within}dataRange",
        )
    return dataset
