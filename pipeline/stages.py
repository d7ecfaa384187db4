"""The stages in build order, by name: the one table the CLI, `run` and the demo share."""

from __future__ import annotations

from typing import Any

from pipeline.manifest import Manifest
from pipeline.storage import BuildStore

ORDER = ("inventory", "mask", "tile", "dedup", "write")


def run_stage(
    name: str,
    manifest: Manifest,
    store: BuildStore,
    scheduler: Any,
    *,
    inputs: list[str] | None = None,
    storage_options: dict | None = None,
    force: bool = False,
) -> Any:
    if name == "inventory":
        from pipeline.inventory import run_inventory

        return run_inventory(
            manifest, store, list(inputs or manifest.inputs), scheduler, storage_options, force
        )
    if name == "mask":
        from pipeline.mask import run_mask

        return run_mask(manifest, store, scheduler, storage_options, force)
    if name == "tile":
        from pipeline.tile import run_tile

        return run_tile(manifest, store, scheduler, storage_options, force)
    if name == "dedup":
        from pipeline.dedup import run_dedup

        return run_dedup(manifest, store, force)
    if name == "write":
        from pipeline.write import run_write

        return run_write(manifest, store, scheduler, storage_options, force)
    raise ValueError(f"unknown stage {name!r}; stages: {', '.join(ORDER)}")
