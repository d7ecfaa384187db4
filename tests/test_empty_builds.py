"""Empty results are valid builds: no patch kept, every scene dropped at tile, and a first scene with odd but
accepted values. The real stages run through `BuildContext` (synchronous) on tiny synthetic products; then
`catalog`, `verify`, `report` and `query` work on the result (through the CLI: one line, no traceback)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
import rasterio
import zarr
from click.testing import CliRunner

from pipeline import tables
from pipeline.cli import main
from pipeline.enmap.synth import SynthConfig, generate
from pipeline.manifest import Manifest
from pipeline.query import query
from pipeline.stages import ORDER, BuildContext
from pipeline.storage import BuildStore
from pipeline.write import verify_build
from tests.helpers import read_array, zarr_array

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "manifests" / "demo.yaml"
BANDS = 30


def manifest_for(bands: int = BANDS, **max_fraction: float) -> Manifest:
    """The demo manifest for products of `bands` bands (all kept), with other quality limits if given."""
    demo = Manifest.from_yaml(DEMO)
    limits = tuple((flag, max_fraction.get(flag, limit)) for flag, limit in demo.quality.max_fraction)
    return dataclasses.replace(
        demo,
        bands=dataclasses.replace(demo.bands, expected_count=bands, drop_bands=()),
        quality=dataclasses.replace(demo.quality, max_fraction=limits),
    )


def products(out: Path, **overrides: Any) -> Path:
    config: dict[str, Any] = dict(
        seed=3,
        sites=1,
        revisits=1,
        overlapping_tiles=0,
        reprocessed=0,
        width=300,
        height=280,
        bands=BANDS,
        packagings=("folder",),
        formats=("GTiff",),
        cloud_amount=0.0,
    )
    config.update(overrides)
    generate(out, SynthConfig(**config))
    return out


def run_all(manifest: Manifest, source: Path, build: Path) -> dict[str, dict]:
    context = BuildContext.create(manifest, str(build), scheduler="synchronous", progress=False)
    return {stage: context.run(stage, inputs=[str(source)]).counts for stage in ORDER}


def cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return result.output


def assert_valid_empty_build(build: Path, manifest: Manifest) -> None:
    """What every build that kept no patch must be: empty but well-formed outputs that every reader
    accepts, and commands that report nothing found rather than fail."""
    store = BuildStore(str(build))
    for path, schema in tables.TABLES.items():
        if schema.geometry:
            frame = tables.read_geodataframe_checked(store, path)
            if path in (tables.INDEX_PATCHES, tables.INDEX_LOCATIONS, tables.INDEX_RETIRED):
                assert len(frame) == 0 and list(frame.columns) == list(schema.names), path
        else:
            table = tables.read_table_checked(store, path)
            if path in (tables.SHARDS, tables.STAC_ITEMS):
                assert table.num_rows == 0, path
    lineage = tables.read_json_checked(store, tables.INDEX_LINEAGE)
    assert lineage["rows"] == 0

    group = zarr.open_group(str(build / tables.DATASET), mode="r")
    reflectance, quality = zarr_array(group, "reflectance"), zarr_array(group, "quality")
    assert reflectance.shape[0] == 0 and reflectance.shape[2:] == (128, 128)
    assert quality.shape == (0, 128, 128)
    assert group.attrs["n_patches"] == 0
    for name in ("patch_id", "scene_id", "time", "active"):
        assert zarr_array(group, name).shape == (0,), name

    statistics = tables.read_json_checked(store, tables.STATS_SUMMARY)
    assert len(statistics["count"]) == reflectance.shape[1]
    assert all(count == 0 for count in statistics["count"])
    # A band with no valid pixel has no statistic (null), not a mean of 0.
    assert all(value is None for key in ("mean", "std", "min", "max") for value in statistics[key])

    collection_path = build / "stac" / manifest.catalog.collection_id / "collection.json"
    collection = json.loads(collection_path.read_text())
    assert collection["spectralearth:count"] == 0
    assert collection["extent"]["temporal"]["interval"] == [[None, None]]
    assert len(collection["extent"]["spatial"]["bbox"][0]) == 4

    assert verify_build(store).shards == 0
    assert cli("verify", "--build", str(build)).strip() == "verify: 0 shards, 0 bad, 0 without a record"
    assert len(query(str(build))) == 0
    assert len(query(str(build), bbox=(-180.0, -90.0, 180.0, 90.0))) == 0
    assert cli("query", "--build", str(build)).strip() == "query: 0 patch(es)"
    geojson = json.loads(cli("query", "--build", str(build), "--format", "geojson").splitlines()[0])
    assert geojson["features"] == [] and geojson["numberMatched"] == 0
    report = cli("report", "--manifest", str(DEMO), "--build", str(build), "--scheduler", "synchronous")
    assert report.strip() == f"report: {store.uri_of(tables.REPORT)}"
    assert (build / tables.REPORT).stat().st_size > 0


def test_no_patch_kept_is_a_valid_empty_build(tmp_path: Path) -> None:
    # Cloudy scenes and no cloud allowed at all: every candidate cell is dropped for cloud.
    source = products(tmp_path / "products", cloud_amount=0.3)
    manifest = manifest_for(cloud=0.0)
    counts = run_all(manifest, source, tmp_path / "build")
    assert counts["tile"]["candidates"] > 0 and counts["tile"]["kept"] == 0
    assert set(counts["tile"]["dropped_by_reason"]) == {"cloud"}
    assert counts["dedup"]["patches"] == 0 and counts["dedup"]["rows"] == 0
    assert counts["write"]["patches"] == 0 and counts["write"]["shards"] == 0
    assert counts["catalog"]["patch_items"] == 0 and counts["catalog"]["scene_items"] == 1
    assert_valid_empty_build(tmp_path / "build", manifest)


def test_an_empty_build_keeps_its_products_band_axis(tmp_path: Path) -> None:
    source = products(tmp_path / "products", cloud_amount=0.3)
    manifest = manifest_for(cloud=0.0)
    run_all(manifest, source, tmp_path / "build")
    group = zarr.open_group(str(tmp_path / "build" / tables.DATASET), mode="r")
    assert zarr_array(group, "reflectance").shape == (0, BANDS, 128, 128)
    assert read_array(group, "band").tolist() == list(range(1, BANDS + 1))
    collection = json.loads(
        (tmp_path / "build" / "stac" / manifest.catalog.collection_id / "collection.json").read_text()
    )
    assert len(collection["item_assets"]["dataset"]["bands"]) == BANDS


def _shift_rasters(folder: Path, dx: float) -> None:
    for path in folder.glob("*.TIF"):
        with rasterio.open(path, "r+") as dst:
            t = dst.transform
            dst.transform = rasterio.Affine(t.a, t.b, t.c + dx, t.d, t.e, t.f)


def test_every_scene_dropped_at_tile_is_a_valid_empty_build(tmp_path: Path) -> None:
    # Both products moved 10 m off the grid lattice: the tile stage rejects each one whole, so the
    # plan has no row at all and dedup gets an empty table.
    source = products(tmp_path / "products", revisits=2)
    for folder in source.iterdir():
        if folder.is_dir():
            _shift_rasters(folder, 10.0)
    manifest = manifest_for()
    counts = run_all(manifest, source, tmp_path / "build")
    assert counts["mask"]["masked"] == 2
    assert counts["tile"]["scenes_rejected"] == 2 and counts["tile"]["candidates"] == 0
    store = BuildStore(str(tmp_path / "build"))
    rejected = store.read_table(tables.PLAN_REJECTED).to_pylist()
    assert [r["reason"].startswith("off the grid lattice") for r in rejected] == [True, True]
    plan = tables.read_geodataframe_checked(store, tables.PLAN_PATCHES)
    assert len(plan) == 0 and list(plan.columns) == list(tables.PLAN_SCHEMA.names)
    assert str(plan["kept"].dtype) == "bool" and "datetime64" in str(plan["start_time"].dtype)
    assert counts["dedup"] | {"dropped_by_reason": None} == counts["dedup"] | {
        "scenes": 0,
        "candidates": 0,
        "kept_candidates": 0,
        "patches": 0,
        "rows": 0,
        "locations": 0,
        "dropped_by_reason": None,
    }
    index = tables.read_geodataframe_checked(store, tables.INDEX_PATCHES)
    # Typed as in a build with patches: readers may use datetime and integer operations on them.
    assert "datetime64" in str(index["start_time"].dtype) and str(index["row"].dtype) == "int64"
    assert counts["catalog"]["scene_items"] == 2
    assert_valid_empty_build(tmp_path / "build", manifest)


ODD_VALUES = {
    # element path in METADATA.XML -> a value inventory accepts but that sits at or past an edge
    "sunAzimuthAngle": "360",
    "sceneAzimuthAngle": "-12.5",
    "acrossOffNadirAngle": "-29.5",
}


def _make_first_scene_odd(source: Path) -> str:
    first = sorted(p for p in source.iterdir() if p.is_dir())[0]
    (metadata,) = first.glob("*-METADATA.XML")
    text = metadata.read_text()
    for element, value in ODD_VALUES.items():
        text = re.sub(rf"(<{element}>.*?<center unit=\"DEG\">)[^<]*", rf"\g<1>{value}", text, flags=re.S)
    text = re.sub(r"<orbitDirection>[^<]*", "<orbitDirection>sideways", text)
    text = re.sub(r"<cloudCover>[^<]*", "<cloudCover>100", text)
    metadata.write_text(text)
    return first.name


def test_a_first_scene_with_odd_values_does_not_stop_the_catalog(tmp_path: Path) -> None:
    source = products(tmp_path / "products", revisits=2, reprocessed=1)
    odd = _make_first_scene_odd(source)
    manifest = manifest_for()
    counts = run_all(manifest, source, tmp_path / "build")
    assert counts["inventory"]["scenes_accepted"] == 3, "inventory accepts the odd scene"
    assert counts["dedup"]["patches"] > 0
    store = BuildStore(str(tmp_path / "build"))
    assert counts["catalog"]["scene_items"] == 3
    assert counts["catalog"]["patch_items"] == counts["dedup"]["patches"]
    (item_path,) = (tmp_path / "build" / "stac").rglob(f"{odd}.json")
    properties = json.loads(item_path.read_text())["properties"]
    assert properties["view:sun_azimuth"] == 0.0  # 360 wraps to 0
    assert properties["view:azimuth"] == pytest.approx(347.5)
    assert "sat:orbit_state" not in properties  # not ascending or descending: left out, not invented

    # A scene table from before inventory refused non-positive FWHM (or hand-edited): the band axis comes
    # from the first scene, and one band's bad FWHM must not fail the catalog of the whole build.
    frame = store.read_geodataframe(tables.SCENES)
    first = frame["scene_id"].sort_values().index[0]
    fwhm = list(frame.at[first, "fwhm_nm"])
    fwhm[0] = -5.0
    frame.at[first, "fwhm_nm"] = fwhm
    store.write_geodataframe(tables.SCENES, frame)
    result = BuildContext.create(
        manifest, str(tmp_path / "build"), scheduler="synchronous", progress=False
    ).run("catalog", force=True)
    assert result.counts["patch_items"] == counts["dedup"]["patches"]
    collection = json.loads(
        (tmp_path / "build" / "stac" / manifest.catalog.collection_id / "collection.json").read_text()
    )
    bands = collection["item_assets"]["dataset"]["bands"]
    # (Only if the odd scene gave the band axis does band 1 lose its FWHM: this also checks it did.)
    band_one = next(b for b in bands if b["name"] == "B001")
    assert "eo:full_width_half_max" not in band_one and band_one["eo:center_wavelength"] > 0
    assert all(b["eo:full_width_half_max"] > 0 for b in bands if b["name"] != "B001")


def test_no_scene_at_all_is_a_valid_empty_build(tmp_path: Path) -> None:
    # The CLI stops after inventory when nothing is accepted; the stages themselves still make a valid,
    # empty build of it (a later run with products then extends it like any other).
    (tmp_path / "products").mkdir()
    manifest = manifest_for()
    counts = run_all(manifest, tmp_path / "products", tmp_path / "build")
    assert counts["inventory"]["scenes_accepted"] == 0
    assert counts["catalog"]["scene_items"] == 0 and counts["catalog"]["patch_items"] == 0
    scenes = json.loads(
        (tmp_path / "build" / "stac" / manifest.catalog.scene_collection_id / "collection.json").read_text()
    )
    assert scenes["spectralearth:count"] == 0
    assert scenes["extent"]["temporal"]["interval"] == [[None, None]]
    assert_valid_empty_build(tmp_path / "build", manifest)
