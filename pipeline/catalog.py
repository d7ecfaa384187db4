"""Stage 6, `catalog`: the STAC catalog of the build (thin I/O around `stac.catalog.build_catalog`)."""

from __future__ import annotations

import hashlib
from typing import Any

from pipeline.manifest import Manifest
from pipeline.storage import BuildStore, StageRecord, Stopwatch

STAGE = "catalog"


def run_catalog(manifest: Manifest, store: BuildStore, force: bool = False) -> Any:
    from pipeline.dedup import INDEX_PATCHES
    from pipeline.inventory import SCENES_TABLE
    from pipeline.mask import StageResult, read_scenes
    from pipeline.write import SHARDS_TABLE, kept_band_axis
    from stac.catalog import build_catalog

    watch = Stopwatch()
    for table in (INDEX_PATCHES, SHARDS_TABLE):
        if not store.exists(table):
            raise FileNotFoundError(f"{store.uri_of(table)} is missing: run dedup and write first")
    digest = hashlib.sha256()
    for table in (INDEX_PATCHES, SCENES_TABLE, SHARDS_TABLE):
        digest.update(store.read_bytes(table))
    input_fingerprint = digest.hexdigest()[:16]
    config_hash = manifest.stage_hash(STAGE)
    done = store.up_to_date(
        STAGE, config_hash, input_fingerprint, ("stac/catalog.json", "stac/items.parquet"), force
    )
    if done:
        return StageResult(done["counts"], skipped=True)
    index = store.read_geodataframe(INDEX_PATCHES)
    used = [r for r in read_scenes(store) if r.scene_id in set(index["scene_id"])]
    summary = build_catalog(store, manifest.catalog, kept_band_axis(manifest, used))
    watch.lap("catalog")
    counts = summary.to_json()
    store.write_stage_record(StageRecord(STAGE, config_hash, input_fingerprint, counts, watch.timings))
    return StageResult(counts, skipped=False)
