"""A sealed stream (a backup) opens to exactly the bytes sealed, and refuses any that were altered, reordered, cut
short, or sealed under another key or for another purpose."""

from __future__ import annotations

import base64
import io
import secrets

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.crypto import KEY_ID_BYTES, STREAM_MAGIC, TAG_BYTES, SecretBox
from shared.errors import SecretUnreadable

BOX = SecretBox(base64.b64encode(secrets.token_bytes(32)).decode())
CHUNK = 64
HEADER = len(STREAM_MAGIC) + KEY_ID_BYTES + 16 + 7 + 4
SALT_AT = len(STREAM_MAGIC) + KEY_ID_BYTES


def sealed(data: bytes, *, box: SecretBox = BOX, context: str = "backup:acme:b1") -> bytes:
    target = io.BytesIO()
    box.seal_stream(io.BytesIO(data), target, context=context, chunk_bytes=CHUNK)
    return target.getvalue()


def opened(stream: bytes, *, box: SecretBox = BOX, context: str = "backup:acme:b1") -> bytes:
    target = io.BytesIO()
    box.unseal_stream(io.BytesIO(stream), target, context=context)
    return target.getvalue()


def chunks_of(stream: bytes) -> list[bytes]:
    body = stream[HEADER:]
    return [body[start : start + CHUNK + TAG_BYTES] for start in range(0, len(body), CHUNK + TAG_BYTES)]


@settings(max_examples=60)
@given(st.binary(max_size=5 * CHUNK + 3) | st.sampled_from([b"", b"x" * CHUNK, b"y" * (3 * CHUNK)]))
def test_a_stream_opens_to_the_bytes_sealed(data: bytes) -> None:
    assert opened(sealed(data)) == data


def test_the_sealed_stream_shows_nothing_of_the_plaintext() -> None:
    data = b"SQLite format 3\x00" + b"Ada Lovelace " * 40

    stream = sealed(data)

    assert b"Lovelace" not in stream and b"SQLite" not in stream
    assert stream != sealed(data)  # a new salt and nonce prefix every time


def test_a_flipped_byte_in_a_middle_chunk_is_refused() -> None:
    stream = bytearray(sealed(bytes(range(256)) * 2))
    stream[HEADER + CHUNK + TAG_BYTES + 5] ^= 1

    with pytest.raises(SecretUnreadable, match="chunk 1 does not open"):
        opened(bytes(stream))


def test_a_stream_cut_at_a_chunk_boundary_is_refused() -> None:
    stream = sealed(b"z" * (4 * CHUNK))
    cut = stream[: HEADER + 2 * (CHUNK + TAG_BYTES)]  # two whole chunks, neither sealed as the last

    with pytest.raises(SecretUnreadable, match="chunk 1 does not open"):
        opened(cut)
    with pytest.raises(SecretUnreadable, match="chunk 0 does not open"):
        opened(stream[:HEADER])


def test_reordered_or_dropped_chunks_are_refused() -> None:
    stream = sealed(bytes(range(200)))
    header, chunks = stream[:HEADER], chunks_of(stream)

    with pytest.raises(SecretUnreadable, match="chunk 0 does not open"):
        opened(header + chunks[1] + chunks[0] + b"".join(chunks[2:]))
    with pytest.raises(SecretUnreadable, match="chunk 1 does not open"):
        opened(header + chunks[0] + b"".join(chunks[2:]))


def test_another_key_or_another_context_does_not_open_it() -> None:
    other = SecretBox(base64.b64encode(secrets.token_bytes(32)).decode())
    stream = sealed(b"readings")

    with pytest.raises(SecretUnreadable, match=f"sealed under platform key {BOX.current_id}, which is not configured"):
        opened(stream, box=other)
    with pytest.raises(SecretUnreadable, match="does not open"):
        opened(stream, context="backup:globex:b1")


def test_an_altered_header_is_refused() -> None:
    stream = sealed(b"readings" * 20)
    salt_changed = stream[:SALT_AT] + bytes(16) + stream[SALT_AT + 16 :]
    huge_chunks = stream[: HEADER - 4] + (2**31).to_bytes(4, "big") + stream[HEADER:]

    with pytest.raises(SecretUnreadable, match="chunk 0 does not open"):
        opened(salt_changed)
    with pytest.raises(SecretUnreadable, match="is not one seal_stream writes"):
        opened(huge_chunks)
    with pytest.raises(SecretUnreadable, match="is not a sealed stream"):
        opened(b"SQLite format 3\x00")
