"""The global patch grid, checked against brute-force oracles that share no arithmetic with pipeline.grid.

The oracles work in integer metres (every lattice used here has integer pixel size and offset), list a
cell's pixel corners one by one and compare them with the raster's extent, so a rounding or off-by-one
error in the grid's closed-form arithmetic cannot be repeated by the oracle. Property tests use small
patches so brute force stays cheap; a few examples run at SpectralEarth's 128 px.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import rasterio.windows
from affine import Affine
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pipeline.grid import (
    Cell,
    GridSpec,
    OffLatticeError,
    PixelWindow,
    cell_bounds,
    cell_of_point,
    cell_transform,
    cells_for_bounds,
    cells_in_raster,
    check_lattice,
    window_of,
)
from tests.conftest import REAL_SCENE

SPEC = GridSpec()
EPSG = 32632
SAMPLE_TRANSFORM = (30.0, 0.0, 628785.0, 0.0, -30.0, 5294265.0)
SAMPLE_SHAPE = (1128, 1212)  # width, height
STAC_GRID_CODE = re.compile(r"^[A-Z0-9]+-[-_.A-Za-z0-9]+$")
UTM_EPSG = st.one_of(st.integers(32601, 32660), st.integers(32701, 32760))


@st.composite
def small_specs(draw: st.DrawFn) -> GridSpec:
    """Mostly the EnMAP lattice with small patches, sometimes another integer lattice and offset."""
    patch = draw(st.integers(4, 16))
    if draw(st.booleans()):
        return GridSpec(patch_size=patch, pixel_size=30.0, offset=15.0)
    pixel = draw(st.sampled_from([10, 20, 30, 60]))
    offset = draw(st.integers(0, patch * pixel - 1))
    return GridSpec(patch_size=patch, pixel_size=float(pixel), offset=float(offset))


@st.composite
def rasters(draw: st.DrawFn, spec: GridSpec, max_side: int = 80) -> tuple[tuple[float, ...], int, int]:
    """(transform, width, height) of a north-up raster on the spec's lattice, anywhere in a UTM zone."""
    px, off = int(spec.pixel_size), int(spec.offset)
    # Lattice counts reach ~10,000 km north (southern-zone northings) and slightly negative eastings.
    column = draw(st.integers(-2_000, 1_000_000 // px))
    row_line = draw(st.integers(-2_000, 10_000_000 // px))
    width, height = draw(st.integers(0, max_side)), draw(st.integers(0, max_side))
    return (
        (float(px), 0.0, float(off + column * px), 0.0, -float(px), float(off + row_line * px)),
        width,
        height,
    )


def _ints(spec: GridSpec) -> tuple[int, int, int]:
    return spec.patch_size, int(spec.pixel_size), int(spec.offset)


def oracle_cells_inside(
    transform: tuple[float, ...], width: int, height: int, spec: GridSpec
) -> dict[tuple[int, int], tuple[int, int]]:
    """{(i, j): (col, row)} for every cell whose pixel corners all fall inside the raster's extent."""
    p, px, off = _ints(spec)
    left, top = int(transform[2]), int(transform[5])
    right, bottom = left + width * px, top - height * px
    size = p * px
    steps = np.arange(p + 1, dtype=np.int64) * px
    found = {}
    for i in range((left - off) // size - 2, (right - off) // size + 3):
        for j in range((bottom - off) // size - 2, (top - off) // size + 3):
            xs, ys = np.meshgrid(off + i * size + steps, off + j * size + steps)
            if not ((xs >= left) & (xs <= right) & (ys >= bottom) & (ys <= top)).all():
                continue
            # The raster pixel whose upper-left corner is the cell's upper-left corner, found by search.
            col = next(c for c in range(width) if left + c * px == off + i * size)
            row = next(r for r in range(height) if top - r * px == off + (j + 1) * size)
            found[(i, j)] = (col, row)
    return found


def oracle_cell_extent(i: int, j: int, spec: GridSpec) -> tuple[int, int, int, int]:
    p, px, off = _ints(spec)
    return off + i * p * px, off + j * p * px, off + (i + 1) * p * px, off + (j + 1) * p * px


def ground_raster(transform: tuple[float, ...], width: int, height: int, spec: GridSpec) -> np.ndarray:
    """A raster whose every pixel stores the ground position (lattice column, lattice row) it images."""
    px, off = spec.pixel_size, spec.offset
    column0, top_line = round((transform[2] - off) / px), round((transform[5] - off) / px)
    cols = column0 + np.arange(width, dtype=np.int64)
    rows = top_line - 1 - np.arange(height, dtype=np.int64)
    return cols[None, :] * 100_000_000 + rows[:, None]


# --- The SPEC's worked example -----------------------------------------------------------------------


def test_worked_example_of_the_spec() -> None:
    found = cells_in_raster(EPSG, SAMPLE_TRANSFORM, *SAMPLE_SHAPE, SPEC)
    assert len(found) == 64
    assert {(c.i, c.j) for c, _ in found} == {(i, j) for i in range(164, 172) for j in range(1370, 1378)}
    assert found[0] == (Cell(EPSG, 164, 1377), PixelWindow(33, 91, 128, 128))
    assert window_of(Cell(EPSG, 164, 1377), SAMPLE_TRANSFORM, SPEC) == PixelWindow(33, 91, 128, 128)
    assert Cell(EPSG, 164, 1377).location_id == "EPSG32632-0164-1377"
    assert cell_bounds(Cell(EPSG, 164, 1377), SPEC) == (629775.0, 5287695.0, 633615.0, 5291535.0)


def test_worked_example_matches_the_brute_force_oracle_at_128_px() -> None:
    found = cells_in_raster(EPSG, SAMPLE_TRANSFORM, *SAMPLE_SHAPE, SPEC)
    oracle = oracle_cells_inside(SAMPLE_TRANSFORM, *SAMPLE_SHAPE, SPEC)
    assert {(c.i, c.j): (w.col_off, w.row_off) for c, w in found} == oracle


def test_real_sample_raster(samples: Path) -> None:
    path = samples / f"{REAL_SCENE}-QL_QUALITY_CLASSES.TIF"
    with rasterio.open(path) as src:
        found = cells_in_raster(src.crs.to_epsg(), src.transform, src.width, src.height, SPEC)
        assert {(c.i, c.j) for c, _ in found} == {(i, j) for i in range(164, 172) for j in range(1370, 1378)}
        cell, window = found[0]
        assert cell == Cell(32632, 164, 1377) and window == PixelWindow(33, 91, 128, 128)
        assert window_of(cell, src.transform, SPEC) == window
        whole = src.read(1)
        for cell, window in found:
            rio_window = rasterio.windows.Window(window.col_off, window.row_off, window.width, window.height)
            block = src.read(1, window=rio_window)
            assert block.shape == (128, 128)
            np.testing.assert_array_equal(block, whole[window.slices()])
            # rasterio's own georeferencing of the window's corner is the cell's, to the bit.
            assert src.transform @ (window.col_off, window.row_off) == cell_bounds(cell, SPEC)[::3]


# --- Cells inside a raster and their windows ---------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_cells_in_raster_equal_the_oracle(data: st.DataObject) -> None:
    spec = data.draw(small_specs())
    transform, width, height = data.draw(rasters(spec))
    found = cells_in_raster(EPSG, transform, width, height, spec)
    assert {(c.i, c.j): (w.col_off, w.row_off) for c, w in found} == oracle_cells_inside(
        transform, width, height, spec
    )
    assert all(w.width == w.height == spec.patch_size for _, w in found)
    # Top row first, west to east within a row.
    assert [(c.i, c.j) for c, _ in found] == sorted(
        ((c.i, c.j) for c, _ in found), key=lambda ij: (-ij[1], ij[0])
    )
    assert all(window_of(c, transform, spec) == w for c, w in found)


@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_cells_in_raster_equal_the_oracle_at_128_px(data: st.DataObject) -> None:
    transform, width, height = data.draw(rasters(SPEC, max_side=1300))
    found = cells_in_raster(EPSG, transform, width, height, SPEC)
    assert {(c.i, c.j): (w.col_off, w.row_off) for c, w in found} == oracle_cells_inside(
        transform, width, height, SPEC
    )


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_window_pixel_zero_is_the_cell_corner_exactly(data: st.DataObject) -> None:
    spec = data.draw(small_specs())
    transform, _, _ = data.draw(rasters(spec))
    cell = Cell(EPSG, data.draw(st.integers(0, 3000)), data.draw(st.integers(0, 3000)))
    window = window_of(cell, transform, spec)  # usually far outside this raster: still exact
    a, _, c, _, e, f = transform
    xmin, ymin, xmax, ymax = cell_bounds(cell, spec)
    assert (c + window.col_off * a, f + window.row_off * e) == (xmin, ymax)
    assert (xmin, ymin, xmax, ymax) == tuple(float(v) for v in oracle_cell_extent(cell.i, cell.j, spec))
    # rasterio's float inverse geotransform agrees, up to its rounding (the reason grid.py uses integers).
    rio = rasterio.windows.from_bounds(xmin, ymin, xmax, ymax, transform=Affine(*transform))
    expected = (window.col_off, window.row_off, spec.patch_size, spec.patch_size)
    assert (rio.col_off, rio.row_off, rio.width, rio.height) == pytest.approx(expected, abs=1e-6)


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_a_raster_on_a_cell_holds_exactly_that_cell(data: st.DataObject) -> None:
    spec = data.draw(small_specs())
    cell = Cell(EPSG, data.draw(st.integers(0, 9999)), data.draw(st.integers(0, 9999)))
    p = spec.patch_size
    assert cells_in_raster(EPSG, cell_transform(cell, spec), p, p, spec) == [(cell, PixelWindow(0, 0, p, p))]
    assert cells_in_raster(EPSG, cell_transform(cell, spec), p - 1, p, spec) == []
    assert cells_in_raster(EPSG, cell_transform(cell, spec), p, p - 1, spec) == []


def test_rasterio_affine_and_numpy_integers_are_accepted() -> None:
    # Parquet rows hand out numpy integers; they are integers, so the signatures' int is a white lie.
    epsg, width, height = np.int64(EPSG), np.int64(1128), np.int32(1212)
    found = cells_in_raster(epsg, Affine(*SAMPLE_TRANSFORM), width, height, SPEC)  # type: ignore[arg-type]
    assert found == cells_in_raster(EPSG, SAMPLE_TRANSFORM, 1128, 1212, SPEC)
    assert type(found[0][0].epsg) is int
    assert Cell(np.int64(EPSG), np.int64(3), np.int16(4)) == Cell(EPSG, 3, 4)  # type: ignore[arg-type]


def test_empty_and_negative_raster_sizes() -> None:
    assert cells_in_raster(EPSG, SAMPLE_TRANSFORM, 0, 1212, SPEC) == []
    with pytest.raises(ValueError, match="non-negative"):
        cells_in_raster(EPSG, SAMPLE_TRANSFORM, -1, 1212, SPEC)
    with pytest.raises(TypeError):
        cells_in_raster(EPSG, SAMPLE_TRANSFORM, 1128.0, 1212, SPEC)  # type: ignore[arg-type]


# --- Same cell, same pixels in every scene of a zone -------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_cells_are_identical_across_scenes_of_a_zone(data: st.DataObject) -> None:
    spec = data.draw(small_specs())
    px = spec.pixel_size
    transform_a, width_a, height_a = data.draw(rasters(spec, max_side=60))
    # A second scene of the zone, shifted by whole pixels so the two overlap (or touch, or just miss).
    dx, dy = data.draw(st.integers(-width_a, width_a)), data.draw(st.integers(-height_a, height_a))
    transform_b = (px, 0.0, transform_a[2] + dx * px, 0.0, -px, transform_a[5] - dy * px)
    width_b, height_b = data.draw(st.integers(0, 60)), data.draw(st.integers(0, 60))

    found_a = dict(cells_in_raster(EPSG, transform_a, width_a, height_a, spec))
    found_b = dict(cells_in_raster(EPSG, transform_b, width_b, height_b, spec))
    # The overlap is itself a raster on the lattice: the shared cells are exactly its cells.
    left, right = max(0, dx), min(width_a, dx + width_b)
    top, bottom = max(0, dy), min(height_a, dy + height_b)
    expected: set[Cell] = set()
    if left < right and top < bottom:
        overlap = (px, 0.0, transform_a[2] + left * px, 0.0, -px, transform_a[5] - top * px)
        expected = {c for c, _ in cells_in_raster(EPSG, overlap, right - left, bottom - top, spec)}
    assert found_a.keys() & found_b.keys() == expected

    ground_a = ground_raster(transform_a, width_a, height_a, spec)
    ground_b = ground_raster(transform_b, width_b, height_b, spec)
    for cell in expected:
        wa, wb = found_a[cell], found_b[cell]
        corner_a = (transform_a[2] + wa.col_off * px, transform_a[5] - wa.row_off * px)
        corner_b = (transform_b[2] + wb.col_off * px, transform_b[5] - wb.row_off * px)
        xmin, _, _, ymax = cell_bounds(cell, spec)
        assert corner_a == corner_b == (xmin, ymax)
        np.testing.assert_array_equal(ground_a[wa.slices()], ground_b[wb.slices()])


# --- The cells tile the plane ------------------------------------------------------------------------


@st.composite
def points(draw: st.DrawFn, spec: GridSpec) -> float:
    """A coordinate: anywhere, exactly on a cell edge, or one float step either side of an edge."""
    kind = draw(st.sampled_from(["any", "edge", "below", "above"]))
    if kind == "any":
        return draw(st.floats(-1e5, 1e7, allow_nan=False))
    edge = float(spec.offset + draw(st.integers(-30, 3000)) * spec.patch_size * spec.pixel_size)
    return {"edge": edge, "below": math.nextafter(edge, -math.inf), "above": math.nextafter(edge, math.inf)}[
        kind
    ]


def _holds(bounds: tuple[float, float, float, float], x: float, y: float) -> bool:
    xmin, ymin, xmax, ymax = bounds
    return xmin <= x < xmax and ymin <= y < ymax


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_every_point_is_in_exactly_one_cell(data: st.DataObject) -> None:
    spec = data.draw(st.one_of(small_specs(), st.just(SPEC)))
    x, y = data.draw(points(spec)), data.draw(points(spec))
    cell = cell_of_point(EPSG, x, y, spec)
    assert _holds(cell_bounds(cell, spec), x, y)
    neighbours = [Cell(EPSG, cell.i + di, cell.j + dj) for di in (-1, 0, 1) for dj in (-1, 0, 1)]
    assert [n for n in neighbours if _holds(cell_bounds(n, spec), x, y)] == [cell]


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_cells_share_edges_and_never_overlap(data: st.DataObject) -> None:
    spec = data.draw(st.one_of(small_specs(), st.just(SPEC)))
    i, j = data.draw(st.integers(-50, 3000)), data.draw(st.integers(-50, 3000))
    xmin, ymin, xmax, ymax = cell_bounds(Cell(EPSG, i, j), spec)
    assert xmax - xmin == ymax - ymin == spec.cell_size
    assert cell_bounds(Cell(EPSG, i + 1, j), spec)[0] == xmax
    assert cell_bounds(Cell(EPSG, i, j + 1), spec)[1] == ymax
    other = Cell(EPSG, i + data.draw(st.integers(-3, 3)), j + data.draw(st.integers(-3, 3)))
    oxmin, oymin, oxmax, oymax = cell_bounds(other, spec)
    overlap = max(0.0, min(xmax, oxmax) - max(xmin, oxmin)) * max(0.0, min(ymax, oymax) - max(ymin, oymin))
    assert overlap == (spec.cell_size**2 if other == Cell(EPSG, i, j) else 0.0)


# --- Cells meeting a box -----------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_cells_for_bounds_equal_the_oracle(data: st.DataObject) -> None:
    spec = data.draw(small_specs())
    x1, x2 = sorted((data.draw(points(spec)), data.draw(points(spec))))
    y1, y2 = sorted((data.draw(points(spec)), data.draw(points(spec))))
    # Keep the brute force small: boxes up to a few dozen cells a side.
    assume(x2 - x1 <= 30 * spec.cell_size and y2 - y1 <= 30 * spec.cell_size)
    found = cells_for_bounds(EPSG, (x1, y1, x2, y2), spec)
    p, px, off = _ints(spec)
    size = p * px
    oracle = set()
    for i in range(math.floor((x1 - off) / size) - 2, math.floor((x2 - off) / size) + 3):
        for j in range(math.floor((y1 - off) / size) - 2, math.floor((y2 - off) / size) + 3):
            cxmin, cymin, cxmax, cymax = oracle_cell_extent(i, j, spec)
            # Open intervals: a box without interior (x1 == x2) meets nothing, an edge contact is not overlap.
            if x1 < x2 and y1 < y2 and cxmin < x2 and x1 < cxmax and cymin < y2 and y1 < cymax:
                oracle.add(Cell(EPSG, i, j))
    assert set(found) == oracle and len(found) == len(oracle)
    assert found == sorted(found, key=lambda c: (-c.j, c.i))


def test_cells_for_bounds_of_a_cell_is_that_cell() -> None:
    cell = Cell(EPSG, 164, 1377)
    assert cells_for_bounds(EPSG, cell_bounds(cell, SPEC), SPEC) == [cell]
    xmin, ymin, xmax, ymax = cell_bounds(cell, SPEC)
    assert cells_for_bounds(EPSG, (xmin, ymin, xmax + 1, ymax), SPEC) == [cell, Cell(EPSG, 165, 1377)]
    assert cells_for_bounds(EPSG, (xmin, ymin, xmin, ymax), SPEC) == []  # no interior
    with pytest.raises(ValueError, match="min <= max"):
        cells_for_bounds(EPSG, (xmax, ymin, xmin, ymax), SPEC)
    with pytest.raises(ValueError, match="finite"):
        cells_for_bounds(EPSG, (math.nan, ymin, xmax, ymax), SPEC)
    with pytest.raises(ValueError, match="not a projected coordinate"):
        cells_for_bounds(EPSG, (xmin, ymin, 1e300, ymax), SPEC)
    with pytest.raises(ValueError, match="not a projected coordinate"):
        cell_of_point(EPSG, 1e300, ymax, SPEC)


# --- Rasters that are not on the lattice -------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_off_lattice_origins_are_rejected_with_a_reason(data: st.DataObject) -> None:
    spec = data.draw(small_specs())
    transform, _, _ = data.draw(rasters(spec))
    shift = data.draw(st.floats(1e-4, spec.pixel_size - 1e-4)) * data.draw(st.sampled_from([1, -1]))
    axis = data.draw(st.sampled_from(["x", "y"]))
    moved = list(transform)
    moved[2 if axis == "x" else 5] += shift
    assume(moved[2 if axis == "x" else 5] != transform[2 if axis == "x" else 5])
    lattice = f"({spec.offset % spec.pixel_size:g} m + k x {spec.pixel_size:g} m)"
    for call in (
        lambda: check_lattice(moved, spec),
        lambda: cells_in_raster(EPSG, moved, 50, 50, spec),
        lambda: window_of(Cell(EPSG, 1, 1), moved, spec),
    ):
        with pytest.raises(OffLatticeError) as caught:
            call()
        message = str(caught.value)
        assert "\n" not in message
        assert message.startswith(f"origin {axis} ") and message.endswith(lattice)


def test_off_lattice_message_names_the_value() -> None:
    with pytest.raises(OffLatticeError) as caught:
        check_lattice((30.0, 0.0, 628790.0, 0.0, -30.0, 5294265.0), SPEC)
    assert str(caught.value) == "origin x 628790.0 is not on the 30 m lattice (15 m + k x 30 m)"
    assert isinstance(caught.value, ValueError)


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_rounding_noise_within_a_micrometre_is_on_the_lattice(data: st.DataObject) -> None:
    spec = data.draw(small_specs())
    transform, width, height = data.draw(rasters(spec))
    noisy = list(transform)
    noisy[2] += data.draw(st.floats(-9e-7, 9e-7))
    noisy[5] += data.draw(st.floats(-9e-7, 9e-7))
    assert cells_in_raster(EPSG, noisy, width, height, spec) == cells_in_raster(
        EPSG, transform, width, height, spec
    )


@pytest.mark.parametrize(
    ("coefficients", "reason"),
    [
        (
            (60.0, 0.0, 628785.0, 0.0, -60.0, 5294265.0),
            "pixel size is 60.0 x 60.0 m, the grid's is 30 x 30 m",
        ),
        ((10.0, 0.0, 628785.0, 0.0, -10.0, 5294265.0), "pixel size is 10.0 x 10.0 m"),
        ((30.0, 0.0, 628785.0, 0.0, -29.999, 5294265.0), "pixel size is 30.0 x 29.999 m"),
        ((30.0, 0.5, 628785.0, 0.0, -30.0, 5294265.0), "rotated or sheared"),
        ((30.0, 0.0, 628785.0, -0.5, -30.0, 5294265.0), "rotated or sheared"),
        ((30.0, 0.0, 628785.0, 0.0, 30.0, 5257905.0), "south-up"),
        ((30.0, 0.0, math.nan, 0.0, -30.0, 5294265.0), "non-finite"),
        ((628785.0, 30.0, 0.0, 5294265.0, 0.0, -30.0), "rotated or sheared"),  # GDAL order by mistake
        ((30.0, 0.0, 628785.0), "3 coefficients"),
    ],
)
def test_wrong_pixel_size_or_orientation_is_rejected(coefficients: tuple[float, ...], reason: str) -> None:
    with pytest.raises(OffLatticeError, match=re.escape(reason)):
        check_lattice(coefficients, SPEC)


# --- Location ids ------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(epsg=UTM_EPSG, i=st.integers(0, 9999), j=st.integers(0, 9999))
def test_location_id_round_trips(epsg: int, i: int, j: int) -> None:
    cell = Cell(epsg, i, j)
    location_id = cell.location_id
    assert STAC_GRID_CODE.match(location_id)
    assert re.fullmatch(r"EPSG\d{5}-\d{4}-\d{4}", location_id)
    assert Cell.parse(location_id) == cell
    assert Cell.parse(location_id).location_id == location_id


@settings(max_examples=100, deadline=None)
@given(
    a=st.tuples(UTM_EPSG, st.integers(0, 9999), st.integers(0, 9999)),
    b=st.tuples(UTM_EPSG, *[st.integers(0, 9999)] * 2),
)
def test_location_ids_sort_like_cells(a: tuple[int, int, int], b: tuple[int, int, int]) -> None:
    # Fixed-width ids: sorting the strings is sorting the cells, which keeps parquet and Zarr order stable.
    assert (Cell(*a).location_id < Cell(*b).location_id) == (Cell(*a) < Cell(*b))


@pytest.mark.parametrize(("i", "j"), [(-1, 0), (0, -1), (10000, 5), (5, 12345)])
def test_location_id_out_of_range_raises(i: int, j: int) -> None:
    with pytest.raises(ValueError, match="4-digit"):
        Cell(EPSG, i, j).location_id  # noqa: B018


@pytest.mark.parametrize(
    "text",
    [
        "EPSG32632-164-1377",
        "EPSG32632-0164-01377",
        "epsg32632-0164-1377",
        "EPSG032632-0164-1377",
        "EPSG32632-0164--377",
        "EPSG-0164-1377",
        "EPSG32632_0164_1377",
        "EPSG32632-0164-1377\n",
        " EPSG32632-0164-1377",
        "",
    ],
)
def test_malformed_location_ids_are_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="not a location id"):
        Cell.parse(text)


# --- Grid parameters and cell values -----------------------------------------------------------------


def test_grid_spec_defaults_and_validation() -> None:
    assert (SPEC.patch_size, SPEC.pixel_size, SPEC.offset, SPEC.cell_size) == (128, 30.0, 15.0, 3840.0)
    assert GridSpec(pixel_size=30, offset=15) == SPEC and hash(GridSpec(pixel_size=30, offset=15)) == hash(
        SPEC
    )
    invalid: list[tuple[dict[str, Any], str]] = [
        ({"patch_size": 0}, "patch_size must be positive"),
        ({"pixel_size": -30.0}, "pixel_size must be positive"),
        ({"pixel_size": math.inf}, "finite"),
        ({"offset": -1.0}, "offset must be within"),
        ({"offset": 3840.0}, "offset must be within"),
    ]
    for kwargs, message in invalid:
        with pytest.raises(ValueError, match=message):
            GridSpec(**kwargs)
    with pytest.raises(TypeError):
        GridSpec(patch_size=128.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        GridSpec(patch_size=True)


def test_cells_are_validated_frozen_values() -> None:
    with pytest.raises(TypeError):
        Cell(EPSG, 1.0, 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="epsg"):
        Cell(0, 1, 2)
    cell = Cell(EPSG, 1, 2)
    with pytest.raises(AttributeError):
        cell.i = 3  # type: ignore[misc]
    assert sorted([Cell(EPSG, 2, 0), Cell(EPSG, 1, 5), Cell(32631, 9, 9)]) == [
        Cell(32631, 9, 9),
        Cell(EPSG, 1, 5),
        Cell(EPSG, 2, 0),
    ]
    assert cell_transform(Cell(EPSG, 164, 1377), SPEC) == (30.0, 0.0, 629775.0, 0.0, -30.0, 5291535.0)
