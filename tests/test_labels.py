"""The `labels` stage against independent oracles: every label pixel equals the source class under the
pixel's centre (nearest) or the majority of the classes under its sample points (mode), for rasters in
other CRSs and resolutions and for overlapping polygons; reruns, changed sources, bad sources."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import shapely
import yaml
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from pyproj import CRS, Transformer
from rasterio.windows import Window

from pipeline import stages, tables
from pipeline.enmap.synth import generate
from pipeline.enmap.synth.labels import regions_of, write_label_sources
from pipeline.labels import (
    LabelSourceError,
    included_patches,
    label_array,
    mode_reduce,
    read_label_table,
    remap_codes,
    run_labels,
)
from pipeline.manifest import Manifest, ManifestError
from pipeline.scheduler import Scheduler
from pipeline.storage import BuildStore
from tests.helpers import read_array, two_sites_twice, zarr_array

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

# Two sites in two UTM zones, two dates each: 8 patches at 4 locations.
SMALL = two_sites_twice(3, packagings=("folder",), formats=("GTiff",))
PARCEL_REMAP = {11: 1, 12: 1, 21: 2, 33: 3, 41: 0}  # 51 left out: becomes 0 like 41


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("labels")
    generate(root / "products", SMALL)
    raw = yaml.safe_load((REPO / "manifests" / "demo.yaml").read_text())
    raw.pop("labels", None)
    store = BuildStore(str(root / "build"))
    scheduler = Scheduler("synchronous", progress=False)
    manifest = Manifest.from_dict(raw)
    for name in stages.through("write"):
        stages.run_stage(name, manifest, store, scheduler, inputs=[str(root / "products")])
    index = store.read_geodataframe(tables.INDEX_PATCHES)
    regions = regions_of([list(g.exterior.coords) for g in index.geometry])
    assert len(regions) == 2
    sources = root / "sources"
    write_label_sources(sources, regions, seed=1)
    raw["labels"] = {
        "crops": {"source": str(sources / "crops_aea30.tif"), "min_labelled_fraction": 0.5},
        "crops_mode": {"source": str(sources / "crops_aea30.tif"), "resampling": "mode"},
        "landcover": {
            "source": str(sources / "landcover_laea100.tif"),
            "multilabel_min_fraction": 0.05,
            "min_labelled_fraction": 0.2,
        },
        "parcels": {
            "source": str(sources / "parcels.parquet"),
            "kind": "vector",
            "attribute": "crop_code",
            "classes": PARCEL_REMAP,
            "min_labelled_fraction": 0.3,
        },
        "parcels_mode": {
            "source": str(sources / "parcels.gpkg"),
            "kind": "vector",
            "attribute": "crop_code",
            "resampling": "mode",
            "min_labelled_fraction": 0.3,
        },
    }
    manifest = Manifest.from_dict(raw)
    results = run_labels(manifest, store, scheduler)
    return {
        "root": root,
        "raw": raw,
        "store": store,
        "manifest": manifest,
        "scheduler": scheduler,
        "sources": sources,
        "truth": json.loads((sources / "truth.json").read_text())["sources"],
        "results": {r.name: r for r in results},
        "index": index,
    }


# Independent oracles ------------------------------------------------------------------------------


def _points(x_ul: float, y_ul: float, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample points of a patch: the centres of a factor x factor split of each 30 m pixel."""
    centres = (np.arange(128 * factor) + 0.5) * (30.0 / factor)
    return np.meshgrid(x_ul + centres, y_ul - centres)


def _majority(samples: np.ndarray, factor: int) -> np.ndarray:
    """Brute force: per pixel, the most frequent sample class, ties to the smallest."""
    out = np.zeros((128, 128), dtype=np.int64)
    for i in range(128):
        for j in range(128):
            block = samples[i * factor : (i + 1) * factor, j * factor : (j + 1) * factor].ravel().tolist()
            counts = Counter(block)
            top = max(counts.values())
            out[i, j] = min(code for code, n in counts.items() if n == top)
    return out


def raster_oracle(truth: dict, path: Path, epsg: int, x_ul: float, y_ul: float, factor: int) -> np.ndarray:
    xs, ys = _points(x_ul, y_ul, factor)
    to_source = Transformer.from_crs(CRS.from_epsg(epsg), CRS.from_wkt(truth["crs_wkt"]), always_xy=True)
    sx, sy = to_source.transform(xs, ys)
    a, _, c, _, e, f = truth["transform"][:6]
    cols = np.floor((sx - c) / a).astype(np.int64)
    rows = np.floor((sy - f) / e).astype(np.int64)
    with rasterio.open(path) as source:
        height, width = source.height, source.width
        inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
        if not inside.any():
            return np.zeros((128, 128), dtype=np.int64)
        r0, c0 = int(rows[inside].min()), int(cols[inside].min())
        r1, c1 = int(rows[inside].max()) + 1, int(cols[inside].max()) + 1
        values = source.read(1, window=Window(c0, r0, c1 - c0, r1 - r0)).astype(np.int64)
    samples = np.full(rows.shape, truth["nodata"], dtype=np.int64)
    samples[inside] = values[rows[inside] - r0, cols[inside] - c0]
    samples[samples == truth["nodata"]] = 0
    return samples if factor == 1 else _majority(samples, factor)


def vector_oracle(
    frame: Any, crs_wkt: str, epsg: int, x_ul: float, y_ul: float, factor: int, remap: dict[int, int] | None
) -> np.ndarray:
    xs, ys = _points(x_ul, y_ul, factor)
    sx, sy = Transformer.from_crs(CRS.from_epsg(epsg), CRS.from_wkt(crs_wkt), always_xy=True).transform(
        xs, ys
    )
    points = shapely.points(sx.ravel(), sy.ravel())
    big = 10**9
    best = np.full(points.shape, big, dtype=np.int64)
    area = shapely.box(sx.min(), sy.min(), sx.max(), sy.max())
    for geometry, code in zip(frame.geometry, frame["crop_code"], strict=True):
        if not geometry.intersects(area):
            continue
        klass = int(code) if remap is None else remap.get(int(code), 0)
        covered = shapely.covers(geometry, points)
        # overlapping polygons: the smallest class wins; an unmapped (0) polygon never beats a class
        best[covered] = np.minimum(best[covered], klass if klass else big - 1)
    best[best >= big - 1] = 0
    samples = best.reshape(xs.shape)
    return samples if factor == 1 else _majority(samples, factor)


def _labels(build: dict, name: str) -> np.ndarray:
    return np.asarray(label_array(build["store"], name)[:])


def _locations(build: dict) -> dict[tuple, list[int]]:
    """Rows of each distinct patch grid (the same cell on two dates has the same labels)."""
    groups: dict[tuple, list[int]] = {}
    for row, epsg, x, y in zip(
        build["index"]["row"],
        build["index"]["epsg"],
        build["index"]["x_ul"],
        build["index"]["y_ul"],
        strict=True,
    ):
        groups.setdefault((int(epsg), float(x), float(y)), []).append(int(row))
    return groups


# Alignment ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "source", "factor"),
    [("crops", "crops_aea30", 1), ("crops_mode", "crops_aea30", 3), ("landcover", "landcover_laea100", 1)],
)
def test_raster_labels_equal_the_oracle_pixel_for_pixel(
    build: dict, name: str, source: str, factor: int
) -> None:
    truth = build["truth"][source]
    labels = _labels(build, name)
    assert label_array(build["store"], name).attrs["samples_per_pixel_side"] == factor
    for (epsg, x_ul, y_ul), rows in _locations(build).items():
        expected = raster_oracle(truth, build["sources"] / truth["path"], epsg, x_ul, y_ul, factor)
        for row in rows:
            mismatches = int((labels[row] != expected).sum())
            assert mismatches == 0, f"{name} row {row}: {mismatches} pixels differ from the oracle"
    # The test data are worth something: several classes per patch, nodata pixels, and mode != nearest.
    assert all(len(np.unique(labels[r])) >= 4 for r in range(len(labels)))
    assert (labels == 0).any()


def test_mode_differs_from_nearest_where_speckle_is_outvoted(build: dict) -> None:
    nearest, mode = _labels(build, "crops"), _labels(build, "crops_mode")
    differ = (nearest != mode).mean()
    assert 0.02 < differ < 0.6


@pytest.mark.parametrize(
    ("name", "path", "factor", "remap"),
    [("parcels", "parcels.parquet", 1, PARCEL_REMAP), ("parcels_mode", "parcels.gpkg", 5, None)],
)
def test_polygon_labels_equal_the_oracle_pixel_for_pixel(
    build: dict, name: str, path: str, factor: int, remap: dict[int, int] | None
) -> None:
    import geopandas

    frame = geopandas.read_parquet(build["sources"] / "parcels.parquet")
    crs_wkt = build["truth"]["parcels"]["crs_wkt"]
    labels = _labels(build, name)
    for (epsg, x_ul, y_ul), rows in _locations(build).items():
        expected = vector_oracle(frame, crs_wkt, epsg, x_ul, y_ul, factor, remap)
        for row in rows:
            assert int((labels[row] != expected).sum()) == 0, f"{name} row {row} differs from the oracle"
    assert set(np.unique(labels).tolist()) <= ({0, 1, 2, 3} if remap else {0, 11, 12, 21, 33, 41, 51})


def test_array_layout_dtype_and_attributes(build: dict) -> None:
    store = build["store"]
    group = zarr.open_group(store.path("dataset.zarr"), mode="r")
    quality = zarr_array(group, "quality")
    for name, dtype in (("crops", "uint8"), ("landcover", "uint16"), ("parcels", "uint8")):
        array = label_array(store, name)
        assert array.dtype == np.dtype(dtype)
        assert (
            array.shape == quality.shape and array.shards == quality.shards and array.chunks == quality.chunks
        )
        assert array.metadata.dimension_names == ("patch", "y", "x")
        assert array.fill_value == 0
        assert array.attrs["source"].endswith(Path(array.attrs["source"]).name)
    assert label_array(store, "parcels").attrs["class_codes"] == [1, 2, 3]
    assert label_array(store, "landcover").attrs["class_codes"] == [
        111,
        112,
        211,
        231,
        311,
        312,
        313,
        411,
        512,
        523,
    ]
    # Consolidated metadata holds the labels: xarray opens them without listing the store.
    import xarray as xr

    labels = xr.open_zarr(store.path("dataset.zarr"), group="labels", consolidated=True)
    assert set(labels.data_vars) >= {"crops", "landcover", "parcels"}
    assert set(xr.open_zarr(store.path("dataset.zarr"), consolidated=True).data_vars) >= {
        "reflectance",
        "quality",
    }


def test_table_histograms_fractions_and_inclusion(build: dict) -> None:
    store = build["store"]
    labels = _labels(build, "parcels")
    table = read_label_table(store, "parcels").set_index("patch_id")
    index = build["index"].set_index("patch_id")
    assert set(table.index) == set(index.index)
    for patch_id, entry in table.iterrows():
        row = int(index.loc[patch_id, "row"])
        codes, pixels = np.unique(labels[row][labels[row] > 0], return_counts=True)
        assert list(entry["class_codes"]) == codes.tolist() and list(entry["class_pixels"]) == pixels.tolist()
        assert entry["labelled_fraction"] == pytest.approx(pixels.sum() / 128**2)
        assert bool(entry["included"]) == (entry["labelled_fraction"] >= 0.3)
        assert (not isinstance(entry["reason"], str)) == bool(entry["included"])
    assert sorted(table.index[table["included"]]) == included_patches(store, "parcels")


def test_multilabel_table_marks_classes_over_the_threshold(build: dict) -> None:
    store = build["store"]
    labels = _labels(build, "landcover")
    classes = label_array(store, "landcover").attrs["class_codes"]
    table = read_label_table(store, "landcover")
    assert table["included"].all()
    for _, entry in table.iterrows():
        row = labels[int(entry["row"])]
        labelled = row[row > 0]
        present = sorted(int(c) for c in np.unique(labelled) if (labelled == c).mean() >= 0.05)
        assert list(entry["present_classes"]) == present
        assert list(entry["multi_hot"]) == [int(c in present) for c in classes]
    single = read_label_table(store, "crops")
    assert single["multi_hot"].isna().all()


def test_patches_outside_the_source_are_excluded_with_the_reason(build: dict, tmp_path: Path) -> None:
    index = build["index"]
    zone = int(index["epsg"].iloc[0])
    one_site = regions_of(
        [list(g.exterior.coords) for g, e in zip(index.geometry, index["epsg"]) if int(e) == zone]
    )
    write_label_sources(tmp_path, one_site, seed=2)
    raw = dict(build["raw"]) | {"labels": {"partial": {"source": str(tmp_path / "crops_aea30.tif")}}}
    run_labels(Manifest.from_dict(raw), build["store"], build["scheduler"])
    table = read_label_table(build["store"], "partial").set_index("patch_id")
    labels = _labels(build, "partial")
    for patch_id, entry in table.iterrows():
        row = int(index.set_index("patch_id").loc[patch_id, "row"])
        if int(index.set_index("patch_id").loc[patch_id, "epsg"]) == zone:
            assert entry["included"]
        else:
            assert not entry["included"] and entry["reason"] == "outside the label source"
            assert not labels[row].any()


# Reruns and changes -------------------------------------------------------------------------------


def test_rerun_is_a_no_op(build: dict) -> None:
    store = build["store"]
    before = store.read_stage_record("labels-crops")
    chunk_file = Path(store.path("dataset.zarr/labels/crops/c/0/0/0"))
    stamp = chunk_file.stat().st_mtime_ns
    results = run_labels(build["manifest"], store, build["scheduler"], name="crops")
    assert results[0].skipped
    assert store.read_stage_record("labels-crops") == before
    assert chunk_file.stat().st_mtime_ns == stamp


def test_changed_source_relabels(build: dict, tmp_path: Path) -> None:
    sources = tmp_path / "v1"
    shutil.copytree(build["sources"], sources)
    raw = dict(build["raw"]) | {"labels": {"moving": {"source": str(sources / "crops_aea30.tif")}}}
    manifest = Manifest.from_dict(raw)
    assert not run_labels(manifest, build["store"], build["scheduler"])[0].skipped
    first = _labels(build, "moving").copy()
    write_label_sources(
        tmp_path / "v2", regions_of([list(g.exterior.coords) for g in build["index"].geometry]), seed=9
    )
    shutil.copyfile(tmp_path / "v2" / "crops_aea30.tif", sources / "crops_aea30.tif")
    result = run_labels(manifest, build["store"], build["scheduler"])[0]
    assert not result.skipped
    second = _labels(build, "moving")
    assert not np.array_equal(first, second)
    truth = json.loads((tmp_path / "v2" / "truth.json").read_text())["sources"]["crops_aea30"]
    for (epsg, x_ul, y_ul), rows in _locations(build).items():
        expected = raster_oracle(truth, sources / "crops_aea30.tif", epsg, x_ul, y_ul, 1)
        assert all(np.array_equal(second[r], expected) for r in rows)
    # Changed settings re-label too (and a rerun after that is a no-op again).
    raw["labels"]["moving"]["min_labelled_fraction"] = 0.9
    changed = Manifest.from_dict(raw)
    assert not run_labels(changed, build["store"], build["scheduler"])[0].skipped
    assert run_labels(changed, build["store"], build["scheduler"])[0].skipped


def test_retired_rows_stay_unlabelled_and_other_shards_are_reused(build: dict, tmp_path: Path) -> None:
    """A row marked inactive (superseded) is zeroed and leaves the table; only its shard is labelled
    again, the other shards' labels stay as stored."""
    copy = tmp_path / "build"
    shutil.copytree(build["store"].path(""), copy)
    store = BuildStore(str(copy))
    before = np.asarray(label_array(store, "crops")[:])
    shard_files = sorted(p for p in Path(store.path("dataset.zarr/labels/crops/c")).rglob("*") if p.is_file())
    assert len(shard_files) >= 2  # c/<shard>/0/0
    stamps = {f: f.stat().st_mtime_ns for f in shard_files}
    active = zarr.open_array(store.path("dataset.zarr/active"), mode="r+")
    values = np.asarray(active[:])
    values[1] = 0
    active[:] = values
    result = run_labels(build["manifest"], store, build["scheduler"], name="crops")[0]
    assert not result.skipped
    assert result.counts["shards_labelled"] == 1 and result.counts["shards_reused"] == len(shard_files) - 1
    labels = np.asarray(label_array(store, "crops")[:])
    assert not labels[1].any()
    expected = before.copy()
    expected[1] = 0
    assert np.array_equal(labels, expected)
    for f in shard_files[1:]:
        assert f.stat().st_mtime_ns == stamps[f], f"{f} was rewritten"
    assert shard_files[0].stat().st_mtime_ns != stamps[shard_files[0]]
    patch_ids = np.asarray(zarr.open_array(store.path("dataset.zarr/patch_id"), mode="r")[:]).tolist()
    table = read_label_table(store, "crops")
    assert patch_ids[1] not in set(table["patch_id"]) and len(table) == len(before) - 1
    assert run_labels(build["manifest"], store, build["scheduler"], name="crops")[0].skipped


def test_write_growing_the_dataset_grows_the_labels(build: dict, tmp_path: Path) -> None:
    """When `write` extends the dataset (an incremental build appends rows), every labels array grows
    with it: stored labels stay as they are and the new rows read 0 until the labels stage runs."""
    from pipeline.write import ensure_arrays

    copy = tmp_path / "build"
    shutil.copytree(build["store"].path(""), copy)
    store = BuildStore(str(copy))
    before = {name: np.asarray(label_array(store, name)[:]) for name in ("crops", "parcels")}
    group = zarr.open_group(store.path("dataset.zarr"), mode="r")
    rows = zarr_array(group, "reflectance").shape[0]
    bands = list(
        zip(
            read_array(group, "band").tolist(),
            read_array(group, "wavelength").tolist(),
            read_array(group, "fwhm").tolist(),
            strict=True,
        )
    )
    layout_key = group.attrs["layout_key"]
    assert isinstance(layout_key, str)
    assert ensure_arrays(store, build["manifest"], rows + 5, bands, layout_key)
    for name, labels in before.items():
        grown = np.asarray(label_array(store, name)[:])
        assert grown.shape == (rows + 5, *labels.shape[1:])
        assert np.array_equal(grown[:rows], labels) and not grown[rows:].any()


# Bad sources and settings -------------------------------------------------------------------------


def test_bad_sources_fail_with_one_line(build: dict, tmp_path: Path) -> None:
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"II*\x00 not a tiff")
    cases = {
        "missing": ({"source": str(tmp_path / "nope.tif")}, FileNotFoundError),
        "corrupt": ({"source": str(broken)}, LabelSourceError),
        "no_column": (
            {"source": str(build["sources"] / "parcels.parquet"), "kind": "vector", "attribute": "nope"},
            LabelSourceError,
        ),
    }
    for name, (settings_, error) in cases.items():
        raw = dict(build["raw"]) | {"labels": {name: settings_}}
        with pytest.raises(error) as caught:
            run_labels(Manifest.from_dict(raw), build["store"], build["scheduler"])
        assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("labels", "fragment"),
    [
        ({"cdl": {"source": "a.tif", "kind": "grid"}}, "labels.cdl.kind"),
        ({"cdl": {"source": "a.gpkg", "kind": "vector"}}, "labels.cdl.attribute"),
        ({"cdl": {"source": "a.tif", "resample": "mode"}}, "labels.cdl.resample"),
        ({"cdl": {"source": "a.tif", "resampling": "bilinear"}}, "labels.cdl.resampling"),
        ({"cdl": {"source": "a.tif", "min_labelled_fraction": 1.5}}, "labels.cdl.min_labelled_fraction"),
        ({"cdl": {"source": "a.tif", "classes": {1: -2}}}, "labels.cdl.classes"),
        ({"cdl": {"source": "s3://key:secret@bucket/a.tif"}}, "credentials"),
        ({"cdl": {"source": "http://host/a.tif"}}, "labels.cdl.source"),
        ({"a b": {"source": "a.tif"}}, "labels"),
    ],
)
def test_manifest_errors_name_the_key(labels: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ManifestError) as caught:
        Manifest.from_dict({"name": "x", "labels": labels})
    assert fragment in str(caught.value) and "secret" not in str(caught.value)


def test_labels_section_changes_no_other_stage_hash() -> None:
    base = Manifest.from_dict({"name": "x"})
    with_labels = Manifest.from_dict({"name": "x", "labels": {"cdl": {"source": "a.tif"}}})
    for stage in stages.ORDER:
        assert base.stage_hash(stage) == with_labels.stage_hash(stage)


# Pure core ----------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 5),
    st.integers(1, 4),
    st.integers(1, 4),
    st.integers(0, 2**32 - 1),
    st.lists(st.integers(0, 300), min_size=1, max_size=4, unique=True),
)
def test_mode_reduce_against_brute_force(
    factor: int, height: int, width: int, seed: int, codes: list[int]
) -> None:
    rng = np.random.default_rng(seed)
    samples = np.asarray(codes)[rng.integers(len(codes), size=(height * factor, width * factor))]
    got = mode_reduce(samples, factor)
    for i in range(height):
        for j in range(width):
            counts = Counter(
                samples[i * factor : (i + 1) * factor, j * factor : (j + 1) * factor].ravel().tolist()
            )
            top = max(counts.values())
            assert got[i, j] == min(c for c, n in counts.items() if n == top)


def test_mode_ties_go_to_the_smallest_code_including_no_label() -> None:
    samples = np.array([[5, 3], [3, 5]])
    assert mode_reduce(samples, 2).tolist() == [[3]]
    assert mode_reduce(np.array([[0, 7], [7, 0]]), 2).tolist() == [[0]]


def test_remap_codes() -> None:
    values = np.array([[1, 5, 24], [0, 99, 5]])
    assert remap_codes(values, ((1, 10), (5, 20), (24, 0))).tolist() == [[10, 20, 0], [0, 0, 20]]
    assert remap_codes(values, ()).tolist() == values.tolist()
    with pytest.raises(LabelSourceError, match="remap"):
        remap_codes(np.array([70000]), ())
    with pytest.raises(LabelSourceError, match="integer"):
        remap_codes(np.array([1.5]), ())


# Sources on S3 ------------------------------------------------------------------------------------


def test_sources_on_s3_give_the_same_labels(
    build: dict, s3_server: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import s3fs

    from pipeline.stages import BuildContext

    secret = "s3cr3t-label-source"
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing-key",
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_server,
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    fs.mkdir("label-sources")
    for file in ("crops_aea30.tif", "parcels.parquet", "parcels.gpkg"):
        fs.put(str(build["sources"] / file), f"label-sources/{file}")
    raw = dict(build["raw"])
    raw["labels"] = {
        "crops_s3": {"source": "s3://label-sources/crops_aea30.tif", "min_labelled_fraction": 0.5},
        "parcels_s3": dict(build["raw"]["labels"]["parcels"], source="s3://label-sources/parcels.parquet"),
        "parcels_gpkg_s3": dict(build["raw"]["labels"]["parcels"], source="s3://label-sources/parcels.gpkg"),
    }
    context = BuildContext.create(Manifest.from_dict(raw), build["store"].uri, "synchronous", progress=False)
    args = (context.manifest, context.store, context.scheduler, context.storage_options)
    assert not any(r.skipped for r in run_labels(*args))
    assert np.array_equal(_labels(build, "crops_s3"), _labels(build, "crops"))
    assert np.array_equal(_labels(build, "parcels_s3"), _labels(build, "parcels"))
    assert np.array_equal(_labels(build, "parcels_gpkg_s3"), _labels(build, "parcels"))
    assert label_array(build["store"], "crops_s3").attrs["source_version"]["stamp"]  # the ETag
    assert all(r.skipped for r in run_labels(*args))
    assert secret not in capsys.readouterr().out
    assert secret not in json.dumps(build["store"].read_stage_record("labels-crops_s3"))
