"""The report's pictures: matplotlib figures drawn on the Agg canvas (no pyplot, no display) and saved
as 256-colour PNGs; the same data gives the same bytes."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection, PolyCollection
from matplotlib.colors import BoundaryNorm, ListedColormap, to_hex
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from numpy.typing import NDArray
from PIL import Image

from pipeline.html_report.data import (
    FloatArray,
    FunnelRow,
    LocationColumns,
    PatchColumns,
    SamplePatch,
    Spectrum,
    evenly_spaced,
    format_value,
)
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

STRETCH_PERCENTILES = (2.0, 98.0)
DPI = 80
MAX_MAP_POINTS = 20_000  # locations drawn as dots on the map; more are thinned evenly

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


def plain(text: str) -> str:
    """Text for a matplotlib label: `$` would start mathtext (and fail on an odd count)."""
    return text.replace("$", r"\$")


def shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _figure(width: float, height: float) -> Any:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Any, photo: bool = False) -> bytes:
    """The figure as a 256-colour PNG (about half the bytes of Agg's RGBA; dithered for photos)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    buffer.seek(0)
    dither = Image.Dither.FLOYDSTEINBERG if photo else Image.Dither.NONE
    with Image.open(buffer) as image:
        palette = image.convert("RGB").quantize(colors=256, dither=dither)
    out = io.BytesIO()
    palette.save(out, format="PNG", optimize=True)
    return out.getvalue()


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
    lon = np.concatenate([locations.lon, *(ring[:, 0] for ring in footprints)])
    lat = np.concatenate([locations.lat, *(ring[:, 1] for ring in footprints)])
    west, east, south, north, aspect = map_extent(lon, lat)
    width = 9.0
    ratio = float(np.clip((north - south) * aspect / (east - west), 0.3, 1.2))
    figure = _figure(width, 1.2 + (width - 1.5) * ratio)
    ax = figure.add_subplot()
    top = max(int(locations.n_dates.max()) if len(locations.n_dates) else 1, 2)
    cmap = colormaps["viridis"].resampled(top)
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
    return "#ffffff" if code == 0 else str(to_hex(colormaps["tab20"](rank % 20)))


def sample_png(sample: SamplePatch) -> bytes:
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
