"""The predictor serves infer through plain routes matched first, yet documents every route in its OpenAPI."""

from __future__ import annotations

from pathlib import Path

from services.predictor.app import create_app
from shared.settings import Settings


def test_the_openapi_document_lists_infer_predict_and_metadata(tmp_path: Path) -> None:
    paths = create_app(Settings(data_dir=tmp_path)).openapi()["paths"]

    assert "post" in paths["/v2/models/{org}/infer"]
    assert "post" in paths["/v2/models/{org}/versions/{version}/infer"]
    assert "post" in paths["/v1/orgs/{org}/predict"]
    assert "get" in paths["/v2/models/{org}"]


def test_infer_and_predict_are_matched_before_any_other_route(tmp_path: Path) -> None:
    routes = [getattr(route, "path", "") for route in create_app(Settings(data_dir=tmp_path)).router.routes]

    assert routes[:3] == [
        "/v2/models/{org}/infer",
        "/v2/models/{org}/versions/{version}/infer",
        "/v1/orgs/{org}/predict",
    ]
