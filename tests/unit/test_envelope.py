"""Sealed values open as the value, and the type, they were sealed from."""

from __future__ import annotations

import math
import secrets
from datetime import datetime
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given
from hypothesis import strategies as st

from services.sync.envelope import Keyring, from_typed_text, typed_text
from services.sync.merge import as_json

KEYRING = Keyring(org_id="acme", active_id="k1", keys={"k1": AESGCM(secrets.token_bytes(32))})

column_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
    st.text(),
    st.decimals(allow_nan=False, allow_infinity=False),
    st.datetimes(timezones=st.one_of(st.none(), st.timezones())),
    st.dates(),
    st.times(),
    st.binary(),
    st.timedeltas(),
    st.lists(st.integers(min_value=-1000, max_value=1000)),
    st.dictionaries(st.text(), st.text()),
)


@given(column_values)
def test_a_sealed_value_opens_as_the_same_value_of_the_same_type(value: Any) -> None:
    opened = KEYRING.open(KEYRING.seal(value, column="readings.patient"), column="readings.patient")

    assert_same_value(opened, value)


@given(column_values)
def test_a_value_kept_as_typed_text_comes_back_as_the_same_value_of_the_same_type(value: Any) -> None:
    """As a pull's note of a deleted record keeps it in the local store until its audit row is written."""
    assert_same_value(from_typed_text(typed_text(value)), value)


@given(st.uuids())
def test_a_uuid_sealed_or_kept_as_typed_text_comes_back_as_its_text_which_the_audit_keeps_alike(value: UUID) -> None:
    """A UUID opens as text, as it always has (a PostgreSQL uuid column takes either): the audit row of a deleted
    record, which keeps values as JSON, is the same from the note as from the record."""
    opened = KEYRING.open(KEYRING.seal(value, column="readings.ref"), column="readings.ref")

    assert opened == from_typed_text(typed_text(value)) == str(value) == as_json(value)


def assert_same_value(opened: Any, value: Any) -> None:
    assert type(opened) is type(value)
    if isinstance(value, datetime) and value.tzinfo is not None:
        # The offset travels, the zone's name does not; and PEP 495 makes a time a zone repeats (fall back) unequal
        # to any time of another zone, the same instant too: so the instant and the offset are what must match.
        assert (opened.timestamp(), opened.utcoffset()) == (value.timestamp(), value.utcoffset())
    else:
        assert opened == value


def test_nan_sealed_opens_as_nan() -> None:
    opened = KEYRING.open(KEYRING.seal(math.nan, column="readings.value"), column="readings.value")

    assert isinstance(opened, float) and math.isnan(opened)


def test_a_value_sealed_for_one_column_does_not_open_in_another() -> None:
    sealed = KEYRING.seal("Ada Lovelace", column="readings.patient")

    with pytest.raises(ValueError, match=r"readings\.note"):
        KEYRING.open(sealed, column="readings.note")


def test_a_time_its_zone_repeats_opens_as_the_same_instant_and_offset() -> None:
    for fold in (0, 1):
        repeated = datetime(2000, 10, 29, 1, 30, tzinfo=ZoneInfo("America/Dawson"), fold=fold)

        opened = KEYRING.open(KEYRING.seal(repeated, column="readings.at"), column="readings.at")

        assert (opened.timestamp(), opened.utcoffset()) == (repeated.timestamp(), repeated.utcoffset())
