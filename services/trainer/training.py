"""One attempt at a training run: extract the rows, train in the sandboxed script, judge the stored model, and
register the version; or end the run with the reason, or put it back in the queue when the fault may pass."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import traceback
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import select
from sqlalchemy.exc import DataError, IntegrityError

import services.trainer.scripts
from services.trainer import artifacts, candidates, runs
from services.trainer.context import WorkerContext
from services.trainer.extract import extract_database, extract_dataset
from services.trainer.heartbeat import Heartbeat
from services.trainer.native_scores import NativeScores, score_natively
from services.trainer.outputs import SCRIPT_METRICS_FILE, collect_outputs
from services.trainer.pipeline.data import TrainingData, load_training_data, split_holdout, with_positive_class
from services.trainer.pipeline.train import check_objective, check_trainable, rows_fitted
from services.trainer.pipeline.validate import FootprintProbe, Gates
from services.trainer.progress import ProgressWriter
from services.trainer.runs import Attempt, Cancelled, DatabaseSource, DatasetSource, LeaseLost, TrainedVersion
from services.trainer.sandbox import Limits
from services.trainer.validation import Verdict, gates_for, judge, size_gate_bytes, size_rejection, too_large
from shared.crypto import SecretBox
from shared.db.models import Dataset, TrainingRun
from shared.db.session import DATABASE_TROUBLE, driver_message, out_of_reach, session_scope
from shared.errors import InvalidInput, KilnError, Stopped, TransientError
from shared.layout import MODEL_FILE, model_prefix
from shared.onnx_external import external_data_of, keeps_data_outside
from shared.outbox import relay
from shared.retries import gave_up
from shared.schemas import DataRange, unfit_text
from shared.storage import ObjectStore, sha256_file
from shared.store_access import StoreRules
from shared.stored_secrets import datasource_context
from shared.versions import new_version

log = logging.getLogger(__name__)

BUILT_IN_SCRIPT = Path(services.trainer.scripts.__file__).parent / "train_lightgbm.py"
MAX_METRICS_BYTES = 1024 * 1024
MAX_METRICS_DEPTH = 8
_MAX_MESSAGE_CHARS = 1000
# The sha256 a version over the size gate records: that of the bytes the worker read of its model.onnx, none.
UNREAD_SHA256 = hashlib.sha256(b"").hexdigest()


def run_training(run_id: str, context: WorkerContext, *, worker: str | None = None) -> str:
    """Carry out one attempt of a queued run and return what became of it; a run not queued is left alone, and a
    run whose org has no free slot waits for one."""
    try:
        return _attempt(run_id, context, worker or socket.gethostname())
    finally:
        # Ending a run may have freed a slot and woken runs waiting for it: send their messages now.
        relay(context.sessions, context.outbox_senders())


def _attempt(run_id: str, context: WorkerContext, worker: str) -> str:
    settings = context.settings
    try:
        attempt = runs.claim_run(
            context.sessions,
            run_id,
            worker=worker,
            lease_s=settings.run_lease_s,
            premises_orgs=settings.worker_org_ids,
        )
    except runs.NoSlot:
        log.info("run %s waits: its organization has no free training slot", run_id)
        return "waiting"
    except runs.NotOnPremises as refusal:
        log.warning("run %s: %s", run_id, refusal.message)
        return "not here"
    if attempt is None:
        log.info("run %s is not queued; nothing to do", run_id)
        return "skipped"
    with Heartbeat(context.sessions, attempt, lease_s=settings.run_lease_s) as heartbeat:
        try:
            return _carry_out(attempt, context, heartbeat)
        except LeaseLost:
            # Also when ending the run found it so: the run is no longer this attempt's to end.
            log.warning("run %s: attempt %s lost its lease; the run is not its own any more", run_id, attempt.number)
            return "lost"
        except DATABASE_TROUBLE:
            # Kiln's database is still failing as the attempt's end is to be written: as after a lost worker, the
            # lease runs out and a sweep hands the run back (or ends it once its attempts are used up).
            log.warning("run %s: attempt %s could not record its end; left to the sweep", run_id, attempt.number)
            return "unrecorded"


def _carry_out(attempt: Attempt, context: WorkerContext, heartbeat: Heartbeat) -> str:
    try:
        trained = _train(attempt, context, heartbeat)
        return _register(attempt, context, trained)
    except LeaseLost:
        raise
    except Cancelled:
        return _cancel(attempt, context)
    except TransientError as error:
        return _retry_or_fail(attempt, context, error.message)
    except DATABASE_TROUBLE as error:
        # Kiln's own database, not the run, at fault (a failover, a blip of its link): as transient as an org's
        # database out of reach, unless it cannot run the statement at all. Its error is one line: SQLAlchemy's
        # would quote the statement and its parameters.
        reason = f"Kiln's database failed: {driver_message(error)}"
        if out_of_reach(error):
            return _retry_or_fail(attempt, context, reason)
        return runs.finish(context.sessions, attempt, "failed", reason)
    except KilnError as error:
        return runs.finish(context.sessions, attempt, "failed", error.message)
    except Exception as error:
        log.exception("run %s failed", attempt.run_id)
        return runs.finish(context.sessions, attempt, "failed", _short_reason(error))


def _cancel(attempt: Attempt, context: WorkerContext) -> str:
    return runs.finish(context.sessions, attempt, "cancelled", "cancelled on request")


def _register(attempt: Attempt, context: WorkerContext, trained: TrainedVersion) -> str:
    try:
        status = runs.register_version(context.sessions, attempt, trained)
    except (LeaseLost, Cancelled, DataError, IntegrityError):
        # Not registered (the database refused the version before anything committed): nothing may refer to these
        # artifacts, and nothing ever will.
        candidates.remove(context.sessions, trained.artifact_prefix, _candidate_stores(attempt, context))
        raise
    runs.log(context.sessions, attempt, status, f"registered version {trained.version}: {status}")
    return status


def _candidate_stores(attempt: Attempt, context: WorkerContext) -> tuple[ObjectStore, ObjectStore]:
    """Where the attempt's candidate went: the central store, and where its held-out rows were written."""
    return context.store, context.holdout_store(on_premises=attempt.holdout_on_premises)


def _retry_or_fail(attempt: Attempt, context: WorkerContext, reason: str) -> str:
    settings = context.settings
    if attempt.number >= settings.run_max_attempts:
        return runs.finish(context.sessions, attempt, "failed", gave_up(reason, attempt.number))
    backoff = runs.retry_backoff(settings.run_retry_backoff_s, attempt.number)
    try:
        runs.requeue(context.sessions, attempt, f"attempt {attempt.number}: {reason}", countdown_s=backoff)
    except Cancelled:
        return _cancel(attempt, context)
    return "retrying"


def _train(attempt: Attempt, context: WorkerContext, heartbeat: Heartbeat) -> TrainedVersion:
    step = _Steps(attempt, context, heartbeat)
    _remove_earlier_candidates(attempt, context)
    with context.sandbox.workspace() as workdir:
        step.log("started", f"attempt {attempt.number} on {socket.gethostname()} (pid {os.getpid()})")
        config = attempt.config
        data = step.extract(workdir)
        check_objective(config.hyperparameters, len(data.classes))
        data = with_positive_class(data, config.positive_class)
        train, holdout = split_holdout(data, config.validation_split)
        check_trainable(config.hyperparameters, len(train.labels))
        step.log("extracted", _split_summary(data, train, holdout))
        outputs, model_size = step.run_script(workdir, train)
        return step.judge_and_store(outputs, model_size, data, holdout)


def _remove_earlier_candidates(attempt: Attempt, context: WorkerContext) -> None:
    """An earlier attempt of the run that died while storing (or whose store failed its clean-up) left its folder:
    removed now rather than at the next sweep, so the run ends with no folder but its version's."""
    stores = candidates.CandidateStores(
        context.store, context.holdout_store(on_premises=True), context.settings.worker_org_ids
    )
    for prefix in candidates.remove_abandoned(context.sessions, stores, run_id=attempt.run_id):
        log.warning("run %s: removed %s, the unregistered candidate of an earlier attempt", attempt.run_id, prefix)


def _split_summary(data: TrainingData, train: TrainingData, holdout: TrainingData) -> str:
    positive = f", positive class {data.classes[1]!r}" if len(data.classes) == 2 else ""
    return (
        f"{len(data.labels)} rows in range: {len(train.labels)} to train on, "
        f"{len(holdout.labels)} held out; classes {data.classes}{positive}"
    )


class _Steps:
    """The stages of one attempt, each reporting its progress and log lines, each stopping on a cancel."""

    def __init__(self, attempt: Attempt, context: WorkerContext, heartbeat: Heartbeat) -> None:
        self.attempt = attempt
        self.context = context
        self.heartbeat = heartbeat

    def log(self, stage: str, message: str, *, level: str = "info") -> None:
        runs.log(self.context.sessions, self.attempt, stage, message, level=level)

    def enter(self, stage: str, percent: int) -> None:
        self.stop_if_asked()
        runs.set_progress(self.context.sessions, self.attempt, stage, percent)

    def stop_if_asked(self) -> None:
        if self.heartbeat.should_stop():
            raise self._stopped()

    def _stopped(self) -> KilnError:
        """Why the attempt stops, once the heartbeat says it must: its lease lost, or a cancel."""
        if self.heartbeat.lost.is_set():
            return LeaseLost(f"run {self.attempt.run_id} was taken over")
        return Cancelled("cancelled")

    def extract(self, workdir: Path) -> TrainingData:
        """The org's rows, read into memory; their file is gone before the script runs in the same folder: it holds
        the held-out rows too, which a script that read them could fit to, and pass the gates with."""
        self.enter("extracting", 5)
        source, target = self.attempt.source, workdir / "source.parquet"
        try:
            if isinstance(source, DatabaseSource):
                return self._read_database(source, target)
            return self._read_dataset(source, target)
        except Stopped:
            raise self._stopped() from None
        finally:
            target.unlink(missing_ok=True)

    def _read_database(self, source: DatabaseSource, target: Path) -> TrainingData:
        config = self.attempt.config
        start, end = _bounds(config.data_range)
        rows = extract_database(
            source,
            self._password(source),
            columns=[*config.feature_columns, config.target_column],
            start=start,
            end=end,
            target=target,
            rules=self._store_rules(),
            should_stop=self.heartbeat.should_stop,
        )
        self.log("extracted", f"read {rows} rows from table {source.table}")
        return load_training_data(target, feature_columns=config.feature_columns, target_column=config.target_column)

    def _read_dataset(self, source: DatasetSource, target: Path) -> TrainingData:
        config = self.attempt.config
        start, end = _bounds(config.data_range)
        self._refuse_erased_dataset()
        extract_dataset(self.context.store, source.object_key, target, should_stop=self.heartbeat.should_stop)
        return load_training_data(
            target,
            feature_columns=config.feature_columns,
            target_column=config.target_column,
            timestamp_column=source.timestamp_column,
            start=start,
            end=end,
        )

    def _refuse_erased_dataset(self) -> None:
        """A run queued before its dataset was erased fails here, saying so. An erasure waits for claims (the org's
        lock) and refuses a running run's dataset, so one committed after this claim cannot happen."""
        with self.context.sessions() as session:
            dataset = session.execute(
                select(Dataset.id, Dataset.erased_at)
                .join(TrainingRun, TrainingRun.dataset_id == Dataset.id)
                .where(TrainingRun.id == self.attempt.run_id)
            ).one()
        if dataset.erased_at is not None:
            raise InvalidInput(
                f"dataset {dataset.id} was erased at {dataset.erased_at.isoformat()}, after this run was queued: "
                "its rows are gone, so the run cannot train on them",
                field="datasetId",
            )

    def _store_rules(self) -> StoreRules:
        with session_scope(self.context.sessions) as session:
            return StoreRules.for_training(session, self.context.settings, self.attempt.org_id)

    def _password(self, source: DatabaseSource) -> str | None:
        if source.password_encrypted is None:
            return None
        box = SecretBox.from_settings(self.context.settings)
        return box.decrypt(source.password_encrypted, context=datasource_context(self.attempt.org_id))

    def run_script(self, workdir: Path, train: TrainingData) -> tuple[Path, int]:
        """The worker's copies of the script's outputs, and the size of its model.onnx."""
        self.enter("training", 20)
        outputs = workdir / "outputs"
        outputs.mkdir()
        train_file = workdir / "train.parquet"
        _write_train_file(train, self.attempt.config.target_column, train_file)
        config_file = workdir / "config.json"
        config_file.write_bytes(orjson.dumps(self._script_config(train, train_file, outputs)))
        script = self._script()
        limits = Limits.for_org(self.context.settings, self.attempt.org_config)
        with ProgressWriter(self._script_progress) as progress:
            result = self.context.sandbox.run(
                script, config_file, workdir, limits, should_stop=self.heartbeat.should_stop, on_output=progress.feed
            )
        if result.cancelled:
            raise self._stopped()
        if not result.ok:
            raise InvalidInput(f"the training script failed: {result.reason()}", field="trainingScript")
        gate = size_gate_bytes(gates_for(self.attempt.org_config))
        collected = collect_outputs(outputs, workdir, max_model_bytes=gate, max_metrics_bytes=MAX_METRICS_BYTES)
        if collected.model_size is None:
            raise InvalidInput(f"the training script wrote no {MODEL_FILE} into outputPath", field="trainingScript")
        self.log(
            "exported",
            f"{MODEL_FILE}: {collected.model_size} bytes; script used "
            f"{result.cpu_s:.1f} s CPU, {result.max_rss_mb:.0f} MB, {result.duration_s:.1f} s",
        )
        return collected.folder, collected.model_size

    def _script_progress(self, stage: str, percent: int, message: str | None) -> None:
        # Called from the progress writer's thread: a lost lease stops the script through should_stop.
        try:
            runs.set_progress(self.context.sessions, self.attempt, stage, percent, log=message)
        except LeaseLost:
            self.heartbeat.lost.set()

    def _script(self) -> Path:
        configured = self.attempt.org_config.training.script_path
        if configured is None:
            return BUILT_IN_SCRIPT
        allowed = self.context.settings.training_scripts_dir.resolve()
        script = Path(configured).resolve()
        if not script.is_relative_to(allowed) or not script.is_file():
            raise InvalidInput(f"training script {configured} is not a file under {allowed}", field="trainingScript")
        return script

    def _script_config(self, train: TrainingData, train_file: Path, outputs: Path) -> dict[str, Any]:
        config = self.attempt.config
        return {
            "organizationId": self.attempt.org_id,
            "runId": self.attempt.run_id,
            "featureColumns": config.feature_columns,
            "targetColumn": config.target_column,
            "classes": train.classes,
            "hyperparameters": config.hyperparameters.model_dump(mode="json", by_alias=True, exclude_none=True),
            "data": {"train": str(train_file), "format": "parquet"},
            "outputPath": str(outputs),
        }

    def judge_and_store(self, outputs: Path, size: int, data: TrainingData, holdout: TrainingData) -> TrainedVersion:
        """Judge and store the model in `outputs`, the worker's own copies of what the script wrote; the script's
        model.onnx is `size` bytes (not copied when that is over the size gate)."""
        self.enter("validating", 75)
        gates = gates_for(self.attempt.org_config)
        model_file = outputs / MODEL_FILE
        version = new_version()
        prefix = model_prefix(self.attempt.org_id, version)
        holdout_file = outputs / "holdout.parquet"
        artifacts.save_holdout(holdout, holdout_file)
        store = self.context.store
        candidates.record(self.context.sessions, self.attempt, prefix)
        try:
            if too_large(size, gates):
                self.log("validating", f"{MODEL_FILE} is {size} bytes, over the size gate: not read", level="warning")
                self._upload_candidate(prefix, outputs, holdout_file, with_model=False)
                verdict = size_rejection(size, gates)
                sha256 = UNREAD_SHA256
            else:
                sha256 = sha256_file(model_file)
                model = model_file.read_bytes()
                _refuse_external_data(model)  # before the memory probe's process loads it
                # The memory probe's interpreter starts up (~0.3 s) while the artifacts upload and are read back,
                # rather than wholly beside the holdout pass, which keeps every core busy.
                with FootprintProbe.start(model, holdout.features.shape[1]) as footprint:
                    self._upload_candidate(prefix, outputs, holdout_file, with_model=True)
                    verdict = self._judge(prefix, sha256, holdout, gates, footprint)
            self.enter("storing", 95)
            metrics = {
                **verdict.metrics,
                **self._train_rows(len(data.labels) - len(holdout.labels)),
                "training": _script_metrics(outputs),
            }
            artifacts.upload_reports(
                store, prefix, metrics=metrics, config=self._stored_config(), validation=verdict.report
            )
            self.log("stored", f"artifacts of {version} stored under {prefix}")
        except BaseException:
            candidates.remove(self.context.sessions, prefix, _candidate_stores(self.attempt, self.context))
            raise
        return TrainedVersion(
            version=version,
            sha256=sha256,
            size_bytes=size,
            artifact_prefix=prefix,
            feature_columns=list(self.attempt.config.feature_columns),
            target_column=self.attempt.config.target_column,
            classes=list(data.classes),
            metrics=metrics,
            validation=verdict.report,
        )

    def _train_rows(self, train_rows: int) -> dict[str, int]:
        """The rows fitted on, apart from those early stopping watched instead."""
        fitted, watched = rows_fitted(self.attempt.config.hyperparameters, train_rows)
        return {"trainRows": fitted, "earlyStoppingRows": watched}

    def _upload_candidate(self, prefix: str, outputs: Path, holdout_file: Path, *, with_model: bool) -> None:
        artifacts.upload_candidate(
            self.context.store,
            prefix,
            outputs=outputs,
            holdout=holdout_file,
            holdout_store=self.context.holdout_store(on_premises=self.attempt.holdout_on_premises),
            with_model=with_model,
        )

    def _judge(
        self, prefix: str, sha256: str, holdout: TrainingData, gates: Gates, footprint: FootprintProbe
    ) -> Verdict:
        stored = artifacts.read_model(self.context.store, prefix, sha256)
        native = self._native_scores(prefix, holdout)
        try:
            verdict = judge(stored, native, holdout, gates, footprint=footprint, should_stop=self.heartbeat.should_stop)
        except Stopped:
            raise self._stopped() from None
        for gate in verdict.report["gates"]:
            outcome = "passed" if gate["passed"] else "FAILED"
            self.log(
                "validating",
                f"gate {gate['name']}: {gate['value']} against {gate['threshold']}: {outcome}",
                level="info" if gate["passed"] else "warning",
            )
        if "note" in verdict.report:
            self.log("validating", verdict.report["note"], level="warning")
        return verdict

    def _native_scores(self, prefix: str, holdout: TrainingData) -> NativeScores | None:
        native_model = artifacts.read_native_model(self.context.store, prefix)
        if native_model is None:
            return None
        native = score_natively(
            self.context.sandbox,
            native_model,
            holdout.features,
            len(holdout.classes),
            Limits.for_org(self.context.settings, self.attempt.org_config),
            should_stop=self.heartbeat.should_stop,
        )
        self.stop_if_asked()
        return native

    def _stored_config(self) -> dict[str, Any]:
        config = self.attempt.config
        return {
            "organizationId": self.attempt.org_id,
            "runId": self.attempt.run_id,
            **config.to_wire(),
            "lightgbm": config.hyperparameters.to_lightgbm(),
        }


def _write_train_file(train: TrainingData, target_column: str, path: Path) -> None:
    columns = {name: train.features[:, i] for i, name in enumerate(train.feature_columns)}
    # Read once, right away, by the script on this machine: compressing it would only cost time.
    pq.write_table(pa.table({**columns, target_column: train.labels}), path, compression="none", use_dictionary=False)


def _script_metrics(outputs: Path) -> dict[str, Any]:
    path = outputs / SCRIPT_METRICS_FILE
    if not path.exists():
        return {}
    with path.open("rb") as metrics:
        return _parse_metrics(metrics.read())  # collect_outputs refused one over MAX_METRICS_BYTES


def _parse_metrics(raw: bytes) -> dict[str, Any]:
    """The script's own figures, kept in the version's row and shown with every run and model listed: a few KB is
    what a script has to say, so a file over MAX_METRICS_BYTES fails the run (collect_outputs) rather than every
    listing after it."""
    try:
        metrics = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise InvalidInput(
            f"the training script's metrics.json is not JSON ({error}); NaN and Infinity are not JSON: write null",
            field="trainingScript",
        ) from None
    if not isinstance(metrics, dict) or _nested_deeper(metrics, MAX_METRICS_DEPTH):
        raise InvalidInput(
            f"the training script's metrics.json is not a JSON object nested at most {MAX_METRICS_DEPTH} deep",
            field="trainingScript",
        )
    unfit = unfit_text(metrics, max_nesting=MAX_METRICS_DEPTH)
    if unfit is not None:
        raise InvalidInput(f"the training script's metrics.json cannot be stored: {unfit}", field="trainingScript")
    return metrics


def _nested_deeper(value: object, levels: int) -> bool:
    """Whether objects and lists nest more than `levels` deep; it looks no deeper, so no recursion limit is met."""
    if not isinstance(value, dict | list):
        return False
    children = value.values() if isinstance(value, dict) else value
    return levels == 0 or any(_nested_deeper(child, levels - 1) for child in children)


def _refuse_external_data(model: bytes) -> None:
    outside = external_data_of(model)
    if outside:
        raise InvalidInput(
            f"the training script's {MODEL_FILE} {keeps_data_outside(outside)}: Kiln takes self-contained models "
            "only, which it never reads a file for",
            field="trainingScript",
        )


def _short_reason(error: Exception) -> str:
    # An error's message may quote what a script made (a path of any length): both parts are cut.
    frames = traceback.format_exception(error, limit=-3)
    return f"{type(error).__name__}: {error}"[:_MAX_MESSAGE_CHARS] + "\n" + "".join(frames)[-2000:]


def _bounds(data_range: DataRange | None) -> tuple[datetime | None, datetime | None]:
    if data_range is None:
        return None, None
    return data_range.start_date, data_range.end_date
