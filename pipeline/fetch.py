"""Few, large requests on object storage (stub; filled below)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FileSlice:
    """A byte range of a local file: a stored ZIP member, or fetched bytes that landed in scratch."""

    path: str
    offset: int
    size: int
