"""What a sync worker process holds open: the central database, the platform key and the object store."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from sqlalchemy import Engine

from shared.crypto import SecretBox
from shared.db.session import SessionFactory, make_engine, make_session_factory
from shared.settings import Settings, build_settings
from shared.storage import ObjectStore, open_object_store
from shared.store_access import StoreRules


@dataclass
class SyncContext:
    settings: Settings
    engine: Engine
    sessions: SessionFactory
    secrets: SecretBox
    store: ObjectStore

    @classmethod
    def open(cls, settings: Settings) -> SyncContext:
        engine = make_engine(settings.resolved_database_url)
        return cls(
            settings=settings,
            engine=engine,
            sessions=make_session_factory(engine),
            secrets=SecretBox(settings.secret_key.get_secret_value()),
            store=open_object_store(settings),
        )

    def store_rules(self, org_id: str) -> StoreRules:
        """Which local stores the org's sync may open on this worker."""
        return StoreRules.for_sync(self.settings, org_id)

    def close(self) -> None:
        self.engine.dispose()


@cache
def worker_context() -> SyncContext:
    """The worker process's context, made at its first task (never at import)."""
    return SyncContext.open(build_settings())
