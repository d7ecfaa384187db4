"""Read a build's patches into training code: a map-style dataset, a per-band normalisation, a torch adapter.

`PatchDataset(build)` indexes the patches of `dataset.zarr` (all of them, or the ids of a query or a
split, in the order given) and returns one `PatchSample` per index: the reflectance cube (B, 128, 128),
the quality bits (128, 128) and the patch's metadata. With `two_views=True` it indexes the locations
seen on two or more dates instead and returns two samples of the same location on two different dates,
chosen from (seed, epoch, index) (multitemporal contrastive pretraining, as in SSL4EO and SpectralEarth).

Reading: each item reads exactly one inner chunk of `reflectance` and one of `quality` (a chunk is one
whole patch), through the zarr arrays directly (no dask, no xarray). The arrays are opened lazily, once
per process: a dataset pickles without its handles, so it can be sent to DataLoader workers (spawn or
fork); a worker opens the arrays on its first item. The small 1-D arrays over `patch` (ids, time, epsg,
corners) are read whole, once per process, because each is stored as a single chunk.

Units: `dtype="float32"` gives reflectance (stored value x 0.0001) with NaN where the stored value is the
fill -32768: the float32 nearest to stored / 10000, bit for bit what `query(...).to_xarray()` and
xarray's float64 decoding cast to float32 give (see `to_reflectance`); `dtype="int16"` gives the stored
values unchanged. Band statistics written by the build
(`stats/mean.npy`, `stats/std.npy`) are in the stored int16 units; `Normalize.from_build(store,
units=...)` converts them to the units of the samples it will see.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, Literal

import numpy as np

from pipeline import tables
from pipeline.dataset_arrays import DATASET, REFLECTANCE_SCALE, quiet_zarr, zarr_store
from pipeline.labels import included_patches
from pipeline.quality import NODATA_VALUE
from pipeline.storage import BuildStore

STATS_MEAN = tables.STATS_MEAN
STATS_STD = tables.STATS_STD
NODATA = NODATA_VALUE

Units = Literal["stored", "reflectance"]
SampleUnits = Literal["stored", "reflectance", "normalized"]
BandBy = Literal["index", "number"]
DType = Literal["float32", "int16"]
Transform = Callable[["PatchSample"], "PatchSample"]


# Pure conversions ---------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _reflectance_table() -> np.ndarray:
    """float32 reflectance of every int16 value, indexed by value + 32768; NaN for the fill."""
    table = (np.arange(-32768, 32768, dtype=np.float64) * REFLECTANCE_SCALE).astype(np.float32)
    table[NODATA + 32768] = np.nan
    table.flags.writeable = False
    return table


def to_reflectance(stored: np.ndarray) -> np.ndarray:
    """Stored int16 values to float32 reflectance: value x 0.0001, NaN where the value is the fill -32768.

    Each value is the float32 nearest to the exact reflectance stored / 10000. For every int16 value that
    is the product taken in float64 and rounded once to float32 (xarray's CF decoding followed by a cast,
    which is how `query(...).to_xarray()` gives float32), and also float32(stored) / float32(10000); it
    is not float32(stored) * float32(1e-4), which rounds twice (tests/test_arrays_readers.py checks all
    65,536 values against exact arithmetic). int16 input goes through a 65536-entry table, which is
    faster than the arithmetic."""
    values = np.asarray(stored)
    if values.dtype.kind not in "iu":
        raise TypeError(f"stored reflectance must be integer (int16), got {values.dtype}")
    if values.dtype == np.int16:
        # The int16 bit pattern XOR 0x8000, read as uint16, is value + 32768.
        return _reflectance_table()[values.view(np.uint16) ^ np.uint16(0x8000)]
    out = (values * REFLECTANCE_SCALE).astype(np.float32)
    out[values == NODATA] = np.nan
    return out


def band_positions(band_numbers: Sequence[int] | np.ndarray, bands: Sequence[int] | None, by: BandBy) -> Any:
    """Positions on the stored band axis of a band selection; None for all bands.

    `by="index"`: `bands` are 0-based positions on the build's (kept) band axis. `by="number"`: `bands`
    are the 1-based band numbers of the product (the `band` array of dataset.zarr, e.g. 1..224 with the
    dropped water-vapour bands missing)."""
    if bands is None:
        return None
    numbers = [int(b) for b in np.asarray(band_numbers).tolist()]
    wanted = [int(b) for b in bands]
    if not wanted:
        raise ValueError("bands is empty: give at least one band, or None for all")
    if by == "index":
        bad = [b for b in wanted if not 0 <= b < len(numbers)]
        if bad:
            raise ValueError(f"band index {bad[0]} is outside the build's band axis (0..{len(numbers) - 1})")
        return np.asarray(wanted, dtype=np.intp)
    if by == "number":
        position = {n: k for k, n in enumerate(numbers)}
        missing = [b for b in wanted if b not in position]
        if missing:
            raise ValueError(
                f"band number {missing[0]} is not on the build's band axis (dropped by the band policy?)"
            )
        return np.asarray([position[b] for b in wanted], dtype=np.intp)
    raise ValueError(f"band_by must be 'index' or 'number', got {by!r}")


_TIME_UNITS = {"nanoseconds": "ns", "microseconds": "us", "milliseconds": "ms", "seconds": "s"}


def decode_time(values: np.ndarray, units: str) -> np.ndarray:
    """CF-encoded integer times (`<unit> since <ISO datetime>`, UTC) to numpy datetime64."""
    match = re.fullmatch(r"\s*(\w+)\s+since\s+(\S+(?:[ T]\S+)?)\s*", units)
    if match is None or match.group(1) not in _TIME_UNITS:
        raise ValueError(f"cannot decode time units {units!r}")
    unit = _TIME_UNITS[match.group(1)]
    origin = np.array(match.group(2).replace(" ", "T").removesuffix("Z"), dtype=f"datetime64[{unit}]")
    return origin + np.asarray(values, dtype=np.int64).astype(f"timedelta64[{unit}]")


def acquisition_date(patch_id: str) -> str:
    """`YYYYMMDD` of a patch id (`<location_id>_<date>_DT<datatake>`)."""
    parts = patch_id.split("_")
    if len(parts) != 3 or not parts[1].isdigit() or len(parts[1]) != 8:
        raise ValueError(f"not a patch id: {patch_id!r}")
    return parts[1]


def pick_two_dates(dates: np.ndarray, seed: int, epoch: int, index: int) -> tuple[int, int]:
    """Two positions in `dates` with different values, chosen from (seed, epoch, index) alone.

    The first is uniform over all positions, the second uniform over the positions of other dates."""
    dates = np.asarray(dates)
    rng = np.random.default_rng([seed, epoch, index])
    first = int(rng.integers(len(dates)))
    others = np.flatnonzero(dates != dates[first])
    if not len(others):
        raise ValueError("a two-view group needs at least two different dates")
    return first, int(others[int(rng.integers(len(others)))])


def _non_negative(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


# Samples ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class PatchSample:
    """One patch as read from the build. `units` says what `reflectance` holds: the stored int16
    ("stored"), float32 reflectance with NaN for nodata ("reflectance"), or `Normalize` output."""

    reflectance: np.ndarray  # (B, H, W)
    quality: np.ndarray  # (H, W) uint16 bit flags (pipeline.quality)
    patch_id: str
    location_id: str
    scene_id: str
    time: np.datetime64  # acquisition start, UTC, microseconds
    epsg: int
    x_ul: float  # projected upper-left corner, metres
    y_ul: float
    wavelengths: np.ndarray  # (B,) nm, of the bands in `reflectance`
    row: int  # the patch's row in dataset.zarr
    units: SampleUnits = "reflectance"
    label: np.ndarray | None = None  # (H, W) class codes of labels/<name> when asked for (0: no label)


@dataclass(frozen=True, slots=True, eq=False)
class _Handles:
    """What one process holds open: the two cube arrays and the 1-D arrays, read once."""

    pid: int
    reflectance: Any
    quality: Any
    patch_id: np.ndarray
    location_id: np.ndarray
    scene_id: np.ndarray
    time: np.ndarray
    epsg: np.ndarray
    x_ul: np.ndarray
    y_ul: np.ndarray
    band: np.ndarray
    wavelength: np.ndarray
    active: np.ndarray  # bool per row: listed in the index (False: superseded or dropped, kept in place)
    label: Any = None  # labels/<name> when the dataset was asked for labels


def _array(group: Any, name: str) -> Any:
    import zarr

    array = group[name]
    if not isinstance(array, zarr.Array):
        raise ValueError(f"dataset.zarr/{name} is not an array")
    return array


def _open(store: BuildStore, labels: str | None = None) -> _Handles:
    import zarr

    if not store.exists(f"{DATASET}/zarr.json"):
        raise FileNotFoundError(f"{store.uri_of(DATASET)} is missing: run the write stage first")
    with quiet_zarr():
        group = zarr.open_group(zarr_store(store), mode="r")

        def one_d(name: str, dtype: Any = None) -> np.ndarray:
            values = np.asarray(_array(group, name)[:])
            return values.astype(dtype) if dtype is not None else values

        time = _array(group, "time")
        return _Handles(
            pid=os.getpid(),
            reflectance=_array(group, "reflectance"),
            quality=_array(group, "quality"),
            patch_id=one_d("patch_id", object),
            location_id=one_d("location_id", object),
            scene_id=one_d("scene_id", object),
            time=decode_time(np.asarray(time[:]), str(time.attrs["units"])).astype("datetime64[us]"),
            epsg=one_d("epsg", np.int64),
            x_ul=one_d("x_ul", np.float64),
            y_ul=one_d("y_ul", np.float64),
            band=one_d("band", np.int64),
            wavelength=one_d("wavelength", np.float64),
            active=_active_rows(group),
            label=_label_array(group, store, labels),
        )


def _active_rows(group: Any) -> np.ndarray:
    """Which rows the index lists. A grown build keeps superseded and dropped patches in place (active
    0), and the same patch id may then sit in two rows; an export holds only active rows and may have
    no `active` array."""
    patches = _array(group, "patch_id").shape[0]
    if "active" not in set(group.array_keys()):
        return np.ones(patches, dtype=bool)
    return np.asarray(_array(group, "active")[:]) != 0


def _label_array(group: Any, store: BuildStore, name: str | None) -> Any:
    if name is None:
        return None
    try:
        return _array(group, f"labels/{name}")
    except KeyError:
        raise FileNotFoundError(
            f"{store.uri_of(DATASET)} has no labels/{name}: run `spectralearth labels` first"
        ) from None


# The dataset --------------------------------------------------------------------------------------


class PatchDataset:
    """A map-style dataset over a build's patches (see the module docstring).

    `build`: a `BuildStore`, or a folder / `s3://` URI (with `storage_options`). `patch_ids`: the patches to
    index, in this order (e.g. `stac.search(...).ids`, or a split's ids); None for all the index's patches, in
    Zarr row order (rows a grown build keeps for superseded patches are never indexed, as queries never return
    them). `transform`: called on each `PatchSample` (after band selection and unit conversion). `bands`: a
    subset of the kept bands, as 0-based positions (`band_by="index"`) or 1-based product band numbers
    (`band_by="number"`). `dtype`: "float32" (reflectance, NaN for nodata) or "int16" (stored values).
    `labels`: the name of a benchmark made by the `labels` stage: each sample then carries `label` (H, W) from
    `labels/<name>`, and `patch_ids` defaults to the benchmark's included patches. `two_views`: index the
    locations with >= 2 dates among `patch_ids` and return pairs of samples of two different dates, chosen
    from (`seed`, epoch, index); `set_epoch(n)` before each epoch. Not a frozen dataclass on purpose: it holds
    the epoch and, per process, the open zarr arrays (dropped when pickled).

    With DataLoader's `persistent_workers=True`, workers keep the copy they were started with, so
    `set_epoch` in the main process does not reach them; leave persistent workers off (the default) or
    build a new DataLoader per epoch when the pairs should change with the epoch.
    """

    def __init__(
        self,
        build: BuildStore | str,
        patch_ids: Sequence[str] | None = None,
        transform: Transform | None = None,
        bands: Sequence[int] | None = None,
        band_by: BandBy = "index",
        two_views: bool = False,
        seed: int = 0,
        dtype: DType = "float32",
        storage_options: dict[str, Any] | None = None,
        labels: str | None = None,
    ) -> None:
        if isinstance(build, BuildStore):
            if storage_options:
                raise ValueError("storage_options go with a URI; a BuildStore carries its own")
            self.store = build
        else:
            self.store = BuildStore(str(build), storage_options or {})
        if dtype not in ("float32", "int16"):
            raise ValueError(f"dtype must be 'float32' or 'int16', got {dtype!r}")
        self.dtype: DType = dtype
        self.transform = transform
        self.two_views = bool(two_views)
        self.seed = _non_negative(seed, "seed")
        self.epoch = 0
        # labels="cdl": each sample carries labels/cdl; by default only the benchmark's patches
        self.labels = labels
        if labels is not None and patch_ids is None:
            patch_ids = included_patches(self.store, labels)
        self._handles: _Handles | None = None
        handles = self._opened()
        self.band_index = band_positions(handles.band, bands, band_by)
        chosen = slice(None) if self.band_index is None else self.band_index
        self.band_numbers: np.ndarray = handles.band[chosen].copy()
        self.wavelengths: np.ndarray = handles.wavelength[chosen].copy()
        self.wavelengths.flags.writeable = False
        self.rows: np.ndarray = self._rows_of(handles, patch_ids)
        # Two views: locations with >= 2 dates among the rows, as CSR (offsets into group_rows).
        self.group_offsets = np.zeros(1, dtype=np.int64)
        self.group_rows = np.zeros(0, dtype=np.int64)
        self.group_dates = np.zeros(0, dtype=np.int64)
        self.group_locations: tuple[str, ...] = ()
        if self.two_views:
            self._group_by_location(handles)

    # Construction helpers ------------------------------------------------------------------------
    @staticmethod
    def _rows_of(handles: _Handles, patch_ids: Sequence[str] | None) -> np.ndarray:
        active = np.flatnonzero(handles.active).astype(np.int64)
        if patch_ids is None:
            return active
        ids = [str(p) for p in patch_ids]
        if len(set(ids)) != len(ids):
            raise ValueError("patch_ids holds duplicates")
        row_by_id = {str(handles.patch_id[k]): int(k) for k in active.tolist()}
        missing = [pid for pid in ids if pid not in row_by_id]
        if missing:
            raise KeyError(f"{len(missing)} patch id(s) not in this build, e.g. {missing[0]}")
        return np.asarray([row_by_id[pid] for pid in ids], dtype=np.int64)

    def _group_by_location(self, handles: _Handles) -> None:
        groups: dict[str, list[int]] = {}
        for row in self.rows.tolist():
            groups.setdefault(str(handles.location_id[row]), []).append(row)
        offsets, rows, dates, locations = [0], [], [], []
        for location in sorted(groups):
            members = sorted(groups[location], key=lambda r: (handles.time[r], r))
            member_dates = [int(acquisition_date(str(handles.patch_id[r]))) for r in members]
            if len(set(member_dates)) < 2:
                continue
            rows.extend(members)
            dates.extend(member_dates)
            offsets.append(len(rows))
            locations.append(location)
        self.group_offsets = np.asarray(offsets, dtype=np.int64)
        self.group_rows = np.asarray(rows, dtype=np.int64)
        self.group_dates = np.asarray(dates, dtype=np.int64)
        self.group_locations = tuple(locations)

    # Process-local handles -----------------------------------------------------------------------
    def _opened(self) -> _Handles:
        handles = self._handles
        if handles is None or handles.pid != os.getpid():  # first use, or a forked worker
            handles = self._handles = _open(self.store, self.labels)
        return handles

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # Indexing ------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch (two-view pairs depend on it)."""
        self.epoch = _non_negative(epoch, "epoch")

    def __len__(self) -> int:
        return len(self.group_offsets) - 1 if self.two_views else len(self.rows)

    def _position(self, k: int) -> int:
        n = len(self)
        if isinstance(k, bool) or not isinstance(k, int | np.integer):
            raise TypeError(f"dataset indices are integers, got {type(k).__name__}")
        position = int(k) + n if k < 0 else int(k)
        if not 0 <= position < n:
            raise IndexError(f"index {k} out of range for a dataset of {n}")
        return position

    def __getitem__(self, k: int) -> PatchSample | tuple[PatchSample, PatchSample]:
        return self.pair(k) if self.two_views else self.sample(k)

    def sample(self, k: int) -> PatchSample:
        """The k-th patch (single-view datasets)."""
        if self.two_views:
            raise TypeError("a two-view dataset yields pairs: use pair(k)")
        return self.read_row(int(self.rows[self._position(k)]))

    def pair(self, k: int) -> tuple[PatchSample, PatchSample]:
        """Two samples of the k-th multi-date location, on two different dates (two-view datasets)."""
        if not self.two_views:
            raise TypeError("pair(k) needs two_views=True")
        g = self._position(k)
        start, stop = int(self.group_offsets[g]), int(self.group_offsets[g + 1])
        first, second = pick_two_dates(self.group_dates[start:stop], self.seed, self.epoch, g)
        return self.read_row(int(self.group_rows[start + first])), self.read_row(
            int(self.group_rows[start + second])
        )

    def read_row(self, row: int) -> PatchSample:
        """The patch at `row` of dataset.zarr: one chunk of each cube array."""
        h = self._opened()
        with quiet_zarr():
            stored = np.asarray(h.reflectance[row])
            quality = np.asarray(h.quality[row])
            label = np.asarray(h.label[row]) if h.label is not None else None
        if self.band_index is not None:
            stored = stored[self.band_index]
        values = to_reflectance(stored) if self.dtype == "float32" else stored
        sample = PatchSample(
            reflectance=values,
            quality=quality,
            patch_id=str(h.patch_id[row]),
            location_id=str(h.location_id[row]),
            scene_id=str(h.scene_id[row]),
            time=h.time[row],
            epsg=int(h.epsg[row]),
            x_ul=float(h.x_ul[row]),
            y_ul=float(h.y_ul[row]),
            wavelengths=self.wavelengths,
            row=int(row),
            units="reflectance" if self.dtype == "float32" else "stored",
            label=label,
        )
        return self.transform(sample) if self.transform is not None else sample

    def __iter__(self) -> Iterator[PatchSample | tuple[PatchSample, PatchSample]]:
        for k in range(len(self)):
            yield self[k]

    @property
    def patch_ids(self) -> list[str]:
        """The indexed patch ids, in dataset order (single view) or grouped by location (two views)."""
        h = self._opened()
        rows = self.group_rows if self.two_views else self.rows
        return [str(h.patch_id[r]) for r in rows.tolist()]

    def __repr__(self) -> str:
        what = f"{len(self)} locations (two views)" if self.two_views else f"{len(self)} patches"
        return f"PatchDataset({self.store.uri!r}, {what}, {len(self.wavelengths)} bands, {self.dtype})"


# Normalisation ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class Normalize:
    """Per-band standardisation `(x - mean) / std`; NaN stays NaN (and stored nodata -32768 becomes NaN).

    `mean`/`std` hold one value per band of the samples it is applied to, in `units`: "stored" (the int16
    values of dataset.zarr) or "reflectance" (stored x 0.0001, what `PatchDataset(dtype="float32")`
    returns). Applied to a `PatchSample`, the units must match the sample's (a clear error otherwise);
    the result is float32 with `units="normalized"`. Applied to a bare array (B, ...), the caller vouches
    for the units. A std of 0 (a constant band) is taken as 1."""

    mean: np.ndarray
    std: np.ndarray
    units: Units = "reflectance"

    def __post_init__(self) -> None:
        if self.units not in ("stored", "reflectance"):
            raise ValueError(f"units must be 'stored' or 'reflectance', got {self.units!r}")
        mean = np.asarray(self.mean, dtype=np.float64).reshape(-1)
        std = np.asarray(self.std, dtype=np.float64).reshape(-1)
        if mean.shape != std.shape or not len(mean):
            raise ValueError(f"mean and std need one value per band, got {mean.shape} and {std.shape}")
        bad = np.flatnonzero(~np.isfinite(mean) | ~np.isfinite(std) | (std < 0))
        if len(bad):
            raise ValueError(
                f"mean and std must be finite, std non-negative: band position {bad[0]} has "
                f"mean {mean[bad[0]]}, std {std[bad[0]]} (a band without valid pixels in the build?)"
            )
        std = np.where(std == 0, 1.0, std)
        mean.flags.writeable = False
        std.flags.writeable = False
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @classmethod
    def from_build(
        cls,
        build: BuildStore | str,
        units: Units = "reflectance",
        bands: Sequence[int] | None = None,
        band_by: BandBy = "index",
    ) -> Normalize:
        """The build's band statistics (`stats/mean.npy`, `stats/std.npy`: float32, one value per kept
        band, in stored int16 units), converted to `units`, for the same `bands` as the dataset."""
        store = build if isinstance(build, BuildStore) else BuildStore(str(build))
        for relative in (STATS_MEAN, STATS_STD):
            if not store.exists(relative):
                raise FileNotFoundError(
                    f"{store.uri_of(relative)} is missing: this build has no band statistics "
                    "(the write stage writes them)"
                )
        mean = np.load(io.BytesIO(store.read_bytes(STATS_MEAN)), allow_pickle=False)
        std = np.load(io.BytesIO(store.read_bytes(STATS_STD)), allow_pickle=False)
        normalize = cls(mean, std, "stored")
        if bands is not None:
            normalize = normalize.select(band_positions(_band_numbers(store), bands, band_by))
        return normalize.to_units(units)

    def to_units(self, units: Units) -> Normalize:
        """The same statistics expressed in other units (x or / 0.0001)."""
        if units == self.units:
            return self
        factor = REFLECTANCE_SCALE if units == "reflectance" else 1.0 / REFLECTANCE_SCALE
        return Normalize(self.mean * factor, self.std * factor, units)

    def select(self, positions: Sequence[int] | np.ndarray) -> Normalize:
        """The statistics of a band subset (positions on this object's band axis)."""
        index = np.asarray(positions, dtype=np.intp)
        return Normalize(self.mean[index], self.std[index], self.units)

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Normalise an array whose first axis is the band axis; float32 out."""
        values = np.asarray(values)
        if values.ndim < 1 or values.shape[0] != len(self.mean):
            raise ValueError(f"expected {len(self.mean)} bands on the first axis, got shape {values.shape}")
        if values.dtype.kind in "iu":
            if self.units != "stored":
                raise ValueError(
                    "integer input holds stored values, but these statistics are in reflectance units: "
                    "use units='stored' (or PatchDataset(dtype='float32'))"
                )
            data = values.astype(np.float64)
            data[values == NODATA] = np.nan
        else:
            data = values.astype(np.float64)
        shape = (len(self.mean),) + (1,) * (values.ndim - 1)
        return ((data - self.mean.reshape(shape)) / self.std.reshape(shape)).astype(np.float32)

    def __call__(self, item: Any) -> Any:
        if isinstance(item, PatchSample):
            if item.units != self.units:
                raise ValueError(
                    f"Normalize has statistics in {self.units!r} units but the sample holds {item.units!r} "
                    f"values; use Normalize.from_build(store, units=...) or .to_units(...) to match"
                )
            return replace(item, reflectance=self.apply(item.reflectance), units="normalized")
        return self.apply(item)


def _band_numbers(store: BuildStore) -> np.ndarray:
    import zarr

    with quiet_zarr():
        group = zarr.open_group(zarr_store(store), mode="r")
        return np.asarray(_array(group, "band")[:], dtype=np.int64)


# PyTorch ------------------------------------------------------------------------------------------


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise ImportError(
            "install torch to use the PyTorch adapter (pip install torch); PatchDataset itself needs no torch"
        ) from exc
    return torch


def sample_to_torch(sample: PatchSample) -> dict[str, Any]:
    """A sample as a dict that torch's default_collate batches: tensors for the arrays, numbers and
    strings for the metadata (`time_us`: microseconds since 1970-01-01 UTC)."""
    torch = _torch()
    return {
        "reflectance": torch.from_numpy(np.ascontiguousarray(sample.reflectance).copy()),
        # torch has little uint16 support: the bit flags are widened to int32.
        "quality": torch.from_numpy(np.asarray(sample.quality, dtype=np.int32)),
        "wavelengths": torch.from_numpy(np.array(sample.wavelengths, dtype=np.float32)),
        "patch_id": sample.patch_id,
        "location_id": sample.location_id,
        "scene_id": sample.scene_id,
        "time_us": int(sample.time.astype("datetime64[us]").astype(np.int64)),
        "epsg": sample.epsg,
        "x_ul": sample.x_ul,
        "y_ul": sample.y_ul,
        "row": sample.row,
        **(
            {}
            if sample.label is None
            else {"label": torch.from_numpy(np.asarray(sample.label, dtype=np.int64))}
        ),
    }


class TorchPatchDataset:
    """A `PatchDataset` that yields torch tensors (`sample_to_torch` dicts; a tuple of two for two-view
    datasets). Usable with `torch.utils.data.DataLoader` as a map-style dataset. Importing this module
    needs no torch; constructing this adapter does."""

    def __init__(self, dataset: PatchDataset) -> None:
        _torch()
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, k: int) -> Any:
        item = self.dataset[k]
        if isinstance(item, tuple):
            return tuple(sample_to_torch(s) for s in item)
        return sample_to_torch(item)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)


def as_torch(dataset: PatchDataset) -> TorchPatchDataset:
    """`TorchPatchDataset(dataset)`."""
    return TorchPatchDataset(dataset)
