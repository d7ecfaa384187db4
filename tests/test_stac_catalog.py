"""The `catalog` stage: settings, layout, offline schema validation, golden files, partition limits,
determinism, and the stac-geoparquet mirror."""

from __future__ import annotations

import copy
import json
import math
import os
import random
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.storage import BuildStore
from stac.builders import ProductFiles, product_assets, signed_zero_free
from stac.builders import catalog as catalog_document
from stac.catalog_writer import CatalogSummary, build_catalog, serialise
from stac.geoparquet import rebase_href, written_build_root
from stac.partition import max_links, partition, patch_key
from stac.schema import SPECTRALEARTH_SCHEMA_URI, spectralearth_schema
from stac.settings import MAX_ITEMS_PER_CATALOG, CatalogSettings
from tests.stac_helpers import (
    NetworkBlocked,
    SceneSpec,
    block_network,
    json_files,
    make_tables,
    many_scene_specs,
    offline_validator,
    spectralearth_bands,
    validate,
    write_tables,
)

REPO = Path(__file__).resolve().parent.parent
SCHEMAS = REPO.parent / "shared" / "stac-schemas"
GOLDEN = REPO / "tests" / "golden" / "stac"
ONE_MB = 1_000_000


@pytest.fixture(scope="session")
def stac_schemas() -> Path:
    if not SCHEMAS.is_dir():
        pytest.skip(f"STAC extension schemas not found at {SCHEMAS} (../shared sits beside the clone in CI)")
    return SCHEMAS


@pytest.fixture(scope="session")
def validator(stac_schemas: Path) -> Any:
    return offline_validator(stac_schemas)


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    block_network(monkeypatch)


@pytest.fixture(scope="module")
def bands() -> list[tuple[int, float, float]]:
    return spectralearth_bands()


@pytest.fixture(scope="module")
def built(
    tmp_path_factory: pytest.TempPathFactory, bands: list[tuple[int, float, float]]
) -> tuple[Path, Any]:
    root = tmp_path_factory.mktemp("build")
    store = BuildStore(str(root))
    scenes, patches = make_tables()
    write_tables(store, scenes, patches)
    summary = build_catalog(store, CatalogSettings(), bands)
    return root, summary


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def items_of(stac_dir: Path, collection: str) -> dict[str, tuple[Path, dict[str, Any]]]:
    out = {}
    for path in json_files(stac_dir / collection):
        document = load(path)
        if document["type"] == "Feature":
            out[document["id"]] = (path, document)
    return out


# Settings -----------------------------------------------------------------------------------------
def test_settings_defaults_and_validation() -> None:
    settings = CatalogSettings.from_dict({})
    assert settings == CatalogSettings()
    assert settings.collection_id == "spectralearth-enmap-patches"
    assert settings.scene_collection_id == "enmap-l2a-scenes"
    assert settings.license == "CC-BY-4.0" and settings.items_per_catalog == 5000
    assert settings.attribution_text(2022, 2024) == "Contains modified EnMAP data © DLR 2022-2024"
    custom = CatalogSettings.from_dict(
        {
            "title": "My patches",
            "license": "other",
            "license_url": "https://example.org/licence",
            "providers": [{"name": "Me", "roles": ["processor", "host"], "url": "https://example.org"}],
            "keywords": ["a"],
            "items_per_catalog": 10,
        }
    )
    assert custom.providers[0].to_stac() == {
        "name": "Me",
        "roles": ["processor", "host"],
        "url": "https://example.org",
    }
    assert custom.keywords == ("a",) and custom.items_per_catalog == 10


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"licence": "MIT"}, "unknown key 'catalog.licence'"),
        ({"providers": [{"name": "x", "rol": []}]}, "unknown key 'catalog.providers[0].rol'"),
        ({"providers": [{"name": "x", "roles": ["owner"]}]}, "catalog.providers[0].roles"),
        ({"license": "CC BY 4.0"}, "catalog.license"),
        ({"license": "other"}, "catalog.license_url"),
        ({"items_per_catalog": 1}, "catalog.items_per_catalog"),
        ({"items_per_catalog": MAX_ITEMS_PER_CATALOG + 1}, "catalog.items_per_catalog"),
        ({"items_per_catalog": True}, "catalog.items_per_catalog"),
        ({"collection_id": "Patches/1"}, "catalog.collection_id"),
        ({"collection_id": "enmap-l2a-scenes"}, "must differ"),
        ({"keywords": "EnMAP"}, "catalog.keywords"),
    ],
)
def test_settings_errors_name_the_key(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        CatalogSettings.from_dict(raw)


# Layout and content -------------------------------------------------------------------------------
def test_layout_and_counts(built: tuple[Path, Any]) -> None:
    root, summary = built
    stac_dir = root / "stac"
    assert isinstance(summary, CatalogSummary)
    assert summary.patch_items == 45 and summary.scene_items == 5
    assert (stac_dir / "catalog.json").is_file() and (stac_dir / "items.parquet").is_file()
    patches = items_of(stac_dir, "spectralearth-enmap-patches")
    scenes = items_of(stac_dir, "enmap-l2a-scenes")
    assert len(patches) == 45 and len(scenes) == 5
    path, _ = patches["EPSG32632-0166-1373_20230501_DT0000001049"]
    assert path.relative_to(stac_dir).as_posix() == (
        "spectralearth-enmap-patches/EPSG32632/i0128-j1344/EPSG32632-0166-1373_20230501_DT0000001049.json"
    )
    assert summary.to_json()["catalogs"] == summary.catalogs


def _hrefs(document: dict[str, Any]) -> list[tuple[str, str]]:
    out = [(entry["rel"], entry["href"]) for entry in document.get("links", [])]
    out += [(f"asset:{key}", asset["href"]) for key, asset in document.get("assets", {}).items()]
    return out


def test_every_relative_href_resolves_and_tree_is_consistent(built: tuple[Path, Any]) -> None:
    root, _ = built
    stac_dir = root / "stac"
    linked_items: dict[Path, int] = {}
    for path in json_files(stac_dir):
        document = load(path)
        for rel, href in _hrefs(document):
            if rel.startswith("asset:") and rel != "asset:dataset" and rel != "asset:geoparquet":
                # a scene's source product lies outside the build: where the inventory found it
                assert document["type"] == "Feature" and href.startswith("/data/"), f"{path}: {href}"
                continue
            assert "://" not in href and not href.startswith("/"), f"{path}: absolute href {href}"
            target = (path.parent / href).resolve()
            if rel == "license":
                continue
            if rel == "asset:dataset":
                assert target == (root / "dataset.zarr").resolve()
                continue
            assert target.exists(), f"{path}: {rel} -> {href} does not exist"
            if rel == "item":
                linked_items[target] = linked_items.get(target, 0) + 1
                assert load(target)["links"][1]["rel"] == "parent"
                assert (target.parent / load(target)["links"][1]["href"]).resolve() == path.resolve()
            if rel == "root":
                assert target == (stac_dir / "catalog.json").resolve()
    features = [p.resolve() for p in json_files(stac_dir) if load(p)["type"] == "Feature"]
    assert sorted(linked_items) == sorted(features)
    assert set(linked_items.values()) == {1}


def test_patch_item_fields(built: tuple[Path, Any]) -> None:
    root, _ = built
    stac_dir = root / "stac"
    scenes_frame, patches_frame = make_tables()
    patches = items_of(stac_dir, "spectralearth-enmap-patches")
    scenes = items_of(stac_dir, "enmap-l2a-scenes")
    for row in patches_frame.itertuples(index=False):
        path, item = patches[row.patch_id]
        props = item["properties"]
        assert props["proj:code"] == f"EPSG:{row.epsg}"
        assert props["proj:shape"] == [128, 128]
        assert props["proj:transform"] == [30.0, 0.0, row.x_ul, 0.0, -30.0, row.y_ul]
        assert props["proj:bbox"] == [row.x_ul, row.y_ul - 3840, row.x_ul + 3840, row.y_ul]
        assert props["eo:cloud_cover"] == pytest.approx(row.cloud_fraction * 100, abs=1e-4)
        assert props["eo:snow_cover"] == pytest.approx(row.snow_fraction * 100, abs=1e-4)
        assert props["grid:code"] == props["spectralearth:location_id"] == row.location_id
        assert props["spectralearth:row"] == row.row
        assert props["spectralearth:n_dates"] == row.n_dates
        assert props["spectralearth:scene_id"] == row.scene_id
        assert props["spectralearth:duplicates"] == list(row.duplicates)
        assert props["spectralearth:scene_window"] == [row.col_off, row.row_off, 128, 128]
        assert props["spectralearth:quality_fractions"]["water"] == pytest.approx(
            row.water_fraction, abs=1e-6
        )
        assert props["processing:level"] == "L2A" and props["processing:version"] == row.processor_version
        assert props["platform"] == "enmap" and props["instruments"] == ["hsi"] and props["gsd"] == 30
        assert props["sat:orbit_state"] in ("ascending", "descending")
        scene = scenes_frame.set_index("scene_id").loc[row.scene_id]
        assert props["sat:absolute_orbit"] == scene.orbit_number
        assert props["view:sun_elevation"] == scene.sun_elevation
        assert props["view:off_nadir"] == pytest.approx(
            (scene.across_off_nadir**2 + scene.along_off_nadir**2) ** 0.5, abs=0.01
        )
        assert props["datetime"].endswith("Z")
        derived = [entry for entry in item["links"] if entry["rel"] == "derived_from"]
        assert len(derived) == 1
        scene_path, scene_item = scenes[row.scene_id]
        assert (path.parent / derived[0]["href"]).resolve() == scene_path.resolve()
        assert scene_item["id"] == row.scene_id
        asset = item["assets"]["dataset"]
        assert asset["type"] == "application/vnd+zarr" and asset["roles"] == ["data"]
        assert asset["xarray:open_kwargs"] == {"engine": "zarr", "consolidated": True, "zarr_format": 3}
        assert SPECTRALEARTH_SCHEMA_URI in item["stac_extensions"]
        west, south, east, north = item["bbox"]
        assert west < east and south < north
    # microseconds are kept, whole seconds are written without a fraction
    assert patches["EPSG32632-0166-1373_20230501_DT0000001049"][1]["properties"]["datetime"] == (
        "2023-05-01T10:20:30.123456Z"
    )
    assert patches["EPSG32633-0046-1376_20240301_DT0000002050"][1]["properties"]["datetime"] == (
        "2024-03-01T09:30:00Z"
    )


def test_collection_bands_assets_and_summaries(built: tuple[Path, Any]) -> None:
    root, _ = built
    collection = load(root / "stac" / "spectralearth-enmap-patches" / "collection.json")
    assert collection["license"] == "CC-BY-4.0"
    assert collection["spectralearth:attribution"] == "Contains modified EnMAP data © DLR 2023-2024"
    for bands in (collection["assets"]["dataset"]["bands"], collection["item_assets"]["dataset"]["bands"]):
        assert len(bands) == 202
        names = [band["name"] for band in bands]
        assert names[0] == "B001" and "B127" not in names and "B141" not in names and "B161" not in names
        assert bands[0]["eo:center_wavelength"] == pytest.approx(0.4182)
        assert bands[0]["eo:full_width_half_max"] == pytest.approx(0.00699561)
        assert all(0.4 < band["eo:center_wavelength"] < 2.5 for band in bands)  # micrometres
        assert {(b["nodata"], b["data_type"], b["raster:scale"], b["raster:offset"]) for b in bands} == {
            (-32768, "int16", 0.0001, 0)
        }
    dataset = collection["assets"]["dataset"]
    assert dataset["href"] == "../../dataset.zarr"
    assert dataset["xarray:open_kwargs"]["consolidated"] is True
    mirror = collection["assets"]["geoparquet"]
    assert mirror["href"] == "../items.parquet" and mirror["roles"] == ["collection-mirror"]
    assert mirror["type"] == "application/vnd.apache.parquet"
    summaries = collection["summaries"]
    assert summaries["proj:code"] == ["EPSG:32632", "EPSG:32633"]
    assert summaries["spectralearth:n_dates"] == {"minimum": 1, "maximum": 2}
    assert summaries["eo:cloud_cover"]["minimum"] >= 0 and summaries["eo:cloud_cover"]["maximum"] <= 100
    assert collection["extent"]["temporal"]["interval"] == [
        ["2023-05-01T10:20:30.123456Z", "2024-03-01T09:30:00Z"]
    ]
    assert "https://stac-extensions.github.io/raster/v2.0.0/schema.json" in collection["stac_extensions"]
    assert "created" not in json.dumps(collection) and "updated" not in json.dumps(collection)


# Validation ---------------------------------------------------------------------------------------
@pytest.mark.shared
def test_every_json_file_validates_offline(built: tuple[Path, Any], validator: Any) -> None:
    root, _ = built
    counts: dict[str, int] = {}
    used: set[str] = set()
    for path in json_files(root / "stac"):
        document = load(path)
        used.update(validate(validator, document))
        counts[document["type"]] = counts.get(document["type"], 0) + 1
    assert counts == {"Feature": 50, "Collection": 2, "Catalog": 9}
    for extension in ("eo/v2.0.0", "raster/v2.0.0", "projection/v2.0.0", "view/v1.1.0", "sat/v1.2.0"):
        assert f"https://stac-extensions.github.io/{extension}/schema.json" in used
    for extension in ("grid/v1.1.0", "processing/v1.2.0", "xarray-assets/v1.0.0"):
        assert f"https://stac-extensions.github.io/{extension}/schema.json" in used
    assert SPECTRALEARTH_SCHEMA_URI in used


def _a_patch_item(built: tuple[Path, Any]) -> dict[str, Any]:
    root, _ = built
    return load(
        root
        / "stac"
        / "spectralearth-enmap-patches"
        / "EPSG32632"
        / "i0128-j1344"
        / "EPSG32632-0166-1373_20230501_DT0000001049.json"
    )


@pytest.mark.shared
@pytest.mark.parametrize(
    ("where", "key", "value"),
    [
        ("properties", "proj:code", 32632),
        ("properties", "eo:cloud_cover", 150),
        ("properties", "eo:snow_cover", -1),
        ("properties", "grid:code", "epsg32632_0166"),
        ("properties", "sat:orbit_state", "DESCENDING"),
        ("properties", "sat:absolute_orbit", 0),
        ("properties", "view:sun_azimuth", 400),
        ("properties", "proj:transform", [30, 0, 1]),
        ("properties", "datetime", "1 May 2023"),
        ("properties", "processing:datetime", "2023-05-31T10:20:30+02:00"),
        ("assets", "dataset", {"type": "application/vnd.zarr; version=3"}),
        ("item", "bbox", [1, 2]),
        ("properties", "spectralearth:row", -1),
        ("properties", "spectralearth:n_dates", 0),
        ("properties", "spectralearth:location_id", "32632-164-1377"),
        ("properties", "spectralearth:scene_id", "ENMAP01-bad"),
        ("properties", "spectralearth:quality_fractions", {"cloud": 1.5}),
        ("properties", "spectralearth:scene_window", [0, 0, 128]),
        ("properties", "spectralearth:unknown", 1),
    ],
)
def test_broken_item_fails_validation(
    built: tuple[Path, Any], validator: Any, where: str, key: str, value: Any
) -> None:
    from pystac.errors import STACValidationError

    item = _a_patch_item(built)
    validate(validator, item)  # the original passes
    broken = copy.deepcopy(item)
    target = broken if where == "item" else broken[where]
    target[key] = value
    with pytest.raises(STACValidationError):
        validate(validator, broken)


@pytest.mark.shared
def test_validation_never_fetches(built: tuple[Path, Any], validator: Any) -> None:
    import urllib.request

    from pystac.validation.stac_validator import GetSchemaError

    item = _a_patch_item(built)
    item["stac_extensions"].append("https://stac-extensions.github.io/unknown/v9.9.9/schema.json")
    with pytest.raises(GetSchemaError, match="not available offline"):
        validate(validator, item)
    with pytest.raises(NetworkBlocked):
        urllib.request.urlopen("https://stac-extensions.github.io/eo/v2.0.0/schema.json")


# Golden files -------------------------------------------------------------------------------------
def _normalise(value: Any) -> Any:
    """Volatile fields out (created/updated), floats rounded to 1e-9 (PROJ builds may differ in the
    last bits of projected-to-lon/lat coordinates)."""
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items() if k not in ("created", "updated")}
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    if isinstance(value, float):
        return round(value, 9)
    return value


def test_golden_catalog(tmp_path: Path) -> None:
    t0 = SceneSpec(32632, 1049, 1, datetime(2023, 5, 1, 10, 20, 30, tzinfo=UTC), ((164, 1377), (165, 1377)))
    specs = [t0, SceneSpec(32632, 1100, 2, t0.start.replace(month=7), ((165, 1377),), direction="ASCENDING")]
    store = BuildStore(str(tmp_path))
    write_tables(store, *make_tables(specs))
    bands = [(1, 418.2, 6.99561), (2, 423.835, 6.6675), (224, 2445.53, 7.9)]
    build_catalog(store, CatalogSettings(items_per_catalog=2), bands)
    produced = {
        p.relative_to(tmp_path / "stac").as_posix(): _normalise(load(p))
        for p in json_files(tmp_path / "stac")
    }
    if os.environ.get("UPDATE_GOLDEN") == "1":
        for existing in GOLDEN.rglob("*.json") if GOLDEN.exists() else []:
            existing.unlink()
        for relative, document in produced.items():
            target = GOLDEN / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    expected = (
        {p.relative_to(GOLDEN).as_posix(): load(p) for p in json_files(GOLDEN)} if GOLDEN.exists() else {}
    )
    assert expected, f"no golden files in {GOLDEN}: run with UPDATE_GOLDEN=1"
    assert sorted(produced) == sorted(expected)
    for relative in produced:
        assert produced[relative] == expected[relative], f"{relative} differs from its golden file"


# Partition and the 1 MB limit ---------------------------------------------------------------------
def test_small_items_per_catalog_partitions_everything(
    tmp_path: Path, bands: list[tuple[int, float, float]]
) -> None:
    store = BuildStore(str(tmp_path))
    write_tables(store, *make_tables(many_scene_specs(8, 6)))
    limit = 5
    summary = build_catalog(store, CatalogSettings(items_per_catalog=limit), bands)
    assert summary.patch_items > 150 and summary.max_links <= limit
    stac_dir = tmp_path / "stac"
    features = 0
    for path in json_files(stac_dir):
        document = load(path)
        if document["type"] == "Feature":
            features += 1
            continue
        links = [entry for entry in document["links"] if entry["rel"] in ("item", "child")]
        assert len(links) <= limit, f"{path} links {len(links)} > {limit}"
        assert path.stat().st_size < ONE_MB
    assert features == summary.patch_items + summary.scene_items
    assert list(stac_dir.rglob("part-0000")) and list(stac_dir.rglob("group-0000"))


def test_rebuild_is_byte_identical_and_removes_stale_files(
    tmp_path: Path, bands: list[tuple[int, float, float]]
) -> None:
    store = BuildStore(str(tmp_path))
    write_tables(store, *make_tables())

    def snapshot() -> dict[str, bytes]:
        return {
            p.relative_to(tmp_path).as_posix(): p.read_bytes()
            for p in sorted((tmp_path / "stac").rglob("*"))
            if p.is_file()
        }

    small = build_catalog(store, CatalogSettings(items_per_catalog=3), bands)
    assert small.files_removed == 0
    first = build_catalog(store, CatalogSettings(), bands)
    assert first.files_removed > 0  # the part-NNNN / group-NNNN files of the small partition
    before = snapshot()
    again = build_catalog(store, CatalogSettings(), bands, workers=1)
    assert again.files_removed == 0
    assert snapshot() == before
    assert not list((tmp_path / "stac").rglob("part-*"))


def _random_keys(n: int, rng: random.Random) -> list[tuple[str, str]]:
    keys = []
    for _ in range(n):
        zone = 32600 + rng.randint(1, 60) + (100 if rng.random() < 0.3 else 0)
        keys.append(patch_key(zone, rng.randint(40, 220), rng.randint(0, 2400)))
    return keys


@pytest.mark.parametrize("shape", ["realistic", "one_block", "all_distinct_blocks"])
def test_default_partition_of_540k_items(shape: str) -> None:
    n = 540_000
    limit = CatalogSettings().items_per_catalog
    rng = random.Random(1)
    if shape == "realistic":
        keys = _random_keys(n, rng)
    elif shape == "one_block":
        keys = [patch_key(32632, 164, 1377)] * n
    else:
        keys = [("EPSG32632", f"b{k:07d}") for k in range(n)]
    tree = partition(keys, limit)
    assert max_links(tree) <= limit
    seen = sorted(index for leaf in tree.leaves() for index in leaf.items)
    assert seen == list(range(n))


def test_a_full_leaf_catalog_stays_under_1mb() -> None:
    """The longest item paths a leaf can link, MAX_ITEMS_PER_CATALOG of them, serialise under 1 MB."""
    item = (
        "spectralearth-enmap-patches/EPSG32760/group-0000/i9984-j9984/part-0000/"
        "EPSG32760-9999-9999_20991231_DT9999999999.json"
    )
    folder = item.rsplit("/", 1)[0]
    items = [item.replace("9999-9999", f"{k:04d}-9999") for k in range(MAX_ITEMS_PER_CATALOG)]
    document = catalog_document(
        "spectralearth-enmap-patches-EPSG32760-group-0000-i9984-j9984-part-0000",
        "EPSG:32760 (UTM zone 60S), group-0000, cells i 9984-10047, j 9984-10047, part-0000",
        "6000 patch items of spectralearth-enmap-patches.",
        f"{folder}/catalog.json",
        "catalog.json",
        f"{folder.rsplit('/', 1)[0]}/catalog.json",
        [],
        items,
    )
    assert len(serialise(document)) < ONE_MB


# stac-geoparquet ----------------------------------------------------------------------------------
def test_items_parquet_round_trips(built: tuple[Path, Any]) -> None:
    from stac_geoparquet.arrow import stac_table_to_items

    from stac.builders import absolute_hrefs
    from stac.records import iso_utc

    root, _ = built
    stac_dir = root / "stac"
    table = pq.read_table(stac_dir / "items.parquet")
    assert table.schema.field("bbox").type.names == ["xmin", "ymin", "xmax", "ymax"]
    geo = json.loads(table.schema.metadata[b"geo"])
    assert geo["columns"]["geometry"]["covering"]["bbox"]["xmin"] == ["bbox", "xmin"]
    assert str(table.schema.field("datetime").type) == "timestamp[us, tz=UTC]"
    json_items = items_of(stac_dir, "spectralearth-enmap-patches")
    assert sorted(table.column("id").to_pylist()) == sorted(json_items)
    times = table.column("datetime").to_pylist()
    for index, item in enumerate(stac_table_to_items(table)):
        path, original = json_items[item["id"]]
        expected = absolute_hrefs(original, path.relative_to(stac_dir).as_posix(), str(stac_dir))
        item["properties"] = {k: v for k, v in item["properties"].items() if v is not None}
        item["properties"]["datetime"] = iso_utc(times[index])
        item["bbox"] = list(item["bbox"])
        for entry in item["links"]:
            for key in [k for k, v in entry.items() if v is None]:
                del entry[key]
        assert item == expected
    # absolute hrefs: a row read on its own (DuckDB, a server, xpystac) resolves without the tree
    for entry in expected["links"]:
        assert Path(entry["href"]).is_absolute() and Path(entry["href"]).is_file(), entry
    assert expected["assets"]["dataset"]["href"] == str(root / "dataset.zarr")
    stored = json.loads(table.schema.metadata[b"stac-geoparquet"])
    collection = stored["collections"]["spectralearth-enmap-patches"]
    assert collection["assets"]["geoparquet"]["href"] == str(stac_dir / "items.parquet")
    assert collection["assets"]["dataset"]["href"] == str(root / "dataset.zarr")


# Assets, schema, numbers ---------------------------------------------------------------------------
def test_no_negative_zero_in_transforms(tmp_path: Path) -> None:
    scenes, patches = make_tables()
    negative = [30.0, -0.0, 0.0, -0.0, -30.0, 0.0]
    scenes["transform"] = [[*negative[:2], t[2], negative[3], -30.0, t[5]] for t in scenes["transform"]]
    patches["scene_transform"] = [[30.0, -0.0, t[2], -0.0, -30.0, t[5]] for t in patches["scene_transform"]]
    store = BuildStore(str(tmp_path))
    write_tables(store, scenes, patches)
    build_catalog(store, CatalogSettings(), [(1, 418.2, 6.99561)])
    texts = [p.read_text() for p in json_files(tmp_path / "stac")]
    assert texts and not any("-0.0" in text for text in texts)
    transforms = [json.loads(t)["properties"]["proj:transform"] for t in texts if '"Feature"' in t]
    assert all(math.copysign(1.0, v) > 0 for t in transforms for v in t if v == 0)
    assert signed_zero_free([-0.0, 1.5, -2.0]) == [0.0, 1.5, -2.0]


PRODUCT = "ENMAP01-____L2A-DT0000001049_20230501T102030Z_001_V010303_20230531T102030Z"


@pytest.mark.parametrize(
    ("packaging", "container", "inner", "spectral_href"),
    [
        ("folder", f"/data/{PRODUCT}", None, f"/data/{PRODUCT}/{PRODUCT}-SPECTRAL_IMAGE.BSQ"),
        (
            "zip",
            f"/data/{PRODUCT}.ZIP",
            None,
            f"zip:///data/{PRODUCT}.ZIP!{PRODUCT}/{PRODUCT}-SPECTRAL_IMAGE.BSQ",
        ),
        (
            "zip",
            f"s3://b/in/{PRODUCT}.ZIP",
            None,
            f"zip+s3://b/in/{PRODUCT}.ZIP!{PRODUCT}/{PRODUCT}-SPECTRAL_IMAGE.BSQ",
        ),
        ("targz", "/data/dims_1.tar.gz", f"dims_1/{PRODUCT}.ZIP", None),
    ],
)
def test_scene_assets_are_the_product_files(
    packaging: str, container: str, inner: str | None, spectral_href: str | None
) -> None:
    prefix = "" if packaging == "folder" else f"{PRODUCT}/"
    names = [
        "SPECTRAL_IMAGE.BSQ",
        "SPECTRAL_IMAGE.HDR",
        "METADATA.XML",
        "QL_QUALITY_CLOUD_COG.tiff",
        "QL_VNIR.TIF",
    ]
    members = tuple((f"{prefix}{PRODUCT}-{name}", 100 + k) for k, name in enumerate(names))
    assets = product_assets(ProductFiles(packaging, container, inner, members))
    if packaging == "folder":
        assert "archive" not in assets
    else:
        archive = assets["archive"]
        assert archive["href"] == container and "archive" in archive["roles"]
        assert archive["type"] == {"zip": "application/zip", "targz": "application/gzip"}[packaging]
    if spectral_href is None:  # files of a ZIP inside a tar.gz cannot be opened in place
        assert set(assets) == {"archive"} and inner in assets["archive"]["description"]
        return
    assert set(assets) - {"archive"} == {
        "spectral_image",
        "spectral_image_header",
        "metadata",
        "ql_quality_cloud",
        "ql_vnir",
    }
    spectral = assets["spectral_image"]
    assert spectral["href"] == spectral_href and spectral["roles"] == ["data", "reflectance"]
    assert spectral["file:size"] == 100
    assert assets["metadata"]["type"] == "application/xml" and assets["metadata"]["roles"] == ["metadata"]
    assert assets["ql_quality_cloud"]["type"] == "image/tiff; application=geotiff; profile=cloud-optimized"
    assert assets["ql_quality_cloud"]["roles"] == ["metadata", "cloud"]
    assert assets["ql_vnir"]["type"] == "image/tiff; application=geotiff"
    assert assets["spectral_image_header"]["type"] == "text/plain"


def test_scene_items_carry_their_archive(built: tuple[Path, Any]) -> None:
    root, _ = built
    scenes_frame, _ = make_tables()
    scenes = items_of(root / "stac", "enmap-l2a-scenes")
    for row in scenes_frame.itertuples():
        _, item = scenes[row.scene_id]
        assert item["assets"]["archive"]["href"] == row.container_uri
        assert "https://stac-extensions.github.io/file/v2.1.0/schema.json" not in item["stac_extensions"]
        assert SPECTRALEARTH_SCHEMA_URI in item["stac_extensions"]


def test_spectralearth_schema_is_packaged_and_matches_the_fields(built: tuple[Path, Any]) -> None:
    """Every spectralearth:* field the catalog writes is described by the packaged schema, and the
    schema describes no field the catalog never writes."""
    root, _ = built
    schema = spectralearth_schema()
    assert schema["$id"].rstrip("#") == SPECTRALEARTH_SCHEMA_URI
    described = set(schema["definitions"]["fields"]["properties"])
    written: set[str] = set()
    for path in json_files(root / "stac"):
        document = load(path)
        fields = document.get("properties", document)
        written |= {key for key in fields if key.startswith("spectralearth:")}
    assert written == described


@given(
    parts=st.lists(
        st.text("abcXYZ019_-.", min_size=1, max_size=8).filter(lambda t: t not in (".", "..")),
        min_size=1,
        max_size=4,
    ),
    written=st.sampled_from(["/tmp/a/build", "s3://bucket/old", "/srv/b"]),
    now=st.sampled_from(["/data/moved", "s3://other/new/prefix", "/srv/b"]),
)
def test_rebase_href_moves_only_hrefs_under_the_written_root(
    parts: list[str], written: str, now: str
) -> None:
    relative = "/".join(parts)
    assert rebase_href(f"{written}/{relative}", now, written) == f"{now}/{relative}"
    assert rebase_href(f"{written}/{relative}", now, None) == f"{written}/{relative}"  # nothing known
    outside = f"s3://products/{relative}"  # a source product: not part of the build
    assert rebase_href(outside, now, written) == outside
    assert rebase_href(f"{written}x/{relative}", now, written) == f"{written}x/{relative}"  # a prefix only
    assert rebase_href(f"./{relative}", now, written) == f"{now}/stac/{relative}"
    assert rebase_href(f"../{relative}", now, written) == f"{now}/{relative}"


def test_written_build_root_is_read_from_the_parquet(built: tuple[Path, Any]) -> None:
    root, _ = built
    assert written_build_root(str(root / "stac" / "items.parquet")) == str(root)
