"""End to end on synthetic products in every packaging and format: mask, tile, dedup and write,
checked against the generator's truth and against an independent reading of the source products."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import zarr
from rasterio.windows import Window

from pipeline import stages, tables
from pipeline.demo import compare, expected_from_truth, observed
from pipeline.enmap.synth import Truth
from pipeline.manifest import Manifest
from pipeline.quality import BACKGROUND, CLOUD, CLOUD_SHADOW, NODATA, WATER
from pipeline.scheduler import Scheduler
from pipeline.storage import BuildStore
from tests.conftest import copy_build
from tests.helpers import read_array, spectral_gdal_path, zarr_array

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def build(
    demo_products: tuple[Path, Truth], demo_build: BuildStore, demo_manifest: Manifest
) -> tuple[Path, Truth, BuildStore, Manifest]:
    """The session's demo build (inventory to catalog on two threads; read-only: copy it to change it)."""
    products, truth = demo_products
    return products, truth, demo_build, demo_manifest


def test_build_matches_truth(build: tuple[Path, Truth, BuildStore, Manifest]) -> None:
    _, truth, store, manifest = build
    rows = compare(expected_from_truth(truth, manifest), observed(store))
    assert all(ok for *_, ok in rows), rows
    # The demo set is built to contain what dedup must find.
    got = observed(store)
    assert got.duplicates >= 1 and got.multi_date_locations >= 1


def test_mask_bits_follow_the_quality_layers(build: tuple[Path, Truth, BuildStore, Manifest]) -> None:
    products, truth, store, _ = build
    from pipeline.mask import read_mask

    folder_products = [p for p in truth.products if p.packaging == "folder" and p.format == "GTiff"]
    for product in folder_products:
        bits = read_mask(store, product.scene_id)
        folder = products / product.path

        def layer(name: str, folder: Path = folder) -> np.ndarray:
            (path,) = folder.glob(f"*-{name}.TIF")
            with rasterio.open(path) as src:
                return src.read(1)

        assert np.array_equal((bits & CLOUD) != 0, layer("QL_QUALITY_CLOUD") == 1)
        assert np.array_equal((bits & CLOUD_SHADOW) != 0, layer("QL_QUALITY_CLOUDSHADOW") == 1)
        classes = layer("QL_QUALITY_CLASSES")
        assert np.array_equal((bits & BACKGROUND) != 0, classes == 3)
        assert np.array_equal((bits & WATER) != 0, classes == 2)
        # Nodata is where any kept band is -32768: outside the footprint here, never inside it.
        assert np.array_equal((bits & NODATA) != 0, classes == 3)


def test_kept_patches_respect_the_rules(build: tuple[Path, Truth, BuildStore, Manifest]) -> None:
    products, truth, store, manifest = build
    plan = store.read_geodataframe(tables.PLAN_PATCHES)
    kept = plan[plan["kept"]]
    limits = manifest.quality.limits()
    for flag, limit in limits.items():
        assert (kept[f"{flag}_fraction"] <= limit).all(), flag
    dropped = plan[~plan["kept"]]
    assert dropped["reason"].notna().all() and kept["reason"].isna().all()
    assert set(dropped["reason"].str.split(":").str[0]) <= {*limits, "empty kept band"}


def test_same_location_same_grid_on_every_date(build: tuple[Path, Truth, BuildStore, Manifest]) -> None:
    _, _, store, _ = build
    patches = store.read_geodataframe(tables.INDEX_PATCHES)
    for _, group in patches.groupby("location_id"):
        assert group["x_ul"].nunique() == 1 and group["y_ul"].nunique() == 1
        assert group["epsg"].nunique() == 1
        assert all(g.equals_exact(group.geometry.iloc[0], 0) for g in group.geometry)
    multi = patches[patches["n_dates"] > 1]
    assert len(multi) >= 2


def test_patch_ids_and_duplicates(build: tuple[Path, Truth, BuildStore, Manifest]) -> None:
    _, truth, store, _ = build
    patches = store.read_geodataframe(tables.INDEX_PATCHES)
    assert patches["patch_id"].is_unique
    assert list(patches["row"]) == list(range(len(patches)))
    groups = [set(d["scene_ids"]) for d in truth.duplicates]
    for row in patches.itertuples():
        assert row.patch_id.startswith(row.location_id + "_")
        assert row.patch_id.endswith(f"_DT{row.datatake_id}")
        for duplicate in row.duplicates:
            assert any({duplicate, row.scene_id} <= g for g in groups)
    # The reprocessed (newer) version wins over the original.
    superseded = {p.scene_id for p in truth.products if p.superseded_by}
    assert not superseded & set(patches["scene_id"])


def test_locations_table(build: tuple[Path, Truth, BuildStore, Manifest]) -> None:
    _, _, store, _ = build
    locations = store.read_geodataframe(tables.INDEX_LOCATIONS)
    patches = store.read_geodataframe(tables.INDEX_PATCHES)
    assert sorted(locations["location_id"]) == sorted(set(patches["location_id"]))
    for row in locations.itertuples():
        mine = patches[patches["location_id"] == row.location_id]
        assert sorted(row.patch_ids) == sorted(mine["patch_id"])
        assert row.n_dates == mine["acquisition_date"].nunique()


def test_every_stored_patch_equals_the_source(
    build: tuple[Path, Truth, BuildStore, Manifest], tmp_path: Path
) -> None:
    """Bit-exactness: each patch read back from dataset.zarr equals the kept bands of its source
    product at the window computed here from epsg, x_ul and y_ul alone (rasterio, not pipeline code)."""
    products, truth, store, _ = build
    group = zarr.open_group(str(Path(store.root) / "dataset.zarr"), mode="r")
    reflectance = read_array(group, "reflectance")
    quality = read_array(group, "quality")
    scene_ids = read_array(group, "scene_id")
    epsg, x_ul, y_ul = read_array(group, "epsg"), read_array(group, "x_ul"), read_array(group, "y_ul")
    bands = [int(b) for b in read_array(group, "band")]
    assert len(bands) == 202 and reflectance.shape[1:] == (202, 128, 128)
    from pipeline.mask import read_mask

    for row, scene_id in enumerate(scene_ids):
        product = truth.product(str(scene_id))
        path = spectral_gdal_path(products, product, tmp_path)
        with rasterio.open(path) as src:
            assert src.crs.to_epsg() == int(epsg[row])
            col = (x_ul[row] - src.transform.c) / 30.0
            line = (src.transform.f - y_ul[row]) / 30.0
            assert col == int(col) and line == int(line)
            window = Window(int(col), int(line), 128, 128)
            source = src.read(bands, window=window)
        assert np.array_equal(reflectance[row], source), f"row {row} ({scene_id}) differs from its source"
        assert (source != -32768).all()
        bits = read_mask(store, str(scene_id))[int(line) : int(line) + 128, int(col) : int(col) + 128]
        assert np.array_equal(quality[row], bits)


def test_zarr_layout(build: tuple[Path, Truth, BuildStore, Manifest]) -> None:
    _, _, store, manifest = build
    root = Path(store.root) / "dataset.zarr"
    meta = json.loads((root / "reflectance" / "zarr.json").read_text())
    assert meta["zarr_format"] == 3 and meta["data_type"] == "int16" and meta["fill_value"] == -32768
    assert meta["dimension_names"] == ["patch", "band", "y", "x"]
    (sharding,) = meta["codecs"]
    assert sharding["name"] == "sharding_indexed"
    per_shard = manifest.write.patches_per_shard
    assert per_shard >= 2
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [per_shard, 202, 128, 128]
    assert sharding["configuration"]["chunk_shape"] == [1, 202, 128, 128]
    blosc = [c for c in sharding["configuration"]["codecs"] if c["name"] == "blosc"]
    assert blosc and blosc[0]["configuration"]["cname"] == "zstd"
    assert blosc[0]["configuration"]["shuffle"] == "bitshuffle"
    quality_meta = json.loads((root / "quality" / "zarr.json").read_text())
    assert quality_meta["data_type"] == "uint16" and quality_meta["dimension_names"] == ["patch", "y", "x"]


def test_xarray_opens_one_dataset(build: tuple[Path, Truth, BuildStore, Manifest]) -> None:
    import xarray as xr

    _, _, store, _ = build
    path = str(Path(store.root) / "dataset.zarr")
    ds = xr.open_zarr(path)
    assert set(ds.data_vars) == {"reflectance", "quality"}
    assert {"patch_id", "time", "wavelength", "epsg", "x_ul", "y_ul"} <= set(ds.coords)
    assert ds["reflectance"].dtype.kind == "f"
    assert np.issubdtype(ds["time"].dtype, np.datetime64)
    raw = xr.open_zarr(path, mask_and_scale=False)
    stored = raw["reflectance"].isel(patch=0).values
    assert raw["reflectance"].dtype == np.int16
    assert np.allclose(ds["reflectance"].isel(patch=0).values, stored * 0.0001)


def test_write_opens_no_product_and_assembles_the_shards_zarr_writes(
    build: tuple[Path, Truth, BuildStore, Manifest], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`write` assembles every shard from the chunks encoded when the cube was read: it opens no
    product, and each shard object is byte-identical to the one zarr-python writes for the same rows
    into an identically created array; zarr-python and TensorStore read the dataset back."""
    import dataclasses
    import shutil

    import tensorstore as ts

    import pipeline.enmap.product
    import pipeline.inventory
    import pipeline.mask
    from pipeline.write import ensure_arrays, kept_band_axis, layout_key, shard_key

    _, _, store, manifest = build
    copy = tmp_path / "build"
    shutil.copytree(store.root, copy)
    # Two patches per shard: many shards, each a mix of scenes, the last one partial when odd.
    small = dataclasses.replace(manifest, write=dataclasses.replace(manifest.write, patches_per_shard=2))

    def no_product(*args: object, **kwargs: object) -> None:
        raise AssertionError("write opened a source product")

    monkeypatch.setattr(pipeline.enmap.product, "open_product", no_product)
    monkeypatch.setattr(pipeline.mask, "open_product", no_product)
    monkeypatch.setattr(rasterio, "open", no_product)
    copied = BuildStore(str(copy))
    result = stages.run_stage("write", small, copied, Scheduler("synchronous", progress=False), force=True)
    monkeypatch.undo()

    index = copied.read_geodataframe(tables.INDEX_PATCHES)
    shards = (len(index) + 1) // 2
    assert result.counts["shards"] == result.counts["shards_written"] == shards > 2
    assert result.counts["rows_from_cut"] == len(index) and result.counts["rows_copied"] == 0
    assert not (copy / "write" / "staging").exists(), "no raw staging any more"
    # The same dataset whatever the shard size.
    original = zarr.open_group(str(Path(store.root) / "dataset.zarr"), mode="r")
    rewritten = zarr.open_group(str(copy / "dataset.zarr"), mode="r")
    values = {name: read_array(rewritten, name) for name in ("reflectance", "quality")}
    for name in ("reflectance", "quality"):
        assert np.array_equal(read_array(original, name), values[name])
    # zarr-python writes the same values into identically created arrays: the same bytes per shard.
    reference = BuildStore(str(tmp_path / "reference"))
    records = {r.scene_id: r for r in pipeline.inventory.read_scenes(copied)}
    bands = kept_band_axis(small, [records[s] for s in sorted(set(index["scene_id"]))])
    ensure_arrays(reference, small, len(index), bands, layout_key(small, bands, "reference"))
    group = zarr.open_group(str(tmp_path / "reference" / "dataset.zarr"), mode="r+")
    with zarr.config.set({"array.write_empty_chunks": True}):
        for name in ("reflectance", "quality"):
            zarr_array(group, name)[:] = values[name]
    for shard in range(shards):
        for name, ndim in (("reflectance", 4), ("quality", 3)):
            key = shard_key(name, shard, ndim)
            assert copied.read_bytes(key) == reference.read_bytes(key), f"{key} differs from zarr's"
    # TensorStore reads the assembled arrays too.
    for name in ("reflectance", "quality"):
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(copy / "dataset.zarr" / name)}}
        assert np.array_equal(ts.open(spec, read=True).result().read().result(), values[name])


def test_mask_reads_every_cube_row_once(
    build: tuple[Path, Truth, BuildStore, Manifest], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The build's one read of a cube: the mask pass reads each row of the kept bands exactly once."""
    import pipeline.cut
    import pipeline.enmap.cube_reader
    import pipeline.inventory
    import pipeline.mask

    products, _, store, manifest = build
    reads: dict[str, list[tuple[int, int]]] = {}
    real_read = pipeline.enmap.cube_reader.CubeReader.read

    def recording_read(self: pipeline.enmap.cube_reader.CubeReader, window: Window) -> np.ndarray:
        if "SPECTRAL_IMAGE" in self.path:  # the cube (QL_PIXELMASK goes through the same reader)
            reads.setdefault(self.path, []).append((int(window.row_off), int(window.row_off + window.height)))
        return real_read(self, window)

    monkeypatch.setattr(pipeline.enmap.cube_reader.CubeReader, "read", recording_read)
    fresh = BuildStore(str(tmp_path / "fresh"))
    scheduler = Scheduler("synchronous", progress=False)
    for name in ("inventory", "mask"):
        stages.run_stage(name, manifest, fresh, scheduler, inputs=[str(products)])
    scenes = pipeline.inventory.read_scenes(fresh)
    assert len(reads) == len(scenes)
    heights = sorted(r.height for r in scenes)
    for spans in reads.values():
        rows = [row for first, stop in spans for row in range(first, stop)]
        assert len(rows) == len(set(rows)), "a cube row was read twice"
        assert sorted(rows) == list(range(len(rows))) and len(rows) in heights
    # The candidates it encoded are those tile keeps, and they equal the original build's cut.
    plan = store.read_geodataframe(tables.PLAN_PATCHES)
    for record in scenes:
        key = pipeline.mask.scene_key(record, manifest)
        cut = pipeline.cut.read_cut_index(fresh, record.scene_id, key)
        assert cut is not None
        kept = plan[(plan["scene_id"] == record.scene_id) & plan["kept"]]
        assert sorted(cut.cells) == sorted(kept["location_id"])
        assert (fresh.read_bytes(pipeline.cut.cut_bin_path(record.scene_id, key))) == store.read_bytes(
            pipeline.cut.cut_bin_path(record.scene_id, key)
        )


def test_band_statistics_equal_numpy_over_the_whole_array(
    build: tuple[Path, Truth, BuildStore, Manifest],
) -> None:
    _, _, store, _ = build
    group = zarr.open_group(str(Path(store.root) / "dataset.zarr"), mode="r")
    cube = read_array(group, "reflectance").astype(np.float64)
    valid = cube != -32768
    values = np.where(valid, cube, np.nan)
    mean = np.nanmean(values, axis=(0, 2, 3))
    std = np.nanstd(values, axis=(0, 2, 3))
    stored_mean = np.load(Path(store.root) / "stats" / "mean.npy")
    stored_std = np.load(Path(store.root) / "stats" / "std.npy")
    assert stored_mean.dtype == np.float32 and stored_mean.shape == (202,)
    assert np.allclose(stored_mean, mean, rtol=1e-6) and np.allclose(stored_std, std, rtol=1e-5)
    summary = json.loads((Path(store.root) / "stats" / "statistics.json").read_text())
    assert summary["count"] == valid.sum(axis=(0, 2, 3)).tolist()
    assert summary["min"] == np.nanmin(values, axis=(0, 2, 3)).tolist()
    assert summary["max"] == np.nanmax(values, axis=(0, 2, 3)).tolist()
    band_statistics = zarr_array(group, "reflectance").attrs["band_statistics"]
    assert isinstance(band_statistics, dict)
    assert np.allclose(band_statistics["mean"], mean)


def test_moment_merge_is_exact_and_order_independent() -> None:
    from pipeline.stats import BandMoments

    rng = np.random.default_rng(0)
    cubes = rng.integers(-200, 12000, size=(7, 3, 8, 8)).astype(np.int16)
    cubes[2, 1, :4] = -32768
    parts = [BandMoments.of_block(cubes[k : k + 2]) for k in range(0, 7, 2)]
    forward = parts[0]
    for part in parts[1:]:
        forward = forward.merge(part)
    backward = parts[-1]
    for part in reversed(parts[:-1]):
        backward = backward.merge(part)
    values = np.where(cubes == -32768, np.nan, cubes.astype(np.float64))
    for moments in (forward, backward):
        assert np.allclose(moments.mean, np.nanmean(values, axis=(0, 2, 3)), rtol=1e-12)
        assert np.allclose(moments.std, np.nanstd(values, axis=(0, 2, 3)), rtol=1e-12)
        assert moments.count.tolist() == (~np.isnan(values)).sum(axis=(0, 2, 3)).tolist()


# Catalog and query on the built dataset ---------------------------------------------------------------


def test_catalog_validates_offline(
    build: tuple[Path, Truth, BuildStore, Manifest], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.stac_helpers import SCHEMAS, block_network, json_files, offline_validator, validate

    if not SCHEMAS.is_dir():
        pytest.skip(f"STAC extension schemas not found at {SCHEMAS} (../shared sits beside the clone in CI)")
    block_network(monkeypatch)
    _, _, store, _ = build
    validator = offline_validator(SCHEMAS)
    files = list(json_files(Path(store.root) / "stac"))
    patches = store.read_geodataframe(tables.INDEX_PATCHES)
    items = [json.loads(f.read_text()) for f in files if f.name.startswith("EPSG")]
    assert sorted(i["id"] for i in items) == sorted(patches["patch_id"])
    for path in files:
        assert path.stat().st_size < 1_000_000
        validate(validator, json.loads(path.read_text()))
    by_id = {i["id"]: i for i in items}
    for row in patches.itertuples():
        item = by_id[row.patch_id]
        assert item["properties"]["grid:code"] == row.location_id
        assert item["properties"]["proj:code"] == f"EPSG:{row.epsg}"
        assert item["properties"]["spectralearth:row"] == row.row
        assert any(link["rel"] == "derived_from" for link in item["links"])


def test_query_matches_brute_force_and_exports(
    build: tuple[Path, Truth, BuildStore, Manifest], tmp_path: Path
) -> None:
    import xarray as xr
    from shapely.geometry import box, shape

    from pipeline.query import query

    _, _, store, _ = build
    patches = store.read_geodataframe(tables.INDEX_PATCHES)
    west, south, east, north = patches.total_bounds
    half = box(west, south, (west + east) / 2, north)
    result = query(store.uri, bbox=half.bounds)
    items = [json.loads(p.read_text()) for p in (Path(store.root) / "stac").rglob("EPSG*.json")]
    expected = {i["id"] for i in items if shape(i["geometry"]).intersects(half)}
    assert set(result.ids) == expected and 0 < len(expected) < len(items)

    multi = query(store.uri, min_dates=2)
    assert set(multi.ids) == set(patches.loc[patches["n_dates"] >= 2, "patch_id"])

    ds = multi.to_xarray()
    assert list(ds["patch_id"].values) == multi.ids

    exported = tmp_path / "subset.zarr"
    assert multi.export_zarr(str(exported)) == len(multi)
    subset = xr.open_zarr(exported, mask_and_scale=False)
    assert np.array_equal(
        subset["reflectance"].values, multi.to_xarray(mask_and_scale=False)["reflectance"].values
    )
    assert list(subset["patch_id"].values) == multi.ids

    tifs = multi.export_geotiffs(tmp_path / "release")
    assert len(tifs) == len(multi)
    locations = sorted(set(patches["location_id"]))
    scenes = sorted(set(patches["scene_id"]))
    for patch_id, path in zip(multi.ids, tifs, strict=True):
        row = patches[patches["patch_id"] == patch_id].iloc[0]
        number = locations.index(row["location_id"])
        assert path.relative_to(tmp_path / "release").as_posix() == (
            f"enmap/{number:07d}/{scenes.index(row['scene_id']):05d}.tif"
        )
        with rasterio.open(path) as src:
            assert (src.count, src.width, src.height, src.dtypes[0]) == (202, 128, 128, "int16")
            assert src.nodata == -32768 and src.crs.to_epsg() == row["epsg"]
            assert (src.transform.c, src.transform.f) == (row["x_ul"], row["y_ul"])
            stored = multi.to_xarray(mask_and_scale=False)["reflectance"].values[multi.ids.index(patch_id)]
            assert np.array_equal(src.read(), stored)


def test_query_cli(build: tuple[Path, Truth, BuildStore, Manifest], tmp_path: Path) -> None:
    from click.testing import CliRunner

    from pipeline.cli import main

    _, _, store, _ = build
    runner = CliRunner()
    result = runner.invoke(main, ["query", "--build", store.uri, "--min-dates", "2", "--format", "geojson"])
    assert result.exit_code == 0, result.output
    collection = json.loads(result.stdout)
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) >= 2
    bad = runner.invoke(
        main,
        [
            "query",
            "--build",
            store.uri,
            "--ids",
            "EPSG32632-9999-9999_20230101_DT0000000001",
            "--export",
            str(tmp_path / "x.zarr"),
        ],
    )
    assert bad.exit_code == 0 and "0 patch(es)" in bad.output


def test_report_split_and_query_by_split_cli(
    build: tuple[Path, Truth, BuildStore, Manifest], tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from pipeline.cli import main

    store = copy_build(build[2], tmp_path / "build")  # report and split write into the build
    runner = CliRunner()
    manifest = str(REPO / "manifests" / "demo.yaml")
    report = runner.invoke(
        main, ["report", "--manifest", manifest, "--build", store.uri, "--scheduler", "synchronous"]
    )
    assert report.exit_code == 0, report.output
    assert (Path(store.root) / "report" / "index.html").stat().st_size > 10_000
    made = runner.invoke(
        main,
        [
            "split",
            "--build",
            store.uri,
            "--name",
            "r",
            "--kind",
            "random",
            "--fractions",
            "0.5,0.25,0.25",
            "--seed",
            "3",
        ],
    )
    assert made.exit_code == 0, made.output
    from pipeline.splits import read_split

    splits = read_split(store, "r")
    for part in ("train", "validation", "test"):
        result = runner.invoke(main, ["query", "--build", store.uri, "--split", f"r:{part}"])
        assert result.exit_code == 0
        assert set(result.stdout.split()) == {p for p, s in splits.items() if s == part}
