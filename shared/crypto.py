"""Secrets at rest: AES-256-GCM under the platform key (KILN_SECRET_KEY), bound to what they belong to.

The platform key can be rotated: KILN_SECRET_KEY is the key everything is sealed under, and the keys it replaced
stay readable while listed in KILN_SECRET_KEY_RETIRED. A token (`v2:<key id>:...`) and a sealed stream's header name
the key they were sealed under by its key id, a fingerprint that reveals nothing of the key; what was sealed before
they did (`v1:` tokens, `kiln-stream-v1` streams, backups sealed whole) names no key, and opens under the first
configured key that opens it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shared.errors import SecretUnreadable

if TYPE_CHECKING:
    from shared.settings import Settings

# Tokens: `v1:<base64>` (before tokens named their key) and `v2:<key id>:<base64>`, of nonce, ciphertext and tag.
FORMAT = "v1"
KEYED_FORMAT = "v2"
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_ID_BYTES = 6
STREAM_MAGIC = b"kiln-stream-v1\n"
KEYED_STREAM_MAGIC = b"kiln-stream-v2\n"  # the same length as STREAM_MAGIC, followed by the key id
STREAM_CHUNK_BYTES = 1024 * 1024
_MAX_STREAM_CHUNK_BYTES = 64 * 1024 * 1024
_SALT_BYTES = 16
_PREFIX_BYTES = 7  # with a 4-byte chunk counter and a 1-byte last-chunk flag: the 12-byte GCM nonce
_STREAM_PARAMETERS_BYTES = _SALT_BYTES + _PREFIX_BYTES + 4
_NOT_CONFIGURED = "which is not configured: neither KILN_SECRET_KEY nor KILN_SECRET_KEY_RETIRED holds it"
_NO_KEY_OPENS = "under KILN_SECRET_KEY or any key of KILN_SECRET_KEY_RETIRED"


def platform_key(key_b64: str, *, variable: str = "") -> bytes:
    """The 32 bytes a platform key's base64 holds; ValueError naming `variable` (when given), never quoting the
    value."""
    named = f"{variable} " if variable else ""
    try:
        key = base64.b64decode(key_b64, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{named}must be base64 of 32 bytes") from None
    if len(key) != 32:
        raise ValueError(f"{named}must be base64 of 32 bytes, not {len(key)}")
    return key


def key_id(key: bytes) -> str:
    """A platform key's fingerprint, 12 hex digits: an HMAC under the key itself, so it tells nothing about it."""
    return hmac.new(key, b"kiln-platform-key-id", hashlib.sha256).hexdigest()[: 2 * KEY_ID_BYTES]


def token_key_id(token: str) -> str | None:
    """The key id a token names; None for a `v1:` token, which names none."""
    version, _, rest = token.partition(":")
    return rest.partition(":")[0] if version == KEYED_FORMAT else None


@dataclass(frozen=True)
class _PlatformKey:
    id: str
    material: bytes
    aead: AESGCM

    @classmethod
    def of(cls, key_b64: str, *, variable: str) -> _PlatformKey:
        material = platform_key(key_b64, variable=variable)
        return cls(id=key_id(material), material=material, aead=AESGCM(material))


@dataclass(frozen=True)
class _StreamHeader:
    raw: bytes  # authenticated with every chunk
    key_id: str | None
    salt: bytes
    prefix: bytes
    chunk_bytes: int


class SecretBox:
    """Encrypts short secrets such as database passwords. `context` (e.g. "datasource:acme") is authenticated
    with the ciphertext, so a secret copied onto another org's row does not decrypt there.

    Seals under the current key; opens under the current key or a retired one."""

    def __init__(self, key_b64: str, *, retired: tuple[str, ...] = ()) -> None:
        self._current = _PlatformKey.of(key_b64, variable="KILN_SECRET_KEY")
        self._keys = {self._current.id: self._current}
        for key in retired:
            retired_key = _PlatformKey.of(key, variable="KILN_SECRET_KEY_RETIRED")
            self._keys.setdefault(retired_key.id, retired_key)

    @classmethod
    def from_settings(cls, settings: Settings) -> SecretBox:
        """The one place a process's SecretBox is made: from KILN_SECRET_KEY and KILN_SECRET_KEY_RETIRED."""
        return cls(settings.secret_key.get_secret_value(), retired=settings.retired_secret_keys)

    @property
    def current_id(self) -> str:
        return self._current.id

    @property
    def retired_ids(self) -> tuple[str, ...]:
        return tuple(key for key in self._keys if key != self._current.id)

    def without_retired(self) -> SecretBox:
        """This box with the current key alone: what opens under it will open once the retired keys are gone."""
        return SecretBox(base64.b64encode(self._current.material).decode())

    def is_current(self, token: str) -> bool:
        return token_key_id(token) == self._current.id

    def encrypt(self, plaintext: str, *, context: str) -> str:
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = self._current.aead.encrypt(nonce, plaintext.encode(), context.encode())
        return f"{KEYED_FORMAT}:{self._current.id}:{base64.b64encode(nonce + sealed).decode()}"

    def decrypt(self, token: str, *, context: str) -> str:
        version, _, rest = token.partition(":")
        what = f"the secret for {context}"
        if version == KEYED_FORMAT:
            named, _, body = rest.partition(":")
            key = self._named(named, what=what)
            raw = base64.b64decode(body)
            try:
                return key.aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], context.encode()).decode()
            except InvalidTag:
                raise SecretUnreadable(
                    f"{what} does not decrypt under platform key {named}: altered, or not its own"
                ) from None
        if version != FORMAT:
            raise SecretUnreadable(f"{what}: unknown secret format {version!r}")
        return self.unseal(base64.b64decode(rest), context=context, what=what).decode()

    def unseal(self, sealed: bytes, *, context: str, what: str = "") -> bytes:
        """Bytes sealed without a key id (backups sealed whole, `v1:` tokens): nonce, then ciphertext and tag,
        opened under the first configured key that opens them."""
        if len(sealed) < NONCE_BYTES + TAG_BYTES:  # AES-GCM would refuse the short nonce with a ValueError
            raise SecretUnreadable(f"{what or context} is {len(sealed)} bytes: too short to be sealed, cut off")
        for key in self._keys.values():
            try:
                return key.aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], context.encode())
            except InvalidTag:
                continue
        raise SecretUnreadable(
            f"{what or context} does not decrypt {_NO_KEY_OPENS}: sealed under a key no longer configured, or altered"
        )

    def seal_stream(
        self, source: BinaryIO, target: BinaryIO, *, context: str, chunk_bytes: int = STREAM_CHUNK_BYTES
    ) -> None:
        """A file of any size (a backup) encrypted chunk by chunk, so that memory holds one chunk, not the file.

        The STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizár 2015): each chunk is sealed under a nonce made
        of the stream's random prefix, the chunk's number and a flag set on the last chunk only, so a chunk that is
        altered, reordered, dropped or cut off the end fails to open. The stream's key is derived from the current
        platform key with a random salt and `context`; the header (the key's id, salt, prefix, chunk size) is
        authenticated with every chunk."""
        salt, prefix = secrets.token_bytes(_SALT_BYTES), secrets.token_bytes(_PREFIX_BYTES)
        key_id_bytes = bytes.fromhex(self._current.id)
        header = KEYED_STREAM_MAGIC + key_id_bytes + salt + prefix + chunk_bytes.to_bytes(4, "big")
        aead = _stream_key(self._current, salt, context)
        target.write(header)
        chunk, number = source.read(chunk_bytes), 0
        while True:
            following = source.read(chunk_bytes)
            target.write(aead.encrypt(_chunk_nonce(prefix, number, last=not following), chunk, header))
            if not following:
                return
            chunk, number = following, number + 1

    def unseal_stream(self, source: BinaryIO, target: BinaryIO, *, context: str) -> None:
        """Open what seal_stream wrote, chunk by chunk; SecretUnreadable at the first chunk that does not open, with
        whatever was written before it to be thrown away by the caller."""
        for chunk in self.unsealed_chunks(source, context=context):
            target.write(chunk)

    def unsealed_chunks(self, source: BinaryIO, *, context: str) -> Iterator[bytes]:
        """What seal_stream wrote, opened one chunk at a time, for a caller that passes it on without writing it
        anywhere (a rewrap seals it again); SecretUnreadable at the first chunk that does not open."""
        header = _read_stream_header(source, context)
        aead: AESGCM | None = None
        for number, sealed, last in _sealed_chunks(source, header.chunk_bytes + TAG_BYTES):
            nonce = _chunk_nonce(header.prefix, number, last=last)
            if aead is None:
                aead = self._stream_opener(header, context, nonce, sealed)
            try:
                yield aead.decrypt(nonce, sealed, header.raw)
            except InvalidTag:
                raise SecretUnreadable(
                    f"{context}: chunk {number} does not open: altered, cut short, or sealed under another key"
                ) from None

    def _stream_opener(self, header: _StreamHeader, context: str, nonce: bytes, first_chunk: bytes) -> AESGCM:
        """The stream's key: the one its header names, or, for a stream sealed before headers named one, the
        configured key that opens its first chunk."""
        if header.key_id is not None:
            return _stream_key(self._named(header.key_id, what=context), header.salt, context)
        for key in self._keys.values():
            aead = _stream_key(key, header.salt, context)
            try:
                aead.decrypt(nonce, first_chunk, header.raw)
            except InvalidTag:
                continue
            return aead
        raise SecretUnreadable(
            f"{context}: chunk 0 does not open {_NO_KEY_OPENS}: altered, cut short, or sealed under a key no longer "
            "configured"
        )

    def _named(self, named: str, *, what: str) -> _PlatformKey:
        key = self._keys.get(named)
        if key is None:
            raise SecretUnreadable(f"{what} was sealed under platform key {named}, {_NOT_CONFIGURED}")
        return key


def _stream_key(key: _PlatformKey, salt: bytes, context: str) -> AESGCM:
    derive = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=b"kiln-stream:" + context.encode())
    return AESGCM(derive.derive(key.material))


def is_sealed_stream(head: bytes) -> bool:
    """Whether bytes start as seal_stream's output (of this Kiln or an earlier one) rather than bytes sealed whole."""
    return head.startswith((STREAM_MAGIC, KEYED_STREAM_MAGIC))


def _read_stream_header(source: BinaryIO, context: str) -> _StreamHeader:
    magic = source.read(len(STREAM_MAGIC))
    if magic not in {STREAM_MAGIC, KEYED_STREAM_MAGIC}:
        raise SecretUnreadable(f"{context} is not a sealed stream")
    named = source.read(KEY_ID_BYTES) if magic == KEYED_STREAM_MAGIC else b""
    parameters = source.read(_STREAM_PARAMETERS_BYTES)
    if len(parameters) != _STREAM_PARAMETERS_BYTES or (magic == KEYED_STREAM_MAGIC and len(named) != KEY_ID_BYTES):
        raise SecretUnreadable(f"{context} is not a sealed stream")
    chunk_bytes = int.from_bytes(parameters[-4:], "big")
    if not 0 < chunk_bytes <= _MAX_STREAM_CHUNK_BYTES:  # what a tampered header could make it read at once
        raise SecretUnreadable(f"{context}: a chunk size of {chunk_bytes} bytes is not one seal_stream writes")
    return _StreamHeader(
        raw=magic + named + parameters,
        key_id=named.hex() if named else None,
        salt=parameters[:_SALT_BYTES],
        prefix=parameters[_SALT_BYTES:-4],
        chunk_bytes=chunk_bytes,
    )


def _sealed_chunks(source: BinaryIO, sealed_bytes: int) -> Iterator[tuple[int, bytes, bool]]:
    """Each sealed chunk with its number and whether it is the last: one read ahead, to know."""
    sealed, number = source.read(sealed_bytes), 0
    while True:
        following = source.read(sealed_bytes)
        yield number, sealed, not following
        if not following:
            return
        sealed, number = following, number + 1


def _chunk_nonce(prefix: bytes, number: int, *, last: bool) -> bytes:
    return prefix + number.to_bytes(4, "big") + (b"\x01" if last else b"\x00")
