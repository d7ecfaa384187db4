"""Quality layers: where clouds, shadows, haze, cirrus, snow, water and defects are, and their shares."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.enmap.synth.config import GRID_OFFSET, NOISE_TABLE_ROWS, PIXEL
from pipeline.enmap.synth.fields import hash_u64, seeded_rng
from pipeline.enmap.synth.plan import Plan, Product


@dataclass
class Masks:
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


def render_masks(plan: Plan, p: Product) -> Masks:
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
    h = hash_u64(iy[:, None], ix[None, :], dt.id, plan.config.seed)
    noise_index = (h % np.uint64(NOISE_TABLE_ROWS)).astype(np.int32)
    return Masks(
        fp, water, cloud, shadow, haze, cirrus, snow, uncl, brightness, ab, vigour, bright, noise_index
    )


def defect_masks(plan: Plan, p: Product, fp: np.ndarray) -> dict[int, np.ndarray]:
    """1-based band -> bool mask of defective pixels (a few pixels and an along-track detector line)."""
    cfg = plan.config
    rng = seeded_rng("defects", cfg.seed, p.datatake.id, p.tile)
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


def _percent(x: float) -> int:
    return int(math.floor(100.0 * x + 0.5))


def quality_percent(fr: dict[str, float]) -> dict[str, int]:
    return {
        "cloudCover": _percent(fr["cloud"]),
        "cloudShadow": _percent(fr["cloud_shadow"]),
        "hazeCover": _percent(fr["haze"]),
        "snowCover": _percent(fr["snow"]),
        "cirrusCover": _percent(fr["cirrus"]),
        "waterCover": _percent(fr["water"]),
    }
