"""Exact per-band sums of one cell's patch, recorded when the cube is read and merged later.

The reading pass records a `CellSums` per encoded candidate, so `write` gets band statistics without
decoding a patch. The sums are Python integers (count, sum, sum of squares, min, max over the pixels
that are not -32768), so merging them is exact in any order and never overflows. `to_band_moments`
turns merged sums into `pipeline.stats.BandMoments` with the very arithmetic of
`BandMoments.of_block`, so the cells of a shard, summed and converted, give bit for bit the moments
that `write` computes today from the shard's decoded patches, and merging shards in shard order gives
the same statistics.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.quality import NODATA_VALUE
from pipeline.stats import BandMoments

INT16_MIN, INT16_MAX = int(np.iinfo(np.int16).min), int(np.iinfo(np.int16).max)


@dataclass(frozen=True, slots=True)
class CellSums:
    """Per band: valid pixels, their sum and sum of squares, smallest and largest value (int16
    max and min where a band has no valid pixel, as in `BandMoments.of_block`)."""

    count: tuple[int, ...]
    total: tuple[int, ...]
    squares: tuple[int, ...]
    minimum: tuple[int, ...]
    maximum: tuple[int, ...]

    @classmethod
    def empty(cls, bands: int) -> CellSums:
        zeros = (0,) * bands
        return cls(zeros, zeros, zeros, (INT16_MAX,) * bands, (INT16_MIN,) * bands)

    @classmethod
    def of_patch(cls, patch: np.ndarray) -> CellSums:
        """Sums of one (B, y, x) int16 patch (a leading length-1 axis is accepted), ignoring -32768.
        In int64: a band's sum of squares is below 2**30 per pixel, so exact up to 2**33 pixels."""
        values = np.asarray(patch)
        if values.ndim == 4 and values.shape[0] == 1:
            values = values[0]
        if values.ndim != 3 or values.dtype.kind != "i" or values.dtype.itemsize != 2:
            raise ValueError(f"a patch is (bands, y, x) int16, got {values.shape} {values.dtype}")
        flat = values.reshape(values.shape[0], -1).astype(np.int64)
        valid = flat != NODATA_VALUE
        clean = np.where(valid, flat, 0)
        return cls(
            tuple(np.count_nonzero(valid, axis=1).tolist()),
            tuple(clean.sum(axis=1).tolist()),
            tuple(np.einsum("bp,bp->b", clean, clean).tolist()),
            tuple(np.where(valid, flat, INT16_MAX).min(axis=1, initial=INT16_MAX).tolist()),
            # Nodata is the smallest int16, so it never wins a max over a band with a valid pixel.
            tuple(flat.max(axis=1, initial=INT16_MIN).tolist()),
        )

    def merge(self, other: CellSums) -> CellSums:
        if len(self.count) != len(other.count):
            raise ValueError(f"cannot merge sums of {len(self.count)} and {len(other.count)} bands")
        return CellSums(
            tuple(a + b for a, b in zip(self.count, other.count, strict=True)),
            tuple(a + b for a, b in zip(self.total, other.total, strict=True)),
            tuple(a + b for a, b in zip(self.squares, other.squares, strict=True)),
            tuple(min(a, b) for a, b in zip(self.minimum, other.minimum, strict=True)),
            tuple(max(a, b) for a, b in zip(self.maximum, other.maximum, strict=True)),
        )

    def to_band_moments(self) -> BandMoments:
        """The moments of the merged pixels, computed as `BandMoments.of_block` does (Python integers,
        one division each), hence equal to it bit for bit."""
        m2 = [(c * q - s * s) / c if c else 0.0 for c, s, q in zip(self.count, self.total, self.squares)]
        mean = [s / c if c else 0.0 for c, s in zip(self.count, self.total)]
        empty = np.asarray(self.count, np.int64) == 0
        return BandMoments(
            np.asarray(self.count, np.int64),
            np.asarray(mean, np.float64),
            np.asarray(m2, np.float64),
            np.where(empty, np.inf, np.asarray(self.minimum, np.float64)),
            np.where(empty, -np.inf, np.asarray(self.maximum, np.float64)),
        )

    def to_json(self) -> dict[str, list[int]]:
        return {
            "count": list(self.count),
            "total": list(self.total),
            "squares": list(self.squares),
            "min": list(self.minimum),
            "max": list(self.maximum),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CellSums:
        fields = [tuple(int(v) for v in data[k]) for k in ("count", "total", "squares", "min", "max")]
        if len({len(f) for f in fields}) != 1:
            raise ValueError("cell sums fields differ in length")
        return cls(*fields)


def shard_moments(cells: Iterable[CellSums], bands: int) -> BandMoments:
    """A shard's moments from its kept cells' sums: what `write` records for the shard today
    (`BandMoments.of_block` over its active rows), without the pixels."""
    total = CellSums.empty(bands)
    for cell in cells:
        total = total.merge(cell)
    return total.to_band_moments()
