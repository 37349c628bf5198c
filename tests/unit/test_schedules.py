"""Schedule fire times in an org's timezone, and the daylight-saving policy (cron's): a skipped time fires once
when the clocks jump; in a repeated hour, a pattern with a wildcard or step minute or hour fires by real time, a
fixed time once, at its first occurrence."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import takewhile

import pytest

from shared.errors import InvalidInput
from shared.schedules import FireSpan, ScheduleError, check_schedule, fire_times, fires_between, next_fire_times

NEW_YORK = "America/New_York"


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def test_the_seeds_weekly_schedule_fires_sundays_at_two_local_time() -> None:
    fires = next_fire_times("0 2 * * 0", NEW_YORK, after=utc(2026, 1, 1), count=3)
    assert fires == [utc(2026, 1, 4, 7), utc(2026, 1, 11, 7), utc(2026, 1, 18, 7)]  # 02:00 EST = 07:00 UTC


def test_a_time_skipped_in_march_fires_once_when_the_clocks_jump() -> None:
    # 8 March 2026, a Sunday: 02:00 EST jumps to 03:00 EDT; 02:00 and 02:30 never happen.
    assert next_fire_times("0 2 * * 0", NEW_YORK, after=utc(2026, 3, 7))[0] == utc(2026, 3, 8, 7)  # 03:00 EDT
    assert next_fire_times("30 2 * * *", NEW_YORK, after=utc(2026, 3, 7, 12), count=2) == [
        utc(2026, 3, 8, 7),  # at the jump, 03:00 EDT
        utc(2026, 3, 9, 6, 30),  # back to 02:30, now EDT
    ]


def test_several_skipped_times_of_one_night_fire_once() -> None:
    fires = next_fire_times("*/15 2 * * *", NEW_YORK, after=utc(2026, 3, 8, 5), count=2)
    assert fires == [utc(2026, 3, 8, 7), utc(2026, 3, 9, 6)]


def test_a_time_repeated_in_november_fires_once_at_its_first_occurrence() -> None:
    # 1 November 2026: 02:00 EDT falls back to 01:00 EST, so 01:30 happens twice.
    fires = next_fire_times("30 1 * * *", NEW_YORK, after=utc(2026, 10, 31, 12), count=2)
    assert fires == [utc(2026, 11, 1, 5, 30), utc(2026, 11, 2, 6, 30)]  # 01:30 EDT, then 01:30 EST next day


def test_an_interval_pattern_keeps_firing_every_quarter_hour_when_the_clocks_jump_forward() -> None:
    fires = next_fire_times("*/15 * * * *", NEW_YORK, after=utc(2026, 3, 8, 6, 40), count=3)
    assert fires == [utc(2026, 3, 8, 6, 45), utc(2026, 3, 8, 7), utc(2026, 3, 8, 7, 15)]  # 01:45 EST, 03:00 EDT


def test_an_interval_pattern_keeps_firing_every_quarter_hour_through_the_repeated_hour() -> None:
    # 25 October 2026 in Paris: 03:00 CEST falls back to 02:00 CET (01:00 UTC); it fell silent from 00:45 to 02:00 UTC.
    fires = next_fire_times("*/15 * * * *", "Europe/Paris", after=utc(2026, 10, 25, 0, 40), count=7)
    assert fires == [utc(2026, 10, 25, 0, 45) + n * timedelta(minutes=15) for n in range(7)]  # to 02:15 UTC


@pytest.mark.parametrize(
    ("pattern", "fires"),
    [
        ("0 * * * *", [utc(2026, 11, 1, 5), utc(2026, 11, 1, 6), utc(2026, 11, 1, 7)]),  # 01:00 EDT, 01:00 EST, 02:00
        ("*/30 1 * * *", [utc(2026, 11, 1, 5), utc(2026, 11, 1, 5, 30), utc(2026, 11, 1, 6), utc(2026, 11, 1, 6, 30)]),
    ],
)
def test_a_wildcard_or_step_minute_or_hour_fires_at_both_occurrences_of_a_repeated_time(
    pattern: str, fires: list[datetime]
) -> None:
    assert next_fire_times(pattern, NEW_YORK, after=utc(2026, 11, 1, 4, 30), count=len(fires)) == fires


def test_asking_during_the_repeated_hour_does_not_fire_its_second_occurrence() -> None:
    fires = next_fire_times("30 1 * * *", NEW_YORK, after=utc(2026, 11, 1, 6, 10))  # 01:10 EST, second pass
    assert fires == [utc(2026, 11, 2, 6, 30)]


def test_the_weekly_schedule_on_the_fall_back_sunday_fires_once() -> None:
    assert next_fire_times("0 2 * * 0", NEW_YORK, after=utc(2026, 10, 31), count=2) == [
        utc(2026, 11, 1, 7),  # 02:00 EST, once
        utc(2026, 11, 8, 7),
    ]


@pytest.mark.parametrize(
    ("pattern", "timezone", "words"),
    [("0 2 * *", "UTC", "5-field"), ("61 2 * * *", "UTC", "minute 61"), ("0 2 * * 0", "Mars/Olympus", "IANA")],
)
def test_bad_patterns_and_zones_are_named(pattern: str, timezone: str, words: str) -> None:
    with pytest.raises(ScheduleError, match=words):
        next_fire_times(pattern, timezone, after=utc(2026, 1, 1))


@pytest.mark.parametrize(
    ("pattern", "words"),
    [
        ("61 * * * *", "pattern '61 * * * *': minute 61 is outside 0-59"),
        ("0 2-25/2 * * *", "pattern '0 2-25/2 * * *': hour 25 is outside 0-23"),
        ("0 0 0 * *", "pattern '0 0 0 * *': day-of-month 0 is outside 1-31"),
        ("0 0 * 1,13 *", "pattern '0 0 * 1,13 *': month 13 is outside 1-12"),
        ("0 0 * * 8", "pattern '0 0 * * 8': day-of-week 8 is outside 0-7"),
        ("29-L * * * *", "pattern '29-L * * * *': minute '29-L' is not a value, range or step within 0-59"),
        ("*/0 * * * *", "pattern '*/0 * * * *': minute '*/0' is not a value, range or step within 0-59"),
    ],
)
def test_a_5_field_pattern_with_a_value_cron_refuses_is_refused_naming_its_field(pattern: str, words: str) -> None:
    """ "Not a 5-field cron pattern" sent users counting fields that were all there."""
    with pytest.raises(InvalidInput) as refused:
        check_schedule(pattern, "UTC")
    assert (str(refused.value), refused.value.field) == (words, "pattern")


@pytest.mark.parametrize("pattern", ["0 0 31 2 *", "0 0 30 2 *", "15 3 31 4,6,9,11 *"])
def test_a_pattern_naming_a_day_its_months_never_have_never_fires(pattern: str) -> None:
    with pytest.raises(ScheduleError, match="never fires"):
        next_fire_times(pattern, NEW_YORK, after=utc(2026, 1, 1))


@pytest.mark.parametrize("pattern", ["R R * * *", "0 2 * * R", "0 r * * *", "R(1-5) 2 * * *"])
def test_a_random_pattern_is_refused_naming_the_pattern(pattern: str) -> None:
    """croniter takes R as a time drawn anew at each reading: the schedule would fire at no time it ever showed."""
    with pytest.raises(InvalidInput, match="random") as refused:
        check_schedule(pattern, "UTC")
    assert refused.value.field == "pattern"


def test_month_and_day_names_holding_an_r_are_no_random_pattern() -> None:
    check_schedule("0 2 * MAR,APR FRI", "UTC")


@pytest.mark.parametrize(
    ("pattern", "span", "field", "wrapped"),
    [
        ("1-0 * * * *", "1-0", "minute", "1-59,0"),
        ("0 22-2 * * *", "22-2", "hour", "22-23,0-2"),
        ("0 0 31-1 * *", "31-1", "day-of-month", "31,1"),
        ("0 0 * dec-jan *", "dec-jan", "month", "12,1"),
        ("0 0 * * fri-mon", "fri-mon", "day-of-week", "5-6,0-1"),
        ("10-5/2 * * * *", "10-5", "minute", "10-59/2,0-5/2"),
    ],
)
def test_a_range_running_backwards_is_refused_naming_it_and_how_to_write_it(
    pattern: str, span: str, field: str, wrapped: str
) -> None:
    """cron refuses such a range; croniter wraps it round, so `1-0 * * * *` would fire every minute."""
    with pytest.raises(InvalidInput) as refused:
        check_schedule(pattern, "UTC")
    assert refused.value.field == "pattern"
    assert f"the range {span} in its {field} field runs backwards" in refused.value.message
    assert f"write {wrapped}" in refused.value.message
    with pytest.raises(ScheduleError, match="runs backwards"):
        next_fire_times(pattern, "UTC", after=utc(2026, 1, 1))


@pytest.mark.parametrize(
    "pattern", ["0 0 * * 6-7", "0 0 * * 0-7", "*/5 1-3/2 * * *", "0 2 * mar-apr mon-fri", "0 0 15-L * *"]
)
def test_ranges_going_up_are_kept(pattern: str) -> None:
    check_schedule(pattern, "UTC")


@pytest.mark.parametrize(
    ("pattern", "as_written"),
    [
        ("5-5 * * * *", "5 * * * *"),
        ("5-5/2 * * * *", "5 * * * *"),
        ("0 3-3 * * *", "0 3 * * *"),
        ("0 2 * * 1-1", "0 2 * * 1"),
        ("0 2 * * mon-mon", "0 2 * * 1"),
        ("0 2 * * sun-sun", "0 2 * * 0"),
        ("0 0 1 feb-feb *", "0 0 1 2 *"),
        ("0 0 1,10-10 * *", "0 0 1,10 * *"),
    ],
)
def test_a_range_of_one_value_fires_as_that_value_alone(pattern: str, as_written: str) -> None:
    """croniter wraps such a range round the whole field: `5-5 * * * *` fired every minute, `0 2 * * 1-1` daily."""
    check_schedule(pattern, "UTC")
    after = utc(2026, 3, 1)
    assert next_fire_times(pattern, "UTC", after=after, count=6) == next_fire_times(
        as_written, "UTC", after=after, count=6
    )


def test_a_range_to_the_last_day_from_past_the_28th_is_refused_naming_how_to_write_it() -> None:
    """In February, croniter reads `29-L` as 29 round to 28, every day of the month."""
    with pytest.raises(InvalidInput) as refused:
        check_schedule("0 0 29-L * *", "UTC")
    assert refused.value.field == "pattern"
    assert "runs backwards in a month shorter than 29 days" in refused.value.message
    assert "write 29-31" in refused.value.message
    fires = next_fire_times("0 0 29-31 * *", "UTC", after=utc(2027, 1, 30), count=3)
    assert fires == [utc(2027, 1, 31), utc(2027, 3, 29), utc(2027, 3, 30)]


CLOCK_CHANGES = [
    (NEW_YORK, utc(2026, 3, 8, 7)),
    (NEW_YORK, utc(2026, 11, 1, 6)),
    ("Europe/Paris", utc(2026, 10, 25, 1)),
    ("America/Nuuk", utc(2026, 3, 29, 1)),  # Saturday 23:00 to 24:00 skipped: its times fire at Sunday's midnight
    ("America/Havana", utc(2026, 3, 8, 5)),  # Sunday's midnight skipped
]
# Spans about a change of the clocks, as (its start, its end) from the change.
SPANS_ABOUT_A_CHANGE = {
    "whole days about it": (-timedelta(days=2, seconds=-17), timedelta(days=3)),
    "within its night": (-timedelta(minutes=50), timedelta(minutes=70)),
    "ending in it": (-timedelta(days=40), timedelta(seconds=30)),
}


@pytest.mark.parametrize(("timezone", "change"), CLOCK_CHANGES)
@pytest.mark.parametrize(("start", "end"), SPANS_ABOUT_A_CHANGE.values(), ids=SPANS_ABOUT_A_CHANGE.keys())
@pytest.mark.parametrize(
    "pattern",
    [
        "* * * * *",
        "*/15 * * * *",
        "0 * * * *",
        "*/30 1 * * *",
        "*/15 2 * * *",
        "30 1 * * *",
        "30 2 * * *",
        "0 2 * * 0",
        "15 23 * * *",
        "0 0 * * *",
        "15 23 * * 6",
    ],
)
def test_fires_between_counts_and_ends_as_walking_each_fire_does_across_a_change_of_the_clocks(
    pattern: str, timezone: str, change: datetime, start: timedelta, end: timedelta
) -> None:
    """Beat counts a span's fires by day rather than walking each one: skipped times firing once at the jump, a
    repeated hour's times firing twice or once, are counted as `fire_times` gives them."""
    after, until = change + start, change + end
    walked = list(takewhile(lambda instant: instant <= until, fire_times(pattern, timezone, after=after)))
    span = fires_between(pattern, timezone, after=after, until=until)
    assert (span.count, span.last) == (len(walked), tuple(walked[-2:]))


def test_a_month_of_an_every_minute_schedule_counts_every_minute_and_the_repeated_hour_twice() -> None:
    """Paris falls back on 25 October 2026: 30 days of real time are 43,200 minutes, all fired."""
    span = fires_between("* * * * *", "Europe/Paris", after=utc(2026, 10, 1), until=utc(2026, 10, 31))
    assert span.count == 30 * 24 * 60
    assert span.last == (utc(2026, 10, 30, 23, 59), utc(2026, 10, 31))


def test_fires_between_names_only_the_days_the_pattern_fires_on() -> None:
    """The first and fifteenth, or a Monday (cron's either-day rule), at 03:15: January 2026 has 4 Mondays beside."""
    span = fires_between("15 3 1,15 * mon", "UTC", after=utc(2026, 1, 1), until=utc(2026, 2, 1))
    assert span.count == 6
    assert span.last == (utc(2026, 1, 19, 3, 15), utc(2026, 1, 26, 3, 15))


def test_fires_between_counts_none_in_a_span_that_ends_before_it_starts() -> None:
    assert fires_between("*/15 * * * *", "UTC", after=utc(2026, 1, 1, 10), until=utc(2026, 1, 1, 9)) == FireSpan(0, ())
