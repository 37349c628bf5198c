"""The timeouts of the frozen-database tests: the one a service is given, and the outer one a test waits."""

from __future__ import annotations

TIMEOUT_S = 1.0
# Generous: a bounded wait ends well within it, one without end never does.
OUTER_TIMEOUT_S = 60.0
