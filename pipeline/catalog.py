"""Stage 6, `catalog`: the STAC catalog of the build (thin I/O around `stac.catalog_writer.build_catalog`)."""

from __future__ import annotations

import hashlib

from pipeline.engine import StageResult, up_to_date
from pipeline.inventory import SCENES_TABLE, read_scenes
from pipeline.manifest import Manifest
from pipeline.storage import BuildStore, StageRecord, Stopwatch
from pipeline.tables import (
    INDEX_PATCHES,
    STAC_ITEMS,
    STAC_ROOT,
    read_geodataframe_checked,
    read_table_checked,
)
from pipeline.write import SHARDS_TABLE, kept_band_axis
from stac.catalog_writer import build_catalog

STAGE = "catalog"


def _outputs_valid(store: BuildStore) -> bool:
    read_table_checked(store, STAC_ITEMS)
    root = store.read_json(STAC_ROOT)
    return isinstance(root, dict) and root.get("type") == "Catalog"


def run_catalog(manifest: Manifest, store: BuildStore, force: bool = False) -> StageResult:
    watch = Stopwatch()
    for table in (INDEX_PATCHES, SHARDS_TABLE):
        if not store.exists(table):
            raise FileNotFoundError(f"{store.uri_of(table)} is missing: run dedup and write first")
    digest = hashlib.sha256()
    for table in (INDEX_PATCHES, SCENES_TABLE, SHARDS_TABLE):
        digest.update(store.read_bytes(table))
    input_fingerprint = digest.hexdigest()[:16]
    config_hash = manifest.stage_hash(STAGE)
    done = up_to_date(store, STAGE, config_hash, input_fingerprint, lambda: _outputs_valid(store), force)
    if done:
        return done
    index = read_geodataframe_checked(store, INDEX_PATCHES)
    scenes = read_scenes(store)
    used = [r for r in scenes if r.scene_id in set(index["scene_id"])]
    summary = build_catalog(store, manifest.catalog, kept_band_axis(manifest, used, fallback=scenes))
    watch.lap("catalog")
    counts = summary.to_json()
    store.write_stage_record(StageRecord(STAGE, config_hash, input_fingerprint, counts, watch.timings))
    return StageResult(counts, skipped=False)
