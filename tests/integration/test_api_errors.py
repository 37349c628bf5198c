"""Requests the api cannot take are answered in Kiln's error format, naming the field, and never with a 500."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.api.app import create_app
from services.api.routers import health
from shared.db.session import CONNECT_TIMEOUT_S
from shared.settings import Settings
from tests.integration.conftest import ADMIN, OrgKeys, config
from tests.support.proxy import FreezableLink
from tests.support.servers import silent_server

BEYOND_INT64 = str(2**63)


@pytest.mark.parametrize("listing", ["predictions", "audit", "deployments"])
@pytest.mark.parametrize(
    ("before", "words"),
    [
        (BEYOND_INT64, "less than or equal to 9223372036854775807"),
        ("-" + BEYOND_INT64, "greater than or equal to 1"),
        ("0", "greater than or equal to 1"),
    ],
)
def test_a_before_outside_the_ids_a_row_can_have_is_refused_naming_it(
    api: TestClient, org: OrgKeys, listing: str, before: str, words: str
) -> None:
    response = api.get(f"/v1/orgs/{org.org_id}/{listing}", params={"before": before}, headers=org.viewer)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "before"
    assert words in response.json()["error"]


def test_a_conflict_id_beyond_int64_is_refused_naming_it(api: TestClient, org: OrgKeys) -> None:
    response = api.post(f"/v1/orgs/{org.org_id}/conflicts/{BEYOND_INT64}", json={"keep": "local"}, headers=org.admin)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "conflictId"
    assert "less than or equal to 9223372036854775807" in response.json()["error"]


def test_an_unknown_route_is_a_404_in_kilns_format(api: TestClient, org: OrgKeys) -> None:
    response = api.get("/v1/nope", headers=org.viewer)
    assert response.status_code == 404
    assert response.json() == {"error": "Not Found", "status": 404}


def test_a_method_a_route_lacks_is_a_405_in_kilns_format_with_allow(api: TestClient, org: OrgKeys) -> None:
    response = api.delete(f"/v1/orgs/{org.org_id}", headers=org.admin)
    assert response.status_code == 405
    assert response.json() == {"error": "Method Not Allowed", "status": 405}
    assert "GET" in response.headers["allow"].split(", ")


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain", None])
def test_json_sent_without_its_content_type_is_refused_saying_which_header_to_send(
    api: TestClient, content_type: str | None
) -> None:
    """curl's `-d` alone sends a body as a form: the schema then finds text where it wants an object."""
    headers = ADMIN if content_type is None else {**ADMIN, "content-type": content_type}

    response = api.post("/v1/orgs", content=b'{"id": "abce", "name": "x"}', headers=headers)

    assert response.status_code == 422, response.text
    assert response.json()["field"] == "body"
    assert response.json()["error"] == (
        "body: send a JSON object with the header Content-Type: application/json "
        f"(it came as {content_type or 'no type'})"
    )
    assert api.get("/v1/orgs/abce", headers=ADMIN).status_code == 404


@pytest.mark.parametrize(
    ("route", "content_type", "content", "words"),
    [
        ("", "application/json", b'{"id": "abce", "name": "\xff\xfe"}', "error parsing the body"),
        ("", "application/json", b'{"id": "abce", "name": "x",}', "not valid JSON"),
        # Past the JSON parser's own nesting limit (Python's recursion limit): it raises, FastAPI answers 400.
        (
            "",
            "application/json",
            b'{"id": "abce", "name": "x", "config": ' + b"[" * 5000 + b"]" * 5000 + b"}",
            "error parsing the body",
        ),
        ("/datasets", "multipart/form-data; boundary=zzz", b"garbage", "multipart"),
        ("/datasets", "multipart/form-data", b"garbage", "boundary"),
    ],
)
def test_a_body_that_cannot_be_parsed_is_a_400_in_kilns_format_naming_the_body(
    api: TestClient, org: OrgKeys, route: str, content_type: str, content: bytes, words: str
) -> None:
    url = f"/v1/orgs{route and '/' + org.org_id + route}"
    response = api.post(url, content=content, headers={**ADMIN, "content-type": content_type})
    assert response.status_code == 400, response.text
    assert set(response.json()) == {"error", "field", "status"} and response.json()["status"] == 400
    assert response.json()["field"] == "body"
    assert words in response.json()["error"]
    assert api.get(f"/v1/orgs/{org.org_id}/datasets", headers=org.viewer).json() == []
    assert api.get("/v1/orgs/abce", headers=ADMIN).status_code == 404


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/v1/orgs/acme%00", "org"),
        ("/v1/orgs/{org}/models/v%00", "version"),
        ("/v1/orgs/{org}/trainings/run_%00/logs", "runId"),
        ("/v1/orgs/{org}/sync-sources/src%00/schedule", "sourceId"),
    ],
)
def test_an_id_in_the_path_with_a_nul_character_is_refused_naming_it(
    api: TestClient, org: OrgKeys, path: str, field: str
) -> None:
    response = api.get(path.replace("{org}", org.org_id), headers=ADMIN)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field
    assert "NUL character" in response.json()["error"]


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/v1/orgs/{org}/models?before=%00", "before"),
        ("/v1/orgs/{org}/models?limit=5&before=v1%00", "before"),
        ("/v1/orgs/{org}/trainings?before=run_%00", "before"),
        ("/v1/orgs/{org}/trainings?status=queued&before=%00", "before"),
    ],
)
def test_a_query_parameter_with_a_nul_character_is_refused_naming_it(
    api: TestClient, org: OrgKeys, path: str, field: str
) -> None:
    """PostgreSQL cannot compare text holding a NUL: a list's `before` holding one failed its lookup with a 500."""
    response = api.get(path.replace("{org}", org.org_id), headers=org.viewer)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field
    assert response.json()["error"] == f"{field} must not contain the NUL character '\\x00'"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"url": "sqlite:////srv/plant\u0000.db", "table": "readings"}, "url"),
        ({"url": "sqlite:////srv/plant.db", "table": "readings", "columnMap": {"TT\u0000": "t"}}, "columnMap"),
    ],
)
def test_a_datasource_with_a_nul_character_is_refused_and_not_stored(
    api: TestClient, org: OrgKeys, body: dict[str, Any], field: str
) -> None:
    response = api.put(f"/v1/orgs/{org.org_id}/datasource", json=body, headers=org.admin)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field
    assert "NUL character" in response.json()["error"]
    assert api.get(f"/v1/orgs/{org.org_id}/datasource", headers=org.admin).status_code == 404


def test_a_database_that_never_answers_costs_a_bounded_wait_then_a_503(
    settings: Settings, org_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    logging.getLogger(health.__name__).addHandler(caplog.handler)  # Kiln's loggers do not propagate to the root
    with silent_server() as database:
        hung = settings.model_copy(update={"database_url": f"postgresql+psycopg2://kiln@{database}/kiln"})
        with TestClient(create_app(hung), raise_server_exceptions=False) as api:
            started = time.monotonic()
            org = api.get(f"/v1/orgs/{org_id}", headers=ADMIN)
            ready = api.get("/readyz")
            waited = time.monotonic() - started
    logging.getLogger(health.__name__).removeHandler(caplog.handler)

    assert (org.status_code, org.headers["retry-after"]) == (503, "1")
    # Readiness answers anyone: the driver's error, naming the database's address, goes to the log only.
    assert ready.status_code == 503 and ready.json()["checks"]["database"] == "unavailable: OperationalError"
    assert ready.json()["error"] == "not ready: database unavailable"
    assert any("timeout expired" in str(record.exc_info[1]) for record in caplog.records if record.exc_info)
    assert waited < 2 * CONNECT_TIMEOUT_S + 3  # hung, each took 30 s: until the server hung up


def test_readiness_refused_for_an_object_store_out_of_reach_is_a_503_in_kilns_error_format_naming_it(
    settings: Settings,
) -> None:
    host, port = settings.s3_endpoint.rsplit(":", 1)
    link = FreezableLink((host, int(port)))
    linked = settings.model_copy(update={"s3_endpoint": f"127.0.0.1:{link.port}"})
    with TestClient(create_app(linked), raise_server_exceptions=False) as api:
        link.close()  # after the start, which needs the store: from now on it refuses connections
        ready = api.get("/readyz")

    assert ready.status_code == 503, ready.text
    body = ready.json()
    assert body["checks"]["objectStore"].startswith("unavailable: ")
    assert body == {
        "ready": False,
        "checks": {"database": "ok", "redis": "ok", "objectStore": body["checks"]["objectStore"]},
        "error": "not ready: objectStore unavailable",
        "status": 503,
    }


LONE = "\ud800"  # a UTF-16 surrogate without its pair: JSON can escape it, no UTF-8 text can hold it


def send_json(api: TestClient, method: str, url: str, body: Any, headers: dict[str, str]) -> Any:
    """`body` as JSON with every non-ASCII character escaped, as clients that send a lone surrogate write it."""
    content = json.dumps(body).encode()
    return api.request(method, url, content=content, headers={**headers, "content-type": "application/json"})


SURROGATE_BODIES = [
    ("POST", "trainings", lambda ds: config(ds, featureColumns=["temperature", LONE]), "featureColumns", "[1]"),
    ("POST", "trainings", lambda ds: config(LONE), "datasetId", ""),
    ("POST", "trainings", lambda ds: config(ds, positiveClass=LONE), "positiveClass", ""),
    (
        "PUT",
        "schedule",
        lambda ds: {"pattern": "0 2 * * 0", "trainingConfig": config(ds, featureColumns=[LONE])},
        "trainingConfig.featureColumns",
        "[0]",
    ),
    (
        "PUT",
        "datasource",
        lambda ds: {"url": "sqlite:////srv/plant.db", "table": "t", "columnMap": {"TT_101": LONE}},
        "columnMap",
        "TT_101",
    ),
    (
        "PUT",
        "datasource",
        lambda ds: {"url": "sqlite:////srv/plant.db", "table": "t", "columnMap": {f"TT{LONE}": "t"}},
        "columnMap",
        "the name TT\\ud800",
    ),
    (
        "POST",
        "sync-sources",
        lambda ds: {
            "url": "sqlite:////srv/plant.db",
            "tables": [{"name": "readings", "primaryKey": "id", "sensitiveColumns": [LONE]}],
        },
        "tables.0.sensitiveColumns",
        "[0]",
    ),
]


@pytest.mark.parametrize(("method", "route", "body", "field", "where"), SURROGATE_BODIES)
def test_a_lone_surrogate_in_a_list_item_mapping_or_union_field_is_refused_naming_it_and_nothing_is_stored(
    api: TestClient, org: OrgKeys, dataset_id: str, method: str, route: str, body: Any, field: str, where: str
) -> None:
    url = f"/v1/orgs/{org.org_id}/{route}"
    before = api.get(url, headers=org.admin)

    response = send_json(api, method, url, body(dataset_id), org.admin)

    assert response.status_code == 422, response.text
    assert response.json()["field"] == field
    assert "lone surrogate" in response.json()["error"]
    assert where in response.json()["error"]
    after = api.get(url, headers=org.admin)
    assert (after.status_code, after.json()) == (before.status_code, before.json())


def test_a_surrogate_pair_is_one_character_and_is_kept(api: TestClient, org: OrgKeys) -> None:
    body = {"url": "sqlite:////srv/plant.db", "table": "t", "columnMap": {"TT_101": "\ud83d\ude00"}}
    response = send_json(api, "PUT", f"/v1/orgs/{org.org_id}/datasource", body, org.admin)
    assert response.status_code == 200, response.text
    assert response.json()["columnMap"] == {"TT_101": "\U0001f600"}


@pytest.mark.parametrize("sent", ["with its length", "chunked"])
def test_a_json_body_over_a_megabyte_is_refused_before_anything_reads_it(api: TestClient, sent: str) -> None:
    """FastAPI reads a body before checking the key: with no key at all, any size was read and parsed first."""
    body = b'{"targetColumn": "' + b"a" * (2 * 1024 * 1024) + b'", "featureColumns": ["x"]}'
    content = body if sent == "with its length" else iter([body[:1000], body[1000:]])
    response = api.post("/v1/orgs/no-such-org/trainings", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 413, response.text
    assert response.json() == {"error": "the request's body is over 1 MB", "field": "body", "status": 413}


def test_an_uploads_route_takes_a_form_over_a_megabyte_only_as_a_multipart_one(api: TestClient) -> None:
    """A urlencoded form is parsed whole in memory, and before the key is checked: one of 300 MB made the api hold
    235 MB more for a request with no key, to a route of an org that does not exist."""
    body = b"field=" + b"a" * (2 * 1024 * 1024)
    headers = {"content-type": "application/x-www-form-urlencoded"}
    response = api.post("/v1/orgs/no-such-org/datasets", content=body, headers=headers)
    assert response.status_code == 413, response.text
    assert response.json() == {"error": "the request's body is over 1 MB", "field": "body", "status": 413}


@pytest.mark.parametrize(
    ("path", "text", "field"),
    [
        ("/v1/orgs/{org}/keys", '{"role": "viewer", "role": "admin"}', "role"),
        ("/v1/orgs", '{"id": "{org}-x", "name": "ok", "id": "{org}-y"}', "id"),
        (
            "/v1/orgs",
            '{"id": "{org}-x", "name": "ok", "config": {"predictions": {}, "predictions": {}}}',
            "config.predictions",
        ),
        ("/v1/orgs", '{"id": "{org}-x", "name": "ok", "config": {"gates": [{"a": 1, "a": 2}]}}', "config.gates.0.a"),
        ("/v1/orgs", '{"id": "{org}-x", "name": "a:b", "name": "c\\u003a"}', "name"),
    ],
)
def test_a_json_body_with_a_key_given_twice_in_one_object_is_refused_naming_it_and_nothing_is_made(
    api: TestClient, org: OrgKeys, path: str, text: str, field: str
) -> None:
    """The JSON parser keeps the last of a repeated key: `{"role": "viewer", "role": "admin"}` made an admin key,
    `{"id": "x-1", "name": "ok", "id": "x-2"}` the org x-2."""
    headers = {**ADMIN, "content-type": "application/json"}
    keys_before = api.get(f"/v1/orgs/{org.org_id}/keys", headers=org.admin).json()

    response = api.post(path.replace("{org}", org.org_id), content=text.replace("{org}", org.org_id), headers=headers)

    assert response.status_code == 422, response.text
    assert response.json()["field"] == field
    assert response.json()["error"] == f"{field} is given more than once in its object"
    assert api.get(f"/v1/orgs/{org.org_id}/keys", headers=org.admin).json() == keys_before
    made = [api.get(f"/v1/orgs/{org.org_id}-{end}", headers=ADMIN).status_code for end in "xy"]
    assert made == [404, 404]


def test_colons_and_escapes_in_a_json_bodys_strings_are_no_repeated_keys(api: TestClient, org_id: str) -> None:
    """The check counts colons outside strings first: a colon or an escape within one must not refuse a good body."""
    text = f'{{"id": "{org_id}", "name": "Plant 2: line \\u003a 4"}}'
    response = api.post("/v1/orgs", content=text, headers={**ADMIN, "content-type": "application/json"})
    assert response.status_code == 201, response.text
    assert response.json()["name"] == "Plant 2: line : 4"


@pytest.mark.parametrize("content_type", ["application/octet-stream", "application/json", None])
def test_a_body_to_the_uploads_route_that_is_no_form_is_refused_as_no_file_unread_whatever_its_size(
    api: TestClient, org: OrgKeys, content_type: str | None
) -> None:
    """Only a form is parsed on the uploads route: any other body is never read, so it meets no size bound (no 413
    even past 1 MB), and the form it is not has no file."""
    headers = org.trainer if content_type is None else {**org.trainer, "content-type": content_type}
    body = b"a" * (2 * 1024 * 1024)
    response = api.post(f"/v1/orgs/{org.org_id}/datasets", content=body, headers=headers)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "file" and response.json()["error"] == "file is required"
