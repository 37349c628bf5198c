"""Reading a training script's progress lines (`{"stage": "training", "iteration": 40, "of": 100}`) into the
run's stage and percent done, and writing the latest of them a few times a second, however many it prints."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import TracebackType

import orjson

log = logging.getLogger(__name__)

TRAINING_START, TRAINING_END = 20, 70
STAGE_PERCENT = {"exporting": TRAINING_END, "done": TRAINING_END}
# The run's log keeps a stage in 32 characters; and a script's stage may not pass for the run's status.
MAX_STAGE_CHARS = 32
RUN_STATUSES = frozenset({"queued", "running", "succeeded", "rejected", "failed", "cancelled"})
WRITE_EVERY_S = 0.5
# Log lines per attempt from the script's progress; its stage and percent are written on past them.
MAX_LOGGED = 200

# Writes the run's stage and percent, with a log line when there is a message.
Write = Callable[[str, int, str | None], None]


@dataclass(frozen=True)
class Report:
    stage: str
    percent: int
    message: str


def read_line(line: str) -> Report | None:
    """The progress a line reports; None for a line that is no progress line."""
    try:
        event = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(event, dict) or not isinstance(event.get("stage"), str):
        return None
    stage = event["stage"].strip()[:MAX_STAGE_CHARS]
    if not stage or stage.lower() in RUN_STATUSES:
        return None
    iteration, total = event.get("iteration"), event.get("of")
    if stage == "training" and isinstance(iteration, int) and isinstance(total, int) and total > 0:
        share = min(max(iteration / total, 0.0), 1.0)
        percent = TRAINING_START + round((TRAINING_END - TRAINING_START) * share)
        return Report(stage, percent, f"boosting round {iteration} of {total}")
    return Report(stage, STAGE_PERCENT.get(stage, TRAINING_START), stage)


class ScriptProgress:
    """The latest progress a script printed, its percent never going back, and how many lines reported it."""

    def __init__(self) -> None:
        self.latest: Report | None = None
        self.lines = 0

    def feed(self, line: str) -> None:
        report = read_line(line)
        if report is None:
            return
        self.lines += 1
        if self.latest is not None and report.percent < self.latest.percent:
            report = replace(report, percent=self.latest.percent)
        self.latest = report


class ProgressWriter:
    """Takes a script's stdout lines as the sandbox reads them, and writes the latest progress from a thread of its
    own when it moves, WRITE_EVERY_S apart at least: a flood of lines costs the database a few writes a second,
    and a slow database never holds up the sandbox, which must stop the script on a cancel or its timeout. The
    first MAX_LOGGED writes of an attempt are logged too; when the log misses lines, its last line says so."""

    def __init__(self, write: Write) -> None:
        self._write = write
        self._progress = ScriptProgress()
        self._lock = threading.Lock()
        self._written: tuple[str, int] | None = None
        self._logged = 0
        self._moved = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="script-progress", daemon=True)

    def feed(self, line: str) -> None:
        with self._lock:
            self._progress.feed(line)
        self._moved.set()

    def __enter__(self) -> ProgressWriter:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._done.set()
        self._moved.set()
        self._thread.join()
        self._write_safely(self._write_latest)
        self._write_safely(self._write_dropped)

    def _run(self) -> None:
        while self._moved.wait() and not self._done.is_set():
            self._write_safely(self._write_latest)
            self._done.wait(WRITE_EVERY_S)

    def _write_safely(self, write: Callable[[], None]) -> None:
        try:
            write()
        except Exception:
            # The database may be back for the next try; the script goes on meanwhile.
            log.warning("the script's progress was not written", exc_info=True)
            self._moved.set()

    def _write_latest(self) -> None:
        with self._lock:
            self._moved.clear()
            latest = self._progress.latest
        if latest is None or (latest.stage, latest.percent) == self._written:
            return
        logged = self._logged < MAX_LOGGED
        self._write(latest.stage, latest.percent, latest.message if logged else None)
        self._written = (latest.stage, latest.percent)
        self._logged += logged

    def _write_dropped(self) -> None:
        with self._lock:
            latest, lines = self._progress.latest, self._progress.lines
        if latest is None or lines == self._logged:
            return
        message = (
            f"the script printed {lines} progress lines; this log has {self._logged} of them "
            f"(at most one each {WRITE_EVERY_S:g} s, and {MAX_LOGGED} in all)"
        )
        self._write(latest.stage, latest.percent, message)
