"""Change capture: triggers that log every write to a synced table into the store's change log.

Both stores keep one: the local store's `_kiln_changes` (made here), the central one's `sync_changes` (a migration).
A log row says which record changed and when by that store's clock; the sync service's own writes are not
logged (SQLite: the triggers skip while the `applying` table holds a row inside its transaction; PostgreSQL: while
its transaction sets `kiln.applying`), so what it copies over is never sent back.

The central copies also carry each record's version and stamp, and their triggers set both at the edit itself:
the version goes up by one and the stamp orders after the one it replaced (services/sync/hlc.py, in SQL). The
change row keeps the replaced stamp, what a concurrent local edit was made against. Stamping at capture is what
lets a pull send central edits down as they are, without writing anything back to the central store.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from sqlalchemy import Connection, Table, text
from sqlalchemy.exc import OperationalError

from services.sync.records import Records
from services.sync.stores import STAMP, VERSION, key_text, quote_in_text
from shared.db.session import undecodable

logger = logging.getLogger(__name__)

ORIGIN_APP = "app"
# A record the sync service merged or restored in the central store and must still send down.
ORIGIN_MERGE = "merge"


@dataclass(frozen=True)
class ChangeLog:
    log: str
    applying: str
    # The logged tables carry `_kiln_version` and `_kiln_hlc`, set by a trigger at each edit.
    stamps: bool = False


LOCAL_LOG = ChangeLog(log="_kiln_changes", applying="_kiln_applying")
CENTRAL_LOG = ChangeLog(log="sync_changes", applying="sync_applying", stamps=True)


class Change(NamedTuple):
    """One log row. A tuple rather than a dataclass: a pull makes one per change, and a tuple is made the fastest."""

    seq: int
    key: str
    origin: str
    at_ms: int
    # Of a central update: the stamp the record carried before it.
    replaced: str | None = None


def now_ms_sql(dialect: str) -> str:
    if dialect == "postgresql":
        return "(extract(epoch from clock_timestamp()) * 1000)::bigint"
    return "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)"


def now_ms(connection: Connection) -> int:
    """This store's clock: what its triggers stamp changes with."""
    return int(connection.execute(text(f"SELECT {now_ms_sql(connection.dialect.name)}")).scalar_one())


def create_log(connection: Connection, log: ChangeLog) -> None:
    """A change log and its `applying` marker: the local store's, made on the first sync (the central one's is a
    migration's)."""
    serial = "BIGSERIAL" if connection.dialect.name == "postgresql" else "INTEGER"
    replaced = ", replaced VARCHAR(40)" if log.stamps else ""
    statements = [
        f"CREATE TABLE IF NOT EXISTS {log.log} (seq {serial} PRIMARY KEY, tbl VARCHAR(64) NOT NULL, "
        f"pk TEXT NOT NULL, origin VARCHAR(8) NOT NULL, at_ms BIGINT NOT NULL{replaced})",
        f"CREATE INDEX IF NOT EXISTS ix{log.log}_tbl_seq ON {log.log} (tbl, seq)",
        f"CREATE INDEX IF NOT EXISTS ix{log.log}_tbl_pk ON {log.log} (tbl, pk)",
        f"CREATE TABLE IF NOT EXISTS {log.applying} (id INTEGER PRIMARY KEY)",
    ]
    for statement in statements:
        connection.execute(text(statement))
    _widen_keys(connection, log)


def _widen_keys(connection: Connection, log: ChangeLog) -> None:
    """A log made before keys were text holds at most 200 characters: a longer key failed its trigger, and with it
    the application's own write. PostgreSQL enforces that length (SQLite does not): widen it once."""
    if connection.dialect.name != "postgresql":
        return
    query = "SELECT data_type FROM information_schema.columns WHERE table_name = :t AND column_name = 'pk'"
    if connection.execute(text(query), {"t": log.log}).scalar() == "character varying":
        connection.execute(text(f"ALTER TABLE {log.log} ALTER COLUMN pk TYPE text"))


def install_triggers(connection: Connection, log: ChangeLog, *, table: str, key: str, logged_as: str) -> None:
    """Log every insert, update and delete of `table` under the name `logged_as`, each record by its `key`. Safe to
    run again: triggers there already (made for another key, or for the key column under its old name) are made
    anew for this one, in the caller's transaction, so that no write to the table falls between the two."""
    if connection.dialect.name == "postgresql":
        _postgresql_triggers(connection, log, table=table, key=key, logged_as=logged_as)
    else:
        _sqlite_triggers(connection, log, table=table, key=key, logged_as=logged_as)


def has_triggers(connection: Connection, log: ChangeLog, table: str) -> bool:
    """Whether `table` has every trigger `log` needs; a central copy made before stamping at capture has not."""
    if connection.dialect.name != "postgresql":
        name = "_kiln_' || :t || '_insert_stamped" if log.stamps else "_kiln_' || :t || '_insert"
        query = f"SELECT 1 FROM sqlite_master WHERE type = 'trigger' AND name = '{name}'"
        return connection.execute(text(query), {"t": table}).first() is not None
    names = ["_kiln_capture", "_kiln_stamp"] if log.stamps else ["_kiln_capture"]
    query = "SELECT count(*) FROM pg_trigger WHERE tgname = ANY(:names) AND tgrelid = CAST(:t AS regclass)"
    regclass = connection.dialect.identifier_preparer.quote(table)
    found = connection.execute(text(query), {"t": regclass, "names": names}).scalar_one()
    return int(found) == len(names)


def log_existing(connection: Connection, log: ChangeLog, *, table: str, key: str, logged_as: str) -> None:
    """Records written before the triggers were installed: logged once, as if just written, so they go too."""
    quote = functools.partial(_quoted, connection)
    connection.execute(
        text(
            f"INSERT INTO {log.log} (tbl, pk, origin, at_ms) SELECT :t, CAST({quote(key)} AS TEXT), '{ORIGIN_APP}', "
            f"{now_ms_sql(connection.dialect.name)} FROM {quote(table)}"
        ),
        {"t": logged_as},
    )


def log_existing_again(connection: Connection, log: ChangeLog, *, table: str, key: str) -> Change | None:
    """A table a source starts syncing anew whose log may hold rows already (its triggers installed for a source
    since deleted, say, or left behind by a SQLite table made anew): its records are logged once more, since the
    log holds only what was edited there (never what the service wrote), and the table's last log row before them
    is returned, for the new source to start after it (None if there was none): those rows may name records by
    another key. Writers are shut out until the caller's transaction ends, so no edit falls between."""
    shut_out_writers(connection, log)
    query = text(f"SELECT seq, pk, origin, at_ms FROM {log.log} WHERE tbl = :t ORDER BY seq DESC LIMIT 1")
    try:
        row = connection.execute(query, {"t": table}).first()
    except OperationalError as error:
        if log != LOCAL_LOG or not undecodable(error):
            raise
        # Rows of the registration before, which no one reads any more (see _drop_undecodable): dropped with this
        # transaction, which has shut other writers out.
        undecodable_rows = _undecodable_rows(connection, log, table=table, after=0, limit=None)
        _drop_rows(connection, log, table=table, seqs=undecodable_rows)
        row = connection.execute(query, {"t": table}).first()
    log_existing(connection, log, table=table, key=key, logged_as=table)
    return None if row is None else Change(*row)


def _sqlite_triggers(connection: Connection, log: ChangeLog, *, table: str, key: str, logged_as: str) -> None:
    if log.stamps:
        _sqlite_stamping_triggers(connection, log, table=table, key=key, logged_as=logged_as)
        return
    quote = functools.partial(_quoted, connection)
    _begin_before_ddl(connection, log)
    for event, row in (("INSERT", "NEW"), ("UPDATE", "NEW"), ("DELETE", "OLD")):
        connection.execute(text(f"DROP TRIGGER IF EXISTS _kiln_{table}_{event.lower()}"))
        connection.execute(
            text(
                f"CREATE TRIGGER _kiln_{table}_{event.lower()} AFTER {event} ON {quote(table)} "
                f"WHEN NOT EXISTS (SELECT 1 FROM {log.applying}) BEGIN "
                f"INSERT INTO {log.log} (tbl, pk, origin, at_ms) VALUES "
                f"('{logged_as}', CAST({row}.{quote(key)} AS TEXT), '{ORIGIN_APP}', {now_ms_sql('sqlite')}); END"
            )
        )


def _sqlite_stamping_triggers(connection: Connection, log: ChangeLog, *, table: str, key: str, logged_as: str) -> None:
    """SQLite's triggers cannot change NEW: each logs the edit, then versions and stamps the record with an UPDATE
    of the sync columns alone, which no trigger watches (the update trigger is on the other columns only)."""
    quote = functools.partial(_quoted, connection)
    columns = [row[1] for row in connection.execute(text(f"PRAGMA table_info({quote(table)})"))]
    watched = ", ".join(quote(name) for name in columns if name not in (VERSION, STAMP))
    when = f"WHEN NOT EXISTS (SELECT 1 FROM {log.applying})"
    on, record = quote(table), quote(key)

    def logged(row: str, replaced: str) -> str:
        return (
            f"INSERT INTO {log.log} (tbl, pk, origin, at_ms, replaced) VALUES "
            f"('{logged_as}', CAST({row}.{record} AS TEXT), '{ORIGIN_APP}', {now_ms_sql('sqlite')}, {replaced});"
        )

    def stamped(version: str, replaced: str) -> str:
        return (
            f"UPDATE {on} SET {VERSION} = {version}, {STAMP} = {_sqlite_stamp(replaced)} WHERE {record} = NEW.{record};"
        )

    _begin_before_ddl(connection, log)
    triggers = {
        "insert": f"AFTER INSERT ON {on} {when} BEGIN {logged('NEW', 'NULL')} {stamped('1', 'NULL')} END",
        "update": f"AFTER UPDATE OF {watched} ON {on} {when} BEGIN {logged('NEW', f'OLD.{STAMP}')} "
        f"{stamped(f'coalesce(OLD.{VERSION}, 0) + 1', f'OLD.{STAMP}')} END",
        "delete": f"AFTER DELETE ON {on} {when} BEGIN {logged('OLD', 'NULL')} END",
    }
    for event, body in triggers.items():
        connection.execute(text(f"DROP TRIGGER IF EXISTS _kiln_{table}_{event}"))  # made before stamping at capture
        connection.execute(text(f"DROP TRIGGER IF EXISTS _kiln_{table}_{event}_stamped"))  # its columns may be new
        connection.execute(text(f"CREATE TRIGGER _kiln_{table}_{event}_stamped {body}"))


def _begin_before_ddl(connection: Connection, log: ChangeLog) -> None:
    """Python's sqlite3 begins a transaction at the first write, not at DDL, which it otherwise runs on its own: a
    write first, so that triggers dropped and made anew are one change, and no other writer's edit comes between."""
    shut_out_writers(connection, log)


def _sqlite_stamp(replaced: str) -> str:
    """hlc.stamp_edit in SQLite's SQL, for an edit on this store's clock (see _STAMP_FUNCTION)."""
    now, wall = now_ms_sql("sqlite"), f"CAST(substr({replaced}, 1, 15) AS INTEGER)"
    counter = f"CAST(substr({replaced}, 17, 5) AS INTEGER)"
    encoded = "printf('%015d.%05d.central', {}, {})"
    return (
        f"(CASE WHEN {replaced} IS NOT NULL AND {wall} >= {now} THEN {encoded.format(wall, counter + ' + 1')} "
        f"ELSE {encoded.format(now, 0)} END)"
    )


# On PostgreSQL, the sync service's own writes set `kiln.applying` for their transaction: no trigger acts on them.
_NOT_APPLYING = "WHEN (current_setting('kiln.applying', true) IS DISTINCT FROM 'on')"


def _postgresql_triggers(connection: Connection, log: ChangeLog, *, table: str, key: str, logged_as: str) -> None:
    on = _quoted(connection, table)
    _number_in_commit_order(connection, log)
    take_log_before_records(connection, log, table)
    connection.execute(text(_capture_function(log)))
    connection.execute(text(f"DROP TRIGGER IF EXISTS _kiln_capture ON {on}"))
    connection.execute(
        text(
            f"CREATE TRIGGER _kiln_capture AFTER INSERT OR UPDATE OR DELETE ON {on} FOR EACH ROW {_NOT_APPLYING} "
            f"EXECUTE FUNCTION {log.log}_capture('{logged_as}', '{key}')"
        )
    )
    if log.stamps:
        connection.execute(text(_STAMP_FUNCTION))
        connection.execute(text(f"DROP TRIGGER IF EXISTS _kiln_stamp ON {on}"))
        connection.execute(
            text(
                f"CREATE TRIGGER _kiln_stamp BEFORE INSERT OR UPDATE ON {on} FOR EACH ROW {_NOT_APPLYING} "
                "EXECUTE FUNCTION kiln_stamp_edit()"
            )
        )


def take_log_before_records(connection: Connection, log: ChangeLog, table: str) -> None:
    """Each statement writing to `table` takes the log's lock before it locks a record (PostgreSQL; safe to run again).

    A sync batch holds the log (shut_out_writers) and then locks the records it writes. The log's lock taken only
    as a change is logged, after the record is locked, would let an application's write and a batch each wait for
    the other, and the server would fail one of them; taken first, the write waits for the batch and then lands.
    A transaction that locks a record (SELECT ... FOR UPDATE) before its first write to the table still can."""
    if connection.dialect.name != "postgresql":
        return
    on = _quoted(connection, table)
    query = "SELECT 1 FROM pg_trigger WHERE tgname = '_kiln_log_first' AND tgrelid = CAST(:t AS regclass)"
    if connection.execute(text(query), {"t": on}).first() is not None:
        return
    connection.execute(
        text(
            f"""
            CREATE OR REPLACE FUNCTION {log.log}_first() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                PERFORM {_log_lock(log)};
                RETURN NULL;
            END $$
            """
        )
    )
    connection.execute(
        text(
            f"CREATE TRIGGER _kiln_log_first BEFORE INSERT OR UPDATE OR DELETE ON {on} FOR EACH STATEMENT "
            f"{_NOT_APPLYING} EXECUTE FUNCTION {log.log}_first()"
        )
    )


def _log_lock(log: ChangeLog) -> str:
    """The SQL taking the log's lock until the transaction ends: the one lock batches and writers take in turn."""
    return f"pg_advisory_xact_lock(hashtext('{log.log}'))"


def _number_in_commit_order(connection: Connection, log: ChangeLog) -> None:
    """Number the log's rows in the order their transactions commit (SQLite's single writer does so already).

    A sequence hands out numbers in call order, and two transactions may commit in the other order: a job reading
    in between would see the later number alone, move its watermark past the earlier one, and never read it. Each
    transaction writing to the log takes the log's lock before its number and holds it until it commits.
    """
    connection.execute(
        text(
            f"""
            CREATE OR REPLACE FUNCTION {log.log}_in_commit_order() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                PERFORM {_log_lock(log)};
                NEW.seq := nextval(pg_get_serial_sequence('{log.log}', 'seq'));
                RETURN NEW;
            END $$
            """
        )
    )
    connection.execute(text(f"DROP TRIGGER IF EXISTS _kiln_in_commit_order ON {log.log}"))
    connection.execute(
        text(
            f"CREATE TRIGGER _kiln_in_commit_order BEFORE INSERT ON {log.log} FOR EACH ROW "
            f"EXECUTE FUNCTION {log.log}_in_commit_order()"
        )
    )


def _capture_function(log: ChangeLog) -> str:
    """The logging trigger's function; on stamped tables it also keeps the stamp an update replaced."""
    columns, values = "tbl, pk, origin, at_ms", f"TG_ARGV[0], record_key, '{ORIGIN_APP}', {now_ms_sql('postgresql')}"
    keep_replaced = ""
    if log.stamps:
        columns, values = columns + ", replaced", values + ", replaced"
        keep_replaced = "IF TG_OP = 'UPDATE' THEN replaced := OLD._kiln_hlc; END IF;"
    return f"""
        CREATE OR REPLACE FUNCTION {log.log}_capture() RETURNS trigger LANGUAGE plpgsql AS $$
        DECLARE record_key text; replaced text;
        BEGIN
            IF TG_OP = 'DELETE' THEN
                EXECUTE format('SELECT ($1).%I::text', TG_ARGV[1]) INTO record_key USING OLD;
            ELSE
                EXECUTE format('SELECT ($1).%I::text', TG_ARGV[1]) INTO record_key USING NEW;
            END IF;
            {keep_replaced}
            INSERT INTO {log.log} ({columns}) VALUES ({values});
            RETURN NULL;
        END $$
        """


# hlc.stamp_edit in SQL, for an edit on the central clock: the edit's wall time, or the replaced stamp's with its
# counter one up when the clock has not moved past it; the version one up from the replaced one.
_STAMP_FUNCTION = f"""
    CREATE OR REPLACE FUNCTION kiln_stamp_edit() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        wall bigint := {now_ms_sql("postgresql")};
        counter integer := 0;
        previous text;
    BEGIN
        NEW._kiln_version := 1;
        IF TG_OP = 'UPDATE' THEN
            previous := OLD._kiln_hlc;
            NEW._kiln_version := coalesce(OLD._kiln_version, 0) + 1;
        END IF;
        IF previous IS NOT NULL AND split_part(previous, '.', 1)::bigint >= wall THEN
            wall := split_part(previous, '.', 1)::bigint;
            counter := split_part(previous, '.', 2)::integer + 1;
        END IF;
        NEW._kiln_hlc := lpad(wall::text, 15, '0') || '.' || lpad(counter::text, 5, '0') || '.central';
        RETURN NEW;
    END $$
    """


def shut_out_writers(connection: Connection, log: ChangeLog) -> None:
    """Until this transaction ends, no other can write to the store (SQLite) or log a change (PostgreSQL).

    A pull looks for local edits of its records and then writes them; an edit committed in between would be
    overwritten. SQLite takes its write lock only at a transaction's first write, so a write that changes nothing
    takes it now; on PostgreSQL, edits log under the lock that keeps the log in commit order.
    """
    if connection.dialect.name == "postgresql":
        connection.execute(text(f"SELECT {_log_lock(log)}"))
    else:
        connection.execute(text(f"DELETE FROM {log.applying} WHERE 0 = 1"))


def begin_applying(connection: Connection, log: ChangeLog) -> None:
    """From here to the end of the transaction, this connection's writes are not logged."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SET LOCAL kiln.applying = 'on'"))
    else:
        connection.execute(text(f"INSERT OR IGNORE INTO {log.applying} (id) VALUES (1)"))


def end_applying(connection: Connection, log: ChangeLog) -> None:
    """Before the commit, so that no other connection ever sees the marker."""
    if connection.dialect.name != "postgresql":
        connection.execute(text(f"DELETE FROM {log.applying}"))


def changes_after(connection: Connection, log: ChangeLog, *, table: str, after: int, limit: int) -> list[Change]:
    query = text(f"SELECT seq, pk, origin, at_ms FROM {log.log} WHERE tbl = :t AND seq > :after ORDER BY seq LIMIT :n")
    bound = {"t": table, "after": after, "n": limit}
    try:
        rows = connection.execute(query, bound).all()
    except OperationalError as error:
        if log != LOCAL_LOG or not undecodable(error):
            raise
        _drop_undecodable(connection, log, table=table, after=after, limit=limit)
        rows = connection.execute(query, bound).all()
    return [Change(*row) for row in rows]


def _drop_undecodable(connection: Connection, log: ChangeLog, *, table: str, after: int, limit: int) -> None:
    """A SQLite key held as a BLOB that is no UTF-8 (X'FF') is logged as text that is none either, which no read of
    the log gets past. Such a row names no record the central store can hold: the record, while its key is a BLOB,
    fails the job naming it (stores.refuse_unnamed_keys), and goes up once its key is text, logged anew by that edit.
    So the row is dropped from the log, and the edits logged around it go on. It is dropped in the caller's
    transaction: the push reads the log with other writers shut out, so a writer of its own would wait for it."""
    _drop_rows(
        connection, log, table=table, seqs=_undecodable_rows(connection, log, table=table, after=after, limit=limit)
    )


def _undecodable_rows(
    connection: Connection, log: ChangeLog, *, table: str, after: int, limit: int | None
) -> list[int]:
    rows = connection.execute(
        text(
            f"SELECT seq, hex(pk) FROM {log.log} WHERE tbl = :t AND seq > :after ORDER BY seq"
            + (" LIMIT :n" if limit is not None else "")
        ),
        {"t": table, "after": after, "n": limit},
    )
    return [seq for seq, hexed in rows if not _utf8(bytes.fromhex(hexed))]


def _drop_rows(connection: Connection, log: ChangeLog, *, table: str, seqs: list[int]) -> None:
    if not seqs:
        return
    for start in range(0, len(seqs), 500):
        chunk = seqs[start : start + 500]
        connection.execute(text(f"DELETE FROM {log.log} WHERE seq IN ({_placeholders(len(chunk))})"), _bind(chunk))
    logger.warning(
        "%s: dropped %d rows of table %s whose keys are no UTF-8 (BLOB keys), the first %s",
        log.log,
        len(seqs),
        table,
        seqs[:10],
    )


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode()
    except UnicodeDecodeError:
        return False
    return True


def changed_records(
    connection: Connection, log: ChangeLog, *, table: Table, key: str, logged_as: str, after: int, last: int
) -> Records:
    """The records logged as changed in (after, last], by key text: one query over the log range, where a list of
    keys would cost a bound parameter per key. A deleted record is absent."""
    quote = functools.partial(_quoted, connection)
    key_type = table.c[key].type.compile(dialect=connection.dialect)
    logged = f"SELECT CAST(pk AS {key_type}) FROM {log.log} WHERE tbl = :t AND seq > :after AND seq <= :last"
    # PostgreSQL plans `IN (subquery)` as a hash join over the whole table; over an array it probes the key's index.
    among = f"= ANY(ARRAY({logged}))" if connection.dialect.name == "postgresql" else f"IN ({logged})"
    names = [column.name for column in table.columns]
    query = text(
        f"SELECT {', '.join(quote(name) for name in names)} FROM {quote(table.name)} WHERE {quote(key)} {among}"
    ).columns(*table.columns)
    rows = connection.execute(query, {"t": logged_as, "after": after, "last": last}).all()
    at = names.index(key)
    # Plain tuples, which the garbage collector stops tracking, where a batch of SQLAlchemy rows kept until the
    # write stays tracked: 3 full collections rather than 4 per 100k records pulled, ~55 ms each (bench/sync.py).
    return Records(names, {key_text(row[at]): tuple(row) for row in rows})


def first_change(connection: Connection, log: ChangeLog, *, table: str, key: str, after: int) -> Change | None:
    """The earliest change of one record after `after`, with the stamp it replaced."""
    row = connection.execute(
        text(
            f"SELECT seq, pk, origin, at_ms, replaced FROM {log.log} WHERE tbl = :t AND pk = :k AND seq > :after "
            "ORDER BY seq LIMIT 1"
        ),
        {"t": table, "k": key, "after": after},
    ).first()
    return None if row is None else Change(*row)


def pending(
    connection: Connection, log: ChangeLog, *, table: str, keys: Iterable[str], after: int
) -> dict[str, Change]:
    """The latest change after `after` of each of `keys` that has one: records changed since that position.

    Unordered, so that SQLite looks each key up by its index rather than walking the log from `after` in order: a
    push batch asks of the changes past its end, the whole backlog behind it (30 ms against 1 ms for 500 keys
    ahead of 100,000 changes)."""
    found: dict[str, Change] = {}
    key_list = list(keys)
    for start in range(0, len(key_list), 500):
        rows = connection.execute(
            text(
                f"SELECT seq, pk, origin, at_ms FROM {log.log} WHERE tbl = :t AND seq > :after "
                f"AND pk IN ({_placeholders(len(key_list[start : start + 500]))})"
            ),
            {"t": table, "after": after, **_bind(key_list[start : start + 500])},
        )
        for seq, key, origin, at_ms in rows:
            if key not in found or seq > found[key].seq:
                found[key] = Change(seq, key, origin, at_ms)
    return found


def forget(connection: Connection, log: ChangeLog, *, table: str, keys: Iterable[str], after: int) -> None:
    """Drop the pending changes of records whose conflict was just resolved: they are folded into the result."""
    key_list = list(keys)
    if key_list:
        connection.execute(
            text(f"DELETE FROM {log.log} WHERE tbl = :t AND seq > :after AND pk IN ({_placeholders(len(key_list))})"),
            {"t": table, "after": after, **_bind(key_list)},
        )


def log_merges(connection: Connection, *, table: str, merges: Mapping[str, str | None], at_ms: int) -> None:
    """Log in the central log the records the local store must take from the central one. `merges` maps each key to
    the stamp of the version the local store holds until then, or None: kept as the row's `replaced`, it is what a
    local edit made before the pull was made against."""
    rows = [{"t": table, "k": key, "o": ORIGIN_MERGE, "at": at_ms, "r": held} for key, held in merges.items()]
    if rows:
        connection.execute(
            text(f"INSERT INTO {CENTRAL_LOG.log} (tbl, pk, origin, at_ms, replaced) VALUES (:t, :k, :o, :at, :r)"),
            rows,
        )


def _quoted(connection: Connection, name: str) -> str:
    """A table or column name, quoted, for the text() statements here (stores.quote_in_text: a colon escaped)."""
    return quote_in_text(connection, name)


def _placeholders(count: int) -> str:
    return ", ".join(f":k{index}" for index in range(count))


def _bind(keys: Sequence[str | int]) -> dict[str, str | int]:
    return {f"k{index}": key for index, key in enumerate(keys)}
