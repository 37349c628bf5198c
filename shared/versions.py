"""Model version ids: `v2024-01-15T10-30-00-000Z_a1b2c3d4`, sortable by creation time (DESIGN §7)."""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime

VERSION_PATTERN = re.compile(r"^v\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}-\d{3}Z_[0-9a-f]{8}$")


def new_version(now: datetime | None = None) -> str:
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    stamp = moment.strftime("%Y-%m-%dT%H-%M-%S-") + f"{moment.microsecond // 1000:03d}Z"
    return f"v{stamp}_{secrets.token_hex(4)}"


def is_version(text: str) -> bool:
    return VERSION_PATTERN.fullmatch(text) is not None


def version_time(version: str) -> datetime:
    """The UTC moment encoded in a version id."""
    if not is_version(version):
        raise ValueError(f"not a Kiln version id: {version!r}")
    stamp = version[1:24]
    return datetime.strptime(stamp, "%Y-%m-%dT%H-%M-%S-%f").replace(tzinfo=UTC)
