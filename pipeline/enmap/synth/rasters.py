"""Every raster layer of one product: the spectral image with its statistics and quicklooks, the QL layers."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.enmap.synth.config import GAIN, NODATA, QL_SWIR_NM, QL_VNIR_NM
from pipeline.enmap.synth.plan import Plan, Product
from pipeline.enmap.synth.quality_layers import Masks, defect_masks, render_masks
from pipeline.enmap.synth.spectra import spectral_blocks
from pipeline.enmap.synth.writers import RasterSink, layer_file


@dataclass
class WrittenRasters:
    files: dict[str, int]  # basename -> size
    masks: Masks
    stats: list[tuple[float, float] | None]  # per band (mean, std) of reflectance x gain, None = no data
    defective_bands: tuple[int, ...]


class _LayerFiles:
    """Opens the raster layers of a product in its folder and remembers every file written, the ENVI
    headers included, for the metadata's file list."""

    def __init__(self, plan: Plan, p: Product, folder: Path):
        self.plan, self.product, self.folder = plan, p, folder
        self.paths: list[Path] = []

    def open(self, layer: str, count: int, dtype: str, nodata: float | None = None, **kw: Any) -> RasterSink:
        fname, fmt, interleave = layer_file(self.product.name, layer, self.product)
        path = self.folder / fname
        self.paths.append(path)
        if fmt == "ENVI":
            self.paths.append(path.with_suffix(".HDR"))
        return RasterSink(path, fmt, count, dtype, self.plan, self.product, nodata, interleave, **kw)

    def sizes(self) -> dict[str, int]:
        return {path.name: path.stat().st_size for path in self.paths}


class _BandSums:
    """Per-band sums of the footprint's stored values and their squares, as exact integers: the
    statistics are deterministic and no float64 copy of the cube is made."""

    def __init__(self, bands: int):
        self.total = np.zeros(bands, np.int64)
        self.total2 = np.zeros(bands, np.int64)
        self.count = 0

    def add(self, pixels: np.ndarray) -> None:
        """pixels: (n, bands) int16."""
        px = pixels.astype(np.int32)
        self.total += px.sum(axis=0, dtype=np.int64)
        px *= px
        self.total2 += px.sum(axis=0, dtype=np.int64)
        self.count += px.shape[0]

    def stats(self, no_data_bands: tuple[int, ...]) -> list[tuple[float, float] | None]:
        """(mean, std) of reflectance per band; None for a no-data band or an empty footprint."""
        out: list[tuple[float, float] | None] = []
        count = self.count
        for i in range(self.total.size):
            if (i + 1) in no_data_bands or count == 0:
                out.append(None)
                continue
            total, total2 = int(self.total[i]), int(self.total2[i])
            mean = total / count
            var = max(0.0, (total2 - total * total / count) / count)
            out.append((mean * GAIN, math.sqrt(var) * GAIN))
        return out


def write_rasters(plan: Plan, p: Product, folder: Path) -> WrittenRasters:
    masks = render_masks(plan, p)
    layers = _LayerFiles(plan, p, folder)
    stats, quicklooks = _write_spectral_image(layers, plan, p, masks)
    defects = defect_masks(plan, p, masks.footprint)
    _write_pixel_mask(layers, plan, masks.footprint, defects)
    _write_quality_layers(layers, masks)
    for layer in ("QL_SWIR", "QL_VNIR"):
        sink = layers.open(layer, 3, "uint8", descriptions=["red", "green", "blue"])
        sink.write(quicklooks[layer])
        sink.close()
    return WrittenRasters(layers.sizes(), masks, stats, tuple(sorted(defects)))


def _write_spectral_image(
    layers: _LayerFiles, plan: Plan, p: Product, m: Masks
) -> tuple[list[tuple[float, float] | None], dict[str, np.ndarray]]:
    """The spectral image block by block, with the band statistics and the quicklooks taken on the way
    (the whole cube is never in memory): (per-band stats, quicklook layer -> (3, H, W) uint8)."""
    cfg, wl = plan.config, plan.bands.wavelength
    sink = layers.open(
        "SPECTRAL_IMAGE",
        wl.size,
        "int16",
        NODATA,
        descriptions=[f"band {i}" for i in plan.bands.number],
        wavelengths=wl,
        fwhm=plan.bands.fwhm,
    )
    sums = _BandSums(wl.size)
    ql_bands = {
        "QL_VNIR": [int(np.argmin(np.abs(wl - v))) for v in QL_VNIR_NM],
        "QL_SWIR": [int(np.argmin(np.abs(wl - v))) for v in QL_SWIR_NM],
    }
    quicklooks = {k: np.zeros((3, cfg.height, cfg.width), np.uint8) for k in ql_bands}
    for r0, cube in spectral_blocks(plan, p, m):
        sink.write_rows(r0, cube)
        valid = m.footprint[r0 : r0 + cube.shape[0]]
        sums.add(cube[valid])
        for key, idx in ql_bands.items():
            quicklooks[key][:, r0 : r0 + cube.shape[0]] = _quicklook_rows(cube, idx, valid)
    sink.close()
    return sums.stats(plan.no_data_bands), quicklooks


def _quicklook_rows(cube: np.ndarray, bands: list[int], valid: np.ndarray) -> np.ndarray:
    """Reflectance 0..0.5 of three bands stretched to 0..255, 0 outside the footprint: (3, rows, W)."""
    q = np.clip(cube[..., bands].astype(np.float32) * (255.0 / 5000.0), 0, 255)
    q[~valid] = 0
    return np.rint(q).astype(np.uint8).transpose(2, 0, 1)


def _write_pixel_mask(
    layers: _LayerFiles, plan: Plan, footprint: np.ndarray, defects: dict[int, np.ndarray]
) -> None:
    """One band per spectral band, band by band: 255 outside the footprint, 1 defective, 0 otherwise."""
    bands = plan.bands.wavelength.size
    base = np.where(footprint, 0, 255).astype(np.uint8)
    # DEFLATE in GeoTIFF: the real product's PIXELMASK.TIF is ~8x smaller than its uncompressed size
    names = [f"band {i}" for i in plan.bands.number]
    sink = layers.open("QL_PIXELMASK", bands, "uint8", descriptions=names, compress="deflate")
    for band in range(1, bands + 1):
        if band in defects:
            arr = base.copy()
            arr[defects[band]] = 1
            sink.write_band(band, arr)
        else:
            sink.write_band(band, base)
    sink.close()


def _write_quality_layers(layers: _LayerFiles, m: Masks) -> None:
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
        sink = layers.open(layer, 1, "uint8")
        sink.write(arr.astype(np.uint8)[None])
        sink.close()
