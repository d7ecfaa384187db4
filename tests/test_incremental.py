"""Incremental builds: adding products processes only the new scenes, appends their patches without
rewriting the shards of unchanged rows, lets a reprocessed product supersede the older patch, and ends
with the same patches and pixels as a from-scratch build of all the inputs."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from pipeline import stages, tables
from pipeline.enmap.synth import ProductTruth, Truth
from pipeline.manifest import Manifest
from pipeline.scheduler import Scheduler
from pipeline.stats import BandMoments
from pipeline.storage import BuildStore
from tests.helpers import read_array, zarr_array

REPO = Path(__file__).resolve().parent.parent
SYNC = Scheduler("synchronous", progress=False)
pytestmark = pytest.mark.slow


def link_products(products: Path, truth_products: Iterable[ProductTruth], target: Path) -> None:
    target.mkdir(exist_ok=True)
    for product in truth_products:
        source, destination = products / product.path, target / product.path
        if destination.exists():
            continue
        if source.is_dir():
            shutil.copytree(source, destination, copy_function=os.link)
        else:
            os.link(source, destination)


def build_all(manifest: Manifest, store: BuildStore, inputs: Path) -> dict:
    return {
        name: stages.run_stage(name, manifest, store, SYNC, inputs=[str(inputs)]) for name in stages.ORDER
    }


def pixels_by_patch(build: Path) -> dict[str, np.ndarray]:
    store = BuildStore(str(build))
    index = store.read_geodataframe(tables.INDEX_PATCHES)
    reflectance = zarr_array(zarr.open_group(str(build / "dataset.zarr"), mode="r"), "reflectance")
    return {
        pid: np.asarray(reflectance[int(row)])
        for pid, row in zip(index["patch_id"], index["row"], strict=True)
    }


def assert_same_patches_as_a_fresh_build(manifest: Manifest, build: Path, inputs: Path, fresh: Path) -> None:
    """A from-scratch build of the same inputs has the same patch ids with the same pixels."""
    build_all(manifest, BuildStore(str(fresh)), inputs)
    incremental, scratch = pixels_by_patch(build), pixels_by_patch(fresh)
    assert incremental.keys() == scratch.keys()
    for patch_id, values in scratch.items():
        assert np.array_equal(incremental[patch_id], values), patch_id


def assert_statistics_are_the_active_rows_moments(build: Path, patches_per_shard: int) -> None:
    """Statistics of partly rewritten shards, merged from recorded and new cell sums, equal bit for bit
    the moments of each shard's active rows computed from the stored pixels, merged in shard order."""
    group = zarr.open_group(str(build / "dataset.zarr"), mode="r")
    reflectance, active_flags = zarr_array(group, "reflectance"), read_array(group, "active")
    total = BandMoments.empty(reflectance.shape[1])
    for start in range(0, reflectance.shape[0], patches_per_shard):
        stop = min(start + patches_per_shard, reflectance.shape[0])
        rows = [r for r in range(start, stop) if active_flags[r]]
        if rows:
            total = total.merge(BandMoments.of_block(np.asarray(reflectance.oindex[np.array(rows)])))
    assert np.array_equal(np.load(build / "stats" / "mean.npy"), total.valid_mean.astype(np.float32))
    assert np.array_equal(np.load(build / "stats" / "std.npy"), total.std.astype(np.float32))
    summary = json.loads((build / "stats" / "statistics.json").read_text())
    assert summary["count"] == total.count.tolist() and summary["min"] == total.minimum.tolist()


@pytest.mark.parametrize(
    ("keep_cut", "damage_sums"),
    [(True, False), (False, False), (True, True)],
    ids=["cut-kept", "cut-removed", "recorded-sums-damaged"],
)
def test_adding_products_appends_and_supersedes(
    demo_products: tuple[Path, Truth], tmp_path: Path, keep_cut: bool, damage_sums: bool
) -> None:
    products, truth = demo_products
    raw = yaml.safe_load((REPO / "manifests" / "demo.yaml").read_text())
    raw["write"] = {"patches_per_shard": 2, "compression_level": 5, "keep_cut": keep_cut}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(raw))
    manifest = Manifest.from_yaml(tmp_path / "m.yaml")

    newer = [p for p in truth.products if p.supersedes]
    assert newer, "the demo set holds a reprocessed product"
    later = [p for p in truth.products if p.site == 0 and p.date_index == 1 and not p.supersedes]
    second = {p.scene_id for p in newer + later}
    first = [p for p in truth.products if p.scene_id not in second]

    inputs = tmp_path / "inputs"
    link_products(products, first, inputs)
    build = tmp_path / "build"
    store = BuildStore(str(build))
    build_all(manifest, store, inputs)
    before_index = store.read_geodataframe(tables.INDEX_PATCHES)
    old_rows = int(json.loads((build / "index" / "lineage.json").read_text())["rows"])
    shard_files = {
        p: p.read_bytes() for p in (build / "dataset.zarr" / "reflectance" / "c").rglob("*") if p.is_file()
    }
    mtimes = {p: p.stat().st_mtime_ns for p in shard_files}

    if damage_sums:
        # Recorded per-row sums that are not those their records name: the copied rows' statistics
        # then come from their cells' sums in cut/ (same values), never from the damaged file.
        for path in (build / "write" / "sums").glob("*.json"):
            path.write_text('{"0": {"count": [1], "total": [1], "squares": [1], "min": [1], "max": [1]}}')
    link_products(products, newer + later, inputs)
    results = build_all(manifest, store, inputs)
    assert results["inventory"].counts["sources_inspected"] == len({p.path for p in newer + later})
    assert results["mask"].counts["reused"] == len(first)
    assert results["tile"].counts["scenes_planned"] == len(second)
    write = results["write"].counts
    # Only the new rows come from the encoded candidates; rewritten shards copy their other rows
    # (stored or retired) from the stored shard, so a removed cut/ never forces a re-read here.
    assert write["rows_from_cut"] == write["rows"] - old_rows, "only the new rows come from cut/"
    assert write["rows_copied"] > 0
    # Some rewritten shard keeps active rows: their statistics come from the recorded per-row sums.
    assert write["active_rows_copied"] > 0
    assert (build / "cut").exists() == keep_cut

    after_index = store.read_geodataframe(tables.INDEX_PATCHES)
    retired = store.read_geodataframe(tables.INDEX_RETIRED)
    superseded = {p.scene_id for p in truth.products if p.superseded_by}
    assert set(retired["scene_id"]) <= superseded and len(retired) > 0
    assert not superseded & set(after_index["scene_id"])
    # Rows of unchanged patches keep their place; new rows come after every old row.
    kept = before_index[~before_index["scene_id"].isin(superseded)]
    now = dict(zip(after_index["patch_id"], after_index["row"], strict=True))
    assert all(now[p] == r for p, r in zip(kept["patch_id"], kept["row"], strict=True))
    new_rows = after_index[~after_index["patch_id"].isin(kept["patch_id"])]["row"]
    assert (new_rows >= old_rows).all()
    # Shards holding only unchanged, still-active rows were not rewritten.
    records = {int(p.stem): json.loads(p.read_text()) for p in (build / "write" / "shards").glob("*.json")}
    retired_rows = set(retired["row"])
    untouched = [
        s
        for s, r in records.items()
        if r["stop_row"] <= old_rows and not retired_rows & set(range(r["first_row"], r["stop_row"]))
    ]
    assert untouched
    for shard in untouched:
        path = build / "dataset.zarr" / "reflectance" / "c" / str(shard) / "0" / "0" / "0"
        assert path.stat().st_mtime_ns == mtimes[path] and path.read_bytes() == shard_files[path]
    # Zarr knows which rows are hidden; the catalog lists exactly the index.
    active = read_array(zarr.open_group(str(build / "dataset.zarr"), mode="r"), "active")
    assert [int(r) for r in np.flatnonzero(active == 0)] == sorted(retired_rows)
    items = {json.loads(p.read_text())["id"] for p in (build / "stac").rglob("EPSG*.json")}
    assert items == set(after_index["patch_id"])

    assert_statistics_are_the_active_rows_moments(build, patches_per_shard=2)

    assert_same_patches_as_a_fresh_build(manifest, build, inputs, tmp_path / "fresh")
