"""Work retried after transient faults (a training run, a sync job) gives up after a set number of attempts: it ends
`failed`, with its last error and how many attempts it had, the same words wherever it runs."""

from __future__ import annotations


def gave_up(reason: str, attempts: int) -> str:
    """The reason recorded for work that ran out of attempts, `reason` being what stopped the last one."""
    return f"{reason}; gave up after {attempts} attempts"
