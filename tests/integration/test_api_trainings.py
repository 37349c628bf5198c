"""Submitting training: a valid TrainingConfig is queued; every kind of bad config gets a 422 naming the problem
and leaves no run behind."""

from __future__ import annotations

import contextlib
import io
import secrets
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from decimal import Decimal
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select

from services.api.app import create_app
from services.api.routers import trainings
from shared.db.models import OutboxMessage
from shared.outbox import KIND_TRAIN_TASK, KIND_VALIDATE_TASK
from shared.queues import train_queue
from shared.settings import Settings
from shared.storage import ObjectStore
from shared.training_checks import check_source
from tests.integration.conftest import ADMIN, OrgKeys, config, upload
from tests.support.models import register_model, tiny_model
from tests.support.servers import free_port


def runs(api: TestClient, org: OrgKeys) -> list[dict[str, Any]]:
    response = api.get(f"/v1/orgs/{org.org_id}/trainings", headers=org.viewer)
    assert response.status_code == 200
    return list(response.json())


def test_a_valid_config_is_queued_on_the_orgs_queue(
    api: TestClient, org: OrgKeys, dataset_id: str, settings: Settings
) -> None:
    response = api.post(f"/v1/orgs/{org.org_id}/trainings", json=config(dataset_id), headers=org.trainer)
    assert response.status_code == 202, response.text
    run_id = response.json()["runId"]
    assert response.json()["status"] == "queued"
    run = api.get(f"/v1/orgs/{org.org_id}/trainings/{run_id}", headers=org.viewer).json()
    assert run["status"] == "queued" and run["config"]["hyperparameters"]["numLeaves"] == 31
    broker = redis.Redis.from_url(settings.redis_url)
    assert broker.llen(train_queue(org.org_id)) == 1


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"hyperparameters": {"numLeaves": 31, "leafCount": 4}}, "hyperparameters.leafCount", "unknown hyperparameter"),
        ({"hyperparameters": {"numLeaves": 1}}, "hyperparameters.numLeaves", "greater than or equal to 2"),
        ({"hyperparameters": {"numLeaves": "31"}}, "hyperparameters.numLeaves", "valid integer"),
        ({"hyperparameters": {"isUnbalance": "yes"}}, "hyperparameters.isUnbalance", "valid boolean"),
        ({"validationSplit": "0.2"}, "validationSplit", "valid number"),
        ({"validationSplit": 0}, "validationSplit", "greater than 0"),
        ({"validationSplit": 1}, "validationSplit", "less than 1"),
        ({"dataRange": {"startDate": "2024-02-01", "endDate": "2024-01-01"}}, "dataRange.endDate", "endDate is before"),
        (
            {"dataRange": {"startDate": "0001-01-01T00:00:00+01:00", "endDate": "2024-01-01"}},
            "dataRange.startDate",
            "outside the years 1 to 9999 in UTC",
        ),
        (
            {"dataRange": {"startDate": "2024-01-01", "endDate": "9999-12-31T23:59:59-05:00"}},
            "dataRange.endDate",
            "outside the years 1 to 9999 in UTC",
        ),
        ({"dataRange": {"startDate": 0, "endDate": "2024-01-01"}}, "dataRange.startDate", "startDate must be an ISO"),
        ({"dataRange": {"startDate": "2024-01-01", "endDate": 1.7e9}}, "dataRange.endDate", "endDate must be an ISO"),
        ({"dataRange": {"startDate": "20240101", "endDate": "2024-02-01"}}, "dataRange.startDate", "ISO 8601"),
        ({"targetColumn": "broken"}, "targetColumn", "not a column"),
        ({"targetColumn": "timestamp"}, "targetColumn", "timestampColumn: the time of a row is no label"),
        ({"featureColumns": ["temperature", "vibration"]}, "featureColumns", "vibration"),
        ({"featureColumns": ["temperature", "site"]}, "featureColumns", "non-numeric values: site"),
        ({"featureColumns": []}, "featureColumns", "at least 1"),
        ({"featureColumns": ["failed"]}, "featureColumns", "also in featureColumns"),
        ({"hyperparameters": {"objective": "multiclass", "metric": "auc"}}, "hyperparameters.metric", "objective"),
        (
            {"hyperparameters": {"isUnbalance": True, "scalePosWeight": 3.0}},
            "hyperparameters.scalePosWeight",
            "give one of them",
        ),
        (
            {"hyperparameters": {"objective": "multiclass", "isUnbalance": True}},
            "hyperparameters.isUnbalance",
            "binary",
        ),
        ({"datasetId": None}, "datasetId", "required"),
        (
            {"hyperparameters": {"objective": "multiclass"}, "positiveClass": "yes"},
            "positiveClass",
            "positiveClass: a positive class applies to the binary objective only",
        ),
    ],
)
def test_a_bad_config_is_refused_naming_the_problem_and_queues_nothing(
    api: TestClient, org: OrgKeys, dataset_id: str, changes: dict[str, Any], field: str, words: str
) -> None:
    response = api.post(f"/v1/orgs/{org.org_id}/trainings", json=config(dataset_id, **changes), headers=org.trainer)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field
    assert words in response.json()["error"]
    assert runs(api, org) == []


def test_a_data_range_on_a_dataset_without_timestamps_is_refused(api: TestClient, org: OrgKeys) -> None:
    plain = upload(api, org, b"a,y\n1,0\n2,1\n").json()["datasetId"]
    body = config(
        plain, featureColumns=["a"], targetColumn="y", dataRange={"startDate": "2024-01-01", "endDate": "2024-02-01"}
    )
    response = api.post(f"/v1/orgs/{org.org_id}/trainings", json=body, headers=org.trainer)
    assert response.status_code == 422
    assert response.json()["field"] == "dataRange"


def test_an_unknown_dataset_is_not_found(api: TestClient, org: OrgKeys) -> None:
    response = api.post(f"/v1/orgs/{org.org_id}/trainings", json=config("ds_missing"), headers=org.trainer)
    assert response.status_code == 404
    assert response.json()["field"] == "datasetId"


def test_non_finite_numbers_are_refused(api: TestClient, org: OrgKeys, dataset_id: str) -> None:
    body = config(dataset_id, hyperparameters={"learningRate": "NaN"})
    response = api.post(f"/v1/orgs/{org.org_id}/trainings", json=body, headers=org.trainer)
    assert response.status_code == 422
    assert response.json()["field"] == "hyperparameters.learningRate"


def test_a_body_that_is_not_json_is_a_400_naming_the_body(api: TestClient, org: OrgKeys) -> None:
    response = api.post(
        f"/v1/orgs/{org.org_id}/trainings",
        content=b"{not json",
        headers={**org.trainer, "content-type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json() == {"error": "the request body is not valid JSON", "field": "body", "status": 400}


@pytest.mark.parametrize(("key", "words"), [("", "at least 1 character"), ("k" * 201, "at most 200 characters")])
def test_an_idempotency_key_that_is_empty_or_too_long_is_refused_naming_it(
    api: TestClient, org: OrgKeys, dataset_id: str, key: str, words: str
) -> None:
    headers = {**org.trainer, "Idempotency-Key": key}
    response = api.post(f"/v1/orgs/{org.org_id}/trainings", json=config(dataset_id), headers=headers)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "Idempotency-Key"
    assert words in response.json()["error"]
    assert runs(api, org) == []


def test_one_idempotency_key_sent_by_several_requests_at_once_answers_each_with_the_same_run(
    api: TestClient, org: OrgKeys, dataset_id: str
) -> None:
    headers = {**org.trainer, "Idempotency-Key": "nightly-" + secrets.token_hex(4)}
    start = threading.Barrier(6)

    def send(_: int) -> tuple[int, str]:
        start.wait()
        response = api.post(f"/v1/orgs/{org.org_id}/trainings", json=config(dataset_id), headers=headers)
        return response.status_code, response.text

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(send, range(6)))
    assert [status for status, _ in answers] == [202] * 6, answers
    assert len({orjson.loads(text)["runId"] for _, text in answers}) == 1
    assert len(runs(api, org)) == 1


def test_a_request_whose_twin_commits_its_idempotency_key_first_gets_that_run_and_takes_no_submission(
    api: TestClient, org: OrgKeys, dataset_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The twin commits after this request looked for the key and before it queues its own run: this request's
    insert meets the key. It answers the twin's run, and only the twin counts against the org's rate."""
    patched = api.patch(f"/v1/orgs/{org.org_id}", json={"config": {"submissionsPerMinute": 2}}, headers=ADMIN)
    assert patched.status_code == 200, patched.text
    headers = {**org.trainer, "Idempotency-Key": "nightly-2026-11-26"}
    url = f"/v1/orgs/{org.org_id}/trainings"
    twin: list[Any] = []

    def twin_commits_first(*args: Any, **kwargs: Any) -> Any:
        if not twin:
            twin.append(None)  # the twin itself goes straight through
            twin[0] = api.post(url, json=config(dataset_id), headers=headers)
        return check_source(*args, **kwargs)

    monkeypatch.setattr(trainings, "check_source", twin_commits_first)
    response = api.post(url, json=config(dataset_id), headers=headers)
    assert twin[0].status_code == response.status_code == 202, response.text
    assert response.json()["runId"] == twin[0].json()["runId"]
    assert api.post(url, json=config(dataset_id), headers=org.trainer).status_code == 202  # the minute's second
    assert len(runs(api, org)) == 2


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"targetColumn": "fail\u0000ed"}, "targetColumn"),
        ({"featureColumns": ["temperature", "pres\u0000sure"]}, "featureColumns"),
        ({"datasetId": "ds_\u0000"}, "datasetId"),
    ],
)
def test_text_with_a_nul_character_is_refused_naming_it_and_queues_nothing(
    api: TestClient, org: OrgKeys, dataset_id: str, changes: dict[str, Any], field: str
) -> None:
    response = api.post(f"/v1/orgs/{org.org_id}/trainings", json=config(dataset_id, **changes), headers=org.trainer)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field
    assert "NUL character" in response.json()["error"]
    assert runs(api, org) == []


def test_runs_are_listed_newest_first_in_pages_and_by_status(api: TestClient, org: OrgKeys, dataset_id: str) -> None:
    url = f"/v1/orgs/{org.org_id}/trainings"
    submitted = [api.post(url, json=config(dataset_id), headers=org.trainer).json()["runId"] for _ in range(3)]
    assert api.post(f"{url}/{submitted[1]}/cancel", headers=org.trainer).status_code == 202

    first = api.get(url, params={"limit": 2}, headers=org.viewer).json()
    rest = api.get(url, params={"limit": 2, "before": first[-1]["runId"]}, headers=org.viewer).json()
    cancelled = api.get(url, params={"status": "cancelled"}, headers=org.viewer).json()

    assert [run["runId"] for run in first + rest] == submitted[::-1]
    assert [run["runId"] for run in cancelled] == [submitted[1]]


@pytest.mark.parametrize(
    ("params", "status", "field"),
    [({"status": "done"}, 422, "status"), ({"limit": 0}, 422, "limit"), ({"before": "run_unknown"}, 404, "before")],
)
def test_a_bad_page_of_runs_is_refused_naming_the_parameter(
    api: TestClient, org: OrgKeys, params: dict[str, Any], status: int, field: str
) -> None:
    response = api.get(f"/v1/orgs/{org.org_id}/trainings", params=params, headers=org.viewer)
    assert response.status_code == status, response.text
    assert response.json()["field"] == field


BEYOND_64_BITS = [2**64, 10**20, -(2**63) - 1]


@pytest.mark.parametrize("positive", BEYOND_64_BITS)
def test_an_integer_positive_class_beyond_64_bits_is_refused_naming_it_and_queues_nothing(
    api: TestClient, org: OrgKeys, dataset_id: str, positive: int
) -> None:
    """No target column holds such a class, and hashing the body for Idempotency-Key failed on it as a 500."""
    body = config(dataset_id, positiveClass=positive)
    response = api.post(f"/v1/orgs/{org.org_id}/trainings", json=body, headers=org.trainer)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "positiveClass"
    assert "64-bit integer" in response.json()["error"]
    assert runs(api, org) == []


@pytest.mark.parametrize("positive", [[1], {"class": 1}])
def test_a_positive_class_that_is_no_class_value_is_refused_naming_positive_class_alone(
    api: TestClient, org: OrgKeys, dataset_id: str, positive: Any
) -> None:
    """The union of class types named each of its members as a field: `positiveClass.str`, `positiveClass.int`…"""
    body = config(dataset_id, positiveClass=positive)
    response = api.post(f"/v1/orgs/{org.org_id}/trainings", json=body, headers=org.trainer)
    assert response.status_code == 422, response.text
    message = "positiveClass: positiveClass must be one class value, as the data holds it: a string, number or boolean"
    assert response.json()["error"] == message
    assert response.json()["problems"] == [{"field": "positiveClass", "message": message}]
    assert runs(api, org) == []


@pytest.mark.parametrize("positive", [2**64 - 1, -(2**63)])
def test_an_integer_positive_class_of_64_bits_signed_or_unsigned_is_queued(
    api: TestClient, org: OrgKeys, dataset_id: str, positive: int
) -> None:
    """The largest uint64 and the smallest int64: a Parquet target column of either type trains with such classes."""
    body = config(dataset_id, positiveClass=positive)
    response = api.post(f"/v1/orgs/{org.org_id}/trainings", json=body, headers=org.trainer)
    assert response.status_code == 202, response.text
    assert [run["config"]["positiveClass"] for run in runs(api, org)] == [positive]


def test_a_target_column_name_longer_than_a_model_version_holds_is_refused_and_queues_nothing(
    api: TestClient, org: OrgKeys
) -> None:
    """model_versions.target_column holds 200 characters: a longer target trained to the end, then failed to be
    registered (on PostgreSQL). Uploads keep longer column names; they cannot be the target."""
    long, longest = "t" * 201, "t" * 200
    csv = f"a,{long},{longest}\n1,0,0\n2,1,1\n".encode()
    dataset = upload(api, org, csv).json()["datasetId"]

    refused = api.post(
        f"/v1/orgs/{org.org_id}/trainings",
        json=config(dataset, targetColumn=long, featureColumns=["a"]),
        headers=org.trainer,
    )
    assert refused.status_code == 422, refused.text
    assert refused.json()["field"] == "targetColumn"
    assert "at most 200 characters" in refused.json()["error"]
    assert runs(api, org) == []
    accepted = api.post(
        f"/v1/orgs/{org.org_id}/trainings",
        json=config(dataset, targetColumn=longest, featureColumns=["a"]),
        headers=org.trainer,
    )
    assert accepted.status_code == 202, accepted.text


def test_a_text_positive_class_longer_than_a_prediction_label_is_refused_and_queues_nothing(
    api: TestClient, org: OrgKeys, dataset_id: str
) -> None:
    """A prediction records its class as its label, of at most 200 characters (predictions.label)."""
    body = config(dataset_id, positiveClass="f" * 201)
    response = api.post(f"/v1/orgs/{org.org_id}/trainings", json=body, headers=org.trainer)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "positiveClass"
    assert "at most 200 characters" in response.json()["error"]
    assert runs(api, org) == []


def test_submissions_made_while_redis_is_out_of_reach_are_accepted_and_their_messages_wait_in_the_outbox(
    settings: Settings, org: OrgKeys, dataset_id: str, engine: Engine, store: ObjectStore
) -> None:
    """The rate limit's counter lives in Redis: with Redis down, a training and a judgement answered 500, though the
    outbox is there to keep their messages until the broker (the same Redis) is back."""
    version = register_model(engine, store, org.org_id, tiny_model())
    cut_off = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    with TestClient(create_app(cut_off), raise_server_exceptions=False) as api:
        training = api.post(f"/v1/orgs/{org.org_id}/trainings", json=config(dataset_id), headers=org.trainer)
        judgement = api.post(f"/v1/orgs/{org.org_id}/models/{version}/validate", headers=org.trainer)

    assert (training.status_code, judgement.status_code) == (202, 202), (training.text, judgement.text)
    with engine.connect() as connection:
        waiting = connection.execute(
            select(OutboxMessage.kind, OutboxMessage.payload).where(
                OutboxMessage.published_at.is_(None), OutboxMessage.failed_sends > 0
            )
        )
        kinds = sorted(kind for kind, payload in waiting if payload.get("org_id") == org.org_id)
    assert kinds == sorted([KIND_TRAIN_TASK, KIND_VALIDATE_TASK])


@pytest.fixture
def silent_redis() -> Iterator[str]:
    """A Redis URL whose server takes connections and never answers: paused, overloaded, or a half-open link."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def take_connections() -> None:
        with contextlib.suppress(OSError):  # the server closed
            while True:
                held.append(server.accept()[0])

    threading.Thread(target=take_connections, daemon=True).start()
    yield f"redis://127.0.0.1:{server.getsockname()[1]}/0"
    server.close()
    for connection in held:
        connection.close()


def test_a_submission_while_redis_takes_connections_but_never_answers_is_accepted_its_message_left_in_the_outbox(
    settings: Settings, org: OrgKeys, dataset_id: str, engine: Engine, silent_redis: str
) -> None:
    """The publish waited for an answer for ever: the request never answered, and held its database connection."""
    pool = ThreadPoolExecutor(1)  # not waited for: on the old code its request never ends
    try:
        with TestClient(create_app(settings.model_copy(update={"redis_url": silent_redis}))) as api:
            submitted = pool.submit(
                api.post, f"/v1/orgs/{org.org_id}/trainings", json=config(dataset_id), headers=org.trainer
            )
            response = submitted.result(timeout=120)
    finally:
        pool.shutdown(wait=False)

    assert response.status_code == 202, response.text
    with engine.connect() as connection:
        waiting = connection.execute(
            select(OutboxMessage.payload).where(
                OutboxMessage.published_at.is_(None), OutboxMessage.kind == KIND_TRAIN_TASK
            )
        )
        assert [payload["run_id"] for (payload,) in waiting] == [response.json()["runId"]]


@pytest.mark.parametrize(
    ("target", "kind"),
    [
        (pa.array([Decimal("0.1"), Decimal("1.0")]), "decimal128(2, 1)"),
        (pa.array([[0], [1]]), "list<element: int64>"),
        (pa.array([None, None], type=pa.null()), "null"),
        (pa.array([timedelta(1), timedelta(2)]), "duration[us]"),
    ],
)
def test_a_target_column_of_a_type_no_class_is_made_of_is_refused_at_submission(
    api: TestClient, org: OrgKeys, target: pa.Array, kind: str
) -> None:
    """Accepted with a 202, such a run failed in the worker: the api knows the uploaded columns' types."""
    sink = io.BytesIO()
    pq.write_table(pa.table({"x": [0.5, 1.5], "y": target}), sink)
    uploaded = upload(api, org, sink.getvalue(), name="data.parquet")
    assert uploaded.status_code == 201, uploaded.text
    body = {"datasetId": uploaded.json()["datasetId"], "targetColumn": "y", "featureColumns": ["x"]}

    response = api.post(f"/v1/orgs/{org.org_id}/trainings", json=body, headers=org.trainer)

    assert (response.status_code, response.json()["field"]) == (422, "targetColumn"), response.text
    assert response.json()["error"] == (
        f"targetColumn 'y' is {kind}: a target's classes are integers, floats, booleans or text"
    )
    assert runs(api, org) == []
