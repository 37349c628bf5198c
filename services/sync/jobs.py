"""Running one sync job: every table of its source, both ways as declared, from the acknowledged watermarks."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, Engine, inspect
from sqlalchemy.exc import DBAPIError, NoSuchTableError, OperationalError
from sqlalchemy.orm import Session

from services.sync.changes import (
    CENTRAL_LOG,
    LOCAL_LOG,
    Change,
    create_log,
    has_triggers,
    install_triggers,
    log_existing,
    log_existing_again,
    now_ms,
    shut_out_writers,
    take_log_before_records,
)
from services.sync.column_types import as_stored, value_checks
from services.sync.context import SyncContext
from services.sync.deletions import create_deletion_notes
from services.sync.envelope import KeyNotHeld, Keyring, KeyRotated, load_keyring
from services.sync.pair import TablePair, Tally
from services.sync.resync import resync_asked, resync_if_asked
from services.sync.store_marks import check_positions, check_same_store, create_marks, recognize_store
from services.sync.stores import (
    add_new_columns,
    check_central_copy,
    check_key,
    check_written_down,
    ensure_central_table,
    open_local,
    reflect,
    refuse_kiln_database,
    refuse_unnamed_keys,
    widen_old_columns,
)
from services.sync.transfer import DeletionPutOff, sync_table
from services.sync.watermarks import WatermarkMoved, start_up_after
from shared.audit import record_change
from shared.db.models import Organization, SyncJob, SyncSource
from shared.db.row_locks import lock_row
from shared.db.session import SessionFactory, out_of_reach, session_scope
from shared.db.types import utcnow
from shared.errors import InvalidInput, KeptOnPremises, KilnError, TransientError
from shared.retries import gave_up
from shared.schemas import OrgConfig
from shared.source_lock import ConfirmHeld, SourceBusy, one_job_per_source
from shared.sync_jobs import (
    CANCELLED,
    FAILED,
    FINISHED,
    REFUSED,
    RETRYING,
    RUNNING,
    SUCCEEDED,
    deletion_refusal,
    message_for,
    residency_refusal,
    source_tables,
)
from shared.sync_tables import SyncTable, central_table_name

log = logging.getLogger(__name__)

AfterBatch = Callable[[Tally], None]

# A job's attempts: its first and the worker's automatic retries (services/sync/tasks.py). A message delivered again
# after its worker died starts an attempt too, so a job whose worker keeps dying also ends.
MAX_ATTEMPTS = 9


def run_job(context: SyncContext, job_id: str, *, after_batch: AfterBatch | None = None, last_try: bool = False) -> str:
    """Run the job and return its status. A store unreachable: the job reads `retrying` and TransientError is
    raised, to be retried (or, the central store unable to record it, the job is left `running` for the sync beat);
    the job then starts again from the watermarks its acknowledged batches left. Its last
    attempt (the MAX_ATTEMPTS-th, or `last_try`: the worker retries no more) ends it `failed` instead, with the
    error and the number of attempts; so does starting a job whose MAX_ATTEMPTS-th attempt never ended.

    One job of a source runs at a time: a second run of this one (its message delivered twice) or another job of
    the same source waits for the first to end, then finds the job finished or little left to move."""
    try:
        source_id = _source_id(context, job_id)
        if source_id is None:
            return "missing"
        with one_job_per_source(context.engine, source_id) as confirm_held:
            return _run(context, job_id, _confirming(context, job_id, confirm_held, after_batch), last_try=last_try)
    except OperationalError as error:
        raise TransientError(f"sync job {job_id}: the central store is unreachable") from error


def requeue_if_orphaned(central: Engine, sessions: SessionFactory, job_id: str, source_id: str) -> int | None:
    """Queue the job again, through the outbox, if it reads `running` while its source's lock is free; returns the
    message's id, or None (it runs, or ended). A job holds that lock for as long as it runs, and the death of its
    worker's process releases it (the PostgreSQL connection or the file closed with it): a job found so was left by
    a worker killed whole, whose message the broker would hand out again only after its visibility timeout (70
    minutes). The job reads `retrying`, saying so; or `failed`, out of attempts, as its next start would fail it."""
    try:
        with one_job_per_source(central, source_id, wait=False), session_scope(sessions) as session:
            job = _locked_job(session, job_id)
            if job is None or job.status != RUNNING:
                return None  # it ended while the lock was free, before this look took it
            if job.attempts >= MAX_ATTEMPTS:
                _close(session, job, FAILED, gave_up(_last_attempt(job), job.attempts))
                return None
            _close(session, job, RETRYING, f"{_last_attempt(job)}; queued again")
            return message_for(session, job).id
    except SourceBusy:
        return None


class JobCancelled(KilnError):
    """The job was cancelled (its task revoked in Flower) while it ran."""


def _confirming(
    context: SyncContext, job_id: str, confirm_held: ConfirmHeld, after_batch: AfterBatch | None
) -> AfterBatch:
    """After each batch, the job goes on only while it still holds the source's lock: once it is lost, the job
    stops as if the central store were out of reach, and is retried. Once it is cancelled, it stops: JobCancelled,
    the batches acknowledged so far kept, as after any batch."""

    def confirmed(tally: Tally) -> None:
        if after_batch is not None:
            after_batch(tally)
        confirm_held()
        if _status(context, job_id) == CANCELLED:
            raise JobCancelled(f"sync job {job_id} was cancelled")

    return confirmed


def _run(context: SyncContext, job_id: str, after_batch: AfterBatch, *, last_try: bool) -> str:
    started = _start(context, job_id)
    if started is None:
        return _status(context, job_id)
    source, attempt = started
    try:
        local = open_local(source.url, context.source_password(source), context.store_rules(source.org_id))
    except TransientError as error:  # the server's name does not resolve now, checked against KILN_STORE_NETWORKS
        return _retry_unreachable(context, job_id, attempt, error.message, last_try=last_try, error=error)
    except Exception as error:  # refused by the rules, a password under a key not configured, a driver not installed
        return _finish(context, job_id, FAILED, failure_reason(error))
    try:
        _sync_tables(context, local, source, job_id, after_batch)
    except OperationalError as error:
        return _retry_unreachable(context, job_id, attempt, _first_line(error), last_try=last_try, error=error)
    except WatermarkMoved as error:  # another job's batch was let in beside this one's: nothing is lost, it retries
        return _retry_or_fail(context, job_id, attempt, error.message, error.message, last_try=last_try, error=error)
    except KeptOnPremises as refusal:
        return _finish(context, job_id, REFUSED, refusal.message)  # the org turned local while the job ran
    except JobCancelled:
        return CANCELLED  # ended so by the cancel, which said why
    except Exception as error:
        # Anything else would fail again on the same batch: the job ends, and says why, rather than stay running.
        reason = failure_reason(error)
        log.error("sync job %s failed: %s\n%s", job_id, reason, traceback_of(error))
        return _finish(context, job_id, FAILED, reason)
    finally:
        local.dispose()
    return _finish(context, job_id, SUCCEEDED, None)


def _retry_unreachable(
    context: SyncContext, job_id: str, attempt: int, said: str, *, last_try: bool, error: Exception
) -> str:
    """A store out of reach, as `said`: the job is retried, unless this was its last attempt."""
    retrying, failing = f"a store was unreachable, retrying: {said}", f"a store was unreachable: {said}"
    return _retry_or_fail(context, job_id, attempt, retrying, failing, last_try=last_try, error=error)


def _retry_or_fail(
    context: SyncContext,
    job_id: str,
    attempt: int,
    retrying: str,
    failing: str,
    *,
    last_try: bool,
    error: Exception,
) -> str:
    """The job reads `retrying`, and TransientError has its task tried again; on its last attempt it fails. If the
    central store cannot record the retry, the job is left `running` for the sync beat to queue again once the store
    answers: a retry of the task's besides would run it twice."""
    if last_try or attempt >= MAX_ATTEMPTS:
        return _finish(context, job_id, FAILED, gave_up(failing, attempt))
    status = _record_end(context, job_id, RETRYING, retrying)
    if status != RETRYING:
        return status or RUNNING
    raise TransientError(f"sync job {job_id}: {retrying}") from error


class TableFailed(KilnError):
    """A table stopped on an error no refusal foresaw; its message names the table, its cause is the error."""


@contextmanager
def _naming_the_table(table: str) -> Iterator[None]:
    """Errors while `table` syncs name it, except a store out of reach (retried) and Kiln's own refusals (which
    name what they refuse already)."""
    try:
        yield
    except OperationalError as error:
        if out_of_reach(error):
            raise
        raise TableFailed(f"table {table!r}: {failure_reason(error)}") from error
    except KilnError:
        raise
    except Exception as error:
        raise TableFailed(f"table {table!r}: {failure_reason(error)}") from error


def failure_reason(error: Exception) -> str:
    """Why `error` stopped the work, in one line for a job's record or an audit row."""
    if isinstance(error, KilnError):
        return error.message
    if isinstance(error, DBAPIError) and isinstance(error.orig, Exception):
        error = error.orig  # the driver's words, without SQLAlchemy's wrapping and the statement
    return f"{type(error).__name__}: {_first_line(error)}"


def traceback_of(error: BaseException) -> str:
    """`error`'s traceback, causes first, each exception of the chain by its first line: the rest of a driver's
    message (PostgreSQL's DETAIL line) quotes the values of the row it refused, sensitive ones in plain text."""
    chain: list[BaseException] = []
    link: BaseException | None = error
    while link is not None and link not in chain:
        chain.insert(0, link)
        link = link.__cause__ or (None if link.__suppress_context__ else link.__context__)
    return "\nThe above exception led to the following one:\n\n".join(_frames_of(each) for each in chain)


def _frames_of(error: BaseException) -> str:
    frames = "".join(traceback.format_tb(error.__traceback__))
    return f"Traceback (most recent call last):\n{frames}{type(error).__name__}: {_first_line(error)}\n"


def _source_id(context: SyncContext, job_id: str) -> str | None:
    with session_scope(context.sessions) as session:
        job = session.get(SyncJob, job_id)
        return job.source_id if job is not None else None


def _start(context: SyncContext, job_id: str) -> tuple[SyncSource, int] | None:
    """Mark the job running and return its source and the attempt's number; None if it is finished already,
    refused now, or out of attempts (failed now). The job's row is read locked, so a request on the queued job
    (shared/sync_jobs.py, queue_sync_job) is seen: one joining it commits first, and what it wrote with it is there
    for the job to read; one coming after finds it running, and queues another."""
    with session_scope(context.sessions) as session:
        job = _locked_job(session, job_id)
        if job is None or job.status in FINISHED:
            return None
        if job.attempts >= MAX_ATTEMPTS:
            _close(session, job, FAILED, gave_up(_last_attempt(job), job.attempts))
            return None
        source = session.get_one(SyncSource, job.source_id)
        org_config = OrgConfig.model_validate(session.get_one(Organization, job.org_id).config)
        # A source being deleted runs nothing more: its deletion waits for this lock, then removes what a job uses.
        refusal = deletion_refusal(source) or residency_refusal(org_config, source)
        if refusal is not None:
            _close(session, job, REFUSED, refusal)
            return None
        job.status, job.attempts = RUNNING, job.attempts + 1
        job.started_at = job.started_at or utcnow()
        session.expunge(source)
        return source, job.attempts


def _last_attempt(job: SyncJob) -> str:
    """What became of the job's last attempt. Still `running` under the job's lock, it never ended: its worker died
    mid-run (the message came again), or the central store was out of reach when it would have said so."""
    if job.status == RUNNING or not job.errors:
        return f"attempt {job.attempts} never ended (its worker was lost, or the central store out of reach)"
    return str(job.errors[-1]["error"])


def _sync_tables(context: SyncContext, local: Engine, source: SyncSource, job_id: str, after_batch: AfterBatch) -> None:
    refuse_kiln_database(local, context.store_rules(source.org_id))
    check_same_store(context.engine, local, source)
    recognize_store(context.engine, local, source)
    offset_ms = _clock_offset(local, context.engine)
    keyring = _keyring(context, source.org_id)
    refusals = []
    put_off: list[TablePair] = []
    for spec in _referenced_first(local, source_tables(source)):
        with _naming_the_table(spec.name):
            try:
                pair = open_pair(context, local, source, spec, keyring=keyring, offset_ms=offset_ms, job_id=job_id)
            except InvalidInput as refusal:
                # Refused before anything was installed for it (its key's type, a column's name or type): the
                # source's tables cannot be changed, so the others sync on, and the job fails naming it at the end.
                refusals.append(refusal.message)
                continue
            if not resync_if_asked(pair):
                check_positions(pair)
            pair.after_batch = after_batch
            try:
                _sync_through_rotations(context, pair)
            except DeletionPutOff as refused:
                log.info("source %s: a deletion is put off until the other tables synced: %s", source.id, refused)
                put_off.append(pair)
        keyring = pair.keyring  # the new one, if a rotation came meanwhile
    for pair in put_off:  # tables synced after them may have deleted what pointed at the records they deleted
        with _naming_the_table(pair.spec.name):
            pair.keyring, pair.settle_refused_deletions = keyring, True
            _sync_through_rotations(context, pair)
            keyring = pair.keyring
    # A new token at the end too: a backup taken while this job ran holds the one it started with.
    recognize_store(context.engine, local, source)
    if refusals:
        raise InvalidInput("; ".join(refusals), field="tables")


def _referenced_first(local: Engine, specs: list[SyncTable]) -> list[SyncTable]:
    """The source's tables, each after those its foreign keys point at (else, and within a cycle, in the order they
    were registered): a central record and another pointing at it, inserted together, come down in an order the
    local store's checks take. Listed the other way, the second was refused, and left the central store."""
    names = {spec.name for spec in specs}
    inspector = inspect(local)
    pointed_at: dict[str, set[str]] = {}
    for spec in specs:
        try:
            keys = inspector.get_foreign_keys(spec.name)
        except NoSuchTableError:
            keys = []  # refused, naming it, when its turn comes
        pointed_at[spec.name] = {key["referred_table"] for key in keys} & names - {spec.name}
    ordered: list[SyncTable] = []
    waiting = list(specs)
    while waiting:
        placed = {spec.name for spec in ordered}
        ready = next((spec for spec in waiting if pointed_at[spec.name] <= placed), waiting[0])
        ordered.append(ready)
        waiting.remove(ready)
    return ordered


def _sync_through_rotations(context: SyncContext, pair: TablePair) -> None:
    """A key rotated while the table syncs rolls back the batch that would have sealed under the old key, or that
    met a central value resealed under the new one (a pull opens what it reads before it holds the key); the table
    goes on from its watermarks under the new one."""
    while True:
        try:
            sync_table(pair)
            return
        except KeyRotated:
            keyring = _keyring(context, pair.org_id)
        except KeyNotHeld as error:
            keyring = _keyring(context, pair.org_id)
            if error.key_id not in keyring.keys:
                raise ValueError(str(error)) from error  # the org no longer has it: the job fails, as it always has
        log.info(
            "source %s table %s: the org's key was rotated, going on under the new one", pair.source_id, pair.spec.name
        )
        pair.keyring = keyring


def _keyring(context: SyncContext, org_id: str) -> Keyring:
    with session_scope(context.sessions) as session:
        return load_keyring(session, context.secrets, org_id)


def open_pair(
    context: SyncContext,
    local: Engine,
    source: SyncSource,
    spec: SyncTable,
    *,
    keyring: Keyring,
    offset_ms: int,
    job_id: str | None,
) -> TablePair:
    """Both sides of a table, with change capture installed; the central copy made on its first sync.

    A local table with no central copy here (its source was deleted and it was registered again, or its first job
    stopped between the two) has its capture made anew for this registration's key: the triggers left by the one
    before logged each record by that one's key (another column, or the same one under its old name, which a
    PostgreSQL store's writes then fail on). Its records are logged once more, and the source's `up` position
    starts after the rows logged before: those name records by the old key, and the log holds only the edits made
    there, never the records the service wrote down, so read from its start it would leave those out of the new
    central copy."""
    central_name = central_table_name(source.id, spec.name)
    local_dialect = local.dialect.name
    with context.engine.connect() as connection:
        first_copy = not connection.dialect.has_table(connection, central_name)
    resyncing = resync_asked(context.engine, source.id, spec.name)
    logged_before: Change | None = None
    with local.begin() as connection:
        make_kiln_tables(connection)
        reflected = reflect(connection, spec.name)
        central_dialect = context.engine.dialect.name
        check_key(reflected, spec, local=connection.dialect, central_dialect=central_dialect)
        check_central_copy(reflected, spec, local_dialect=local_dialect, central_dialect=central_dialect)
        check_written_down(reflected, spec)
        refuse_unnamed_keys(connection, reflected, spec.primary_key)
        installed = has_triggers(connection, LOCAL_LOG, spec.name)
        if first_copy or not installed:
            install_triggers(connection, LOCAL_LOG, table=spec.name, key=spec.primary_key, logged_as=spec.name)
        take_log_before_records(connection, LOCAL_LOG, spec.name)  # a store whose triggers an older Kiln made
        if first_copy and spec.sends_up:
            logged_before = log_existing_again(connection, LOCAL_LOG, table=spec.name, key=spec.primary_key)
        elif not installed and not resyncing:
            # Not when a resync waits (a store put back from a backup taken before its first sync): its records are
            # the backup's, which the resync brings back together with the central copy. Logged now as edits, they
            # would win over every central change made since the backup.
            log_existing(connection, LOCAL_LOG, table=spec.name, key=spec.primary_key, logged_as=spec.name)
    with context.engine.begin() as connection:
        central_table = ensure_central_table(connection, reflected, spec, central_name, local_dialect=local_dialect)
        if logged_before is not None:
            start_up_after(connection, source.id, spec.name, logged_before)
        added = add_new_columns(connection, reflected, central_table, spec, local_dialect=local_dialect)
        widened = widen_old_columns(connection, reflected, central_table, spec, local_dialect=local_dialect)
        if added or widened:
            central_table = reflect(connection, central_name)
        # An embedded central store's triggers name the columns they watch: a column added needs them made again.
        if added or not has_triggers(connection, CENTRAL_LOG, central_name):
            install_triggers(connection, CENTRAL_LOG, table=central_name, key=spec.primary_key, logged_as=central_name)
        take_log_before_records(connection, CENTRAL_LOG, central_name)
    return TablePair(
        spec=spec,
        org_id=source.org_id,
        source_id=source.id,
        job_id=job_id,
        local=local,
        central=context.engine,
        local_table=as_stored(reflected) if local_dialect == "sqlite" else reflected,
        central_table=central_table,
        central_name=central_name,
        keyring=keyring,
        offset_ms=offset_ms,
        batch_size=context.settings.sync_batch_size,
        checks=value_checks(reflected, spec, local_dialect=local_dialect, central_dialect=context.engine.dialect.name),
    )


def make_kiln_tables(connection: Connection) -> None:
    """The store's change log, marks and deletion notes, each made if missing, taking turns with another job doing
    the same (two sources' first jobs on one store): a second CREATE of a table made meanwhile failed its job. On
    PostgreSQL the turns are the log's lock (a CREATE ... IF NOT EXISTS there may still collide); on SQLite its
    write lock, which the log's own IF NOT EXISTS statements leave to take."""
    postgresql = connection.dialect.name == "postgresql"
    if postgresql:
        shut_out_writers(connection, LOCAL_LOG)
    create_log(connection, LOCAL_LOG)
    if not postgresql:
        shut_out_writers(connection, LOCAL_LOG)
    create_marks(connection)
    create_deletion_notes(connection)


def _clock_offset(local: Engine, central: Engine) -> int:
    """How far the local store's clock runs ahead of the central one, in ms; local edits are stamped net of it."""
    with local.connect() as connection:
        local_ms = now_ms(connection)
    with central.connect() as connection:
        central_ms = now_ms(connection)
    return local_ms - central_ms


def _finish(context: SyncContext, job_id: str, status: str, error: str | None) -> str:
    """Record how the attempt ended; returns the job's status. A job cancelled meanwhile (after its last batch)
    stays cancelled."""
    return _record_end(context, job_id, status, error) or status


def _record_end(context: SyncContext, job_id: str, status: str, error: str | None) -> str | None:
    """The job's status once the attempt's end is recorded, or None if the central store could not record it: the
    job then reads `running` with its source's lock free, which the sync beat ends or queues again."""
    try:
        with session_scope(context.sessions) as session:
            job = _locked_job(session, job_id)
            if job is None or job.status in FINISHED:
                return job.status if job is not None else "missing"
            _close(session, job, status, error)
            return status
    except OperationalError:
        log.warning("sync job %s: cannot record status %s now", job_id, status, exc_info=True)
        return None


def _locked_job(session: Session, job_id: str) -> SyncJob | None:
    """The job's row, held until the commit, on SQLite too (which ignores FOR UPDATE): a request that joined it, or
    another end of it, committed first is seen, never overwritten."""
    lock_row(session, SyncJob.id, job_id, unchanged=SyncJob.status)
    return session.get(SyncJob, job_id, populate_existing=True)


def _close(session: Session, job: SyncJob, status: str, error: str | None) -> None:
    job.status = status
    if error is not None:
        job.errors = [*job.errors, {"at": utcnow().isoformat(), "error": error}]
    if status in FINISHED:
        job.finished_at = utcnow()
    detail = {"status": status, "pushed": job.pushed, "pulled": job.pulled, "conflicts": job.conflicts}
    if error is not None:
        detail["error"] = error
    record_change(session, org_id=job.org_id, actor="sync", action=f"sync.job.{status}", target=job.id, detail=detail)


def cancel_job(session: Session, job_id: str, reason: str) -> bool:
    """End the job `cancelled`, saying why, and audit it as every job's end is; False if it had ended already. Its
    row is read locked, so a worker's end of it committed meanwhile is seen here rather than overwritten."""
    job = _locked_job(session, job_id)
    if job is None or job.status in FINISHED:
        return False
    _close(session, job, CANCELLED, reason)
    return True


def _status(context: SyncContext, job_id: str) -> str:
    with session_scope(context.sessions) as session:
        job = session.get(SyncJob, job_id)
        return job.status if job is not None else "missing"


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
