"""What a client of the predictor sees while something it depends on is out: the database or the object store."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from services.predictor.app import create_app
from shared.db.session import CONNECT_TIMEOUT_S, POOL_TIMEOUT_S
from shared.keys import new_key
from shared.settings import Settings
from tests.integration.conftest import ADMIN
from tests.support.models import ai4i_row
from tests.support.servers import silent_server
from tests.support.threaded_server import serving_in_thread


def test_a_database_that_never_answers_costs_a_bounded_wait_then_a_503_with_retry_after(
    settings: Settings, org_id: str
) -> None:
    unknown_key = {"Authorization": f"Bearer {new_key()}"}

    def ask(address: str, index: int) -> httpx.Response:
        """An unknown key (its lookup needs the database) or the admin for an org not loaded (so is its model)."""
        url = f"http://{address}/v1/orgs/{org_id}/predict"
        return httpx.post(url, json={"rows": [ai4i_row()]}, headers=unknown_key if index % 2 else ADMIN, timeout=120)

    with silent_server() as database:
        hung = settings.model_copy(update={"database_url": f"postgresql+psycopg2://kiln@{database}/kiln"})
        # More requests at once than the pool has connections: some wait for one, and that wait is bounded too.
        with serving_in_thread(create_app(hung)) as predictor, ThreadPoolExecutor(max_workers=20) as pool:
            started = time.monotonic()
            answers = list(pool.map(lambda index: ask(predictor, index), range(20)))
            waited = time.monotonic() - started

    assert [answer.status_code for answer in answers] == [503] * 20
    assert all(answer.headers["retry-after"] == "1" for answer in answers)
    assert {answer.json()["error"] for answer in answers} == {"the database is unavailable, try again"}
    assert waited < CONNECT_TIMEOUT_S + POOL_TIMEOUT_S + 5  # hung, it took 30 s: until the server hung up
