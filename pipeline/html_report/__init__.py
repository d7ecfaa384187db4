"""The build report: one self-contained HTML page, `report/index.html`, describing a finished build.

The page holds the funnel (products, rejections, candidate patches, drops by reason, duplicates, kept
patches, locations, multi-date share) as a table and a chart; a lon/lat map of the locations coloured by
their number of dates; histograms of patch cloud fraction and dates per location and the patches per
month; the mean +- standard deviation spectrum; RGB quicklooks of a few patches beside their quality
masks; and the rejected products with their reasons.

Self-contained means nothing is fetched when the page is opened: the CSS is inline, every picture is a
PNG drawn with matplotlib's Agg canvas and embedded as a `data:` URI, and no text links anywhere else.
Every text taken from the build is escaped.

Layout: `load_report_data(store)` does all the reading (stage records, parquet tables, a few patches of
`dataset.zarr`, `stats/statistics.json`) into a `ReportData` of plain columns; `render_report(data)` is
pure (same data, same bytes) and built from small pure functions; `write_report(store)` joins the two.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from pipeline import tables
from pipeline.quality import (
    BACKGROUND,
    CIRRUS_MASK,
    CLOUD,
    CLOUD_SHADOW,
    DEFECTIVE,
    HAZE,
    NODATA,
    NODATA_VALUE,
    SNOW,
    UNCLASSIFIED,
    WATER,
)
from pipeline.storage import BuildStore
from pipeline.write import REFLECTANCE_SCALE

REPORT_PATH = tables.REPORT
RGB_WAVELENGTHS_NM = (650.0, 550.0, 460.0)
STRETCH_PERCENTILES = (2.0, 98.0)
DPI = 80
MAX_SAMPLES = 8
MAX_STATS_SAMPLE = 16  # patches read for the spectrum when stats/statistics.json is absent
MAX_REJECTED_ROWS = 100
MAX_FUNNEL_REASONS = 12
MAX_MAP_POINTS = 20_000
MAX_MAP_POLYGONS = 3_000
STAGE_ORDER = ("inventory", "mask", "tile", "dedup", "write", "catalog")
REJECTION_TABLES = tuple(tables.REJECTED_BY_STAGE.values())

# Quality-mask categories for the quicklooks, from the lowest to the highest precedence: a pixel takes
# the colour of the last category whose bits it carries (clear when none).
MASK_CATEGORIES: tuple[tuple[str, int, str], ...] = (
    ("clear", 0, "#a6d96a"),
    ("unclassified", UNCLASSIFIED, "#fdae61"),
    ("water", WATER, "#2c7bb6"),
    ("snow", SNOW, "#e0f3f8"),
    ("haze", HAZE, "#c2a5cf"),
    ("cloud shadow", CLOUD_SHADOW, "#4d4d4d"),
    ("cirrus", CIRRUS_MASK, "#92c5de"),
    ("cloud", CLOUD, "#f7f7f7"),
    ("defective", DEFECTIVE, "#d7191c"),
    ("nodata / background", NODATA | BACKGROUND, "#000000"),
)

FloatArray = NDArray[np.float64]


# Data -------------------------------------------------------------------------------------------------
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


# Pure pieces ------------------------------------------------------------------------------------------
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


def stretch_rgb(
    cube: NDArray[np.integer[Any]],
    quality: NDArray[np.integer[Any]] | None = None,
    percentiles: tuple[float, float] = STRETCH_PERCENTILES,
) -> FloatArray:
    """(3, y, x) stored reflectance -> (y, x, 3) floats in [0, 1], each channel stretched between its
    percentiles; nodata is black. The percentiles come from the pixels without cloud, cirrus or snow
    when the quality bits are given and at least 5 % of the patch is such (so clouds saturate instead
    of darkening the ground), else from every valid pixel."""
    valid = np.all(cube != NODATA_VALUE, axis=0)
    reference = valid
    if quality is not None:
        clear = valid & ((quality & (CLOUD | CIRRUS_MASK | SNOW)) == 0)
        if clear.mean() >= 0.05:
            reference = clear
    out = np.zeros((*cube.shape[1:], 3), dtype=np.float64)
    for channel in range(3):
        values = cube[channel].astype(np.float64)
        if not reference.any():
            continue
        low, high = np.percentile(values[reference], percentiles)
        scale = high - low if high > low else 1.0
        out[..., channel] = np.where(valid, np.clip((values - low) / scale, 0.0, 1.0), 0.0)
    return out


def mask_categories(bits: NDArray[np.integer[Any]]) -> NDArray[np.uint8]:
    """Quality bit flags -> index into MASK_CATEGORIES (the highest-precedence flag set)."""
    out = np.zeros(bits.shape, dtype=np.uint8)
    for index, (_, flag, _) in enumerate(MASK_CATEGORIES):
        if flag:
            out[(bits & flag) != 0] = index
    return out


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
    from pipeline.stats import BandMoments

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


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def plain(text: str) -> str:
    """Text for a matplotlib label: `$` would start mathtext (and fail on an odd count)."""
    return text.replace("$", r"\$")


def shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


# Pictures ---------------------------------------------------------------------------------------------
def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Any, photo: bool = False) -> bytes:
    """The figure as a 256-colour PNG (about half the bytes of Agg's RGBA; dithered for photos)."""
    from PIL import Image

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    buffer.seek(0)
    dither = Image.Dither.FLOYDSTEINBERG if photo else Image.Dither.NONE
    with Image.open(buffer) as image:
        palette = image.convert("RGB").quantize(colors=256, dither=dither)
    out = io.BytesIO()
    palette.save(out, format="PNG", optimize=True)
    return out.getvalue()


def img_tag(png: bytes, alt: str, css_class: str = "chart") -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="{esc(css_class)}" alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def funnel_png(rows: Sequence[FunnelRow]) -> bytes:
    shown = [row for row in rows if not row.percent]
    figure = _figure(9.0, 0.9 + 0.32 * max(len(shown), 1))
    ax = figure.add_subplot()
    labels = [("\u2013 " if row.level else "") + plain(shorten(row.label, 60)) for row in shown]
    values = [float(row.value) for row in shown]
    colours = ["#3b6ea5" if row.level == 0 else ("#e08214" if row.level == 1 else "#fdb863") for row in shown]
    positions = np.arange(len(shown))
    ax.barh(positions, values, color=colours)
    ax.set_yticks(positions, labels, fontsize=9)
    ax.invert_yaxis()
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > 100:
        ax.set_xscale("log")
        ax.set_xlim(0.8, max(positive) * 3)
    elif positive:
        ax.set_xlim(0, max(positive) * 1.15)
    for y, row in zip(positions, shown, strict=True):
        if row.value > 0:
            ax.text(float(row.value), y, " " + format_value(row.value), va="center", fontsize=8)
    ax.set_xlabel("count")
    ax.grid(axis="x", alpha=0.3)
    return _png(figure)


def map_extent(lon: FloatArray, lat: FloatArray) -> tuple[float, float, float, float, float]:
    """(west, east, south, north, aspect) framing the points with a margin; `aspect` is the y/x scale
    that makes a degree of longitude as long as it is at the mean latitude."""
    if not len(lon):
        return -180.0, 180.0, -90.0, 90.0, 1.0
    pad_x = max(float(np.ptp(lon)) * 0.05, 0.05)
    pad_y = max(float(np.ptp(lat)) * 0.05, 0.05)
    mean_lat = float(np.clip(np.mean(lat), -80.0, 80.0))
    aspect = 1.0 / math.cos(math.radians(mean_lat))
    return (
        float(lon.min()) - pad_x,
        float(lon.max()) + pad_x,
        float(lat.min()) - pad_y,
        float(lat.max()) + pad_y,
        aspect,
    )


def map_png(locations: LocationColumns, footprints: Sequence[FloatArray]) -> bytes:
    import matplotlib
    from matplotlib.collections import LineCollection, PolyCollection
    from matplotlib.colors import BoundaryNorm

    lon = np.concatenate([locations.lon, *(ring[:, 0] for ring in footprints)])
    lat = np.concatenate([locations.lat, *(ring[:, 1] for ring in footprints)])
    west, east, south, north, aspect = map_extent(lon, lat)
    width = 9.0
    ratio = float(np.clip((north - south) * aspect / (east - west), 0.3, 1.2))
    figure = _figure(width, 1.2 + (width - 1.5) * ratio)
    ax = figure.add_subplot()
    top = max(int(locations.n_dates.max()) if len(locations.n_dates) else 1, 2)
    cmap = matplotlib.colormaps["viridis"].resampled(top)
    norm = BoundaryNorm(np.arange(0.5, top + 1.0, 1.0), cmap.N)
    if footprints:
        ax.add_collection(LineCollection(list(footprints), colors="#999999", linewidths=0.6))
    mappable: Any
    if locations.outlines:  # few locations: the cells themselves, a dot would hide them
        mappable = PolyCollection(
            list(locations.outlines), array=locations.n_dates, cmap=cmap, norm=norm, edgecolors="#333333"
        )
        mappable.set_linewidth(0.3)
        ax.add_collection(mappable)
        drawn = len(locations.lon)
    else:
        keep = evenly_spaced(len(locations.lon), MAX_MAP_POINTS)
        size = 3 if len(keep) > 2000 else 10
        mappable = ax.scatter(
            locations.lon[keep], locations.lat[keep], c=locations.n_dates[keep], cmap=cmap, norm=norm, s=size
        )
        drawn = len(keep)
    colourbar = figure.colorbar(mappable, ax=ax, shrink=0.9, pad=0.01)
    colourbar.set_label("dates per location")
    colourbar.set_ticks(list(range(1, top + 1, max(1, top // 10))))
    ax.set_xlim(west, east)
    ax.set_ylim(south, north)
    ax.set_aspect(aspect)
    ax.set_xlabel("longitude (\u00b0)")
    ax.set_ylabel("latitude (\u00b0)")
    ax.grid(alpha=0.3)
    title = f"{len(locations.lon):,} locations"
    if drawn < len(locations.lon):
        title += f" ({drawn:,} drawn)"
    if footprints:
        title += f"; grey: {len(footprints):,} scene footprints"
    ax.set_title(title, fontsize=10)
    return _png(figure)


def distributions_png(patches: PatchColumns, locations: LocationColumns) -> bytes:
    from matplotlib.ticker import MaxNLocator

    figure = _figure(12.0, 3.4)
    cloud_ax, dates_ax, time_ax = figure.subplots(1, 3)
    cloud = patches.cloud_fraction[np.isfinite(patches.cloud_fraction)] * 100.0
    top = max(float(cloud.max()) if len(cloud) else 1.0, 1.0)
    cloud_ax.hist(cloud, bins=np.linspace(0.0, top, 21), color="#3b6ea5", edgecolor="white")
    cloud_ax.set_xlabel("cloud (% of patch pixels)")
    cloud_ax.set_ylabel("patches")
    cloud_ax.set_title("Patch cloud fraction", fontsize=10)

    values, numbers = np.unique(locations.n_dates, return_counts=True)
    dates_ax.bar(values, numbers, color="#5aae61", width=0.8)
    dates_ax.set_xticks(values if len(values) <= 20 else values[:: max(1, len(values) // 10)])
    dates_ax.set_xlabel("dates per location")
    dates_ax.set_ylabel("locations")
    dates_ax.set_title("Dates per location", fontsize=10)

    months = patches.month
    if len(months):
        first, last = months.min(), months.max()
        span = np.arange(first, last + np.timedelta64(1, "M"), dtype="datetime64[M]")
        counts = np.array([(months == m).sum() for m in span])
        labels = [str(m) for m in span]
        time_ax.bar(np.arange(len(span)), counts, color="#9970ab", width=0.8)
        step = max(1, len(span) // 8)
        time_ax.set_xticks(np.arange(len(span))[::step], labels[::step], rotation=45, ha="right", fontsize=8)
    time_ax.set_ylabel("patches")
    time_ax.set_title("Patches per month", fontsize=10)
    for ax in (cloud_ax, dates_ax, time_ax):
        ax.grid(axis="y", alpha=0.3)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    return _png(figure)


def spectrum_png(spectrum: Spectrum) -> bytes:
    figure = _figure(9.0, 4.0)
    ax = figure.add_subplot()
    order = np.argsort(spectrum.wavelength_nm)
    wavelength = spectrum.wavelength_nm[order]
    mean, std = spectrum.mean[order], spectrum.std[order]
    # Break the line across the dropped (water-vapour) ranges instead of bridging them.
    steps = np.diff(wavelength)
    gaps = np.flatnonzero(steps > 3 * np.median(steps)) + 1 if len(steps) else np.zeros(0, np.int64)
    wavelength = np.insert(wavelength, gaps, np.nan)
    mean, std = np.insert(mean, gaps, np.nan), np.insert(std, gaps, np.nan)
    ax.fill_between(wavelength, mean - std, mean + std, color="#9ecae1", alpha=0.7, label="mean \u00b1 std")
    ax.plot(wavelength, mean, color="#08519c", linewidth=1.2, label="mean")
    ax.set_xlabel("wavelength (nm)")
    ax.set_ylabel("reflectance")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=9)
    return _png(figure)


def matplotlib_colour(rank: int, code: int) -> str:
    """Colour of a label class in the quicklooks: white for 0 (no label), else tab20 by rank."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    return "#ffffff" if code == 0 else str(to_hex(colormaps["tab20"](rank % 20)))


def sample_png(sample: SamplePatch) -> bytes:
    from matplotlib.colors import ListedColormap

    panels = 2 if sample.label is None else 3
    figure = _figure(2.1 * panels, 2.3)
    axes = figure.subplots(1, panels)
    rgb_ax, mask_ax = axes[0], axes[1]
    rgb_ax.imshow(stretch_rgb(sample.rgb, sample.quality), interpolation="nearest")
    red, green, blue = (f"{w:.0f}" for w in sample.rgb_wavelengths_nm)
    rgb_ax.set_title(f"RGB {red}/{green}/{blue} nm", fontsize=8)
    cmap = ListedColormap([colour for *_, colour in MASK_CATEGORIES])
    mask_ax.imshow(
        mask_categories(sample.quality),
        cmap=cmap,
        vmin=-0.5,
        vmax=len(MASK_CATEGORIES) - 0.5,
        interpolation="nearest",
    )
    mask_ax.set_title("quality mask", fontsize=8)
    if sample.label is not None:
        # Classes by rank of their code, one colour each; 0 (no label) white.
        codes, ranks = np.unique(sample.label, return_inverse=True)
        colours = [matplotlib_colour(k, int(code)) for k, code in enumerate(codes.tolist())]
        axes[2].imshow(
            ranks.reshape(sample.label.shape),
            cmap=ListedColormap(colours),
            vmin=-0.5,
            vmax=len(codes) - 0.5,
            interpolation="nearest",
        )
        axes[2].set_title(f"labels {sample.label_name}", fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    return _png(figure, photo=True)


# HTML -------------------------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;
color:#222;background:#fff;line-height:1.4}
header{background:#1f3b5a;color:#fff;padding:16px 28px}header h1{margin:0 0 4px;font-size:22px}
header p{margin:0;opacity:.85;font-size:13px;word-break:break-all}
nav{padding:8px 28px;background:#eef2f6;font-size:13px}nav a{margin-right:14px;color:#1f3b5a}
main{padding:8px 28px 40px;max-width:1200px}section{margin-top:22px}
h2{font-size:18px;border-bottom:1px solid #ccd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #dde;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f3f5f8}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.level-1 td:first-child{padding-left:26px;color:#8a4b00}
tr.level-2 td:first-child{padding-left:46px;color:#8a4b00}
img.chart{max-width:100%;height:auto;display:block;margin:6px 0}
.samples{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;border:1px solid #dde;padding:6px;background:#fafbfc}
figcaption{font-size:12px;max-width:340px;overflow-wrap:anywhere}
.swatch{display:inline-block;width:12px;height:12px;border:1px solid #888;vertical-align:middle;
margin:0 4px 0 10px}
.note{color:#555;font-size:13px}td.reason{max-width:520px;word-break:break-word}
td.source{max-width:360px;word-break:break-all;color:#555;font-size:12px}
"""


def funnel_table_html(rows: Sequence[FunnelRow]) -> str:
    lines = ['<table class="funnel"><thead><tr><th>step</th><th>count</th></tr></thead><tbody>']
    for row in rows:
        attributes = f'class="level-{row.level}" data-stage="{esc(row.stage)}" data-key="{esc(row.key)}"'
        if row.reason is not None:
            attributes += f' data-reason="{esc(row.reason)}"'
        attributes += f' data-value="{esc(row.value)}"'
        lines.append(
            f"<tr {attributes}><td>{esc(row.label)}</td>"
            f'<td class="num">{esc(format_value(row.value, row.percent))}</td></tr>'
        )
    lines.append("</tbody></table>")
    return "\n".join(lines)


def stages_table_html(records: Mapping[str, Mapping[str, Any]]) -> str:
    lines = [
        "<table><thead><tr><th>stage</th><th>completed</th><th>time (s)</th><th>config hash</th>"
        "<th>pipeline</th></tr></thead><tbody>"
    ]
    ordered = [s for s in STAGE_ORDER if s in records] + sorted(set(records) - set(STAGE_ORDER))
    for stage in ordered:
        record = records[stage]
        timings = record.get("timings") or {}
        seconds = sum(float(v) for v in timings.values() if isinstance(v, int | float))
        lines.append(
            f"<tr><td>{esc(stage)}</td><td>{esc(record.get('completed_at', ''))}</td>"
            f'<td class="num">{seconds:.1f}</td><td>{esc(str(record.get("config_hash", ""))[:12])}</td>'
            f"<td>{esc((record.get('versions') or {}).get('pipeline', ''))}</td></tr>"
        )
    lines.append("</tbody></table>")
    return "\n".join(lines)


def dataset_summary_html(counts: Mapping[str, Mapping[str, Any]]) -> str:
    write = counts.get("write", {})
    if not write:
        return '<p class="note">dataset.zarr: the write stage has no record.</p>'
    size = float(write.get("dataset_bytes", 0)) / 1e6
    return (
        f'<p class="note">dataset.zarr: {esc(format_value(write.get("patches", 0)))} patches \u00d7 '
        f"{esc(format_value(write.get('bands', 0)))} bands \u00d7 128 \u00d7 128 px in "
        f"{esc(format_value(write.get('shards', 0)))} shards, {size:,.1f} MB on disk.</p>"
    )


def rejected_table_html(rows: Sequence[RejectedRow], total: int) -> str:
    if total == 0:
        return '<p class="note">No product was rejected.</p>'
    lines = [
        f'<p class="note" data-rejected-total="{total}">Showing {len(rows):,} of {total:,} rejected '
        "product(s).</p>",
        '<table class="rejected"><thead><tr><th>stage</th><th>scene</th><th>reason</th><th>source</th>'
        "</tr></thead><tbody>",
    ]
    for row in rows:
        scene = row.scene_id or "\u2014"
        lines.append(
            f"<tr><td>{esc(row.stage)}</td><td>{esc(scene)}</td>"
            f'<td class="reason">{esc(row.reason)}</td><td class="source">{esc(row.source_uri)}</td></tr>'
        )
    lines.append("</tbody></table>")
    return "\n".join(lines)


def mask_legend_html() -> str:
    items = "".join(
        f'<span class="swatch" style="background:{colour}"></span>{esc(name)}'
        for name, _, colour in MASK_CATEGORIES
    )
    return f'<p class="note">Quality mask colours (highest precedence last): {items}</p>'


def samples_html(samples: Sequence[SamplePatch]) -> str:
    if not samples:
        return '<p class="note">No patch to show (dataset.zarr is missing or empty).</p>'
    figures = []
    for sample in samples:
        details = f"{sample.date} \u00b7 cloud {sample.cloud_fraction:.1%}"
        figures.append(
            f"<figure>{img_tag(sample_png(sample), f'quicklook of {sample.patch_id}', 'sample')}"
            f"<figcaption>{esc(sample.patch_id)}<br>{esc(details)}</figcaption></figure>"
        )
    return mask_legend_html() + '<div class="samples">' + "".join(figures) + "</div>"


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>\n{body}\n</section>'


def render_report(data: ReportData) -> str:
    """The whole page. Pure: the same data gives the same text."""
    counts = data.counts
    rows = funnel_rows(counts)
    funnel = funnel_table_html(rows)
    if rows:
        funnel += img_tag(funnel_png(rows), "funnel chart")
    else:
        funnel = '<p class="note">No stage record found (_stages/*.json).</p>'

    if len(data.locations.lon):
        where = img_tag(map_png(data.locations, data.footprints), "map of patch locations")
        where += (
            '<p class="note">Locations (grid cells) in longitude/latitude, coloured by their number of '
            "dates; grey outlines are the accepted scenes' footprints.</p>"
        )
        distributions = img_tag(distributions_png(data.patches, data.locations), "patch distributions")
    else:
        where = distributions = '<p class="note">No location index (index/locations.parquet).</p>'

    if data.spectrum is not None and np.isfinite(data.spectrum.mean).any():
        spectrum = img_tag(spectrum_png(data.spectrum), "mean and standard deviation spectrum")
        spectrum += f'<p class="note">Per band over valid pixels, from {esc(data.spectrum.source)}.</p>'
    else:
        spectrum = '<p class="note">No band statistics (stats/statistics.json or dataset.zarr).</p>'

    sections = [
        _section("overview", "Build", stages_table_html(data.records) + dataset_summary_html(counts)),
        _section("funnel", "Funnel", funnel),
        _section("map", "Where", where),
        _section("distributions", "Cloud, dates and time coverage", distributions),
        _section("spectrum", "Spectrum", spectrum),
        _section("samples", "Sample patches", samples_html(data.samples)),
        _section("rejected", "Rejected products", rejected_table_html(data.rejected, data.rejected_total)),
    ]
    nav = "".join(
        f'<a href="#{anchor}">{esc(title)}</a>'
        for anchor, title in (
            ("overview", "Build"),
            ("funnel", "Funnel"),
            ("map", "Map"),
            ("distributions", "Distributions"),
            ("spectrum", "Spectrum"),
            ("samples", "Samples"),
            ("rejected", "Rejected"),
        )
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>SpectralEarth build report \u2014 {esc(data.build_uri)}</title>"
        f"<style>{CSS}</style></head>\n<body>\n"
        f"<header><h1>SpectralEarth build report</h1><p>{esc(data.build_uri)}</p></header>\n"
        f"<nav>{nav}</nav>\n<main>\n" + "\n".join(sections) + "\n</main>\n</body></html>\n"
    )


# I/O --------------------------------------------------------------------------------------------------
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
    import zarr

    from pipeline.write import zarr_store

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
    import zarr

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


def write_report(
    store: BuildStore, max_samples: int = MAX_SAMPLES, max_rejected: int = MAX_REJECTED_ROWS
) -> str:
    """Write `report/index.html` into the build and return its URI."""
    page = render_report(load_report_data(store, max_samples, max_rejected))
    store.write_bytes(REPORT_PATH, page.encode("utf-8"))
    return store.uri_of(REPORT_PATH)
