"""Dataset uploads: CSV or Parquet in, a checked Parquet object and a row out."""

from __future__ import annotations

import secrets
import tempfile
from pathlib import Path
from typing import Annotated, BinaryIO

from fastapi import APIRouter, File, Form, Request, UploadFile, status
from sqlalchemy import select

from services.api.deps import OrgTrainer, OrgViewer, ResourcesDep, SessionDep
from services.api.ingest import ingest
from services.api.lookups import get_owned
from services.api.schemas import DatasetOut
from shared.db.models import Dataset, Organization
from shared.errors import Conflict, InvalidInput, PayloadTooLarge
from shared.layout import dataset_key
from shared.schemas import NUL, OrgConfig
from shared.storage import CHUNK, sha256_file

router = APIRouter(prefix="/v1/orgs/{org}/datasets", tags=["datasets"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=DatasetOut)
def upload_dataset(
    request: Request,
    access: OrgTrainer,
    session: SessionDep,
    resources: ResourcesDep,
    file: Annotated[UploadFile, File(description="CSV with a header row, or Parquet")],
    timestamp_column: Annotated[str | None, Form(alias="timestampColumn", max_length=200)] = None,
) -> DatasetOut:
    if OrgConfig.model_validate(session.get_one(Organization, access.org_id).config).data_residency == "local":
        raise Conflict(
            f"organization {access.org_id} keeps its data on its premises (dataResidency local): train from its "
            "datasource on a worker of its own instead of uploading",
            field="file",
        )
    filename = _stored_filename(file)
    limit = resources.settings.max_upload_mb * 1024 * 1024
    if int(request.headers.get("content-length") or 0) > limit:
        raise PayloadTooLarge(f"the upload is over {resources.settings.max_upload_mb} MB", field="file")
    with tempfile.TemporaryDirectory(prefix="kiln-upload-") as folder:
        upload = Path(folder) / "upload"
        _copy_limited(file.file, upload, limit)
        dataset = ingest(upload, Path(folder) / "dataset.parquet", timestamp_column=timestamp_column or None)
        row = Dataset(
            id="ds_" + secrets.token_hex(8),
            org_id=access.org_id,
            filename=filename,
            row_count=dataset.rows,
            columns=dataset.columns,
            timestamp_column=timestamp_column or None,
            size_bytes=dataset.path.stat().st_size,
            sha256=sha256_file(dataset.path),
            object_key="",
        )
        row.object_key = dataset_key(access.org_id, row.id)
        resources.store.put_file(row.object_key, dataset.path)
    try:
        session.add(row)
        session.commit()
    except BaseException:
        resources.store.delete(row.object_key)
        raise
    return _dataset_out(row)


@router.get("", response_model=list[DatasetOut])
def list_datasets(access: OrgViewer, session: SessionDep) -> list[DatasetOut]:
    rows = session.scalars(select(Dataset).where(Dataset.org_id == access.org_id).order_by(Dataset.created_at.desc()))
    return [_dataset_out(row) for row in rows]


@router.get("/{dataset_id}", response_model=DatasetOut)
def get_dataset(dataset_id: str, access: OrgViewer, session: SessionDep) -> DatasetOut:
    return _dataset_out(get_owned(session, Dataset, dataset_id, org_id=access.org_id))


def _stored_filename(file: UploadFile) -> str:
    name = file.filename or "upload"
    if NUL in name:  # PostgreSQL stores no NUL in text
        raise InvalidInput(f"the file's name must not contain the NUL character {NUL!r}", field="file")
    return name[:300]


def _copy_limited(source: BinaryIO, target: Path, limit: int) -> None:
    copied = 0
    with target.open("wb") as sink:
        while block := source.read(CHUNK):
            copied += len(block)
            if copied > limit:
                raise PayloadTooLarge(f"the upload is over {limit // (1024 * 1024)} MB", field="file")
            sink.write(block)


def _dataset_out(row: Dataset) -> DatasetOut:
    return DatasetOut(
        dataset_id=row.id,
        filename=row.filename,
        rows=row.row_count,
        columns=row.columns,
        timestamp_column=row.timestamp_column,
        size_bytes=row.size_bytes,
        created_at=row.created_at,
    )
