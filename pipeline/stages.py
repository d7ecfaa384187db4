"""The stages in build order, by name: the one table the CLI, `run` and the demo share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.catalog import run_catalog
from pipeline.dedup import run_dedup
from pipeline.inventory import run_inventory
from pipeline.manifest import Manifest
from pipeline.mask import run_mask
from pipeline.scheduler import Scheduler
from pipeline.storage import BuildStore
from pipeline.storage_settings import apply_gdal_config, storage_options_for
from pipeline.tile import run_tile
from pipeline.write import run_write

ORDER = ("inventory", "mask", "tile", "dedup", "write", "catalog")


class StaleStageError(RuntimeError):
    """An earlier stage's outputs were made with other settings than the manifest's."""


UPSTREAM = {name: ORDER[: ORDER.index(name)] for name in ORDER}


def through(last: str) -> tuple[str, ...]:
    """The stages in order up to `last`, included."""
    return ORDER[: ORDER.index(last) + 1]


def require_upstream(name: str, manifest: Manifest, store: BuildStore) -> None:
    """Refuse to mix configurations: every earlier stage must have run with this manifest's settings."""
    for upstream in UPSTREAM[name]:
        try:
            record = store.read_stage_record(upstream)
        except ValueError:  # not JSON: never trusted
            record = None
        if not isinstance(record, dict) or "config_hash" not in record:
            raise StaleStageError(
                f"{name} needs the {upstream} stage first: run `spectralearth {upstream}` "
                "(or `spectralearth run`)"
            )
        if record["config_hash"] != manifest.stage_hash(upstream):
            raise StaleStageError(
                f"the {upstream} outputs in {store.uri} were made with other manifest settings than "
                f"{manifest.source}: rerun {upstream} and the stages after it (or `spectralearth run`)"
            )


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
    if name == "report":  # reads the finished build, writes report/index.html only
        from pipeline.html_report import write_report  # inside: the report reads ORDER from here

        return write_report(store)
    if name not in ORDER:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(ORDER)}")
    require_upstream(name, manifest, store)
    if name == "inventory":
        return run_inventory(
            manifest, store, list(inputs or manifest.inputs), scheduler, storage_options, force
        )
    if name == "mask":
        return run_mask(manifest, store, scheduler, storage_options, force)
    if name == "tile":
        return run_tile(manifest, store, scheduler, storage_options, force)
    if name == "dedup":
        return run_dedup(manifest, store, force)
    if name == "write":
        return run_write(manifest, store, scheduler, storage_options, force)
    if name == "catalog":
        return run_catalog(manifest, store, force)
    raise ValueError(f"unknown stage {name!r}; stages: {', '.join(ORDER)}")


@dataclass
class BuildContext:
    """One build: its manifest, location, scheduler and storage options, made once per command."""

    manifest: Manifest
    store: BuildStore
    scheduler: Scheduler
    storage_options: dict[str, Any]

    @classmethod
    def create(
        cls,
        manifest: Manifest,
        build: str,
        scheduler: str = "local",
        workers: int | None = None,
        progress: bool = True,
    ) -> BuildContext:
        gdal = manifest.storage.gdal_config()
        apply_gdal_config(gdal)  # the driver reads rasters too (inventory's checks on a local scheduler)
        return cls(
            manifest=manifest,
            store=BuildStore(build, storage_options_for(build, manifest.storage)),
            scheduler=Scheduler(scheduler, workers, progress).with_config(gdal),
            storage_options=manifest.storage.fsspec_options(),
        )

    def run(self, name: str, inputs: list[str] | None = None, force: bool = False) -> Any:
        return run_stage(
            name,
            self.manifest,
            self.store,
            self.scheduler,
            inputs=inputs,
            storage_options=self.storage_options,
            force=force,
        )
