"""Version ids: DESIGN §7's shape, unique, and sortable by creation time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from shared.versions import is_version, new_version, version_time


def test_a_version_has_the_design_shape() -> None:
    version = new_version(datetime(2024, 1, 15, 10, 30, 0, 123456, tzinfo=UTC))
    assert version.startswith("v2024-01-15T10-30-00-123Z_")
    assert is_version(version) and len(version.rsplit("_", 1)[1]) == 8


def test_versions_made_in_the_same_millisecond_differ() -> None:
    moment = datetime(2024, 1, 15, tzinfo=UTC)
    assert len({new_version(moment) for _ in range(1000)}) == 1000


def test_versions_sort_by_time() -> None:
    start = datetime(2024, 1, 15, tzinfo=UTC)
    versions = [new_version(start + timedelta(milliseconds=ms)) for ms in (5, 1, 1000, 60_000)]
    assert sorted(versions) == [versions[1], versions[0], versions[2], versions[3]]


def test_the_time_is_read_back() -> None:
    moment = datetime(2024, 3, 1, 8, 0, 5, 250000, tzinfo=UTC)
    assert version_time(new_version(moment)) == moment


def test_a_foreign_string_is_not_a_version() -> None:
    assert not is_version("v1.0.0")
    with pytest.raises(ValueError, match="not a Kiln version"):
        version_time("latest")
