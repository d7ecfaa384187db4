"""Spectra: endmember reflectances, residual water vapour, per-pixel noise and the spectral image."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from pipeline.enmap.synth.config import NODATA, NOISE_TABLE_ROWS
from pipeline.enmap.synth.fields import seeded_rng
from pipeline.enmap.synth.plan import Plan, Product
from pipeline.enmap.synth.quality_layers import Masks

SHADOW_FACTOR = 0.3


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


def noise_table(plan: Plan, p: Product) -> np.ndarray:
    wl = plan.bands.wavelength
    sigma = 0.0018 + 0.0012 * (wl > 1000) + 0.006 * (1 - water_vapour_transmittance(wl))
    table = (
        seeded_rng("noise", plan.config.seed, p.datatake.id).normal(0, 1, (NOISE_TABLE_ROWS, wl.size)) * sigma
    )
    if p.reprocessed:  # a newer processor version: slightly different values
        table += seeded_rng("noise-reprocessed", plan.config.seed, p.datatake.id, p.version).normal(
            0, 0.0008, table.shape
        )
    return table.astype(np.float32)


def spectral_blocks(plan: Plan, p: Product, m: Masks) -> Iterator[tuple[int, np.ndarray]]:
    """(row0, int16 cube (rows, W, B)) blocks of the spectral image, pixel-major."""
    wl = plan.bands.wavelength
    em = {k: v.astype(np.float32) for k, v in endmembers(wl).items()}
    trans = water_vapour_transmittance(wl).astype(np.float32)
    noise = noise_table(plan, p)
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
            cube[shadow] *= np.float32(SHADOW_FACTOR)
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
