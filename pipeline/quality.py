"""The per-pixel quality mask: uint16 bit flags built from the QL layers and the spectral nodata.

Bits (SPEC, Names and formats): 1 nodata in a kept band; 2 background outside the footprint (class 3);
4 unclassified (class 0); 8 cloud; 16 cloud shadow; 32 haze; 64 and 128 the cirrus level (0-3);
256 snow; 512 water (class 2); 1024 defective kept band (QL_PIXELMASK 1).

Pure numpy: the stage module reads the layers and hands them here block by block.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

NODATA_VALUE = -32768

NODATA = 1
BACKGROUND = 2
UNCLASSIFIED = 4
CLOUD = 8
CLOUD_SHADOW = 16
HAZE = 32
CIRRUS_SHIFT = 6
CIRRUS_MASK = 64 | 128
SNOW = 256
WATER = 512
DEFECTIVE = 1024

# Flag name -> bits. Every name here may carry a threshold in the manifest's `quality` section.
FLAG_BITS: dict[str, int] = {
    "nodata": NODATA,
    "background": BACKGROUND,
    "unclassified": UNCLASSIFIED,
    "cloud": CLOUD,
    "cloud_shadow": CLOUD_SHADOW,
    "haze": HAZE,
    "cirrus": CIRRUS_MASK,
    "snow": SNOW,
    "water": WATER,
    "defective": DEFECTIVE,
}
FLAG_NAMES = tuple(FLAG_BITS)

# The same table for readers of the outputs: CF `flag_masks`/`flag_meanings` on the Zarr `quality` array
# (the two cirrus bits hold a level, hence `cirrus_level`), and the GeoTIFF `BITS` tag on each mask.
CF_FLAG_MASKS = tuple(FLAG_BITS.values())
CF_FLAG_MEANINGS = " ".join("cirrus_level" if name == "cirrus" else name for name in FLAG_NAMES)
MASK_BITS_TAG = ", ".join(
    f"{1 << CIRRUS_SHIFT}|{2 << CIRRUS_SHIFT} cirrus level"
    if name == "cirrus"
    else f"{bit} {name.replace('_', ' ')}"
    for name, bit in FLAG_BITS.items()
)

CLASS_LAND, CLASS_WATER, CLASS_BACKGROUND, CLASS_NONE = 1, 2, 3, 0
PIXELMASK_DEFECTIVE, PIXELMASK_BACKGROUND = 1, 255


def quality_bits(
    classes: np.ndarray,
    binary_layers: Mapping[str, np.ndarray],
    cirrus: np.ndarray,
    nodata_any: np.ndarray,
    defective_any: np.ndarray,
) -> np.ndarray:
    """Combine one block of layers (all the same 2-D shape) into uint16 flags.

    `binary_layers` holds QL_QUALITY_CLOUD, _CLOUDSHADOW, _HAZE, _SNOW (0/1; any non-zero counts).
    `nodata_any`: the spectral image is -32768 in at least one kept band.
    `defective_any`: QL_PIXELMASK says 1 in at least one kept band.
    """
    bits = np.zeros(classes.shape, dtype=np.uint16)
    bits[nodata_any] |= NODATA
    bits[classes == CLASS_BACKGROUND] |= BACKGROUND
    bits[classes == CLASS_NONE] |= UNCLASSIFIED
    bits[classes == CLASS_WATER] |= WATER
    for name, bit in (
        ("QL_QUALITY_CLOUD", CLOUD),
        ("QL_QUALITY_CLOUDSHADOW", CLOUD_SHADOW),
        ("QL_QUALITY_HAZE", HAZE),
        ("QL_QUALITY_SNOW", SNOW),
    ):
        bits[binary_layers[name] != 0] |= bit
    level = np.clip(cirrus, 0, 3).astype(np.uint16)
    bits |= level << CIRRUS_SHIFT
    bits[defective_any] |= DEFECTIVE
    return bits


def flag_present(bits: np.ndarray, flag: str, cirrus_min_level: int = 1) -> np.ndarray:
    """Boolean array: pixels where `flag` is set (cirrus: level at or above `cirrus_min_level`)."""
    if flag == "cirrus":
        return ((bits & CIRRUS_MASK) >> CIRRUS_SHIFT) >= cirrus_min_level
    return (bits & FLAG_BITS[flag]) != 0


def flag_counts(bits: np.ndarray, cirrus_min_level: int = 1) -> dict[str, int]:
    """Pixel count per flag in a block."""
    return {flag: int(np.count_nonzero(flag_present(bits, flag, cirrus_min_level))) for flag in FLAG_NAMES}
