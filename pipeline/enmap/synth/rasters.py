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


def write_rasters(plan: Plan, p: Product, folder: Path) -> WrittenRasters:
    name = p.name
    cfg = plan.config
    m = render_masks(plan, p)
    files: dict[str, int] = {}
    paths: list[Path] = []
    wl, fwhm = plan.bands.wavelength, plan.bands.fwhm
    b = wl.size

    def sink(layer: str, count: int, dtype: str, nodata: float | None = None, **kw: Any) -> RasterSink:
        fname, fmt, inter = layer_file(name, layer, p)
        path = folder / fname
        paths.append(path)
        if fmt == "ENVI":
            paths.append(path.with_suffix(".HDR"))
        return RasterSink(path, fmt, count, dtype, plan, p, nodata, inter, **kw)

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
    for r0, cube in spectral_blocks(plan, p, m):
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
    defects = defect_masks(plan, p, m.footprint)
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
    return WrittenRasters(files, m, stats, tuple(sorted(defects)))
