"""What every manifest section's parser shares: the error type and the one unknown-key check.

A leaf module, so `pipeline.manifest` can import the catalog section's parser (`stac.settings`) at its
top while `stac.settings` raises the same `ManifestError`: no import cycle between them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class ManifestError(ValueError):
    """An invalid manifest; the message names the file and the offending key."""


def check_keys(section: Any, allowed: set[str] | frozenset[str], where: str) -> None:
    """Refuse a section that is not a mapping or holds a key outside `allowed`; `where` is the
    section's dotted name ("" for the manifest's top level), so the message names the full key."""
    if not isinstance(section, Mapping):
        raise ManifestError(f"'{where}' must be a mapping, got {type(section).__name__}")
    for key in section:
        if key not in allowed:
            full = f"{where}.{key}" if where else str(key)
            raise ManifestError(f"unknown key '{full}' (known keys: {', '.join(sorted(allowed))})")
