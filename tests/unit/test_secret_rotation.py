"""The platform key rotated: what was sealed under a key now retired still opens, everything new is sealed under the
current key, tokens and streams of an earlier Kiln (which name no key) still open, and a secret under a key no longer
configured fails saying so."""

from __future__ import annotations

import base64
import io
import secrets
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shared.crypto import FORMAT, NONCE_BYTES, STREAM_MAGIC, SecretBox, key_id, platform_key
from shared.errors import ConfigurationError, SecretUnreadable
from shared.settings import Settings, build_settings

OLD = base64.b64encode(secrets.token_bytes(32)).decode()
NEW = base64.b64encode(secrets.token_bytes(32)).decode()
CONTEXT = "datasource:acme"


def an_earlier_kilns_token(key_b64: str, plaintext: str, *, context: str = CONTEXT) -> str:
    """A `v1:` token, as Kiln wrote them before tokens named their key."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    sealed = AESGCM(base64.b64decode(key_b64)).encrypt(nonce, plaintext.encode(), context.encode())
    return f"{FORMAT}:{base64.b64encode(nonce + sealed).decode()}"


def an_earlier_kilns_stream(key_b64: str, data: bytes, *, context: str = "backup:acme:b1") -> bytes:
    """A `kiln-stream-v1` stream of one chunk, as Kiln sealed backups before their header named the key."""
    salt, prefix, chunk_bytes = secrets.token_bytes(16), secrets.token_bytes(7), 1024
    header = STREAM_MAGIC + salt + prefix + chunk_bytes.to_bytes(4, "big")
    derive = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=b"kiln-stream:" + context.encode())
    aead = AESGCM(derive.derive(base64.b64decode(key_b64)))
    return header + aead.encrypt(prefix + (0).to_bytes(4, "big") + b"\x01", data, header)


def unsealed_stream(box: SecretBox, stream: bytes, *, context: str = "backup:acme:b1") -> bytes:
    target = io.BytesIO()
    box.unseal_stream(io.BytesIO(stream), target, context=context)
    return target.getvalue()


def sealed_stream(box: SecretBox, data: bytes) -> bytes:
    target = io.BytesIO()
    box.seal_stream(io.BytesIO(data), target, context="backup:acme:b1")
    return target.getvalue()


def test_a_secret_sealed_under_a_retired_key_opens_and_new_ones_are_sealed_under_the_current_key() -> None:
    token = SecretBox(OLD).encrypt("s3cret", context=CONTEXT)
    rotated = SecretBox(NEW, retired=(OLD,))

    assert rotated.decrypt(token, context=CONTEXT) == "s3cret"
    assert not rotated.is_current(token)
    assert rotated.is_current(rotated.encrypt("s3cret", context=CONTEXT))
    assert SecretBox(NEW).decrypt(rotated.encrypt("s3cret", context=CONTEXT), context=CONTEXT) == "s3cret"


def test_a_token_names_its_key_by_a_fingerprint_that_is_not_the_key() -> None:
    token = SecretBox(OLD).encrypt("s3cret", context=CONTEXT)

    assert token.startswith(f"v2:{key_id(platform_key(OLD))}:")
    assert OLD not in token and base64.b64decode(OLD).hex()[:12] not in token


def test_a_secret_under_a_key_no_longer_configured_names_the_key_and_both_variables() -> None:
    token = SecretBox(OLD).encrypt("s3cret", context=CONTEXT)

    with pytest.raises(SecretUnreadable) as raised:
        SecretBox(NEW).decrypt(token, context=CONTEXT)

    assert raised.value.message == (
        f"the secret for {CONTEXT} was sealed under platform key {key_id(platform_key(OLD))}, which is not "
        "configured: neither KILN_SECRET_KEY nor KILN_SECRET_KEY_RETIRED holds it"
    )


def test_a_token_of_an_earlier_kiln_opens_under_the_current_or_a_retired_key() -> None:
    old_token, new_token = an_earlier_kilns_token(OLD, "under old"), an_earlier_kilns_token(NEW, "under new")
    rotated = SecretBox(NEW, retired=(OLD,))

    assert rotated.decrypt(old_token, context=CONTEXT) == "under old"
    assert rotated.decrypt(new_token, context=CONTEXT) == "under new"
    assert not rotated.is_current(new_token)  # it names no key: a rewrap moves it to the format that does


def test_a_token_of_an_earlier_kiln_under_no_configured_key_says_so() -> None:
    with pytest.raises(SecretUnreadable, match="under KILN_SECRET_KEY or any key of KILN_SECRET_KEY_RETIRED"):
        SecretBox(NEW).decrypt(an_earlier_kilns_token(OLD, "pw"), context=CONTEXT)


def test_a_secret_copied_to_another_context_does_not_open_under_its_own_key() -> None:
    token = SecretBox(NEW, retired=(OLD,)).encrypt("pw", context=CONTEXT)

    with pytest.raises(SecretUnreadable, match="does not decrypt under platform key"):
        SecretBox(NEW).decrypt(token, context="datasource:globex")


def test_a_stream_sealed_under_a_retired_key_opens_and_one_under_an_unknown_key_says_so() -> None:
    stream = sealed_stream(SecretBox(OLD), b"readings" * 300)

    assert unsealed_stream(SecretBox(NEW, retired=(OLD,)), stream) == b"readings" * 300
    with pytest.raises(SecretUnreadable, match=f"platform key {key_id(platform_key(OLD))}, which is not configured"):
        unsealed_stream(SecretBox(NEW), stream)


def test_a_stream_of_an_earlier_kiln_opens_under_a_retired_key() -> None:
    stream = an_earlier_kilns_stream(OLD, b"SQLite format 3\x00")

    assert unsealed_stream(SecretBox(NEW, retired=(OLD,)), stream) == b"SQLite format 3\x00"
    with pytest.raises(SecretUnreadable, match="chunk 0 does not open under KILN_SECRET_KEY or any key"):
        unsealed_stream(SecretBox(NEW), stream)


def test_bytes_sealed_whole_by_an_earlier_kiln_open_under_a_retired_key() -> None:
    nonce = secrets.token_bytes(NONCE_BYTES)
    whole = nonce + AESGCM(base64.b64decode(OLD)).encrypt(nonce, b"snapshot", b"backup:acme:b1")

    assert SecretBox(NEW, retired=(OLD,)).unseal(whole, context="backup:acme:b1") == b"snapshot"
    with pytest.raises(SecretUnreadable, match="sealed under a key no longer configured"):
        SecretBox(NEW).unseal(whole, context="backup:acme:b1")


def test_the_box_made_from_settings_holds_the_current_and_the_retired_keys(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, secret_key=NEW, secret_key_retired=f" {OLD} ,")
    box = SecretBox.from_settings(settings)

    assert box.current_id == key_id(platform_key(NEW))
    assert box.retired_ids == (key_id(platform_key(OLD)),)
    assert box.without_retired().retired_ids == ()


def test_a_retired_key_that_is_not_a_key_is_named_by_its_place_never_quoted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_SECRET_KEY", NEW)
    monkeypatch.setenv("KILN_SECRET_KEY_RETIRED", f"{OLD},c2VjcmV0LXBhc3N3b3Jk")

    with pytest.raises(ConfigurationError) as raised:
        build_settings()

    assert str(raised.value) == "KILN_SECRET_KEY_RETIRED: key 2 must be base64 of 32 bytes, not 15"
    monkeypatch.setenv("KILN_SECRET_KEY_RETIRED", "not base64!")
    with pytest.raises(ConfigurationError) as raised:
        build_settings()
    assert str(raised.value) == "KILN_SECRET_KEY_RETIRED: key 1 must be base64 of 32 bytes"


def test_a_secret_key_that_is_not_a_key_fails_in_one_line_when_settings_are_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KILN_SECRET_KEY", "c2VjcmV0LXBhc3N3b3Jk")

    with pytest.raises(ConfigurationError) as raised:
        build_settings()

    assert str(raised.value) == "KILN_SECRET_KEY: must be base64 of 32 bytes, not 15"


def test_the_current_key_listed_as_retired_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_SECRET_KEY", NEW)
    monkeypatch.setenv("KILN_SECRET_KEY_RETIRED", f"{OLD},{NEW}")

    with pytest.raises(ConfigurationError) as raised:
        build_settings()

    assert str(raised.value) == "KILN_SECRET_KEY_RETIRED holds KILN_SECRET_KEY itself: list only the keys it replaced"
    assert NEW not in str(raised.value)
