"""Names given more than once, each named once and in order, counted in one pass."""

from __future__ import annotations

from shared.schemas import repeated


def test_each_name_given_more_than_once_is_named_once_in_order() -> None:
    assert repeated(["b", "a", "c", "a", "b", "b"]) == ["a", "b"]
    assert repeated(["x", "y"]) == []
