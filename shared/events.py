"""Deploy events on Redis pub/sub. Pub/sub is at-most-once: events only hurry replicas along, the database decides."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import orjson
import redis


@dataclass(frozen=True)
class DeployEvent:
    """The org's current deployment changed; subscribers re-read it from the database. No version: undeployed."""

    org_id: str
    version: str | None
    deployment_id: int

    def encode(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def decode(cls, data: bytes | str) -> DeployEvent:
        fields = orjson.loads(data)
        version = fields["version"]
        return cls(
            org_id=str(fields["org_id"]),
            version=None if version is None else str(version),
            deployment_id=int(fields["deployment_id"]),
        )


def publish_deploy_event(client: redis.Redis, channel: str, event: DeployEvent) -> int:
    """Publish and return how many subscribers received it."""
    return int(client.publish(channel, event.encode()))
