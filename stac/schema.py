"""The JSON schema of the `spectralearth:*` fields, shipped in the package.

Its identifier is listed in `stac_extensions` of every item and collection that uses the fields. The
identifier is not fetched by anything in this project: validators are handed the packaged copy
(`packaged_schemas()`), and `spectralearth serve` also answers it at
`/schemas/spectralearth/v1.0.0/schema.json`.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

SPECTRALEARTH_SCHEMA_URI = "https://spectralearth.github.io/stac-extension/v1.0.0/schema.json"
SCHEMA_PATH = ("schemas", "spectralearth", "v1.0.0", "schema.json")


@cache
def _schema_text() -> str:
    return resources.files("stac").joinpath(*SCHEMA_PATH).read_text(encoding="utf-8")


def spectralearth_schema() -> dict[str, Any]:
    """A fresh copy of the packaged schema."""
    schema: dict[str, Any] = json.loads(_schema_text())
    return schema


def packaged_schemas() -> dict[str, dict[str, Any]]:
    """Schema URI -> schema, for every extension schema this package ships (to pre-load a validator)."""
    return {SPECTRALEARTH_SCHEMA_URI: spectralearth_schema()}
