"""Dataset uploads: CSV or Parquet in, a checked Parquet object and a row out."""

from __future__ import annotations

import difflib
import logging
import secrets
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile, status
from sqlalchemy import select
from sqlalchemy.orm import Session

from services.api.bounded_read import MIB
from services.api.deps import OrgTrainer, OrgViewer, ResourcesDep, SessionDep
from services.api.ingest import ingest
from services.api.resources import Resources
from services.api.schemas import DatasetErased, DatasetOut
from shared.audit import record_change
from shared.db.models import Dataset, ModelVersion, Organization, Schedule, TrainingRun
from shared.db.types import utcnow
from shared.errors import Conflict, InvalidInput, KilnError, TransientError
from shared.layout import dataset_key
from shared.lookups import get_owned
from shared.org_lock import lock_org
from shared.schemas import NUL, OrgConfig
from shared.storage import CHUNK, sha256_file
from shared.verdicts import ERASED

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/orgs/{org}/datasets", tags=["datasets"])


FORM_FIELDS = ("file", "timestampColumn")


async def only_known_form_fields_once(request: Request) -> None:
    """FastAPI takes the form fields a route names and drops the others unread: a mistyped `timestamp_column` was
    accepted and the dataset stored without its timestamps. Of a field given twice it takes the last, dropping the
    others (a second file part unread, an earlier timestampColumn unsaid)."""
    given = Counter(name for name, _ in (await request.form()).multi_items())  # the form FastAPI parsed, not re-read
    for name, times in given.items():
        if name not in FORM_FIELDS:
            raise InvalidInput(f"unknown form field {name!r}{_did_you_mean(name)}", field=name)
        if times > 1:
            raise InvalidInput(_given_more_than_once(name, times), field=name)


def _did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(name, FORM_FIELDS, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f"; an upload takes only {' and '.join(FORM_FIELDS)}"


def _given_more_than_once(name: str, times: int) -> str:
    if name == "file":
        return f"the form has {times} file parts; upload one file at a time"
    return f"the form gives {name} {times} times; give it once"


@router.post("", status_code=status.HTTP_201_CREATED, response_model=DatasetOut)
def upload_dataset(
    access: OrgTrainer,
    session: SessionDep,
    resources: ResourcesDep,
    file: Annotated[UploadFile, File(description="CSV with a header row, or Parquet")],
    _fields: Annotated[None, Depends(only_known_form_fields_once)],
    timestamp_column: Annotated[str | None, Form(alias="timestampColumn", max_length=200)] = None,
) -> DatasetOut:
    _refuse_data_kept_on_premises(session, access.org_id)
    # Held through the ingest and the put, the connection the key check took stayed out of the pool for as long as
    # the store took: a few slow uploads held all of it, and every org's requests answered 503.
    session.commit()
    with tempfile.TemporaryDirectory(prefix="kiln-upload-") as folder:  # its size is bounded by BodyLimits
        row = _stored_dataset(file, Path(folder), resources, org_id=access.org_id, timestamp_column=timestamp_column)
    try:
        lock_org(session, access.org_id)  # a residency change committed meanwhile is seen; one asked now waits
        _refuse_data_kept_on_premises(session, access.org_id)
        session.add(row)
        session.flush()
        record_change(
            session,
            org_id=access.org_id,
            actor=access.principal.key_id,
            action="dataset.uploaded",
            target=row.id,
            detail={"rows": row.row_count, "sizeBytes": row.size_bytes, "sha256": row.sha256},
        )
        session.commit()
    except BaseException:
        resources.store.delete(row.object_key)
        raise
    return _dataset_out(row)


def _refuse_data_kept_on_premises(session: Session, org_id: str) -> None:
    org = session.get_one(Organization, org_id, populate_existing=True)
    if OrgConfig.model_validate(org.config).data_residency == "local":
        raise Conflict(
            f"organization {org_id} keeps its data on its premises (dataResidency local): train from its "
            "datasource on a worker of its own instead of uploading",
            field="file",
        )


def _stored_dataset(
    file: UploadFile, folder: Path, resources: Resources, *, org_id: str, timestamp_column: str | None
) -> Dataset:
    """Check the upload, store it as Parquet, and return its row, not yet added to any session."""
    filename = _stored_filename(file)
    upload = folder / "upload"
    with upload.open("wb") as sink:
        shutil.copyfileobj(file.file, sink, CHUNK)
    dataset = ingest(
        upload,
        folder / "dataset.parquet",
        timestamp_column=timestamp_column or None,
        max_bytes=resources.settings.max_dataset_mb * MIB,
    )
    dataset_id = "ds_" + secrets.token_hex(8)
    row = Dataset(
        id=dataset_id,
        org_id=org_id,
        filename=filename,
        row_count=dataset.rows,
        columns=dataset.columns,
        timestamp_column=timestamp_column or None,
        size_bytes=dataset.path.stat().st_size,
        sha256=sha256_file(dataset.path),
        object_key=dataset_key(org_id, dataset_id),
    )
    resources.store.put_file(row.object_key, dataset.path)
    return row


@router.get("", response_model=list[DatasetOut])
def list_datasets(access: OrgViewer, session: SessionDep) -> list[DatasetOut]:
    rows = session.scalars(select(Dataset).where(Dataset.org_id == access.org_id).order_by(Dataset.created_at.desc()))
    return [_dataset_out(row) for row in rows]


@router.get("/{dataset_id}", response_model=DatasetOut)
def get_dataset(dataset_id: str, access: OrgViewer, session: SessionDep) -> DatasetOut:
    return _dataset_out(get_owned(session, Dataset, dataset_id, org_id=access.org_id))


@router.delete("/{dataset_id}", response_model=DatasetErased)
def erase_dataset(dataset_id: str, access: OrgTrainer, session: SessionDep, resources: ResourcesDep) -> DatasetErased:
    """Erase the dataset's rows: its object leaves the store, and its row stays as a tombstone (runs name it) that
    no submission, schedule or queued run reads from again. Refused (409) while a running run reads it or the org's
    schedule trains on it. Asking again finishes an erasure the object store cut short, and changes nothing else."""
    get_owned(session, Dataset, dataset_id, org_id=access.org_id)
    lock_org(session, access.org_id)  # a worker claiming a run of it waits for this commit, and then finds it erased
    row = session.get_one(Dataset, dataset_id, populate_existing=True)
    keeping = _versions_keeping_rows(session, row.id)
    if row.erased_at is None:
        _refuse_in_use(session, row)
        row.erased_at = utcnow()
        record_change(
            session,
            org_id=access.org_id,
            actor=access.principal.key_id,
            action="dataset.erased",
            target=row.id,
            detail={
                "rows": row.row_count,
                "sizeBytes": row.size_bytes,
                "sha256": row.sha256,
                "versionsKeepingRows": keeping,
            },
        )
    # Marked first: from this commit on nothing reads the dataset, whatever the store does.
    session.commit()
    try:
        resources.store.delete(row.object_key)
        left = resources.store.exists(row.object_key)
    except Exception as error:  # an outage, a refusal: the dataset stays erased, and a DELETE again finishes it
        log.warning("dataset %s: its object was not removed", row.id, exc_info=True)
        left, reason = True, error.message if isinstance(error, KilnError) else f"{type(error).__name__}: {error}"
    else:
        reason = "the store still holds it"
    if left:
        raise TransientError(
            f"dataset {row.id} is erased (nothing will read it again), but its object could not be removed yet: "
            f"{reason}; DELETE it again to finish",
            headers={"Retry-After": "5"},
        )
    return DatasetErased(**_dataset_out(row).model_dump(), versions_keeping_rows=keeping)


def _refuse_in_use(session: Session, row: Dataset) -> None:
    """A run reading the dataset would carry its rows on into a new version's held-out rows; a schedule naming it
    would fail every run it queues."""
    running = session.scalars(
        select(TrainingRun.id)
        .where(TrainingRun.dataset_id == row.id, TrainingRun.status == "running")
        .order_by(TrainingRun.created_at)
    ).all()
    if running:
        raise Conflict(
            f"dataset {row.id} is being read by running run {', '.join(running)}: cancel it "
            f"(POST /v1/orgs/{row.org_id}/trainings/{{runId}}/cancel) or let it end, then erase the dataset"
        )
    schedule = session.get(Schedule, row.org_id)
    if schedule is not None and schedule.training_config.get("datasetId") == row.id:
        raise Conflict(
            f"the organization's schedule trains on dataset {row.id}: point its trainingConfig at another dataset "
            f"(PUT /v1/orgs/{row.org_id}/schedule) or delete it, then erase the dataset"
        )


def _versions_keeping_rows(session: Session, dataset_id: str) -> list[str]:
    """The versions trained on the dataset that still hold their held-out rows, a share of its own."""
    return list(
        session.scalars(
            select(ModelVersion.version)
            .join(TrainingRun, TrainingRun.id == ModelVersion.run_id)
            .where(TrainingRun.dataset_id == dataset_id, ModelVersion.status != ERASED)
            .order_by(ModelVersion.created_at, ModelVersion.version)
        )
    )


def _stored_filename(file: UploadFile) -> str:
    name = file.filename or "upload"
    if NUL in name:  # PostgreSQL stores no NUL in text
        raise InvalidInput(f"the file's name must not contain the NUL character {NUL!r}", field="file")
    return name[:300]


def _dataset_out(row: Dataset) -> DatasetOut:
    return DatasetOut(
        dataset_id=row.id,
        filename=row.filename,
        rows=row.row_count,
        columns=row.columns,
        timestamp_column=row.timestamp_column,
        size_bytes=row.size_bytes,
        created_at=row.created_at,
        erased_at=row.erased_at,
    )
