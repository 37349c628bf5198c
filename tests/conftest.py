"""Fixtures for every tier. Servers start only when a test asks for them."""

from __future__ import annotations

import base64
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from shared.db.migrate import upgrade
from shared.settings import Settings
from tests.support.servers import S3Server, fresh_postgres_database, redis_for_tests, seaweedfs_s3

# With OpenMP's default spin-waiting, LightGBM fits here ran 20-60x slower whenever another process kept a
# core busy (the unit suite: 24 s alone, 300 s beside one other LightGBM job); threads that sleep avoid it.
# libgomp reads the policy once, when first loaded: this runs before any test module imports LightGBM.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ADMIN_TOKEN = "test-admin-token-" + secrets.token_hex(8)
SECRET_KEY = base64.b64encode(secrets.token_bytes(32)).decode()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database at the newest schema, for this test session only."""
    with fresh_postgres_database() as url:
        upgrade(url)
        yield url


@pytest.fixture(scope="session")
def redis_url() -> str:
    return redis_for_tests()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with seaweedfs_s3(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def org_id() -> str:
    """A new org id per test: tests share one database and never see each other's rows."""
    return "org-" + secrets.token_hex(4)


@pytest.fixture
def settings(postgres_url: str, redis_url: str, s3_server: S3Server, tmp_path: Path) -> Settings:
    """Settings pointing at the real PostgreSQL, Redis and S3, with a private deploy channel."""
    return Settings(
        data_dir=tmp_path / "kiln",
        local_stores_dir=tmp_path,  # an org's SQLite stores: tmp_path / org_id / *.db
        database_url=postgres_url,
        redis_url=redis_url,
        object_store="s3://kiln-test",
        s3_endpoint=s3_server.endpoint,
        s3_access_key=s3_server.access_key,
        s3_secret_key=SecretStr(s3_server.secret_key),
        admin_token=SecretStr(ADMIN_TOKEN),
        secret_key=SecretStr(SECRET_KEY),
        deploy_channel="kiln-test:deployments:" + secrets.token_hex(4),
    )
