"""Serving under load on real processes (two predictors of two workers each, on PostgreSQL, Redis and S3): swaps
that lose nothing and that every keep-alive client sees in deploy order, and a replica that was down catching up."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine

from deploy.local import stack
from deploy.local.processes import spawn, stop_groups
from shared.settings import Settings
from shared.storage import open_object_store
from tests.e2e.conftest import REPO_ROOT
from tests.support.metrics import Samples, parse_samples, sample
from tests.support.models import ai4i_row, register_model, tiny_model
from tests.support.servers import free_port, wait_for_http

pytestmark = pytest.mark.e2e

RECONCILE_S = 3.0
FLUSH_S = Settings.model_fields["predictor_metrics_flush_s"].default


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"predictor_reconcile_s": RECONCILE_S})


class Predictor:
    """A second predictor process (two workers), started and stopped by the test."""

    def __init__(self, settings: Settings, logs: Path) -> None:
        self.env = {**os.environ, **settings.as_env()}
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = logs
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [
            sys.executable,
            "-m",
            "services.predictor",
            "--host",
            "127.0.0.1",
            "--port",
            self.url.rsplit(":", 1)[1],
            "--workers",
            "2",
        ]
        self.process = spawn(command, env=self.env, cwd=REPO_ROOT, log_path=self.log)
        wait_for_http(self.url + "/v2/health/live", self.process, timeout=60)

    def stop(self) -> None:
        if self.process is not None:
            stop_groups([self.process.pid], grace_s=5)
            self.process.wait()
            self.process = None


@pytest.fixture
def second(settings: Settings, tmp_path: Path) -> Iterator[Predictor]:
    predictor = Predictor(settings, tmp_path / "predictor-2.log")
    predictor.start()
    yield predictor
    predictor.stop()


@pytest.fixture
def org(running: stack.Stack, org_id: str) -> tuple[str, str]:
    with httpx.Client(base_url=running.api, headers={"Authorization": f"Bearer {running.admin_token}"}) as admin:
        admin.post("/v1/orgs", json={"id": org_id, "name": org_id}).raise_for_status()
        key = admin.post(f"/v1/orgs/{org_id}/keys", json={"role": "admin"}).json()["key"]
    return org_id, key


@pytest.fixture
def versions(settings: Settings, org: tuple[str, str]) -> list[str]:
    engine = create_engine(settings.database_url)
    store = open_object_store(settings)
    made = [register_model(engine, store, org[0], tiny_model(seed=seed)) for seed in (11, 12, 13)]
    engine.dispose()
    return made


def client(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=10)


class Watcher:
    """Keep-alive connections to every replica (each connection sticks to one worker process), enough of them that
    every worker of every predictor is watched."""

    def __init__(self, urls: list[str], org_id: str, key: str, per_predictor: int = 8) -> None:
        self.path = f"/v1/orgs/{org_id}/predict"
        self.key = key
        self.clients = [client(url, key) for url in urls for _ in range(per_predictor)]
        self.workers: dict[str, set[str]] = {url: set() for url in urls}

    def cover_every_worker(self, workers_per_predictor: int = 2, seconds: float = 15) -> None:
        """Reconnect to a predictor until its connections reach all its workers: just after it starts, one worker
        may take every connection while the other is still loading."""
        deadline = time.monotonic() + seconds
        while short := {url for url, seen in self.workers.items() if len(seen) < workers_per_predictor}:
            if time.monotonic() > deadline:
                pytest.fail(f"connections reached only these workers: {self.workers}")
            for index, one in enumerate(self.clients):
                if str(one.base_url).rstrip("/") in short:
                    one.close()
                    self.clients[index] = client(str(one.base_url), self.key)
            self.versions()

    def versions(self) -> list[str | None]:
        seen = []
        for one in self.clients:
            response = one.post(self.path, json={"rows": [ai4i_row()]})
            self.workers[str(one.base_url).rstrip("/")].add(response.headers.get("x-replica", "?"))
            seen.append(response.headers.get("x-model-version"))
        return seen

    def until_everywhere(self, version: str, seconds: float = 10) -> float:
        """Seconds until every connection answers `version`."""
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            if set(self.versions()) == {version}:
                return time.monotonic() - started
        pytest.fail(f"{version} not served on every replica within {seconds} s")

    def close(self) -> None:
        for one in self.clients:
            one.close()

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class ClosedLoop(threading.Thread):
    def __init__(self, url: str, org_id: str, key: str) -> None:
        super().__init__(daemon=True)
        self.client = client(url, key)
        self.path = f"/v1/orgs/{org_id}/predict"
        self.answers: list[tuple[int, str | None, int | None]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        body = {"rows": [ai4i_row(i) for i in range(3)]}
        while not self.stopping.is_set():
            try:
                response = self.client.post(self.path, json=body)
                deployment = response.headers.get("x-deployment-id")
                self.answers.append(
                    (
                        response.status_code,
                        response.headers.get("x-model-version"),
                        int(deployment) if deployment else None,
                    )
                )
            except httpx.HTTPError as error:
                self.answers.append((0, repr(error), None))
        self.client.close()


def deployment_versions(api: httpx.Client, org_id: str) -> dict[int, str]:
    history = api.get(f"/v1/orgs/{org_id}/deployments", params={"limit": 1000}).json()
    return {row["deploymentId"]: row["version"] for row in history}


def test_twenty_swaps_under_load_lose_nothing_and_each_client_sees_them_in_order(
    running: stack.Stack, second: Predictor, org: tuple[str, str], versions: list[str]
) -> None:
    org_id, key = org
    replicas = [running.predictor, second.url]
    with Watcher(replicas, org_id, key) as watcher, client(running.api, key) as api:
        api.post(f"/v1/orgs/{org_id}/deployments", json={"version": versions[0]}).raise_for_status()
        watcher.until_everywhere(versions[0])
        watcher.cover_every_worker()
        loops = [ClosedLoop(url, org_id, key) for url in replicas for _ in range(2)]
        for loop in loops:
            loop.start()
        visible_after: list[float] = []
        for swap in range(20):  # v2, rollback (to v1), v0, v2, rollback, v0, ...
            if swap % 3 == 1:
                response = api.post(f"/v1/orgs/{org_id}/rollback", json={})
            else:
                response = api.post(f"/v1/orgs/{org_id}/deployments", json={"version": versions[2 - swap % 3]})
            response.raise_for_status()
            visible_after.append(watcher.until_everywhere(response.json()["version"]))
        for loop in loops:
            loop.stopping.set()
            loop.join(timeout=10)
        deployed = deployment_versions(api, org_id)
    for loop in loops:
        assert [answer for answer in loop.answers if answer[0] != 200] == []
        assert all(deployed[deployment] == version for _status, version, deployment in loop.answers)  # type: ignore[index]
        order = [deployment for _status, _version, deployment in loop.answers]
        assert order == sorted(order)  # type: ignore[type-var]
        assert len(set(order)) >= 5
    assert len(deployed) == 21
    median, worst = sorted(visible_after)[10], max(visible_after)
    print(f"\nswap visible on every replica after (s): median {median:.3f}, max {worst:.3f}")


def test_a_replica_that_was_down_during_a_deploy_serves_it_when_it_returns(
    running: stack.Stack, second: Predictor, org: tuple[str, str], versions: list[str]
) -> None:
    org_id, key = org
    with client(running.api, key) as api:
        api.post(f"/v1/orgs/{org_id}/deployments", json={"version": versions[0]}).raise_for_status()
        with Watcher([running.predictor, second.url], org_id, key) as both:
            both.until_everywhere(versions[0])
        second.stop()
        api.post(f"/v1/orgs/{org_id}/deployments", json={"version": versions[1]}).raise_for_status()
        with Watcher([running.predictor], org_id, key) as first:
            first.until_everywhere(versions[1])
        second.start()
        with Watcher([second.url], org_id, key) as returned:
            assert returned.until_everywhere(versions[1], seconds=RECONCILE_S) < RECONCILE_S


def test_ready_means_the_deployed_model_answers(
    running: stack.Stack, second: Predictor, org: tuple[str, str], versions: list[str]
) -> None:
    org_id, key = org
    with client(running.api, key) as api:
        api.post(f"/v1/orgs/{org_id}/deployments", json={"version": versions[2]}).raise_for_status()
    second.stop()
    second.start()
    with client(second.url, key) as fresh:
        while fresh.get("/v2/health/ready").status_code != 200:
            time.sleep(0.01)
        answer: Any = fresh.post(f"/v1/orgs/{org_id}/predict", json={"rows": [ai4i_row()]})
    assert answer.status_code == 200 and answer.headers["x-model-version"] == versions[2]


def test_what_both_workers_of_the_stacks_predictor_counted_adds_up_at_metrics(
    running: stack.Stack, org: tuple[str, str], versions: list[str]
) -> None:
    org_id, key = org
    with client(running.api, running.admin_token) as api:
        api.post(f"/v1/orgs/{org_id}/deployments", json={"version": versions[0]}).raise_for_status()
    with Watcher([running.predictor], org_id, key) as watcher:
        watcher.until_everywhere(versions[0])
    time.sleep(FLUSH_S + 0.5)  # what the watcher's requests counted has been shared
    before = scrape(running)
    replicas: set[str] = set()
    answered = 0
    while len(replicas) < 2:  # a fresh connection each time, so that both workers answer some
        assert answered < 400, f"only {replicas} answered"
        with client(running.predictor, key) as fresh:
            response = fresh.post(f"/v1/orgs/{org_id}/predict", json={"rows": [ai4i_row()] * 3})
        assert response.status_code == 200
        replicas.add(response.headers["x-replica"])
        answered += 1
    for _ in range(2):
        with client(running.predictor, key) as fresh:
            assert fresh.post(f"/v1/orgs/{org_id}/predict", json={"rows": []}).status_code == 422

    def grown() -> tuple[float, float, float]:
        after = scrape(running)
        labels = {"org": org_id, "version": versions[0]}
        return (
            sample(after, "kiln_inference_requests_total", **labels, outcome="success")
            - sample(before, "kiln_inference_requests_total", **labels, outcome="success"),
            sample(after, "kiln_inference_rows_total", **labels)
            - sample(before, "kiln_inference_rows_total", **labels),
            sample(after, "kiln_inference_requests_total", **labels, outcome="refused")
            - sample(before, "kiln_inference_requests_total", **labels, outcome="refused"),
        )

    deadline = time.monotonic() + 10
    while grown() != (answered, 3 * answered, 2) and time.monotonic() < deadline:
        time.sleep(0.2)
    # Once the totals are all in, every later scrape, answered by either worker, shows them.
    assert [grown() for _ in range(10)] == [(answered, 3 * answered, 2)] * 10


def scrape(running: stack.Stack) -> Samples:
    with client(running.predictor, running.admin_token) as admin:
        response = admin.get("/metrics")
    response.raise_for_status()
    return parse_samples(response.text)
