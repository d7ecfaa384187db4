"""Synthetic label sources for the `labels` stage: categorical maps in other CRSs, with their truth.

`write_label_sources(out_dir, regions, seed)` writes, over the given lon/lat regions (the synthetic
sites), three sources whose every value is known, so tests and the demo check the alignment exactly:

- `crops_aea30.tif`: uint8 crop-type codes (CDL-like: 1 corn, 5 soybeans, 24 wheat, ...) on an Albers
  equal-area 30 m grid (WGS84 datum, standard parallels around the regions, like EPSG:5070 over the
  USA), its origin off the UTM lattice by a fraction of a pixel; nodata 0 (CDL's "background"), a
  diagonal band of nodata across each region; tiled and sparse: only the regions hold pixels, so the
  raster is large in pixels and small on disk, and only windows are ever read;
- `landcover_laea100.tif`: uint16 CORINE-like codes (111 ... 523) on a Lambert azimuthal equal-area
  100 m grid (WGS84 datum, like EPSG:3035), nodata 999;
- `parcels.parquet` (GeoParquet, with a bbox covering column) and the same features as
  `parcels.gpkg`: rotated rectangular parcels in the LAEA CRS with an integer `crop_code`, some of them
  overlapping (the labels stage resolves overlaps by the smallest code).

Classes vary on a ~500 m warped checkerboard with ~15 % speckle of single pixels, so a patch holds
many class edges (alignment errors show) and `mode` differs from `nearest`. The datum is WGS84
throughout, so no datum shift can make two PROJ builds disagree. `truth.json` in `out_dir` lists every
source with its CRS, transform, nodata and codes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import geopandas
import numpy as np
import rasterio
import shapely
from pyproj import CRS, Transformer
from rasterio.transform import Affine
from rasterio.windows import Window

CROP_CODES = (1, 5, 24, 36, 61, 111, 121, 141, 176)  # CDL-like
LANDCOVER_CODES = (111, 112, 211, 231, 311, 312, 313, 411, 512, 523)  # CORINE Land Cover level 3
PARCEL_CODES = (11, 12, 21, 33, 41, 51)
LANDCOVER_NODATA = 999
REGION_MARGIN_M = 3000.0

Region = tuple[float, float, float, float]  # west, south, east, north (degrees)


@dataclass(frozen=True, slots=True)
class SourceTruth:
    """One synthetic label source as written."""

    name: str
    path: str  # relative to out_dir
    kind: str  # raster | vector
    crs_wkt: str
    transform: tuple[float, ...] | None  # rasters: rasterio Affine (a, b, c, d, e, f)
    nodata: int | None
    codes: tuple[int, ...]
    attribute: str | None = None


def albers(regions: Sequence[Region]) -> CRS:
    """An Albers equal-area CRS on the WGS84 datum fitted to the regions (like EPSG:5070 for CONUS)."""
    south, north = min(r[1] for r in regions), max(r[3] for r in regions)
    lon0 = round(sum((r[0] + r[2]) / 2 for r in regions) / len(regions), 1)
    lat1, lat2 = round(south - 1.5, 1), round(north + 1.5, 1)
    return CRS.from_proj4(
        f"+proj=aea +lat_0={round((south + north) / 2, 1)} +lon_0={lon0} +lat_1={lat1} +lat_2={lat2} "
        "+x_0=0 +y_0=0 +datum=WGS84 +units=m +no_defs"
    )


def laea() -> CRS:
    """A Lambert azimuthal equal-area CRS like EPSG:3035, on the WGS84 datum."""
    return CRS.from_proj4(
        "+proj=laea +lat_0=52 +lon_0=10 +x_0=4321000 +y_0=3210000 +datum=WGS84 +units=m +no_defs"
    )


def _hash_classes(i: np.ndarray, j: np.ndarray, seed: int, codes: Sequence[int]) -> np.ndarray:
    mixed = (i.astype(np.int64) * 73856093) ^ (j.astype(np.int64) * 19349663) ^ (seed * 83492791)
    return np.asarray(codes)[np.abs(mixed) % len(codes)]


def class_field(xs: np.ndarray, ys: np.ndarray, seed: int, codes: Sequence[int], cell: float) -> np.ndarray:
    """Classes on a warped checkerboard of `cell` metres (a smooth, deterministic pattern)."""
    i = np.floor((xs + 0.4 * cell * np.sin(ys / (1.4 * cell))) / cell)
    j = np.floor((ys + 0.4 * cell * np.cos(xs / (1.8 * cell))) / cell)
    return _hash_classes(i, j, seed, codes)


def _bounds_in(crs: CRS, region: Region, margin: float) -> tuple[float, float, float, float]:
    to = Transformer.from_crs("EPSG:4326", crs, always_xy=True)
    left, bottom, right, top = to.transform_bounds(*region, densify_pts=21)
    return left - margin, bottom - margin, right + margin, top + margin


def _write_categorical(
    path: Path,
    crs: CRS,
    regions: Sequence[Region],
    pixel: float,
    dtype: str,
    nodata: int,
    codes: Sequence[int],
    seed: int,
    cell: float,
) -> tuple[float, ...]:
    """A tiled, sparse categorical GeoTIFF covering the regions' bounding box; pixels only near them."""
    rng = np.random.default_rng(seed)
    boxes = [_bounds_in(crs, region, REGION_MARGIN_M) for region in regions]
    left, bottom = min(b[0] for b in boxes), min(b[1] for b in boxes)
    right, top = max(b[2] for b in boxes), max(b[3] for b in boxes)
    # Off the UTM lattice by a fraction of a pixel, so no pixel centre meets a source pixel edge.
    left = math.floor(left / pixel) * pixel + 0.37 * pixel
    top = math.ceil(top / pixel) * pixel - 0.21 * pixel
    width = int(math.ceil((right - left) / pixel)) + 1
    height = int(math.ceil((top - bottom) / pixel)) + 1
    transform = Affine(pixel, 0.0, left, 0.0, -pixel, top)
    profile = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": 1,
        "dtype": dtype,
        "crs": crs,
        "transform": transform,
        "nodata": nodata,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
        "sparse_ok": True,
    }
    with rasterio.open(path, "w", **profile) as dst:
        for box in boxes:
            c0 = max(0, int((box[0] - left) // pixel))
            c1 = min(width, int(math.ceil((box[2] - left) / pixel)))
            r0 = max(0, int((top - box[3]) // pixel))
            r1 = min(height, int(math.ceil((top - box[1]) / pixel)))
            cols = np.arange(c0, c1)
            rows = np.arange(r0, r1)
            xs = left + (cols[None, :] + 0.5) * pixel + np.zeros((len(rows), 1))
            ys = top - (rows[:, None] + 0.5) * pixel + np.zeros((1, len(cols)))
            values = class_field(xs, ys, seed, codes, cell)
            speckle = rng.random(values.shape) < 0.15
            values = np.where(speckle, np.asarray(codes)[rng.integers(len(codes), size=values.shape)], values)
            # A diagonal band of nodata across the region: label pixels that must stay 0.
            u = (xs - box[0]) / max(1.0, box[2] - box[0]) + (ys - box[1]) / max(1.0, box[3] - box[1])
            values = np.where(np.abs(u - 1.0) < 0.05, nodata, values)
            dst.write(values.astype(dtype), 1, window=Window(c0, r0, c1 - c0, r1 - r0))
    return tuple(transform)[:6]


def _parcels(regions: Sequence[Region], crs: CRS, seed: int) -> geopandas.GeoDataFrame:
    """Rotated rectangular parcels (300-900 m) over the regions; about a fifth overlap a neighbour."""
    rng = np.random.default_rng(seed + 1)
    geometries, codes = [], []
    for region in regions:
        left, bottom, right, top = _bounds_in(crs, region, REGION_MARGIN_M)
        step = 600.0
        for x in np.arange(left, right, step):
            for y in np.arange(bottom, top, step):
                if rng.random() < 0.15:
                    continue  # gaps: pixels that stay unlabelled
                w, h = rng.uniform(300, 900, size=2)
                cx, cy = x + rng.uniform(0, step), y + rng.uniform(0, step)
                box = shapely.box(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
                angle = float(rng.uniform(0, 90))
                geometries.append(shapely.affinity.rotate(box, angle, origin="centroid"))
                codes.append(int(PARCEL_CODES[int(rng.integers(len(PARCEL_CODES)))]))
    return geopandas.GeoDataFrame(
        {"crop_code": np.asarray(codes, dtype=np.int32)}, geometry=geometries, crs=crs
    )


def write_label_sources(
    out_dir: Path | str, regions: Sequence[Region], seed: int = 0
) -> dict[str, SourceTruth]:
    """Write the three synthetic sources over `regions` (lon/lat boxes) and `truth.json`."""
    if not regions:
        raise ValueError("give at least one (west, south, east, north) region")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    aea_crs, laea_crs = albers(regions), laea()
    truths = {
        "crops_aea30": SourceTruth(
            "crops_aea30",
            "crops_aea30.tif",
            "raster",
            aea_crs.to_wkt(),
            _write_categorical(
                out / "crops_aea30.tif", aea_crs, regions, 30.0, "uint8", 0, CROP_CODES, seed, 500.0
            ),
            0,
            CROP_CODES,
        ),
        "landcover_laea100": SourceTruth(
            "landcover_laea100",
            "landcover_laea100.tif",
            "raster",
            laea_crs.to_wkt(),
            _write_categorical(
                out / "landcover_laea100.tif",
                laea_crs,
                regions,
                100.0,
                "uint16",
                LANDCOVER_NODATA,
                LANDCOVER_CODES,
                seed + 7,
                900.0,
            ),
            LANDCOVER_NODATA,
            LANDCOVER_CODES,
        ),
    }
    parcels = _parcels(regions, laea_crs, seed)
    parcels.to_parquet(out / "parcels.parquet", write_covering_bbox=True)
    parcels.to_file(out / "parcels.gpkg", driver="GPKG", engine="pyogrio")
    truths["parcels"] = SourceTruth(
        "parcels", "parcels.parquet", "vector", laea_crs.to_wkt(), None, None, PARCEL_CODES, "crop_code"
    )
    record = {
        "seed": seed,
        "regions": [list(r) for r in regions],
        "sources": {k: asdict(v) for k, v in truths.items()},
    }
    (out / "truth.json").write_text(json.dumps(record, indent=2) + "\n")
    return truths


def regions_of(
    footprints_lonlat: Sequence[Sequence[tuple[float, float]]], join_degrees: float = 0.5
) -> list[Region]:
    """Lon/lat boxes around groups of footprints (rings): footprints whose boxes lie within
    `join_degrees` of each other share a region, so distant sites do not make one huge raster."""
    boxes = [
        (min(p[0] for p in ring), min(p[1] for p in ring), max(p[0] for p in ring), max(p[1] for p in ring))
        for ring in footprints_lonlat
    ]
    merged: list[list[float]] = []
    for box in sorted(boxes):
        for m in merged:
            if (
                box[0] <= m[2] + join_degrees
                and box[2] >= m[0] - join_degrees
                and box[1] <= m[3] + join_degrees
                and box[3] >= m[1] - join_degrees
            ):
                m[:] = [min(m[0], box[0]), min(m[1], box[1]), max(m[2], box[2]), max(m[3], box[3])]
                break
        else:
            merged.append(list(box))
    return [(m[0], m[1], m[2], m[3]) for m in merged]
