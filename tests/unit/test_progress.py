"""A script's progress lines become the run's stage and percent: only what a script may claim, written a few times
a second however many lines it prints, with a log that says when it holds fewer lines than the script printed."""

from __future__ import annotations

import time

import orjson
import pytest

from services.trainer import progress
from services.trainer.progress import ProgressWriter, ScriptProgress, read_line


def line(**event: object) -> str:
    return orjson.dumps(event).decode()


@pytest.mark.parametrize("stage", ["succeeded", "Failed", " cancelled ", "queued", "running", "rejected", ""])
def test_a_stage_naming_a_run_status_is_no_progress(stage: str) -> None:
    assert read_line(line(stage=stage)) is None


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '{"stage": 3}', '{"iteration": 1}'])
def test_a_line_without_a_stage_is_no_progress(text: str) -> None:
    assert read_line(text) is None


def test_a_long_stage_is_cut_to_what_the_run_keeps() -> None:
    report = read_line(line(stage="x" * 10_000))
    assert report is not None and report.stage == "x" * progress.MAX_STAGE_CHARS


def test_boosting_rounds_move_the_percent_within_training() -> None:
    assert read_line(line(stage="training", iteration=40, of=100)) == progress.Report(
        "training", 40, "boosting round 40 of 100"
    )
    report = read_line(line(stage="training", iteration=400, of=100))
    assert report is not None and report.percent == progress.TRAINING_END


def test_the_percent_never_goes_back() -> None:
    seen = ScriptProgress()
    for event in ({"stage": "training", "iteration": 90, "of": 100}, {"stage": "training", "iteration": 10, "of": 100}):
        seen.feed(line(**event))
    seen.feed(line(stage="evaluating"))
    assert seen.latest == progress.Report("evaluating", 65, "evaluating")


Writes = list[tuple[str, int, str | None]]


def collect(writes: Writes) -> progress.Write:
    return lambda stage, percent, message: writes.append((stage, percent, message))


def test_a_flood_of_lines_is_a_few_writes_the_latest_last_and_the_log_says_so() -> None:
    writes: Writes = []
    started = time.monotonic()
    with ProgressWriter(collect(writes)) as writer:
        for i in range(100_000):
            writer.feed(line(stage=f"s{i}"))
    fed_for = time.monotonic() - started

    # One write at the start and one each WRITE_EVERY_S while the lines came, then the latest and the note: on a
    # busy machine the lines take longer to feed, and rightly get more writes.
    assert len(writes) <= 2 + fed_for / progress.WRITE_EVERY_S + 2
    assert writes[-2][:2] == ("s99999", progress.TRAINING_START)
    assert writes[-1][2] is not None and writes[-1][2].startswith("the script printed 100000 progress lines;")


def test_a_slow_script_has_every_line_logged_and_no_note(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "WRITE_EVERY_S", 0.01)
    writes: Writes = []
    with ProgressWriter(collect(writes)) as writer:
        for i in (1, 2, 3):
            writer.feed(line(stage="training", iteration=i, of=3))
            time.sleep(0.2)

    assert [message for _, _, message in writes] == [f"boosting round {i} of 3" for i in (1, 2, 3)]


def test_the_log_keeps_at_most_max_logged_writes_of_an_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "WRITE_EVERY_S", 0.01)
    monkeypatch.setattr(progress, "MAX_LOGGED", 2)
    writes: Writes = []
    with ProgressWriter(collect(writes)) as writer:
        for i in range(5):
            writer.feed(line(stage=f"s{i}"))
            time.sleep(0.2)

    assert [message for _, _, message in writes] == [
        "s0",
        "s1",
        None,
        None,
        None,
        "the script printed 5 progress lines; this log has 2 of them (at most one each 0.01 s, and 2 in all)",
    ]
    assert writes[-2][0] == "s4"


def test_a_failed_write_is_tried_again_and_the_writes_go_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "WRITE_EVERY_S", 0.01)
    writes: Writes = []

    def write(stage: str, percent: int, message: str | None) -> None:
        writes.append((stage, percent, message))
        if len(writes) == 1:
            raise ConnectionError("the database is restarting")

    with ProgressWriter(write) as writer:
        writer.feed(line(stage="loading"))
        time.sleep(0.2)
        writer.feed(line(stage="fitting"))

    assert [stage for stage, _, _ in writes] == ["loading", "loading", "fitting"]
