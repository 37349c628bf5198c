"""Two platform secret keys, and settings that seal under one and still read the others: for rotating
KILN_SECRET_KEY."""

from __future__ import annotations

import base64
import secrets

from pydantic import SecretStr

from shared.crypto import key_id, platform_key
from shared.settings import Settings
from tests.conftest import SECRET_KEY

KEY_A = SECRET_KEY  # what every secret below is first sealed under
KEY_B = base64.b64encode(secrets.token_bytes(32)).decode()
A, B = key_id(platform_key(KEY_A)), key_id(platform_key(KEY_B))


def keyed(settings: Settings, current: str, *retired: str) -> Settings:
    """These settings with KILN_SECRET_KEY `current` and KILN_SECRET_KEY_RETIRED `retired`."""
    return settings.model_copy(
        update={"secret_key": SecretStr(current), "secret_key_retired": SecretStr(",".join(retired))}
    )
