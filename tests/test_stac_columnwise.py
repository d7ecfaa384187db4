"""The column-wise parsers and writers agree with their one-value-at-a-time definitions; id lookups
skip row groups by the id statistics."""

from __future__ import annotations

from datetime import datetime

import pandas as pd
import pytest
import shapely
from hypothesis import given, settings
from hypothesis import strategies as st
from shapely.geometry import MultiPolygon, Polygon, box, shape

from stac.geoparquet import _wkb
from stac.records import geojson, geojson_many, iso_utc, iso_utc_many
from stac.search import _prune

# within the range of nanosecond timestamps, before and after 1970
MOMENTS = st.datetimes(min_value=datetime(1700, 1, 1), max_value=datetime(2200, 1, 1))


@settings(max_examples=50, deadline=None)
@given(st.lists(MOMENTS, min_size=1, max_size=20), st.sampled_from(["ns", "us", "ms", "s"]))
def test_iso_utc_many_matches_iso_utc(moments: list[datetime], unit: str) -> None:
    naive = pd.Series(pd.DatetimeIndex(moments).as_unit(unit))
    for series in (
        naive,
        naive.dt.tz_localize("UTC"),
        naive.dt.tz_localize("Europe/Berlin", ambiguous=True, nonexistent="shift_forward"),
    ):
        assert iso_utc_many(series) == [iso_utc(value) for value in series.tolist()]


def test_iso_utc_many_refuses_missing_times() -> None:
    with pytest.raises(ValueError, match="missing time"):
        iso_utc_many(pd.Series(pd.to_datetime(["2023-01-01", None], utc=True)))


def test_geojson_many_matches_geojson() -> None:
    clockwise = Polygon([(0, 0), (0, 1), (1, 1), (1, 0)])
    holed = Polygon([(0, 0), (4, 0), (4, 4), (0, 4)], [[(1, 1), (1, 2), (2, 2), (2, 1)]])
    polygons = [clockwise, holed, box(10, 47, 10.5, 47.5)] * 3
    assert geojson_many(polygons) == [geojson(p) for p in polygons]
    mixed = [*polygons, MultiPolygon([clockwise, box(5, 5, 6, 6)])]
    assert geojson_many(mixed) == [geojson(p) for p in mixed]


def test_wkb_matches_shape_by_shape() -> None:
    polygons = [Polygon([(0, 0), (0, 1), (1, 1), (1, 0)]), box(10, 47, 10.5, 47.5)]
    polygons.append(Polygon([(0, 0), (4, 0), (4, 4), (0, 4)], [[(1, 1), (1, 2), (2, 2), (2, 1)]]))
    geometries = [geometry for geometry, _ in geojson_many(polygons)]
    expected = [shapely.to_wkb(shape(g), flavor="iso") for g in geometries]
    assert _wkb(geometries) == expected
    unclosed = {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 1]]]}
    assert _wkb([unclosed]) == [shapely.to_wkb(shape(unclosed), flavor="iso")]


def test_id_statistics_prune_row_groups() -> None:
    stats = {"id": ("EPSG32632-0100-0100_a", "EPSG32632-0163-0163_z")}
    assert not _prune(stats, None, None, None, None, ["EPSG32632-0120-0100_x"])
    assert _prune(stats, None, None, None, None, ["EPSG32631-0120-0100_x", "EPSG32633-0001-0001_x"])
    assert not _prune(stats, None, None, None, None, ["A", "EPSG32632-0163-0163_z", "Z"])
    assert _prune(stats, None, None, None, None, [])
    assert not _prune({}, None, None, None, None, ["anything"])  # no statistics: read the group
