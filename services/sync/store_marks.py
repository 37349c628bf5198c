"""Knowing a local store again: whether it is the one its source last synced with, or one restored from a backup or
replaced since (README, "Restoring a store").

A restored store holds an older change log and older records while the central watermarks point past them: its new
edits, logged under numbers the lost store had used already, would be skipped, and what came down after the backup
would stay missing, with nothing to say so. A job refuses such a store, saying what to do (a resync,
services/sync/resync.py), by three marks:

- A random token in the store's `_kiln_marks`, which the central store expects (sync_store_marks), new at the start
  and at the end of every job, so that a backup holds one a later job has replaced. The token the store held before
  a new one stays accepted until the store is known to hold the new one: a job cut off between the two writes
  leaves nothing to refuse.
- For a table that sends up: the local log row at the `up` watermark, whose record and time are kept with the
  watermark. A restored log lacks that row, or logs another edit under its number.
- For a table that comes down: the central log position the store has taken, which each pull writes to its
  `_kiln_pulled` in the transaction of the batch, so it is never behind the `down` watermark; a restored one is.

The token alone would miss a backup taken while a job ran, were that job cut off before its end; the positions alone
are exact for what pushes and pulls move, but not for the records a push puts back locally. A store synced before
these marks holds none of them: it is accepted once, as it is, and marked.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Final

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    MetaData,
    String,
    Table,
    bindparam,
    column,
    inspect,
    select,
    table,
    update,
)
from sqlalchemy.orm import Session

from services.sync.changes import LOCAL_LOG
from services.sync.pair import TablePair
from services.sync.watermarks import DOWN, UP, watermark
from shared.db.models import SyncResync, SyncSource, SyncStoreMark, SyncWatermark
from shared.db.types import utcnow
from shared.errors import Conflict
from shared.sync_jobs import source_tables

_MARKS = MetaData()
MARKS = Table(
    "_kiln_marks",
    _MARKS,
    Column("source_id", String(40), primary_key=True),
    Column("token", String(64), nullable=False),
)
PULLED = Table(
    "_kiln_pulled",
    _MARKS,
    Column("source_id", String(40), primary_key=True),
    Column("tbl", String(64), primary_key=True),
    Column("seq", BigInteger, nullable=False),
)
# The local change log (services/sync/changes.py makes it), as these marks read it.
LOG = table(LOCAL_LOG.log, column("seq"), column("tbl"), column("pk"), column("at_ms"))
# Written by every pulled batch: made once (services/sync/watermarks.py says why).
_NOTE_PULLED = (
    update(PULLED)
    .where(PULLED.c.source_id == bindparam("source"), PULLED.c.tbl == bindparam("table"))
    .values(seq=bindparam("taken"))
)
# The token of a store that holds none.
NO_TOKEN: Final = ""
RESTORED: Final = (
    "It was restored from a backup or replaced: synced as it is, its new edits would be skipped and what came down "
    "since would stay missing, so nothing was moved"
)


class StoreNotRecognized(Conflict):
    """The local store is not the one its source last synced with: it was restored from a backup, or replaced."""


class NotTheSourcesStore(Conflict):
    """The source's URL was changed to a database that is not its store: another one, holding no mark of it."""


def create_marks(connection: Connection) -> None:
    """The store's marks, made with its change log."""
    _MARKS.create_all(connection, checkfirst=True)


def check_same_store(central: Engine, local: Engine, source: SyncSource) -> None:
    """Once the source's URL was changed (PATCH), before anything reads or writes the store it names now: that must
    be the source's own store, moved or reached otherwise, which holds the source's row in its `_kiln_marks`, its
    token current or older (a backup of it put back is still its store, and recognize_store then asks for a
    resync). A database without that row is another one: nothing is written to it, a resync does not let it
    through, and the source keeps its watermarks for its own store. A source that has no token expected yet (it
    never synced, or only before these marks) has nothing to compare with: its store is taken as at registration.
    Found, the store stands confirmed, and later jobs skip this."""
    if source.url_changed_at is None:
        return
    with Session(central) as session:
        expected = session.get(SyncStoreMark, source.id) is not None
    if expected and _token(local, source.id) == NO_TOKEN:
        raise NotTheSourcesStore(
            f"the store at {source.url} is not the one source {source.id} syncs with: its {MARKS.name} holds no "
            f"marker of this source, so it is another database, and nothing was moved. Give the source its own "
            f"store's URL (PATCH /v1/orgs/{source.org_id}/sync-sources/{source.id}), or register this store as a new "
            f"source (POST /v1/orgs/{source.org_id}/sync-sources)"
        )
    with Session(central) as session, session.begin():
        session.execute(update(SyncSource).where(SyncSource.id == source.id).values(url_changed_at=None))


def recognize_store(central: Engine, local: Engine, source: SyncSource) -> None:
    """At a job's start and end: refuse a store without a token the central store accepts, unless a resync was
    asked for; then give it a new token."""
    found = _token(local, source.id)
    with Session(central) as session:
        mark = session.get(SyncStoreMark, source.id)
        asked = session.scalar(select(SyncResync.table_name).where(SyncResync.source_id == source.id).limit(1))
    if mark is not None and found not in (mark.token, mark.previous_token) and asked is None:
        held = "holds no marker" if found == NO_TOKEN else f"holds marker {found[:8]}, not {mark.token[:8]}"
        names = [spec.name for spec in source_tables(source)]
        raise StoreNotRecognized(
            f"{_tables(names)}: the local store is not the one source {source.id} last synced with: its "
            f"{MARKS.name} {held}. {_what_to_do(source.org_id, source.id)}"
        )
    _give_token(central, local, source.id, found)


def check_positions(pair: TablePair) -> None:
    """At a table's start: refuse a store whose change log lacks the row its last push was acknowledged at, or which
    has taken fewer central changes than were acknowledged to it. A position it has no mark of yet (synced before
    these marks) is taken as it stands."""
    with Session(pair.central) as session, session.begin(), pair.local.begin() as local:
        up = session.get(SyncWatermark, (pair.source_id, pair.spec.name, UP))
        if pair.spec.sends_up and up is not None and up.seq > 0:
            _check_logged(local, pair, up)
        if pair.spec.sends_down:
            _check_pulled(local, pair, watermark(session, pair, DOWN))


def note_pulled(local: Connection, pair: TablePair, seq: int) -> None:
    """The central log position the store has taken, written in the transaction that writes a pulled batch. Every
    path that moves the `down` watermark must write it first: a store behind that watermark is refused."""
    noted = local.execute(_NOTE_PULLED, {"source": pair.source_id, "table": pair.spec.name, "taken": seq})
    if noted.rowcount == 0:
        local.execute(PULLED.insert().values(source_id=pair.source_id, tbl=pair.spec.name, seq=seq))


def taken_position(local: Connection, pair: TablePair) -> int | None:
    """The central log position the store says it has taken; None if it keeps no mark of it."""
    query = select(PULLED.c.seq).where(PULLED.c.source_id == pair.source_id, PULLED.c.tbl == pair.spec.name)
    seq = local.execute(query).scalar()
    return None if seq is None else int(seq)


def _check_logged(local: Connection, pair: TablePair, up: SyncWatermark) -> None:
    row = local.execute(select(LOG.c.tbl, LOG.c.pk, LOG.c.at_ms).where(LOG.c.seq == up.seq)).first()
    if row is not None and row.tbl == pair.spec.name and up.logged_key is None:
        up.logged_key, up.logged_at_ms = row.pk, row.at_ms  # acknowledged before these marks: taken as it is
        return
    if row is not None and (row.tbl, row.pk, row.at_ms) == (pair.spec.name, up.logged_key, up.logged_at_ms):
        return
    found = (
        f"has no row {up.seq}"
        if row is None
        else f"logs record {row.pk!r} of table {row.tbl!r} at {_moment(row.at_ms)} as row {up.seq}"
    )
    expected = (
        f"record {up.logged_key!r} at {_moment(up.logged_at_ms)}" if up.logged_key is not None else f"row {up.seq}"
    )
    raise StoreNotRecognized(
        f"table {pair.spec.name!r}: the local change log ({LOCAL_LOG.log}) {found}, where the central store "
        f"acknowledged pushing up to {expected}. {_what_to_do(pair.org_id, pair.source_id)}"
    )


def _check_pulled(local: Connection, pair: TablePair, acknowledged: int) -> None:
    taken = taken_position(local, pair)
    if taken is None:
        note_pulled(local, pair, acknowledged)  # pulled before these marks: taken as it is
    elif taken < acknowledged:
        raise StoreNotRecognized(
            f"table {pair.spec.name!r}: the local store has taken the central changes up to {taken} "
            f"({PULLED.name}), where the central store acknowledged bringing it those up to {acknowledged}. "
            f"{_what_to_do(pair.org_id, pair.source_id)}"
        )


def _token(local: Engine, source_id: str) -> str:
    with local.connect() as connection:
        if not inspect(connection).has_table(MARKS.name):
            return NO_TOKEN
        token = connection.execute(select(MARKS.c.token).where(MARKS.c.source_id == source_id)).scalar()
        return str(token) if token is not None else NO_TOKEN


def _give_token(central: Engine, local: Engine, source_id: str, found: str) -> None:
    """The central store expects a new token (the one the store holds still accepted), the store takes it, then the
    central store accepts it alone: cut off anywhere in between, the store holds a token still accepted."""
    token = secrets.token_hex(16)
    with Session(central) as session, session.begin():
        mark = session.get(SyncStoreMark, source_id) or SyncStoreMark(source_id=source_id)
        mark.token, mark.previous_token, mark.updated_at = token, found, utcnow()
        session.add(mark)
    with local.begin() as connection:
        create_marks(connection)
        this_source = MARKS.c.source_id == source_id
        if connection.execute(update(MARKS).where(this_source).values(token=token)).rowcount == 0:
            connection.execute(MARKS.insert().values(source_id=source_id, token=token))
    with Session(central) as session, session.begin():
        session.execute(
            update(SyncStoreMark)
            .where(SyncStoreMark.source_id == source_id, SyncStoreMark.token == token)
            .values(previous_token=None)
        )


def _what_to_do(org_id: str, source_id: str) -> str:
    return (
        f"{RESTORED}. To bring both sides back together, keeping the edits made since the restore, ask for a resync: "
        f"POST /v1/orgs/{org_id}/sync-sources/{source_id}/resync (org admin), which queues the job that does it"
    )


def _tables(names: list[str]) -> str:
    return f"table {names[0]!r}" if len(names) == 1 else f"tables {', '.join(repr(name) for name in names)}"


def _moment(at_ms: int | None) -> str:
    return datetime.fromtimestamp((at_ms or 0) / 1000, UTC).isoformat(timespec="milliseconds")
