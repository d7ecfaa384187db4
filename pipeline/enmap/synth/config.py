"""What to generate (`SynthConfig`) and the constants of the synthetic products' layout."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from typing import Any

from pipeline.enmap.names import ProductName

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
# rows of the seeded noise-spectrum table a pixel's hash indexes (quality_layers, spectra)
NOISE_TABLE_ROWS = 4096


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
        # checked in this order so a config with several faults names the same first one as before
        self._check_counts()
        self._check_choices()
        self._check_ranges()
        self._check_names()

    def _check_counts(self) -> None:
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

    def _check_choices(self) -> None:
        bad = [p for p in self.packagings if p not in PACKAGINGS]
        if bad or not self.packagings:
            raise ValueError(f"packagings must be a non-empty subset of {PACKAGINGS}, got {bad}")
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or not self.formats:
            raise ValueError(f"formats must be a non-empty subset of {FORMATS}, got {bad}")

    def _check_ranges(self) -> None:
        for name in ("cloud_amount", "haze_amount", "cirrus_amount", "snow_amount", "water_amount"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1)")
        if not 0.0 <= self.unclassified_amount < 1.0:
            raise ValueError("unclassified_amount must be in [0, 1)")
        if not 0.0 < self.tile_overlap < 1.0:
            raise ValueError("tile_overlap must be in (0, 1)")
        if self.site_lonlat and len(self.site_lonlat) < self.sites:
            raise ValueError("site_lonlat must give one (lon, lat) per site")

    def _check_names(self) -> None:
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
