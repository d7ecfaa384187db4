"""Per-band normalisation statistics of the stored reflectance, in one streaming pass.

Each shard's patches give exact per-band moments (count, mean, sum of squared deviations M2, min,
max) over valid pixels (not -32768), from integer sums: `write` gets them without decoding a patch,
from the per-cell integer sums the reading pass recorded (`pipeline.cell_moments.CellSums`, which
converts with the arithmetic of `BandMoments.of_block`, bit for bit); shards' moments are merged with
Chan et al.'s pairwise update, which stays accurate where a running sum of squares would cancel.
Values are in the stored int16 units (reflectance x 10000), like the SpectralEarth
training statistics.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.quality import NODATA_VALUE


@dataclass(frozen=True)
class BandMoments:
    count: np.ndarray  # (B,) int64 valid pixels
    mean: np.ndarray  # (B,) float64
    m2: np.ndarray  # (B,) float64, sum of squared deviations from the mean
    minimum: np.ndarray  # (B,) float64 (+inf where count == 0)
    maximum: np.ndarray  # (B,) float64 (-inf where count == 0)

    @classmethod
    def empty(cls, bands: int) -> BandMoments:
        return cls(
            np.zeros(bands, np.int64),
            np.zeros(bands),
            np.zeros(bands),
            np.full(bands, np.inf),
            np.full(bands, -np.inf),
        )

    @classmethod
    def of_patch(cls, cube: np.ndarray) -> BandMoments:
        """Moments of one (B, y, x) int16 patch."""
        return cls.of_block(cube[None])

    @classmethod
    def of_block(cls, cubes: np.ndarray) -> BandMoments:
        """Moments of (n, B, y, x) int16 patches, exact: integer count, sum and sum of squares per band
        (one patch at a time, in int64: a patch's sum of squares stays below 2**44), then
        M2 = (n*SS - S^2) / n in Python integers, which neither overflow nor cancel."""
        bands = cubes.shape[1]
        count = np.zeros(bands, np.int64)
        total = np.zeros(bands, np.int64)
        squares = np.zeros(bands, np.int64)
        minimum = np.full(bands, np.iinfo(np.int16).max, np.int64)
        maximum = np.full(bands, np.iinfo(np.int16).min, np.int64)
        for cube in cubes:
            values = cube.reshape(bands, -1)
            invalid = values == NODATA_VALUE
            if invalid.any():
                valid = ~invalid
                count += np.count_nonzero(valid, axis=1)
                clean = np.where(valid, values, np.int16(0))
                lowest = np.where(valid, values, np.int16(np.iinfo(np.int16).max)).min(axis=1)
            else:  # the usual case: a kept patch holds no nodata in a kept band
                count += values.shape[1]
                clean = values
                lowest = values.min(axis=1)
            total += clean.sum(axis=1, dtype=np.int64)
            squares += np.einsum("bp,bp->b", clean, clean, dtype=np.int64, casting="unsafe")
            minimum = np.minimum(minimum, lowest)
            # Nodata is the smallest int16, so it never wins a max over a band with a valid pixel.
            maximum = np.maximum(maximum, values.max(axis=1))
        n = [int(c) for c in count]
        s = [int(v) for v in total]
        m2 = [(c * int(q) - v * v) / c if c else 0.0 for c, v, q in zip(n, s, squares, strict=True)]
        mean = [v / c if c else 0.0 for c, v in zip(n, s, strict=True)]
        empty = count == 0
        return cls(
            count,
            np.asarray(mean, np.float64),
            np.asarray(m2, np.float64),
            np.where(empty, np.inf, minimum.astype(np.float64)),
            np.where(empty, -np.inf, maximum.astype(np.float64)),
        )

    def merge(self, other: BandMoments) -> BandMoments:
        count = self.count + other.count
        safe = np.maximum(count, 1)
        delta = other.mean - self.mean
        mean = np.where(count > 0, self.mean + delta * (other.count / safe), 0.0)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / safe)
        return BandMoments(
            count, mean, m2, np.minimum(self.minimum, other.minimum), np.maximum(self.maximum, other.maximum)
        )

    @property
    def valid_mean(self) -> np.ndarray:
        """The mean, NaN for a band with no valid pixel (`mean` holds 0.0 there, which merges cleanly
        but is not a statistic of anything: an empty build's bands have no mean)."""
        return np.where(self.count > 0, self.mean, np.nan)

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation (ddof = 0); NaN for a band with no valid pixel."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, np.sqrt(self.m2 / self.count), np.nan)

    def to_json(self) -> dict[str, list[float]]:
        return {
            "count": self.count.tolist(),
            "mean": self.mean.tolist(),
            "m2": self.m2.tolist(),
            "min": self.minimum.tolist(),
            "max": self.maximum.tolist(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BandMoments:
        return cls(
            np.asarray(data["count"], np.int64),
            np.asarray(data["mean"], np.float64),
            np.asarray(data["m2"], np.float64),
            np.asarray(data["min"], np.float64),
            np.asarray(data["max"], np.float64),
        )


def npy_bytes(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, values)
    return buffer.getvalue()
