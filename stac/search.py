"""Search `stac/items.parquet` with STAC API item-search semantics, offline and fast.

    search("build/demo/stac/items.parquet", bbox=[10, 47, 11, 48], datetime="2023-05-01/..",
           max_cloud=10, min_dates=2, limit=100).ids

Semantics:
- `bbox` ([west, south, east, north], degrees) and `intersects` (EPSG:4326) select items whose geometry
  *intersects* the query: touching edges or corners count, as in the STAC API. Only one of the two.
  A bbox with west > east crosses the antimeridian (STAC API): it is the union of [west, 180] and
  [-180, east]. Longitudes lie in [-180, 180], latitudes in [-90, 90], south <= north, every number
  finite. `intersects` is a GeoJSON geometry (Point, MultiPoint, LineString, MultiLineString, Polygon,
  MultiPolygon, GeometryCollection), a Feature (its geometry), a FeatureCollection (the union of its
  features' geometries) or a shapely geometry; an invalid polygon (e.g. a self-intersecting ring) is
  repaired with `shapely.make_valid` before the test.
- `datetime` is a closed interval in UTC on the item's `datetime`: "start/end", "start/.." or "../end"
  (open ends), or a single value. A full RFC 3339 time is an instant (a naive one is taken as UTC); a
  bare date stands for its whole UTC day, so "2023-01-01/2023-06-30" includes everything acquired on
  30 June and "2023-05-01" alone is that day. Python `datetime`/`date` objects and (start, end) pairs
  are accepted too.
- `max_cloud`: `eo:cloud_cover` <= max_cloud (percent); `min_dates`: `spectralearth:n_dates` >=
  min_dates (dates with a patch at the item's location); `ids`: any of these item ids.
- Results are ordered by datetime, then id; `limit` keeps the first `limit` of them (`matched` counts all).
- A parameter that cannot be used raises `QueryError` (a ValueError) with a one-line message naming the
  parameter and what it accepts.

How (no DuckDB extension needed, fast on a 540,000-item file): row groups whose statistics (bbox struct
columns, datetime, cloud, n_dates, id) rule them out are skipped; the small filter columns of the others are
read and filtered with pyarrow; the exact shapely test runs on the survivors' geometries only; the
full rows of the final ids are read lazily, from their row groups, when `to_table`/`to_geojson` is
called. Measured on a synthetic 540,000-item file (30 MB, 66 row groups): 20-200 ms per query.
"""

from __future__ import annotations

import bisect
import functools
import math
import numbers
import operator
import os
import posixpath
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from functools import cached_property
from typing import Any, TypedDict, Unpack

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import tables
from pipeline.storage import BuildStore
from stac.records import iso_utc

DEFAULT_RELATIVE = tables.STAC_ITEMS
MAX_LIMIT = 1_000_000_000  # far above any build (SpectralEarth: 538,974 patches), within int64
MAX_MIN_DATES = 100_000


class QueryError(ValueError):
    """A search parameter that cannot be used: a one-line message naming it and what is allowed."""


_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


# Time ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class TimeWindow:
    """A closed interval [start, end] in UTC; None is an open end."""

    start: datetime | None
    end: datetime | None

    def contains(self, moment: datetime) -> bool:
        return (self.start is None or moment >= self.start) and (self.end is None or moment <= self.end)


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _bound(value: Any, *, end: bool) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text in ("", ".."):
            return None
        try:
            if _DATE.fullmatch(text):
                value = date.fromisoformat(text)
            else:
                value = datetime.fromisoformat(text.replace("z", "Z"))
        except ValueError:
            raise QueryError(f"datetime: not an RFC 3339 date or time: {text!r}") from None
    if isinstance(value, datetime):
        try:
            return _utc(value)
        except OverflowError:  # a time zone shifts it beyond year 1 or 9999
            raise QueryError(f"datetime: {value.isoformat()} is out of range in UTC") from None
    if isinstance(value, date):  # the whole UTC day
        return datetime.combine(value, time.max if end else time.min, tzinfo=UTC)
    raise QueryError(f"datetime: a time bound must be a string, date or datetime, got {value!r}")


def parse_datetime(value: Any) -> TimeWindow | None:
    """The STAC API `datetime` parameter as a closed UTC interval (see the module docstring)."""
    if value is None:
        return None
    if isinstance(value, str) and "/" in value:
        parts = value.split("/")
        if len(parts) != 2:
            raise QueryError(f"datetime: an interval is 'start/end', got {value!r}")
        window = TimeWindow(_bound(parts[0], end=False), _bound(parts[1], end=True))
    elif isinstance(value, tuple | list):
        if len(value) != 2:
            raise QueryError(f"datetime: an interval is (start, end), got {value!r}")
        window = TimeWindow(_bound(value[0], end=False), _bound(value[1], end=True))
    else:
        if isinstance(value, str) and value.strip() in ("", ".."):
            raise QueryError("datetime: a single datetime cannot be open ('..')")
        window = TimeWindow(_bound(value, end=False), _bound(value, end=True))
    if window.start is not None and window.end is not None and window.start > window.end:
        raise QueryError(f"datetime: the interval ends before it starts: {value!r}")
    return window


# Space --------------------------------------------------------------------------------------------
BBox = tuple[float, float, float, float]


def _number(value: Any, what: str) -> float:
    """`value` as a finite float, or QueryError naming `what`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise QueryError(f"{what} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise QueryError(f"{what} must be a finite number, got {value!r}")
    return number


def _longitude(value: Any, what: str) -> float:
    number = _number(value, what)
    if not -180.0 <= number <= 180.0:
        raise QueryError(f"{what} must be a longitude within [-180, 180], got {number:g}")
    return number


def _latitude(value: Any, what: str) -> float:
    number = _number(value, what)
    if not -90.0 <= number <= 90.0:
        raise QueryError(f"{what} must be a latitude within [-90, 90], got {number:g}")
    return number


def _boxes(bbox: Sequence[float]) -> list[BBox]:
    if isinstance(bbox, str | bytes) or not isinstance(bbox, Sequence):
        raise QueryError(f"bbox must be 4 (or 6) numbers west, south, east, north, got {bbox!r}")
    if len(bbox) == 6:  # 3-D: drop the heights (still numbers)
        _number(bbox[2], "bbox minimum height")
        _number(bbox[5], "bbox maximum height")
        bbox = (bbox[0], bbox[1], bbox[3], bbox[4])
    if len(bbox) != 4:
        raise QueryError(f"bbox must have 4 (or 6) numbers, got {list(bbox)!r}")
    west, east = _longitude(bbox[0], "bbox west"), _longitude(bbox[2], "bbox east")
    south, north = _latitude(bbox[1], "bbox south"), _latitude(bbox[3], "bbox north")
    if south > north:
        raise QueryError(f"bbox south {south:g} is above north {north:g}")
    if west > east:  # crosses the antimeridian (STAC API)
        return [(west, south, 180.0, north), (-180.0, south, east, north)]
    return [(west, south, east, north)]


# GeoJSON geometry types and how deep their coordinates nest (0: one position).
_DEPTH = {
    "Point": 0,
    "MultiPoint": 1,
    "LineString": 1,
    "MultiLineString": 2,
    "Polygon": 2,
    "MultiPolygon": 3,
}
_KNOWN_TYPES = (*_DEPTH, "GeometryCollection", "Feature", "FeatureCollection")
_CANONICAL = {name.lower(): name for name in _KNOWN_TYPES}


def _check_position(position: Any, where: str) -> None:
    if not isinstance(position, list | tuple) or len(position) not in (2, 3):
        raise QueryError(f"{where}: a position is [longitude, latitude], got {position!r}")
    _longitude(position[0], f"{where} longitude")
    _latitude(position[1], f"{where} latitude")
    if len(position) == 3:
        _number(position[2], f"{where} height")


def _check_coordinates(coordinates: Any, depth: int, where: str) -> None:
    if depth == 0:
        _check_position(coordinates, where)
        return
    if not isinstance(coordinates, list | tuple):
        raise QueryError(f"{where}: coordinates must be nested lists of positions, got {coordinates!r}")
    for index, inner in enumerate(coordinates):
        _check_coordinates(inner, depth - 1, f"{where}[{index}]")


def _geojson_type(value: Mapping[str, Any], where: str) -> str:
    kind = value.get("type")
    canonical = _CANONICAL.get(kind.lower()) if isinstance(kind, str) else None
    if canonical is None:
        shown = f"unknown type {kind!r}" if kind is not None else "no 'type'"
        raise QueryError(f"{where}: {shown} (GeoJSON types: {', '.join(_KNOWN_TYPES)})")
    return canonical


def _from_geojson(value: Any, where: str) -> Any:
    """A shapely geometry from a GeoJSON geometry, Feature or FeatureCollection, checked first so that
    a malformed document gives a one-line reason instead of an error from deep inside shapely."""
    if not isinstance(value, Mapping):
        raise QueryError(f"{where} must be a GeoJSON object, got {value!r}")
    kind = _geojson_type(value, where)
    if kind == "Feature":
        geometry = value.get("geometry")
        if geometry is None:
            raise QueryError(f"{where}: the Feature has no geometry")
        return _from_geojson(geometry, f"{where} geometry")
    if kind == "FeatureCollection":
        return _from_feature_collection(value, where)
    if kind == "GeometryCollection":
        return _from_geometry_collection(value, where)
    return _from_coordinates(value, kind, where)


def _from_feature_collection(value: Mapping[str, Any], where: str) -> Any:
    """The union of the features' geometries."""
    import shapely

    features = value.get("features")
    if not isinstance(features, list):
        raise QueryError(f"{where}: the FeatureCollection has no 'features' list")
    parts = []
    for index, feature in enumerate(features):
        inner = f"{where} features[{index}]"
        if not isinstance(feature, Mapping) or _geojson_type(feature, inner) != "Feature":
            raise QueryError(f"{inner} is not a Feature")
        if feature.get("geometry") is not None:  # GeoJSON allows unlocated features: they add nothing
            parts.append(_from_geojson(feature, inner))
    if not parts:
        raise QueryError(f"{where}: the FeatureCollection has no feature with a geometry")
    return shapely.union_all(parts)


def _from_geometry_collection(value: Mapping[str, Any], where: str) -> Any:
    import shapely

    members = value.get("geometries")
    if not isinstance(members, list):
        raise QueryError(f"{where}: the GeometryCollection has no 'geometries' list")
    parts = []
    for index, member in enumerate(members):
        inner = f"{where} geometries[{index}]"
        if isinstance(member, Mapping) and _geojson_type(member, inner) in ("Feature", "FeatureCollection"):
            raise QueryError(f"{inner} must be a geometry, not a {member['type']}")
        parts.append(_from_geojson(member, inner))
    return shapely.GeometryCollection(parts)


def _from_coordinates(value: Mapping[str, Any], kind: str, where: str) -> Any:
    """A Point .. MultiPolygon, its coordinates checked first, repaired when invalid."""
    import shapely
    from shapely.geometry import shape

    if "coordinates" not in value:
        raise QueryError(f"{where}: the {kind} has no 'coordinates'")
    _check_coordinates(value["coordinates"], _DEPTH[kind], f"{where} coordinates")
    try:
        geometry = shape({"type": kind, "coordinates": value["coordinates"]})
    except (ValueError, TypeError, IndexError, shapely.errors.ShapelyError) as exc:
        reason = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QueryError(f"{where}: not a valid {kind} ({reason})") from None
    return geometry if geometry.is_valid else shapely.make_valid(geometry)


def _geometry(value: Any) -> Any:
    import numpy as np
    import shapely

    if isinstance(value, shapely.Geometry):
        geometry = value
        coordinates = shapely.get_coordinates(geometry)
        if not np.isfinite(coordinates).all():
            raise QueryError("intersects: every coordinate must be a finite number")
        if coordinates.size and (
            np.abs(coordinates[:, 0]).max() > 180.0 or np.abs(coordinates[:, 1]).max() > 90.0
        ):
            raise QueryError("intersects: longitudes must lie within [-180, 180], latitudes within [-90, 90]")
        if not geometry.is_empty and not geometry.is_valid:
            geometry = shapely.make_valid(geometry)
    elif isinstance(value, Mapping):
        geometry = _from_geojson(value, "intersects")
    else:
        raise QueryError(
            f"intersects must be a GeoJSON geometry, Feature or FeatureCollection, or a shapely geometry, "
            f"got {type(value).__name__}"
        )
    if geometry.is_empty:
        raise QueryError("intersects is an empty geometry")
    return geometry


def _max_cloud(value: Any) -> float | None:
    if value is None:
        return None
    number = _number(value, "max_cloud")
    if not 0.0 <= number <= 100.0:
        raise QueryError(f"max_cloud must be a percentage within [0, 100], got {number:g}")
    return number


def _count(value: Any, name: str, low: int, high: int) -> int | None:
    if value is None:
        return None
    # numpy integers (from a table) count; bools and floats do not
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= int(value) <= high:
        raise QueryError(f"{name} must be an integer from {low} to {high}, got {value!r}")
    return int(value)


def _box_geometry(box: BBox) -> Any:
    """A bbox as a geometry; a degenerate one (zero width or height) as the line or point it is: a
    zero-area polygon is invalid, and the union of two of them (an antimeridian-crossing bbox with
    south == north) comes out empty."""
    import shapely

    west, south, east, north = box
    if west == east and south == north:
        return shapely.points(west, south)
    if west == east or south == north:
        return shapely.linestrings([(west, south), (east, north)])
    return shapely.box(west, south, east, north)


def _bbox_filter(box: BBox) -> pc.Expression:
    west, south, east, north = box
    return (
        (pc.field("bbox", "xmin") <= east)
        & (pc.field("bbox", "xmax") >= west)
        & (pc.field("bbox", "ymin") <= north)
        & (pc.field("bbox", "ymax") >= south)
    )


# Result -------------------------------------------------------------------------------------------
def _resolve(base: str, href: str) -> str:
    """`href` resolved against the file URI or path `base` (absolute hrefs are returned as they are)."""
    if "://" in href or href.startswith("/"):
        return href
    if "://" in base:
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(posixpath.dirname(rest), href))}"
    return posixpath.normpath(posixpath.join(posixpath.dirname(base), href))


@dataclass(frozen=True)
class SearchResult:
    """Matching items in result order (datetime, then id). `ids` come with the search; the full rows
    (`to_table`, `items`, `to_geojson`) are read on first use, from the row groups that hold them."""

    ids: tuple[str, ...]
    matched: int  # before `limit`
    source: str  # URI or absolute path of the items.parquet searched (relative hrefs resolve from it)
    _index: _Index = field(repr=False, compare=False)
    _rows: tuple[int, ...] = field(repr=False, compare=False)  # positions in the file, in result order

    def __len__(self) -> int:
        return len(self.ids)

    @cached_property
    def table(self) -> pa.Table:
        return self._index.rows(self._rows)

    def to_table(self) -> pa.Table:
        """The rows as an Arrow table (stac-geoparquet columns; `.to_pandas()` for a DataFrame)."""
        return self.table

    def items(self, absolute_hrefs: bool = True) -> list[dict[str, Any]]:
        """The items as STAC dicts (hrefs made absolute against the parquet file's location)."""
        from stac_geoparquet.arrow import stac_table_to_items

        table = self.table
        if not table.num_rows:
            return []
        times = table.column("datetime").to_pylist()
        out = []
        for index, item in enumerate(stac_table_to_items(table)):
            item["properties"] = {k: v for k, v in item["properties"].items() if v is not None}
            item["properties"]["datetime"] = iso_utc(times[index])
            item["bbox"] = [float(v) for v in item["bbox"]]
            for entry in item.get("links", []):
                for key in [k for k, v in entry.items() if v is None]:
                    del entry[key]
                if absolute_hrefs:
                    entry["href"] = _resolve(self.source, entry["href"])
            if absolute_hrefs:
                for asset in item.get("assets", {}).values():
                    asset["href"] = _resolve(self.source, asset["href"])
            out.append(item)
        return out

    def to_geojson(self, absolute_hrefs: bool = True) -> dict[str, Any]:
        """A GeoJSON FeatureCollection of the items (STAC API ItemCollection shape)."""
        features = self.items(absolute_hrefs=absolute_hrefs)
        return {
            "type": "FeatureCollection",
            "features": features,
            "numberMatched": self.matched,
            "numberReturned": len(features),
        }


# The file -----------------------------------------------------------------------------------------
FILTER_COLUMNS = ("id", "datetime", "bbox", "eo:cloud_cover", "spectralearth:n_dates")


class _Index:
    """An opened items.parquet: row-group offsets and statistics, reads by row group."""

    def __init__(self, source: Any, relative: str) -> None:
        import pyarrow.parquet as pq

        if isinstance(source, BuildStore):
            fs, path, self.uri = source.fs, source.path(relative), source.uri_of(relative)
        else:
            import fsspec

            text = os.fspath(source)
            fs, path = fsspec.core.url_to_fs(text)
            self.uri = text if "://" in text else os.path.abspath(text)
        if not fs.exists(path):
            raise FileNotFoundError(f"no items.parquet at {self.uri}")
        self.file = pq.ParquetFile(fs.open(path, "rb"))
        metadata = self.file.metadata
        self.starts: list[int] = []
        total = 0
        for group in range(metadata.num_row_groups):
            self.starts.append(total)
            total += metadata.row_group(group).num_rows
        self.num_rows = total

    def stats(self, group: int) -> dict[str, tuple[Any, Any]]:
        out = {}
        row_group = self.file.metadata.row_group(group)
        for column in range(row_group.num_columns):
            chunk = row_group.column(column)
            statistics = chunk.statistics
            if statistics is not None and statistics.has_min_max:
                out[chunk.path_in_schema] = (statistics.min, statistics.max)
        return out

    def read(self, groups: Sequence[int], columns: Sequence[str] | None) -> pa.Table:
        return self.file.read_row_groups(list(groups), columns=None if columns is None else list(columns))

    def locate(self, positions: Sequence[int]) -> tuple[list[int], pa.Array]:
        """The row groups holding these file positions, and each position's index in those groups read
        together (in the order given)."""
        import numpy as np

        wanted = np.asarray(positions, dtype=np.int64)
        starts = np.asarray(self.starts, dtype=np.int64)
        owner = np.searchsorted(starts, wanted, side="right") - 1
        groups = sorted(set(owner.tolist()))
        sizes = np.asarray([self.file.metadata.row_group(g).num_rows for g in groups], dtype=np.int64)
        base = dict(zip(groups, np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist(), strict=True))
        local = wanted - starts[owner] + np.asarray([base[g] for g in owner.tolist()], dtype=np.int64)
        return groups, pa.array(local, pa.int64())

    def rows(self, positions: Sequence[int], columns: Sequence[str] | None = None) -> pa.Table:
        """The rows at these file positions, in this order (all columns unless `columns`)."""
        if not len(positions):
            schema = self.file.schema_arrow
            return (
                schema.empty_table()
                if columns is None
                else pa.schema([schema.field(c) for c in columns]).empty_table()
            )
        groups, local = self.locate(positions)
        return self.read(groups, columns).take(local)


def _prune(
    stats: dict[str, tuple[Any, Any]],
    boxes: list[BBox] | None,
    window: TimeWindow | None,
    max_cloud: float | None,
    min_dates: int | None,
    ids: Sequence[str] | None = None,
) -> bool:
    """True when the row group's statistics show that no row of it can match (`ids` sorted)."""

    def get(name: str) -> tuple[Any, Any] | None:
        return stats.get(name)

    if ids is not None:
        # rows are in catalog order (zone, block, location, time) and ids start with the location, so
        # each row group holds a narrow id range: an id lookup reads one or two of them
        bounds = get("id")
        if not ids:
            return True
        if bounds and isinstance(bounds[0], str) and isinstance(bounds[1], str):
            at = bisect.bisect_left(ids, bounds[0])
            if at == len(ids) or ids[at] > bounds[1]:
                return True

    if boxes is not None:
        xmin, xmax, ymin, ymax = get("bbox.xmin"), get("bbox.xmax"), get("bbox.ymin"), get("bbox.ymax")
        if (
            xmin
            and xmax
            and ymin
            and ymax
            and all(
                xmin[0] > east or xmax[1] < west or ymin[0] > north or ymax[1] < south
                for west, south, east, north in boxes
            )
        ):
            return True
    cloud = get("eo:cloud_cover")
    if max_cloud is not None and cloud and cloud[0] > max_cloud:
        return True
    dates = get("spectralearth:n_dates")
    if min_dates is not None and dates and dates[1] < min_dates:
        return True
    times = get("datetime")
    if window is not None and times and isinstance(times[0], datetime):
        first, last = _utc(times[0]), _utc(times[1])
        if (window.start is not None and last < window.start) or (
            window.end is not None and first > window.end
        ):
            return True
    return False


# Search -------------------------------------------------------------------------------------------
def _and(left: pc.Expression | None, right: pc.Expression) -> pc.Expression:
    return right if left is None else left & right


class SearchCriteria(TypedDict, total=False):
    """`search`'s criteria, declared once: `search` and `pipeline.query.query` take them by keyword
    (`**criteria: Unpack[SearchCriteria]`). See the module docstring for the semantics of each."""

    bbox: Sequence[float] | None
    intersects: Any
    datetime: Any
    max_cloud: float | None
    min_dates: int | None
    ids: Iterable[str] | None
    limit: int | None


@dataclass(frozen=True, slots=True)
class SearchQuery:
    """`search`'s criteria parsed and checked (each one-line `QueryError` raised here, before any read)."""

    boxes: list[BBox] | None  # the bbox (two boxes across the antimeridian), or the bounds of `geometry`
    geometry: Any  # the exact spatial test (shapely), None without bbox or intersects
    window: TimeWindow | None
    max_cloud: float | None
    min_dates: int | None
    ids: list[str] | None  # sorted, distinct
    limit: int | None

    @classmethod
    def parse(cls, criteria: SearchCriteria) -> SearchQuery:
        unknown = sorted(set(criteria) - set(SearchCriteria.__annotations__))
        if unknown:
            raise TypeError(f"search() got an unexpected keyword argument {unknown[0]!r}")
        bbox, intersects = criteria.get("bbox"), criteria.get("intersects")
        if bbox is not None and intersects is not None:
            raise QueryError("give bbox or intersects, not both (STAC API)")
        limit = _count(criteria.get("limit"), "limit", 0, MAX_LIMIT)
        min_dates = _count(criteria.get("min_dates"), "min_dates", 1, MAX_MIN_DATES)
        max_cloud = _max_cloud(criteria.get("max_cloud"))
        window = parse_datetime(criteria.get("datetime"))
        boxes, geometry = _spatial(bbox, intersects)
        ids = criteria.get("ids")
        wanted = None if ids is None else sorted({str(i) for i in ([ids] if isinstance(ids, str) else ids)})
        return cls(boxes, geometry, window, max_cloud, min_dates, wanted, limit)

    def expression(self) -> pc.Expression | None:
        """The plain filters on the small columns (None: every row passes)."""
        expression: pc.Expression | None = None
        if self.boxes is not None:
            expression = functools.reduce(operator.or_, [_bbox_filter(box) for box in self.boxes])
        if self.window is not None:
            stamp = pa.timestamp("us", tz="UTC")
            if self.window.start is not None:
                expression = _and(
                    expression, pc.field("datetime") >= pa.scalar(self.window.start, type=stamp)
                )
            if self.window.end is not None:
                expression = _and(expression, pc.field("datetime") <= pa.scalar(self.window.end, type=stamp))
        if self.max_cloud is not None:
            expression = _and(expression, pc.field("eo:cloud_cover") <= float(self.max_cloud))
        if self.min_dates is not None:
            expression = _and(expression, pc.field("spectralearth:n_dates") >= int(self.min_dates))
        if self.ids is not None:
            expression = _and(expression, pc.field("id").isin(pa.array(self.ids, pa.string())))
        return expression


def _spatial(bbox: Sequence[float] | None, intersects: Any) -> tuple[list[BBox] | None, Any]:
    """(the boxes the row-group statistics and the bbox columns are tested against, the exact geometry)."""
    import shapely

    if bbox is not None:
        boxes = _boxes(bbox)
        return boxes, shapely.union_all([_box_geometry(box) for box in boxes])
    if intersects is not None:
        geometry = _geometry(intersects)
        west, south, east, north = (float(v) for v in geometry.bounds)
        return [(west, south, east, north)], geometry
    return None, None


def _candidates(index: _Index, query: SearchQuery) -> pa.Table:
    """The filter columns (and `_position`) of the rows that pass the plain filters: 1. row groups that
    statistics cannot rule out; 2. plain filters on their small columns."""
    import numpy as np

    groups = [
        group
        for group in range(len(index.starts))
        if not _prune(
            index.stats(group), query.boxes, query.window, query.max_cloud, query.min_dates, query.ids
        )
    ]
    columns = [c for c in FILTER_COLUMNS if c in index.file.schema_arrow.names]
    candidates = index.read(groups, columns)
    positions = (
        np.concatenate(
            [
                np.arange(index.starts[g], index.starts[g] + index.file.metadata.row_group(g).num_rows)
                for g in groups
            ]
        )
        if groups
        else np.zeros(0, dtype=np.int64)
    )
    candidates = candidates.append_column("_position", pa.array(positions, pa.int64()))
    expression = query.expression()
    return candidates if expression is None else candidates.filter(expression)


def _intersecting(index: _Index, candidates: pa.Table, geometry: Any) -> pa.Table:
    """3. the exact geometry test, on the survivors' geometries only."""
    import numpy as np
    import shapely

    if geometry is None or not candidates.num_rows:
        return candidates
    survivors = candidates.column("_position").to_numpy()
    wkb = index.rows(survivors.tolist(), ["geometry"]).column("geometry")
    shapes = shapely.from_wkb(wkb.to_numpy(zero_copy_only=False))
    shapely.prepare(geometry)
    keep = shapely.intersects(shapes, geometry)
    return candidates.filter(pa.array(np.asarray(keep, dtype=bool)))


def search(
    items_parquet: Any, *, relative: str = DEFAULT_RELATIVE, **criteria: Unpack[SearchCriteria]
) -> SearchResult:
    """Search the items of a stac-geoparquet file (a path, an `s3://` URI, or a `BuildStore` whose
    `relative` file is read). See the module docstring for the semantics of each criterion."""
    query = SearchQuery.parse(criteria)
    index = _Index(items_parquet, relative)
    candidates = _intersecting(index, _candidates(index, query), query.geometry)
    ordered = candidates.select(["id", "datetime", "_position"]).sort_by(
        [("datetime", "ascending"), ("id", "ascending")]
    )
    matched = ordered.num_rows
    if query.limit is not None:
        ordered = ordered.slice(0, query.limit)
    return SearchResult(
        ids=tuple(ordered.column("id").to_pylist()),
        matched=matched,
        source=index.uri,
        _index=index,
        _rows=tuple(ordered.column("_position").to_pylist()),
    )
