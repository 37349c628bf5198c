"""Per-org envelope keys for sensitive columns: AES-256-GCM data keys, wrapped under the platform key.

A sealed value reads `<key id>:<base64 of nonce, ciphertext and tag>`, its column (`org:table:column`) bound in as
associated data, so a value copied into another org's or column's cell does not decrypt there. One key per org is
active; rotation makes a new one active, re-encrypts every value sealed under the older ones (services/sync/
rotation.py), and marks those `drained`: only then may they be destroyed, after which nothing can ever decrypt
under them again.
"""

from __future__ import annotations

import base64
import binascii
import functools
import math
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import Select, select, text
from sqlalchemy.orm import Session

from services.sync.merge import as_json
from shared.crypto import NONCE_BYTES, SecretBox
from shared.db.models import SyncKey
from shared.db.types import utcnow
from shared.stored_secrets import sync_key_context
from shared.sync_keys import ACTIVE, DESTROYED, DRAINED, RETIRED

# What _new_key makes: "ek" and 12 hex digits.
KEY_ID = re.compile(r"ek[0-9a-f]{12}")


def looks_sealed(value: Any) -> bool:
    """Whether `value` reads as a sealed token (`<key id>:...`), whichever key it names."""
    return isinstance(value, str) and KEY_ID.fullmatch(value.partition(":")[0]) is not None


class KeyNotHeld(ValueError):
    """A value sealed under a key this keyring does not hold: one a rotation made since the keyring was loaded, or
    one the org no longer has. A job loads the org's keys again to know which (services/sync/jobs.py)."""

    def __init__(self, message: str, key_id: str) -> None:
        super().__init__(message)
        self.key_id = key_id


class KeyRotated(Exception):
    """The org's key was rotated since this keyring was loaded: what it would seal now would stay under a key that
    may be destroyed. The transaction is rolled back and redone with the new keyring."""


@dataclass(frozen=True)
class Keyring:
    """The org's keys that can still decrypt, and the one new values are sealed under."""

    org_id: str
    active_id: str
    keys: dict[str, AESGCM]

    def seal(self, value: Any, *, column: str) -> str | None:
        if value is None:
            return None
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = self.keys[self.active_id].encrypt(nonce, _plaintext(value), self._aad(column))
        return f"{self.active_id}:{base64.b64encode(nonce + sealed).decode()}"

    def open(self, token: str | None, *, column: str) -> Any:
        if token is None:
            return None
        key_id, _, body = token.partition(":")
        key = self.keys.get(key_id)
        if key is None:
            raise _not_openable(column, key_id)
        raw = binascii.a2b_base64(body)  # base64.b64decode's checks of its argument cost more than the decoding
        try:
            plaintext = key.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], self._aad(column))
        except InvalidTag:
            raise ValueError(f"a value of {column} does not decrypt under key {key_id!r}") from None
        return _value(plaintext)

    def is_current(self, token: str | None) -> bool:
        return token is None or token.startswith(self.active_id + ":")

    def _aad(self, column: str) -> bytes:
        return _associated_data(self.org_id, column)


# A sealed value is its JSON, or, for a type JSON would turn into a string, this marker (never JSON's first byte),
# the type's letter and its text: so a NUMERIC, a timestamp, an INTERVAL or a BYTEA column opens as the type it was
# sealed from, and NaN or an infinity (which JSON has no word for: orjson writes null) opens as that float.
_TYPED = b"\x00"


def _duration(text: str) -> timedelta:
    days, seconds, microseconds = (int(part) for part in text.split())
    return timedelta(days=days, seconds=seconds, microseconds=microseconds)


_DECODERS: dict[bytes, Callable[[str], Any]] = {
    b"F": float,
    b"N": Decimal,
    b"T": datetime.fromisoformat,
    b"D": date.fromisoformat,
    b"t": time.fromisoformat,
    b"I": _duration,
}


def _plaintext(value: Any) -> bytes:
    if isinstance(value, float) and not math.isfinite(value):
        return _TYPED + b"F" + repr(value).encode()
    if isinstance(value, (str, int, float)):
        return orjson.dumps(value)
    if isinstance(value, Decimal):
        return _TYPED + b"N" + str(value).encode()
    if isinstance(value, datetime):  # before date: a datetime is a date too
        return _TYPED + b"T" + value.isoformat().encode()
    if isinstance(value, date):
        return _TYPED + b"D" + value.isoformat().encode()
    if isinstance(value, time):
        return _TYPED + b"t" + value.isoformat().encode()
    if isinstance(value, timedelta):
        return _TYPED + b"I" + f"{value.days} {value.seconds} {value.microseconds}".encode()
    if isinstance(value, (bytes, memoryview)):
        return _TYPED + b"B" + bytes(value)
    # A PostgreSQL array: its items as JSON keeps them (pair.py reads them back as the column's item type).
    return orjson.dumps(value, default=as_json)


def _value(plaintext: bytes) -> Any:
    if not plaintext.startswith(_TYPED):
        return orjson.loads(plaintext)
    letter, body = plaintext[1:2], plaintext[2:]
    return body if letter == b"B" else _DECODERS[letter](body.decode())


def typed_text(value: Any) -> str:
    """A value as text that `from_typed_text` gives back as the same value of the same type, unsealed: for a record
    kept for a while in plain text where it already was (the local store), to be sealed when it leaves."""
    return base64.b64encode(_plaintext(value)).decode()


def from_typed_text(text: str) -> Any:
    return _value(base64.b64decode(text))


@functools.lru_cache(maxsize=4096)
def _associated_data(org_id: str, column: str) -> bytes:
    """Made once per column rather than once per value: a pull opens one value per record."""
    return f"{org_id}:{column}".encode()


def load_keyring(session: Session, box: SecretBox, org_id: str) -> Keyring:
    """The org's keyring; its first key is made on first use."""
    rows = _usable_keys(session, org_id)
    if not any(row.status == ACTIVE for row in rows):
        # Two jobs of a new org would each make a first key (there is no row yet to lock): the second waits for
        # the first's to commit, and finds it.
        one_key_change_at_a_time(session, org_id)
        rows = _usable_keys(session, org_id)
        if not any(row.status == ACTIVE for row in rows):
            rows = [*rows, _new_key(session, box, org_id)]
    keys = {row.id: AESGCM(_unwrap(box, row)) for row in rows}
    active = next(row for row in rows if row.status == ACTIVE)
    return Keyring(org_id=org_id, active_id=active.id, keys=keys)


def _usable_keys(session: Session, org_id: str) -> Sequence[SyncKey]:
    return session.scalars(
        select(SyncKey).where(SyncKey.org_id == org_id, SyncKey.status != DESTROYED).with_for_update()
    ).all()


def hold_active_key(session: Session, keyring: Keyring) -> None:
    """Until this transaction ends, the keyring's active key cannot be retired, and no batch of a rotation
    re-encrypts (hold_active_key_alone): a rotation's switch waits for it, so everything the transaction seals is
    there for the rotation to re-encrypt. KeyRotated if it was retired already. (SQLite ignores FOR SHARE: there
    the caller takes the database's write lock first.)"""
    _check_active(session.scalar(_active_key(keyring.org_id).with_for_update(read=True)), keyring)


def hold_active_key_alone(session: Session, keyring: Keyring) -> None:
    """Until this transaction ends, no batch seals: each waits in hold_active_key (its FOR SHARE against this FOR
    UPDATE). A rotation re-encrypts a batch of values under it, so that no sync batch rewrites a record between the
    rotation reading it and writing it back, nor copies values the rotation is about to find gone. KeyRotated if
    the keyring's key is no longer active. (SQLite: the caller holds the database's write lock.)"""
    _check_active(session.scalar(_active_key(keyring.org_id).with_for_update()), keyring)


def _active_key(org_id: str) -> Select[str]:
    return select(SyncKey.id).where(SyncKey.org_id == org_id, SyncKey.status == ACTIVE)


def _check_active(active: str | None, keyring: Keyring) -> None:
    if active != keyring.active_id:
        raise KeyRotated(f"the key of {keyring.org_id!r} was rotated: {keyring.active_id} is no longer active")


def one_key_change_at_a_time(session: Session, org_id: str) -> None:
    """Until this transaction ends, no other rotation of the org's keys starts, nor the making of its first key:
    a rotation waits, then rotates again from the keys this one leaves. Unlocked, two rotations both read the same
    active key, and each retired it and made one of its own: two active keys. Take it before reading the keys.
    SQLite takes its one writer's lock at a transaction's first write, so a write that changes nothing takes it
    now."""
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(hashtext(:name))"), {"name": f"sync-keys:{org_id}"})
    else:
        connection.execute(text("DELETE FROM sync_keys WHERE 0 = 1"))


def start_rotation(session: Session, box: SecretBox, org_id: str) -> Keyring:
    """Retire the active key and make a new one; values under the old key still open until re-encrypted. The
    caller holds one_key_change_at_a_time. From its commit on, every batch that loaded the old keyring gets
    KeyRotated from hold_active_key, so nothing is sealed under a retired key any more."""
    for row in session.scalars(select(SyncKey).where(SyncKey.org_id == org_id, SyncKey.status == ACTIVE)):
        row.status, row.retired_at = RETIRED, utcnow()
    _new_key(session, box, org_id)
    session.flush()
    return load_keyring(session, box, org_id)


def unfinished_rotation(session: Session, org_id: str) -> bool:
    """Whether the org has retired keys: a rotation switched keys and has not drained them yet (stopped by an
    error, its worker lost), or migration 0012 retired a second active key."""
    return (
        session.scalar(select(SyncKey.id).where(SyncKey.org_id == org_id, SyncKey.status == RETIRED).limit(1))
        is not None
    )


def mark_drained(session: Session, org_id: str) -> list[str]:
    """After re-encryption, once the caller has found nothing left under them: the retired keys seal nothing any
    more, and may be destroyed."""
    retired = session.scalars(select(SyncKey).where(SyncKey.org_id == org_id, SyncKey.status == RETIRED)).all()
    for row in retired:
        row.status = DRAINED
    return [row.id for row in retired]


def _new_key(session: Session, box: SecretBox, org_id: str) -> SyncKey:
    key_id = "ek" + secrets.token_hex(6)
    material = base64.b64encode(AESGCM.generate_key(bit_length=256)).decode()
    row = SyncKey(
        id=key_id, org_id=org_id, status=ACTIVE, wrapped=box.encrypt(material, context=sync_key_context(org_id, key_id))
    )
    session.add(row)
    session.flush()
    return row


def _unwrap(box: SecretBox, row: SyncKey) -> bytes:
    assert row.wrapped is not None
    return base64.b64decode(box.decrypt(row.wrapped, context=sync_key_context(row.org_id, row.id)))


def _not_openable(column: str, key_id: str) -> ValueError:
    """Why a value does not open, without echoing it: a value that is no sealed token may be plain text, a
    patient's name written into the central copy by hand, and would otherwise reach the job's error and the logs."""
    if KEY_ID.fullmatch(key_id):
        return KeyNotHeld(f"{column} was sealed under key {key_id!r}, which this org no longer has", key_id)
    return ValueError(f"a value of {column} is not sealed (plain text written into its central copy?)")
