"""What a worker process holds open: settings, database and object store, built once per process on first use.

Built lazily because Celery forks its pool after importing the app: connections made before the fork would be
shared by every child.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from sqlalchemy import Engine

from shared.db.session import SessionFactory, make_engine, make_session_factory
from shared.settings import Settings, build_settings
from shared.storage import ObjectStore, open_object_store


@dataclass(frozen=True)
class WorkerContext:
    settings: Settings
    engine: Engine
    sessions: SessionFactory
    store: ObjectStore

    @classmethod
    def open(cls, settings: Settings) -> WorkerContext:
        engine = make_engine(settings.resolved_database_url)
        return cls(
            settings=settings, engine=engine, sessions=make_session_factory(engine), store=open_object_store(settings)
        )


@cache
def worker_context() -> WorkerContext:
    return WorkerContext.open(build_settings())
