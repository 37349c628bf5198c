"""The one error handler of both HTTP services: whatever a refusal quotes, it reaches the client as JSON."""

from __future__ import annotations

from typing import Annotated

import pytest
from fastapi import FastAPI, File, UploadFile
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


@pytest.mark.parametrize("content_type", ["multipart/form-data; boundary=zzz", "application/x-www-form-urlencoded"])
def test_a_file_field_sent_as_text_is_refused_saying_to_send_a_file_part(content_type: str) -> None:
    """`curl -F 'file=ts,x'` (no @) sends the file's field as text: FastAPI said `Expected UploadFile, received:
    <class 'str'>`."""
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/datasets")
    def upload(file: Annotated[UploadFile, File()]) -> None:
        raise AssertionError("not reached")

    multipart = b'--zzz\r\nContent-Disposition: form-data; name="file"\r\n\r\nts,x\r\n--zzz--\r\n'
    content = multipart if content_type.startswith("multipart") else b"file=ts%2Cx"
    response = TestClient(app).post("/datasets", content=content, headers={"content-type": content_type})

    assert response.status_code == 422, response.text
    assert response.json()["field"] == "file"
    assert response.json()["error"] == "file must be a file part of a multipart form (curl -F file=@path)"
