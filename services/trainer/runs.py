"""A training run's row through one attempt: claimed with a lease and a fencing token, progress and log lines
while it works, and one end. Every write of an attempt names its token and needs its lease live, so an attempt
whose lease ran out (its worker stalled, or presumed dead) or was taken over can no longer change the run.

Leases are set and judged by one clock, the database's: workers whose clocks disagree still agree on whose lease
is live, and a lease a claim counted as free is one its attempt can no longer renew."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Interval, delete, func, literal, select, update
from sqlalchemy.orm import Session

from shared.audit import record_change
from shared.cancellation import request_cancel
from shared.db.models import CandidateFolder, Dataset, DataSource, ModelVersion, Organization, RunLog, TrainingRun
from shared.db.row_locks import hold_sqlite_write_lock
from shared.db.session import SessionFactory, session_scope
from shared.db.types import UTCDateTime, utcnow
from shared.errors import KilnError
from shared.org_lock import lock_org
from shared.retries import gave_up
from shared.schemas import NUL, OrgConfig, TrainingConfig
from shared.submissions import message_for

TERMINAL = ("succeeded", "rejected", "failed", "cancelled")
# A run's error is stored, logged and returned by every listing of runs: whatever a reason quotes (a path a script
# made, a traceback), it is cut to this many characters, its start and end kept.
MAX_REASON_CHARS = 4000
_CUT = " […] "
# Runs whose lost message a sweep queues again, at most, oldest first, of as many looked at: a pass stays short
# whatever the backlog.
REQUEUE_AT_ONCE = 100
REQUEUE_LOOKED_AT = 1000


class LeaseLost(KilnError):
    """Another attempt holds the run now: this one must stop without writing."""


class Cancelled(KilnError):
    """A cancel was asked for while the attempt ran."""


@dataclass(frozen=True)
class DatasetSource:
    object_key: str
    timestamp_column: str | None


@dataclass(frozen=True)
class DatabaseSource:
    url: str
    password_encrypted: str | None
    table: str
    timestamp_column: str | None
    column_map: dict[str, str]


@dataclass(frozen=True)
class Attempt:
    """A claimed run, detached from the database: what the pipeline needs, and the token its writes carry."""

    run_id: str
    org_id: str
    number: int
    token: int
    config: TrainingConfig
    org_config: OrgConfig
    source: DatasetSource | DatabaseSource

    @property
    def holdout_on_premises(self) -> bool:
        """Where this attempt writes its held-out rows, and what its version records: by the org's config as the
        run was claimed, which a change to the org's residency later does not move."""
        return self.org_config.data_residency == "local"


class NoSlot(KilnError):
    """The org already runs as many trainings as it may; the run waits, marked, until a slot frees."""


class NotOnPremises(KilnError):
    """The run's org keeps its data on its premises, and this worker is not one of its own: the run's message is
    queued again for them."""


# How long a run a worker may not take waits before its message is queued again: its org's own workers may not be
# listening yet, and a worker still on the org's queue would otherwise take it back at once.
NOT_HERE_WAIT = timedelta(seconds=5)


def claim_run(
    sessions: SessionFactory, run_id: str, *, worker: str, lease_s: float, premises_orgs: frozenset[str] = frozenset()
) -> Attempt | None:
    """Take a queued run for this worker; None when it is not queued (a repeated message, a cancelled run).

    Raises NotOnPremises when the run's org keeps its data on its premises and this worker is not one of its own
    (`premises_orgs`, KILN_WORKER_ORGS): a central worker fetched its message before the org turned local. The run
    stays queued, and its message is queued again, for the org's own workers.

    Raises NoSlot when the org's maxConcurrentTrainings are all taken across the workers: the run is marked as
    waiting, and whoever frees a slot sends it a message again.
    """
    with session_scope(sessions) as session:
        # On SQLite the run is read under the database's write lock (all its writers wait, for a few reads). The
        # org's lock (lock_org) would do that too, but names the org, which a claim learns only from the run.
        hold_sqlite_write_lock(session, Organization.id)
        run = session.get(TrainingRun, run_id)
        if run is None or run.status != "queued":
            return None
        if run.cancel_requested:  # asked to cancel, yet left queued: no worker may start it, so it ends cancelled
            request_cancel(session, run_id)
            return None
        org_config = _locked_org_config(session, run.org_id)
        # Another delivery of this run's message may have claimed it while this one waited for the lock.
        session.refresh(run)
        if run.status != "queued":
            return None
        raise_after_commit: KilnError | None
        if org_config.data_residency == "local" and run.org_id not in premises_orgs:
            message_for(session, run_id, run.org_id, send_after=NOT_HERE_WAIT)
            raise_after_commit = NotOnPremises(
                f"organization {run.org_id} keeps its data on its premises: left to its own workers"
            )
        elif running_count(session, run.org_id) >= org_config.max_concurrent_trainings:
            run.waiting_for_slot = True
            raise_after_commit = NoSlot(f"organization {run.org_id} has no free training slot")
        else:
            raise_after_commit = None
            claimed = session.execute(
                update(TrainingRun)
                .where(
                    TrainingRun.id == run_id, TrainingRun.status == "queued", TrainingRun.cancel_requested.is_(False)
                )
                .values(
                    status="running",
                    attempts=TrainingRun.attempts + 1,
                    claim_token=TrainingRun.claim_token + 1,
                    lease_expires_at=_clock(session, plus_s=lease_s),
                    worker=worker,
                    started_at=utcnow(),
                    error=None,
                    waiting_for_slot=False,
                    progress={"stage": "starting", "percent": 0},
                )
                # The claim's own number and token: read after the commit, they could be a later claim's, had the
                # lease run out meanwhile and another worker taken the run over.
                .returning(TrainingRun.attempts, TrainingRun.claim_token)
            ).first()
            if claimed is None:
                return None
            number, token = claimed
    if raise_after_commit is not None:
        raise raise_after_commit
    with sessions() as session:
        run = session.get_one(TrainingRun, run_id)
        return Attempt(
            run_id=run.id,
            org_id=run.org_id,
            number=number,
            token=token,
            config=TrainingConfig.model_validate(run.config),
            org_config=org_config,
            source=_source(session, run),
        )


def _locked_org_config(session: Session, org_id: str) -> OrgConfig:
    """The org's config, read holding the org's lock (shared/org_lock.py) until the commit: the org's claims take
    turns, so the running count each reads after this cannot go stale."""
    lock_org(session, org_id)
    return OrgConfig.model_validate(session.get_one(Organization, org_id, populate_existing=True).config)


def _clock(session: Session, *, plus_s: float = 0) -> ColumnElement[Any]:
    """Now (plus `plus_s` seconds) by the database's clock. PostgreSQL's server keeps its own; a SQLite database is
    a file on the machine of every process that opens it, whose clock is this one."""
    if session.get_bind().dialect.name == "postgresql":
        now = func.statement_timestamp(type_=UTCDateTime())
        return now + literal(timedelta(seconds=plus_s), Interval()) if plus_s else now
    return literal(utcnow() + timedelta(seconds=plus_s), UTCDateTime())


def running_count(session: Session, org_id: str) -> int:
    """Runs holding a slot: running with a live lease. A dead worker's run stops counting when its lease ends, and
    its attempt can renew that lease no more (see renew_lease)."""
    return int(
        session.scalar(
            select(func.count())
            .select_from(TrainingRun)
            .where(
                TrainingRun.org_id == org_id,
                TrainingRun.status == "running",
                TrainingRun.lease_expires_at > _clock(session),
            )
        )
        or 0
    )


def wake_waiting(session: Session, org_id: str) -> list[int]:
    """Send a message to as many of the org's runs waiting for a slot as there are free slots; oldest first."""
    free = _locked_org_config(session, org_id).max_concurrent_trainings - running_count(session, org_id)
    if free <= 0:
        return []
    waiting = session.scalars(
        select(TrainingRun)
        .where(TrainingRun.org_id == org_id, TrainingRun.status == "queued", TrainingRun.waiting_for_slot.is_(True))
        .order_by(TrainingRun.created_at)
        .limit(free)
        .with_for_update(skip_locked=True)
    ).all()
    messages = []
    for run in waiting:
        run.waiting_for_slot = False
        messages.append(message_for(session, run.id, org_id).id)
    return messages


def wake_all_waiting(sessions: SessionFactory) -> list[int]:
    """The safety net, run by every worker's sweep: any org with waiting runs and a free slot gets messages."""
    with session_scope(sessions) as session:
        orgs = session.scalars(
            select(TrainingRun.org_id)
            .where(TrainingRun.status == "queued", TrainingRun.waiting_for_slot.is_(True))
            .distinct()
        ).all()
        return [message for org_id in orgs for message in wake_waiting(session, org_id)]


def _source(session: Session, run: TrainingRun) -> DatasetSource | DatabaseSource:
    if run.dataset_id is not None:
        dataset = session.get_one(Dataset, run.dataset_id)
        return DatasetSource(object_key=dataset.object_key, timestamp_column=dataset.timestamp_column)
    datasource = session.get(DataSource, run.org_id)
    if datasource is None:
        raise KilnError("the organization's datasource was removed after the run was queued")
    return DatabaseSource(
        url=datasource.url,
        password_encrypted=datasource.password_encrypted,
        table=datasource.table_name,
        timestamp_column=datasource.timestamp_column,
        column_map=dict(datasource.column_map),
    )


def _holds(session: Session, attempt: Attempt) -> list[ColumnElement[bool]]:
    """The attempt still holds its run: its token, still running, its lease not run out. A lease that ran out is
    lost even before a sweep hands the run back: a claim may have counted its slot free already."""
    return [
        TrainingRun.id == attempt.run_id,
        TrainingRun.claim_token == attempt.token,
        TrainingRun.status == "running",
        lease_live(session),
    ]


def lease_live(session: Session) -> ColumnElement[bool]:
    return TrainingRun.lease_expires_at > _clock(session)


def check_held(session: Session, attempt: Attempt) -> None:
    """Raises LeaseLost when the attempt no longer holds its run."""
    _cancel_flag(session, attempt)


def _fenced(session: Session, attempt: Attempt, **values: Any) -> Any:
    return update(TrainingRun).where(*_holds(session, attempt)).values(**values)


def _lost(attempt: Attempt) -> LeaseLost:
    return LeaseLost(
        f"run {attempt.run_id}: attempt {attempt.number} no longer holds it (its lease ran out or was taken over)"
    )


def _write_fenced(session: Session, attempt: Attempt, **values: Any) -> None:
    if session.execute(_fenced(session, attempt, **values)).rowcount != 1:  # type: ignore[attr-defined]
        raise _lost(attempt)


def renew_lease(sessions: SessionFactory, attempt: Attempt, *, lease_s: float) -> bool:
    """Extend a lease still live; returns whether a cancel was asked for. Raises LeaseLost when the lease ran out or
    the run was taken over: the attempt must stop.

    A renewal takes its turn with the org's claims (a share of the org's row lock; SQLite's write lock), so a claim
    counting the org's live leases never sees this one expired and then live again."""
    with session_scope(sessions) as session:
        hold_sqlite_write_lock(session, Organization.id)
        session.execute(select(Organization.id).where(Organization.id == attempt.org_id).with_for_update(read=True))
        _write_fenced(session, attempt, lease_expires_at=_clock(session, plus_s=lease_s))
        return bool(session.get_one(TrainingRun, attempt.run_id).cancel_requested)


def _lock_org_before_the_run(session: Session, attempt: Attempt) -> None:
    """First in a transaction that ends an attempt (and wakes the org's waiting runs, which takes the org's lock):
    the org's lock before the run's row, the order the attempt's own heartbeat takes them in as it renews the lease
    (a share of the org's row, then the run's). In the other order the two could wait for each other, and
    PostgreSQL would fail one of them: perhaps the registration of a version trained and judged."""
    lock_org(session, attempt.org_id)


def _write_uncancelled(session: Session, attempt: Attempt, **values: Any) -> None:
    """A fenced write that lands only while no cancel was asked for. A cancel accepted first wins: the update
    waits for its row lock and then finds the flag set. Raises Cancelled, or LeaseLost when the run was taken over."""
    written = session.execute(_fenced(session, attempt, **values).where(TrainingRun.cancel_requested.is_(False)))
    if written.rowcount == 1:  # type: ignore[attr-defined]
        return
    if _cancel_flag(session, attempt):
        raise Cancelled(f"run {attempt.run_id} was cancelled")
    raise _lost(attempt)


def _cancel_flag(session: Session, attempt: Attempt, *, lock: bool = False) -> bool:
    """Whether a cancel was asked for; raises LeaseLost when the attempt no longer holds the run. With `lock`, the
    row stays locked until the commit, so no cancel lands meanwhile."""
    query = select(TrainingRun.cancel_requested).where(*_holds(session, attempt))
    flag = session.scalar(query.with_for_update() if lock else query)
    if flag is None:
        raise _lost(attempt)
    return bool(flag)


def cancel_requested(sessions: SessionFactory, attempt: Attempt) -> bool:
    """A read-only look at the run: was a cancel asked for? Raises LeaseLost when the lease ran out or the run was
    taken over, so the heartbeat's check every CHECK_S notices a lost lease as soon as a cancel."""
    with sessions() as session:
        return _cancel_flag(session, attempt)


def set_progress(
    sessions: SessionFactory, attempt: Attempt, stage: str, percent: int, *, log: str | None = None
) -> None:
    """The run's stage and percent done; with `log`, a log line of that stage in the same transaction."""
    stage = _storable(stage)
    with session_scope(sessions) as session:
        _write_fenced(session, attempt, progress={"stage": stage, "percent": percent})
        if log is not None:
            message = _storable(log)
            session.add(
                RunLog(run_id=attempt.run_id, attempt=attempt.number, level="info", stage=stage, message=message)
            )


def log(sessions: SessionFactory, attempt: Attempt, stage: str, message: str, *, level: str = "info") -> None:
    with session_scope(sessions) as session:
        session.add(
            RunLog(
                run_id=attempt.run_id,
                attempt=attempt.number,
                level=level,
                stage=_storable(stage),
                message=_storable(message),
            )
        )


def finish(sessions: SessionFactory, attempt: Attempt, status: str, reason: str | None) -> str:
    """End the run as failed or cancelled, with the reason, and return how it ended. A run failing after a cancel was
    accepted ends cancelled, as the 202 promised, its failure kept as the reason: the row is locked as it is read, so a
    cancel comes either before (and counts) or after (and finds the run ended: 409)."""
    with session_scope(sessions) as session:
        _lock_org_before_the_run(session, attempt)
        if status != "cancelled" and _cancel_flag(session, attempt, lock=True):
            status, reason = "cancelled", f"cancelled on request; the attempt had failed: {reason}"
        reason = reason and _bounded(reason)
        _write_fenced(
            session,
            attempt,
            status=status,
            error=reason,
            finished_at=utcnow(),
            lease_expires_at=None,
            progress={"stage": status, "percent": 100},
        )
        session.add(
            RunLog(
                run_id=attempt.run_id,
                attempt=attempt.number,
                level="error" if status == "failed" else "info",
                stage=status,
                message=reason or status,
            )
        )
        wake_waiting(session, attempt.org_id)
    return status


def requeue(sessions: SessionFactory, attempt: Attempt, reason: str, *, countdown_s: float) -> None:
    """Put the run back in the queue for another attempt after `countdown_s`: its message waits in the outbox that
    long, and a sweep (any worker's, or the api's) sends it then, for whichever worker is free.

    Raises Cancelled when a cancel was asked for: no worker would claim the run again, and it would stay queued."""
    reason = _bounded(reason)
    with session_scope(sessions) as session:
        _lock_org_before_the_run(session, attempt)
        _write_uncancelled(
            session,
            attempt,
            status="queued",
            error=reason,
            lease_expires_at=None,
            progress={"stage": "retrying", "percent": 0},
        )
        session.add(
            RunLog(
                run_id=attempt.run_id,
                attempt=attempt.number,
                level="warning",
                stage="retrying",
                message=f"{reason}; retrying in {countdown_s:g} s",
            )
        )
        wake_waiting(session, attempt.org_id)
        message_for(session, attempt.run_id, attempt.org_id, send_after=timedelta(seconds=countdown_s))


@dataclass(frozen=True)
class TrainedVersion:
    version: str
    sha256: str
    size_bytes: int
    artifact_prefix: str
    feature_columns: list[str]
    target_column: str
    classes: list[Any]
    metrics: dict[str, Any]
    validation: dict[str, Any]

    @property
    def passed(self) -> bool:
        return bool(self.validation["passed"])


def register_version(sessions: SessionFactory, attempt: Attempt, trained: TrainedVersion) -> str:
    """Record the version and end the run in one transaction: succeeded when every gate passed, else rejected.

    Raises Cancelled, recording nothing, when a cancel was accepted first: the caller removes the artifacts."""
    status = "succeeded" if trained.passed else "rejected"
    error = None if trained.passed else "validation failed: " + ", ".join(trained.validation["failed"])
    with session_scope(sessions) as session:
        _lock_org_before_the_run(session, attempt)
        _write_uncancelled(
            session,
            attempt,
            status=status,
            version=trained.version,
            error=error,
            finished_at=utcnow(),
            lease_expires_at=None,
            progress={"stage": status, "percent": 100},
        )
        session.add(
            ModelVersion(
                version=trained.version,
                org_id=attempt.org_id,
                run_id=attempt.run_id,
                status="validated" if trained.passed else "rejected",
                sha256=trained.sha256,
                size_bytes=trained.size_bytes,
                artifact_prefix=trained.artifact_prefix,
                feature_columns=trained.feature_columns,
                target_column=trained.target_column,
                classes=trained.classes,
                metrics=trained.metrics,
                validation=trained.validation,
                validated_at=utcnow(),
                holdout_on_premises=attempt.holdout_on_premises,
            )
        )
        forget_candidate(session, trained.artifact_prefix)
        wake_waiting(session, attempt.org_id)
    return status


def forget_candidate(session: Session, prefix: str) -> None:
    """The candidate's folder (CandidateFolder) is a registered version's, or gone: nothing is left to remove."""
    session.execute(delete(CandidateFolder).where(CandidateFolder.prefix == prefix))


def reap_expired(sessions: SessionFactory, *, max_attempts: int, retry_backoff_s: float) -> list[int]:
    """Runs whose worker stopped renewing its lease: back to the queue (returns the outbox message ids), failed
    once out of attempts, or cancelled when a cancel was asked for. Queued runs asked to cancel, which no worker
    would claim, end cancelled too. A run queued again waits the backoff of any other retry: a script that takes
    its worker down (out of memory, say) would otherwise spend its attempts back to back."""
    messages = []
    with session_scope(sessions) as session:
        expired = session.scalars(
            select(TrainingRun)
            .where(TrainingRun.status == "running", TrainingRun.lease_expires_at < _clock(session))
            .with_for_update(skip_locked=True)
        ).all()
        for run in expired:
            status = _hand_back(session, run, max_attempts, retry_backoff_s)
            if status == "queued":
                backoff = timedelta(seconds=retry_backoff(retry_backoff_s, run.attempts))
                messages.append(message_for(session, run.id, run.org_id, send_after=backoff).id)
        _cancel_stranded(session)
    return messages


def requeue_lost(sessions: SessionFactory, *, after: timedelta) -> list[int]:
    """Queue again the message of each run still queued `after` its message was (the broker's visibility timeout),
    or, for a run queued again before, as long again as it had waited: Redis restarted without its append-only
    file, or its queue purged, loses messages, and a run whose message is gone would wait for ever. Waits that
    double keep an org whose own workers are offline for a weekend from getting a copy of each run's message, and
    an audit row, every timeout. Not a run waiting for a slot, which has no message by design. A copy of a message
    that was only waiting behind a long backlog is harmless: a run is claimed once, and the later copy does nothing.
    Returns the outbox message ids."""
    messages: list[int] = []
    now = utcnow()
    with session_scope(sessions) as session:
        queued_at = func.coalesce(TrainingRun.message_queued_at, TrainingRun.created_at)
        candidates = session.scalars(
            select(TrainingRun)
            .where(
                TrainingRun.status == "queued",
                TrainingRun.waiting_for_slot.is_(False),
                TrainingRun.cancel_requested.is_(False),
                queued_at < now - after,
            )
            .order_by(queued_at)
            .limit(REQUEUE_LOOKED_AT)
            .with_for_update(skip_locked=True)
        ).all()
        due = [run for run in candidates if _waited_as_long_again(run, now=now, after=after)]
        for run in due[:REQUEUE_AT_ONCE]:
            last = run.message_queued_at or run.created_at
            messages.append(message_for(session, run.id, run.org_id).id)
            record_change(
                session,
                org_id=run.org_id,
                actor="trainer",
                action="training.requeued",
                target=run.id,
                detail={"messageQueuedAt": last.isoformat()},
            )
    return messages


def retry_backoff(first_s: float, attempt: int) -> float:
    """How long a run waits before the attempt after `attempt`: `first_s`, doubled for each attempt since the first."""
    return first_s * 2.0 ** (attempt - 1)


def _hand_back(session: Session, run: TrainingRun, max_attempts: int, retry_backoff_s: float) -> str | None:
    """End a lost attempt: queued again, failed, or cancelled; None when the run is no longer that attempt's.

    A cancel may land between the read above and this write (SQLite has no row lock to keep it out): the update
    lands only on the cancel flag it was decided on, and is decided again when the flag changed."""
    cancel = run.cancel_requested
    while True:
        status, reason = _after_lost_worker(run, max_attempts, retry_backoff_s, cancel=cancel)
        taken = session.execute(
            update(TrainingRun)
            .where(
                TrainingRun.id == run.id,
                TrainingRun.claim_token == run.claim_token,
                TrainingRun.status == "running",
                TrainingRun.cancel_requested.is_(cancel),
            )
            .values(
                status=status,
                error=reason,
                lease_expires_at=None,
                finished_at=None if status == "queued" else utcnow(),
                progress={"stage": "retrying" if status == "queued" else status, "percent": 0},
            )
        )
        if taken.rowcount == 1:  # type: ignore[attr-defined]
            break
        flag = session.scalar(
            select(TrainingRun.cancel_requested).where(
                TrainingRun.id == run.id, TrainingRun.claim_token == run.claim_token, TrainingRun.status == "running"
            )
        )
        if flag is None or flag == cancel:
            return None
        cancel = flag
    session.add(RunLog(run_id=run.id, attempt=run.attempts, level="warning", stage=status, message=reason))
    return status


def _bounded(reason: str) -> str:
    """`reason`, storable and cut to MAX_REASON_CHARS in its middle when longer."""
    reason = _storable(reason)
    if len(reason) <= MAX_REASON_CHARS:
        return reason
    half = (MAX_REASON_CHARS - len(_CUT)) // 2
    return reason[:half] + _CUT + reason[-half:]


def _storable(text: str) -> str:
    """`text` with each NUL written as the four characters \\x00: what a script prints may hold one, which PostgreSQL's
    text refuses (the write failed, and the failed run read running until its lease ran out)."""
    return text.replace(NUL, "\\x00")


def _waited_as_long_again(run: TrainingRun, *, now: datetime, after: timedelta) -> bool:
    """Whether the run's message has waited `after`, and as long as the run had waited before it was queued."""
    last = run.message_queued_at or run.created_at
    return now - last >= max(after, last - run.created_at)


def _after_lost_worker(run: TrainingRun, max_attempts: int, retry_backoff_s: float, *, cancel: bool) -> tuple[str, str]:
    lost = f"attempt {run.attempts} stopped renewing its lease (worker {run.worker} lost, or cut off from the database)"
    if cancel:
        return "cancelled", f"cancelled; {lost}"
    if run.attempts >= max_attempts:
        return "failed", gave_up(lost, run.attempts)
    return "queued", f"{lost}; retrying in {retry_backoff(retry_backoff_s, run.attempts):g} s"


def _cancel_stranded(session: Session) -> None:
    """A queued run flagged to cancel is one no worker claims: it would read queued for good. None should be left
    (a cancel ends a queued run at once, and nothing requeues a flagged one), but one that is ends cancelled."""
    stranded = session.scalars(
        select(TrainingRun.id)
        .where(TrainingRun.status == "queued", TrainingRun.cancel_requested.is_(True))
        .with_for_update(skip_locked=True)
    ).all()
    for run_id in stranded:
        request_cancel(session, run_id)
