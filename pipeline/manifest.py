"""Build manifests: YAML in, frozen and validated configuration out.

Each section is a frozen dataclass, so a `Manifest` is hashable and safe to hand to Dask tasks. A
stage's configuration hash is the SHA-256 of the canonical JSON of the sections it depends on, never
Python's `hash()`, so it is stable across processes and machines. Unknown keys are errors that name
the key: a typo must not silently fall back to a default.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import yaml

from pipeline.grid import DEFAULT_OFFSET, DEFAULT_PATCH_SIZE, DEFAULT_PIXEL_SIZE, GridSpec
from pipeline.quality import FLAG_NAMES
from pipeline.sections import ManifestError, check_keys
from pipeline.storage import canonical_json
from pipeline.storage_settings import StorageError, StorageSettings, refuse_credentials
from stac.settings import CatalogSettings


def _number(value: Any, key: str, *, low: float | None = None, high: float | None = None) -> float:
    """A finite number within [low, high]. NaN compares false with every bound, so it is refused
    first: a NaN limit must never read as "no limit"."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ManifestError(f"'{key}' must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ManifestError(f"'{key}' must be a finite number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ManifestError(f"'{key}' must be {_range_text(low, high)}, got {value!r}")
    return float(value)


def _range_text(low: float | None, high: float | None) -> str:
    if low is not None and high is not None:
        return f"within [{low:g}, {high:g}]"
    if low is not None:
        return f">= {low:g}"
    return f"<= {high:g}" if high is not None else "a number"


def _integer(value: Any, key: str, *, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ManifestError(f"'{key}' must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ManifestError(f"'{key}' must be an integer {_range_text(low, high)}, got {value!r}")
    return value


def _date(value: Any, key: str) -> date | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    if isinstance(value, str):
        try:
            return date.fromisoformat(value)
        except ValueError:
            pass
    raise ManifestError(f"'{key}' must be a date YYYY-MM-DD, got {value!r}")


def _ranges(value: Any, key: str, kind: type) -> tuple[tuple[Any, Any], ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ManifestError(f"'{key}' must be a list of [first, last] pairs, got {value!r}")
    out = []
    for index, pair in enumerate(value):
        where = f"{key}[{index}]"
        if not (isinstance(pair, list) and len(pair) == 2):
            raise ManifestError(f"'{where}' must be a [first, last] pair, got {pair!r}")
        first: float
        last: float
        if kind is int:
            first, last = _integer(pair[0], where, low=1), _integer(pair[1], where, low=1)
        else:
            first, last = _number(pair[0], where, low=0), _number(pair[1], where, low=0)
        if last < first:
            raise ManifestError(f"'{where}' is empty: last {last} < first {first}")
        out.append((first, last))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class SceneFilters:
    """Which valid products enter the build (inventory stage)."""

    start_date: date | None = None  # acquisition date on or after
    end_date: date | None = None  # acquisition date on or before
    max_cloud_cover: float | None = None  # percent, METADATA.XML qualityFlag/cloudCover
    processor_versions: tuple[str, ...] = ()  # e.g. ("V010303",); empty = any

    KEYS = {"start_date", "end_date", "max_cloud_cover", "processor_versions"}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> SceneFilters:
        check_keys(raw, cls.KEYS, "filters")
        versions = raw.get("processor_versions") or []
        if not isinstance(versions, list) or not all(
            isinstance(v, str) and re.fullmatch(r"V\d{6}", v) for v in versions
        ):
            raise ManifestError(
                f"'filters.processor_versions' must be a list like ['V010303'], got {versions!r}"
            )
        start = _date(raw.get("start_date"), "filters.start_date")
        end = _date(raw.get("end_date"), "filters.end_date")
        if start and end and end < start:
            raise ManifestError("'filters.end_date' is before 'filters.start_date'")
        cloud = raw.get("max_cloud_cover")
        return cls(
            start_date=start,
            end_date=end,
            max_cloud_cover=None
            if cloud is None
            else _number(cloud, "filters.max_cloud_cover", low=0, high=100),
            processor_versions=tuple(versions),
        )

    def reject_reason(self, start_time: datetime, cloud_cover: float, processor_version: str) -> str | None:
        """Why a product is filtered out, or None when it passes."""
        day = start_time.astimezone(UTC).date()
        if self.start_date and day < self.start_date:
            return f"filtered: acquired {day} before start_date {self.start_date}"
        if self.end_date and day > self.end_date:
            return f"filtered: acquired {day} after end_date {self.end_date}"
        if self.max_cloud_cover is not None and cloud_cover > self.max_cloud_cover:
            return f"filtered: cloud cover {cloud_cover:g} % above max_cloud_cover {self.max_cloud_cover:g} %"
        if self.processor_versions and processor_version not in self.processor_versions:
            allowed = ", ".join(self.processor_versions)
            return f"filtered: processor version {processor_version} not in [{allowed}]"
        return None


@dataclass(frozen=True, slots=True)
class BandPolicy:
    """The band axis of the whole build.

    Either by 1-based band number in products of `expected_count` bands, or by inclusive wavelength
    ranges (which serves products of any processor version). Both may be given; a band is dropped when
    either rule drops it.
    """

    expected_count: int | None = 224
    drop_bands: tuple[tuple[int, int], ...] = ()
    drop_wavelengths_nm: tuple[tuple[float, float], ...] = ()

    KEYS = {"expected_count", "drop_bands", "drop_wavelengths_nm"}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> BandPolicy:
        check_keys(raw, cls.KEYS, "bands")
        count = raw.get("expected_count", 224)
        expected = None if count is None else _integer(count, "bands.expected_count", low=1)
        drop_bands = _ranges(raw.get("drop_bands"), "bands.drop_bands", int)
        if drop_bands and expected is None:
            raise ManifestError(
                "'bands.drop_bands' needs 'bands.expected_count' (band numbers differ by version)"
            )
        if expected is not None and any(last > expected for _, last in drop_bands):
            raise ManifestError(f"'bands.drop_bands' names a band above expected_count {expected}")
        return cls(
            expected_count=expected,
            drop_bands=drop_bands,
            drop_wavelengths_nm=_ranges(raw.get("drop_wavelengths_nm"), "bands.drop_wavelengths_nm", float),
        )

    def check(self, wavelengths_nm: tuple[float, ...]) -> str | None:
        """Why a product's band axis does not fit this policy, or None."""
        if self.expected_count is not None and len(wavelengths_nm) != self.expected_count:
            return (
                f"has {len(wavelengths_nm)} bands; the manifest's band policy expects {self.expected_count}"
            )
        if not self.kept_bands(wavelengths_nm):
            return "the manifest's band policy keeps no band of this product"
        return None

    def kept_bands(self, wavelengths_nm: tuple[float, ...]) -> tuple[int, ...]:
        """1-based numbers of the bands kept from a product with these centre wavelengths."""
        kept = []
        for number, wavelength in enumerate(wavelengths_nm, start=1):
            if any(first <= number <= last for first, last in self.drop_bands):
                continue
            if any(first <= wavelength <= last for first, last in self.drop_wavelengths_nm):
                continue
            kept.append(number)
        return tuple(kept)


# The grid's sizes. A patch side is a multiple of 16 pixels from 16 to 1024: an exported patch is then a
# whole number of TIFF tiles (TIFF tile sides are multiples of 16, so a tiled GeoTIFF or COG of it has no
# partial tile), and an EnMAP scene is about 1000 px wide, so larger patches would never lie inside one.
# A cell side (patch_size x pixel_size) must exceed 1000 m: UTM northings reach 10,000,000 m and the
# location id writes each cell index with 4 digits (at most 9999). A pixel is at most 1000 m.
PATCH_SIZE_STEP = 16
PATCH_SIZE_RANGE = (16, 1024)
MAX_PIXEL_SIZE_M = 1000.0
MIN_CELL_SIZE_M = 1000.0  # exclusive
PATCH_SIZE_RULE = (
    f"a multiple of {PATCH_SIZE_STEP} from {PATCH_SIZE_RANGE[0]} to {PATCH_SIZE_RANGE[1]} whose cell "
    f"(patch_size x grid.pixel_size) is wider than {MIN_CELL_SIZE_M:g} m, so that every UTM cell index "
    "fits a 4-digit location id"
)


@dataclass(frozen=True, slots=True)
class GridSettings:
    """The global patch grid (SPEC, stage 3) and what to do with a scene off its lattice.

    Allowed values (see PATCH_SIZE_RULE): `pixel_size` a finite number in [0.001, 1000] m, `offset` in
    [0, pixel_size), `patch_size` a multiple of 16 in [16, 1024] with patch_size x pixel_size > 1000 m
    (with 30 m pixels: 48 to 1024).
    """

    patch_size: int = DEFAULT_PATCH_SIZE
    pixel_size: float = DEFAULT_PIXEL_SIZE
    offset: float = DEFAULT_OFFSET
    # "reject": a scene whose pixel corners are not on offset + k x pixel_size is rejected.
    # "nearest": its origin is snapped to the nearest lattice point (nearest-neighbour resampling by a
    # shift of at most half a pixel; pixel values are unchanged, only their stated position moves).
    off_lattice: str = "reject"

    KEYS = {"patch_size", "pixel_size", "offset", "off_lattice"}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> GridSettings:
        check_keys(raw, cls.KEYS, "grid")
        pixel = _number(
            raw.get("pixel_size", DEFAULT_PIXEL_SIZE), "grid.pixel_size", low=0.001, high=MAX_PIXEL_SIZE_M
        )
        patch = raw.get("patch_size", DEFAULT_PATCH_SIZE)
        if (
            isinstance(patch, bool)
            or not isinstance(patch, int)
            or patch % PATCH_SIZE_STEP
            or not PATCH_SIZE_RANGE[0] <= patch <= PATCH_SIZE_RANGE[1]
            or patch * pixel <= MIN_CELL_SIZE_M
        ):
            raise ManifestError(
                f"'grid.patch_size' must be {PATCH_SIZE_RULE} (grid.pixel_size {pixel:g} m), got {patch!r}"
            )
        offset = _number(raw.get("offset", DEFAULT_OFFSET), "grid.offset", low=0)
        if offset >= pixel:
            raise ManifestError(f"'grid.offset' must be below grid.pixel_size ({pixel:g}), got {offset:g}")
        mode = raw.get("off_lattice", "reject")
        if mode not in ("reject", "nearest"):
            raise ManifestError(f"'grid.off_lattice' must be 'reject' or 'nearest', got {mode!r}")
        return cls(patch_size=patch, pixel_size=pixel, offset=offset, off_lattice=mode)

    @property
    def spec(self) -> GridSpec:
        """The lattice these settings describe (off_lattice is a policy of the stages, not of the grid)."""
        return GridSpec(patch_size=self.patch_size, pixel_size=self.pixel_size, offset=self.offset)


@dataclass(frozen=True, slots=True)
class QualityPolicy:
    """Which mask flags disqualify a patch: the largest fraction of a cell's pixels allowed per flag.

    `None` means the flag is recorded but never disqualifies. A flag left out of the manifest is not
    disqualifying either, except nodata and background, which the SPEC fixes at 0 (a kept patch holds no
    nodata in a kept band and lies inside the footprint).
    """

    max_fraction: tuple[tuple[str, float | None], ...] = (("nodata", 0.0), ("background", 0.0))
    cirrus_min_level: int = 1  # cirrus counts from this level on (1 thin, 2 medium, 3 thick)

    KEYS = {"max_fraction", "cirrus_min_level"}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> QualityPolicy:

        check_keys(raw, cls.KEYS, "quality")
        fractions = raw.get("max_fraction") or {}
        check_keys(fractions, set(FLAG_NAMES), "quality.max_fraction")
        merged: dict[str, float | None] = {"nodata": 0.0, "background": 0.0}
        for flag, value in fractions.items():
            key = f"quality.max_fraction.{flag}"
            merged[flag] = None if value is None else _number(value, key, low=0, high=1)
        for flag in ("nodata", "background"):
            if merged[flag] != 0.0:
                raise ManifestError(f"'quality.max_fraction.{flag}' must be 0: kept patches hold none (SPEC)")
        level = _integer(raw.get("cirrus_min_level", 1), "quality.cirrus_min_level", low=1)
        if level > 3:
            raise ManifestError(f"'quality.cirrus_min_level' must be 1, 2 or 3, got {level}")
        ordered = tuple((flag, merged.get(flag)) for flag in FLAG_NAMES if flag in merged)
        return cls(max_fraction=ordered, cirrus_min_level=level)

    def limits(self) -> dict[str, float]:
        """The disqualifying flags and their largest allowed fraction."""
        return {flag: limit for flag, limit in self.max_fraction if limit is not None}


@dataclass(frozen=True, slots=True)
class CodecSettings:
    """The Blosc codec of `reflectance` and `quality` (bitshuffle, one patch per inner chunk): the
    compressor, its level, and the Blosc block size in bytes (0: Blosc's automatic choice). The
    reading pass encodes every candidate patch with it, so it is part of what `cut/` is keyed by."""

    cname: str = "zstd"
    clevel: int = 1
    blocksize: int = 1024 * 1024

    KEYS = {"cname", "clevel", "blocksize"}
    CNAMES = ("zstd", "lz4", "lz4hc", "blosclz", "zlib")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> CodecSettings:
        check_keys(raw, cls.KEYS, "write.codec")
        defaults = cls()
        cname = raw.get("cname", defaults.cname)
        if cname not in cls.CNAMES:
            raise ManifestError(f"'write.codec.cname' must be one of {', '.join(cls.CNAMES)}, got {cname!r}")
        level = _integer(raw.get("clevel", defaults.clevel), "write.codec.clevel", low=0, high=9)
        blocksize = _integer(
            raw.get("blocksize", defaults.blocksize), "write.codec.blocksize", low=0, high=2**31 - 1
        )
        return cls(cname=cname, clevel=level, blocksize=blocksize)


@dataclass(frozen=True, slots=True)
class WriteSettings:
    """`dataset.zarr` layout: patches per shard (one patch per inner chunk) and the Blosc codec; and
    whether the encoded candidates (`cut/`) stay after a successful write."""

    patches_per_shard: int = 32
    codec: CodecSettings = field(default_factory=CodecSettings)
    # True keeps cut/ for incremental builds and `verify --repair`; False removes it after a write
    # (a later write that needs a removed chunk has the mask stage read that scene again).
    keep_cut: bool = True
    # Accepted for older manifests; unused since every shard is one write task.
    max_shards_per_task: int = 8

    KEYS = {"patches_per_shard", "compression_level", "codec", "keep_cut", "max_shards_per_task"}

    @property
    def compression_level(self) -> int:
        return self.codec.clevel

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> WriteSettings:
        check_keys(raw, cls.KEYS, "write")
        per_shard = _integer(raw.get("patches_per_shard", 32), "write.patches_per_shard", low=2)
        if "compression_level" in raw:
            # The older spelling: Blosc zstd at this level with Blosc's automatic block size.
            if "codec" in raw:
                raise ManifestError("give 'write.codec' or the older 'write.compression_level', not both")
            level = _integer(raw["compression_level"], "write.compression_level", low=1)
            if level > 9:
                raise ManifestError(f"'write.compression_level' must be 1-9 (Blosc zstd), got {level}")
            codec = CodecSettings(cname="zstd", clevel=level, blocksize=0)
        else:
            codec = CodecSettings.from_dict(raw.get("codec") or {})
        keep_cut = raw.get("keep_cut", True)
        if not isinstance(keep_cut, bool):
            raise ManifestError(f"'write.keep_cut' must be true or false, got {keep_cut!r}")
        max_shards = _integer(raw.get("max_shards_per_task", 8), "write.max_shards_per_task", low=1)
        return cls(
            patches_per_shard=per_shard, codec=codec, keep_cut=keep_cut, max_shards_per_task=max_shards
        )


@dataclass(frozen=True, slots=True)
class Limits:
    """Budgets that bound what one untrusted product may cost a worker. A member or product over
    budget is rejected with its sizes (a property of the product under these limits, so the limits
    are part of the inventory's configuration hash)."""

    memory_bytes: int = 3 * 1024**3  # an inflated member held in memory; larger ones go to scratch
    scratch_bytes: int = 64 * 1024**3  # what one product may unpack to scratch in all
    xml_bytes: int = 16 * 1024**2  # METADATA.XML and other XML above this are refused unparsed

    KEYS = {"memory_bytes", "scratch_bytes", "xml_bytes"}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Limits:
        check_keys(raw, cls.KEYS, "limits")
        defaults = cls()
        limits = cls(
            memory_bytes=_integer(
                raw.get("memory_bytes", defaults.memory_bytes), "limits.memory_bytes", low=1
            ),
            scratch_bytes=_integer(
                raw.get("scratch_bytes", defaults.scratch_bytes), "limits.scratch_bytes", low=1
            ),
            xml_bytes=_integer(raw.get("xml_bytes", defaults.xml_bytes), "limits.xml_bytes", low=1024),
        )
        if limits.xml_bytes > limits.memory_bytes:
            # XML is parsed in memory: a budget above the memory budget would never be honoured
            raise ManifestError(
                f"'limits.xml_bytes' ({limits.xml_bytes}) must not exceed limits.memory_bytes "
                f"({limits.memory_bytes}): XML is parsed in memory"
            )
        return limits


# Bytes of one reflectance sample (int16) and the band count of an EnMAP L2A product, the most a
# build can keep when the manifest does not fix `bands.expected_count`.
SAMPLE_BYTES = 2
ENMAP_BANDS = 224


def shard_bytes(write: WriteSettings, grid: GridSettings, bands: BandPolicy) -> int:
    """Raw size of one full shard in the worst case (every band of the band policy kept): a write task
    holds at least one whole shard in memory."""
    band_count = bands.expected_count or ENMAP_BANDS
    return write.patches_per_shard * band_count * grid.patch_size**2 * SAMPLE_BYTES


def _check_shard_budget(write: WriteSettings, grid: GridSettings, bands: BandPolicy, limits: Limits) -> None:
    size = shard_bytes(write, grid, bands)
    if size <= limits.memory_bytes:
        return
    band_count = bands.expected_count or ENMAP_BANDS
    per_patch = size // write.patches_per_shard
    most = limits.memory_bytes // per_patch
    hint = (
        f"at most {most} patches per shard fit"
        if most >= 2
        else "not even 2 patches fit: raise limits.memory_bytes or lower grid.patch_size"
    )
    raise ManifestError(
        f"'write.patches_per_shard' {write.patches_per_shard} makes one shard of {_size_text(size)} "
        f"({write.patches_per_shard} x {band_count} bands x {grid.patch_size}^2 px x {SAMPLE_BYTES} bytes), "
        f"above limits.memory_bytes {_size_text(limits.memory_bytes)}: {hint}"
    )


def _size_text(size: int) -> str:
    """`size` bytes in decimal units (1.5 GB), exact bytes below 1 kB."""
    value = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if value < 1000 or unit == "PB":
            return f"{size} B" if unit == "B" else f"{value:.3g} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


# What each stage's output depends on (cumulative along the stage order).
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "inventory": ("filters", "bands", "limits"),
    # The mask pass also encodes the candidate cells (grid, quality thresholds); the codec settings it
    # encodes with key each scene's item (`pipeline.mask.scene_key`), not the stage: shard size and
    # row order (the rest of `write`) never force a re-read.
    "mask": ("filters", "bands", "limits", "quality", "grid"),
    "tile": ("filters", "bands", "limits", "quality", "grid"),
    "dedup": ("filters", "bands", "limits", "quality", "grid"),
    "write": ("filters", "bands", "limits", "quality", "grid", "write"),
    "catalog": ("filters", "bands", "limits", "quality", "grid", "write", "catalog"),
}


def _catalog(raw: Any) -> CatalogSettings:
    return CatalogSettings.from_dict(raw or {})


def _labels(raw: Any) -> tuple[Any, ...]:
    if raw is None:
        return ()
    from pipeline.labels import parse_labels  # the labels stage owns its section (imported lazily)

    return parse_labels(raw)


def _storage(raw: Any) -> StorageSettings:
    try:
        return StorageSettings.from_dict(raw)
    except StorageError as exc:
        raise ManifestError(str(exc)) from None


def _no_credentials(uri: str, key: str) -> None:
    try:
        refuse_credentials(uri)
    except StorageError as exc:
        raise ManifestError(f"'{key}': {exc}") from None


@dataclass(frozen=True, slots=True)
class Manifest:
    name: str
    description: str = ""
    inputs: tuple[str, ...] = ()
    filters: SceneFilters = field(default_factory=SceneFilters)
    bands: BandPolicy = field(default_factory=BandPolicy)
    grid: GridSettings = field(default_factory=GridSettings)
    quality: QualityPolicy = field(default_factory=QualityPolicy)
    write: WriteSettings = field(default_factory=WriteSettings)
    limits: Limits = field(default_factory=Limits)
    storage: StorageSettings = field(default_factory=StorageSettings)  # never part of a config hash
    catalog: CatalogSettings = field(default_factory=CatalogSettings)
    labels: tuple[Any, ...] = ()  # pipeline.labels.LabelSpec per benchmark; only the labels stage reads it
    source: str = "<dict>"  # where it was read from, for messages; not part of any hash

    KEYS = {
        "name",
        "description",
        "inputs",
        "filters",
        "bands",
        "grid",
        "quality",
        "write",
        "limits",
        "storage",
        "catalog",
        "labels",
    }

    @classmethod
    def from_dict(cls, raw: Any, source: str = "<dict>") -> Manifest:
        try:
            if not isinstance(raw, Mapping):
                raise ManifestError("the manifest must be a YAML mapping")
            check_keys(raw, cls.KEYS, "")
            name = raw.get("name")
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                raise ManifestError(f"'name' must be a simple identifier, got {name!r}")
            inputs = raw.get("inputs") or []
            if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
                raise ManifestError("'inputs' must be a list of paths or s3:// URIs")
            description = raw.get("description", "")
            if not isinstance(description, str):
                raise ManifestError("'description' must be text")
            for index, uri in enumerate(inputs):
                _no_credentials(uri, f"inputs[{index}]")
            filters = SceneFilters.from_dict(raw.get("filters") or {})
            bands = BandPolicy.from_dict(raw.get("bands") or {})
            grid = GridSettings.from_dict(raw.get("grid") or {})
            quality = QualityPolicy.from_dict(raw.get("quality") or {})
            write = WriteSettings.from_dict(raw.get("write") or {})
            limits = Limits.from_dict(raw.get("limits") or {})
            _check_shard_budget(write, grid, bands, limits)
            return cls(
                name=name,
                description=description,
                inputs=tuple(inputs),
                filters=filters,
                bands=bands,
                grid=grid,
                quality=quality,
                write=write,
                limits=limits,
                storage=_storage(raw.get("storage")),
                catalog=_catalog(raw.get("catalog")),
                labels=_labels(raw.get("labels")),
                source=source,
            )
        except ManifestError as exc:
            raise ManifestError(f"{source}: {exc}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> Manifest:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ManifestError(f"{path}: cannot read manifest ({exc.strerror})") from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ManifestError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        return cls.from_dict(raw, source=str(path))

    def section_dict(self, name: str) -> Any:
        value = getattr(self, name)
        if hasattr(value, "__dataclass_fields__"):
            return asdict(value)
        return value

    def stage_hash(self, stage: str) -> str:
        """Configuration hash of a stage: its own sections and every upstream stage's, so a change
        anywhere invalidates the stages after it."""
        return self.config_hash(*STAGE_SECTIONS[stage])

    def config_hash(self, *sections: str) -> str:
        """Stable hash of the named sections (what one stage depends on)."""
        payload = {name: self.section_dict(name) for name in sorted(sections)}
        return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("source")
        return out
