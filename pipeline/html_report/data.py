"""What the report shows, read from a build: stage records, the index tables, a few patches of
`dataset.zarr` and the band statistics, as plain columns (`ReportData`); no picture and no HTML here."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr
from numpy.typing import NDArray

from pipeline import tables
from pipeline.dataset_arrays import REFLECTANCE_SCALE, zarr_store
from pipeline.stages import ORDER
from pipeline.stats import BandMoments
from pipeline.storage import BuildStore

REPORT_PATH = tables.REPORT
RGB_WAVELENGTHS_NM = (650.0, 550.0, 460.0)
MAX_SAMPLES = 8
MAX_STATS_SAMPLE = 16  # patches read for the spectrum when stats/statistics.json is absent
MAX_REJECTED_ROWS = 100
MAX_FUNNEL_REASONS = 12
MAX_MAP_POLYGONS = 3_000
STAGE_ORDER = ORDER  # the report lists the stages in build order
REJECTION_TABLES = tuple(tables.REJECTED_BY_STAGE.values())

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class FunnelRow:
    """One line of the funnel. `stage`/`key` name the stage record count it shows (`reason` the entry
    of a `*_by_reason` mapping); `level` 0 is the main flow, 1 and 2 what leaves it."""

    label: str
    value: float
    stage: str
    key: str
    reason: str | None = None
    level: int = 0
    percent: bool = False


@dataclass(frozen=True)
class RejectedRow:
    stage: str
    scene_id: str
    source_uri: str
    reason: str


@dataclass(frozen=True)
class PatchColumns:
    """Kept patches (index/patches.parquet), one entry per patch."""

    cloud_fraction: FloatArray
    month: NDArray[np.datetime64]  # datetime64[M]

    @classmethod
    def empty(cls) -> PatchColumns:
        return cls(np.zeros(0), np.zeros(0, "datetime64[M]"))


@dataclass(frozen=True)
class LocationColumns:
    """Locations (index/locations.parquet): centre lon/lat, number of dates, optionally the outlines."""

    lon: FloatArray
    lat: FloatArray
    n_dates: NDArray[np.int64]
    outlines: tuple[FloatArray, ...] = ()  # (k, 2) lon/lat rings; empty for large builds

    @classmethod
    def empty(cls) -> LocationColumns:
        return cls(np.zeros(0), np.zeros(0), np.zeros(0, np.int64))


@dataclass(frozen=True)
class Spectrum:
    """Per-band mean and standard deviation in reflectance units."""

    wavelength_nm: FloatArray
    mean: FloatArray
    std: FloatArray
    source: str


@dataclass(frozen=True)
class SamplePatch:
    patch_id: str
    date: str
    cloud_fraction: float
    rgb_wavelengths_nm: tuple[float, float, float]
    rgb: NDArray[np.int16]  # (3, y, x) stored values, red, green, blue
    quality: NDArray[np.uint16]  # (y, x) bit flags
    label: NDArray[Any] | None = None  # (y, x) class codes of the first benchmark (labels stage), 0: none
    label_name: str = ""


@dataclass(frozen=True)
class ReportData:
    build_uri: str
    records: Mapping[str, Mapping[str, Any]]  # stage -> its _stages/<stage>.json
    patches: PatchColumns = field(default_factory=PatchColumns.empty)
    locations: LocationColumns = field(default_factory=LocationColumns.empty)
    footprints: tuple[FloatArray, ...] = ()  # scene footprints, (k, 2) lon/lat rings
    spectrum: Spectrum | None = None
    samples: tuple[SamplePatch, ...] = ()
    rejected: tuple[RejectedRow, ...] = ()
    rejected_total: int = 0

    @property
    def counts(self) -> dict[str, Mapping[str, Any]]:
        return {stage: record.get("counts", {}) for stage, record in self.records.items()}


def funnel_rows(
    counts: Mapping[str, Mapping[str, Any]], max_reasons: int = MAX_FUNNEL_REASONS
) -> list[FunnelRow]:
    """The funnel from the stage records' counts; lines whose count is not recorded are left out."""
    rows: list[FunnelRow] = []

    def add(stage: str, key: str, label: str, level: int = 0, percent: bool = False) -> None:
        value = counts.get(stage, {}).get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            rows.append(FunnelRow(label, value, stage, key, None, level, percent))

    def reasons(stage: str, key: str, prefix: str, level: int) -> None:
        by_reason: Mapping[str, int] = counts.get(stage, {}).get(key) or {}
        ordered = sorted(by_reason.items(), key=lambda item: (-item[1], item[0]))
        for reason, number in ordered[:max_reasons]:
            rows.append(FunnelRow(f"{prefix}{reason}", number, stage, key, reason, level))
        rest = ordered[max_reasons:]
        if rest:
            label = f"{prefix}{len(rest)} other reasons"
            rows.append(FunnelRow(label, sum(n for _, n in rest), stage, f"{key}:other", None, level))

    add("inventory", "products_found", "EnMAP products found")
    add("inventory", "rejected", "products rejected", level=1)
    reasons("inventory", "rejected_by_reason", "rejected: ", level=2)
    add("inventory", "scenes_accepted", "scenes accepted")
    add("mask", "rejected", "scenes rejected by mask", level=1)
    add("tile", "scenes_rejected", "scenes rejected by tile", level=1)
    add("dedup", "candidates", "candidate patches")
    reasons("dedup", "dropped_by_reason", "dropped: ", level=1)
    add("dedup", "kept_candidates", "candidates kept")
    add("dedup", "duplicates", "duplicates (same acquisition)", level=1)
    add("dedup", "patches", "kept patches")
    add("write", "patches", "patches in dataset.zarr")
    add("dedup", "locations", "unique locations")
    add("dedup", "multi_date_locations", "locations seen on several dates")
    add("dedup", "multi_date_share", "multitemporal share of locations", percent=True)
    return rows


def format_value(value: float, percent: bool = False) -> str:
    if percent:
        return f"{value:.1%}"
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.3f}"


def nearest_bands(wavelength_nm: Sequence[float] | FloatArray, targets: Iterable[float]) -> list[int]:
    """Index of the band nearest each target wavelength."""
    wavelengths = np.asarray(wavelength_nm, dtype=np.float64)
    return [int(np.argmin(np.abs(wavelengths - target))) for target in targets]


def spectrum_from_statistics(statistics: Mapping[str, Any]) -> Spectrum:
    """`stats/statistics.json` (stored int16 units, null for a band without data) -> reflectance."""

    def column(name: str) -> FloatArray:
        return np.array([np.nan if v is None else float(v) for v in statistics[name]], dtype=np.float64)

    return Spectrum(
        column("wavelength_nm"),
        column("mean") * REFLECTANCE_SCALE,
        column("std") * REFLECTANCE_SCALE,
        "stats/statistics.json (all kept patches)",
    )


def spectrum_from_cubes(wavelength_nm: FloatArray, cubes: NDArray[np.int16], total: int) -> Spectrum:
    """Mean and population std per band over the valid pixels of (n, B, y, x) stored patches."""
    moments = BandMoments.of_block(cubes) if len(cubes) else BandMoments.empty(len(wavelength_nm))
    mean = np.where(moments.count > 0, moments.mean, np.nan)
    source = f"a sample of {len(cubes)} of {total} patches (stats/statistics.json is absent)"
    return Spectrum(
        np.asarray(wavelength_nm, np.float64),
        mean * REFLECTANCE_SCALE,
        moments.std * REFLECTANCE_SCALE,
        source,
    )


def evenly_spaced(total: int, count: int) -> NDArray[np.int64]:
    """Up to `count` indices spread evenly over range(total), first and last included."""
    if total <= 0 or count <= 0:
        return np.zeros(0, np.int64)
    if total <= count:
        return np.arange(total, dtype=np.int64)
    return np.unique(np.linspace(0, total - 1, count).round().astype(np.int64))


def _rings(geometries: Iterable[Any]) -> list[FloatArray]:
    rings: list[FloatArray] = []
    for geometry in geometries:
        if geometry is None or geometry.is_empty:
            continue
        for part in getattr(geometry, "geoms", [geometry]):
            exterior = getattr(part, "exterior", None)
            if exterior is not None:
                rings.append(np.asarray(exterior.coords, dtype=np.float64)[:, :2])
    return rings


def _load_locations(store: BuildStore) -> LocationColumns:
    if not store.exists(tables.INDEX_LOCATIONS):
        return LocationColumns.empty()
    frame = tables.read_geodataframe_checked(store, tables.INDEX_LOCATIONS)
    bounds = frame.geometry.bounds
    outlines = tuple(_rings(frame.geometry)) if len(frame) <= MAX_MAP_POLYGONS else ()
    return LocationColumns(
        lon=((bounds["minx"] + bounds["maxx"]) / 2).to_numpy(np.float64),
        lat=((bounds["miny"] + bounds["maxy"]) / 2).to_numpy(np.float64),
        n_dates=frame["n_dates"].to_numpy(np.int64),
        outlines=outlines,
    )


def _load_patches(store: BuildStore) -> tuple[PatchColumns, Any]:
    if not store.exists(tables.INDEX_PATCHES):
        return PatchColumns.empty(), None
    table = tables.read_table_checked(store, tables.INDEX_PATCHES)
    columns = [c for c in ("row", "patch_id", "start_time", "cloud_fraction") if c in table.column_names]
    frame = table.select(columns).to_pandas()
    months = frame["start_time"].dt.tz_localize(None).to_numpy("datetime64[ns]").astype("datetime64[M]")
    patches = PatchColumns(frame["cloud_fraction"].to_numpy(np.float64), months)
    return patches, frame


def _load_footprints(store: BuildStore) -> tuple[FloatArray, ...]:
    if not store.exists(tables.SCENES):
        return ()
    frame = tables.read_geodataframe_checked(store, tables.SCENES)
    chosen = evenly_spaced(len(frame), MAX_MAP_POLYGONS)
    return tuple(_rings(frame.geometry.iloc[chosen]))


def _load_rejected(store: BuildStore, limit: int) -> tuple[tuple[RejectedRow, ...], int]:
    rows: list[RejectedRow] = []
    for relative in REJECTION_TABLES:
        if not store.exists(relative):
            continue
        for record in tables.read_table_checked(store, relative).to_pylist():
            rows.append(
                RejectedRow(
                    stage=str(record.get("stage") or relative.split("/")[0]),
                    scene_id=str(record.get("scene_id") or ""),
                    source_uri=str(record.get("source_uri") or ""),
                    reason=str(record.get("reason") or ""),
                )
            )
    return tuple(rows[:limit]), len(rows)


def _load_dataset(
    store: BuildStore, frame: Any, max_samples: int, need_spectrum: bool
) -> tuple[tuple[SamplePatch, ...], Spectrum | None]:
    """Sample patches (RGB bands and quality) and, without stats/statistics.json, their spectrum."""
    if frame is None or len(frame) == 0 or not store.exists(tables.DATASET_METADATA):
        return (), None
    source = zarr_store(store)
    reflectance = zarr.open_array(source, path="reflectance", mode="r")
    quality = zarr.open_array(source, path="quality", mode="r")
    wavelength = np.asarray(zarr.open_array(source, path="wavelength", mode="r")[:], dtype=np.float64)
    rgb_bands = nearest_bands(wavelength, RGB_WAVELENGTHS_NM)
    rgb_nm = (
        float(wavelength[rgb_bands[0]]),
        float(wavelength[rgb_bands[1]]),
        float(wavelength[rgb_bands[2]]),
    )
    labels = _first_labels(source)
    frame = frame.sort_values("row").reset_index(drop=True)
    sample_positions = set(evenly_spaced(len(frame), max_samples).tolist())
    stats_positions = set(evenly_spaced(len(frame), MAX_STATS_SAMPLE).tolist()) if need_spectrum else set()
    samples: list[SamplePatch] = []
    cubes: list[NDArray[np.int16]] = []
    for position in sorted(sample_positions | stats_positions):
        record = frame.iloc[position]
        row = int(record["row"])
        cube = np.asarray(reflectance[row])
        if position in stats_positions:
            cubes.append(cube)
        if position in sample_positions:
            samples.append(
                SamplePatch(
                    patch_id=str(record["patch_id"]),
                    date=record["start_time"].strftime("%Y-%m-%d"),
                    cloud_fraction=float(record["cloud_fraction"]),
                    rgb_wavelengths_nm=rgb_nm,
                    rgb=cube[rgb_bands].copy(),
                    quality=np.asarray(quality[row]),
                    label=None if labels is None else np.asarray(labels[1][row]),
                    label_name="" if labels is None else labels[0],
                )
            )
    spectrum = None
    if need_spectrum:
        spectrum = spectrum_from_cubes(wavelength, np.stack(cubes), len(frame))
    return tuple(samples), spectrum


def _first_labels(source: Any) -> tuple[str, Any] | None:
    """The first benchmark (by name) of dataset.zarr's labels group, for the quicklooks; None without."""
    try:
        group = zarr.open_group(source, path="labels", mode="r", use_consolidated=False)
        names = sorted(group.array_keys())
    except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError):
        return None
    return (names[0], group[names[0]]) if names else None


def load_report_data(
    store: BuildStore, max_samples: int = MAX_SAMPLES, max_rejected: int = MAX_REJECTED_ROWS
) -> ReportData:
    """Read what the report shows from a build; parts of an unfinished build are simply left out."""
    records: dict[str, Mapping[str, Any]] = {}
    for stage in STAGE_ORDER:
        record = store.read_stage_record(stage)
        if record is not None:
            records[stage] = record
    patches, frame = _load_patches(store)
    statistics = (
        tables.read_json_checked(store, tables.STATS_SUMMARY) if store.exists(tables.STATS_SUMMARY) else None
    )
    samples, spectrum = _load_dataset(store, frame, max_samples, need_spectrum=statistics is None)
    if statistics is not None:
        spectrum = spectrum_from_statistics(statistics)
    rejected, rejected_total = _load_rejected(store, max_rejected)
    return ReportData(
        build_uri=store.uri,
        records=records,
        patches=patches,
        locations=_load_locations(store),
        footprints=_load_footprints(store),
        spectrum=spectrum,
        samples=samples,
        rejected=rejected,
        rejected_total=rejected_total,
    )
