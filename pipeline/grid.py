"""The global patch grid: a fixed lattice of square cells per UTM zone, and where a cell sits in a scene.

Cell (i, j) of a zone covers x in [offset + i*S, offset + (i+1)*S) and y in [offset + j*S, offset + (j+1)*S)
projected metres, with S = patch_size * pixel_size (SpectralEarth: 128 px x 30 m, offset 15 m, S = 3840 m).
EnMAP pixel corners sit at 15 m + k x 30 m, so a cell is the same 128 x 128 pixels in every scene of the
zone and patches of one location from different dates line up without resampling.

Everything here is pure arithmetic. A raster origin is turned once into an integer count of pixels from
the lattice origin (after checking that it lies on the lattice) and all window and cell arithmetic is done
on those integers: a float chain like ``(x - c) / 30`` would otherwise round differently for different
scenes and could shift a window by one pixel. Coordinates are produced from integers by a single
``offset + n * pixel_size``, which is exact for the metre-valued EnMAP lattice.

Transforms are in rasterio ``Affine`` order ``(a, b, c, d, e, f)``: a rasterio ``Affine`` itself can be
passed, as can any iterable whose first six items are those coefficients.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np

# Iterable rather than Sequence: affine 3's Affine is iterable and indexable but no longer a tuple.
Transform = Iterable[float]
Bounds = tuple[float, float, float, float]

# A GeoTIFF origin written from a double is within nanometres of the lattice; a micrometre still tells
# rounding noise from a genuinely shifted raster (the smallest real shift is a fraction of a pixel).
LATTICE_TOLERANCE = 1e-6
# Per pixel, so that even across 10,000 pixels a scale or shear error stays below LATTICE_TOLERANCE.
_PER_PIXEL_TOLERANCE = 1e-10

# Far beyond any projected coordinate (UTM stays within 1e7 m) yet small enough that adjacent cell edges
# are distinct floats, which the edge-settling loops in _axis_cell rely on to terminate.
_MAX_COORDINATE = 1e12

LOCATION_ID_MAX_INDEX = 9999
_LOCATION_ID = re.compile(r"EPSG([1-9][0-9]*)-([0-9]{4})-([0-9]{4})")  # ASCII digits only, unlike \d


class OffLatticeError(ValueError):
    """A raster that does not sit on the grid's pixel lattice; the message is a one-line reason."""


def _integer(value: object, name: str) -> int:
    # numpy integers (as they come out of parquet rows) are accepted; bools and floats are not, since a
    # float cell index is always a bug upstream.
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    return operator.index(value)


def _finite(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


# SpectralEarth's grid: 128 x 128 patches of 30 m pixels, offset 15 m (also the manifest's defaults).
DEFAULT_PATCH_SIZE = 128
DEFAULT_PIXEL_SIZE = 30.0
DEFAULT_OFFSET = 15.0


@dataclass(frozen=True, slots=True)
class GridSpec:
    """Grid parameters; the defaults are SpectralEarth's."""

    patch_size: int = DEFAULT_PATCH_SIZE
    pixel_size: float = DEFAULT_PIXEL_SIZE
    offset: float = DEFAULT_OFFSET

    def __post_init__(self) -> None:
        patch_size = _integer(self.patch_size, "patch_size")
        if patch_size <= 0:
            raise ValueError(f"patch_size must be positive, got {patch_size}")
        pixel_size = _finite(self.pixel_size, "pixel_size")
        if pixel_size <= 0:
            raise ValueError(f"pixel_size must be positive, got {pixel_size:g}")
        offset = _finite(self.offset, "offset")
        # Normalised so that GridSpec(pixel_size=30) == GridSpec(pixel_size=30.0) and hashes alike.
        object.__setattr__(self, "patch_size", patch_size)
        object.__setattr__(self, "pixel_size", pixel_size)
        object.__setattr__(self, "offset", offset)
        if not 0 <= offset < self.cell_size:
            raise ValueError(f"offset must be within [0, {self.cell_size:g}) m, got {offset:g}")

    @property
    def cell_size(self) -> float:
        """Side of a cell in projected metres."""
        return self.patch_size * self.pixel_size

    def _coord(self, n: int) -> float:
        """Projected coordinate of lattice line n (pixel corners sit on these lines)."""
        return self.offset + n * self.pixel_size


@dataclass(frozen=True, slots=True, order=True)
class Cell:
    """One grid cell: a location of the dataset. Ordered by (epsg, i, j)."""

    epsg: int
    i: int
    j: int

    def __post_init__(self) -> None:
        epsg = _integer(self.epsg, "epsg")
        if epsg <= 0:
            raise ValueError(f"epsg must be positive, got {epsg}")
        object.__setattr__(self, "epsg", epsg)
        object.__setattr__(self, "i", _integer(self.i, "i"))
        object.__setattr__(self, "j", _integer(self.j, "j"))

    @property
    def location_id(self) -> str:
        """``EPSG<code>-<i, 4 digits>-<j, 4 digits>``, also a valid STAC ``grid:code``."""
        for name, index in (("i", self.i), ("j", self.j)):
            if not 0 <= index <= LOCATION_ID_MAX_INDEX:
                # A fifth digit or a minus sign would break the fixed-width id and its sort order.
                raise ValueError(
                    f"cell {name} = {index} of EPSG:{self.epsg} cannot be written as a 4-digit location id"
                )
        return f"EPSG{self.epsg}-{self.i:04d}-{self.j:04d}"

    @classmethod
    def parse(cls, location_id: str) -> Cell:
        """The cell of a location id; exactly the strings `location_id` produces are accepted."""
        match = _LOCATION_ID.fullmatch(location_id) if isinstance(location_id, str) else None
        if match is None:
            raise ValueError(f"not a location id (EPSG<code>-<iiii>-<jjjj>): {location_id!r}")
        epsg, i, j = (int(group) for group in match.groups())
        return cls(epsg, i, j)


@dataclass(frozen=True, slots=True)
class PixelWindow:
    """Where a cell sits in one scene raster, in pixels; same field order as ``rasterio.windows.Window``."""

    col_off: int
    row_off: int
    width: int
    height: int

    def slices(self) -> tuple[slice, slice]:
        """(rows, cols) slices into an array of the scene; only meaningful for a window inside it."""
        return (
            slice(self.row_off, self.row_off + self.height),
            slice(self.col_off, self.col_off + self.width),
        )


def _lattice_origin(transform: Transform, spec: GridSpec) -> tuple[int, int]:
    """(column, row line) of the raster's upper-left corner on the lattice; raises OffLatticeError."""
    coefficients = tuple(float(value) for value in transform)
    if len(coefficients) < 6:
        raise OffLatticeError(
            f"transform has {len(coefficients)} coefficients, expected 6 (a, b, c, d, e, f)"
        )
    a, b, c, d, e, f = coefficients[:6]
    size = spec.pixel_size
    if not all(math.isfinite(value) for value in (a, b, c, d, e, f)):
        raise OffLatticeError(f"transform has a non-finite coefficient: {(a, b, c, d, e, f)}")
    if abs(b) > _PER_PIXEL_TOLERANCE or abs(d) > _PER_PIXEL_TOLERANCE:
        raise OffLatticeError(f"transform is rotated or sheared (b = {b!r}, d = {d!r}); the grid is north-up")
    if e > 0:
        raise OffLatticeError(f"transform is south-up (e = {e!r} > 0); the grid is north-up")
    if abs(a - size) > _PER_PIXEL_TOLERANCE or abs(e + size) > _PER_PIXEL_TOLERANCE:
        raise OffLatticeError(f"pixel size is {a!r} x {-e!r} m, the grid's is {size:g} x {size:g} m")
    phase = math.fmod(spec.offset, size)
    indices = []
    for axis, value in (("x", c), ("y", f)):
        n = round((value - spec.offset) / size)
        if abs(spec._coord(n) - value) > LATTICE_TOLERANCE:
            raise OffLatticeError(
                f"origin {axis} {value!r} is not on the {size:g} m lattice ({phase:g} m + k x {size:g} m)"
            )
        indices.append(n)
    return indices[0], indices[1]


def _axis_cell(value: float, spec: GridSpec) -> int:
    """Index of the half-open cell interval holding value along one axis, exact at cell edges."""
    if abs(value) > _MAX_COORDINATE:
        raise ValueError(f"coordinate {value!r} is beyond {_MAX_COORDINATE:g} m: not a projected coordinate")
    index = math.floor((value - spec.offset) / spec.cell_size)
    # The division can round across an edge; settle it with the same comparison cell_bounds implies.
    while spec._coord(index * spec.patch_size) > value:
        index -= 1
    while spec._coord((index + 1) * spec.patch_size) <= value:
        index += 1
    return index


def snap_to_lattice(
    transform: tuple[float, ...], spec: GridSpec
) -> tuple[float, float, float, float, float, float]:
    """Nearest-neighbour resampling onto the lattice: move the origin to the nearest lattice corner.

    Pixel values are unchanged; the shift is at most half a pixel per axis.
    """
    a, b, c, d, e, f = (float(v) for v in transform[:6])

    def snap(value: float) -> float:
        return spec.offset + round((value - spec.offset) / spec.pixel_size) * spec.pixel_size

    return (a, b, snap(c), d, e, snap(f))


def check_lattice(transform: Transform, spec: GridSpec) -> None:
    """Raise OffLatticeError with a one-line reason unless the raster sits on the grid's pixel lattice."""
    _lattice_origin(transform, spec)


def cell_bounds(cell: Cell, spec: GridSpec) -> Bounds:
    """(xmin, ymin, xmax, ymax) in projected metres; the cell holds [xmin, xmax) x [ymin, ymax)."""
    p = spec.patch_size
    return (
        spec._coord(cell.i * p),
        spec._coord(cell.j * p),
        spec._coord((cell.i + 1) * p),
        spec._coord((cell.j + 1) * p),
    )


def cell_transform(cell: Cell, spec: GridSpec) -> tuple[float, float, float, float, float, float]:
    """The patch's own north-up geotransform (rasterio order), its origin the cell's upper-left corner."""
    xmin, _, _, ymax = cell_bounds(cell, spec)
    return (spec.pixel_size, 0.0, xmin, 0.0, -spec.pixel_size, ymax)


def window_of(cell: Cell, transform: Transform, spec: GridSpec) -> PixelWindow:
    """The cell's pixels in a raster with this transform; may lie partly or wholly outside the raster.

    The cell's EPSG is not checked against the raster's: the caller knows the raster's CRS.
    """
    column, row_line = _lattice_origin(transform, spec)
    return _window(cell, column, row_line, spec.patch_size)


def _window(cell: Cell, column: int, row_line: int, p: int) -> PixelWindow:
    # Rows count down from the raster's top line while j counts up, hence the top edge (j + 1) * p.
    return PixelWindow(col_off=cell.i * p - column, row_off=row_line - (cell.j + 1) * p, width=p, height=p)


def cells_in_raster(
    epsg: int, transform: Transform, width: int, height: int, spec: GridSpec
) -> list[tuple[Cell, PixelWindow]]:
    """Every cell wholly inside the raster with its window, top row first, west to east within a row.

    Raises OffLatticeError when the raster is not on the grid's lattice.
    """
    width = _integer(width, "width")
    height = _integer(height, "height")
    if width < 0 or height < 0:
        raise ValueError(f"raster size must be non-negative, got {width} x {height}")
    column, row_line = _lattice_origin(transform, spec)
    p = spec.patch_size
    # In lattice units the raster spans columns [column, column + width) and, counted northwards,
    # rows [row_line - height, row_line); a cell fits when its p x p block lies within both.
    i_first, i_last = -(-column // p), (column + width) // p - 1
    j_first, j_last = -(-(row_line - height) // p), row_line // p - 1
    return [
        (cell, _window(cell, column, row_line, p)) for cell in _cells(epsg, i_first, i_last, j_first, j_last)
    ]


def _cells(epsg: int, i_first: int, i_last: int, j_first: int, j_last: int) -> list[Cell]:
    """The cells of an index range, top row (largest j) first and west to east within a row."""
    return [Cell(epsg, i, j) for j in range(j_last, j_first - 1, -1) for i in range(i_first, i_last + 1)]


def cells_for_bounds(epsg: int, bounds: Sequence[float], spec: GridSpec) -> list[Cell]:
    """Cells whose interior meets the interior of a projected box, top row first, west to east.

    Cells that only touch the box along an edge are excluded, so the bounds of one cell give that cell
    alone; a box of zero width or height has no interior and gives no cells.
    """
    if len(bounds) != 4:
        raise ValueError(f"bounds must be (xmin, ymin, xmax, ymax), got {bounds!r}")
    xmin, ymin, xmax, ymax = (_finite(value, "bounds") for value in bounds)
    if xmin > xmax or ymin > ymax:
        raise ValueError(f"bounds must be (xmin, ymin, xmax, ymax) with min <= max, got {tuple(bounds)!r}")
    if xmin == xmax or ymin == ymax:
        return []

    def last_before(value: float) -> int:
        # The last cell starting strictly before value: a cell starting exactly at value only touches.
        index = _axis_cell(value, spec)
        return index - 1 if spec._coord(index * spec.patch_size) == value else index

    i_first, i_last = _axis_cell(xmin, spec), last_before(xmax)
    j_first, j_last = _axis_cell(ymin, spec), last_before(ymax)
    return _cells(epsg, i_first, i_last, j_first, j_last)


def cell_of_point(epsg: int, x: float, y: float, spec: GridSpec) -> Cell:
    """The one cell whose half-open extent [xmin, xmax) x [ymin, ymax) holds the point."""
    return Cell(epsg, _axis_cell(_finite(x, "x"), spec), _axis_cell(_finite(y, "y"), spec))


# The same arithmetic over arrays of cells and boxes (pipeline.dedup matches cells across UTM zones by the
# ten thousand), with the same floating-point operations as the scalar functions above.


def cell_bounds_array(i: np.ndarray, j: np.ndarray, spec: GridSpec) -> tuple[np.ndarray, ...]:
    """`cell_bounds` for arrays of cells, with the same floating-point operations."""
    p = spec.patch_size
    return (
        spec.offset + (i * p) * spec.pixel_size,
        spec.offset + (j * p) * spec.pixel_size,
        spec.offset + ((i + 1) * p) * spec.pixel_size,
        spec.offset + ((j + 1) * p) * spec.pixel_size,
    )


def _axis_cells_array(values: np.ndarray, spec: GridSpec) -> np.ndarray:
    """`_axis_cell` for an array: the cell interval holding each value, exact at cell edges."""
    if not np.isfinite(values).all() or (np.abs(values) > _MAX_COORDINATE).any():
        raise ValueError("bounds must be finite projected coordinates")
    p = spec.patch_size
    index = np.floor((values - spec.offset) / spec.cell_size).astype(np.int64)
    while (low := spec.offset + (index * p) * spec.pixel_size > values).any():
        index -= low
    while (high := spec.offset + ((index + 1) * p) * spec.pixel_size <= values).any():
        index += high
    return index


def cells_reached_array(bounds: np.ndarray, spec: GridSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For boxes (xmin, ymin, xmax, ymax) of positive size, every (box index, i, j) of a cell whose
    interior meets the box's interior, as `cells_for_bounds` finds them."""
    p = spec.patch_size

    def last_before(values: np.ndarray) -> np.ndarray:
        index = _axis_cells_array(values, spec)
        return index - (spec.offset + (index * p) * spec.pixel_size == values)

    i_first, i_last = _axis_cells_array(bounds[:, 0], spec), last_before(bounds[:, 2])
    j_first, j_last = _axis_cells_array(bounds[:, 1], spec), last_before(bounds[:, 3])
    parts = []
    span_i = int((i_last - i_first).max(initial=-1)) + 1
    span_j = int((j_last - j_first).max(initial=-1)) + 1
    for di in range(span_i):
        for dj in range(span_j):
            inside = np.nonzero((i_first + di <= i_last) & (j_first + dj <= j_last))[0]
            parts.append((inside, i_first[inside] + di, j_first[inside] + dj))
    if not parts:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    return tuple(np.concatenate(column) for column in zip(*parts, strict=True))  # type: ignore[return-value]
