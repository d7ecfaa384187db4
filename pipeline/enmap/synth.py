"""Synthetic EnMAP Level-2A products, structurally like real ones, deterministic from a seed.

`generate(out_dir, SynthConfig(...))` writes products under `out_dir` plus `out_dir/truth.json` (what was
made) and returns the same information as a `Truth`. The same seed and config give byte-identical files
(no clock time, no absolute paths, no random state outside the seed; zip/tar/gzip timestamps are fixed).
Files are written in `out_dir/.synth-staging/` and moved into place, so a product appears whole.

What a product looks like
-------------------------
- Name `ENMAP01-____L2A-DT<datatake>_<start>Z_<tile>_V<version>_<processed>Z`, files `<name>-<SUFFIX>.<EXT>`
  (see `pipeline.enmap.names`): METADATA.XML, HISTORY.XML, SPECTRAL_IMAGE, QL_PIXELMASK, QL_QUALITY_CLASSES,
  QL_QUALITY_CLOUD, QL_QUALITY_CLOUDSHADOW, QL_QUALITY_HAZE, QL_QUALITY_SNOW, QL_QUALITY_CIRRUS,
  QL_QUALITY_TESTFLAGS, QL_VNIR, QL_SWIR. The METADATA.XML lists exactly the files of the product
  (including the ENVI `.HDR` headers and HISTORY.XML) in `product/productFileInformation`.
- Formats (cycled over the non-ARD products): "GTiff" -> `.TIF`, uncompressed, striped, band interleaved;
  "BSQ" / "BIL" / "BIP" -> ENVI: raw little-endian data `.BSQ`/`.BIL`/`.BIP` plus an upper-case `.HDR`
  header (written by this module, so it holds no absolute path); the spectral image uses the product's
  interleave and every QL layer is written as ENVI BSQ. GDAL (3.10) opens the data file by its path, on disk
  and through `/vsizip/`, and finds the upper-case `.HDR` sidecar itself; CRS, geotransform, nodata and
  interleave are reported as for the GeoTIFF. "ard" packaging always writes every raster as
  `-<LAYER>_COG.tiff` with GDAL's COG driver (DEFLATE + predictor, 256 px blocks, pixel interleaved as GDAL
  3.10 writes multi-band COGs, no overviews: building them takes minutes at full size) and the
  metadata as `-METADATA.xml` (also `-HISTORY.xml`). The other spellings deliveries use are options:
  `ard_raster_extension` "TIF" writes `-<LAYER>_COG.TIF`; `ard_metadata_extension` "XML" or "XML.XML"
  (as DLR's portal has been seen to deliver) names the metadata and history files so.
- Packaging (cycled over products): "folder" -> `<out>/<name>/<files>`; "zip" -> `<out>/<name>.ZIP` with
  folder `<name>/` inside (deflate, level `zip_compresslevel`, 0 = stored); "targz" -> DLR delivery
  `<out>/dims_op_oc_oc-en_<9 digits>_1.tar.gz` holding
  `dims_op_oc_oc-en_<9 digits>_1/ENMAP.HSI.L2A/<name>.ZIP`;
  "ard" -> `<out>/<name>/` with the ARD file names.
- Rasters: SPECTRAL_IMAGE int16, `bands` bands in ascending wavelength (the V010303 table; with fewer than
  224 bands an evenly spaced subset of the table, renumbered 1..N), reflectance x 10000, nodata -32768 (GDAL
  nodata tag / ENVI `data ignore value` set) outside the footprint and in the no-data bands. QL layers are
  uint8 without a nodata tag (like the real ones), uncompressed except QL_PIXELMASK.TIF (DEFLATE; the real
  one is ~8x smaller than uncompressed): CLASSES 1 land, 2 water, 3 background outside the
  footprint, 0 "none of these" (small blobs inside the footprint; the spectrum there is untouched);
  CLOUD/CLOUDSHADOW/HAZE/SNOW 0/1; CIRRUS 0..3; all 0 outside the footprint. PIXELMASK: one band per
  spectral band, 255 outside the footprint, 1 defective (a few pixels and one along-track detector line in
  `defective_bands` bands; their spectral values are left as generated), 0 otherwise. TESTFLAGS bit field
  (0 outside the footprint): bits 0-1 pixel quality (0 nominal, 1 reduced: haze/cirrus, 2 low:
  cloud/shadow), bit 2 cloud test, 3 shadow test, 4 haze test, 5 snow test, 6 cirrus test, 7 water test.
  QL_VNIR / QL_SWIR: 3-band uint8 RGB (bands nearest 847/671/548 nm and 2201/1645/1051 nm, reflectance 0..0.5
  stretched to 0..255, 0 outside the footprint).
- Grid: UTM of the site centre (EPSG 326NN / 327NN), 30 m pixels, origin (upper-left corner) at
  15 m + k x 30 m in x and y. The footprint is a rectangle rotated clockwise by `scene_azimuth` degrees
  (the metadata's sceneAzimuthAngle), centred in the raster. Its size is the rectangle inscribed in the
  raster (1 % margin) but at least large enough to hold a horizontal pair of 128 x 128 cells of the global
  grid (x in [15 + i*3840, ...), y likewise) plus the revisit shifts; the first date of every site is
  aligned so that this pair sits at the raster centre. For large rasters (~1250 px) the footprint is the
  inscribed rectangle (~70 % of the raster, like the real products, many cells inside). For the default
  300 x 280 raster the rectangle (~300 x 226 px) sticks out of the raster at its left and right corners,
  which are clipped by the raster edges (the boundingPolygon still gives the rectangle's corners, slightly
  outside the raster); ~77 % of the raster is valid and every product of tile 001 holds at least 2 grid cells
  wholly inside the valid data (listed per product in truth.json `cells`).
- Ground: per site, smooth random fields over UTM world coordinates (sums of random plane waves, so any
  raster window evaluates the same ground) give the abundances of vegetation, soil, urban and water
  endmembers (water where a field exceeds a per-site threshold, pure water, class 2); spectra are mixed
  linearly and multiplied by a residual water-vapour transmittance (dips at ~940, 1130, 1400, 1900 nm).
  Per-pixel noise comes from a seeded table of noise spectra indexed by a hash of (world pixel, datatake),
  so the same ground pixel has the same land cover on every date and the two tiles of one datatake are
  bit-identical in their overlap; revisits differ only by noise (~0.2-0.5 % reflectance) where clear.
- Atmosphere per datatake (world-coordinate fields, so both tiles of a datatake agree): clouds are
  thresholded smooth blobs with bright flat spectra (~0.55-0.75 in the VNIR, lower in the SWIR), opaque;
  shadows are the cloud mask displaced by `shadow_offset_px` (from `cloud_height_m` and the sun angles,
  opposite to the sun azimuth) outside clouds, multiplying the ground by 0.3; haze adds a blue-weighted
  path reflectance; cirrus levels 1..3 add 0.012 per level (flat); snow (land only, not under clouds)
  replaces the ground by a snow spectrum (bright VNIR, dark beyond 1500 nm). Each QL layer is exactly where
  the effect was put into the image. Fractions per date scatter around the configured amounts.
- Dates: `revisits` datatakes per site, 17-80 days apart (descending orbit, 10:05-10:55 UTC for sites near
  10 deg E, shifted by whole hours with the longitude elsewhere so it stays late morning local time; sun
  angles computed for that time and place), the raster and its footprint shifted by whole pixels (up to
  ~3 % of the raster size). Default sites lie in central Europe (UTM 32/33 N); `site_lonlat` puts them
  anywhere (southern sites get EPSG 327NN). The first `overlapping_tiles` sites
  have a first datatake with tiles 001 and 002: tile 002 is the same footprint moved along track by
  (1 - `tile_overlap`) of the footprint height (rounded to whole pixels), starting a few seconds later.
  At the default 300 x 280 px no 128 px cell lies wholly in both tiles (the cells are too big for a 40 %
  overlap of a 226 px footprint); use larger rasters or `tile_overlap` >= ~0.8 for shared cells.
- Reprocessing: `reprocessed` acquisitions (taken from the last ones backwards) also exist as
  `reprocessed_version` (V010400) processed months later: same datatake, tile, start time, grid and QL
  layers; spectral values differ by an extra small noise (sigma 0.0008 reflectance, ~8 DN).
- METADATA.XML: built with xml.etree, modelled on the real sample (root `level_X`, schema
  metadata_Lx_00-06-00.xsd / 00.06.00) with every element path the reader (`SceneMetadata.from_xml`) and the
  SPEC name. The large sensor blocks of real products (orbit/attitude state vectors, RPCs, frame times)
  are not written. `specific/qualityFlag` percentages are integers, computed from the written QL layers
  over the footprint (pixels with class != 3) and rounded half up: cloudCover (CLOUD), cloudShadow
  (CLOUDSHADOW), hazeCover (HAZE), snowCover (SNOW), cirrusCover (CIRRUS > 0), waterCover (class 2).
  bandStatistics: mean/std of reflectance x gain over the footprint; no-data bands mean -1000000 std 0.
  `backgroundValue` is 0 like in real products (the spectral nodata is -32768).

truth.json (`Truth.to_json` / `Truth.from_json`)
-----------------------------------------------
{
  "format": "spectralearth-synth-truth", "version": 1,
  "config": {SynthConfig fields, tuples as lists},
  "sites": [{"site": 0, "epsg": 32632, "lon": .., "lat": .., "scene_azimuth": ..}, ...],
  "products": [{
     "scene_id", "path" (container relative to out_dir: folder, .ZIP or .tar.gz),
     "member" (path of the inner ZIP in a tar.gz, else null), "packaging", "format" ("GTiff", "BSQ", "BIL",
     "BIP" or "COG"), "files" (basenames in the product), "datatake" (10 digits), "tile" (int),
     "processor_version", "processing_time", "start_time", "stop_time" (ISO, UTC), "date" (YYYY-MM-DD),
     "site", "date_index", "epsg", "transform" [a, b, c, d, e, f] (rasterio Affine order), "width",
     "height", "bands", "footprint_utm" / "footprint_lonlat" (closed rings UL, LL, LR, UR, UL of the
     footprint rectangle), "valid_fraction" (share of raster pixels inside the footprint),
     "fractions" {cloud, cloud_shadow, haze, snow, water, cirrus, unclassified} (share of footprint pixels),
     "quality_percent" {cloudCover, cloudShadow, hazeCover, snowCover, cirrusCover, waterCover} (as written),
     "no_data_bands" (1-based), "defective_bands" (1-based), "shadow_offset_px" [dcol, drow] (shadow[r, c]
     = cloud[r - drow, c - dcol] where not cloud), "angles" {sun_elevation, sun_azimuth, scene_azimuth,
     across_off_nadir, along_off_nadir}, "superseded_by" / "supersedes" (scene_id or null),
     "partner_tile" (the other tile of the datatake or null),
     "cells" [{"location_id", "i", "j", "col", "row", "fractions": {...}}] (128 px cells of the global grid
     wholly inside the raster and wholly inside the footprint)}],
  "revisits": {"<site>": [{"date", "datatake", "start_time", "scene_ids"}, ...]} (one entry per datatake),
  "duplicates": [{"datatake", "kinds": ["overlapping_tiles" | "reprocessed"], "scene_ids": [...]}]
     (groups of products showing one acquisition)
}
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import io
import json
import math
import os
import shutil
import tarfile
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
import rasterio.windows
from affine import Affine
from pyproj import CRS, Transformer

from pipeline.enmap.names import ProductName

__all__ = ["SynthConfig", "Truth", "ProductTruth", "generate", "load_band_table", "PACKAGINGS", "FORMATS"]

PACKAGINGS = ("folder", "zip", "targz", "ard")
# Spellings of the ARD variant's files seen in deliveries (SPEC, Input).
ARD_RASTER_EXTENSIONS = ("tiff", "TIF")
ARD_METADATA_EXTENSIONS = ("xml", "XML", "XML.XML")
FORMATS = ("GTiff", "BSQ", "BIL", "BIP")
NODATA = -32768
GAIN = 0.0001
PIXEL = 30.0
CELL_PX = 128
GRID_OFFSET = 15.0
NO_DATA_BAND_MEAN = -1_000_000
STAGING = ".synth-staging"  # scratch folder under out_dir, removed when generate() returns
LINE_TIME_S = 4.545221 / 1024  # along-track time per 30 m line (real sample: 1024 lines in 4.545 s)
QL_LAYERS = (
    "QL_PIXELMASK",
    "QL_QUALITY_CIRRUS",
    "QL_QUALITY_CLASSES",
    "QL_QUALITY_CLOUD",
    "QL_QUALITY_CLOUDSHADOW",
    "QL_QUALITY_HAZE",
    "QL_QUALITY_SNOW",
    "QL_QUALITY_TESTFLAGS",
    "QL_SWIR",
    "QL_VNIR",
)
QL_VNIR_NM = (847.1, 671.21, 548.06)
QL_SWIR_NM = (2201.0, 1645.3, 1051.3)
_EPOCH_LAUNCH = datetime(2022, 4, 1, 18, 0, tzinfo=UTC)
_ORBITS_PER_DAY = 15.2
_SHADOW_FACTOR = 0.3


# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class SynthConfig:
    """What to generate. Every option has a default; the same config and seed give the same bytes."""

    seed: int = 0
    sites: int = 2  # distinct ground areas
    revisits: int = 2  # datatakes (dates) per site, >= 1
    overlapping_tiles: int = 1  # sites whose first datatake has tiles 001 and 002
    reprocessed: int = 1  # acquisitions that also exist in `reprocessed_version`
    width: int = 300  # raster columns
    height: int = 280  # raster rows
    bands: int = 224  # 224 = the full V010303 table; fewer = evenly spaced subset
    packagings: tuple[str, ...] = PACKAGINGS  # cycled over products
    formats: tuple[str, ...] = FORMATS  # cycled over the non-ARD products (ARD is always COG)
    cloud_amount: float = 0.15  # mean cloud fraction of the footprint
    # 1-based bands (of the product) that are all -32768 and flagged in bandStatistics. The default lies in
    # the water-vapour ranges SpectralEarth drops (127-141, 161-167), so default scenes keep their cells.
    # Numbers above `bands` are ignored.
    no_data_bands: tuple[int, ...] = (131, 132, 165)
    haze_amount: float = 0.05  # mean haze fraction
    cirrus_amount: float = 0.05  # mean fraction with cirrus level >= 1
    snow_amount: float = 0.02  # mean snow fraction (land only)
    water_amount: float = 0.08  # water fraction of the ground (per site, same on every date)
    unclassified_amount: float = 0.02  # fraction of class 0 ("none of these") blobs
    site_lonlat: tuple[tuple[float, float], ...] = ()  # explicit site centres (lon, lat); else from the seed
    scene_azimuth: float = 12.5  # footprint rotation (deg, clockwise); +-1.5 deg per site
    tile_overlap: float = 0.4  # share of the footprint height common to tiles 001 and 002
    cloud_height_m: float = 300.0  # sets the shadow displacement with the sun elevation
    defective_bands: int = 4  # bands with defective pixels in QL_PIXELMASK
    processor_version: str = "V010303"
    reprocessed_version: str = "V010400"
    zip_compresslevel: int = 1  # deflate level of the product ZIPs (0 = stored)
    first_date: str = "2023-04-03"  # acquisitions start on or after this day
    ard_raster_extension: str = "tiff"  # ARD rasters `-<LAYER>_COG.<this>`: "tiff" or "TIF"
    ard_metadata_extension: str = "xml"  # ARD `-METADATA.<this>`, `-HISTORY.<this>`: "xml", "XML", "XML.XML"

    def __post_init__(self) -> None:
        if self.sites < 1 or self.revisits < 1:
            raise ValueError("sites and revisits must be >= 1")
        if not 0 <= self.overlapping_tiles <= self.sites:
            raise ValueError("overlapping_tiles must be between 0 and sites")
        if not 0 <= self.reprocessed <= self.sites * self.revisits + self.overlapping_tiles:
            raise ValueError("reprocessed must be between 0 and the number of acquisitions")
        if self.width < 16 or self.height < 16:
            raise ValueError("width and height must be >= 16")
        if not 1 <= self.bands <= 224:
            raise ValueError("bands must be between 1 and 224")
        bad = [p for p in self.packagings if p not in PACKAGINGS]
        if bad or not self.packagings:
            raise ValueError(f"packagings must be a non-empty subset of {PACKAGINGS}, got {bad}")
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or not self.formats:
            raise ValueError(f"formats must be a non-empty subset of {FORMATS}, got {bad}")
        for name in ("cloud_amount", "haze_amount", "cirrus_amount", "snow_amount", "water_amount"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1)")
        if not 0.0 <= self.unclassified_amount < 1.0:
            raise ValueError("unclassified_amount must be in [0, 1)")
        if not 0.0 < self.tile_overlap < 1.0:
            raise ValueError("tile_overlap must be in (0, 1)")
        if self.site_lonlat and len(self.site_lonlat) < self.sites:
            raise ValueError("site_lonlat must give one (lon, lat) per site")
        for v in (self.processor_version, self.reprocessed_version):
            ProductName.format(1, datetime(2024, 1, 1), 1, v, datetime(2024, 1, 1))
        datetime.strptime(self.first_date, "%Y-%m-%d")
        if self.ard_raster_extension not in ARD_RASTER_EXTENSIONS:
            raise ValueError(f"ard_raster_extension must be one of {ARD_RASTER_EXTENSIONS}")
        if self.ard_metadata_extension not in ARD_METADATA_EXTENSIONS:
            raise ValueError(f"ard_metadata_extension must be one of {ARD_METADATA_EXTENSIONS}")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SynthConfig:
        kwargs: dict[str, Any] = {}
        names = {f.name for f in fields(cls)}
        for key, value in data.items():
            if key not in names:
                raise ValueError(f"unknown SynthConfig key {key!r}")
            if key == "site_lonlat":
                value = tuple(tuple(v) for v in value)
            elif isinstance(value, list):
                value = tuple(value)
            kwargs[key] = value
        return cls(**kwargs)


# ---------------------------------------------------------------------------------------------- truth


@dataclass(frozen=True)
class ProductTruth:
    scene_id: str
    path: str
    member: str | None
    packaging: str
    format: str
    files: tuple[str, ...]
    datatake: str
    tile: int
    processor_version: str
    processing_time: str
    start_time: str
    stop_time: str
    date: str
    site: int
    date_index: int
    epsg: int
    transform: tuple[float, ...]
    width: int
    height: int
    bands: int
    footprint_utm: tuple[tuple[float, float], ...]
    footprint_lonlat: tuple[tuple[float, float], ...]
    valid_fraction: float
    fractions: dict[str, float]
    quality_percent: dict[str, int]
    no_data_bands: tuple[int, ...]
    defective_bands: tuple[int, ...]
    shadow_offset_px: tuple[int, int]
    angles: dict[str, float]
    superseded_by: str | None
    supersedes: str | None
    partner_tile: str | None
    cells: tuple[dict[str, Any], ...]

    @property
    def affine(self) -> Affine:
        return Affine(*self.transform)


@dataclass(frozen=True)
class Truth:
    """What `generate` made; JSON-friendly (see the module docstring for the schema)."""

    config: dict[str, Any]
    sites: tuple[dict[str, Any], ...]
    products: tuple[ProductTruth, ...]
    revisits: dict[str, tuple[dict[str, Any], ...]]
    duplicates: tuple[dict[str, Any], ...]
    version: int = 1

    def product(self, scene_id: str) -> ProductTruth:
        for p in self.products:
            if p.scene_id == scene_id:
                return p
        raise KeyError(scene_id)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "spectralearth-synth-truth",
            "version": self.version,
            "config": self.config,
            "sites": list(self.sites),
            "products": [asdict(p) for p in self.products],
            "revisits": {k: list(v) for k, v in self.revisits.items()},
            "duplicates": list(self.duplicates),
        }

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(_jsonable(self.to_dict()), indent=1, sort_keys=False) + "\n"
        if path is not None:
            _atomic_write_bytes(Path(path), text.encode())
        return text

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> Truth:
        text = str(path_or_text)
        if isinstance(path_or_text, Path) or not text.lstrip().startswith("{"):
            text = Path(path_or_text).read_text()
        data = json.loads(text)
        if data.get("format") != "spectralearth-synth-truth":
            raise ValueError("not a synthetic-products truth file")
        products = []
        for p in data["products"]:
            kw = dict(p)
            for key in ("files", "transform", "no_data_bands", "defective_bands", "cells"):
                kw[key] = tuple(kw[key])
            kw["shadow_offset_px"] = tuple(kw["shadow_offset_px"])
            kw["footprint_utm"] = tuple(tuple(v) for v in kw["footprint_utm"])
            kw["footprint_lonlat"] = tuple(tuple(v) for v in kw["footprint_lonlat"])
            products.append(ProductTruth(**kw))
        return cls(
            config=data["config"],
            sites=tuple(data["sites"]),
            products=tuple(products),
            revisits={k: tuple(v) for k, v in data["revisits"].items()},
            duplicates=tuple(data["duplicates"]),
            version=data["version"],
        )


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    return obj


# ------------------------------------------------------------------------------------------ band table


@dataclass(frozen=True)
class BandTable:
    number: np.ndarray  # 1-based number in the product
    wavelength: np.ndarray  # nm
    fwhm: np.ndarray  # nm
    detector: tuple[str, ...]


def load_band_table(count: int = 224) -> BandTable:
    """The V010303 band table (package data); for count < 224 an evenly spaced subset, renumbered 1..count."""
    text = resources.files("pipeline").joinpath("enmap/data/v010303_bands.csv").read_text()
    rows = list(csv.DictReader(io.StringIO(text)))
    if count < len(rows):
        idx = np.unique(np.round(np.linspace(0, len(rows) - 1, count)).astype(int))
        rows = [rows[i] for i in idx]
    return BandTable(
        number=np.arange(1, len(rows) + 1),
        wavelength=np.array([float(r["wavelength_nm"]) for r in rows]),
        fwhm=np.array([float(r["fwhm_nm"]) for r in rows]),
        detector=tuple(r["detector"].strip().upper() for r in rows),
    )


# ----------------------------------------------------------------------------------------- spectra


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _gauss(wl: np.ndarray, centre: float, width: float) -> np.ndarray:
    return np.exp(-0.5 * ((wl - centre) / width) ** 2)


def water_vapour_transmittance(wl: np.ndarray) -> np.ndarray:
    """Residual absorption left in L2A reflectance: dips at ~940, 1130, 1400 and 1900 nm."""
    t = 1.0 - 0.22 * _gauss(wl, 940, 22) - 0.28 * _gauss(wl, 1130, 28)
    t -= 0.92 * _gauss(wl, 1395, 45) + 0.95 * _gauss(wl, 1890, 60)
    t -= 0.06 * _gauss(wl, 2010, 20) + 0.05 * _gauss(wl, 760, 4)  # CO2, O2-A
    return np.clip(t, 0.02, 1.0)


def endmembers(wl: np.ndarray) -> dict[str, np.ndarray]:
    """Surface reflectance (0..1) of the endmembers and effects at wavelengths `wl` (nm)."""
    veg = 0.035 + 0.045 * _gauss(wl, 550, 35) - 0.012 * _gauss(wl, 670, 20)
    edge = _sigmoid((wl - 718) / 14)
    nir = 0.46 - 0.04 * _gauss(wl, 1200, 60) - 0.03 * (wl - 800).clip(0) / 500
    swir = 0.30 * _gauss(wl, 1660, 140) + 0.17 * _gauss(wl, 2220, 120) + 0.04
    veg = veg * (1 - edge) + edge * np.where(wl < 1300, nir, swir + (nir - swir) * _sigmoid((1330 - wl) / 25))
    veg = veg - 0.06 * _gauss(wl, 1450, 60) - 0.05 * _gauss(wl, 1940, 70)
    soil = 0.07 + 0.24 * _sigmoid((wl - 650) / 180) + 0.07 * (wl - 420).clip(0) / 2000
    soil = soil - 0.04 * _gauss(wl, 1420, 40) - 0.06 * _gauss(wl, 1920, 50) - 0.03 * _gauss(wl, 2200, 25)
    water = 0.05 * _gauss(wl, 480, 70) + 0.02 * _gauss(wl, 560, 40) + 0.006 * np.exp(-(wl - 600).clip(0) / 80)
    water = water + 0.003
    urban = 0.14 + 0.05 * (wl - 420) / 2000 + 0.02 * _gauss(wl, 600, 150) - 0.02 * _gauss(wl, 1700, 300)
    cloud = 0.66 - 0.03 * (wl - 420) / 600
    cloud = np.where(wl > 1000, 0.63 - 0.30 * (wl - 1000) / 1400, cloud)
    cloud = cloud - 0.10 * _gauss(wl, 1500, 60) - 0.10 * _gauss(wl, 2000, 70)
    snow = np.where(wl < 900, 0.92 - 0.04 * (wl - 420) / 480, 0.88 - 0.75 * _sigmoid((wl - 1250) / 90))
    snow = np.where(wl > 1500, 0.05 + 0.10 * _gauss(wl, 1780, 70) + 0.06 * _gauss(wl, 2240, 90), snow)
    haze = 0.035 * (480.0 / wl) ** 3
    return {
        "vegetation": np.clip(veg, 0.005, 1),
        "soil": np.clip(soil, 0.01, 1),
        "water": np.clip(water, 0.001, 1),
        "urban": np.clip(urban, 0.02, 1),
        "cloud": np.clip(cloud, 0.1, 1),
        "snow": np.clip(snow, 0.02, 1),
        "haze": haze,
    }


# ---------------------------------------------------------------------------------------- fields


class _Field:
    """A smooth random field over world coordinates: a normalised sum of random plane waves.

    Evaluated separably (cos(a + b) = cos a cos b - sin a sin b), so a H x W window costs 2K outer
    products and no trigonometry per pixel. Values are ~N(0, 1).
    """

    def __init__(self, rng: np.random.Generator, min_wavelength: float, max_wavelength: float, k: int = 24):
        lam = np.exp(rng.uniform(math.log(min_wavelength), math.log(max_wavelength), k))
        ang = rng.uniform(0, math.pi, k)
        self.kx = 2 * math.pi / lam * np.cos(ang)
        self.ky = 2 * math.pi / lam * np.sin(ang)
        self.phase = rng.uniform(0, 2 * math.pi, k)
        amp = (lam / max_wavelength) ** 0.5
        self.amp = amp / math.sqrt(float(np.sum(amp**2)) / 2)
        self.origin = rng.uniform(-1e5, 1e5, 2)

    def __call__(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """The field at columns `xs` (eastings) x rows `ys` (northings), shape (len(ys), len(xs))."""
        ax = (xs - self.origin[0])[:, None] * self.kx[None, :] + self.phase[None, :]
        ay = (ys - self.origin[1])[:, None] * self.ky[None, :]
        cx, sx = (np.cos(ax) * self.amp).astype(np.float32), (np.sin(ax) * self.amp).astype(np.float32)
        cy, sy = np.cos(ay).astype(np.float32), np.sin(ay).astype(np.float32)
        out = np.zeros((len(ys), len(xs)), dtype=np.float32)
        tmp = np.empty_like(out)
        # explicit sum in a fixed order, not BLAS: a pixel gets the same bits whatever window it is in
        for i in range(len(self.kx)):
            out += np.multiply.outer(cy[:, i], cx[:, i], out=tmp)
            out -= np.multiply.outer(sy[:, i], sx[:, i], out=tmp)
        return out


def _hash_u64(*arrays: np.ndarray | int) -> np.ndarray:
    """Vectorised splitmix64-style hash of integer arrays (broadcast), as uint64."""
    h = np.uint64(0x9E3779B97F4A7C15)
    acc: np.ndarray = np.zeros((), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for a in arrays:
            v = np.asarray(a).astype(np.int64).astype(np.uint64)
            acc = (acc ^ v) * np.uint64(0xBF58476D1CE4E5B9) + h
            acc = acc ^ (acc >> np.uint64(31))
            acc = acc * np.uint64(0x94D049BB133111EB)
            acc = acc ^ (acc >> np.uint64(29))
    return acc


# --------------------------------------------------------------------------------------- geometry


def _utm_epsg(lon: float, lat: float) -> int:
    zone = int(math.floor((lon + 180.0) / 6.0)) % 60 + 1
    return (32600 if lat >= 0 else 32700) + zone


def _projection_name(epsg: int) -> str:
    zone = epsg % 100
    return f"UTM_Zone{zone}_{'North' if epsg < 32700 else 'South'}"


def _rect_size(width: int, height: int, theta: float, slack_px: float) -> tuple[float, float]:
    """Footprint rectangle (across w, along h) in pixels for a raster; see the module docstring."""
    c, s = math.cos(theta), math.sin(theta)
    margin = max(1.0, 0.01 * min(width, height))
    wp, hp = width - 2 * margin, height - 2 * margin
    det = c * c - s * s
    w_in = (wp * c - hp * s) / det
    h_in = (hp * c - wp * s) / det
    # hold a horizontal pair of cells (256 x 128 px, axis aligned) centred, plus the revisit shifts
    w_req = 2 * (CELL_PX * c + CELL_PX / 2 * s) + 2 * slack_px * (c + s) + 2
    h_req = 2 * (CELL_PX * s + CELL_PX / 2 * c) + 2 * slack_px * (c + s) + 2
    if width < 2 * CELL_PX or height < CELL_PX:  # no pair can fit: just inscribe
        w_req = h_req = 0.0
    w = max(w_in, min(w_req, width * 1.05))
    h = max(h_in, min(h_req, height * 1.05))
    return w, h


@dataclass(frozen=True)
class _Footprint:
    """A rectangle rotated clockwise by theta (radians) in map view, centred at (cx, cy) metres."""

    cx: float
    cy: float
    w: float  # across track, metres
    h: float  # along track, metres
    theta: float

    @property
    def across(self) -> tuple[float, float]:  # unit vector upper_left -> upper_right (E, N)
        return math.cos(self.theta), -math.sin(self.theta)

    @property
    def along(self) -> tuple[float, float]:  # unit vector upper_left -> lower_left (flight direction)
        return -math.sin(self.theta), -math.cos(self.theta)

    def corners(self) -> dict[str, tuple[float, float]]:
        (ax, ay), (lx, ly) = self.across, self.along
        hw, hh = self.w / 2, self.h / 2
        return {
            "upper_left": (self.cx - ax * hw - lx * hh, self.cy - ay * hw - ly * hh),
            "lower_left": (self.cx - ax * hw + lx * hh, self.cy - ay * hw + ly * hh),
            "lower_right": (self.cx + ax * hw + lx * hh, self.cy + ay * hw + ly * hh),
            "upper_right": (self.cx + ax * hw - lx * hh, self.cy + ay * hw - ly * hh),
        }

    def ring(self) -> list[tuple[float, float]]:
        c = self.corners()
        return [c["upper_left"], c["lower_left"], c["lower_right"], c["upper_right"], c["upper_left"]]

    def mask(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        dx = xs[None, :] - self.cx
        dy = ys[:, None] - self.cy
        (ax, ay), (lx, ly) = self.across, self.along
        u = dx * ax + dy * ay
        v = dx * lx + dy * ly
        return (np.abs(u) <= self.w / 2) & (np.abs(v) <= self.h / 2)

    def moved(self, dx: float, dy: float) -> _Footprint:
        return _Footprint(self.cx + dx, self.cy + dy, self.w, self.h, self.theta)


# ----------------------------------------------------------------------------------------- planning


@dataclass
class _Site:
    index: int
    lon: float
    lat: float
    epsg: int
    theta_deg: float
    kx: int  # raster origin of date 0 tile 1: x0 = 15 + 30 * kx
    ky: int  # y0 = 15 + 30 * ky
    seed: int
    fields: dict[str, _Field] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)


@dataclass
class _Datatake:
    id: int
    site: _Site
    date_index: int
    start: datetime
    shift: tuple[int, int]  # (dcol, drow) of tile 001 against the site's base raster
    tiles: int
    seed: int
    sun_elevation: float = 0.0
    sun_azimuth: float = 0.0
    across_off_nadir: float = 0.0
    along_off_nadir: float = 0.0
    shadow_offset: tuple[int, int] = (0, 0)  # (dcol, drow)
    amounts: dict[str, float] = field(default_factory=dict)
    fields: dict[str, _Field] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    tile_shift: tuple[int, int] = (0, 0)  # (dcol, drow) of tile 002 against tile 001


@dataclass
class _Product:
    datatake: _Datatake
    tile: int
    version: str
    processing_time: datetime
    kx: int
    ky: int
    footprint: _Footprint
    start: datetime
    stop: datetime
    packaging: str = "folder"
    fmt: str = "GTiff"
    ard_raster_extension: str = "tiff"
    superseded_by: _Product | None = None
    supersedes: _Product | None = None
    partner: _Product | None = None
    order_number: int = 0

    @property
    def name(self) -> str:
        return ProductName.format(self.datatake.id, self.start, self.tile, self.version, self.processing_time)

    @property
    def reprocessed(self) -> bool:
        return self.supersedes is not None


def _rng(*keys: int | str) -> np.random.Generator:
    digest = hashlib.sha256("/".join(str(k) for k in keys).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def _solar_position(when: datetime, lat: float, lon: float) -> tuple[float, float]:
    """Sun elevation and azimuth (deg, azimuth from north clockwise), NOAA approximation."""
    doy = when.timetuple().tm_yday
    hour = when.hour + when.minute / 60 + when.second / 3600
    g = 2 * math.pi / 365 * (doy - 1 + (hour - 12) / 24)
    eqtime = 229.18 * (
        0.000075
        + 0.001868 * math.cos(g)
        - 0.032077 * math.sin(g)
        - 0.014615 * math.cos(2 * g)
        - 0.040849 * math.sin(2 * g)
    )
    decl = (
        0.006918
        - 0.399912 * math.cos(g)
        + 0.070257 * math.sin(g)
        - 0.006758 * math.cos(2 * g)
        + 0.000907 * math.sin(2 * g)
        - 0.002697 * math.cos(3 * g)
        + 0.00148 * math.sin(3 * g)
    )
    tst = hour * 60 + eqtime + 4 * lon
    ha = math.radians(tst / 4 - 180)
    phi = math.radians(lat)
    cos_zen = math.sin(phi) * math.sin(decl) + math.cos(phi) * math.cos(decl) * math.cos(ha)
    zen = math.acos(max(-1.0, min(1.0, cos_zen)))
    az = math.degrees(math.atan2(math.sin(ha), math.cos(ha) * math.sin(phi) - math.tan(decl) * math.cos(phi)))
    return 90 - math.degrees(zen), (az + 180) % 360


class _Plan:
    def __init__(self, config: SynthConfig):
        self.config = config
        self.bands = load_band_table(config.bands)
        self.no_data_bands = tuple(sorted({b for b in config.no_data_bands if 1 <= b <= config.bands}))
        w, h = config.width, config.height
        self.slack = max(2, round(0.03 * min(w, h)))
        self.sites = [self._site(i) for i in range(config.sites)]
        self.datatakes = self._datatakes()
        self.products = self._products()

    # sites ---------------------------------------------------------------------------------------
    def _site(self, index: int) -> _Site:
        cfg = self.config
        rng = _rng("site", cfg.seed, index)
        if cfg.site_lonlat:
            lon, lat = cfg.site_lonlat[index]
        else:  # spread over central Europe, sites ~100 km apart
            base = _rng("sites", cfg.seed)
            lon0, lat0 = base.uniform(6.5, 13.0), base.uniform(45.5, 52.5)
            lon = lon0 + 1.4 * (index % 4) + rng.uniform(-0.2, 0.2)
            lat = lat0 - 1.0 * (index // 4) + rng.uniform(-0.2, 0.2)
        epsg = _utm_epsg(lon, lat)
        to_utm = Transformer.from_crs(4326, epsg, always_xy=True)
        e, n = to_utm.transform(lon, lat)
        w, h = cfg.width, cfg.height
        # desired grid alignment: a horizontal pair of cells centred in the raster (small rasters),
        # a random alignment for large ones
        if min(w, h) < 640:
            ox, oy = round((w - 2 * CELL_PX) / 2) % CELL_PX, round((h - CELL_PX) / 2) % CELL_PX
        else:
            ox, oy = int(rng.integers(0, CELL_PX)), int(rng.integers(0, CELL_PX))
        kx0 = round((e - 15 - w * PIXEL / 2) / PIXEL)
        ky0 = round((n - 15 + h * PIXEL / 2) / PIXEL)
        kx = kx0 + ((-ox - kx0) % CELL_PX)
        ky = ky0 + ((oy - ky0) % CELL_PX)
        if kx - kx0 > CELL_PX // 2:
            kx -= CELL_PX
        if ky - ky0 > CELL_PX // 2:
            ky -= CELL_PX
        theta = cfg.scene_azimuth + float(rng.uniform(-1.5, 1.5))
        site = _Site(index, float(lon), float(lat), epsg, theta, int(kx), int(ky), int(rng.integers(2**62)))
        frng = _rng("ground", cfg.seed, index)
        site.fields = {
            "vegetation": _Field(frng, 900, 9000),
            "soil": _Field(frng, 700, 7000),
            "urban": _Field(frng, 500, 4000),
            "water": _Field(frng, 1200, 12000),
            "vigour": _Field(frng, 200, 2000),
            "brightness": _Field(frng, 300, 3000),
        }
        # the water threshold: the configured share of the first raster's footprint
        xs, ys = self._centres(kx, ky)
        fp = self._base_footprint(site)
        inside = fp.mask(xs, ys)
        wf = site.fields["water"](xs, ys)[inside]
        site.thresholds["water"] = _upper_quantile(wf, cfg.water_amount)
        return site

    def _centres(self, kx: int, ky: int) -> tuple[np.ndarray, np.ndarray]:
        x0, y0 = GRID_OFFSET + PIXEL * kx, GRID_OFFSET + PIXEL * ky
        xs = x0 + PIXEL / 2 + PIXEL * np.arange(self.config.width)
        ys = y0 - PIXEL / 2 - PIXEL * np.arange(self.config.height)
        return xs, ys

    def _base_footprint(self, site: _Site) -> _Footprint:
        w, h = self.config.width, self.config.height
        theta = math.radians(site.theta_deg)
        wp, hp = _rect_size(w, h, theta, self.slack)
        x0, y0 = GRID_OFFSET + PIXEL * site.kx, GRID_OFFSET + PIXEL * site.ky
        return _Footprint(x0 + w * PIXEL / 2, y0 - h * PIXEL / 2, wp * PIXEL, hp * PIXEL, theta)

    # datatakes -----------------------------------------------------------------------------------
    def _datatakes(self) -> list[_Datatake]:
        cfg = self.config
        first = datetime.strptime(cfg.first_date, "%Y-%m-%d").replace(tzinfo=UTC)
        raw: list[tuple[datetime, _Site, int, tuple[int, int], int, int]] = []
        for site in self.sites:
            rng = _rng("dates", cfg.seed, site.index)
            day = first + timedelta(days=int(rng.integers(0, 120)))
            for d in range(cfg.revisits):
                if d:
                    day += timedelta(days=int(rng.integers(17, 81)))
                t = day.replace(hour=10, minute=int(rng.integers(5, 55)), second=int(rng.integers(0, 60)))
                t = t.replace(microsecond=int(rng.integers(0, 1_000_000)))
                # descending pass near 10:40-11:40 local solar time: 10:xx UTC at 10 deg E
                t -= timedelta(hours=round((site.lon - 10.0) / 15.0))
                shift = (
                    (0, 0) if d == 0 else tuple(int(v) for v in rng.integers(-self.slack, self.slack + 1, 2))
                )
                tiles = 2 if (d == 0 and site.index < cfg.overlapping_tiles) else 1
                raw.append((t, site, d, shift, tiles, int(rng.integers(2**62))))  # type: ignore[arg-type]
        raw.sort(key=lambda r: (r[0], r[1].index))
        rng = _rng("datatake-ids", cfg.seed)
        next_id = 1000 + int(rng.integers(0, 4000))
        out = []
        for t, site, d, shift, tiles, seed in raw:
            dt = _Datatake(next_id, site, d, t, shift, tiles, seed)
            next_id += 1 + int(rng.integers(3, 60))
            self._datatake_physics(dt)
            out.append(dt)
        out.sort(key=lambda dt: (dt.site.index, dt.date_index))
        return out

    def _datatake_physics(self, dt: _Datatake) -> None:
        cfg = self.config
        rng = _rng("datatake", cfg.seed, dt.id)
        site = dt.site
        dt.sun_elevation, dt.sun_azimuth = _solar_position(dt.start, site.lat, site.lon)
        dt.across_off_nadir = float(rng.uniform(-15, 15))
        dt.along_off_nadir = float(rng.uniform(-1.2, 1.2))
        dist = cfg.cloud_height_m / math.tan(math.radians(max(dt.sun_elevation, 10.0)))
        az = math.radians(dt.sun_azimuth)
        dcol = round(-dist * math.sin(az) / PIXEL)
        drow = round(dist * math.cos(az) / PIXEL)  # shadow moves away from the sun: -N -> +row
        if dcol == 0 and drow == 0:
            drow = -1
        dt.shadow_offset = (int(dcol), int(drow))

        def amount(mean: float, spread: float = 0.7) -> float:
            return 0.0 if mean <= 0 else float(min(0.9, mean * rng.uniform(1 - spread, 1 + spread)))

        dt.amounts = {
            "cloud": amount(cfg.cloud_amount),
            "haze": amount(cfg.haze_amount),
            "cirrus": amount(cfg.cirrus_amount),
            "snow": amount(cfg.snow_amount, 1.0),
            "unclassified": amount(cfg.unclassified_amount, 0.5),
        }
        frng = _rng("atmosphere", cfg.seed, dt.id)
        dt.fields = {
            "cloud": _Field(frng, 500, 5000),
            "cloud_texture": _Field(frng, 90, 600),
            "haze": _Field(frng, 2000, 15000),
            "cirrus": _Field(frng, 600, 8000),
            "snow": _Field(frng, 400, 4000),
            "unclassified": _Field(frng, 120, 600),
        }
        # tile 002: along track by (1 - overlap) of the footprint height, in whole pixels
        theta = math.radians(site.theta_deg)
        _, hp = _rect_size(cfg.width, cfg.height, theta, self.slack)
        dist_px = (1 - cfg.tile_overlap) * hp
        dt.tile_shift = (round(-dist_px * math.sin(theta)), round(dist_px * math.cos(theta)))
        # thresholds from tile 001's footprint, shared by both tiles (one acquisition)
        kx, ky = site.kx + dt.shift[0], site.ky - dt.shift[1]
        xs, ys = self._centres(kx, ky)
        fp = self._base_footprint(site).moved(dt.shift[0] * PIXEL, -dt.shift[1] * PIXEL)
        inside = fp.mask(xs, ys)
        for name in ("cloud", "haze", "snow", "unclassified"):
            values = dt.fields[name](xs, ys)[inside]
            dt.thresholds[name] = _upper_quantile(values, dt.amounts[name])
        cir = dt.fields["cirrus"](xs, ys)[inside]
        p = dt.amounts["cirrus"]
        dt.thresholds["cirrus1"] = _upper_quantile(cir, p)
        dt.thresholds["cirrus2"] = _upper_quantile(cir, p * 0.45)
        dt.thresholds["cirrus3"] = _upper_quantile(cir, p * 0.15)

    # products ------------------------------------------------------------------------------------
    def _products(self) -> list[_Product]:
        cfg = self.config
        products: list[_Product] = []
        for dt in self.datatakes:
            site = dt.site
            prng = _rng("processing", cfg.seed, dt.id)
            processed = (dt.start + timedelta(days=int(prng.integers(1, 40)))).replace(
                hour=int(prng.integers(0, 24)),
                minute=int(prng.integers(0, 60)),
                second=int(prng.integers(0, 60)),
                microsecond=0,
            )
            fp1 = self._base_footprint(site).moved(dt.shift[0] * PIXEL, -dt.shift[1] * PIXEL)
            kx1, ky1 = site.kx + dt.shift[0], site.ky - dt.shift[1]
            start1 = dt.start
            stop1 = start1 + timedelta(seconds=fp1.h / PIXEL * LINE_TIME_S)
            tiles = []
            p1 = _Product(dt, 1, cfg.processor_version, processed, kx1, ky1, fp1, start1, stop1)
            tiles.append(p1)
            if dt.tiles == 2:
                dc, dr = dt.tile_shift
                fp2 = fp1.moved(dc * PIXEL, -dr * PIXEL)
                along = math.hypot(dc, dr)
                start2 = start1 + timedelta(seconds=along * LINE_TIME_S)
                stop2 = start2 + timedelta(seconds=fp2.h / PIXEL * LINE_TIME_S)
                p2 = _Product(
                    dt,
                    2,
                    cfg.processor_version,
                    processed + timedelta(seconds=41),
                    kx1 + dc,
                    ky1 - dr,
                    fp2,
                    start2,
                    stop2,
                )
                p1.partner, p2.partner = p2, p1
                tiles.append(p2)
            products.extend(tiles)
        # reprocessed versions: the last acquisitions first
        originals = list(products)
        for p in reversed(originals[len(originals) - cfg.reprocessed :] if cfg.reprocessed else []):
            rrng = _rng("reprocessing", cfg.seed, p.datatake.id, p.tile)
            when = datetime(2024, 11, 4, tzinfo=UTC) + timedelta(
                days=int(rrng.integers(0, 120)), seconds=int(rrng.integers(0, 86400))
            )
            when = max(when, p.processing_time + timedelta(days=30))
            q = _Product(
                p.datatake, p.tile, cfg.reprocessed_version, when, p.kx, p.ky, p.footprint, p.start, p.stop
            )
            q.supersedes, p.superseded_by = p, q
            products.append(q)
        products.sort(key=lambda p: (p.datatake.site.index, p.datatake.date_index, p.tile, p.version))
        ard_count = 0
        for i, p in enumerate(products):
            p.packaging = cfg.packagings[i % len(cfg.packagings)]
            if p.packaging == "ard":
                p.fmt = "COG"
                p.ard_raster_extension = cfg.ard_raster_extension
            else:
                p.fmt = cfg.formats[(i - ard_count) % len(cfg.formats)]
            ard_count += p.packaging == "ard"
            p.order_number = 100_000_000 + (cfg.seed * 7919 + i * 104_729 + 12_345) % 900_000_000
        return products


def _upper_quantile(values: np.ndarray, share: float) -> float:
    """Threshold t with `share` of `values` above it (inf for share 0)."""
    if share <= 0 or values.size == 0:
        return math.inf
    return float(np.quantile(values, 1.0 - share))


# ------------------------------------------------------------------------------------------ render


@dataclass
class _Masks:
    footprint: np.ndarray
    water: np.ndarray
    cloud: np.ndarray
    shadow: np.ndarray
    haze: np.ndarray
    cirrus: np.ndarray  # uint8 0..3
    snow: np.ndarray
    unclassified: np.ndarray
    cloud_brightness: np.ndarray  # float32, multiplier of the cloud spectrum
    abundances: np.ndarray  # float32 (4, H, W): vegetation, soil, water, urban
    vigour: np.ndarray  # float32 multipliers of the vegetation and soil spectra
    brightness: np.ndarray
    noise_index: np.ndarray  # int32 index into the noise table

    @property
    def classes(self) -> np.ndarray:
        c = np.where(self.water, 2, 1).astype(np.uint8)
        c[self.unclassified] = 0
        c[~self.footprint] = 3
        return c

    def testflags(self) -> np.ndarray:
        q = np.zeros(self.footprint.shape, np.uint8)
        q[(self.haze | (self.cirrus > 0))] = 1
        q[self.cloud | self.shadow] = 2
        q |= self.cloud.astype(np.uint8) << 2
        q |= self.shadow.astype(np.uint8) << 3
        q |= self.haze.astype(np.uint8) << 4
        q |= self.snow.astype(np.uint8) << 5
        q |= (self.cirrus > 0).astype(np.uint8) << 6
        q |= (self.water & self.footprint).astype(np.uint8) << 7
        q[~self.footprint] = 0
        return q

    def fractions(self, window: tuple[slice, slice] | None = None) -> dict[str, float]:
        w = window or (slice(None), slice(None))
        fp = self.footprint[w]
        n = max(1, int(fp.sum()))

        def share(m: np.ndarray) -> float:
            return round(float((m[w] & fp).sum()) / n, 6)

        return {
            "cloud": share(self.cloud),
            "cloud_shadow": share(self.shadow),
            "haze": share(self.haze),
            "snow": share(self.snow),
            "water": share(self.water),
            "cirrus": share(self.cirrus > 0),
            "unclassified": share(self.unclassified),
        }


def _render_masks(plan: _Plan, p: _Product) -> _Masks:
    dt, site = p.datatake, p.datatake.site
    xs, ys = plan._centres(p.kx, p.ky)
    fp = p.footprint.mask(xs, ys)
    th = dt.thresholds
    cloud_field = dt.fields["cloud"](xs, ys)
    cloud = (cloud_field > th["cloud"]) & fp
    dcol, drow = dt.shadow_offset
    # shadow at P where the cloud is at P - D: the cloud field on the grid shifted by D
    shifted = dt.fields["cloud"](xs - dcol * PIXEL, ys + drow * PIXEL) > th["cloud"]
    shadow = shifted & fp & ~cloud
    water = site.fields["water"](xs, ys) > site.thresholds["water"]
    haze = (dt.fields["haze"](xs, ys) > th["haze"]) & fp & ~cloud
    cir = dt.fields["cirrus"](xs, ys)
    cirrus = (cir > th["cirrus1"]).astype(np.uint8) + (cir > th["cirrus2"]) + (cir > th["cirrus3"])
    cirrus = np.where(fp & ~cloud, cirrus, 0).astype(np.uint8)
    snow = (dt.fields["snow"](xs, ys) > th["snow"]) & fp & ~cloud & ~water
    uncl = (dt.fields["unclassified"](xs, ys) > th["unclassified"]) & fp & ~water
    texture = dt.fields["cloud_texture"](xs, ys)
    brightness = 0.88 + 0.06 * np.tanh(np.clip(cloud_field - th["cloud"], -5, 5)) + 0.04 * texture
    brightness = brightness.astype(np.float32)
    f = site.fields
    veg = f["vegetation"](xs, ys)
    soil = f["soil"](xs, ys) - 0.3
    urban = f["urban"](xs, ys) - 1.3
    stack = np.stack([veg, soil, urban]) * 2.2
    stack = np.exp(stack - stack.max(axis=0))
    stack /= stack.sum(axis=0)
    ab = np.zeros((4,) + fp.shape, np.float32)
    land = ~water
    ab[0] = np.where(land, stack[0], 0)
    ab[1] = np.where(land, stack[1], 0)
    ab[2] = water
    ab[3] = np.where(land, stack[2], 0)
    vigour = (1.0 + 0.12 * np.tanh(f["vigour"](xs, ys))).astype(np.float32)
    bright = (1.0 + 0.10 * np.tanh(f["brightness"](xs, ys))).astype(np.float32)
    ix = np.round(xs / PIXEL).astype(np.int64)
    iy = np.round(ys / PIXEL).astype(np.int64)
    h = _hash_u64(iy[:, None], ix[None, :], dt.id, plan.config.seed)
    noise_index = (h % np.uint64(_NOISE_TABLE)).astype(np.int32)
    return _Masks(
        fp, water, cloud, shadow, haze, cirrus, snow, uncl, brightness, ab, vigour, bright, noise_index
    )


_NOISE_TABLE = 4096


def _noise_table(plan: _Plan, p: _Product) -> np.ndarray:
    wl = plan.bands.wavelength
    sigma = 0.0018 + 0.0012 * (wl > 1000) + 0.006 * (1 - water_vapour_transmittance(wl))
    table = _rng("noise", plan.config.seed, p.datatake.id).normal(0, 1, (_NOISE_TABLE, wl.size)) * sigma
    if p.reprocessed:  # a newer processor version: slightly different values
        table += _rng("noise-reprocessed", plan.config.seed, p.datatake.id, p.version).normal(
            0, 0.0008, table.shape
        )
    return table.astype(np.float32)


def _spectral_blocks(plan: _Plan, p: _Product, m: _Masks) -> Iterator[tuple[int, np.ndarray]]:
    """(row0, int16 cube (rows, W, B)) blocks of the spectral image, pixel-major."""
    wl = plan.bands.wavelength
    em = {k: v.astype(np.float32) for k, v in endmembers(wl).items()}
    trans = water_vapour_transmittance(wl).astype(np.float32)
    noise = _noise_table(plan, p)
    nodata_idx = np.array(plan.no_data_bands, dtype=int) - 1
    w, h, b = plan.config.width, plan.config.height, wl.size
    rows_per_block = max(1, min(h, int(16e6 // (w * b * 4))))
    cirrus_add = np.float32(0.012) * trans
    for r0 in range(0, h, rows_per_block):
        r1 = min(h, r0 + rows_per_block)
        sl = slice(r0, r1)
        ab = m.abundances[:, sl]
        cube = (ab[0] * m.vigour[sl])[..., None] * em["vegetation"]
        cube += (ab[1] * m.brightness[sl])[..., None] * em["soil"]
        cube += ab[2][..., None] * em["water"]
        cube += (ab[3] * m.brightness[sl])[..., None] * em["urban"]
        snow = m.snow[sl]
        if snow.any():
            cube[snow] = em["snow"] * m.brightness[sl][snow][:, None]
        cube *= trans
        shadow = m.shadow[sl]
        if shadow.any():
            cube[shadow] *= np.float32(_SHADOW_FACTOR)
        haze = m.haze[sl]
        if haze.any():
            cube[haze] += em["haze"] * trans
        cirrus = m.cirrus[sl]
        if cirrus.any():
            sel = cirrus > 0
            cube[sel] += cirrus[sel].astype(np.float32)[:, None] * cirrus_add
        cloud = m.cloud[sl]
        if cloud.any():
            cube[cloud] = (em["cloud"] * trans)[None, :] * m.cloud_brightness[sl][cloud][:, None]
        cube += noise[m.noise_index[sl]]
        out = np.clip(np.rint(cube * 10000.0), 0, 16000).astype(np.int16)
        out[~m.footprint[sl]] = NODATA
        if nodata_idx.size:
            out[..., nodata_idx] = NODATA
        yield r0, out


# ---------------------------------------------------------------------------------------- writers


class _Sink:
    """One raster layer being written, in GTiff, COG (via a temporary GTiff) or ENVI."""

    def __init__(
        self,
        path: Path,
        fmt: str,
        count: int,
        dtype: str,
        plan: _Plan,
        p: _Product,
        nodata: float | None,
        interleave: str,
        descriptions: Sequence[str] = (),
        wavelengths: np.ndarray | None = None,
        fwhm: np.ndarray | None = None,
        compress: str | None = None,
    ):
        self.path, self.fmt, self.count, self.dtype = path, fmt, count, np.dtype(dtype)
        self.width, self.height = plan.config.width, plan.config.height
        self.interleave = interleave
        self.epsg = p.datatake.site.epsg
        self.x0, self.y0 = GRID_OFFSET + PIXEL * p.kx, GRID_OFFSET + PIXEL * p.ky
        self.transform = Affine(PIXEL, 0.0, self.x0, 0.0, -PIXEL, self.y0)
        self.nodata = nodata
        self.descriptions, self.wavelengths, self.fwhm = descriptions, wavelengths, fwhm
        if fmt == "ENVI":
            self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
            self._file.truncate(self.width * self.height * count * self.dtype.itemsize)
        else:
            self._tmp = path.with_name(path.name + ".tmp.tif") if fmt == "COG" else path
            opts: dict[str, Any] = {"tiled": False, "interleave": "band"}
            if compress:
                opts["compress"] = compress
            if fmt == "COG":
                opts = {"tiled": True, "blockxsize": 256, "blockysize": 256, "interleave": "band"}
            self._ds = rasterio.open(
                self._tmp,
                "w",
                driver="GTiff",
                width=self.width,
                height=self.height,
                count=count,
                dtype=dtype,
                crs=CRS.from_epsg(self.epsg),
                transform=self.transform,
                nodata=nodata,
                **opts,
            )

    def write_rows(self, row0: int, cube: np.ndarray) -> None:
        """cube: (rows, W, count) pixel-major."""
        rows = cube.shape[0]
        if self.fmt != "ENVI":
            self._ds.write(
                np.ascontiguousarray(cube.transpose(2, 0, 1)),
                window=rasterio.windows.Window(0, row0, self.width, rows),
            )
            return
        isz = self.dtype.itemsize
        f = self._file
        if self.interleave == "bip":
            f.seek(row0 * self.width * self.count * isz)
            f.write(np.ascontiguousarray(cube, dtype=self.dtype.newbyteorder("<")).tobytes())
        elif self.interleave == "bil":
            f.seek(row0 * self.width * self.count * isz)
            f.write(
                np.ascontiguousarray(cube.transpose(0, 2, 1), dtype=self.dtype.newbyteorder("<")).tobytes()
            )
        else:
            for b in range(self.count):
                f.seek((b * self.height + row0) * self.width * isz)
                f.write(np.ascontiguousarray(cube[:, :, b], dtype=self.dtype.newbyteorder("<")).tobytes())

    def write_band(self, band: int, array: np.ndarray) -> None:
        """band: 1-based; array (H, W)."""
        if self.fmt != "ENVI":
            self._ds.write(array.astype(self.dtype), band)
            return
        if self.interleave != "bsq":
            raise ValueError("band-wise ENVI writing needs BSQ")
        self._file.seek((band - 1) * self.height * self.width * self.dtype.itemsize)
        self._file.write(np.ascontiguousarray(array, dtype=self.dtype.newbyteorder("<")).tobytes())

    def write(self, array: np.ndarray) -> None:
        """array (count, H, W)."""
        for b in range(array.shape[0]):
            self.write_band(b + 1, array[b])

    def close(self) -> None:
        if self.fmt == "ENVI":
            self._file.close()
            self._write_header()
            return
        self._ds.close()
        if self.fmt == "COG":
            # No overviews: GDAL 3.10 needs minutes and ~1 GB to build them for a 224-band pixel-interleaved
            # COG (the pipeline never reads them). 256 px blocks bound the copy's swath to ~150 MB.
            rasterio.shutil.copy(
                self._tmp,
                self.path,
                driver="COG",
                COMPRESS="DEFLATE",
                PREDICTOR="YES",
                BLOCKSIZE="256",
                OVERVIEWS="NONE",
            )
            self._tmp.unlink()

    def _write_header(self) -> None:
        dtype_code = {np.dtype("int16"): 2, np.dtype("uint8"): 1}[self.dtype]
        zone = self.epsg % 100
        hemi = "North" if self.epsg < 32700 else "South"
        wkt = CRS.from_epsg(self.epsg).to_wkt("WKT1_ESRI")
        lines = [
            "ENVI",
            f"description = {{{self.path.stem}}}",
            f"samples = {self.width}",
            f"lines = {self.height}",
            f"bands = {self.count}",
            "header offset = 0",
            "file type = ENVI Standard",
            f"data type = {dtype_code}",
            f"interleave = {self.interleave}",
            "byte order = 0",
            f"map info = {{UTM, 1, 1, {self.x0:.1f}, {self.y0:.1f}, {PIXEL:.1f}, {PIXEL:.1f}, "
            f"{zone}, {hemi}, WGS-84, units=Meters}}",
            f"coordinate system string = {{{wkt}}}",
        ]
        if self.nodata is not None:
            lines.append(f"data ignore value = {int(self.nodata)}")
        if self.descriptions:
            lines.append("band names = {" + ", ".join(self.descriptions) + "}")
        if self.wavelengths is not None and self.fwhm is not None:
            lines.append("wavelength units = Nanometers")
            lines.append("wavelength = {" + ", ".join(f"{v:g}" for v in self.wavelengths) + "}")
            lines.append("fwhm = {" + ", ".join(f"{v:g}" for v in self.fwhm) + "}")
            lines.append("reflectance scale factor = 10000")
        hdr = self.path.with_suffix(".HDR")
        hdr.write_text("\n".join(lines) + "\n", encoding="ascii", newline="\n")


def _layer_file(name: str, layer: str, p: _Product) -> tuple[str, str, str]:
    """(file name, sink format, interleave) of a raster layer."""
    if p.packaging == "ard":
        return f"{name}-{layer}_COG.{p.ard_raster_extension}", "COG", "band"
    if p.fmt == "GTiff":
        return f"{name}-{layer}.TIF", "GTiff", "band"
    interleave = p.fmt.lower() if layer == "SPECTRAL_IMAGE" else "bsq"
    return f"{name}-{layer}.{interleave.upper()}", "ENVI", interleave


@dataclass
class _Written:
    files: dict[str, int]  # basename -> size
    masks: _Masks
    stats: list[tuple[float, float] | None]  # per band (mean, std) of reflectance x gain, None = no data
    defective_bands: tuple[int, ...]


def _defect_masks(plan: _Plan, p: _Product, fp: np.ndarray) -> dict[int, np.ndarray]:
    """1-based band -> bool mask of defective pixels (a few pixels and an along-track detector line)."""
    cfg = plan.config
    rng = _rng("defects", cfg.seed, p.datatake.id, p.tile)
    candidates = [b for b in range(1, cfg.bands + 1) if b not in plan.no_data_bands]
    n = min(cfg.defective_bands, len(candidates))
    bands = sorted(int(b) for b in rng.choice(candidates, size=n, replace=False)) if n else []
    h, w = fp.shape
    out = {}
    for b in bands:
        m = np.zeros((h, w), bool)
        k = int(rng.integers(3, 12))
        m[rng.integers(0, h, k), rng.integers(0, w, k)] = True
        # a detector column: a line along track through the footprint
        t = np.linspace(-0.5, 0.5, 4 * max(h, w))
        u = rng.uniform(-0.45, 0.45) * p.footprint.w
        (ax, ay), (lx, ly) = p.footprint.across, p.footprint.along
        ex = p.footprint.cx + ax * u + lx * t * p.footprint.h
        ey = p.footprint.cy + ay * u + ly * t * p.footprint.h
        cols = np.floor((ex - (GRID_OFFSET + PIXEL * p.kx)) / PIXEL).astype(int)
        rows = np.floor(((GRID_OFFSET + PIXEL * p.ky) - ey) / PIXEL).astype(int)
        ok = (cols >= 0) & (cols < w) & (rows >= 0) & (rows < h)
        m[rows[ok], cols[ok]] = True
        out[b] = m & fp
    return out


def _write_rasters(plan: _Plan, p: _Product, folder: Path) -> _Written:
    name = p.name
    cfg = plan.config
    m = _render_masks(plan, p)
    files: dict[str, int] = {}
    paths: list[Path] = []
    wl, fwhm = plan.bands.wavelength, plan.bands.fwhm
    b = wl.size

    def sink(layer: str, count: int, dtype: str, nodata: float | None = None, **kw: Any) -> _Sink:
        fname, fmt, inter = _layer_file(name, layer, p)
        path = folder / fname
        paths.append(path)
        if fmt == "ENVI":
            paths.append(path.with_suffix(".HDR"))
        return _Sink(path, fmt, count, dtype, plan, p, nodata, inter, **kw)

    # spectral image, blockwise, with statistics and quicklooks on the way
    s = sink(
        "SPECTRAL_IMAGE",
        b,
        "int16",
        NODATA,
        descriptions=[f"band {i}" for i in plan.bands.number],
        wavelengths=wl,
        fwhm=fwhm,
    )
    total = np.zeros(b, np.int64)  # exact integer sums: deterministic and no float64 copies of the cube
    total2 = np.zeros(b, np.int64)
    count = 0
    ql_idx = {
        "QL_VNIR": [int(np.argmin(np.abs(wl - v))) for v in QL_VNIR_NM],
        "QL_SWIR": [int(np.argmin(np.abs(wl - v))) for v in QL_SWIR_NM],
    }
    qls = {k: np.zeros((3, cfg.height, cfg.width), np.uint8) for k in ql_idx}
    for r0, cube in _spectral_blocks(plan, p, m):
        s.write_rows(r0, cube)
        valid = m.footprint[r0 : r0 + cube.shape[0]]
        px = cube[valid].astype(np.int32)
        total += px.sum(axis=0, dtype=np.int64)
        px *= px
        total2 += px.sum(axis=0, dtype=np.int64)
        count += px.shape[0]
        del px
        for key, idx in ql_idx.items():
            q = np.clip(cube[..., idx].astype(np.float32) * (255.0 / 5000.0), 0, 255)
            q[~valid] = 0
            qls[key][:, r0 : r0 + cube.shape[0]] = np.rint(q).astype(np.uint8).transpose(2, 0, 1)
    s.close()
    stats: list[tuple[float, float] | None] = []
    for i in range(b):
        if (i + 1) in plan.no_data_bands or count == 0:
            stats.append(None)
            continue
        mean = int(total[i]) / count
        var = max(0.0, (int(total2[i]) - int(total[i]) * int(total[i]) / count) / count)
        stats.append((mean * GAIN, math.sqrt(var) * GAIN))

    # pixel mask, band by band
    defects = _defect_masks(plan, p, m.footprint)
    base = np.where(m.footprint, 0, 255).astype(np.uint8)
    # DEFLATE in GeoTIFF: the real product's PIXELMASK.TIF is ~8x smaller than its uncompressed size
    names = [f"band {i}" for i in plan.bands.number]
    s = sink("QL_PIXELMASK", b, "uint8", descriptions=names, compress="deflate")
    for band in range(1, b + 1):
        if band in defects:
            arr = base.copy()
            arr[defects[band]] = 1
            s.write_band(band, arr)
        else:
            s.write_band(band, base)
    s.close()
    single = {
        "QL_QUALITY_CIRRUS": m.cirrus,
        "QL_QUALITY_CLASSES": m.classes,
        "QL_QUALITY_CLOUD": m.cloud,
        "QL_QUALITY_CLOUDSHADOW": m.shadow,
        "QL_QUALITY_HAZE": m.haze,
        "QL_QUALITY_SNOW": m.snow,
        "QL_QUALITY_TESTFLAGS": m.testflags(),
    }
    for layer, arr in single.items():
        s = sink(layer, 1, "uint8")
        s.write(arr.astype(np.uint8)[None])
        s.close()
    for layer in ("QL_SWIR", "QL_VNIR"):
        s = sink(layer, 3, "uint8", descriptions=["red", "green", "blue"])
        s.write(qls[layer])
        s.close()
    for path in paths:
        files[path.name] = path.stat().st_size
    return _Written(files, m, stats, tuple(sorted(defects)))


# ---------------------------------------------------------------------------------------- metadata


def _sub(parent: ET.Element, tag: str, text: Any = None, **attrib: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrib)
    if text is not None:
        el.text = text if isinstance(text, str) else _num(text)
    return el


def _num(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | np.integer):
        return str(int(v))
    return f"{float(v):.10g}"


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _percent(x: float) -> int:
    return int(math.floor(100.0 * x + 0.5))


def _quality_percent(fr: dict[str, float]) -> dict[str, int]:
    return {
        "cloudCover": _percent(fr["cloud"]),
        "cloudShadow": _percent(fr["cloud_shadow"]),
        "hazeCover": _percent(fr["haze"]),
        "snowCover": _percent(fr["snow"]),
        "cirrusCover": _percent(fr["cirrus"]),
        "waterCover": _percent(fr["water"]),
    }


def _lonlat(epsg: int, pts: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    tr = Transformer.from_crs(epsg, 4326, always_xy=True)
    return [tuple(float(v) for v in tr.transform(x, y)) for x, y in pts]  # type: ignore[misc]


def _polygon(
    parent: ET.Element, epsg: int, fp: _Footprint, t0: datetime, t1: datetime, precise: bool = True
) -> None:
    bp = _sub(parent, "boundingPolygon")
    corners = fp.corners()
    frames = ["upper_left", "lower_left", "lower_right", "upper_right"]
    pts = [corners[f] for f in frames] + [(fp.cx, fp.cy)]
    ll = _lonlat(epsg, pts)
    mid = t0 + (t1 - t0) / 2
    times = {"upper_left": t0, "upper_right": t0, "lower_left": t1, "lower_right": t1, "center": mid}
    rows = [(f, ll[i], 7) for i, f in enumerate(frames)]
    rows.append(("upper_left", ll[0], 9 if precise else 7))
    rows.append(("center", ll[4], 7))
    for frame, (lon, lat), nd in rows:
        pt = _sub(bp, "point")
        _sub(pt, "frame", frame)
        _sub(pt, "latitude", f"{lat:.{nd}f}", unit="DEG")
        _sub(pt, "longitude", f"{lon:.{nd}f}", unit="DEG")
        _sub(pt, "utcTime", _iso(times[frame]))


def _angle_block(parent: ET.Element, tag: str, centre: float, spread: Sequence[float]) -> None:
    el = _sub(parent, tag)
    for frame, d in zip(("upper_left", "upper_right", "lower_right", "lower_left"), spread, strict=True):
        _sub(el, frame, f"{centre + d:.6f}", unit="DEG")
    _sub(el, "center", f"{centre:.6f}", unit="DEG")


def _metadata_xml(
    plan: _Plan, p: _Product, written: _Written, files: dict[str, int], meta_name: str, meta_size: int
) -> bytes:
    cfg = plan.config
    dt, site = p.datatake, p.datatake.site
    name = p.name
    epsg = site.epsg
    version = p.version.removeprefix("V")
    revision = f"{version[0:2]}.{version[2:4]}.{version[4:6]}"
    wl, fwhm = plan.bands.wavelength, plan.bands.fwhm
    fr = written.masks.fractions()
    qp = _quality_percent(fr)
    all_files = dict(files)
    all_files[meta_name] = meta_size
    rng = _rng("metadata", cfg.seed, dt.id, p.tile, p.version)

    ET.register_namespace("xsi", "http://www.w3.org/2001/XMLSchema-instance")
    root = ET.Element(
        "level_X",
        {"{http://www.w3.org/2001/XMLSchema-instance}noNamespaceSchemaLocation": "metadata_Lx_00-06-00.xsd"},
    )
    md = _sub(root, "metadata")
    sc = _sub(md, "schema")
    _sub(sc, "copyright", "(c) DLR EnMAP 2023")
    _sub(sc, "versionSchema", "00.06.00")
    _sub(sc, "name", "metadata_Lx_00-06-00.xsd")
    _sub(sc, "crc", "1EACA5A7")
    _sub(sc, "processingLevel", "L2A")
    _sub(md, "name", meta_name)
    _sub(md, "comment", f"EnMAP Level 2A Product of datatake {dt.id}, tile {p.tile}")
    _sub(md, "copyright", "(c) DLR EnMAP 2023")
    _sub(
        md,
        "citation",
        f"DLR ({p.processing_time.year}): EnMAP Product {dt.id:09d}_{p.tile:02d}_2A (synthetic)",
    )

    pr = _sub(root, "processing")
    _sub(pr, "terrainCorrection", "Yes")
    _sub(pr, "ozoneValue", "300")
    _sub(pr, "season", "summer" if 4 <= p.start.month <= 9 else "winter")
    fmt_name = {"GTiff": "GeoTIFF", "COG": "COG", "BSQ": "BSQ", "BIL": "BIL", "BIP": "BIP"}[p.fmt]
    _sub(pr, "productFormat", f"{fmt_name}+Metadata")
    _sub(pr, "mapProjection", "UTM_Zone_of_Scene_Center")
    _sub(pr, "imageResampling", "Bilinear_Interpolation")
    _sub(pr, "DEMDBVersion", "COP-DEM_GLO-30-DGED_2021_1")
    _sub(pr, "correctionType", "Combined")
    _sub(pr, "cirrusHazeRemoval", "No")
    _sub(pr, "bandInterpolation", "No")
    _sub(pr, "waterType", "Clear")

    base = _sub(root, "base")
    _polygon(_sub(base, "spatialCoverage"), epsg, p.footprint, p.start, p.stop)
    tc = _sub(base, "temporalCoverage")
    _sub(tc, "startTime", _iso(p.start))
    _sub(tc, "stopTime", _iso(p.stop))
    _sub(base, "revision", revision)
    _sub(base, "altitudeCoverage", "653216.42")
    _sub(base, "sphere", "earth")
    _sub(base, "format", "ENMAP_L2A")
    _sub(base, "level", "L2A")
    _sub(base, "size", int(sum(all_files.values())))
    _sub(base, "archivedVersion", revision)

    sp = _sub(root, "specific")
    # the datatake's coverage: the union of its tiles
    fps = [p.footprint] + ([p.partner.footprint] if p.partner is not None else [])
    first, last = min(fps, key=lambda f: -f.cy), max(fps, key=lambda f: -f.cy)
    union = _Footprint(
        (first.cx + last.cx) / 2,
        (first.cy + last.cy) / 2,
        first.w,
        first.h + math.hypot(last.cx - first.cx, last.cy - first.cy),
        first.theta,
    )
    t_last = max(p.stop, p.partner.stop) if p.partner is not None else p.stop
    _polygon(_sub(sp, "spatialCoverageOfDatatake"), epsg, union, dt.start, t_last, precise=False)
    qf = _sub(sp, "qualityFlag")
    for tag, value in [
        ("spare_1", -999),
        ("spare_2", -999),
        ("spare_3", -999),
        ("sensorLogVNIR", -999),
        ("processorLogVNIR", 0),
        ("overallQualityVNIR", 0),
        ("deadPixelsVNIR", 0),
        ("defectivePixelsVNIR", 0),
        ("generalArtifactsVNIR", 0),
        ("saturationCrosstalkVNIR", 0),
        ("stripingBandingVNIR", 0),
        ("qualityRadiometryVNIR", 0),
        ("smileIndicationVNIR", -999),
        ("sensorLogSWIR", -999),
        ("processorLogSWIR", 0),
        ("deadPixelsSWIR", 0),
        ("defectivePixelsSWIR", 0),
        ("generalArtifactsSWIR", 0),
        ("saturationCrosstalkSWIR", 0),
        ("stripingBandingSWIR", 0),
        ("overallQualitySWIR", 0),
        ("qualityRadiometrySWIR", 0),
        ("smileIndicationSWIR", -999),
        ("overallQuality", 1),
        ("numTilesUsed", dt.tiles),
        ("levelOfRejection", 2),
        ("numPointsGCP", int(rng.integers(300, 900))),
        ("numPointsICP", int(rng.integers(1000, 3000))),
        ("numPointsAll", 0),
        ("numPointsDiscardedGCP", int(rng.integers(0, 10))),
        ("orthoResidual", 10),
        ("orthoResidual_x", 9),
        ("orthoResidual_y", 5),
        ("orthoMean", 0),
        ("orthoMean_x", 0),
        ("orthoMean_y", 0),
        ("orthoRMSE", 12),
        ("orthoRMSE_x", 9),
        ("orthoRMSE_y", 8),
        ("sceneSZA", f"{90 - dt.sun_elevation:.6f}"),
        ("qualityAtmosphere", 1),
        ("orthoTerrain", 0),
        ("sceneSunglint", -999),
        ("cloudCover", qp["cloudCover"]),
        ("hazeCover", qp["hazeCover"]),
        ("cirrusCover", qp["cirrusCover"]),
        ("snowCover", qp["snowCover"]),
        ("waterCover", qp["waterCover"]),
        ("cloudShadow", qp["cloudShadow"]),
        ("noncloudShadow", 0),
        ("sceneWV", int(rng.integers(800, 3000))),
        ("sceneAOT", int(rng.integers(80, 300))),
        ("sceneAtmParam", 0),
        ("sceneTerrain", 0),
    ]:
        _sub(qf, tag, value)
    qf.find("numPointsAll").text = str(  # type: ignore[union-attr]
        int(qf.findtext("numPointsGCP") or 0) + int(qf.findtext("numPointsICP") or 0)
    )
    ist = _sub(sp, "instrumentStatus")
    for tag, value in [
        ("statusOK", "true"),
        ("statusVNIR", "on"),
        ("statusSWIR", "on"),
        ("configVNIR", "standard"),
        ("configSWIR", "standard"),
        ("statusSCM", "OK"),
        ("statusDiffuserProtectionHatch", "OK"),
        ("statusSunDiffuserHatch", "OK"),
        ("emergencyStatusOfSCM", "0"),
        ("emergencyStatusOfSSM", "0"),
        ("emergencyStatusOfSDH", "0"),
        ("SWIRAOrSWIRBSelected", "SWIRA"),
        ("mcsSequenceType", "1"),
    ]:
        _sub(ist, tag, value)
    pq = _sub(sp, "productQuality")
    sr = _sub(pq, "screeningResult")
    _sub(sr, "status", "OK")
    _sub(sr, "failedGroups", "")
    vnir = [int(n) for n, d in zip(plan.bands.number, plan.bands.detector, strict=True) if d == "VNIR"]
    swir = [int(n) for n, d in zip(plan.bands.number, plan.bands.detector, strict=True) if d == "SWIR"]
    for det, numbers in (("vnir", vnir), ("swir", swir)):
        q = _sub(sp, f"{det}ProductQuality")
        _sub(q, f"{det}ProductStatus", "OK")
        for when in ("Before", "After"):
            dq = _sub(q, f"{det}Dark{when}Quality")
            _sub(dq, "available", "yes")
            _sub(dq, "screeningResult", "OK")
        _sub(q, "numChannelsExpected", len(numbers))
        _sub(q, "expectedChannelsList", ",".join(str(n) for n in numbers))
        _sub(q, "numChannelsMissing", 0)
        _sub(q, "missingChannelsList", "")
    dl = _sub(sp, "downlink")
    _sub(dl, "dtakeNumMissingIsps", 0)
    _sub(dl, "dtakeNumErrorIsps", 0)
    aux = _sub(sp, "auxDataVersion")
    for tag in (
        "orbitVersion",
        "attitudeVersion",
        "calTabAtmSpecVersion",
        "calTabGeoVersion",
        "calTabRadVersion",
        "calTabLinearityVersion",
        "calTabDeepSpaceVersion",
        "calTabDPMVersion",
        "refTabDarkVersion",
    ):
        _sub(aux, tag, "01.00.00")
    idt = _sub(sp, "inputDatatake")
    _sub(idt, "datatakeAssemblyTime", _iso(dt.start + timedelta(hours=2)))
    _sub(idt, "datatakeRevision", "07.00.32")
    orbit = int((dt.start - _EPOCH_LAUNCH).total_seconds() / 86400 * _ORBITS_PER_DAY) + 1
    for tag, value in [
        ("missionPhase", "operational"),
        ("processingCenter", "OP"),
        ("processingNode", "synthetic"),
        ("processingDateTime", _iso(p.processing_time)),
        ("archivingStation", "DLR"),
        ("archivingDateTime", _iso(dt.start + timedelta(hours=3))),
        ("receivingStations", "NSG"),
        ("receivingDateTime", _iso(dt.start + timedelta(hours=1))),
        ("mission", "EnMAP"),
        ("satelliteID", "01"),
        ("sensor", "HSI"),
        ("datatakeID", f"{dt.id:010d}"),
        ("imageID", f"{dt.id * 3 + p.tile:09d}"),
        ("cyclogramType", "EARTH"),
        ("cyclogramVersion", "000"),
        ("MCSequenceId", "001"),
        ("macrocommandVersion", "000"),
        ("numberOfSWIRBands", len(swir)),
        ("numberOfVNIRBands", len(vnir)),
        ("acquisitionType", "EARTH"),
        ("acquisitionSubtype", "earth"),
        ("productType", "STANDARD_ALL"),
        ("compressionType", "COMPRESSED"),
        ("datatakeStart", _iso(dt.start)),
        ("datatakeStop", _iso(t_last)),
        ("backgroundValue", 0),
        ("tileID", f"{p.tile:02d}"),
        ("numberOfTiles", f"{dt.tiles:02d}"),
    ]:
        _sub(sp, tag, value)
    _sub(sp, "widthOfScene", round(p.footprint.w / PIXEL), unit="pixel")
    _sub(sp, "heightOfScene", round(p.footprint.h / PIXEL), unit="pixel")
    for tag, value in [
        ("status", "NOMINAL"),
        ("orbitNo", orbit),
        ("meanGroundElevation", f"{rng.uniform(100, 900):.8f}"),
        ("digitalElevationModelDatabase", "COP-DEM_GLO-30-DGED_2021_1"),
        ("digitalElevationModelDatabaseAccuracy", 4),
        ("referenceDatabase", "S2"),
        ("referenceImageDatabaseAccuracy", 10),
    ]:
        _sub(sp, tag, value)
    _angle_block(sp, "sunElevationAngle", dt.sun_elevation, (-0.2, -0.02, 0.19, 0.01))
    _angle_block(sp, "sunAzimuthAngle", dt.sun_azimuth, (-0.13, 0.51, 0.12, -0.51))
    _angle_block(sp, "acrossOffNadirAngle", dt.across_off_nadir, (1.36, -1.27, -1.36, 1.27))
    _angle_block(sp, "alongOffNadirAngle", dt.along_off_nadir, (0.05, 0.05, -0.05, -0.05))
    _angle_block(sp, "sceneAzimuthAngle", site.theta_deg, (0.04, 0.04, -0.04, -0.04))
    for tag, value in [
        ("orbitDirection", "DESCENDING"),
        ("pixelSize", 30),
        ("biomeType", "Temperate Broadleaf and Mixed Forests"),
        ("processible", 1),
        ("orbitType", "determined"),
        ("acquisitionMode", "earth"),
        ("code", "L2A"),
        ("URLToProductType", "enmap.org/product_STANDARD_ALL"),
    ]:
        _sub(sp, tag, value)
    x0, y0 = GRID_OFFSET + PIXEL * p.kx, GRID_OFFSET + PIXEL * p.ky
    w_m, h_m = cfg.width * PIXEL, cfg.height * PIXEL
    ortho = _Footprint(x0 + w_m / 2, y0 - h_m / 2, w_m, h_m, 0.0)
    _polygon(_sub(sp, "spatialCoverageOfOrthoScene"), epsg, ortho, p.start, p.stop, precise=False)
    bc = _sub(sp, "bandCharacterisation")
    for n, w, f in zip(plan.bands.number, wl, fwhm, strict=True):
        bid = _sub(bc, "bandID", number=str(int(n)))
        _sub(bid, "wavelengthCenterOfBand", f"{w:g}")
        _sub(bid, "FWHMOfBand", f"{f:g}")
        _sub(bid, "GainOfBand", "0.0001")
        _sub(bid, "OffsetOfBand", "0")
    _sub(sp, "pixelSizeOfOrthoScene", 30)
    _sub(sp, "widthOfOrthoScene", cfg.width)
    _sub(sp, "heightOfOrthoScene", cfg.height)
    _sub(sp, "meanSlope", f"{rng.uniform(1, 15):.2f}")

    prod = _sub(root, "product")
    image = _sub(prod, "image")
    merge = _sub(image, "merge")
    spectral = _layer_file(name, "SPECTRAL_IMAGE", p)[0]
    deg = PIXEL * cfg.width / 111_320.0
    _sub(merge, "channels", wl.size)
    _sub(merge, "name", spectral)
    _sub(merge, "size", max(1, round(files[spectral] / 1024)), unit="Kbyte")
    _sub(merge, "version", revision)
    _sub(merge, "format", "binary")
    dim = _sub(merge, "dimension")
    _sub(dim, "columns", cfg.width)
    _sub(dim, "rows", cfg.height)
    dg = _sub(merge, "dimensionGeographic")
    _sub(dg, "longitude", f"{deg:.7f}", unit="DEG")
    _sub(dg, "latitude", f"{deg:.7f}", unit="DEG")
    for tag, nms in (("qlChannelsSWIR", QL_SWIR_NM), ("qlChannelsVNIR", QL_VNIR_NM)):
        qc = _sub(merge, tag)
        for colour, v in zip(("red", "green", "blue"), nms, strict=True):
            _sub(qc, colour, f"{v:g}")
    ql = _sub(prod, "quicklook")
    for det, nms in (("vnir", QL_VNIR_NM), ("swir", QL_SWIR_NM)):
        d = _sub(ql, det)
        _sub(d, "channels", 3)
        qc = _sub(d, "qlChannels")
        for colour, v in zip(("red", "green", "blue"), nms, strict=True):
            _sub(qc, colour, f"{v:g}")
        qname = _layer_file(name, f"QL_{det.upper()}", p)[0]
        _sub(d, "name", qname)
        _sub(d, "size", max(1, round(files[qname] / 1024)), unit="Kbyte")
        _sub(d, "version", revision)
        _sub(d, "format", "binary")
        dim = _sub(d, "dimension")
        _sub(dim, "columns", cfg.width)
        _sub(dim, "rows", cfg.height)
        dg = _sub(d, "dimensionGeographic")
        _sub(dg, "longitude", f"{deg:.9f}", unit="DEG")
        _sub(dg, "latitude", f"{deg:.9f}", unit="DEG")
    orth = _sub(prod, "ortho")
    _sub(orth, "projection", _projection_name(epsg))
    _sub(orth, "resolution", 30)
    _sub(orth, "resampling", "bilinear")
    pfi = _sub(prod, "productFileInformation")
    for i, fname in enumerate(sorted(all_files), start=1):
        fe = _sub(pfi, "file", number=str(i))
        _sub(fe, "name", fname)
        _sub(fe, "size", max(1, round(all_files[fname] / 1024)), unit="Kbyte")
        _sub(fe, "version", revision)
        ext = fname.rsplit(".", 1)[-1].lower()
        _sub(fe, "format", "xml" if ext == "xml" else "ascii" if ext == "hdr" else "binary")
    bs = _sub(prod, "bandStatistics")
    for n, w, st in zip(plan.bands.number, wl, written.stats, strict=True):
        bid = _sub(bs, "bandID", number=str(int(n)))
        _sub(bid, "waveLength", f"{w:g}")
        if st is None:
            _sub(bid, "mean", str(NO_DATA_BAND_MEAN))
            _sub(bid, "stdDeviation", "0")
        else:
            _sub(bid, "mean", f"{st[0]:.7g}")
            _sub(bid, "stdDeviation", f"{st[1]:.7g}")
    ET.indent(root, space="  ")
    return ET.tostring(root, encoding="utf-8", xml_declaration=False) + b"\n"


def _history_xml(p: _Product) -> bytes:
    root = ET.Element("history")
    _sub(root, "productName", p.name)
    steps = [
        ("L0", p.datatake.start + timedelta(hours=2)),
        ("L1B", p.processing_time - timedelta(minutes=50)),
        ("L1C", p.processing_time - timedelta(minutes=25)),
        ("L2A", p.processing_time),
    ]
    for i, (level, when) in enumerate(steps, start=1):
        e = _sub(root, "processingStep", number=str(i))
        _sub(e, "level", level)
        _sub(e, "processor", "EnMAP PGS (synthetic, pipeline.enmap.synth)")
        _sub(e, "processorVersion", p.version)
        _sub(e, "dateTime", _iso(when))
    if p.supersedes is not None:
        _sub(root, "comment", f"reprocessing of {p.supersedes.name}")
    ET.indent(root, space="  ")
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="utf-8") + b"\n"


# ---------------------------------------------------------------------------------------- packaging


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _zip_time(t: datetime) -> tuple[int, int, int, int, int, int]:
    t = t.astimezone(UTC)
    return (max(1980, t.year), t.month, t.day, t.hour, t.minute, t.second - t.second % 2)


def _write_zip(folder: Path, name: str, target: Path, when: datetime, level: int) -> None:
    tmp = target.with_name(target.name + ".partial")
    stamp = _zip_time(when)
    method = zipfile.ZIP_DEFLATED if level > 0 else zipfile.ZIP_STORED
    with zipfile.ZipFile(tmp, "w", compression=method, compresslevel=level or None) as zf:
        d = zipfile.ZipInfo(f"{name}/", date_time=stamp)
        d.create_system = 3
        d.external_attr = (0o40755 << 16) | 0x10
        zf.writestr(d, b"")
        for f in sorted(folder.iterdir()):
            info = zipfile.ZipInfo(f"{name}/{f.name}", date_time=stamp)
            info.create_system = 3
            info.external_attr = 0o100644 << 16
            info.compress_type = method
            info._compresslevel = level or None  # type: ignore[attr-defined]  # else zipfile's default
            size = f.stat().st_size
            with open(f, "rb") as src, zf.open(info, "w", force_zip64=size > 2**31) as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
    os.replace(tmp, target)


def _write_targz(zip_path: Path, delivery: str, target: Path, when: datetime) -> str:
    member = f"{delivery}/ENMAP.HSI.L2A/{zip_path.name}"
    mtime = int(when.timestamp())
    tmp = target.with_name(target.name + ".partial")
    with (
        open(tmp, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=mtime, compresslevel=1) as gz,
    ):
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for d in (delivery, f"{delivery}/ENMAP.HSI.L2A"):
                ti = tarfile.TarInfo(d)
                ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, mtime
                ti.uname = ti.gname = "enmap"
                tar.addfile(ti)
            ti = tarfile.TarInfo(member)
            ti.size, ti.mode, ti.mtime = zip_path.stat().st_size, 0o644, mtime
            ti.uname = ti.gname = "enmap"
            with open(zip_path, "rb") as f:
                tar.addfile(ti, f)
    os.replace(tmp, target)
    return member


@contextlib.contextmanager
def _removed_afterwards(path: Path) -> Iterator[None]:
    try:
        yield
    finally:
        _remove(path)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _write_product(plan: _Plan, p: _Product, out: Path) -> dict[str, Any]:
    name = p.name
    ard = p.packaging == "ard"
    stage = out / STAGING / name
    _remove(stage)
    stage.mkdir(parents=True)
    written = _write_rasters(plan, p, stage)
    xml_extension = plan.config.ard_metadata_extension if ard else "XML"
    history_name = f"{name}-HISTORY.{xml_extension}"
    meta_name = f"{name}-METADATA.{xml_extension}"
    history = _history_xml(p)
    (stage / history_name).write_bytes(history)
    files = dict(written.files)
    files[history_name] = len(history)
    meta_size = 0
    for _ in range(8):  # the metadata lists its own size: iterate to a fixed point
        xml = _metadata_xml(plan, p, written, files, meta_name, meta_size)
        if len(xml) == meta_size:
            break
        meta_size = len(xml)
    (stage / meta_name).write_bytes(xml)
    files[meta_name] = len(xml)

    member = None
    if p.packaging in ("folder", "ard"):
        target = out / name
        _remove(target)
        os.replace(stage, target)
        rel = name
    elif p.packaging == "zip":
        target = out / f"{name}.ZIP"
        _write_zip(stage, name, target, p.processing_time, plan.config.zip_compresslevel)
        shutil.rmtree(stage)
        rel = target.name
    else:
        delivery = f"dims_op_oc_oc-en_{p.order_number:09d}_1"
        scratch = out / STAGING / f"{name}.zipdir"
        _remove(scratch)
        scratch.mkdir()
        inner = scratch / f"{name}.ZIP"
        _write_zip(stage, name, inner, p.processing_time, plan.config.zip_compresslevel)
        shutil.rmtree(stage)
        target = out / f"{delivery}.tar.gz"
        member = _write_targz(inner, delivery, target, p.processing_time + timedelta(hours=5))
        shutil.rmtree(scratch)
        rel = target.name
    return {"path": rel, "member": member, "files": tuple(sorted(files)), "written": written}


# ------------------------------------------------------------------------------------------ truth


def _cells(plan: _Plan, p: _Product, m: _Masks) -> list[dict[str, Any]]:
    cfg = plan.config
    x0, y0 = GRID_OFFSET + PIXEL * p.kx, GRID_OFFSET + PIXEL * p.ky
    size = CELL_PX * PIXEL
    out = []
    i_first = math.ceil((x0 - GRID_OFFSET) / size)
    j_top = math.floor((y0 - GRID_OFFSET) / size) - 1  # the highest cell whose top edge is <= y0
    i = i_first
    while True:
        col = round((GRID_OFFSET + i * size - x0) / PIXEL)
        if col + CELL_PX > cfg.width:
            break
        j = j_top
        while True:
            row = round((y0 - (GRID_OFFSET + (j + 1) * size)) / PIXEL)
            if row + CELL_PX > cfg.height:
                break
            win = (slice(row, row + CELL_PX), slice(col, col + CELL_PX))
            if row >= 0 and col >= 0 and m.footprint[win].all():
                out.append(
                    {
                        "location_id": f"EPSG{p.datatake.site.epsg}-{i:04d}-{j:04d}",
                        "i": i,
                        "j": j,
                        "col": col,
                        "row": row,
                        "fractions": m.fractions(win),
                    }
                )
            j -= 1
        i += 1
    return out


def generate(out_dir: str | Path, config: SynthConfig | None = None) -> Truth:
    """Write the synthetic products of `config` under `out_dir` and `out_dir/truth.json`."""
    config = config or SynthConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = _Plan(config)
    env = rasterio.Env(GDAL_CACHEMAX=64 * 1024 * 1024, GDAL_PAM_ENABLED="NO", GDAL_NUM_THREADS="1")
    records: list[ProductTruth] = []
    _remove(out / STAGING)
    with env, _removed_afterwards(out / STAGING):
        for p in plan.products:
            res = _write_product(plan, p, out)
            written: _Written = res["written"]
            m = written.masks
            fr = m.fractions()
            site = p.datatake.site
            ring = p.footprint.ring()
            x0, y0 = GRID_OFFSET + PIXEL * p.kx, GRID_OFFSET + PIXEL * p.ky
            records.append(
                ProductTruth(
                    scene_id=p.name,
                    path=res["path"],
                    member=res["member"],
                    packaging=p.packaging,
                    format=p.fmt,
                    files=res["files"],
                    datatake=f"{p.datatake.id:010d}",
                    tile=p.tile,
                    processor_version=p.version,
                    processing_time=_iso(p.processing_time),
                    start_time=_iso(p.start),
                    stop_time=_iso(p.stop),
                    date=p.start.strftime("%Y-%m-%d"),
                    site=site.index,
                    date_index=p.datatake.date_index,
                    epsg=site.epsg,
                    transform=(PIXEL, 0.0, x0, 0.0, -PIXEL, y0),
                    width=config.width,
                    height=config.height,
                    bands=config.bands,
                    footprint_utm=tuple((round(x, 3), round(y, 3)) for x, y in ring),
                    footprint_lonlat=tuple(
                        (round(lo, 8), round(la, 8)) for lo, la in _lonlat(site.epsg, ring)
                    ),
                    valid_fraction=round(float(m.footprint.mean()), 6),
                    fractions=fr,
                    quality_percent=_quality_percent(fr),
                    no_data_bands=plan.no_data_bands,
                    defective_bands=written.defective_bands,
                    shadow_offset_px=p.datatake.shadow_offset,
                    angles={
                        "sun_elevation": round(p.datatake.sun_elevation, 6),
                        "sun_azimuth": round(p.datatake.sun_azimuth, 6),
                        "scene_azimuth": round(site.theta_deg, 6),
                        "across_off_nadir": round(p.datatake.across_off_nadir, 6),
                        "along_off_nadir": round(p.datatake.along_off_nadir, 6),
                    },
                    superseded_by=p.superseded_by.name if p.superseded_by else None,
                    supersedes=p.supersedes.name if p.supersedes else None,
                    partner_tile=p.partner.name if p.partner else None,
                    cells=tuple(_cells(plan, p, m)),
                )
            )
    by_dt: dict[int, list[_Product]] = {}
    for p in plan.products:
        by_dt.setdefault(p.datatake.id, []).append(p)
    revisits: dict[str, tuple[dict[str, Any], ...]] = {}
    for site in plan.sites:
        entries = []
        for dt in plan.datatakes:
            if dt.site is site:
                entries.append(
                    {
                        "date": dt.start.strftime("%Y-%m-%d"),
                        "datatake": f"{dt.id:010d}",
                        "start_time": _iso(dt.start),
                        "scene_ids": sorted(p.name for p in by_dt[dt.id]),
                    }
                )
        revisits[str(site.index)] = tuple(entries)
    duplicates = []
    for dt in plan.datatakes:
        group = by_dt[dt.id]
        if len(group) > 1:
            kinds = []
            if dt.tiles > 1:
                kinds.append("overlapping_tiles")
            if any(p.reprocessed for p in group):
                kinds.append("reprocessed")
            duplicates.append(
                {"datatake": f"{dt.id:010d}", "kinds": kinds, "scene_ids": sorted(p.name for p in group)}
            )
    sites = tuple(
        {
            "site": s.index,
            "epsg": s.epsg,
            "lon": round(s.lon, 6),
            "lat": round(s.lat, 6),
            "scene_azimuth": round(s.theta_deg, 6),
        }
        for s in plan.sites
    )
    truth = Truth(
        config=config.to_dict(),
        sites=sites,
        products=tuple(records),
        revisits=revisits,
        duplicates=tuple(duplicates),
    )
    truth.to_json(out / "truth.json")
    return truth
