"""`kiln demo`: the whole path over HTTP, on generated predictive-maintenance data.

Start the stack (or use the one already up), create an organization and its key, upload a dataset, train,
wait for the run, deploy the version, and ask the predictor about a few rows whose outcome is known.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.compute as pc

from deploy.local import ai4i, stack
from deploy.local.demo_report import print_model, print_predictions, print_urls
from deploy.local.processes import StackError
from shared.settings import Settings

TERMINAL = {"succeeded", "rejected", "failed", "cancelled"}
TRAINING_TIMEOUT_S = 90.0
SERVING_TIMEOUT_S = 45.0
POLL_S = 0.5
SAMPLES_PER_CLASS = 3
HYPERPARAMETERS = {
    "numLeaves": 31,
    "learningRate": 0.05,
    "featureFraction": 0.9,
    "baggingFraction": 0.8,
    "baggingFreq": 5,
    "minDataInLeaf": 20,
    "maxDepth": -1,
    "numIterations": 100,
    "objective": "binary",
    "metric": "binary_logloss",
    "verbosity": -1,
}


class DemoError(StackError):
    """A demo step that did not go as it should; the message names the step and the answer it got."""


@dataclass(frozen=True)
class DemoOptions:
    rows: int
    seed: int
    keep: bool


def run(settings: Settings, options: DemoOptions, *, ports: dict[str, int], timeout_s: float, grace_s: float) -> int:
    """Run the walkthrough; stop the stack afterwards if this call started it, unless `keep` is set."""
    running = stack.find_running(settings.data_dir)
    if running is None:
        print("starting the stack ...")
        started = time.monotonic()
        running = stack.start(settings, ports=ports, timeout_s=timeout_s, grace_s=grace_s)
        print(f"  up in {time.monotonic() - started:.1f} s, logs in {running.logs}")
        owned = True
    else:
        stack.check_healthy(running, stack.processes_alive(settings.data_dir, running))
        print(f"using the stack already up at {running.api}")
        owned = False
    try:
        walk_through(running, settings.data_dir.resolve(), options)
        print_urls(running)
    finally:
        if owned and not options.keep:
            stack.stop(settings.data_dir, grace_s=grace_s)
            print("stopped the stack (pass --keep to leave it running)")
    return 0


def walk_through(running: stack.Stack, data_dir: Path, options: DemoOptions) -> None:
    table = ai4i.generate(options.rows, seed=options.seed)
    csv_path = data_dir / "demo" / f"ai4i-{options.rows}-{options.seed}.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    ai4i.write_csv(table, csv_path)
    failures = pc.sum(table[ai4i.TARGET]).as_py()
    print(f"generated {table.num_rows} rows, {failures} failures ({failures / table.num_rows:.1%}): {csv_path}")
    with httpx.Client(base_url=running.api, timeout=60.0) as api:
        org, key = _create_org(api, running.admin_token)
        api.headers["Authorization"] = f"Bearer {key}"
        dataset_id = _upload(api, org, csv_path)
        version = _train(api, org, dataset_id, _time_span(table))
        _deploy(api, org, version)
    samples = _samples(table)
    with httpx.Client(base_url=running.predictor, timeout=30.0) as predictor:
        answer = _predict(predictor, org, key, version, samples)
    print_predictions(samples, answer)


def _create_org(api: httpx.Client, admin_token: str) -> tuple[str, str]:
    org = "demo-" + secrets.token_hex(3)
    admin = {"Authorization": f"Bearer {admin_token}"}
    call(api, "POST", "/v1/orgs", 201, "create the organization", json={"id": org, "name": "Demo plant"}, headers=admin)
    key = call(api, "POST", f"/v1/orgs/{org}/keys", 201, "create an org key", json={"role": "admin"}, headers=admin)
    print(f"organization {org}, admin key {key['keyId']}")
    return org, str(key["key"])


def _upload(api: httpx.Client, org: str, csv_path: Path) -> str:
    with csv_path.open("rb") as data:
        files = {"file": (csv_path.name, data, "text/csv")}
        form = {"timestampColumn": "timestamp"}
        dataset = call(api, "POST", f"/v1/orgs/{org}/datasets", 201, "upload the dataset", files=files, data=form)
    print(f"dataset {dataset['datasetId']}: {dataset['rows']} rows, {len(dataset['columns'])} columns")
    return str(dataset["datasetId"])


def _train(api: httpx.Client, org: str, dataset_id: str, span: dict[str, str]) -> str:
    config = {
        "datasetId": dataset_id,
        "targetColumn": ai4i.TARGET,
        "featureColumns": list(ai4i.FEATURES),
        "validationSplit": 0.2,
        "hyperparameters": HYPERPARAMETERS,
        "dataRange": span,
    }
    accepted = call(api, "POST", f"/v1/orgs/{org}/trainings", 202, "submit the training", json=config)
    run_id = str(accepted["runId"])
    print(f"training run {run_id} {accepted['status']}")
    run = _wait_for_run(api, org, run_id)
    if run["status"] not in {"succeeded", "rejected"}:
        raise DemoError(f"training run {run_id} ended {run['status']}: {run.get('error')}")
    model = call(api, "GET", f"/v1/orgs/{org}/models/{run['version']}", 200, "read the model version")
    print_model(run, model)
    if run["status"] == "rejected":
        raise DemoError(f"version {run['version']} was rejected by the validation gates, so it cannot be deployed")
    return str(run["version"])


def _wait_for_run(api: httpx.Client, org: str, run_id: str) -> dict[str, Any]:
    started = time.monotonic()
    stage: tuple[str, str | None] | None = None
    while time.monotonic() - started < TRAINING_TIMEOUT_S:
        run = call(api, "GET", f"/v1/orgs/{org}/trainings/{run_id}", 200, "follow the training run")
        progress = run.get("progress") or {}
        if (run["status"], progress.get("stage")) != stage:
            stage = (run["status"], progress.get("stage"))
            detail = f"{progress.get('stage')} {progress.get('percent')}%" if run["status"] == "running" else ""
            print(f"  {time.monotonic() - started:5.1f} s  {run['status']} {detail}")
        if run["status"] in TERMINAL:
            return run
        time.sleep(POLL_S)
    raise DemoError(f"training run {run_id} did not finish within {TRAINING_TIMEOUT_S:.0f} s")


def _deploy(api: httpx.Client, org: str, version: str) -> None:
    deployed = call(api, "POST", f"/v1/orgs/{org}/deployments", 201, "deploy the version", json={"version": version})
    print(f"deployed {deployed['version']} at {deployed['deployedAt']}")


def _predict(
    predictor: httpx.Client, org: str, key: str, version: str, samples: list[dict[str, Any]]
) -> dict[str, Any]:
    """Ask until the predictor serves `version`: it learns of the deployment by an event, or its next sweep."""
    body = {"rows": [{name: row[name] for name in ai4i.FEATURES} for row in samples]}
    headers = {"Authorization": f"Bearer {key}"}
    started = time.monotonic()
    while True:
        try:
            response = predictor.post(f"/v1/orgs/{org}/predict", json=body, headers=headers)
        except httpx.TransportError as error:
            raise DemoError(f"predict: {error}") from None
        if response.status_code == httpx.codes.OK and response.headers.get("X-Model-Version") == version:
            answer: dict[str, Any] = response.json()
            return answer
        if time.monotonic() - started > SERVING_TIMEOUT_S:
            raise DemoError(
                f"the predictor did not serve {version} within {SERVING_TIMEOUT_S:.0f} s; "
                f"last answer {response.status_code}: {response.text[:300]}"
            )
        time.sleep(POLL_S)


def call(client: httpx.Client, method: str, path: str, expect: int, step: str, **kwargs: Any) -> dict[str, Any]:
    """One request that must answer `expect`; anything else stops the demo with the server's own words."""
    try:
        response = client.request(method, path, **kwargs)
    except httpx.TransportError as error:
        raise DemoError(f"{step}: {method} {path} failed: {error}") from None
    if response.status_code != expect:
        raise DemoError(f"{step}: {method} {path} answered {response.status_code}: {response.text[:500]}")
    body: dict[str, Any] = response.json()
    return body


def _time_span(table: pa.Table) -> dict[str, str]:
    """The dataRange covering every row: it shows the filter without dropping any data."""
    first: datetime = pc.min(table["timestamp"]).as_py()
    last: datetime = pc.max(table["timestamp"]).as_py()
    return {"startDate": first.isoformat(), "endDate": last.isoformat()}


def _samples(table: pa.Table) -> list[dict[str, Any]]:
    """A few failing and a few healthy rows from the newest data, to set the scores beside the truth."""
    newest = table.slice(table.num_rows * 4 // 5).to_pylist()
    failing = [row for row in newest if row[ai4i.TARGET] == 1][:SAMPLES_PER_CLASS]
    healthy = [row for row in newest if row[ai4i.TARGET] == 0][:SAMPLES_PER_CLASS]
    return failing + healthy
