"""The real QL_QUALITY_CLASSES sample, read through the same path the pipeline uses."""

from pathlib import Path

import numpy as np
import rasterio

from tests.conftest import REAL_SCENE


def test_real_quality_classes_counts_and_grid(samples: Path) -> None:
    path = samples / f"{REAL_SCENE}-QL_QUALITY_CLASSES.TIF"
    with rasterio.open(path) as src:
        assert (src.count, src.width, src.height, src.dtypes[0]) == (1, 1128, 1212, "uint8")
        assert src.crs.to_epsg() == 32632
        assert (src.transform.c, src.transform.f) == (628785.0, 5294265.0)
        assert (src.transform.a, src.transform.e) == (30.0, -30.0)
        # Pixel corners on 15 m + k x 30 m: the lattice the global grid relies on.
        assert src.transform.c % 30 == 15 and src.transform.f % 30 == 15
        classes = src.read(1)
    values, counts = np.unique(classes, return_counts=True)
    assert dict(zip(values.tolist(), counts.tolist(), strict=True)) == {
        0: 77832,
        1: 862743,
        2: 16750,
        3: 409811,
    }
