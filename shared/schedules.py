"""When a weekly (or any 5-field cron) schedule fires, in an org's own timezone, across daylight-saving changes.

The policy is cron's own (ISC cron / cronie): a time the spring-forward change skips fires once, at the moment
the clocks jump (02:30 on that night fires at 03:00); several skipped times of one night fire once between them.
In the hour the fall-back change repeats, a pattern whose minute or hour field holds a wildcard or a step
(`*/15 * * * *`, `0 * * * *`, `*/10 2 * * *`) keeps firing by real time, at both occurrences of its times; a
fixed-time pattern (`30 1 * * *`, `0 2 * * 0`) fires once, at the first occurrence.
"""

from __future__ import annotations

import heapq
import re
from bisect import bisect_right
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from functools import cache
from itertools import islice, takewhile
from zoneinfo import ZoneInfo, available_timezones

from croniter import CroniterBadDateError, croniter

from shared.errors import InvalidInput

MINUTE = timedelta(minutes=1)
# croniter's "R" (or "R(1-5)"), a random value in the field's range, drawn anew at every reading of the pattern.
_RANDOM = re.compile(r"R(\(|$)", re.IGNORECASE)
DST_POLICY = (
    "a time skipped by a daylight-saving change fires once, when the clocks jump; in a repeated hour, a pattern whose "
    "minute or hour field holds a wildcard or a step fires at both occurrences, and a fixed time fires once, at its "
    "first occurrence"
)


class ScheduleError(ValueError):
    """A pattern or timezone that cannot be scheduled; the message says which."""


_MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
_DAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
# Each field's name, its lowest and highest value, and the names it takes (croniter's and cron's).
_FIELDS: tuple[tuple[str, int, int, dict[str, int]], ...] = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day-of-month", 1, 31, {}),
    ("month", 1, 12, {name: n for n, name in enumerate(_MONTHS, 1)}),
    ("day-of-week", 0, 7, {name: n for n, name in enumerate(_DAYS)}),
)


def check_pattern(pattern: str) -> str:
    """The pattern as croniter is to read it, or ScheduleError saying why it cannot be scheduled."""
    if len(pattern.split()) != len(_FIELDS):
        raise ScheduleError(f"pattern {pattern!r} is not a 5-field cron pattern such as '0 2 * * 0'")
    if not croniter.is_valid(pattern):
        raise ScheduleError(f"pattern {pattern!r}: {_what_is_wrong(pattern)}")
    read = " ".join(
        ",".join(_cron_atom(pattern, atom, spec) for atom in field.split(","))
        for field, spec in zip(pattern.split(), _FIELDS, strict=True)
    )
    if not _ever_fires(read):
        raise ScheduleError(f"pattern {pattern!r} never fires: no date has that day in that month")
    return read


def _what_is_wrong(pattern: str) -> str:
    """Why croniter refuses a pattern of 5 fields: of the first field it refuses alone (the others `*`), a value
    outside the field's range, or else the field as written. "Not a 5-field pattern" sent users counting fields
    that were all there."""
    fields = pattern.split()
    for index, (text, field) in enumerate(zip(fields, _FIELDS, strict=True)):
        alone = " ".join(text if position == index else "*" for position in range(len(fields)))
        if not croniter.is_valid(alone):
            return _field_problem(text, field)
    return "it is not a cron pattern such as '0 2 * * 0'"


def _field_problem(text: str, field: tuple[str, int, int, dict[str, int]]) -> str:
    name, lowest, highest, _names = field
    for atom in text.split(","):
        for end in atom.partition("/")[0].split("-"):  # a step's size is no value of the field
            if end.isdigit() and not lowest <= int(end) <= highest:
                return f"{name} {int(end)} is outside {lowest}-{highest}"
    return f"{name} {text!r} is not a value, range or step within {lowest}-{highest}"


def _cron_atom(pattern: str, atom: str, field: tuple[str, int, int, dict[str, int]]) -> str:
    """One comma-separated part of a field, as cron means it. croniter reads any range whose end is not above its
    start as wrapping round the whole field: `1-0`, but also `5-5` and `mon-mon`, fired every minute or day. cron
    refuses the first and reads the second as its one value, and so does Kiln."""
    name, lowest, highest, names = field
    span, slash, step = atom.partition("/")
    ends = span.split("-")
    if len(ends) != 2:
        return atom
    low, high = (int(end) if end.isdigit() else names.get(end.lower()) for end in ends)
    if name == "day-of-month" and low is not None and ends[1].upper() == "L" and low > 28:
        raise ScheduleError(
            f"pattern {pattern!r}: the range {span} in its {name} field runs backwards in a month shorter than "
            f"{low} days, where croniter would fire every day; write {low}-31 (a month without a day skips it)"
        )
    if low is None or high is None or low < high:
        return atom  # `L` and the like are croniter's to judge
    if low == high:
        return str(low)  # `5-5/2` too: a range of one value holds that value alone, whatever its step
    top = highest - 1 if name == "day-of-week" else highest  # 7 is Sunday again
    wrapped = ",".join(f"{a}-{b}{slash}{step}" if a < b else str(a) for a, b in ((low, top), (lowest, high)))
    raise ScheduleError(
        f"pattern {pattern!r}: the range {span} in its {name} field runs backwards; a cron range "
        f"goes from low to high (for {low} round to {high}, write {wrapped})"
    )


def _ever_fires(pattern: str) -> bool:
    """False for a valid pattern naming a day its months never have, such as 31 February."""
    try:
        croniter(pattern, datetime(2000, 1, 1)).get_next(datetime)
    except CroniterBadDateError:
        return False
    return True


def zone(name: str) -> ZoneInfo:
    """The IANA timezone `name`, or ScheduleError. ZoneInfo reads any zone file of the host's zoneinfo folder, and
    some name no IANA zone: `localtime`, `posixrules`, `right/...`, `posix/...` mean what the host reading them
    says, so a schedule in one would fire at one time on the api's host and at another on beat's, and fail on a
    host with the tzdata wheel, which has none of them."""
    if name not in _iana_names():
        raise ScheduleError(f"timezone {name!r} is not an IANA timezone such as 'America/New_York'")
    return ZoneInfo(name)


@cache
def _iana_names() -> frozenset[str]:
    """available_timezones() leaves out right/, posix/ and posixrules already, but lists the host's `localtime`."""
    return frozenset(available_timezones() - {"localtime"})


def _refuse_random(pattern: str) -> None:
    """A random field would give another fire time at each reading: beat and the schedule's view would disagree."""
    atoms = (atom for field in pattern.split() for atom in re.split(r"[,/-]", field))
    if any(_RANDOM.match(atom) for atom in atoms):
        raise ScheduleError(f"pattern {pattern!r} picks a random time (R): name the minute, hour and days instead")


def check_schedule(pattern: str, timezone: str) -> None:
    """A schedule as a request gives it: a 4xx naming `pattern` or `timezone` when either cannot be scheduled.

    Random fields are refused here, where a schedule is stored, and not in `check_pattern`: a schedule stored
    before they were refused still fires (at random). A range running backwards is refused in `check_pattern`, so
    a schedule stored with one before fails at its next fire and is disabled, recorded (shared/beat.py)."""
    try:
        check_pattern(pattern)
        _refuse_random(pattern)
    except ScheduleError as error:
        raise InvalidInput(str(error), field="pattern") from None
    try:
        zone(timezone)
    except ScheduleError as error:
        raise InvalidInput(str(error), field="timezone") from None


def next_fire_times(pattern: str, timezone: str, *, after: datetime, count: int = 1) -> list[datetime]:
    """The next `count` UTC instants strictly after `after` at which the schedule fires."""
    return list(islice(fire_times(pattern, timezone, after=after), count))


def fire_times(pattern: str, timezone: str, *, after: datetime) -> Iterator[datetime]:
    """The UTC instants strictly after `after` at which the schedule fires, one after the other, without end."""
    tz = zone(timezone)
    local_start = after.astimezone(tz).replace(tzinfo=None) - timedelta(hours=3)  # covers a repeated hour
    walk = croniter(check_pattern(pattern), local_start)
    repeats = _fires_by_real_time(pattern)
    # Second occurrences of a repeated hour come an hour (the change) after the first ones, so they wait here until
    # the walk's first occurrences have passed them: the instants come out in order.
    later: list[datetime] = []
    last = after
    while True:
        wall_clock = walk.get_next(datetime)
        instant = _instant(wall_clock, tz)
        while later and later[0] <= instant:
            last = yield from _after(heapq.heappop(later), last)
        last = yield from _after(instant, last)
        second = _second_occurrence(wall_clock, tz) if repeats else None
        if second is not None:
            heapq.heappush(later, second)


@dataclass(frozen=True)
class FireSpan:
    """The fires of a span of time: how many, and the last two of them, oldest first (fewer when fewer fired)."""

    count: int
    last: tuple[datetime, ...]


def fires_between(pattern: str, timezone: str, *, after: datetime, until: datetime) -> FireSpan:
    """The fires strictly after `after` and up to `until`, as `fire_times` gives them, with work growing with the
    days of the span rather than its fires (a month of `* * * * *` is 43,000 of them): a day whose UTC offset holds
    fires at its times of day, counted and picked by bisection; a day the clocks change on is walked fire by fire,
    as `fire_times` walks it. Only the days the pattern's day fields name are looked at."""
    if until <= after:
        return FireSpan(0, ())
    tz = zone(timezone)
    read = check_pattern(pattern)
    minutes = _times_of_day(read)
    first_day, last_day = (instant.astimezone(tz).date() for instant in (after, until))
    count = 0
    last: tuple[datetime, ...] = ()
    for day in takewhile(lambda day: day <= last_day, _days(read, first_day)):
        span = _fires_of_day(pattern, tz, minutes, day, after=after, until=until)
        count, last = count + span.count, (*last, *span.last)[-2:]
        # A day's walk may count a fire at the next midnight (see _fires_of_day): the next day counts after it.
        after = max((after, *span.last))
    return FireSpan(count, last)


def _days(pattern: str, first: date) -> Iterator[date]:
    """The days from `first` on that the pattern fires on, by its day-of-month, month and day-of-week fields."""
    walk = croniter(" ".join(["0", "0", *pattern.split()[2:]]), datetime.combine(first, time()) - MINUTE)
    while True:
        yield walk.get_next(datetime).date()


def _times_of_day(pattern: str) -> list[int]:
    """The minutes of the day (hour * 60 + minute) the pattern fires at on the days it fires, in order."""
    minutes, hours = croniter(pattern).expanded[:2]
    return sorted(
        hour * 60 + minute
        for hour in (range(24) if hours == ["*"] else hours)
        for minute in (range(60) if minutes == ["*"] else minutes)
    )


def _fires_of_day(
    pattern: str, tz: ZoneInfo, minutes: list[int], day: date, *, after: datetime, until: datetime
) -> FireSpan:
    """The fires in (after, until] of a local `day` the pattern fires on."""
    midnight, next_midnight = (datetime.combine(when, time(), tz) for when in (day, day + timedelta(days=1)))
    offset = midnight.utcoffset()
    if offset is None or offset != next_midnight.utcoffset():  # a change of the clocks: skipped or repeated times
        start = max(after, midnight.astimezone(UTC) - timedelta(microseconds=1))
        # Up to the next midnight included: times skipped at the day's end (America/Nuuk's 23:00 to 24:00) fire
        # at the jump, which is that midnight, and are not among the next day's own times.
        walked = list(takewhile(lambda f: f <= next_midnight and f <= until, fire_times(pattern, tz.key, after=start)))
        return FireSpan(len(walked), tuple(walked[-2:]))
    # One offset all day: each time of day is one instant, and the span's ends read on this day's clock.
    low, high = (bisect_right(minutes, _minute_of_day(instant, midnight, offset)) for instant in (after, until))
    midnight_utc = midnight.astimezone(UTC)
    return FireSpan(high - low, tuple(midnight_utc + m * MINUTE for m in minutes[max(low, high - 2) : high]))


def _minute_of_day(instant: datetime, midnight: datetime, offset: timedelta) -> float:
    """Minutes from the local midnight to `instant` by a clock at `offset`: below 0 before the day, 1440 or more
    after it."""
    wall_clock = instant.astimezone(UTC).replace(tzinfo=None) + offset
    return (wall_clock - midnight.replace(tzinfo=None)) / MINUTE


def _after(instant: datetime, last: datetime) -> Generator[datetime, None, datetime]:
    """Yield `instant` if it comes after `last` (several skipped times of a night fire once, at the jump); returns
    the last instant yielded."""
    if instant <= last:
        return last
    yield instant
    return instant


def _fires_by_real_time(pattern: str) -> bool:
    """Whether the pattern fires through a repeated hour by real time, as cron's do: one whose minute or hour field
    holds a wildcard or a step (`*/15 * * * *`, `0 * * * *`, `*/10 2 * * *`). A fixed time fires once."""
    minute, hour = pattern.split()[:2]
    return any("*" in field or "/" in field for field in (minute, hour))


def _second_occurrence(wall_clock: datetime, tz: ZoneInfo) -> datetime | None:
    """The UTC instant of a local wall-clock time's second occurrence, when a fall-back change repeats it."""
    first, second = (wall_clock.replace(tzinfo=tz, fold=fold).astimezone(UTC) for fold in (0, 1))
    repeated = second != first and second.astimezone(tz).replace(tzinfo=None) == wall_clock
    return second if repeated else None


def _instant(wall_clock: datetime, tz: ZoneInfo) -> datetime:
    """The UTC instant of a local wall-clock time: its first occurrence, or the end of the gap it falls in."""
    first = wall_clock.replace(tzinfo=tz, fold=0).astimezone(UTC)
    if first.astimezone(tz).replace(tzinfo=None) == wall_clock:
        return first
    # Skipped by a spring-forward change: walk to the first minute whose wall clock is past it.
    instant = wall_clock.replace(tzinfo=tz, fold=1).astimezone(UTC).replace(second=0, microsecond=0)
    while instant.astimezone(tz).replace(tzinfo=None) <= wall_clock:
        instant += MINUTE
    return instant
