"""The pure core of labelling: sample points per pixel, remap codes, take the mode, summarise."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.labels.spec import MAX_CODE, LabelSourceError

_MODE_MIN, _MODE_MAX = 3, 15
VECTOR_MODE_FACTOR = 5  # polygons have no resolution: 5 x 5 points per pixel (6 m apart)

# Pure core ----------------------------------------------------------------------------------------


def mode_factor(source_resolution: float, pixel_size: float) -> int:
    """Sample points per pixel side for `mode`: about two per source pixel, within [3, 15]."""
    if not source_resolution > 0:
        return VECTOR_MODE_FACTOR
    return int(min(_MODE_MAX, max(_MODE_MIN, math.ceil(2 * pixel_size / source_resolution))))


def sample_points(
    x_ul: float, y_ul: float, pixel_size: float, size: int, factor: int
) -> tuple[np.ndarray, np.ndarray]:
    """Projected coordinates of the sample points of one patch: (size x factor)^2 points, row-major,
    the centres of a factor x factor subdivision of every pixel (factor 1: the pixel centres)."""
    step = pixel_size / factor
    offsets = (np.arange(size * factor, dtype=np.float64) + 0.5) * step
    xs = np.broadcast_to(x_ul + offsets[None, :], (size * factor, size * factor))
    ys = np.broadcast_to(y_ul - offsets[:, None], (size * factor, size * factor))
    return np.ascontiguousarray(xs), np.ascontiguousarray(ys)


def remap_codes(values: np.ndarray, classes: Sequence[tuple[int, int]]) -> np.ndarray:
    """Source codes to classes (int64): through the remap when given (unlisted codes become 0), else
    unchanged; codes outside 0..65535 or not integers are an error that names the remedy."""
    values = np.asarray(values)
    if values.dtype.kind == "f":
        finite = values[np.isfinite(values)]
        if finite.size and not np.array_equal(finite, np.round(finite)):
            raise LabelSourceError("the source holds non-integer values: class codes must be integers")
        values = np.where(np.isfinite(values), values, 0)
    codes = values.astype(np.int64)
    if classes:
        keys = np.array([k for k, _ in classes], dtype=np.int64)
        targets = np.array([v for _, v in classes], dtype=np.int64)
        position = np.clip(np.searchsorted(keys, codes), 0, len(keys) - 1)
        return np.where(keys[position] == codes, targets[position], 0)
    if codes.size and (codes.min() < 0 or codes.max() > MAX_CODE):
        bad = int(codes.min() if codes.min() < 0 else codes.max())
        raise LabelSourceError(
            f"the source holds class code {bad}, outside 0..{MAX_CODE}: give a 'classes' remap"
        )
    return codes


def mode_reduce(samples: np.ndarray, factor: int) -> np.ndarray:
    """(H*f, W*f) sample classes -> (H, W) majority class per f x f block; ties to the smallest code."""
    if factor == 1:
        return samples
    height, width = samples.shape[0] // factor, samples.shape[1] // factor
    blocks = samples.reshape(height, factor, width, factor).transpose(0, 2, 1, 3).reshape(height, width, -1)
    present = np.unique(blocks)  # ascending: argmax takes the first, that is the smallest, on ties
    counts = np.stack([(blocks == code).sum(axis=2) for code in present])
    return present[np.argmax(counts, axis=0)]


@dataclass(frozen=True, slots=True)
class PatchLabels:
    """What one patch's labels say, for the table."""

    row: int
    patch_id: str
    labelled_fraction: float
    class_codes: tuple[int, ...]
    class_pixels: tuple[int, ...]
    present_classes: tuple[int, ...]
    outside: bool  # the source has nothing under this patch (never read)


def summarise(
    row: int, patch_id: str, labels: np.ndarray | None, multilabel_min_fraction: float | None
) -> PatchLabels:
    """Histogram, labelled fraction and (multi-label) present classes of one patch's labels."""
    if labels is None:
        return PatchLabels(row, patch_id, 0.0, (), (), (), True)
    codes, pixels = np.unique(labels[labels != 0], return_counts=True)
    labelled = int(pixels.sum())
    present: tuple[int, ...] = ()
    if multilabel_min_fraction is not None and labelled:
        present = tuple(
            int(c) for c, n in zip(codes, pixels, strict=True) if n / labelled >= multilabel_min_fraction
        )
    return PatchLabels(
        row,
        patch_id,
        labelled / labels.size,
        tuple(int(c) for c in codes),
        tuple(int(n) for n in pixels),
        present,
        False,
    )


def exclusion_reason(result: PatchLabels, min_labelled_fraction: float) -> str | None:
    if result.outside:
        return "outside the label source"
    if result.labelled_fraction < min_labelled_fraction or result.labelled_fraction == 0:
        return (
            f"labelled fraction {result.labelled_fraction:.3f} "
            f"below min_labelled_fraction {min_labelled_fraction:g}"
        )
    return None
