"""Parse the build's tables into frozen records: the only place that knows the table columns.

`index/patches.parquet` rows become `PatchRecord`s, `inventory/scenes.parquet` rows `SceneRow`s; the
item builders in `stac.build` only see these records. Values are normalised here once: times to RFC 3339
UTC strings, geometries to GeoJSON dicts (exterior rings counter-clockwise, RFC 7946), missing or
non-finite numbers to None (the builders then leave the field out rather than write NaN).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.quality import FLAG_NAMES

BBox = tuple[float, float, float, float]

# The order of the quality flags in `spectralearth:quality_fractions` (pipeline.quality.FLAG_BITS order).
FLAG_ORDER = FLAG_NAMES


@dataclass(frozen=True, slots=True)
class Band:
    """One band of the build's band axis: its 1-based number in the product and its response in nm."""

    number: int
    wavelength_nm: float
    fwhm_nm: float

    @property
    def name(self) -> str:
        return f"B{self.number:03d}"


def parse_bands(bands: Iterable[tuple[int, float, float] | Band]) -> tuple[Band, ...]:
    out = []
    for band in bands:
        if not isinstance(band, Band):
            number, wavelength, fwhm = band
            band = Band(int(number), float(wavelength), float(fwhm))
        if band.number < 1 or not (band.wavelength_nm > 0 and band.fwhm_nm > 0):
            raise ValueError(f"invalid band {band}: numbers start at 1, wavelength and FWHM are positive")
        out.append(band)
    numbers = [b.number for b in out]
    if not out or len(set(numbers)) != len(numbers):
        raise ValueError("the band axis must hold at least one band and no band twice")
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


def parse_patches(frame: Any, pixel_size: float = 30.0) -> list[PatchRecord]:
    """`index/patches.parquet` as records (GeoDataFrame in EPSG:4326; geometry column `geometry`)."""
    _require(frame, PATCH_COLUMNS, "index/patches.parquet")
    flags = flags_of(frame.columns)
    geometry_name = frame.geometry.name
    out = []
    for raw in _records(frame):
        geometry, bbox = geojson(raw[geometry_name])
        transform = raw.get("scene_transform")
        if transform is not None and len(transform) >= 6:
            a, b, _, d, e, _ = (float(v) for v in list(transform)[:6])
        else:
            a, b, d, e = pixel_size, 0.0, 0.0, -pixel_size
        fractions = tuple((flag, float(raw[f"{flag}_fraction"])) for flag in flags)
        out.append(
            PatchRecord(
                row=int(raw["row"]),
                patch_id=str(raw["patch_id"]),
                location_id=str(raw["location_id"]),
                scene_id=str(raw["scene_id"]),
                duplicates=tuple(
                    sorted(str(s) for s in (raw["duplicates"] if raw["duplicates"] is not None else ()))
                ),
                epsg=int(raw["epsg"]),
                i=int(raw["i"]),
                j=int(raw["j"]),
                col_off=int(raw["col_off"]),
                row_off=int(raw["row_off"]),
                size=int(raw["size"]),
                x_ul=float(raw["x_ul"]),
                y_ul=float(raw["y_ul"]),
                pixel=(a, b, d, e),
                datetime=iso_utc(raw["start_time"]),
                datatake_id=str(raw["datatake_id"]),
                processor_version=str(raw["processor_version"]),
                fractions=fractions,
                n_dates=int(raw["n_dates"]),
                geometry=geometry,
                bbox=bbox,
            )
        )
    ids = [p.patch_id for p in out]
    if len(set(ids)) != len(ids):
        raise ValueError("index/patches.parquet holds a patch_id twice")
    return out


def parse_scenes(frame: Any) -> list[SceneRow]:
    """`inventory/scenes.parquet` as records (GeoDataFrame; the footprint is its active geometry)."""
    _require(frame, SCENE_COLUMNS, "inventory/scenes.parquet")
    geometry_name = frame.geometry.name
    out = []
    for raw in _records(frame):
        geometry, bbox = geojson(raw[geometry_name])
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
                start_datetime=iso_utc(raw["start_time"]),
                end_datetime=iso_utc(raw["stop_time"]),
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
            )
        )
    ids = [s.scene_id for s in out]
    if len(set(ids)) != len(ids):
        raise ValueError("inventory/scenes.parquet holds a scene_id twice")
    return out
