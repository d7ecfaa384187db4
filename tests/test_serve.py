"""`spectralearth serve`: the STAC API over a build, queried with pystac-client, against `query`.

Two builds: catalog-only builds from the synthetic tables (many items, fast) for the search semantics,
and a demo build (real dataset.zarr) for hrefs that resolve and xpystac. Servers run on 127.0.0.1 on a
free port, in a thread (or a subprocess for the CLI), and are stopped at the end of each block.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

pytest.importorskip(
    "stac_fastapi.geoparquet", reason="the serve extra is not installed (pip install '.[serve]')"
)

import requests  # noqa: E402
from pystac_client import Client  # noqa: E402

from pipeline.query import query  # noqa: E402
from pipeline.storage import BuildStore  # noqa: E402
from stac.catalog_writer import build_catalog  # noqa: E402
from stac.schema import SPECTRALEARTH_SCHEMA_URI, spectralearth_schema  # noqa: E402
from stac.serve import QUERYABLES, SCHEMA_ROUTE, ServeError, create_app, load_catalog, running  # noqa: E402
from stac.settings import CatalogSettings  # noqa: E402
from tests.stac_helpers import (
    SCHEMAS,
    make_tables,
    many_scene_specs,
    offline_validator,
    validate,
    write_tables,
)  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
COLLECTION = CatalogSettings().collection_id
SCENES = CatalogSettings().scene_collection_id


@pytest.fixture(scope="module")
def tables_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A catalog-only build: ~200 patch items in two zones, revisits and duplicates."""
    root = tmp_path_factory.mktemp("served")
    scenes, patches = make_tables(many_scene_specs(6, 5))
    default_scenes, default_patches = make_tables()
    default_patches["row"] += len(patches)
    write_tables(
        BuildStore(str(root)),
        pd.concat([scenes, default_scenes], ignore_index=True),
        pd.concat([patches, default_patches], ignore_index=True),
    )
    build_catalog(BuildStore(str(root)), CatalogSettings(items_per_catalog=50), [(1, 418.2, 6.99561)])
    return root


@pytest.fixture(scope="module")
def api(tables_build: Path) -> Any:
    with running(create_app(load_catalog(str(tables_build)))) as url:
        yield url


# `demo_build` (tests/conftest.py): the session's demo build, read-only.


def _ids(client: Client, **search: Any) -> list[str]:
    return sorted(item.id for item in client.search(collections=[COLLECTION], **search).items())


# Core, collections, queryables --------------------------------------------------------------------
def test_landing_conformance_collections_and_queryables(api: str, tables_build: Path) -> None:
    landing = requests.get(api + "/", timeout=30).json()
    assert landing["type"] == "Catalog" and landing["id"] == "spectralearth"
    conformance = requests.get(api + "/conformance", timeout=30).json()["conformsTo"]
    for needed in (
        "https://api.stacspec.org/v1.0.0/core",
        "https://api.stacspec.org/v1.0.0/collections",
        "https://api.stacspec.org/v1.0.0/ogcapi-features",
        "https://api.stacspec.org/v1.0.0/item-search",
        "http://www.opengis.net/spec/cql2/1.0/conf/cql2-text",
        "http://www.opengis.net/spec/cql2/1.0/conf/cql2-json",
    ):
        assert needed in conformance
    collections = requests.get(api + "/collections", timeout=30).json()["collections"]
    assert [c["id"] for c in collections] == [COLLECTION, SCENES]
    assert collections[1]["assets"]["geoparquet"]["href"] == str(tables_build / "stac" / "scenes.parquet")
    assets = collections[0]["assets"]
    assert assets["geoparquet"]["href"] == str(tables_build / "stac" / "items.parquet")
    assert assets["dataset"]["href"] == str(tables_build / "dataset.zarr")
    assert assets["dataset"]["type"] == "application/vnd+zarr"
    rels = {entry["rel"] for entry in collections[0]["links"]}
    assert {"self", "root", "items"} <= rels
    queryables = requests.get(api + "/queryables", timeout=30).json()
    assert {"eo:cloud_cover", "spectralearth:n_dates", "datetime"} <= set(queryables["properties"])
    assert queryables["properties"] == QUERYABLES
    schema = requests.get(api + SCHEMA_ROUTE, timeout=30).json()
    assert schema == spectralearth_schema() and schema["$id"].rstrip("#") == SPECTRALEARTH_SCHEMA_URI
    missing = requests.get(api + "/collections/nope", timeout=30)
    assert missing.status_code == 404


# Search: the same ids as `query` ------------------------------------------------------------------
def _cloud_threshold(tables_build: Path) -> float:
    values = sorted(v for v in pd.read_parquet(tables_build / "stac" / "items.parquet")["eo:cloud_cover"])
    return float(values[len(values) * 3 // 4])  # most patches are cloud-free: a quartile above zero


def test_search_equals_query(api: str, tables_build: Path) -> None:
    client = Client.open(api)
    build = str(tables_build)
    everything = query(build).ids
    assert len(everything) > 100
    assert _ids(client, max_items=None) == sorted(everything)

    west, south, east, north = (
        pd.read_parquet(tables_build / "stac" / "items.parquet")["bbox"]
        .apply(pd.Series)
        .agg({"xmin": "min", "ymin": "min", "xmax": "max", "ymax": "max"})
    )
    half = (west, south, (west + east) / 2, north)
    expected = sorted(query(build, bbox=half).ids)
    assert 0 < len(expected) < len(everything)
    assert _ids(client, bbox=list(half)) == expected

    triangle = {
        "type": "Polygon",
        "coordinates": [[[west, south], [east, south], [west, north], [west, south]]],
    }
    expected = sorted(query(build, intersects=triangle).ids)
    assert 0 < len(expected) < len(everything)
    assert _ids(client, intersects=triangle) == expected

    window = "2023-02-01T00:00:00Z/2023-06-30T23:59:59Z"
    expected = sorted(query(build, datetime=window).ids)
    assert 0 < len(expected) < len(everything)
    assert _ids(client, datetime=window) == expected

    picked = sorted(everything[::17])
    assert _ids(client, ids=picked) == sorted(query(build, ids=picked).ids) == picked


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_cql2_filters_equal_query(api: str, tables_build: Path, method: str) -> None:
    client = Client.open(api)
    build = str(tables_build)
    threshold = _cloud_threshold(tables_build)
    cloudy = sorted(query(build, max_cloud=threshold).ids)
    multi = sorted(query(build, min_dates=2).ids)
    both = sorted(query(build, max_cloud=threshold, min_dates=2).ids)
    everything = query(build).ids
    assert 0 < len(cloudy) < len(everything) and 0 < len(multi) < len(everything) and 0 < len(both)
    cloud_json = {"op": "<=", "args": [{"property": "eo:cloud_cover"}, threshold]}
    dates_json = {"op": ">=", "args": [{"property": "spectralearth:n_dates"}, 2]}
    assert _ids(client, filter=cloud_json, filter_lang="cql2-json", method=method) == cloudy
    assert _ids(client, filter=dates_json, filter_lang="cql2-json", method=method) == multi
    both_json = {"op": "and", "args": [cloud_json, dates_json]}
    assert _ids(client, filter=both_json, filter_lang="cql2-json", method=method) == both
    if method == "GET":  # cql2-text travels in a GET query string (STAC API: POST bodies are cql2-json)
        text = f'"eo:cloud_cover" <= {threshold} AND "spectralearth:n_dates" >= 2'
        assert _ids(client, filter=text, filter_lang="cql2-text", method="GET") == both
        bbox_and_text = _ids(
            client,
            filter='"spectralearth:n_dates" >= 2',
            filter_lang="cql2-text",
            method="GET",
            bbox=[-180, -90, 180, 90],
        )
        assert bbox_and_text == multi


def test_paging_and_max_items(api: str, tables_build: Path) -> None:
    client = Client.open(api)
    everything = sorted(query(str(tables_build)).ids)
    search = client.search(collections=[COLLECTION], limit=7)
    pages = list(search.pages_as_dicts())
    assert len(pages) == -(-len(everything) // 7)
    assert all(len(page["features"]) == 7 for page in pages[:-1])
    ids = [feature["id"] for page in pages for feature in page["features"]]
    assert sorted(ids) == everything and len(set(ids)) == len(ids)  # no page repeats an item
    assert len(list(client.search(collections=[COLLECTION], limit=5, max_items=12).items())) == 12
    # the items endpoint of the collection pages the same way
    first = requests.get(f"{api}/collections/{COLLECTION}/items", params={"limit": 4}, timeout=30).json()
    assert len(first["features"]) == 4 and any(link["rel"] == "next" for link in first["links"])


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("key", ["-properties.eo:cloud_cover", "-eo:cloud_cover"])
def test_sortby_and_fields(api: str, tables_build: Path, method: str, key: str) -> None:
    client = Client.open(api)
    items = list(client.search(collections=[COLLECTION], sortby=key, method=method, limit=20).items())
    clouds = [item.properties["eo:cloud_cover"] for item in items]
    assert len(clouds) == len(query(str(tables_build)).ids) and clouds == sorted(clouds, reverse=True)
    assert clouds[0] > clouds[-1]
    slim = next(client.search(collections=[COLLECTION], fields=["id"], max_items=1).items_as_dicts())
    assert "properties" not in slim and "assets" not in slim and slim["id"]


def test_bad_requests_are_client_errors(api: str) -> None:
    bad_filter = requests.get(
        api + "/search", params={"filter": "eo:cloud_cover <<< 3", "filter-lang": "cql2-text"}, timeout=30
    )
    assert 400 <= bad_filter.status_code < 500
    bad_bbox = requests.get(api + "/search", params={"bbox": "1,2,3"}, timeout=30)
    assert 400 <= bad_bbox.status_code < 500


# Hrefs that resolve, xpystac ----------------------------------------------------------------------
def _xpystac_open(asset: Any) -> Any:
    import xarray as xr

    with warnings.catch_warnings():  # zarr 3.1 warns about consolidated metadata when it reads it
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        return xr.open_dataset(asset, engine="stac", mask_and_scale=False)


@pytest.mark.slow
def test_xpystac_opens_the_zarr_asset_from_the_api_and_from_items_parquet(demo_build: BuildStore) -> None:
    import pyarrow.parquet as pq
    import pystac
    from stac_geoparquet.arrow import stac_table_to_items

    root = Path(demo_build.root)
    ids = query(demo_build.uri, min_dates=2).ids
    assert ids
    expected = query(demo_build.uri, ids=ids).to_xarray(mask_and_scale=False)
    with running(create_app(load_catalog(demo_build.uri))) as url:
        items = list(Client.open(url).search(collections=[COLLECTION], ids=ids).items())
        assert sorted(i.id for i in items) == sorted(ids)
        for item in items:
            asset = item.assets["dataset"]
            assert asset.href == str(root / "dataset.zarr") and asset.media_type == "application/vnd+zarr"
            ds = _xpystac_open(asset)
            row = item.properties["spectralearth:row"]
            assert str(ds["patch_id"].values[row]) == item.id
            at = list(expected["patch_id"].values).index(item.id)
            assert np.array_equal(ds["reflectance"][row].values, expected["reflectance"][at].values)
            (derived,) = [link for link in item.links if link.rel == "derived_from"]
            scene = requests.get(derived.href, timeout=30).json()  # the source scene, served too
            assert scene["id"] == item.properties["spectralearth:scene_id"] and scene["collection"] == SCENES
    # straight from items.parquet, without the server: absolute hrefs
    rows = [
        pystac.Item.from_dict(d) for d in stac_table_to_items(pq.read_table(root / "stac" / "items.parquet"))
    ]
    assert {r.id for r in rows} >= set(ids)
    ds = _xpystac_open(rows[0].assets["dataset"])
    assert str(ds["patch_id"].values[rows[0].properties["spectralearth:row"]]) == rows[0].id


@pytest.mark.slow
def test_scene_items_carry_the_source_files(demo_build: BuildStore) -> None:
    import rasterio

    root = Path(demo_build.root)
    scene_items = [json.loads(path.read_text()) for path in (root / "stac").rglob("ENMAP01-*.json")]
    assert scene_items
    opened = 0
    for item in scene_items:
        assets = item["assets"]
        if "spectral_image" not in assets:  # the ZIP inside a tar.gz: the archive only
            assert set(assets) == {"archive"} and assets["archive"]["type"] == "application/gzip"
            assert Path(assets["archive"]["href"]).is_file()
            continue
        assert assets["metadata"]["roles"] == ["metadata"] and assets["metadata"]["type"] == "application/xml"
        spectral = assets["spectral_image"]
        assert spectral["roles"] == ["data", "reflectance"] and spectral["file:size"] > 0
        assert "https://stac-extensions.github.io/file/v2.1.0/schema.json" in item["stac_extensions"]
        with rasterio.open(spectral["href"]) as dataset:  # a folder's file, or zip://...!member in place
            assert dataset.count > 200
            opened += 1
    assert opened >= 3


@pytest.mark.slow
@pytest.mark.shared
def test_served_items_validate_offline(demo_build: BuildStore) -> None:
    if not SCHEMAS.is_dir():
        pytest.skip(f"STAC extension schemas not found at {SCHEMAS}")
    validator = offline_validator(SCHEMAS)
    with running(create_app(load_catalog(demo_build.uri))) as url:
        features = requests.get(url + "/search", params={"limit": 100}, timeout=30).json()["features"]
        collection = requests.get(f"{url}/collections/{COLLECTION}", timeout=30).json()
    assert features
    for feature in features:
        used = validate(validator, feature)
        assert SPECTRALEARTH_SCHEMA_URI in used
    validate(validator, collection)
    for path in (Path(demo_build.root) / "stac").rglob("*.json"):
        validate(validator, json.loads(path.read_text()))


@pytest.mark.slow
def test_a_moved_build_is_served_with_hrefs_to_where_it_is_now(
    demo_build: BuildStore, tmp_path: Path
) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(demo_build.root, moved, ignore=shutil.ignore_patterns("mask", "tiles", "_scratch"))
    served = load_catalog(str(moved))
    assert served.written_root == demo_build.root and served.build_root == str(moved)
    with running(create_app(served)) as url:
        items = list(Client.open(url).search(collections=[COLLECTION], max_items=3).items())
        scenes = requests.get(f"{url}/collections/{SCENES}", timeout=30).json()
        scene = requests.get(f"{url}/collections/{SCENES}/items", params={"limit": 1}, timeout=30).json()
    assert scenes["assets"]["geoparquet"]["href"] == str(moved / "stac" / "scenes.parquet")
    assert scene["features"] and all(link["href"].startswith(url) for link in scene["features"][0]["links"])
    assert items
    for item in items:
        assert item.assets["dataset"].href == str(moved / "dataset.zarr")
        (derived,) = [link.href for link in item.links if link.rel == "derived_from"]
        assert derived.startswith(url + f"/collections/{SCENES}/items/")
        assert _xpystac_open(item.assets["dataset"])["patch_id"].size > 0


def test_serving_a_build_on_s3(
    s3_server: str, tables_build: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import s3fs

    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing-key",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_server,
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    fs.mkdir("served-bucket")
    fs.put(str(tables_build / "stac") + "/", "served-bucket/build/stac/", recursive=True)
    served = load_catalog("s3://served-bucket/build", cache_dir=tmp_path / "cache")
    assert Path(served.items_parquet).is_file() and served.build_root == "s3://served-bucket/build"
    with running(create_app(served)) as url:
        items = list(Client.open(url).search(collections=[COLLECTION], max_items=5).items())
        collection = requests.get(f"{url}/collections/{COLLECTION}", timeout=30).json()
    assert len(items) == 5
    for item in items:  # written against the local folder, now rebased onto the bucket
        assert item.assets["dataset"].href == "s3://served-bucket/build/dataset.zarr"
        assert all(not link.href.startswith(str(tables_build)) for link in item.links)
    assert collection["assets"]["geoparquet"]["href"] == "s3://served-bucket/build/stac/items.parquet"


# The command --------------------------------------------------------------------------------------
def test_cli_serves_until_interrupted(tables_build: Path) -> None:
    from stac.serve import free_port

    port = free_port()
    command = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "serve",
        "--build",
        str(tables_build),
        "--port",
        str(port),
    ]
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO) as process:
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                try:
                    landing = requests.get(url + "/", timeout=5).json()
                    break
                except requests.ConnectionError:
                    assert process.poll() is None, "the server exited before answering"
                    assert time.monotonic() < deadline, "the server did not start"
                    time.sleep(0.2)
            assert landing["id"] == "spectralearth"
            assert len(Client.open(url).search(collections=[COLLECTION], max_items=3).item_collection()) == 3
        finally:
            process.send_signal(signal.SIGINT)  # Ctrl-C: uvicorn shuts down gracefully
            try:
                _, errors = process.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                _, errors = process.communicate()
    assert "Traceback" not in errors.decode()
    assert process.returncode in (0, -signal.SIGINT, 130)


def test_cli_one_line_error_without_a_catalog(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from pipeline.cli import main

    result = CliRunner().invoke(main, ["serve", "--build", str(tmp_path / "empty")])
    assert result.exit_code != 0
    assert "items.parquet is missing" in result.output and "Traceback" not in result.output
    with pytest.raises(ServeError, match="run the catalog stage first"):
        load_catalog(str(tmp_path / "empty"))
    assert os.listdir(tmp_path) == [] or not (tmp_path / "empty").exists()
