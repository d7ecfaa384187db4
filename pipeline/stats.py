"""Per-band normalisation statistics of the stored reflectance, in one streaming pass.

Each shard's patches give exact per-band moments (count, mean, sum of squared deviations M2, min,
max) over valid pixels (not -32768), computed in float64 with two passes over the block; moments are
merged with Chan et al.'s pairwise update, which stays accurate where a running sum of squares
would cancel. Values are in the stored int16 units (reflectance x 10000), like the SpectralEarth
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
        values = cube.reshape(cube.shape[0], -1).astype(np.float64)
        valid = cube.reshape(cube.shape[0], -1) != NODATA_VALUE
        count = valid.sum(axis=1).astype(np.int64)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(count > 0, np.where(valid, values, 0.0).sum(axis=1) / np.maximum(count, 1), 0.0)
        m2 = np.where(valid, (values - mean[:, None]) ** 2, 0.0).sum(axis=1)
        minimum = np.where(valid, values, np.inf).min(axis=1)
        maximum = np.where(valid, values, -np.inf).max(axis=1)
        return cls(count, mean, m2, minimum, maximum)

    @classmethod
    def of_block(cls, cubes: np.ndarray) -> BandMoments:
        """Moments of (n, B, y, x) patches, merged patch by patch (memory: one patch in float64)."""
        total = cls.empty(cubes.shape[1])
        for cube in cubes:
            total = total.merge(cls.of_patch(cube))
        return total

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
