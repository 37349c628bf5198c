"""Secrets at rest: AES-256-GCM under the platform key (KILN_SECRET_KEY), bound to what they belong to."""

from __future__ import annotations

import base64
import binascii
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

FORMAT = "v1"
NONCE_BYTES = 12


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
        self._aead = AESGCM(key)

    def encrypt(self, plaintext: str, *, context: str) -> str:
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plaintext.encode(), context.encode())
        return f"{FORMAT}:{base64.b64encode(nonce + sealed).decode()}"

    def seal(self, data: bytes, *, context: str) -> bytes:
        """Bytes (a backup file) encrypted and authenticated the same way: nonce, then ciphertext and tag."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, data, context.encode())

    def unseal(self, sealed: bytes, *, context: str) -> bytes:
        try:
            return self._aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], context.encode())
        except InvalidTag:
            raise ValueError(f"{context} does not decrypt with this KILN_SECRET_KEY") from None

    def decrypt(self, token: str, *, context: str) -> str:
        version, _, body = token.partition(":")
        if version != FORMAT:
            raise ValueError(f"unknown secret format {version!r}")
        raw = base64.b64decode(body)
        try:
            return self._aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], context.encode()).decode()
        except InvalidTag:
            raise ValueError(f"the secret for {context} does not decrypt with this KILN_SECRET_KEY") from None
