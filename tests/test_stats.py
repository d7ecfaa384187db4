"""Per-band moments (pure): exact against Python integer arithmetic, whatever the values."""

from fractions import Fraction

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline.quality import NODATA_VALUE
from pipeline.stats import BandMoments

int16 = st.one_of(st.just(NODATA_VALUE), st.integers(-32767, 32767), st.sampled_from([-32767, 32767, 0]))


@settings(max_examples=200, deadline=None)
@given(
    arrays(np.int16, st.tuples(st.integers(1, 4), st.integers(1, 3), st.just(3), st.just(5)), elements=int16)
)
def test_block_moments_equal_exact_arithmetic(cubes: np.ndarray) -> None:
    moments = BandMoments.of_block(cubes)
    split = BandMoments.of_block(cubes[:1]).merge(BandMoments.of_block(cubes[1:]))
    for band in range(cubes.shape[1]):
        values = [int(v) for v in cubes[:, band].ravel() if v != NODATA_VALUE]
        assert moments.count[band] == len(values)
        if not values:
            assert moments.minimum[band] == np.inf and moments.maximum[band] == -np.inf
            continue
        mean = Fraction(sum(values), len(values))
        m2 = sum((Fraction(v) - mean) ** 2 for v in values)
        assert moments.mean[band] == float(mean)
        assert moments.m2[band] == float(m2)
        assert (moments.minimum[band], moments.maximum[band]) == (min(values), max(values))
        # Merging two parts agrees to rounding.
        assert np.isclose(split.mean[band], float(mean), rtol=1e-12, atol=1e-9)
        assert np.isclose(split.m2[band], float(m2), rtol=1e-9, atol=1e-6)


def test_full_size_patch_sums_do_not_overflow() -> None:
    cube = np.full((1, 2, 128, 128), 32767, np.int16)
    cube[0, 1, ::2] = -32767
    moments = BandMoments.of_block(np.concatenate([cube] * 40))
    assert moments.mean[0] == 32767 and moments.m2[0] == 0
    assert moments.mean[1] == 0 and moments.m2[1] == float(40 * 128 * 128 * 32767**2)
