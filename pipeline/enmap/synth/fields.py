"""Seeded randomness: smooth random fields over world coordinates, pixel hashes, seeded generators."""

from __future__ import annotations

import hashlib
import math

import numpy as np


class RandomField:
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


def hash_u64(*arrays: np.ndarray | int) -> np.ndarray:
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


def seeded_rng(*keys: int | str) -> np.random.Generator:
    digest = hashlib.sha256("/".join(str(k) for k in keys).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def upper_quantile(values: np.ndarray, share: float) -> float:
    """Threshold t with `share` of `values` above it (inf for share 0)."""
    if share <= 0 or values.size == 0:
        return math.inf
    return float(np.quantile(values, 1.0 - share))
