"""Parse the build's tables into frozen records: the only place that knows the table columns.

`index/patches.parquet` rows become `PatchRecord`s, `inventory/scenes.parquet` rows `SceneRow`s; the
item builders in `stac.builders` only see these records. Values are normalised here once: times to RFC 3339
UTC strings, geometries to GeoJSON dicts (exterior rings counter-clockwise, RFC 7946), missing or
non-finite numbers to None (the builders then leave the field out rather than write NaN).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline import tables
from pipeline.quality import FLAG_NAMES

BBox = tuple[float, float, float, float]

# The order of the quality flags in `spectralearth:quality_fractions` (pipeline.quality.FLAG_BITS order).
FLAG_ORDER = FLAG_NAMES


@dataclass(frozen=True, slots=True)
class Band:
    """One band of the build's band axis: its 1-based number in the product and its response in nm."""

    number: int
    wavelength_nm: float | None  # None: not a positive finite number, so not stated in the catalog
    fwhm_nm: float | None

    @property
    def name(self) -> str:
        return f"B{self.number:03d}"


def _positive(value: Any) -> float | None:
    number = _number(value)
    return number if number is not None and number > 0 else None


def parse_bands(bands: Iterable[tuple[int, float, float] | Band]) -> tuple[Band, ...]:
    out = []
    for band in bands:
        if isinstance(band, Band):
            number, wavelength, fwhm = band.number, band.wavelength_nm, band.fwhm_nm
        else:
            number, wavelength, fwhm = band
        if int(number) < 1:
            raise ValueError(f"invalid band number {number}: band numbers start at 1")
        # A response the catalog cannot state (not a positive finite number: inventory rejects such
        # products, but an older build's tables may hold one) is left out of that band's object; it must
        # not fail the catalog of every patch of the build, whose band axis comes from one scene.
        out.append(Band(int(number), _positive(wavelength), _positive(fwhm)))
    numbers = [b.number for b in out]
    if len(set(numbers)) != len(numbers):
        raise ValueError("the band axis must not hold a band twice")
    return tuple(out)


@dataclass(frozen=True, slots=True)
class PatchRecord:
    """One row of `index/patches.parquet`."""

    row: int
    patch_id: str
    location_id: str
    scene_id: str
    duplicates: tuple[str, ...]
    epsg: int
    i: int
    j: int
    col_off: int
    row_off: int
    size: int
    x_ul: float
    y_ul: float
    pixel: tuple[float, float, float, float]  # (a, b, d, e) of the scene transform
    datetime: str
    datatake_id: str
    processor_version: str
    fractions: tuple[tuple[str, float], ...]
    n_dates: int
    geometry: dict[str, Any]
    bbox: BBox

    def fraction(self, flag: str) -> float | None:
        return dict(self.fractions).get(flag)


@dataclass(frozen=True, slots=True)
class ProductFiles:
    """Where a scene's source product lies (`inventory/scenes.parquet`): its container (folder, ZIP or
    tar.gz), the product ZIP inside a tar.gz, and its files as (path in the container or ZIP, bytes)."""

    packaging: str  # "folder" | "zip" | "targz"
    container_uri: str
    inner_zip: str | None
    members: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class SceneRow:
    """One row of `inventory/scenes.parquet` (the fields the catalog uses)."""

    scene_id: str
    datatake_id: str
    tile_id: int
    start_datetime: str
    end_datetime: str
    processor_version: str
    processing_datetime: str | None
    epsg: int
    transform: tuple[float, float, float, float, float, float]
    width: int
    height: int
    cloud_cover: float | None
    snow_cover: float | None
    cover: tuple[tuple[str, float], ...]  # other quality percentages: cloud_shadow, haze, cirrus, water
    sun_elevation: float | None
    sun_azimuth: float | None
    across_off_nadir: float | None
    along_off_nadir: float | None
    scene_azimuth: float | None
    orbit_number: int | None
    orbit_direction: str | None
    fingerprint: str | None
    geometry: dict[str, Any]
    bbox: BBox
    files: ProductFiles | None = None  # None when the table does not say where the product lies

    @property
    def year(self) -> int:
        return int(self.start_datetime[:4])


def iso_utc(value: Any) -> str:
    """RFC 3339 in UTC with a `Z`, microseconds only when not zero (a naive time is taken as UTC)."""
    import pandas as pd

    stamp = pd.Timestamp(value)
    if stamp is pd.NaT:
        raise ValueError("missing time")
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    stamp = stamp.floor("us")
    text = stamp.strftime("%Y-%m-%dT%H:%M:%S")
    if stamp.microsecond:
        text += f".{stamp.microsecond:06d}"
    return text + "Z"


def _number(value: Any) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _integer(value: Any) -> int | None:
    number = _number(value)
    return None if number is None else int(number)


def _text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(value)


def _lists(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_lists(v) for v in value]
    return value


def geojson(geometry: Any) -> tuple[dict[str, Any], BBox]:
    """A shapely geometry as a GeoJSON dict (lists, counter-clockwise exterior rings) and its bbox."""
    import shapely
    from shapely.geometry import mapping

    if geometry is None or geometry.is_empty:
        raise ValueError("missing or empty geometry")
    oriented = shapely.orient_polygons(geometry, exterior_cw=False)
    xmin, ymin, xmax, ymax = (float(v) for v in oriented.bounds)
    return _lists(dict(mapping(oriented))), (xmin, ymin, xmax, ymax)


def geojson_many(geometries: Any) -> list[tuple[dict[str, Any], BBox]]:
    """`geojson` for a sequence of shapely geometries, array-wise for 2-D polygons (the cells of the
    index; one call per geometry took most of the catalog's parse time at archive scale)."""
    import numpy as np
    import shapely

    array = np.asarray(geometries, dtype=object)
    if not len(array):
        return []
    valid = shapely.get_type_id(array) == shapely.GeometryType.POLYGON
    valid &= ~shapely.is_empty(array) & ~shapely.has_z(array)
    if not valid.all():
        return [geojson(geometry) for geometry in array]
    out: list[tuple[dict[str, Any], BBox]] = []
    for start in range(0, len(array), _CHUNK):  # in chunks: the GEOS copies and coordinate arrays
        out.extend(_polygons_geojson(array[start : start + _CHUNK]))  # of all rows would double peak RSS
    return out


_CHUNK = 65536


def _polygons_geojson(array: Any) -> list[tuple[dict[str, Any], BBox]]:
    import shapely

    oriented = shapely.orient_polygons(array, exterior_cw=False)
    bounds = [tuple(box) for box in shapely.bounds(oriented).tolist()]
    _, coordinates, (ring_offsets, polygon_offsets) = shapely.to_ragged_array(oriented)
    # tuples, as shapely's `mapping` gives them
    points = list(zip(coordinates[:, 0].tolist(), coordinates[:, 1].tolist(), strict=True))
    rings = ring_offsets.tolist()
    polygons = polygon_offsets.tolist()
    out = []
    for k in range(len(array)):
        shape = tuple(tuple(points[rings[r] : rings[r + 1]]) for r in range(polygons[k], polygons[k + 1]))
        out.append(({"type": "Polygon", "coordinates": shape}, bounds[k]))
    return out


def iso_utc_many(values: Any) -> list[str]:
    """`iso_utc` for a column, array-wise for datetime64 columns within years 1000-9999."""
    import numpy as np
    import pandas as pd

    series = values if isinstance(values, pd.Series) else pd.Series(values)
    if series.dtype.kind != "M":
        return [iso_utc(value) for value in series.tolist()]
    index = pd.DatetimeIndex(series)
    if index.hasnans:
        raise ValueError("missing time")
    index = index.tz_localize("UTC") if index.tz is None else index.tz_convert("UTC")
    micros = index.floor("us").tz_localize(None).as_unit("us").asi8
    seconds = np.floor_divide(micros, 1_000_000)
    fraction = (micros - seconds * 1_000_000).tolist()
    years = index.year
    if len(index) and (years.min() < 1000 or years.max() > 9999):  # strftime's %Y and numpy's differ
        return [iso_utc(value) for value in series.tolist()]
    text = np.datetime_as_string(seconds.astype("datetime64[s]"), unit="s").tolist()
    return [f"{t}.{f:06d}Z" if f else f"{t}Z" for t, f in zip(text, fraction, strict=True)]


def flags_of(columns: Iterable[str]) -> tuple[str, ...]:
    """The quality flags with a `<flag>_fraction` column, in FLAG_ORDER then alphabetical order."""
    present = {c.removesuffix("_fraction") for c in columns if c.endswith("_fraction")}
    known = [f for f in FLAG_ORDER if f in present]
    return (*known, *sorted(present - set(known)))


def _records(frame: Any) -> Iterator[dict[str, Any]]:
    columns = list(frame.columns)
    for values in frame.itertuples(index=False, name=None):
        yield dict(zip(columns, values, strict=True))


PATCH_COLUMNS = (
    "row",
    "patch_id",
    "location_id",
    "scene_id",
    "duplicates",
    "epsg",
    "i",
    "j",
    "col_off",
    "row_off",
    "size",
    "x_ul",
    "y_ul",
    "start_time",
    "datatake_id",
    "processor_version",
    "n_dates",
)
SCENE_COLUMNS = (
    "scene_id",
    "datatake_id",
    "tile_id",
    "start_time",
    "stop_time",
    "processor_version",
    "epsg",
    "transform",
    "width",
    "height",
)


def _require(frame: Any, columns: Sequence[str], table: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{table} lacks column(s) {', '.join(missing)}")


def _column(frame: Any, name: str, convert: Any) -> list[Any]:
    """A column as Python values, `convert` applied to each (int, float or str, as a row-wise read
    would apply it; numpy/pandas scalars come out of `tolist` as Python ones already)."""
    return [convert(value) for value in frame[name].tolist()]


def parse_patches(frame: Any, pixel_size: float = 30.0) -> list[PatchRecord]:
    """`index/patches.parquet` as records (GeoDataFrame in EPSG:4326; geometry column `geometry`).

    Column-wise: half a million rows at archive scale."""
    _require(frame, PATCH_COLUMNS, tables.INDEX_PATCHES)
    flags = flags_of(frame.columns)
    out: list[PatchRecord] = []
    for start in range(0, len(frame), _CHUNK):  # chunks bound the column lists held at once
        out.extend(_patch_records(frame.iloc[start : start + _CHUNK], flags, pixel_size))
    ids = [p.patch_id for p in out]
    if len(set(ids)) != len(ids):
        raise ValueError("index/patches.parquet holds a patch_id twice")
    return out


def _patch_records(frame: Any, flags: tuple[str, ...], pixel_size: float) -> list[PatchRecord]:
    shapes = geojson_many(frame.geometry.values)
    if "scene_transform" in frame.columns:
        transforms = frame["scene_transform"].tolist()
    else:
        transforms = [None] * len(frame)
    default_pixel = (pixel_size, 0.0, 0.0, -pixel_size)
    pixels = []
    for transform in transforms:
        if transform is not None and len(transform) >= 6:
            a, b, _, d, e, _ = (float(v) for v in list(transform)[:6])
            pixels.append((a, b, d, e))
        else:
            pixels.append(default_pixel)
    fraction_columns = [_column(frame, f"{flag}_fraction", float) for flag in flags]
    fractions = [tuple(zip(flags, values, strict=True)) for values in zip(*fraction_columns, strict=True)]
    if not flags:
        fractions = [()] * len(frame)
    duplicates = [
        tuple(sorted(str(s) for s in (value if value is not None else ())))
        for value in frame["duplicates"].tolist()
    ]
    columns: Iterator[tuple[Any, ...]] = zip(
        _column(frame, "row", int),
        _column(frame, "patch_id", str),
        _column(frame, "location_id", str),
        _column(frame, "scene_id", str),
        duplicates,
        _column(frame, "epsg", int),
        _column(frame, "i", int),
        _column(frame, "j", int),
        _column(frame, "col_off", int),
        _column(frame, "row_off", int),
        _column(frame, "size", int),
        _column(frame, "x_ul", float),
        _column(frame, "y_ul", float),
        pixels,
        iso_utc_many(frame["start_time"]),
        _column(frame, "datatake_id", str),
        _column(frame, "processor_version", str),
        fractions,
        _column(frame, "n_dates", int),
        [geometry for geometry, _ in shapes],
        [bbox for _, bbox in shapes],
        strict=True,
    )
    return [PatchRecord(*values) for values in columns]


def _product_files(raw: dict[str, Any]) -> ProductFiles | None:
    packaging, container = _text(raw.get("packaging")), _text(raw.get("container_uri"))
    if packaging is None or container is None:
        return None
    members = raw.get("members")
    if isinstance(members, str):  # stored as JSON text by the inventory stage
        members = json.loads(members)
    return ProductFiles(
        packaging=packaging,
        container_uri=container,
        inner_zip=_text(raw.get("inner_zip")),
        members=tuple((str(path), int(size)) for path, size in (members or ())),
    )


def parse_scenes(frame: Any) -> list[SceneRow]:
    """`inventory/scenes.parquet` as records (GeoDataFrame; the footprint is its active geometry)."""
    _require(frame, SCENE_COLUMNS, tables.SCENES)
    shapes = geojson_many(frame.geometry.values)
    starts = iso_utc_many(frame["start_time"])
    ends = iso_utc_many(frame["stop_time"])
    out = []
    for raw, (geometry, bbox), start, end in zip(_records(frame), shapes, starts, ends, strict=True):
        processing = raw.get("processing_time")
        cover = tuple(
            (name, value)
            for name, column in (
                ("cloud_shadow", "cloud_shadow"),
                ("haze", "haze_cover"),
                ("cirrus", "cirrus_cover"),
                ("water", "water_cover"),
            )
            if (value := _number(raw.get(column))) is not None
        )
        out.append(
            SceneRow(
                scene_id=str(raw["scene_id"]),
                datatake_id=str(raw["datatake_id"]),
                tile_id=int(raw["tile_id"]),
                start_datetime=start,
                end_datetime=end,
                processor_version=str(raw["processor_version"]),
                processing_datetime=None if processing is None else iso_utc(processing),
                epsg=int(raw["epsg"]),
                transform=tuple(float(v) for v in list(raw["transform"])[:6]),  # type: ignore[arg-type]
                width=int(raw["width"]),
                height=int(raw["height"]),
                cloud_cover=_number(raw.get("cloud_cover")),
                snow_cover=_number(raw.get("snow_cover")),
                cover=cover,
                sun_elevation=_number(raw.get("sun_elevation")),
                sun_azimuth=_number(raw.get("sun_azimuth")),
                across_off_nadir=_number(raw.get("across_off_nadir")),
                along_off_nadir=_number(raw.get("along_off_nadir")),
                scene_azimuth=_number(raw.get("scene_azimuth")),
                orbit_number=_integer(raw.get("orbit_number")),
                orbit_direction=_text(raw.get("orbit_direction")),
                fingerprint=_text(raw.get("fingerprint")),
                geometry=geometry,
                bbox=bbox,
                files=_product_files(raw),
            )
        )
    ids = [s.scene_id for s in out]
    if len(set(ids)) != len(ids):
        raise ValueError("inventory/scenes.parquet holds a scene_id twice")
    return out
