"""`stac.search` against a brute-force filter over the JSON items (shapely on every item)."""

from __future__ import annotations

import json
import math
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from shapely.geometry import box, mapping, shape
from shapely.ops import unary_union

from pipeline.storage import BuildStore
from stac import geoparquet
from stac.catalog_writer import build_catalog
from stac.search import QueryError, TimeWindow, parse_datetime, search
from stac.settings import CatalogSettings
from tests.stac_helpers import block_network, json_files, make_tables, many_scene_specs, write_tables


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    block_network(monkeypatch)


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    root = tmp_path_factory.mktemp("search")
    store = BuildStore(str(root))
    # scenes on a diagonal in two zones (revisits overlap) plus the default scenes (duplicates)
    scenes, patches = make_tables(many_scene_specs(6, 5))
    default_scenes, default_patches = make_tables()
    scenes = pd.concat([scenes, default_scenes], ignore_index=True)
    default_patches["row"] += len(patches)
    patches = pd.concat([patches, default_patches], ignore_index=True)
    write_tables(store, scenes, patches)
    with pytest.MonkeyPatch.context() as patch:  # many small row groups: statistics pruning is exercised
        patch.setattr(geoparquet, "ROW_GROUP_SIZE", 16)
        build_catalog(store, CatalogSettings(items_per_catalog=20), [(1, 418.2, 6.99561)])
    items = [
        document
        for path in json_files(root / "stac" / "spectralearth-enmap-patches")
        if (document := json.loads(path.read_text()))["type"] == "Feature"
    ]
    return root / "stac" / "items.parquet", items


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def brute_force(
    items: list[dict[str, Any]],
    bbox: tuple[float, float, float, float] | None = None,
    intersects: Any = None,
    window: TimeWindow | None = None,
    max_cloud: float | None = None,
    min_dates: int | None = None,
    ids: list[str] | None = None,
    limit: int | None = None,
) -> list[str]:
    query = box(*bbox) if bbox is not None else (shape(intersects) if intersects is not None else None)
    found = []
    for item in items:
        props = item["properties"]
        if query is not None and not shape(item["geometry"]).intersects(query):
            continue
        if window is not None and not window.contains(_time(props["datetime"])):
            continue
        if max_cloud is not None and not props["eo:cloud_cover"] <= max_cloud:
            continue
        if min_dates is not None and props["spectralearth:n_dates"] < min_dates:
            continue
        if ids is not None and item["id"] not in ids:
            continue
        found.append((_time(props["datetime"]), item["id"]))
    ordered = [item_id for _, item_id in sorted(found)]
    return ordered if limit is None else ordered[:limit]


def test_index_has_what_the_properties_need(index: tuple[Path, list[dict[str, Any]]]) -> None:
    import pyarrow.parquet as pq

    path, items = index
    assert pq.ParquetFile(path).metadata.num_row_groups == -(-len(items) // 16)
    assert len(items) > 100
    assert {item["properties"]["spectralearth:n_dates"] for item in items} >= {1, 2}
    assert len({item["properties"]["proj:code"] for item in items}) == 2


# Hypothesis against brute force -------------------------------------------------------------------


def draw_bbox(draw: st.DrawFn, items: list[dict[str, Any]]) -> tuple[float, ...] | None:
    """None, a box near an item (any size), an item's own bbox (its neighbours touch or overlap it), or
    a wide box around one."""
    kind = draw(st.sampled_from(["none", "near", "exact", "wide"]))
    anchor = draw(st.sampled_from(items))["bbox"]
    if kind == "near":
        west = draw(st.floats(anchor[0] - 0.2, anchor[2]))
        south = draw(st.floats(anchor[1] - 0.2, anchor[3]))
        return (west, south, west + draw(st.floats(0.0, 0.4)), south + draw(st.floats(0.0, 0.3)))
    if kind == "exact":
        return tuple(anchor)
    if kind == "wide":
        return (anchor[0] - 3.0, anchor[1] - 1.0, anchor[2] + 3.0, anchor[3] + 1.0)
    return None


def draw_datetime(draw: st.DrawFn, items: list[dict[str, Any]]) -> str | None:
    """None, one day, or an interval (open at either end) whose bounds fall on, just before or just after
    the items' days, written as dates or as instants."""
    item_days = sorted({_time(item["properties"]["datetime"]).date() for item in items})
    days = sorted({day + timedelta(days=shift) for day in item_days for shift in (-1, 0, 1)})
    if not draw(st.booleans()):
        return None
    start = draw(st.one_of(st.none(), st.sampled_from(days)))
    end = draw(st.one_of(st.none(), st.sampled_from(days)))
    if start is not None and end is not None and end < start:
        start, end = end, start
    if start is None and end is None:
        return draw(st.sampled_from(days)).isoformat()
    form = draw(st.sampled_from(["date", "instant"]))

    def text(day: date | None) -> str:
        if day is None:
            return ".."
        if form == "date":
            return day.isoformat()
        moment = datetime.combine(day, datetime.min.time(), tzinfo=UTC) + timedelta(hours=10)
        return moment.isoformat().replace("+00:00", "Z")

    return f"{text(start)}/{text(end)}"


@st.composite
def queries(draw: st.DrawFn, items: list[dict[str, Any]]) -> dict[str, Any]:
    query: dict[str, Any] = {}
    bbox = draw_bbox(draw, items)
    if bbox is not None:
        query["bbox"] = bbox
    interval = draw_datetime(draw, items)
    if interval is not None:
        query["datetime"] = interval
    if draw(st.booleans()):
        query["max_cloud"] = draw(st.sampled_from([0.0, 5.0, 15.0, 30.0]))
    if draw(st.booleans()):
        query["min_dates"] = draw(st.integers(1, 3))
    if draw(st.integers(0, 4)) == 0:
        all_ids = sorted(item["id"] for item in items)
        query["ids"] = draw(st.lists(st.sampled_from(all_ids), max_size=8)) + ["no-such-item"]
    if draw(st.booleans()):
        query["limit"] = draw(st.integers(0, 12))
    return query


def test_search_matches_brute_force(index: tuple[Path, list[dict[str, Any]]]) -> None:
    path, items = index

    @settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(queries(items))
    def check(query: dict[str, Any]) -> None:
        result = search(path, **query)
        expected = brute_force(
            items,
            bbox=query.get("bbox"),
            window=parse_datetime(query.get("datetime")),
            max_cloud=query.get("max_cloud"),
            min_dates=query.get("min_dates"),
            ids=query.get("ids"),
            limit=query.get("limit"),
        )
        assert list(result.ids) == expected
        assert result.matched == len(brute_force(**{**_brute_args(items, query), "limit": None}))

    check()


def _brute_args(items: list[dict[str, Any]], query: dict[str, Any]) -> dict[str, Any]:
    return {
        "items": items,
        "bbox": query.get("bbox"),
        "window": parse_datetime(query.get("datetime")),
        "max_cloud": query.get("max_cloud"),
        "min_dates": query.get("min_dates"),
        "ids": query.get("ids"),
        "limit": query.get("limit"),
    }


# Geometry edge cases ------------------------------------------------------------------------------
def test_touching_edges_and_corners_count(index: tuple[Path, list[dict[str, Any]]]) -> None:
    path, items = index
    item = items[0]
    ring = item["geometry"]["coordinates"][0]
    east = max(ring, key=lambda point: point[0])  # the easternmost vertex
    touching = (east[0], east[1] - 0.001, east[0] + 0.01, east[1] + 0.001)
    assert item["id"] in search(path, bbox=touching).ids
    assert search(path, bbox=touching).ids == tuple(brute_force(items, bbox=touching))
    beyond = (east[0] + 1e-9, east[1] - 0.001, east[0] + 0.01, east[1] + 0.001)
    assert item["id"] not in search(path, bbox=beyond).ids
    # a degenerate bbox (a point) on a vertex also intersects
    point = (east[0], east[1], east[0], east[1])
    assert item["id"] in search(path, bbox=point).ids
    # a polygon sharing only an edge with the item
    south_west = min(ring, key=lambda p: (p[1], p[0]))
    polygon = {
        "type": "Polygon",
        "coordinates": [[east, south_west, [south_west[0], south_west[1] - 0.05], east]],
    }
    result = search(path, intersects=polygon)
    assert item["id"] in result.ids
    assert list(result.ids) == brute_force(items, intersects=polygon)


def test_geojson_polygon_query(index: tuple[Path, list[dict[str, Any]]]) -> None:
    path, items = index
    triangle = {
        "type": "Polygon",
        "coordinates": [[[10.6, 47.5], [11.0, 47.55], [10.8, 47.75], [10.6, 47.5]]],
    }
    result = search(path, intersects=triangle, datetime="2023-01-01/2023-12-31")
    expected = brute_force(items, intersects=triangle, window=parse_datetime("2023-01-01/2023-12-31"))
    assert expected and list(result.ids) == expected
    # a shapely geometry works the same
    assert search(path, intersects=shape(triangle), datetime="2023-01-01/2023-12-31").ids == result.ids


def test_antimeridian_bbox_is_split(index: tuple[Path, list[dict[str, Any]]]) -> None:
    path, items = index
    result = search(path, bbox=(170.0, 40.0, 11.0, 50.0))
    assert list(result.ids) == brute_force(items, bbox=(-180.0, 40.0, 11.0, 50.0))
    assert search(path, bbox=(170.0, 40.0, -170.0, 50.0)).ids == ()


# Results ------------------------------------------------------------------------------------------
def test_result_outputs(index: tuple[Path, list[dict[str, Any]]]) -> None:
    path, items = index
    result = search(path, min_dates=2, limit=3)
    assert len(result) == 3 and result.matched == len(brute_force(items, min_dates=2))
    table = result.to_table()
    assert isinstance(table, pa.Table) and table.column("id").to_pylist() == list(result.ids)
    collection = result.to_geojson()
    assert collection["type"] == "FeatureCollection" and collection["numberMatched"] == result.matched
    features = collection["features"]
    assert [f["id"] for f in features] == list(result.ids)
    by_id = {item["id"]: item for item in items}
    for feature in features:
        original = by_id[feature["id"]]
        assert feature["properties"] == original["properties"]
        assert feature["geometry"] == original["geometry"] and feature["bbox"] == original["bbox"]
        assert feature["assets"]["dataset"]["href"] == str(path.parent.parent / "dataset.zarr")
        derived = [e for e in feature["links"] if e["rel"] == "derived_from"][0]
        assert Path(derived["href"]).is_file()
    # As stored: items.parquet carries the absolute location the catalog stage wrote (SPEC, stage 6).
    stored = result.to_geojson(absolute_hrefs=False)["features"][0]["assets"]["dataset"]["href"]
    assert stored == str(path.parent.parent.resolve() / "dataset.zarr")
    empty = search(path, ids=["nothing"])
    assert empty.ids == () and empty.to_geojson()["features"] == [] and empty.matched == 0


def test_search_through_a_build_store(index: tuple[Path, list[dict[str, Any]]]) -> None:
    path, items = index
    store = BuildStore(str(path.parent.parent))
    assert search(store, max_cloud=0).ids == tuple(brute_force(items, max_cloud=0))
    with pytest.raises(FileNotFoundError):
        search(store, relative="stac/missing.parquet")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bbox": (0, 0, 1, 1), "intersects": {"type": "Point", "coordinates": [0, 0]}}, "not both"),
        ({"bbox": (0, 1, 1, 0)}, "south"),
        ({"bbox": (0, 1, 1)}, "4"),
        ({"limit": -1}, "limit"),
        ({"datetime": "2023-02-01/2023-01-01"}, "before it starts"),
        ({"datetime": "yesterday"}, "RFC 3339"),
        ({"datetime": "a/b/c"}, "start/end"),
        ({"datetime": ".."}, "open"),
    ],
)
def test_bad_queries(index: tuple[Path, list[dict[str, Any]]], kwargs: dict[str, Any], message: str) -> None:
    path, _ = index
    with pytest.raises(QueryError, match=message):
        search(path, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"limit": 10**20}, r"limit must be an integer from 0 to 1000000000, got 100000000000000000000"),
        ({"limit": 2.5}, "limit must be an integer"),
        ({"limit": True}, "limit must be an integer"),
        ({"min_dates": 0}, "min_dates must be an integer from 1"),
        ({"min_dates": 10**30}, "min_dates must be an integer from 1"),
        ({"max_cloud": float("nan")}, "max_cloud must be a finite number"),
        ({"max_cloud": -1}, r"max_cloud must be a percentage within \[0, 100\]"),
        ({"bbox": (0, 0, float("nan"), 1)}, "bbox east must be a finite number"),
        ({"bbox": (0, 0, 1, 1, 2, float("inf"))}, "bbox maximum height must be a finite number"),
        ({"bbox": (0, -90.5, 1, 1)}, "bbox south must be a latitude"),
        ({"bbox": (181, 0, 182, 1)}, "bbox west must be a longitude"),
        ({"bbox": "0,0,1,1"}, "bbox must be 4"),
        ({"bbox": (0, "0", 1, 1)}, "bbox south must be a number"),
        ({"intersects": {"type": "Polygon"}}, "the Polygon has no 'coordinates'"),
        ({"intersects": {"type": "Circle", "coordinates": [0, 0]}}, "unknown type 'Circle'"),
        ({"intersects": {"type": "Point", "coordinates": [0, float("nan")]}}, "latitude must be a finite"),
        ({"intersects": {"type": "Point", "coordinates": [0, 91]}}, "latitude must be a latitude"),
        ({"intersects": box(0, 0, float("inf"), 1)}, "every coordinate must be a finite number"),
        ({"intersects": box(0, 0, 1, 100)}, "latitudes within"),
        ({"intersects": "POINT (0 0)"}, "intersects must be a GeoJSON geometry"),
        ({"intersects": {"type": "GeometryCollection"}}, "no 'geometries' list"),
        (
            {
                "intersects": {
                    "type": "GeometryCollection",
                    "geometries": [{"type": "Feature", "geometry": None}],
                }
            },
            r"geometries\[0\] must be a geometry, not a Feature",
        ),
        ({"datetime": "9999-12-31T23:00:00-05:00"}, "out of range in UTC"),
        ({"datetime": 20230101}, "a time bound must be a string"),
    ],
)
def test_unusable_values_raise_query_error(
    index: tuple[Path, list[dict[str, Any]]], kwargs: dict[str, Any], message: str
) -> None:
    path, _ = index
    with pytest.raises(QueryError, match=message) as caught:
        search(path, **kwargs)
    assert "\n" not in str(caught.value)


def test_a_date_bound_on_the_last_day_of_year_9999(index: tuple[Path, list[dict[str, Any]]]) -> None:
    path, items = index
    # the end of the last representable day, not an overflow
    assert search(path, datetime="2023-01-01/9999-12-31").ids == tuple(
        brute_force(items, window=parse_datetime("2023-01-01/.."))
    )


def test_any_bbox_is_searched_or_refused(index: tuple[Path, list[dict[str, Any]]]) -> None:
    """Every 4-number bbox either matches brute force (west > east: both sides of the antimeridian) or
    raises QueryError; never another exception, never a silent empty answer for NaN."""
    path, items = index
    number = st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.floats(-200, 200),
        st.sampled_from([-180.0, 180.0, -90.0, 90.0, 10.7, 47.5, 11.0, 47.6]),
    )

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.tuples(number, number, number, number))
    # Found by this test: a zero-height bbox crossing the antimeridian (two degenerate boxes whose union
    # came out empty); and a zero-width one.
    @example((0.0, 47.5, -1.0, 47.5))
    @example((11.0, 47.5, 11.0, 47.6))
    def check(bbox: tuple[float, float, float, float]) -> None:
        west, south, east, north = bbox
        valid = (
            all(math.isfinite(v) for v in bbox)
            and -180 <= west <= 180
            and -180 <= east <= 180
            and -90 <= south <= north <= 90
        )
        if not valid:
            with pytest.raises(QueryError):
                search(path, bbox=bbox)
            return
        area = (
            box(west, south, east, north)
            if west <= east
            else box(west, south, 180, north).union(box(-180, south, east, north))
        )
        assert list(search(path, bbox=bbox).ids) == brute_force(items, intersects=area)

    check()


def test_feature_collection_is_the_union_of_its_features(index: tuple[Path, list[dict[str, Any]]]) -> None:
    path, items = index
    first, last = shape(items[0]["geometry"]), shape(items[-1]["geometry"])
    areas = [first.centroid.buffer(0.002), last.centroid.buffer(0.002)]
    collection = {
        "type": "FeatureCollection",
        "features": [{"type": "Feature", "properties": {}, "geometry": mapping(area)} for area in areas],
    }
    union = unary_union(areas)
    result = search(path, intersects=collection, datetime="2023-01-01/2024-12-31")
    expected = brute_force(items, intersects=union, window=parse_datetime("2023-01-01/2024-12-31"))
    assert expected and list(result.ids) == expected
    assert (
        search(path, intersects=collection["features"][0]).ids
        == search(path, intersects=mapping(areas[0])).ids
    )
    collection_of_geometries = {"type": "GeometryCollection", "geometries": [mapping(a) for a in areas]}
    assert search(path, intersects=collection_of_geometries).ids == search(path, intersects=collection).ids


# Time semantics -----------------------------------------------------------------------------------
def test_datetime_semantics() -> None:
    day_end = datetime(2023, 6, 30, 23, 59, 59, 999999, tzinfo=UTC)
    assert parse_datetime("2023-01-01/2023-06-30") == TimeWindow(datetime(2023, 1, 1, tzinfo=UTC), day_end)
    assert parse_datetime("2023-06-30") == TimeWindow(datetime(2023, 6, 30, tzinfo=UTC), day_end)
    assert parse_datetime("../2023-06-30") == TimeWindow(None, day_end)
    assert parse_datetime("2023-06-30T12:00:00Z/") == TimeWindow(datetime(2023, 6, 30, 12, tzinfo=UTC), None)
    instant = datetime(2023, 6, 30, 12, 0, 0, 500, tzinfo=UTC)
    assert parse_datetime("2023-06-30T14:00:00.000500+02:00") == TimeWindow(instant, instant)
    naive = parse_datetime("2023-06-30T12:00:00")
    assert naive is not None and naive.start == datetime(2023, 6, 30, 12, tzinfo=UTC)
    assert parse_datetime((date(2023, 1, 1), None)) == TimeWindow(datetime(2023, 1, 1, tzinfo=UTC), None)
    assert parse_datetime(None) is None
    window = parse_datetime("2023-01-01/2023-06-30")
    assert (
        window is not None
        and window.contains(day_end)
        and not window.contains(day_end + timedelta(microseconds=1))
    )


def test_closed_interval_on_exact_item_time(index: tuple[Path, list[dict[str, Any]]]) -> None:
    path, items = index
    moment = items[0]["properties"]["datetime"]
    same_time = [i["id"] for i in items if i["properties"]["datetime"] == moment]
    assert sorted(search(path, datetime=moment).ids) == sorted(same_time)
    assert set(same_time) <= set(search(path, datetime=f"{moment}/{moment}").ids)
    assert set(same_time) <= set(search(path, datetime=f"../{moment}").ids)
    assert set(same_time) <= set(search(path, datetime=f"{moment}/..").ids)
