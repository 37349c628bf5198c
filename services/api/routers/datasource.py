"""An org's own database as its training data source. Its password is stored encrypted and never shown again."""

from __future__ import annotations

import posixpath

from fastapi import APIRouter
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from services.api.deps import OrgAdmin, OrgViewer, ResourcesDep, SessionDep
from services.api.schemas import DataSourceIn, DataSourceOut
from shared.audit import record_change
from shared.column_map import check_column_map
from shared.db.models import DataSource
from shared.db.types import utcnow
from shared.errors import InvalidInput, NotFound
from shared.org_lock import lock_org
from shared.settings import SHIPPED_DRIVERS
from shared.store_access import refuse_dropped_query, refuse_malformed_host, refuse_nul, refuse_unsafe_parameters
from shared.stored_secrets import datasource_context

router = APIRouter(prefix="/v1/orgs/{org}/datasource", tags=["datasource"])

SUPPORTED_BACKENDS = ("postgresql", "sqlite")
MASK = "***"


@router.put("", response_model=DataSourceOut)
def put_datasource(body: DataSourceIn, access: OrgAdmin, session: SessionDep, resources: ResourcesDep) -> DataSourceOut:
    url = checked_url(body.url)
    check_column_map(body.column_map)
    context = datasource_context(access.org_id)
    password = None if url.password is None else resources.secrets.encrypt(str(url.password), context=context)
    lock_org(session, access.org_id)  # the first two at once: the second finds the row the first made, and sets it
    row = session.get(DataSource, access.org_id) or DataSource(org_id=access.org_id)
    # URL.set(password=None) keeps the password; the NamedTuple's _replace is what removes it.
    row.url = url._replace(password=None).render_as_string(hide_password=False)
    row.password_encrypted = password
    row.table_name = body.table
    row.timestamp_column = body.timestamp_column
    row.column_map = dict(body.column_map)
    row.updated_at = utcnow()
    session.add(row)
    session.flush()
    record_change(
        session,
        org_id=access.org_id,
        actor=access.principal.key_id,
        action="datasource.set",
        target=row.table_name,
        detail={"url": _datasource_out(row).url, "columnMap": row.column_map},
    )
    return _datasource_out(row)


@router.get("", response_model=DataSourceOut)
def get_datasource(access: OrgViewer, session: SessionDep) -> DataSourceOut:
    row = session.get(DataSource, access.org_id)
    if row is None:
        raise NotFound(f"organization {access.org_id!r} has no datasource")
    return _datasource_out(row)


def checked_url(text: str) -> URL:
    try:
        url = make_url(text)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number, an unclosed bracket
        raise InvalidInput(
            "url is not a database URL such as postgresql+psycopg2://user:pass@host/db", field="url"
        ) from None
    if url.get_backend_name() not in SUPPORTED_BACKENDS:
        raise InvalidInput(
            f"url: {url.get_backend_name()!r} databases are not supported; use {' or '.join(SUPPORTED_BACKENDS)}",
            field="url",
        )
    if url.drivername not in SHIPPED_DRIVERS:  # another driver (postgresql+asyncpg://) would fail on every worker
        raise InvalidInput(
            f"url: {url.drivername}:// names a driver Kiln does not ship; use {', '.join(sorted(SHIPPED_DRIVERS))}",
            field="url",
        )
    refuse_unsafe_parameters(url, field="url")
    refuse_dropped_query(text, url, field="url")
    refuse_malformed_host(url, field="url")
    if url.port is not None and not 1 <= url.port <= 65535:
        raise InvalidInput(f"url: port {url.port} is not a TCP port (1 to 65535)", field="url")
    refuse_nul(url, field="url")
    if url.get_backend_name() == "sqlite" and not (url.database or "").startswith("/"):
        raise InvalidInput("url: a SQLite data source needs an absolute path: sqlite:////data/plant.db", field="url")
    # One spelling per store, so that two URLs of one store compare equal: a.db, ./a.db and x/../a.db are one file.
    if url.get_backend_name() == "sqlite":
        return url.set(database=posixpath.normpath(url.database or ""))
    return url.set(host=url.host.lower()) if url.host else url


def _datasource_out(row: DataSource) -> DataSourceOut:
    # SQLAlchemy's own masking: "***" in place of the password, never its characters.
    url = make_url(row.url)
    shown = url.set(password="stored") if row.password_encrypted is not None else url  # noqa: S106 - hidden below
    return DataSourceOut(
        url=shown.render_as_string(hide_password=True),
        table=row.table_name,
        timestamp_column=row.timestamp_column,
        column_map=row.column_map,
        has_password=row.password_encrypted is not None,
        updated_at=row.updated_at,
    )
