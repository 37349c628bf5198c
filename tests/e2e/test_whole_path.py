"""The whole path on real processes over HTTP, on PostgreSQL, Redis and S3: create an org, upload, train on a
Celery worker, deploy, predict, then deploy a second version while a client keeps predicting."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from deploy.local import ai4i, stack
from tests.support.models import ai4i_row

pytestmark = pytest.mark.e2e

TERMINAL = {"succeeded", "rejected", "failed", "cancelled"}


class Client:
    def __init__(self, running: stack.Stack, key: str | None = None) -> None:
        token = key or running.admin_token
        self.api = httpx.Client(base_url=running.api, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        self.predictor = httpx.Client(
            base_url=running.predictor, headers={"Authorization": f"Bearer {token}"}, timeout=30
        )

    def close(self) -> None:
        self.api.close()
        self.predictor.close()

    def call(self, method: str, path: str, expect: int, **kwargs: Any) -> Any:
        response = self.api.request(method, path, **kwargs)
        assert response.status_code == expect, f"{method} {path}: {response.status_code} {response.text}"
        return response.json()


def train(client: Client, org: str, csv: Path) -> str:
    with csv.open("rb") as handle:
        dataset = client.call(
            "POST",
            f"/v1/orgs/{org}/datasets",
            201,
            files={"file": ("ai4i.csv", handle)},
            data={"timestampColumn": "timestamp"},
        )
    run = client.call(
        "POST",
        f"/v1/orgs/{org}/trainings",
        202,
        json={
            "datasetId": dataset["datasetId"],
            "targetColumn": ai4i.TARGET,
            "featureColumns": list(ai4i.FEATURES),
            "validationSplit": 0.2,
            "hyperparameters": {"numLeaves": 31, "learningRate": 0.1, "numIterations": 100},
        },
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = client.call("GET", f"/v1/orgs/{org}/trainings/{run['runId']}", 200)
        if state["status"] in TERMINAL:
            assert state["status"] == "succeeded", state
            return str(state["version"])
        time.sleep(0.25)
    pytest.fail(f"run {run['runId']} did not finish: {state}")


def serves(client: Client, org: str, version: str, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        response = client.predictor.post(f"/v1/orgs/{org}/predict", json={"rows": [ai4i_row()]})
        if response.status_code == 200 and response.headers["x-model-version"] == version:
            return True
        time.sleep(0.1)
    return False


class ClosedLoop(threading.Thread):
    """One client predicting back to back on one keep-alive connection, recording every answer."""

    def __init__(self, running: stack.Stack, key: str, org: str) -> None:
        super().__init__(daemon=True)
        self.client = Client(running, key)
        self.org = org
        self.answers: list[tuple[int, str | None]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        body = {"rows": [ai4i_row(i) for i in range(4)]}
        while not self.stopping.is_set():
            try:
                response = self.client.predictor.post(f"/v1/orgs/{self.org}/predict", json=body)
                self.answers.append((response.status_code, response.headers.get("x-model-version")))
            except httpx.HTTPError as error:
                self.answers.append((0, repr(error)))
        self.client.close()


@pytest.fixture
def admin(running: stack.Stack) -> Iterator[Client]:
    client = Client(running)
    yield client
    client.close()


def test_train_deploy_predict_and_swap_live_with_no_failed_request(
    running: stack.Stack, admin: Client, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    org = "plant-" + secrets.token_hex(3)
    admin.call("POST", "/v1/orgs", 201, json={"id": org, "name": "Plant created after the worker started"})
    key = admin.call("POST", f"/v1/orgs/{org}/keys", 201, json={"role": "admin"})["key"]
    client = Client(running, key)
    request.addfinalizer(client.close)
    first_csv, second_csv = tmp_path / "first.csv", tmp_path / "second.csv"
    ai4i.write_csv(ai4i.generate(50_000, seed=1), first_csv)
    ai4i.write_csv(ai4i.generate(50_000, seed=2), second_csv)

    first = train(client, org, first_csv)
    assert client.call("POST", f"/v1/orgs/{org}/deployments", 201, json={"version": first})["version"] == first
    assert serves(client, org, first)

    second = train(client, org, second_csv)
    loops = [ClosedLoop(running, key, org) for _ in range(3)]
    for loop in loops:
        loop.start()
    time.sleep(1.0)
    client.call("POST", f"/v1/orgs/{org}/deployments", 201, json={"version": second})
    assert serves(client, org, second)
    time.sleep(1.0)
    for loop in loops:
        loop.stopping.set()
        loop.join(timeout=10)

    for loop in loops:
        failures = [answer for answer in loop.answers if answer[0] != 200]
        assert failures == [], failures[:5]
        seen = [version for _status, version in loop.answers]
        assert set(seen) == {first, second}
        switch = seen.index(second)
        assert seen[:switch] == [first] * switch and seen[switch:] == [second] * (len(seen) - switch)
    assert sum(len(loop.answers) for loop in loops) > 100
