"""The training service's contract on real PostgreSQL and S3: data from an org's own database, the script
interface and its sandbox, retries, cancellation, the training log, validation again on demand."""

from __future__ import annotations

import io
import os
import secrets
import signal
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from sklearn.datasets import load_breast_cancer
from sqlalchemy.exc import DataError

from deploy.local import ai4i
from services.trainer import runs
from services.trainer.artifacts import load_holdout
from services.trainer.context import WorkerContext
from services.trainer.training import BUILT_IN_SCRIPT, UNREAD_SHA256, run_training
from shared.layout import HOLDOUT_FILE, model_key, model_prefix
from shared.settings import Settings
from shared.storage import open_object_store
from shared.workspaces import default_root
from tests.integration.conftest import (
    ADMIN,
    OrgKeys,
    cancel_just_before,
    run_of,
    stall_past_lease,
    submit,
    upload,
    upload_table,
)
from tests.integration.plant_database_support import START, write_scada_table
from tests.support.models import model_reading_a_file
from tests.support.servers import free_port, fresh_postgres_database
from tests.support.workspaces import workspace_holder


def logs(api: TestClient, org: OrgKeys, run_id: str) -> list[dict[str, Any]]:
    return list(api.get(f"/v1/orgs/{org.org_id}/trainings/{run_id}/logs", headers=org.viewer).json())


def set_org_config(api: TestClient, org: OrgKeys, config: dict[str, Any]) -> None:
    response = api.patch(f"/v1/orgs/{org.org_id}", json={"config": config}, headers=ADMIN)
    assert response.status_code == 200, response.text


@pytest.fixture(params=["postgresql", "sqlite"])
def plant_database(request: pytest.FixtureRequest, tmp_path: Path, org_id: str) -> Iterator[str]:
    table = ai4i.generate(30_000, seed=3, start=START, interval=timedelta(minutes=1))
    if request.param == "sqlite":
        (tmp_path / org_id).mkdir()  # the org's folder of SQLite files (the settings' local_stores_dir)
        url = f"sqlite:///{tmp_path / org_id / 'historian.db'}"
        write_scada_table(url, table)
        yield url
        return
    with fresh_postgres_database() as url:
        write_scada_table(url, table)
        yield url


def test_a_run_reads_the_orgs_own_database(
    api: TestClient, org: OrgKeys, worker: WorkerContext, plant_database: str
) -> None:
    column_map = {f"TAG_{name.upper()}": name for name in ai4i.FEATURES} | {"failure": ai4i.TARGET}
    response = api.put(
        f"/v1/orgs/{org.org_id}/datasource",
        headers=org.admin,
        json={"url": plant_database, "table": "readings", "timestampColumn": "recorded_at", "columnMap": column_map},
    )
    assert response.status_code == 200, response.text
    end = START + timedelta(minutes=19_999)
    run_id = submit(
        api,
        org,
        None,
        dataRange={"startDate": START.isoformat(), "endDate": end.isoformat()},
        hyperparameters={"numIterations": 50},
    )
    assert run_training(run_id, worker) in {"succeeded", "rejected"}
    run = run_of(api, org, run_id)
    assert run["metrics"]["trainRows"] + run["metrics"]["rows"] == 20_000
    assert any("read 20000 rows from table readings" in line["message"] for line in logs(api, org, run_id))


def submit_against_an_unreachable_database(api: TestClient, org: OrgKeys) -> str:
    """A run of an org whose datasource is a PostgreSQL server nothing listens for: each attempt fails transiently."""
    url = f"postgresql+psycopg2://historian:pw@127.0.0.1:{free_port()}/plant"
    api.put(f"/v1/orgs/{org.org_id}/datasource", headers=org.admin, json={"url": url, "table": "readings"})
    return submit(api, org, None)


def test_an_unreachable_database_is_retried_then_fails_with_every_attempt_recorded(
    api: TestClient, org: OrgKeys, worker: WorkerContext
) -> None:
    run_id = submit_against_an_unreachable_database(api, org)
    assert run_training(run_id, worker) == "retrying"
    assert run_of(api, org, run_id)["status"] == "queued"
    assert run_training(run_id, worker) == "retrying"
    assert run_training(run_id, worker) == "failed"
    run = run_of(api, org, run_id)
    assert run["attempts"] == 3
    assert "unreachable" in run["error"] and "gave up after 3 attempts" in run["error"]
    assert [line["stage"] for line in logs(api, org, run_id)].count("retrying") == 2


def test_a_cancel_accepted_before_a_retry_is_queued_ends_the_run_cancelled(
    api: TestClient, org: OrgKeys, worker: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No worker claims a queued run that was asked to cancel: put back in the queue, it would read queued for good."""
    run_id = submit_against_an_unreachable_database(api, org)
    cancel_just_before(monkeypatch, "requeue", api, org)
    assert run_training(run_id, worker) == "cancelled"
    run = run_of(api, org, run_id)
    assert (run["status"], run["error"], run["attempts"]) == ("cancelled", "cancelled on request", 1)


def test_a_cancel_accepted_while_the_last_attempt_fails_ends_the_run_cancelled(
    api: TestClient, org: OrgKeys, worker: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 202 promised the run would stop: it ends cancelled, the failure it met kept as the reason."""
    run_id = submit_against_an_unreachable_database(api, org)
    assert run_training(run_id, worker) == "retrying"
    assert run_training(run_id, worker) == "retrying"
    cancel_just_before(monkeypatch, "finish", api, org)
    assert run_training(run_id, worker) == "cancelled"
    run = run_of(api, org, run_id)
    assert (run["status"], run["attempts"], run["cancelRequested"]) == ("cancelled", 3, True)
    assert run["error"].startswith("cancelled on request; the attempt had failed: ")
    assert "unreachable" in run["error"] and "gave up after 3 attempts" in run["error"]


def test_a_missing_column_fails_at_once_without_a_retry(
    api: TestClient, org: OrgKeys, worker: WorkerContext, plant_database: str
) -> None:
    api.put(f"/v1/orgs/{org.org_id}/datasource", headers=org.admin, json={"url": plant_database, "table": "readings"})
    run_id = submit(api, org, None)
    assert run_training(run_id, worker) == "failed"
    run = run_of(api, org, run_id)
    assert run["attempts"] == 1 and "has no column" in run["error"]


def test_a_hospital_trains_on_real_clinical_measurements(
    api: TestClient, org: OrgKeys, worker: WorkerContext, tmp_path: Path
) -> None:
    """scikit-learn's bundled Wisconsin breast-cancer data: 569 patients, 30 measurements, no download."""
    cancer = load_breast_cancer()
    names = [name.replace(" ", "_") for name in cancer.feature_names]
    table = pa.table({**{n: cancer.data[:, i] for i, n in enumerate(names)}, "diagnosis": cancer.target})
    run_id = submit(
        api,
        org,
        upload_table(api, org, table, tmp_path, timestamp_column=None),
        targetColumn="diagnosis",
        featureColumns=names,
        hyperparameters={"numLeaves": 15, "numIterations": 200, "learningRate": 0.05, "seed": 1},
    )
    assert run_training(run_id, worker) == "succeeded"
    metrics = run_of(api, org, run_id)["metrics"]
    assert metrics["accuracy"] >= 0.9 and metrics["recall"] >= 0.9 and metrics["auc"] >= 0.95


def test_failure_types_train_as_multiclass_with_figures_per_class(
    api: TestClient, org: OrgKeys, worker: WorkerContext, tmp_path: Path
) -> None:
    set_org_config(api, org, {"gates": {"minPrecision": 0.3, "minRecall": 0.3}})
    dataset = upload_table(api, org, ai4i.generate(60_000, seed=5), tmp_path)
    run_id = submit(
        api, org, dataset, targetColumn="failure_type", hyperparameters={"objective": "multiclass", "numIterations": 60}
    )
    assert run_training(run_id, worker) == "succeeded"
    run = run_of(api, org, run_id)
    per_class = run["metrics"]["perClass"]
    assert set(per_class) == {"HDF", "OSF", "PWF", "RNF", "TWF", "none"}
    assert per_class["HDF"]["recall"] > 0.8 and per_class["none"]["support"] > 10_000
    version = api.get(f"/v1/orgs/{org.org_id}/models/{run['version']}", headers=org.viewer).json()
    assert version["classes"] == ["HDF", "OSF", "PWF", "RNF", "TWF", "none"]
    parity = next(gate for gate in version["validation"]["gates"] if gate["name"] == "parity")
    assert parity["passed"] and parity["value"] <= 1e-5


def test_the_training_log_tells_the_story_of_a_run(
    api: TestClient, org: OrgKeys, worker: WorkerContext, tmp_path: Path
) -> None:
    run_id = submit(api, org, upload_table(api, org, ai4i.generate(50_000, seed=1), tmp_path))
    run_training(run_id, worker)
    lines = logs(api, org, run_id)
    stages = [line["stage"] for line in lines]
    for stage in ("started", "extracted", "training", "exported", "validating", "stored", "succeeded"):
        assert stage in stages, stage
    assert any(line["message"].startswith("boosting round") for line in lines)
    assert any(line["message"].startswith("gate parity:") for line in lines)
    assert stages.index("training") < stages.index("exported") < stages.index("stored")


def test_a_model_over_the_size_gate_is_rejected_before_it_is_uploaded(
    api: TestClient, org: OrgKeys, worker: WorkerContext, settings: Settings, tmp_path: Path
) -> None:
    set_org_config(api, org, {"gates": {"maxModelMb": 0.001}})
    run_id = submit(api, org, upload_table(api, org, ai4i.generate(50_000, seed=1), tmp_path))
    assert run_training(run_id, worker) == "rejected"
    run = run_of(api, org, run_id)
    assert "model_size_mb" in run["error"]
    assert not open_object_store(settings).exists(model_key(org.org_id, run["version"]))


def bytes_moved_by_this_process() -> int:
    """Bytes this process (every thread of it) has read and written through system calls, sparse holes included."""
    counters = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(counters["rchar"]) + int(counters["wchar"])


def test_a_sparse_model_over_the_size_gate_is_rejected_without_the_worker_copying_or_reading_it(
    api: TestClient, org: OrgKeys, script_worker: WorkerContext, settings: Settings, scripts_dir: Path, tmp_path: Path
) -> None:
    """A script can truncate() model.onnx up to its largest file (4 GB by default) at no cost to its disk quota: the
    worker copied it and read it whole to hash it, and a worker killed for its memory was retried as a lost one."""
    sparse_size = 256 * 1024 * 1024
    script = install_script(scripts_dir, "sparse.py", then(f'open(out + "/model.onnx", "r+b").truncate({sparse_size})'))
    set_org_config(api, org, {"training": {"scriptPath": script}, "gates": {"maxModelMb": 1}})
    run_id = submit(api, org, upload_table(api, org, ai4i.generate(2_000, seed=1), tmp_path))
    before = bytes_moved_by_this_process()

    assert run_training(run_id, script_worker) == "rejected"

    assert bytes_moved_by_this_process() - before < sparse_size / 4
    run = run_of(api, org, run_id)
    model = api.get(f"/v1/orgs/{org.org_id}/models/{run['version']}", headers=org.viewer).json()
    assert model["validation"]["failed"] == [
        "accuracy",
        "precision",
        "recall",
        "model_size_mb",
        "onnx_health",
        "parity",
    ]
    assert model["sizeBytes"] == sparse_size and model["sha256"] == UNREAD_SHA256
    assert not open_object_store(settings).exists(model_key(org.org_id, run["version"]))
    assert f"model.onnx is {sparse_size} bytes, over the size gate: not read" in [
        line["message"] for line in logs(api, org, run_id)
    ]


@pytest.mark.parametrize(
    ("name", "limit"),
    [("model.txt", "bytes, over the limit of "), ("metrics.json", "bytes, over the limit of 1048576 bytes")],
    ids=["model.txt over 4 times its model.onnx", "metrics.json over 1 MB"],
)
def test_a_sparse_native_model_or_metrics_file_fails_the_run_without_the_worker_copying_it(
    api: TestClient,
    org: OrgKeys,
    script_worker: WorkerContext,
    scripts_dir: Path,
    tmp_path: Path,
    name: str,
    limit: str,
) -> None:
    """Both are read whole later (the parity check loads model.txt, a download of it too): the sizes are checked
    before any copy, as model.onnx's is."""
    sparse_size = 256 * 1024 * 1024
    script = install_script(scripts_dir, "sparse.py", then(f'open(out + "/{name}", "a+b").truncate({sparse_size})'))
    set_org_config(api, org, {"training": {"scriptPath": script}, "gates": {"maxModelMb": 1}})
    run_id = submit(api, org, upload_table(api, org, ai4i.generate(2_000, seed=1), tmp_path))
    before = bytes_moved_by_this_process()

    assert run_training(run_id, script_worker) == "failed"

    assert bytes_moved_by_this_process() - before < sparse_size / 4
    assert f"{name} is {sparse_size} {limit}" in run_of(api, org, run_id)["error"]


def test_validating_again_reads_the_stored_artifact_and_rejects_a_tampered_one(
    api: TestClient, org: OrgKeys, worker: WorkerContext, settings: Settings, tmp_path: Path
) -> None:
    from services.trainer.revalidate import revalidate

    run_id = submit(api, org, upload_table(api, org, ai4i.generate(50_000, seed=1), tmp_path))
    run_training(run_id, worker)
    version = run_of(api, org, run_id)["version"]
    accepted = api.post(f"/v1/orgs/{org.org_id}/models/{version}/validate", headers=org.trainer)
    assert accepted.status_code == 202
    assert accepted.json() == {"version": version, "status": "validating", "versionStatus": "validated", "note": None}
    assert revalidate(org.org_id, version, worker) == "validated"
    open_object_store(settings).put_bytes(model_key(org.org_id, version), b"not an onnx model")
    assert revalidate(org.org_id, version, worker) == "rejected"
    model = api.get(f"/v1/orgs/{org.org_id}/models/{version}", headers=org.viewer).json()
    assert model["status"] == "rejected" and "onnx_health" in model["validation"]["failed"]
    assert "sha256" in model["validation"]["note"]
    deploy = api.post(f"/v1/orgs/{org.org_id}/deployments", json={"version": version}, headers=org.admin)
    assert deploy.status_code == 409


def test_a_version_rejected_when_its_run_finished_is_never_deployed_after_the_gates_are_relaxed(
    api: TestClient, org: OrgKeys, worker: WorkerContext, tmp_path: Path
) -> None:
    """The reviewer's reproduction: rejected for precision and recall, the org's gates relaxed, the version judged
    again. It now passes every gate, and its report says so, but it stays rejected: the deploy is a 409."""
    from services.trainer.revalidate import revalidate

    set_org_config(api, org, {"gates": {"minPrecision": 0.9999, "minRecall": 0.9999}})
    run_id = submit(api, org, upload_table(api, org, ai4i.generate(50_000, seed=1), tmp_path))
    assert run_training(run_id, worker) == "rejected"
    version = run_of(api, org, run_id)["version"]
    set_org_config(api, org, {"gates": {"minPrecision": 0.3, "minRecall": 0.3}})

    assert revalidate(org.org_id, version, worker) == "rejected"

    model = api.get(f"/v1/orgs/{org.org_id}/models/{version}", headers=org.viewer).json()
    assert model["status"] == "rejected" and model["validation"]["passed"] is True
    assert model["validation"]["rejection"]["failed"] == ["precision", "recall"]
    assert run_of(api, org, run_id)["status"] == "rejected"
    deploy = api.post(f"/v1/orgs/{org.org_id}/deployments", json={"version": version}, headers=org.admin)
    assert deploy.status_code == 409, deploy.text
    assert deploy.json()["failedGates"] == ["precision", "recall"]
    assert "failed gates: precision, recall" in deploy.json()["error"]


@pytest.fixture
def scripts_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "scripts"
    folder.mkdir()
    return folder


@pytest.fixture
def script_worker(settings: Settings, scripts_dir: Path) -> Iterator[WorkerContext]:
    context = WorkerContext.open(settings.model_copy(update={"training_scripts_dir": scripts_dir}))
    yield context
    context.close()


def install_script(scripts_dir: Path, name: str, body: str) -> str:
    path = scripts_dir / name
    path.write_text(textwrap.dedent(body))
    return str(path)


def test_an_org_runs_its_operators_script_and_a_crash_fails_the_run_with_its_traceback(
    api: TestClient, org: OrgKeys, script_worker: WorkerContext, scripts_dir: Path, tmp_path: Path
) -> None:
    script = install_script(
        scripts_dir,
        "broken.py",
        """
        import json, sys
        config = json.load(open(sys.argv[1]))
        raise RuntimeError(f"no model for {config['organizationId']} today")
    """,
    )
    set_org_config(api, org, {"training": {"scriptPath": script}})
    dataset = upload_table(api, org, ai4i.generate(5_000, seed=1), tmp_path)
    run_id = submit(api, org, dataset)
    assert run_training(run_id, script_worker) == "failed"
    assert f"RuntimeError: no model for {org.org_id} today" in run_of(api, org, run_id)["error"]
    set_org_config(api, org, {"training": {"scriptPath": None}})
    assert run_training(submit(api, org, dataset), script_worker) in {"succeeded", "rejected"}


@pytest.mark.parametrize(
    ("metrics", "words"),
    [
        ('{"padding": "' + "x" * 2_000_000 + '"}', "metrics.json is 2000015 bytes, over the limit of 1048576 bytes"),
        ("[0.98, 0.97]", "metrics.json is not a JSON object"),
        ('{"a": ' * 9 + "1" + "}" * 9, "nested at most 8 deep"),
        ('{"auc": NaN}', "NaN and Infinity are not JSON"),
        ('{"note": "a\\u0000b"}', "metrics.json cannot be stored: must not contain the NUL character"),
    ],
    ids=["2 MB", "a list", "9 deep", "NaN", "a NUL"],
)
def test_a_scripts_metrics_too_big_or_of_the_wrong_shape_fail_the_run(
    api: TestClient,
    org: OrgKeys,
    script_worker: WorkerContext,
    settings: Settings,
    scripts_dir: Path,
    tmp_path: Path,
    metrics: str,
    words: str,
) -> None:
    """A script's metrics are stored with its version and shown in every listing of runs and models."""
    script = install_script(
        scripts_dir,
        "big_metrics.py",
        f"""
        import json, sys
        from services.trainer.scripts.train_lightgbm import main
        main(sys.argv[1])
        with open(json.load(open(sys.argv[1]))["outputPath"] + "/metrics.json", "w") as metrics:
            metrics.write({metrics!r})
    """,
    )
    set_org_config(api, org, {"training": {"scriptPath": script}})
    run_id = submit(api, org, upload_table(api, org, ai4i.generate(5_000, seed=1), tmp_path))
    assert run_training(run_id, script_worker) == "failed"
    assert words in run_of(api, org, run_id)["error"]
    assert api.get(f"/v1/orgs/{org.org_id}/models", headers=org.viewer).json() == []
    assert len(api.get(f"/v1/orgs/{org.org_id}/trainings", headers=org.viewer).content) < 10_000
    assert open_object_store(settings).list(f"orgs/{org.org_id}/models/") == []


def test_a_version_the_database_refuses_leaves_no_artifacts_behind(
    api: TestClient,
    org: OrgKeys,
    worker: WorkerContext,
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Refused before anything committed, the version has no row: no erasure could ever reach its artifacts."""

    def refused(*_args: Any, **_kwargs: Any) -> str:
        raise DataError("INSERT INTO model_versions ...", {}, ValueError("value out of range"))

    monkeypatch.setattr(runs, "register_version", refused)
    run_id = submit(api, org, upload_table(api, org, ai4i.generate(5_000, seed=1), tmp_path))

    assert run_training(run_id, worker) == "failed"

    assert "value out of range" in run_of(api, org, run_id)["error"]
    assert open_object_store(settings).list(f"orgs/{org.org_id}/models/") == []


def test_a_script_printing_nul_characters_fails_at_once_with_its_words_kept(
    api: TestClient, org: OrgKeys, script_worker: WorkerContext, scripts_dir: Path, tmp_path: Path
) -> None:
    """PostgreSQL's text takes no NUL: the failure could not be written, and the run read running until its lease ran
    out, then was retried as if its worker were lost."""
    script = install_script(
        scripts_dir,
        "nul.py",
        """
        import json, sys
        print(json.dumps({"stage": "load\\u0000ing"}), flush=True)
        sys.stderr.write("bad value: a\\x00b\\n")
        sys.exit(3)
    """,
    )
    set_org_config(api, org, {"training": {"scriptPath": script}})
    run_id = submit(api, org, upload_table(api, org, ai4i.generate(2_000, seed=1), tmp_path))
    assert run_training(run_id, script_worker) == "failed"
    run = run_of(api, org, run_id)
    assert (run["status"], run["attempts"]) == ("failed", 1)
    assert "bad value: a\\x00b" in run["error"]
    assert "load\\x00ing" in [line["stage"] for line in logs(api, org, run_id)]


def test_a_script_outside_the_operators_folder_is_refused(
    api: TestClient, org: OrgKeys, script_worker: WorkerContext, tmp_path: Path
) -> None:
    set_org_config(api, org, {"training": {"scriptPath": "/bin/sh"}})
    run_id = submit(api, org, upload_table(api, org, ai4i.generate(2_000, seed=1), tmp_path))
    assert run_training(run_id, script_worker) == "failed"
    assert "is not a file under" in run_of(api, org, run_id)["error"]


def test_a_script_that_loops_is_stopped_at_the_orgs_timeout(
    api: TestClient, org: OrgKeys, script_worker: WorkerContext, scripts_dir: Path, tmp_path: Path
) -> None:
    script = install_script(scripts_dir, "loops.py", "while True:\n    pass\n")
    set_org_config(api, org, {"training": {"scriptPath": script, "timeoutS": 2}})
    run_id = submit(api, org, upload_table(api, org, ai4i.generate(2_000, seed=1), tmp_path))
    started = time.monotonic()
    assert run_training(run_id, script_worker) == "failed"
    assert time.monotonic() - started < 15
    assert "timed out after 2 s" in run_of(api, org, run_id)["error"]


def test_a_script_that_fills_its_workspace_fails_at_the_orgs_disk_quota_without_a_retry(
    api: TestClient, org: OrgKeys, script_worker: WorkerContext, scripts_dir: Path, tmp_path: Path
) -> None:
    """Many files, each under the file-size limit, would fill the disk every org's runs share."""
    script = install_script(
        scripts_dir,
        "fills.py",
        """
        import os, tempfile
        for number in range(200):  # 200 MB: enough to be stopped, little enough to end if not
            with open(os.path.join(tempfile.gettempdir(), f"part-{number}.bin"), "wb") as file:
                file.write(os.urandom(2**20))
    """,
    )
    set_org_config(api, org, {"training": {"scriptPath": script, "diskMb": 20, "maxFileMb": 2}})
    run_id = submit(api, org, upload_table(api, org, ai4i.generate(2_000, seed=1), tmp_path))
    before = set(default_root().iterdir())

    assert run_training(run_id, script_worker) == "failed"

    run = run_of(api, org, run_id)
    assert "filled its workspace past the disk quota (limit 20 MB)" in run["error"]
    assert run["attempts"] == 1
    assert set(default_root().iterdir()) <= before


def test_a_script_nesting_folders_past_path_max_fails_with_its_own_reason_and_leaves_no_workspace(
    api: TestClient, org: OrgKeys, script_worker: WorkerContext, scripts_dir: Path, tmp_path: Path
) -> None:
    """Past Python's recursion limit and PATH_MAX: neither the quota's measure nor the workspace's removal fails."""
    script = install_script(
        scripts_dir,
        "nests.py",
        """
        import os, sys, tempfile, time
        os.chdir(tempfile.gettempdir())
        for _ in range(2000):
            os.mkdir("d" * 51)
            os.chdir("d" * 51)
        open("rows.bin", "wb").write(os.urandom(2**20))
        time.sleep(1)  # measured meanwhile
        sys.exit("no model today")
    """,
    )
    set_org_config(api, org, {"training": {"scriptPath": script, "diskMb": 20}})
    run_id = submit(api, org, upload_table(api, org, ai4i.generate(2_000, seed=1), tmp_path))
    before = set(default_root().iterdir())

    assert run_training(run_id, script_worker) == "failed"

    run = run_of(api, org, run_id)
    assert run["error"] == "the training script failed: exited with 1: no model today"
    assert set(default_root().iterdir()) <= before


def then(action: str) -> str:
    """A script that trains as the built-in one does, then does `action` with `out`, its outputPath."""
    return f"""
        import json, os, runpy, sys
        runpy.run_path({str(BUILT_IN_SCRIPT)!r}, run_name="__main__")
        out = json.load(open(sys.argv[1]))["outputPath"]
        {action}
    """


@pytest.mark.parametrize(
    ("action", "reason"),
    [
        ('os.remove(out + "/model.onnx"); os.symlink(SECRET, out + "/model.onnx")', "model.onnx is a link"),
        ('os.remove(out + "/metrics.json"); os.symlink(SECRET, out + "/metrics.json")', "metrics.json is a link"),
        ('os.remove(out + "/model.onnx"); os.mkfifo(out + "/model.onnx")', "model.onnx is not a regular file"),
    ],
)
def test_an_output_that_is_no_regular_file_fails_the_run_and_is_never_read(
    api: TestClient,
    org: OrgKeys,
    script_worker: WorkerContext,
    scripts_dir: Path,
    tmp_path: Path,
    action: str,
    reason: str,
) -> None:
    """Read by the worker, a link out of the workspace would upload the worker's secrets as the model, and a FIFO
    would block it for good."""
    secret = tmp_path / "secret_key"
    secret.write_text("the worker's secret\n")
    script = install_script(scripts_dir, "sly.py", then(action).replace("SECRET", repr(str(secret))))
    set_org_config(api, org, {"training": {"scriptPath": script}})
    run_id = submit(api, org, upload_table(api, org, ai4i.generate(2_000, seed=1), tmp_path))

    assert run_training(run_id, script_worker) == "failed"

    run = run_of(api, org, run_id)
    assert f"the training script's {reason}; outputPath must hold regular files" in run["error"]
    assert run["version"] is None


def test_a_script_finds_no_held_out_row_in_its_folder(
    api: TestClient, org: OrgKeys, script_worker: WorkerContext, scripts_dir: Path, tmp_path: Path
) -> None:
    """The extracted rows, held-out ones included, stayed in source.parquet beside train.parquet, where a script
    could read the held-out rows and fit to them, passing the gates with a model that had seen its judges' data."""
    look = """
        import os, sys
        folder = os.path.dirname(sys.argv[1])
        others = sorted(name for name in os.listdir(folder) if name.endswith(".parquet") and name != "train.parquet")
        if others:
            sys.exit("found " + ", ".join(others))
    """
    script = install_script(scripts_dir, "curious.py", textwrap.dedent(look) + textwrap.dedent(then("pass")))
    set_org_config(api, org, {"training": {"scriptPath": script}})
    run_id = submit(api, org, upload_table(api, org, ai4i.generate(2_000, seed=1), tmp_path))

    # Judged, whatever the gates made of 2,000 rows: the script found nothing to exit for.
    assert run_training(run_id, script_worker) in ("succeeded", "rejected"), run_of(api, org, run_id)["error"]


def test_a_model_whose_tensors_name_files_fails_the_run_before_any_process_loads_it(
    api: TestClient, org: OrgKeys, script_worker: WorkerContext, scripts_dir: Path, tmp_path: Path
) -> None:
    """onnxruntime reads an external-data tensor from the working directory of the process loading the model (the
    worker, its memory probe, a predictor): a script read the embedded stack's .kiln/secret_key out that way, 7
    bytes a run, through the validation note."""
    model = model_reading_a_file(".kiln/secret_key")
    action = f'open(out + "/model.onnx", "wb").write({model!r})'
    script = install_script(scripts_dir, "outside.py", then(action))
    set_org_config(api, org, {"training": {"scriptPath": script}})
    run_id = submit(api, org, upload_table(api, org, ai4i.generate(2_000, seed=1), tmp_path))

    assert run_training(run_id, script_worker) == "failed"

    run = run_of(api, org, run_id)
    assert run["error"] == (
        "the training script's model.onnx keeps tensor data in files outside it ('.kiln/secret_key'): Kiln takes "
        "self-contained models only, which it never reads a file for"
    )
    assert run["version"] is None


def test_a_model_txt_that_aborts_lightgbm_rejects_the_version_and_the_worker_lives_on(
    api: TestClient, org: OrgKeys, script_worker: WorkerContext, scripts_dir: Path, tmp_path: Path
) -> None:
    """LightGBM parses a model inside an OpenMP region, where a malformed one ends the process (std::terminate): read
    by the worker itself, this model.txt killed it, and every retry of the run killed another."""
    from services.trainer.revalidate import revalidate

    garble = (
        'import re; text = open(out + "/model.txt").read(); '
        'open(out + "/model.txt", "w").write(re.sub(r"split_feature=\\S+", "split_feature=99999999", text))'
    )
    script = install_script(scripts_dir, "garbled.py", then(garble))
    set_org_config(api, org, {"training": {"scriptPath": script}})
    run_id = submit(api, org, upload_table(api, org, ai4i.generate(2_000, seed=1), tmp_path))

    assert run_training(run_id, script_worker) == "rejected"

    run = run_of(api, org, run_id)
    model = api.get(f"/v1/orgs/{org.org_id}/models/{run['version']}", headers=org.viewer).json()
    assert run["attempts"] == 1 and "parity" in model["validation"]["failed"]
    note = model["validation"]["note"]
    assert note.startswith("the stored model.txt does not run in LightGBM: killed by SIGABRT"), note
    assert note in [line["message"] for line in logs(api, org, run_id)]
    assert revalidate(org.org_id, run["version"], script_worker) == "rejected"
    again = api.get(f"/v1/orgs/{org.org_id}/models/{run['version']}", headers=org.viewer).json()["validation"]
    assert again["note"].startswith("the stored model.txt does not run in LightGBM: killed by SIGABRT")


def test_a_stock_onnxmltools_export_is_rejected_for_its_zipmap_when_trained_and_when_judged_again(
    api: TestClient, org: OrgKeys, script_worker: WorkerContext, scripts_dir: Path, tmp_path: Path
) -> None:
    """onnxmltools' default export answers `probabilities` as a list of maps (a ZipMap): the run used to fail with an
    IndexError from the metrics, leaving no version; it is a version rejected for onnx_health, saying why."""
    from services.trainer.revalidate import revalidate

    export = "; ".join(
        [
            "import lightgbm, onnxmltools",
            "from onnxmltools.convert.common.data_types import FloatTensorType",
            'features = len(json.load(open(sys.argv[1]))["featureColumns"])',
            'booster = lightgbm.Booster(model_file=out + "/model.txt")',
            'types = [("input", FloatTensorType([None, features]))]',
            "stock = onnxmltools.convert_lightgbm(booster, initial_types=types)",
            'open(out + "/model.onnx", "wb").write(stock.SerializeToString())',
        ]
    )
    script = install_script(scripts_dir, "stock_export.py", then(export))
    set_org_config(api, org, {"training": {"scriptPath": script}})
    run_id = submit(api, org, upload_table(api, org, ai4i.generate(2_000, seed=1), tmp_path))

    assert run_training(run_id, script_worker) == "rejected"

    run = run_of(api, org, run_id)
    model = api.get(f"/v1/orgs/{org.org_id}/models/{run['version']}", headers=org.viewer).json()
    zipmap = "probabilities must be a float tensor [N, 2], got a list of 400 maps"
    assert "onnx_health" in model["validation"]["failed"] and zipmap in model["validation"]["note"]
    assert "onnx_health" in run["error"]
    assert revalidate(org.org_id, run["version"], script_worker) == "rejected"
    again = api.get(f"/v1/orgs/{org.org_id}/models/{run['version']}", headers=org.viewer).json()["validation"]
    assert "onnx_health" in again["failed"] and zipmap in again["note"]


def test_a_link_planted_where_the_worker_writes_the_held_out_rows_is_never_followed(
    api: TestClient, org: OrgKeys, script_worker: WorkerContext, scripts_dir: Path, tmp_path: Path
) -> None:
    victim = tmp_path / "another-orgs-dataset.parquet"
    victim.write_bytes(b"another org's rows")
    plant = 'os.symlink(VICTIM, os.path.join(os.path.dirname(out), "holdout.parquet"))'
    script = install_script(scripts_dir, "planter.py", then(plant).replace("VICTIM", repr(str(victim))))
    set_org_config(api, org, {"training": {"scriptPath": script}})
    run_id = submit(api, org, upload_table(api, org, ai4i.generate(2_000, seed=1), tmp_path))

    assert run_training(run_id, script_worker) in {"succeeded", "rejected"}

    assert victim.read_bytes() == b"another org's rows"


def attempt_in_background(run_id: str, worker: WorkerContext) -> tuple[threading.Thread, list[str]]:
    """The run's attempt on a thread of its own, started; its outcome is in the list once the thread ends."""
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(run_training(run_id, worker)))
    thread.start()
    return thread, outcome


def pid_written_in_a_workspace(name: str, *, within_s: float = 30) -> int:
    """The pid a script wrote to `name` in its workspace: a fresh folder in the workers' own folder of workspaces,
    the one place a confined script may write."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        for path in default_root().glob(f"*/{name}"):
            if text := path.read_text():
                return int(text)
        time.sleep(0.1)
    raise AssertionError(f"no script wrote {name} within {within_s} s")


def test_cancelling_a_running_run_kills_its_script_within_five_seconds(
    api: TestClient, org: OrgKeys, script_worker: WorkerContext, scripts_dir: Path, tmp_path: Path
) -> None:
    pid_name = f"sleeps-{secrets.token_hex(4)}.pid"
    script = install_script(
        scripts_dir,
        "sleeps.py",
        f"""
        import os, time
        open({pid_name!r}, "w").write(str(os.getpid()))
        print('{{"stage": "training", "iteration": 1, "of": 100}}', flush=True)
        time.sleep(600)
    """,
    )
    set_org_config(api, org, {"training": {"scriptPath": script}})
    run_id = submit(api, org, upload_table(api, org, ai4i.generate(2_000, seed=1), tmp_path))
    worker, outcome = attempt_in_background(run_id, script_worker)
    script_pid = pid_written_in_a_workspace(pid_name)
    assert run_of(api, org, run_id)["status"] == "running"
    cancelled_at = time.monotonic()
    assert api.post(f"/v1/orgs/{org.org_id}/trainings/{run_id}/cancel", headers=org.trainer).status_code == 202
    worker.join(timeout=10)
    assert outcome == ["cancelled"] and time.monotonic() - cancelled_at < 5
    assert run_of(api, org, run_id)["status"] == "cancelled"
    with pytest.raises(ProcessLookupError):
        os.killpg(script_pid, signal.SIG_DFL)


def test_a_worker_that_stalled_past_its_lease_kills_its_script_and_registers_nothing(
    api: TestClient, org: OrgKeys, script_worker: WorkerContext, scripts_dir: Path, tmp_path: Path
) -> None:
    """Once its lease ran out the slot may be another run's: the attempt stops as soon as it wakes, and the run is
    the sweep's to hand back."""
    pid_name = f"sleeps-{secrets.token_hex(4)}.pid"
    script = install_script(
        scripts_dir,
        "sleeps.py",
        f"""
        import os, time
        open({pid_name!r}, "w").write(str(os.getpid()))
        time.sleep(600)
    """,
    )
    set_org_config(api, org, {"training": {"scriptPath": script}})
    run_id = submit(api, org, upload_table(api, org, ai4i.generate(2_000, seed=1), tmp_path))
    worker, outcome = attempt_in_background(run_id, script_worker)
    script_pid = pid_written_in_a_workspace(pid_name)
    stall_past_lease(script_worker.sessions, run_id)
    stalled_at = time.monotonic()
    worker.join(timeout=10)
    try:
        assert outcome == ["lost"] and time.monotonic() - stalled_at < 5
        with pytest.raises(ProcessLookupError):
            os.killpg(script_pid, signal.SIG_DFL)
        assert api.get(f"/v1/orgs/{org.org_id}/models", headers=org.viewer).json() == []
        assert runs.reap_expired(script_worker.sessions, max_attempts=3, retry_backoff_s=0)
        assert run_of(api, org, run_id)["status"] == "queued"
    finally:
        if worker.is_alive():  # the attempt went on: stop it, so the test ends
            api.post(f"/v1/orgs/{org.org_id}/trainings/{run_id}/cancel", headers=org.trainer)
            worker.join(timeout=30)


def flood(lines: int) -> str:
    """A script that prints `lines` progress lines, each naming a stage of its own, as fast as it can, then waits."""
    return f"""
        import sys, time
        for i in range({lines}):
            sys.stdout.write('{{"stage": "s%d"}}\\n' % i)
        sys.stdout.flush()
        time.sleep(600)
    """


def wait_for_stage(api: TestClient, org: OrgKeys, run_id: str, prefix: str, *, within_s: float = 60) -> None:
    deadline = time.monotonic() + within_s
    while not run_of(api, org, run_id)["progress"]["stage"].startswith(prefix):
        assert time.monotonic() < deadline, f"the run never reached a stage {prefix}…"
        time.sleep(0.05)


def all_logs(api: TestClient, org: OrgKeys, run_id: str) -> list[dict[str, Any]]:
    url = f"/v1/orgs/{org.org_id}/trainings/{run_id}/logs"
    pages = [api.get(url, params={"limit": 100}, headers=org.viewer).json()]
    while len(pages[-1]) == 100:
        pages.append(api.get(url, params={"limit": 100, "after": pages[-1][-1]["id"]}, headers=org.viewer).json())
    return [line for page in pages for line in page]


def test_a_flood_of_progress_lines_neither_holds_up_a_cancel_nor_floods_the_log(
    api: TestClient, org: OrgKeys, script_worker: WorkerContext, scripts_dir: Path, tmp_path: Path
) -> None:
    set_org_config(api, org, {"training": {"scriptPath": install_script(scripts_dir, "flood.py", flood(200_000))}})
    run_id = submit(api, org, upload_table(api, org, ai4i.generate(2_000, seed=1), tmp_path))
    worker, outcome = attempt_in_background(run_id, script_worker)
    wait_for_stage(api, org, run_id, "s")
    time.sleep(1)
    cancelled_at = time.monotonic()
    assert api.post(f"/v1/orgs/{org.org_id}/trainings/{run_id}/cancel", headers=org.trainer).status_code == 202
    worker.join(timeout=30)
    assert outcome == ["cancelled"] and time.monotonic() - cancelled_at < 5
    assert run_of(api, org, run_id)["status"] == "cancelled"
    lines = all_logs(api, org, run_id)
    assert len(lines) < 50
    assert any(line["message"].startswith("the script printed") for line in lines)


def test_a_flood_of_progress_lines_does_not_hold_a_script_past_its_timeout(
    api: TestClient, org: OrgKeys, script_worker: WorkerContext, scripts_dir: Path, tmp_path: Path
) -> None:
    script = install_script(scripts_dir, "flood.py", flood(100_000))
    set_org_config(api, org, {"training": {"scriptPath": script, "timeoutS": 5}})
    run_id = submit(api, org, upload_table(api, org, ai4i.generate(2_000, seed=1), tmp_path))
    started = time.monotonic()
    assert run_training(run_id, script_worker) == "failed"
    assert time.monotonic() - started < 5 + 10
    assert "timed out after 5 s" in run_of(api, org, run_id)["error"]


def test_a_worker_starting_removes_the_workspaces_killed_workers_left_and_no_other(settings: Settings) -> None:
    """A worker killed mid-run leaves its run's workspace, the org's rows in it, where no one would remove it."""
    with workspace_holder() as (killed, left), workspace_holder() as (_live, held):
        killed.kill()
        killed.wait()
        WorkerContext.open(settings).close()
        assert not left.exists()
        assert (held / "source.parquet").exists()


def test_validating_again_keeps_a_feature_named_like_the_old_label_column(
    api: TestClient, org: OrgKeys, worker: WorkerContext, tmp_path: Path
) -> None:
    """Feature names are the client's: the stored held-out rows keep every feature, whatever it is called."""
    from services.trainer.revalidate import revalidate

    table = ai4i.generate(20_000, seed=1)
    features = ["__label__" if name == "torque" else name for name in ai4i.FEATURES]
    table = table.rename_columns(["__label__" if name == "torque" else name for name in table.column_names])
    run_id = submit(api, org, upload_table(api, org, table, tmp_path), featureColumns=features)
    assert run_training(run_id, worker) == "succeeded"
    version = run_of(api, org, run_id)["version"]
    assert revalidate(org.org_id, version, worker) == "validated"
    model = api.get(f"/v1/orgs/{org.org_id}/models/{version}", headers=org.viewer).json()
    assert model["status"] == "validated" and model["validation"]["failed"] == []


def test_validating_again_reads_held_out_rows_stored_by_an_earlier_kiln(
    api: TestClient, org: OrgKeys, worker: WorkerContext, settings: Settings, tmp_path: Path
) -> None:
    """Versions trained before the held-out rows were stored by position keep their file: it must still be read."""
    from services.trainer.revalidate import revalidate

    run_id = submit(api, org, upload_table(api, org, ai4i.generate(20_000, seed=1), tmp_path))
    assert run_training(run_id, worker) == "succeeded"
    version = run_of(api, org, run_id)["version"]
    store = open_object_store(settings)
    key = model_prefix(org.org_id, version) + HOLDOUT_FILE
    store.get_file(key, tmp_path / "holdout.parquet")
    holdout = load_holdout(tmp_path / "holdout.parquet")
    columns = {name: holdout.features[:, i] for i, name in enumerate(holdout.feature_columns)}
    earlier = pa.table({**columns, "__label__": holdout.labels})
    pq.write_table(earlier.replace_schema_metadata({b"kiln.classes": orjson.dumps(holdout.classes)}), tmp_path / "old")
    store.put_file(key, tmp_path / "old")
    assert revalidate(org.org_id, version, worker) == "validated"


def test_a_decimal_feature_is_numeric_and_trains(api: TestClient, org: OrgKeys, worker: WorkerContext) -> None:
    """Databases export money and measurements as DECIMAL; a decimal is a number, to the api as to the worker."""
    table = ai4i.generate(50_000, seed=1)
    torque = table.column("torque").cast(pa.decimal128(10, 2), safe=False)
    table = table.set_column(table.column_names.index("torque"), "torque", torque)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    uploaded = upload(api, org, sink.getvalue(), name="data.parquet")
    assert uploaded.status_code == 201, uploaded.text
    column = next(c for c in uploaded.json()["columns"] if c["name"] == "torque")
    assert column == {"name": "torque", "type": "decimal128(10, 2)", "numeric": True}
    run_id = submit(api, org, uploaded.json()["datasetId"])
    assert run_training(run_id, worker) == "succeeded", run_of(api, org, run_id)["error"]


def test_a_deployed_version_rejected_on_validating_again_keeps_serving_and_says_so(
    api: TestClient, org: OrgKeys, worker: WorkerContext, tmp_path: Path
) -> None:
    """Stricter gates can reject the version being served; it is not undeployed behind the admin's back, but the
    deployment view shows the verdict and its failed gates."""
    from services.trainer.revalidate import revalidate

    run_id = submit(api, org, upload_table(api, org, ai4i.generate(50_000, seed=1), tmp_path))
    assert run_training(run_id, worker) == "succeeded"
    version = run_of(api, org, run_id)["version"]
    deployed = api.post(f"/v1/orgs/{org.org_id}/deployments", json={"version": version}, headers=org.admin)
    assert deployed.json()["versionStatus"] == "validated" and deployed.json()["failedGates"] == []
    set_org_config(api, org, {"gates": {"minAccuracy": 0.99999}})
    assert revalidate(org.org_id, version, worker) == "rejected"
    current = api.get(f"/v1/orgs/{org.org_id}/deployment", headers=org.viewer).json()
    assert current["version"] == version and current["status"] == "deployed"
    assert current["versionStatus"] == "rejected" and current["failedGates"] == ["accuracy"]
