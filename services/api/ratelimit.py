"""Limits at the door: each org's training submissions per minute, counted in Redis across every api replica."""

from __future__ import annotations

import logging
import time

import redis

from shared.errors import TooManyRequests

WINDOW_S = 60

log = logging.getLogger(__name__)


def take_submission(client: redis.Redis, org_id: str, per_minute: int) -> None:
    """Count one submission (a training, or a judgement of a stored version: both keep a worker busy) in the current
    minute; refuse with the seconds until the next one when over.

    With Redis out of reach the submission goes uncounted rather than refused: its message waits in the outbox until
    the broker (the same Redis) is back, which is what the outbox is for, and the workers' per-org concurrency still
    bounds what one org can take."""
    now = time.time()
    window = int(now // WINDOW_S)
    key = f"kiln:submissions:{org_id}:{window}"
    try:
        with client.pipeline() as pipeline:
            pipeline.incr(key)
            pipeline.expire(key, WINDOW_S * 2)
            count, _ = pipeline.execute()
    except redis.RedisError as error:
        log.warning("organization %s's submission is not counted: Redis does not answer (%r)", org_id, error)
        return
    if int(count) > per_minute:
        retry_after = max(1, int((window + 1) * WINDOW_S - now) + 1)
        raise TooManyRequests(
            f"organization {org_id} may submit {per_minute} trainings and judgements a minute; try again in "
            f"{retry_after} s",
            detail={"retryAfter": retry_after},
            headers={"Retry-After": str(retry_after)},
        )
