"""Reading a training script's progress lines (`{"stage": "training", "iteration": 40, "of": 100}`) into the
run's stage and percent done."""

from __future__ import annotations

from collections.abc import Callable

import orjson

TRAINING_START, TRAINING_END = 20, 70
STAGE_PERCENT = {"exporting": TRAINING_END, "done": TRAINING_END}

Report = Callable[[str, int, str], None]


class ScriptProgress:
    """Turns each progress line into one report, skipping lines that would not move the percentage."""

    def __init__(self, report: Report) -> None:
        self.report = report
        self.last: tuple[str, int] | None = None

    def feed(self, line: str) -> None:
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError:
            return
        if not isinstance(event, dict) or not isinstance(event.get("stage"), str):
            return
        stage, percent, message = self._read(event)
        if (stage, percent) != self.last:
            self.last = (stage, percent)
            self.report(stage, percent, message)

    def _read(self, event: dict[str, object]) -> tuple[str, int, str]:
        stage = str(event["stage"])
        iteration, total = event.get("iteration"), event.get("of")
        if stage == "training" and isinstance(iteration, int) and isinstance(total, int) and total > 0:
            share = min(max(iteration / total, 0.0), 1.0)
            percent = TRAINING_START + round((TRAINING_END - TRAINING_START) * share)
            return stage, percent, f"boosting round {iteration} of {total}"
        return stage, STAGE_PERCENT.get(stage, TRAINING_START), stage
