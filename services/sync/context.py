"""What a sync worker process holds open: the central database, the platform key and the object store."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from sqlalchemy import Engine

from shared.crypto import SecretBox
from shared.db.models import Organization, SyncSource
from shared.db.session import SessionFactory, make_central_engine, make_session_factory, session_scope
from shared.errors import NotFound
from shared.schemas import OrgConfig
from shared.settings import Settings, build_settings
from shared.storage import ObjectStore, backup_stores, open_object_store, org_data_store
from shared.store_access import StoreRules
from shared.stored_secrets import sync_source_context


@dataclass
class SyncContext:
    settings: Settings
    engine: Engine
    sessions: SessionFactory
    secrets: SecretBox
    store: ObjectStore

    @classmethod
    def open(cls, settings: Settings) -> SyncContext:
        engine = make_central_engine(settings, bound_answers=False)
        return cls(
            settings=settings,
            engine=engine,
            sessions=make_session_factory(engine),
            secrets=SecretBox.from_settings(settings),
            store=open_object_store(settings),
        )

    def org_data_store(self, org_id: str) -> ObjectStore:
        """Where the org's data may be kept, its new local stores' backups among it: read from its dataResidency in
        the central database (shared/storage.py, org_data_store). NotFound for an org that database does not know, as
        where its data may go is not known either."""
        return org_data_store(self.settings, self._org_config(org_id), central=self.store)

    def org_backup_stores(self, org_id: str) -> list[ObjectStore]:
        """Every store this machine sees that may hold the org's backups, those taken before its dataResidency
        changed among them (shared/storage.py, backup_stores). NotFound for an org the central database does not
        know, as org_data_store."""
        self._org_config(org_id)
        return backup_stores(self.settings, central=self.store)

    def _org_config(self, org_id: str) -> OrgConfig:
        with session_scope(self.sessions) as session:
            org = session.get(Organization, org_id)
            if org is None:
                raise NotFound(f"organization {org_id!r} not found", field="org")
            return OrgConfig.model_validate(org.config)

    def source_password(self, source: SyncSource) -> str | None:
        """The source's password, opened; SecretUnreadable, saying why, when it does not open."""
        if source.password_encrypted is None:
            return None
        return self.secrets.decrypt(source.password_encrypted, context=sync_source_context(source.id))

    def store_rules(self, org_id: str) -> StoreRules:
        """Which local stores the org's sync may open on this worker."""
        return StoreRules.for_sync(self.settings, org_id)

    def close(self) -> None:
        self.engine.dispose()


@cache
def worker_context() -> SyncContext:
    """The worker process's context, made at its first task (never at import)."""
    return SyncContext.open(build_settings())
