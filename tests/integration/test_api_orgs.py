"""Organizations and keys: who may create them, what is shown once, what is stored."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, select, update

from services.api.app import create_app
from shared import schemas
from shared.audit import record_change
from shared.db.migrate import upgrade
from shared.db.models import ApiKey, Organization
from shared.keys import hash_key
from shared.settings import Settings
from tests.integration.conftest import ADMIN, OrgKeys, create_org_with_keys


def test_admin_token_creates_an_org_and_a_second_create_is_a_conflict(api: TestClient, org_id: str) -> None:
    created = api.post("/v1/orgs", json={"id": org_id, "name": "Acme Plant"}, headers=ADMIN)
    assert created.status_code == 201
    assert created.json()["id"] == org_id and created.json()["name"] == "Acme Plant"
    again = api.post("/v1/orgs", json={"id": org_id, "name": "Acme Plant"}, headers=ADMIN)
    assert again.status_code == 409
    assert again.json()["field"] == "id"


def test_a_401_names_the_bearer_scheme_and_an_invalid_token_when_a_key_was_sent(api: TestClient, org: OrgKeys) -> None:
    """RFC 9110 §15.5.2: a 401 carries WWW-Authenticate; RFC 6750 §3: invalid_token for a key sent but not valid."""
    missing = api.get(f"/v1/orgs/{org.org_id}")
    invalid = api.get(f"/v1/orgs/{org.org_id}", headers={"Authorization": "Bearer kiln_nope"})

    assert (missing.status_code, missing.headers["www-authenticate"]) == (401, 'Bearer realm="kiln"')
    assert (invalid.status_code, invalid.headers["www-authenticate"]) == (
        401,
        'Bearer realm="kiln", error="invalid_token"',
    )


def test_org_ids_that_cannot_name_a_queue_are_refused(api: TestClient) -> None:
    response = api.post("/v1/orgs", json={"id": "Bad Org!", "name": "x"}, headers=ADMIN)
    assert response.status_code == 422
    assert response.json()["field"] == "id"


def test_creating_an_org_needs_the_admin_token(api: TestClient, org: OrgKeys, org_id: str) -> None:
    missing = api.post("/v1/orgs", json={"id": "other-" + org_id, "name": "x"})
    assert missing.status_code == 401
    org_key = api.post("/v1/orgs", json={"id": "other-" + org_id, "name": "x"}, headers=org.admin)
    assert org_key.status_code == 403


def test_a_key_is_shown_once_and_stored_only_as_its_digest(api: TestClient, org: OrgKeys, settings) -> None:  # type: ignore[no-untyped-def]
    response = api.post(f"/v1/orgs/{org.org_id}/keys", json={"role": "viewer"}, headers=org.admin)
    assert response.status_code == 201
    body = response.json()
    assert body["role"] == "viewer" and body["key"].startswith("kiln_")
    engine = create_engine(settings.database_url)
    with engine.connect() as connection:
        stored = connection.execute(select(ApiKey.key_hash).where(ApiKey.id == body["keyId"])).scalar_one()
    engine.dispose()
    assert stored == hash_key(body["key"]) and body["key"] not in stored


def test_a_viewer_key_cannot_create_keys(api: TestClient, org: OrgKeys) -> None:
    response = api.post(f"/v1/orgs/{org.org_id}/keys", json={"role": "admin"}, headers=org.viewer)
    assert response.status_code == 403
    assert "admin" in response.json()["error"]


def test_an_unknown_role_is_refused_naming_the_field(api: TestClient, org: OrgKeys) -> None:
    response = api.post(f"/v1/orgs/{org.org_id}/keys", json={"role": "owner"}, headers=org.admin)
    assert response.status_code == 422
    assert response.json()["field"] == "role"


def test_a_revoked_key_is_refused_at_once_and_listed_as_revoked(api: TestClient, org: OrgKeys, org_id: str) -> None:
    created = api.post(f"/v1/orgs/{org.org_id}/keys", json={"role": "viewer"}, headers=org.admin).json()
    leaked = {"Authorization": f"Bearer {created['key']}"}
    assert api.get(f"/v1/orgs/{org.org_id}", headers=leaked).status_code == 200

    revoked = api.delete(f"/v1/orgs/{org.org_id}/keys/{created['keyId']}", headers=org.admin)

    assert revoked.status_code == 204
    assert api.get(f"/v1/orgs/{org.org_id}", headers=leaked).status_code == 401
    listed = api.get(f"/v1/orgs/{org.org_id}/keys", headers=org.admin).json()
    assert listed[0]["keyId"] == created["keyId"]  # newest first
    assert listed[0]["revokedAt"] is not None and all(key["revokedAt"] is None for key in listed[1:])
    assert {key["role"] for key in listed} == {"admin", "trainer", "viewer"}
    assert all(set(key) == {"keyId", "role", "createdAt", "revokedAt"} for key in listed)
    audit = api.get(f"/v1/orgs/{org.org_id}/audit", headers=org.admin).json()
    assert [row["target"] for row in audit if row["action"] == "key.revoked"] == [created["keyId"]]
    again = api.delete(f"/v1/orgs/{org.org_id}/keys/{created['keyId']}", headers=org.admin)
    assert again.status_code == 204


def test_only_an_org_admin_revokes_and_only_the_orgs_own_keys(api: TestClient, org: OrgKeys, org_id: str) -> None:
    own = api.post(f"/v1/orgs/{org.org_id}/keys", json={"role": "viewer"}, headers=org.admin).json()["keyId"]
    other = create_org_with_keys(api, "other-" + org_id)
    foreign = api.post(f"/v1/orgs/{other.org_id}/keys", json={"role": "viewer"}, headers=other.admin).json()["keyId"]

    assert api.delete(f"/v1/orgs/{org.org_id}/keys/{own}", headers=org.trainer).status_code == 403
    assert api.get(f"/v1/orgs/{org.org_id}/keys", headers=org.viewer).status_code == 403
    refused = api.delete(f"/v1/orgs/{org.org_id}/keys/{foreign}", headers=org.admin)
    assert refused.status_code == 404 and refused.json()["error"] == f"key {foreign!r} not found"
    assert [key["revokedAt"] for key in api.get(f"/v1/orgs/{other.org_id}/keys", headers=other.admin).json()] == [
        None
    ] * 4


def patch_config(api: TestClient, org: OrgKeys, config: Any) -> Any:
    return api.patch(f"/v1/orgs/{org.org_id}", json={"config": config}, headers=ADMIN)


def stored_config(api: TestClient, org: OrgKeys) -> dict[str, Any]:
    return dict(api.get(f"/v1/orgs/{org.org_id}", headers=org.viewer).json()["config"])


def test_a_config_patch_changes_only_what_it_names(api: TestClient, org: OrgKeys) -> None:
    first = patch_config(api, org, {"gates": {"minRecall": 0.75}, "training": {"timeoutS": 900, "memoryMb": 4096}})
    second = patch_config(api, org, {"predictions": {"record": True, "riskBands": [0.2, 0.6]}})
    third = patch_config(api, org, {"gates": {"minAccuracy": 0.8}, "training": {"memoryMb": 2048}})

    assert [first.status_code, second.status_code, third.status_code] == [200, 200, 200], third.text
    config = stored_config(api, org)
    assert config == third.json()["config"]
    assert config["gates"] == {"minRecall": 0.75, "minAccuracy": 0.8}
    assert config["training"] == {"timeoutS": 900, "memoryMb": 2048}
    assert config["predictions"] == {"record": True, "riskBands": [0.2, 0.6]}
    assert config["maxConcurrentTrainings"] == 1


def test_a_list_replaces_the_stored_one_and_null_puts_the_default_back(api: TestClient, org: OrgKeys) -> None:
    patch_config(api, org, {"gates": {"minRecall": 0.75, "minAccuracy": 0.8}, "maxConcurrentTrainings": 3})
    patch_config(api, org, {"predictions": {"record": True, "riskBands": [0.2, 0.6]}})

    response = patch_config(
        api,
        org,
        {"gates": {"minRecall": None}, "maxConcurrentTrainings": None, "predictions": {"riskBands": [0.1, 0.9]}},
    )

    assert response.status_code == 200, response.text
    config = stored_config(api, org)
    assert config["gates"] == {"minAccuracy": 0.8}
    assert config["maxConcurrentTrainings"] == 1
    assert config["predictions"] == {"record": True, "riskBands": [0.1, 0.9]}
    assert patch_config(api, org, {"predictions": None}).status_code == 200
    assert stored_config(api, org)["predictions"] == {"record": False, "riskBands": [0.3, 0.7]}
    assert api.patch(f"/v1/orgs/{org.org_id}", json={"config": None}, headers=ADMIN).status_code == 200
    assert (
        stored_config(api, org)
        == api.post("/v1/orgs", json={"id": "x" + org.org_id, "name": "x"}, headers=ADMIN).json()["config"]
    )


@pytest.mark.parametrize(
    ("patch", "field", "words"),
    [
        ({"gates": {"minRecall": 2}}, "config.gates.minRecall", "less than or equal to 1"),
        ({"gates": {"minRecal": 0.5}}, "config.gates.minRecal", "unknown field"),
        ({"predictions": {"riskBands": [0.9, 0.1]}}, "config.predictions.riskBands", "0 < low < high < 1"),
        ({"predictions": {"normalClass": ["none"]}}, "config.predictions.normalClass", "one class value"),
        ({"gates": 5}, "config.gates", "valid dictionary"),
        ([1], "config", "valid dictionary"),
    ],
)
def test_a_patch_that_leaves_an_invalid_config_is_refused_and_changes_nothing(
    api: TestClient, org: OrgKeys, patch: Any, field: str, words: str
) -> None:
    patch_config(api, org, {"gates": {"minRecall": 0.75}})
    before = stored_config(api, org)

    response = patch_config(api, org, patch)

    assert response.status_code == 422, response.text
    assert response.json()["field"] == field
    assert words in response.json()["error"]
    assert stored_config(api, org) == before


def test_an_org_name_with_a_nul_character_is_refused_and_not_stored(api: TestClient, org_id: str) -> None:
    response = api.post("/v1/orgs", json={"id": org_id, "name": "Acme\u0000Plant"}, headers=ADMIN)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "name"
    assert "NUL character" in response.json()["error"]
    assert api.get(f"/v1/orgs/{org_id}", headers=ADMIN).status_code == 404


@pytest.mark.parametrize(
    ("body", "field"),
    [({"name": "Acme\u0000"}, "name"), ({"config": {"training": {"scriptPath": "/srv/a\u0000.py"}}}, "config")],
)
def test_a_patch_with_a_nul_character_is_refused_and_changes_nothing(
    api: TestClient, org: OrgKeys, body: dict[str, Any], field: str
) -> None:
    before = api.get(f"/v1/orgs/{org.org_id}", headers=org.viewer).json()
    response = api.patch(f"/v1/orgs/{org.org_id}", json=body, headers=ADMIN)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field
    assert "NUL character" in response.json()["error"]
    assert api.get(f"/v1/orgs/{org.org_id}", headers=org.viewer).json() == before


def test_a_patch_setting_the_name_to_null_is_refused_naming_it_and_changes_nothing(
    api: TestClient, org: OrgKeys
) -> None:
    """A merge patch's null removes: it answered 200 and changed nothing, which read as done."""
    before = api.get(f"/v1/orgs/{org.org_id}", headers=org.viewer).json()

    response = api.patch(f"/v1/orgs/{org.org_id}", json={"name": None}, headers=ADMIN)

    assert response.status_code == 422, response.text
    assert response.json()["field"] == "name"
    assert "keeps its name" in response.json()["error"]
    assert api.get(f"/v1/orgs/{org.org_id}", headers=org.viewer).json() == before


LONE = "\ud800"  # a UTF-16 surrogate without its pair: JSON can escape it, no UTF-8 text can hold it


@pytest.fixture
def sqlite_api(settings: Settings, tmp_path: Path) -> Iterator[TestClient]:
    """The api on the embedded SQLite database, which stores whatever JSON text it is given (PostgreSQL refuses a
    lone surrogate at the INSERT)."""
    url = f"sqlite:///{tmp_path / 'kiln.db'}"
    upgrade(url)
    with TestClient(
        create_app(settings.model_copy(update={"database_url": url})), raise_server_exceptions=False
    ) as api:
        yield api


def send_json(api: TestClient, method: str, url: str, body: Any) -> Any:
    """`body` as JSON with every non-ASCII character escaped, as clients that send a lone surrogate write it."""
    return api.request(
        method, url, content=json.dumps(body).encode(), headers={**ADMIN, "content-type": "application/json"}
    )


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_a_lone_surrogate_in_a_config_is_refused_naming_it_and_the_org_its_audit_and_answers_are_unchanged(
    request: pytest.FixtureRequest, database: str, org_id: str
) -> None:
    api: TestClient = request.getfixturevalue("api" if database == "postgresql" else "sqlite_api")
    org = create_org_with_keys(api, org_id)
    url = f"/v1/orgs/{org.org_id}"
    before = (api.get(url, headers=ADMIN).json(), api.get(f"{url}/audit", headers=ADMIN).json())

    patched = send_json(api, "PATCH", url, {"config": {"predictions": {"normalClass": LONE}}})
    created = send_json(
        api, "POST", "/v1/orgs", {"id": "x" + org_id, "name": "x", "config": {"predictions": {"normalClass": LONE}}}
    )

    assert patched.status_code == 422, patched.text
    assert patched.json()["field"] == "config"
    assert "lone surrogate (\\ud800 to \\udfff" in patched.json()["error"]
    assert "at predictions.normalClass" in patched.json()["error"]
    assert created.status_code == 422, created.text
    assert created.json()["field"] == "config.predictions.normalClass"
    assert "lone surrogate" in created.json()["error"]
    after = (api.get(url, headers=ADMIN), api.get(f"{url}/audit", headers=ADMIN))
    assert [answer.status_code for answer in after] == [200, 200]
    assert (after[0].json(), after[1].json()) == before
    assert api.get(f"/v1/orgs/x{org_id}", headers=ADMIN).status_code == 404


def test_an_org_change_the_api_cannot_answer_is_not_committed(
    sqlite_api: TestClient, org_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Creating and updating an org commit in the handler (its outbox message is sent after the commit), before
    FastAPI serialises the answer: the answer is made first, so a change it cannot answer is never stored."""
    org = create_org_with_keys(sqlite_api, org_id)
    url = f"/v1/orgs/{org.org_id}"
    before = (sqlite_api.get(url, headers=ADMIN).json(), sqlite_api.get(f"{url}/audit", headers=ADMIN).json())
    with monkeypatch.context() as unchecked:  # input the checks let through, as a lone surrogate was before
        unchecked.setattr(schemas, "unfit_text", lambda _value, **_limits: None)
        unanswerable = {"predictions": {"normalClass": LONE}}
        patched = send_json(sqlite_api, "PATCH", url, {"config": unanswerable})
        created = send_json(sqlite_api, "POST", "/v1/orgs", {"id": "x" + org_id, "name": "x", "config": unanswerable})

    assert (patched.status_code, created.status_code) == (500, 500)
    after = (sqlite_api.get(url, headers=ADMIN), sqlite_api.get(f"{url}/audit", headers=ADMIN))
    assert [answer.status_code for answer in after] == [200, 200]
    assert (after[0].json(), after[1].json()) == before
    assert sqlite_api.get(f"/v1/orgs/x{org_id}", headers=ADMIN).status_code == 404


def nested(depth: int, leaf: Any = 1) -> Any:
    """An object `depth` levels deep: {"a": {"a": ... leaf}}."""
    value = leaf
    for _ in range(depth):
        value = {"a": value}
    return value


def test_a_config_nested_to_the_limit_is_read_and_refused_for_what_it_holds(api: TestClient, org: OrgKeys) -> None:
    before = api.get(f"/v1/orgs/{org.org_id}/audit", headers=ADMIN).json()
    response = patch_config(api, org, nested(schemas.MAX_NESTING))
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "config.a"
    assert api.get(f"/v1/orgs/{org.org_id}/audit", headers=ADMIN).json() == before


@pytest.mark.parametrize("depth", [33, 300, 400, 900])
@pytest.mark.parametrize("kind", ["objects", "lists"])
def test_a_config_nested_deeper_than_the_limit_is_refused_naming_it_and_changes_nothing(
    api: TestClient, org: OrgKeys, depth: int, kind: str
) -> None:
    patch_config(api, org, {"gates": {"minRecall": 0.75}})
    before = (stored_config(api, org), api.get(f"/v1/orgs/{org.org_id}/audit", headers=ADMIN).json())
    config = nested(depth) if kind == "objects" else {"gates": json.loads("[" * (depth - 1) + "]" * (depth - 1))}

    response = patch_config(api, org, config)

    assert response.status_code == 422, response.text
    assert response.json()["field"] == "config"
    assert "more than 32 deep" in response.json()["error"]
    assert (stored_config(api, org), api.get(f"/v1/orgs/{org.org_id}/audit", headers=ADMIN).json()) == before


@pytest.mark.parametrize(
    ("normal", "words"),
    [(10**20, "64-bit integer"), (-(2**63) - 1, "64-bit integer"), ("n" * 201, "at most 200 characters")],
)
def test_a_normal_class_no_model_can_have_is_refused_naming_it_and_changes_nothing(
    api: TestClient, org: OrgKeys, org_id: str, normal: object, words: str
) -> None:
    before = (stored_config(api, org), api.get(f"/v1/orgs/{org.org_id}/audit", headers=ADMIN).json())
    patched = patch_config(api, org, {"predictions": {"normalClass": normal}})
    created = api.post(
        "/v1/orgs",
        json={"id": "x" + org_id, "name": "x", "config": {"predictions": {"normalClass": normal}}},
        headers=ADMIN,
    )
    for response in (patched, created):
        assert response.status_code == 422, response.text
        assert response.json()["field"] == "config.predictions.normalClass"
        assert words in response.json()["error"]
    assert (stored_config(api, org), api.get(f"/v1/orgs/{org.org_id}/audit", headers=ADMIN).json()) == before
    assert api.get(f"/v1/orgs/x{org_id}", headers=ADMIN).status_code == 404


@pytest.mark.parametrize(
    ("limit", "value"),
    [
        ("memoryMb", 10**24),
        ("memoryMb", schemas.LIMIT_MAXIMA["memoryMb"] + 1),
        ("cpuS", 10**24),
        ("cpuS", schemas.LIMIT_MAXIMA["cpuS"] + 1),
        ("maxFileMb", 10**24),
        ("maxOpenFiles", 10**24),
        ("maxOpenFiles", schemas.LIMIT_MAXIMA["maxOpenFiles"] + 1),
        ("diskMb", 10**24),
        ("diskMb", schemas.LIMIT_MAXIMA["diskMb"] + 1),
    ],
)
def test_a_training_limit_over_its_maximum_is_refused_naming_it_and_changes_nothing(
    api: TestClient, org: OrgKeys, org_id: str, limit: str, value: int
) -> None:
    """Unbounded, memoryMb 10^24 was taken, and every run of the org then failed: setrlimit cannot hold it."""
    patch_config(api, org, {"training": {"timeoutS": 900}})
    before = (stored_config(api, org), api.get(f"/v1/orgs/{org.org_id}/audit", headers=ADMIN).json())
    patched = patch_config(api, org, {"training": {limit: value}})
    created = api.post(
        "/v1/orgs", json={"id": "x" + org_id, "name": "x", "config": {"training": {limit: value}}}, headers=ADMIN
    )
    for response in (patched, created):
        assert response.status_code == 422, response.text
        assert response.json()["field"] == f"config.training.{limit}"
        assert f"less than or equal to {schemas.LIMIT_MAXIMA[limit]}" in response.json()["error"]
    assert (stored_config(api, org), api.get(f"/v1/orgs/{org.org_id}/audit", headers=ADMIN).json()) == before
    assert api.get(f"/v1/orgs/x{org_id}", headers=ADMIN).status_code == 404


def test_a_stored_limit_over_a_maximum_set_since_is_named_as_stored_when_another_setting_is_patched(
    api: TestClient, org: OrgKeys, engine: Engine
) -> None:
    """An org configured by an older Kiln, before the maximum: patching a gate was refused for cpuS, with no word
    that the patch had not sent it, nor how to put it right."""
    with engine.begin() as connection:
        connection.execute(
            update(Organization).where(Organization.id == org.org_id).values(config={"training": {"cpuS": 10**13}})
        )

    refused = patch_config(api, org, {"gates": {"minRecall": 0.5}})
    fixed = patch_config(api, org, {"gates": {"minRecall": 0.5}, "training": {"cpuS": None}})

    assert (refused.status_code, refused.json()["field"]) == (422, "config.training.cpuS"), refused.text
    assert refused.json()["error"].endswith("(the stored value: send one within bounds, or null for the default)")
    assert fixed.status_code == 200, fixed.text
    assert stored_config(api, org)["gates"]["minRecall"] == 0.5


def test_a_bad_item_of_a_list_the_patch_sends_is_not_called_stored(api: TestClient, org: OrgKeys) -> None:
    refused = patch_config(api, org, {"predictions": {"riskBands": [0.5, "x"]}})

    assert (refused.status_code, refused.json()["field"]) == (422, "config.predictions.riskBands.1"), refused.text
    assert "stored value" not in refused.json()["error"]


def test_each_training_limit_may_be_set_to_its_maximum(api: TestClient, org: OrgKeys) -> None:
    response = patch_config(api, org, {"training": dict(schemas.LIMIT_MAXIMA)})
    assert response.status_code == 200, response.text
    assert stored_config(api, org)["training"] == schemas.LIMIT_MAXIMA


def test_a_config_and_audit_entry_stored_with_a_lone_surrogate_before_it_was_refused_read_escaped_and_mend(
    sqlite_api: TestClient, org_id: str
) -> None:
    """SQLite stored them, and GET of the org and of every audit page holding the entry answered 500 for good."""
    org = create_org_with_keys(sqlite_api, org_id)
    url = f"/v1/orgs/{org.org_id}"
    stored = {"predictions": {"record": False, "riskBands": [0.3, 0.7], "normalClass": LONE}}
    with sqlite_api.app.state.resources.sessions() as session:  # type: ignore[attr-defined]
        session.get_one(Organization, org_id).config = stored
        detail = {"config": {"predictions": {"normalClass": LONE}}}
        record_change(session, org_id=org_id, actor="admin-token", action="org.updated", target=org_id, detail=detail)
        session.commit()

    shown = sqlite_api.get(url, headers=org.viewer)
    audit = sqlite_api.get(f"{url}/audit", headers=org.viewer)

    assert shown.status_code == 200, shown.text
    assert shown.json()["config"]["predictions"]["normalClass"] == "\\ud800"
    assert audit.status_code == 200, audit.text
    assert audit.json()[0]["detail"] == {"config": {"predictions": {"normalClass": "\\ud800"}}}
    mended = sqlite_api.patch(url, json={"config": {"predictions": {"normalClass": "none"}}}, headers=ADMIN)
    assert mended.status_code == 200, mended.text
    assert sqlite_api.get(url, headers=org.viewer).json()["config"]["predictions"]["normalClass"] == "none"
