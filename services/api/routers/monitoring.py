"""`GET /metrics` on the api: the platform's state for Prometheus, counted in the database at each scrape. Runs,
versions, deployments, sync jobs and conflicts by org and status, and how far the outbox is behind: what to alert on
(runs failing, conflicts waiting for review, a relay that stopped). The predictor's own /metrics counts requests.

For KILN_METRICS_TOKEN, which reads /metrics and nothing else, or for the platform admin's token."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from services.api.deps import ResourcesDep, SessionDep, get_principal
from shared.db.models import Deployment, ModelVersion, OutboxMessage, SyncConflict, SyncJob, TrainingRun
from shared.db.types import utcnow
from shared.errors import Forbidden
from shared.keys import bearer_token, is_metrics_token

router = APIRouter(tags=["monitoring"])

# Gauges of rows by org and status: (name, help, table).
_BY_STATUS: tuple[tuple[str, str, Any], ...] = (
    ("kiln_training_runs", "Training runs by org and status.", TrainingRun),
    ("kiln_model_versions", "Model versions by org and status (validated, rejected, erased).", ModelVersion),
    ("kiln_deployments", "Deployments by org and status (deployed, failed, undeployed).", Deployment),
    ("kiln_sync_jobs", "Sync jobs by org and status.", SyncJob),
    ("kiln_sync_conflicts", "Sync conflicts by org and status (open ones wait for review).", SyncConflict),
)


@router.get("/metrics")
def metrics(
    request: Request,
    resources: ResourcesDep,
    session: SessionDep,
    authorization: Annotated[str | None, Header()] = None,
) -> Response:
    scraper = is_metrics_token(bearer_token(authorization), resources.settings.metrics_token.get_secret_value())
    if not scraper and not get_principal(resources, session, authorization).is_platform_admin:
        raise Forbidden("metrics are for KILN_METRICS_TOKEN or the platform admin's token", field="Authorization")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_PlatformState(session))
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encode(registry), headers={"Content-Type": content_type})


class _PlatformState(Collector):
    def __init__(self, session: Session) -> None:
        self._session = session

    def collect(self) -> Iterable[Metric]:
        for name, help_text, table in _BY_STATUS:
            family = GaugeMetricFamily(name, help_text, labels=["org", "status"])
            counts = self._session.execute(
                select(table.org_id, table.status, func.count()).group_by(table.org_id, table.status)
            )
            for org_id, status, count in sorted(counts):
                family.add_metric([org_id, status], count)
            yield family
        yield from self._outbox()

    def _outbox(self) -> Iterable[Metric]:
        unsent = self._session.scalar(select(func.count()).where(OutboxMessage.published_at.is_(None)))
        yield GaugeMetricFamily("kiln_outbox_unsent", "Outbox messages not sent yet.", value=unsent)
        failing = self._session.scalar(
            select(func.count()).where(OutboxMessage.published_at.is_(None), OutboxMessage.failed_sends > 0)
        )
        yield GaugeMetricFamily(
            "kiln_outbox_failing",
            "Outbox messages not sent yet whose last send failed: each waits its backoff, its last_error says why.",
            value=failing,
        )
        # Over messages never tried and failed: one that can never be sent would otherwise grow it for good.
        oldest = self._session.scalar(
            select(func.min(OutboxMessage.created_at)).where(
                OutboxMessage.published_at.is_(None), OutboxMessage.failed_sends == 0
            )
        )
        behind = (utcnow() - oldest).total_seconds() if oldest is not None else 0.0
        yield GaugeMetricFamily(
            "kiln_outbox_oldest_unsent_seconds",
            "Age of the oldest message not sent yet and not failing: a stopped relay grows it.",
            value=behind,
        )
