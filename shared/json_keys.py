"""Keys given twice in one JSON object, refused for both HTTP services.

JSON parsers (the standard library's, orjson) keep the last value of a repeated key and say nothing: a key request
`{"role": "viewer", "role": "admin"}` would make an admin key, a V1 row `{"torque": 1, "torque": 99}` be scored as
99. Each service names the key's field as it names fields elsewhere: the predictor `rows[0].torque`, the api as
pydantic does, `config.predictions.riskBands.1`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from shared.errors import BadRequest, InvalidInput

KeyPath = tuple[str | int, ...]
"""Where a key is: the names of the objects and the indexes of the lists holding it, then the key."""


def bracketed(path: KeyPath) -> str:
    """`rows[0].torque`: list items by index in brackets."""
    field = ""
    for part in path:
        field += f"[{part}]" if isinstance(part, int) else f".{part}" if field else part
    return field


def dotted(path: KeyPath) -> str:
    """`config.predictions.riskBands.1`: every part after a dot, as pydantic's errors name a field."""
    return ".".join(str(part) for part in path)


def refuse_repeated_keys(body: bytes, keys: int, *, field_of: Callable[[KeyPath], str] = bracketed) -> None:
    """Refuses a body with a key given twice in one object, naming its field with `field_of`.

    Outside strings, a colon follows each key and nothing else; so when the body holds no more colons than `keys`,
    the keys parsed (or fewer: a count that skips some only sends the body the slow way), no key was repeated, at the
    cost of one count of a byte. Only another body (a key repeated, a string holding a colon, or any escape, since
    `\\u003a` is a colon once parsed and none before) is parsed again, keeping every key."""
    if b"\\" not in body and body.count(b":") == keys:
        return
    repeated = _first_repeated_key(body)
    if repeated is not None:
        field = field_of(repeated)
        raise InvalidInput(f"{field} is given more than once in its object", field=field)


def keys_within(values: Iterable[Any]) -> int:
    """How many keys the objects within these JSON values hold."""
    count, pending = 0, list(values)
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            count += len(value)
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
    return count


class _Pairs(list[tuple[str, Any]]):
    """A JSON object as its (key, value) pairs, every one of them, in order."""


def _first_repeated_key(body: bytes) -> KeyPath | None:
    """Where a key appears twice in one object, if any: in an object, the first to repeat one before it; outer
    objects before those they hold."""
    try:
        pending: list[tuple[KeyPath, Any]] = [((), json.loads(body, object_pairs_hook=_Pairs))]
    except RecursionError:  # deeper than the standard library's parser goes; no request of Kiln's comes near
        raise BadRequest("the request body is nested too deeply", field="body") from None
    while pending:
        path, value = pending.pop()
        if isinstance(value, _Pairs):
            repeated = _repeated(name for name, _ in value)
            if repeated is not None:
                return (*path, repeated)
            pending.extend(((*path, name), item) for name, item in reversed(value))
        elif isinstance(value, list):
            pending.extend(((*path, index), item) for index, item in reversed(list(enumerate(value))))
    return None


def _repeated(names: Iterable[str]) -> str | None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    return None
