"""Bring a database to the newest schema: `python -m shared.db.migrate` (uses KILN_DATABASE_URL)."""

from __future__ import annotations

import os
import sys
from contextlib import suppress
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.util.exc import CommandError
from sqlalchemy import inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from shared.db.session import driver_message, make_engine
from shared.errors import KilnError, MigrationError
from shared.settings import Settings, build_settings, make_private_folder

MIGRATIONS = Path(__file__).parent / "migrations"
# How many of another application's tables a refusal names: enough to recognise the application.
TABLES_NAMED = 3


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Bring the database to `revision` in one transaction (migrations/env.py): all of it, or, raising
    MigrationError, none of it. A database holding tables but no Kiln schema is refused before anything is made."""
    try:
        refuse_another_applications_database(database_url)
        command.upgrade(alembic_config(database_url), revision)
    except CommandError as error:  # alembic_version names a revision this Kiln has no migration for
        raise MigrationError(
            f"the database (KILN_DATABASE_URL) holds a schema this Kiln does not know ({error}): a newer Kiln "
            "migrated it, or it is another application's; run that Kiln, or give this one a database of its own"
        ) from None
    except SQLAlchemyError as error:
        raise MigrationError(
            "migrating the database (KILN_DATABASE_URL) failed, and none of it was applied (it must be reachable, "
            f"and Kiln's own, where Kiln may create tables): {driver_message(error)}"
        ) from None


def refuse_another_applications_database(database_url: str) -> None:
    """Raise MigrationError for a database with tables but no alembic_version: another application's, where Kiln's
    tables would be made beside its own, unless a name clashed."""
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            tables = sorted(inspect(connection).get_table_names())  # in the schema Kiln's tables would go to
    finally:
        engine.dispose()
    if not tables or "alembic_version" in tables:
        return
    named = ", ".join(tables[:TABLES_NAMED]) + (", …" if len(tables) > TABLES_NAMED else "")
    raise MigrationError(
        f"the database {make_url(database_url).database} (KILN_DATABASE_URL) holds tables and no Kiln schema "
        f"({named}): it is another application's; give Kiln a database of its own"
    )


def prepare_sqlite_database(settings: Settings) -> None:
    """A SQLite database file Kiln makes is readable by its owner only, whether it is the embedded one or named by
    KILN_DATABASE_URL: the file holds every org's records, and SQLite gives its -wal and -shm files the database
    file's permissions. A file named by KILN_DATABASE_URL that is there already keeps the mode its owner gave it."""
    if not settings.database_url:
        _prepare_embedded_database(settings)
        return
    path = _sqlite_file(settings.database_url)
    if path is not None:
        # A file already there is left alone; a folder missing or not writable, SQLite's open names next, in the
        # migration's one line.
        with suppress(OSError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _prepare_embedded_database(settings: Settings) -> None:
    """The embedded database's folder and file, readable by their owner only."""
    make_private_folder(settings.data_dir)
    database = settings.data_dir / "kiln.db"
    os.close(os.open(database, os.O_WRONLY | os.O_CREAT, 0o600))
    database.chmod(0o600)  # made by an earlier version with the default umask


def _sqlite_file(database_url: str) -> Path | None:
    """The file a SQLite URL names, or None for any other database, or a URI filename (?uri=true) left to SQLite."""
    parsed = make_url(database_url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.query:
        return None
    return Path(parsed.database)


def main() -> None:
    """docker-compose's migrate service: a refusal (settings, a foreign database, a failed migration) in one line and
    exit 1, as `kiln migrate` says it."""
    try:
        settings = build_settings()
        prepare_sqlite_database(settings)
        upgrade(settings.resolved_database_url)
    except KilnError as error:
        print(f"migrate: {error.message}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"database at head: {settings.resolved_database_url.split('@')[-1]}")


if __name__ == "__main__":
    main()
