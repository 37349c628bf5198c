"""The one error handler of both HTTP services: whatever a refusal quotes, it reaches the client as JSON."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient

from shared.errors import InvalidInput
from shared.http_errors import install_error_handlers


def test_a_refusal_quoting_a_lone_surrogate_is_answered_with_its_escape_not_a_500() -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/columns")
    def refuse() -> None:
        raise InvalidInput(
            "not lowercase column names: T\ud800", field="sensitiveColumns", detail={"names": ["\udfff"]}
        )

    response = TestClient(app, raise_server_exceptions=False).get("/columns")

    assert response.status_code == 422, response.text
    assert response.json() == {
        "error": "not lowercase column names: T\\ud800",
        "field": "sensitiveColumns",
        "status": 422,
        "names": ["\\udfff"],
    }
