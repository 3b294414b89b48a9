"""The one reader from a config dict to a typed config's fields, for every config class."""
from __future__ import annotations

import dataclasses


def known_fields(config_type: type, data: dict) -> dict:
    """The entries of ``data`` that are fields of the dataclass ``config_type``; the rest (``_diffusers_version``,
    settings of other models) are ignored. JSON lists become tuples where the field is a tuple."""
    values = {}
    for f in dataclasses.fields(config_type):
        if f.name in data:
            value = data[f.name]
            if isinstance(value, list) and "tuple" in str(f.type):
                value = tuple(value)
            values[f.name] = value
    return values
