"""A PostgreSQL database as the local store, for the sync tests: a readings table in it, and an org syncing it."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from services.sync.context import SyncContext
from tests.integration.conftest import create_org_with_keys
from tests.integration.sync_support import Sync, register, run_sql

READINGS = "CREATE TABLE readings (id integer PRIMARY KEY, device text, value double precision, patient text)"
TWO_READINGS = "INSERT INTO readings VALUES (1, 'pump-1', 1.0, 'Ada Lovelace'), (2, 'pump-2', 2.0, 'Alan Turing')"


def open_postgres_sync(
    api: TestClient, context: SyncContext, org_id: str, local_url: str, policy: str, *statements: str, **table: Any
) -> Sync:
    """An org syncing a table of the local database that `statements` make (`readings`, unless `table` names
    another, with its key and sensitive columns)."""
    for statement in statements:
        run_sql(local_url, statement)
    org = create_org_with_keys(api, org_id)
    source_id = register(api, org, local_url, policy, **table)
    name = table.get("name", "readings")
    return Sync(api, context, org, local_url, source_id, context.settings.resolved_database_url, name)
