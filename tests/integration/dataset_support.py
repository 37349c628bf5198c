"""A small dataset's upload body, for tests that upload one."""

from __future__ import annotations

CSV = b"timestamp,temperature,pressure,failed\n2024-01-01T00:00:00Z,70.5,1.2,0\n2024-01-02T00:00:00Z,71.0,1.3,1\n"
