"""Secrets at rest: AES-256-GCM under the platform key (KILN_SECRET_KEY), bound to what they belong to."""

from __future__ import annotations

import base64
import binascii
import secrets
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

FORMAT = "v1"
NONCE_BYTES = 12
TAG_BYTES = 16
STREAM_MAGIC = b"kiln-stream-v1\n"
STREAM_CHUNK_BYTES = 1024 * 1024
_MAX_STREAM_CHUNK_BYTES = 64 * 1024 * 1024
_SALT_BYTES = 16
_PREFIX_BYTES = 7  # with a 4-byte chunk counter and a 1-byte last-chunk flag: the 12-byte GCM nonce
_STREAM_HEADER_BYTES = len(STREAM_MAGIC) + _SALT_BYTES + _PREFIX_BYTES + 4


class SecretBox:
    """Encrypts short secrets such as database passwords. `context` (e.g. "datasource:acme") is authenticated
    with the ciphertext, so a secret copied onto another org's row does not decrypt there."""

    def __init__(self, key_b64: str) -> None:
        try:
            key = base64.b64decode(key_b64, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("KILN_SECRET_KEY must be base64 of 32 bytes") from None
        if len(key) != 32:
            raise ValueError(f"KILN_SECRET_KEY must be base64 of 32 bytes, not {len(key)}")
        self._key = key
        self._aead = AESGCM(key)

    def encrypt(self, plaintext: str, *, context: str) -> str:
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plaintext.encode(), context.encode())
        return f"{FORMAT}:{base64.b64encode(nonce + sealed).decode()}"

    def unseal(self, sealed: bytes, *, context: str) -> bytes:
        """Bytes sealed whole (backups made before they were sealed as streams): nonce, then ciphertext and tag."""
        try:
            return self._aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], context.encode())
        except InvalidTag:
            raise ValueError(f"{context} does not decrypt with this KILN_SECRET_KEY") from None

    def seal_stream(
        self, source: BinaryIO, target: BinaryIO, *, context: str, chunk_bytes: int = STREAM_CHUNK_BYTES
    ) -> None:
        """A file of any size (a backup) encrypted chunk by chunk, so that memory holds one chunk, not the file.

        The STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizár 2015): each chunk is sealed under a nonce made
        of the stream's random prefix, the chunk's number and a flag set on the last chunk only, so a chunk that is
        altered, reordered, dropped or cut off the end fails to open. The stream's key is derived from the platform
        key with a random salt and `context`; the header (salt, prefix, chunk size) is authenticated with every
        chunk."""
        salt, prefix = secrets.token_bytes(_SALT_BYTES), secrets.token_bytes(_PREFIX_BYTES)
        header = STREAM_MAGIC + salt + prefix + chunk_bytes.to_bytes(4, "big")
        aead = self._stream_key(salt, context)
        target.write(header)
        chunk, number = source.read(chunk_bytes), 0
        while True:
            following = source.read(chunk_bytes)
            target.write(aead.encrypt(_chunk_nonce(prefix, number, last=not following), chunk, header))
            if not following:
                return
            chunk, number = following, number + 1

    def unseal_stream(self, source: BinaryIO, target: BinaryIO, *, context: str) -> None:
        """Open what seal_stream wrote, chunk by chunk; ValueError at the first chunk that does not open, with
        whatever was written before it to be thrown away by the caller."""
        header = source.read(_STREAM_HEADER_BYTES)
        if len(header) != _STREAM_HEADER_BYTES or not header.startswith(STREAM_MAGIC):
            raise ValueError(f"{context} is not a sealed stream")
        salt_at = len(STREAM_MAGIC)
        salt, prefix = header[salt_at : salt_at + _SALT_BYTES], header[salt_at + _SALT_BYTES : -4]
        chunk_bytes = int.from_bytes(header[-4:], "big")
        if not 0 < chunk_bytes <= _MAX_STREAM_CHUNK_BYTES:  # what a tampered header could make it read at once
            raise ValueError(f"{context}: a chunk size of {chunk_bytes} bytes is not one seal_stream writes")
        sealed_bytes = chunk_bytes + TAG_BYTES
        aead = self._stream_key(salt, context)
        sealed, number = source.read(sealed_bytes), 0
        while True:
            following = source.read(sealed_bytes)
            try:
                target.write(aead.decrypt(_chunk_nonce(prefix, number, last=not following), sealed, header))
            except InvalidTag:
                raise ValueError(
                    f"{context}: chunk {number} does not open: altered, cut short, or sealed under another key"
                ) from None
            if not following:
                return
            sealed, number = following, number + 1

    def _stream_key(self, salt: bytes, context: str) -> AESGCM:
        derive = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=b"kiln-stream:" + context.encode())
        return AESGCM(derive.derive(self._key))

    def decrypt(self, token: str, *, context: str) -> str:
        version, _, body = token.partition(":")
        if version != FORMAT:
            raise ValueError(f"unknown secret format {version!r}")
        raw = base64.b64decode(body)
        try:
            return self._aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], context.encode()).decode()
        except InvalidTag:
            raise ValueError(f"the secret for {context} does not decrypt with this KILN_SECRET_KEY") from None


def _chunk_nonce(prefix: bytes, number: int, *, last: bool) -> bytes:
    return prefix + number.to_bytes(4, "big") + (b"\x01" if last else b"\x00")
