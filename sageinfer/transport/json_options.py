"""A JSON-object option (--kv-transfer-config, --kv-events-config): text or a dict, checked against the
fields it may have."""
from __future__ import annotations

import json


def json_object_option(value, name: str, known: set[str]) -> dict | None:
    """The option as a dict (None or "" stay None); ValueError naming the option for text that is not a
    JSON object or a field it does not have."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"{name} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object")
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"{name}: unknown field(s) {unknown}; known: {sorted(known)}")
    return value
