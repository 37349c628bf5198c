"""Requests the api cannot take are answered in Kiln's error format, naming the field, and never with a 500."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.integration.conftest import OrgKeys

BEYOND_INT64 = str(2**63)


@pytest.mark.parametrize("listing", ["predictions", "audit"])
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
