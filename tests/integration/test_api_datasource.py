"""The org's own database as a data source: the password is stored encrypted and never shown or returned."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select

from shared.crypto import SecretBox
from shared.db.models import DataSource
from shared.errors import SecretUnreadable
from shared.settings import Settings
from tests.integration.conftest import OrgKeys

SOURCE: dict[str, object] = {
    "url": "postgresql+psycopg2://historian:s3cret-pa55@scada.plant.local:5432/historian",
    "table": "readings",
    "timestampColumn": "recorded_at",
    "columnMap": {"TT_101": "temperature", "PT_7": "pressure"},
}


def put(api: TestClient, org: OrgKeys, body: dict[str, object], headers: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return api.put(f"/v1/orgs/{org.org_id}/datasource", json=body, headers=headers or org.admin)


def test_the_password_is_stored_encrypted_and_never_returned(api: TestClient, org: OrgKeys, settings: Settings) -> None:
    response = put(api, org, SOURCE)
    assert response.status_code == 200, response.text
    shown = api.get(f"/v1/orgs/{org.org_id}/datasource", headers=org.viewer)
    for body in (response.json(), shown.json()):
        assert "s3cret-pa55" not in str(body)
        assert body["url"] == "postgresql+psycopg2://historian:***@scada.plant.local:5432/historian"
        assert body["hasPassword"] is True and body["columnMap"] == SOURCE["columnMap"]
    engine = create_engine(settings.database_url)
    with engine.connect() as connection:
        row = connection.execute(select(DataSource).where(DataSource.org_id == org.org_id)).one()
    engine.dispose()
    assert "s3cret-pa55" not in row.url and "s3cret-pa55" not in (row.password_encrypted or "")
    box = SecretBox(settings.secret_key.get_secret_value())
    assert box.decrypt(row.password_encrypted, context=f"datasource:{org.org_id}") == "s3cret-pa55"


def test_a_datasource_can_be_replaced(api: TestClient, org: OrgKeys) -> None:
    put(api, org, SOURCE)
    replaced = put(api, org, {"url": "sqlite:////srv/plant/scada.db", "table": "tags"})
    assert replaced.status_code == 200
    assert replaced.json()["hasPassword"] is False and replaced.json()["table"] == "tags"


def test_urls_kiln_cannot_read_are_refused(api: TestClient, org: OrgKeys) -> None:
    for url, words in [
        ("not a url", "not a database URL"),
        ("mysql://u:p@db/x", "'mysql' databases are not supported"),
        ("postgresql+asyncpg://u:p@db/x", "postgresql+asyncpg:// names a driver Kiln does not ship"),
        ("sqlite+nosuch:////srv/plant/scada.db", "sqlite+nosuch:// names a driver Kiln does not ship"),
        ("sqlite:///relative.db", "absolute path"),
        # The driver would open "records.db?mode=ro", a file the org's folder rule never checked.
        ("sqlite:////srv/stores/records.db?uri=true&mode=ro", "takes no query parameters (mode, uri)"),
        # SQLAlchemy drops a parameter without a value: the file read would have been /srv/stores/records.
        ("sqlite:////srv/stores/records?2024.db", "write a ? in the file's name as %3F"),
        ("postgresql+psycopg2://historian@scada/historian?sslmode", "the query parameters sslmode have no value"),
        (  # an @ in a value is the query's own, past the credentials
            "postgresql+psycopg2://historian@scada/historian?sslmode&application_name=etl@plant",
            "the query parameters sslmode have no value",
        ),
        ("postgresql+psycopg2://historian@scada..plant/historian", "'scada..plant' is not a host name"),
        ("postgresql+psycopg2://historian@scada/historian?sslkey=/srv/kiln/other.key", "sslkey are not accepted"),
        # libpq refused these only as a run connected, and each run was retried as a server out of reach.
        ("postgresql+psycopg2://historian@scada/historian?sslmode=bogus", "sslmode must be one of disable, allow"),
        ("postgresql+psycopg2://historian@scada/historian?connect_timeout=abc", "connect_timeout must be a whole"),
        ("postgresql+psycopg2://historian@scada/historian?keepalives_idle=99999999999", "must be a whole number"),
        ("postgresql+psycopg2://historian@scada/historian?keepalives=1x", "keepalives must be a whole number"),
        ("postgresql+psycopg2://historian@scada/historian?target_session_attrs=x", "target_session_attrs must be"),
        ("postgresql+psycopg2://historian@scada/historian?sslmode=require&sslmode=disable", "given 2 times"),
        ("sqlite:////srv/plant/sca%00da.db", "NUL (%00)"),
        ("postgresql+psycopg2://historian@scada:-1/historian", "port -1 is not a TCP port"),
        ("postgresql+psycopg2://historian@scada:99999999999999999999/historian", "is not a TCP port (1 to 65535)"),
        ("postgresql+psycopg2://histo%00rian@scada/historian", "NUL (%00)"),
        ("postgresql+psycopg2://historian:pw%00@scada/historian", "NUL (%00)"),
        ("postgresql+psycopg2://historian@scada/histo%00rian", "NUL (%00)"),
    ]:
        response = put(api, org, {**SOURCE, "url": url})
        assert response.status_code == 422, url
        assert response.json()["field"] == "url" and words in response.json()["error"]


def test_option_values_libpq_takes_are_taken(api: TestClient, org: OrgKeys) -> None:
    """libpq reads a number as strtol does (spaces, a sign): refusing more would fail a source registered before."""
    query = "?sslmode=verify-full&connect_timeout=%2010&keepalives=1&keepalives_idle=-1&tcp_user_timeout=%2B5"
    response = put(api, org, {**SOURCE, "url": f"postgresql+psycopg2://historian@scada/historian{query}"})
    assert response.status_code == 200, response.text


def test_a_password_given_as_a_query_parameter_is_refused_and_not_stored(api: TestClient, org: OrgKeys) -> None:
    response = put(api, org, {**SOURCE, "url": "postgresql+psycopg2://historian@scada/historian?password=Pw0rd"})

    assert response.status_code == 422
    assert response.json()["field"] == "url" and "password in the URL's user part" in response.json()["error"]
    assert "Pw0rd" not in response.text
    assert api.get(f"/v1/orgs/{org.org_id}/datasource", headers=org.viewer).status_code == 404


def test_a_column_map_giving_two_source_columns_one_name_is_refused_and_not_stored(
    api: TestClient, org: OrgKeys
) -> None:
    response = put(api, org, {**SOURCE, "columnMap": {"TT_101": "temperature", "TT_102": "temperature"}})

    assert response.status_code == 422
    assert response.json()["field"] == "columnMap"
    assert "renames both 'TT_101' and 'TT_102' to 'temperature'" in response.json()["error"]
    assert api.get(f"/v1/orgs/{org.org_id}/datasource", headers=org.viewer).status_code == 404


def test_only_an_org_admin_sets_the_datasource(api: TestClient, org: OrgKeys) -> None:
    assert put(api, org, SOURCE, headers=org.trainer).status_code == 403


def test_a_training_without_a_dataset_reads_the_datasource(api: TestClient, org: OrgKeys) -> None:
    body = {
        "targetColumn": "failed",
        "featureColumns": ["temperature", "pressure"],
        "dataRange": {"startDate": "2024-01-01", "endDate": "2024-02-01"},
    }
    before = api.post(f"/v1/orgs/{org.org_id}/trainings", json=body, headers=org.trainer)
    assert before.status_code == 422 and before.json()["field"] == "datasetId"
    put(api, org, SOURCE)
    assert api.post(f"/v1/orgs/{org.org_id}/trainings", json=body, headers=org.trainer).status_code == 202
    put(api, org, {**SOURCE, "timestampColumn": None})
    no_stamp = api.post(f"/v1/orgs/{org.org_id}/trainings", json=body, headers=org.trainer)
    assert no_stamp.status_code == 422 and no_stamp.json()["field"] == "dataRange"


def test_the_secret_is_bound_to_its_org(settings: Settings) -> None:
    box = SecretBox(settings.secret_key.get_secret_value())
    sealed = box.encrypt("pw", context="datasource:acme")
    assert box.decrypt(sealed, context="datasource:acme") == "pw"
    with pytest.raises(SecretUnreadable, match="does not decrypt"):
        box.decrypt(sealed, context="datasource:other")
