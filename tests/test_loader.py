"""`pipeline.loader` on a real small build: items equal dataset.zarr read directly, units and nodata,
band subsets, two-view sampling, pickling to worker processes, Normalize, the torch adapter."""

from __future__ import annotations

import multiprocessing
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import zarr

from pipeline import tables
from pipeline.loader import (
    NODATA,
    Normalize,
    PatchDataset,
    PatchSample,
    TorchPatchDataset,
    as_torch,
    band_positions,
    decode_time,
    pick_two_dates,
    to_reflectance,
)
from pipeline.storage import BuildStore
from tests.helpers import read_array, zarr_array

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(demo_build: BuildStore) -> BuildStore:
    """The session's demo build (read-only: the tests that change it work on a copy)."""
    return demo_build


@pytest.fixture(scope="module")
def raw(store: BuildStore) -> zarr.Group:
    return zarr.open_group(store.path("dataset.zarr"), mode="r")


@pytest.fixture(scope="module")
def index(store: BuildStore) -> Any:
    return store.read_geodataframe(tables.INDEX_PATCHES).set_index("patch_id")


def one(item: PatchSample | tuple[PatchSample, PatchSample]) -> PatchSample:
    """An item of a single-view dataset (the loader types items as a sample or a pair)."""
    assert isinstance(item, PatchSample), "a single-view dataset yields samples"
    return item


def two(item: PatchSample | tuple[PatchSample, PatchSample]) -> tuple[PatchSample, PatchSample]:
    """An item of a two-view dataset."""
    assert isinstance(item, tuple), "a two-view dataset yields pairs"
    return item


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")


# Items against dataset.zarr -----------------------------------------------------------------------


def test_items_equal_the_zarr_arrays(store: BuildStore, raw: zarr.Group, index: Any) -> None:
    floats = PatchDataset(store)
    stored = PatchDataset(store.uri, dtype="int16")
    assert len(floats) == len(stored) == zarr_array(raw, "reflectance").shape[0] == len(index)
    wavelength = read_array(raw, "wavelength")
    for k in range(len(floats)):
        sample, int_sample = floats[k], stored[k]
        assert isinstance(sample, PatchSample) and isinstance(int_sample, PatchSample)
        cube = np.asarray(zarr_array(raw, "reflectance")[k])
        assert _same(int_sample.reflectance, cube)
        assert _same(sample.reflectance, (cube * 0.0001).astype(np.float32))
        assert sample.units == "reflectance" and int_sample.units == "stored"
        assert _same(sample.quality, np.asarray(zarr_array(raw, "quality")[k]))
        assert sample.reflectance.shape == (202, 128, 128) and sample.quality.dtype == np.uint16
        assert sample.row == k and sample.patch_id == str(zarr_array(raw, "patch_id")[k])
        meta = index.loc[sample.patch_id]
        assert (sample.location_id, sample.scene_id) == (meta["location_id"], meta["scene_id"])
        assert (sample.epsg, sample.x_ul, sample.y_ul) == (meta["epsg"], meta["x_ul"], meta["y_ul"])
        expected_time = np.datetime64(meta["start_time"].tz_convert(None).to_datetime64(), "us")
        assert sample.time == expected_time and sample.time.dtype == np.dtype("datetime64[us]")
        assert np.array_equal(sample.wavelengths, wavelength)


def test_float_reflectance_matches_xarray_decoding(store: BuildStore) -> None:
    import xarray as xr

    ds = xr.open_zarr(store.path("dataset.zarr"))
    loader = PatchDataset(store)
    for k in (0, len(loader) - 1):
        decoded = ds.reflectance.isel(patch=k).values
        np.testing.assert_allclose(one(loader[k]).reflectance, decoded, rtol=1e-6, atol=0)
        assert one(loader[k]).time == ds.time.values[k].astype("datetime64[us]")


def test_subset_in_the_order_given(store: BuildStore, raw: zarr.Group) -> None:
    ids = [str(x) for x in read_array(raw, "patch_id")]
    chosen = ids[::-2]
    ds = PatchDataset(store, patch_ids=chosen)
    assert len(ds) == len(chosen) and ds.patch_ids == chosen
    assert [one(ds[k]).patch_id for k in range(len(ds))] == chosen
    assert one(ds[-1]).patch_id == chosen[-1]
    with pytest.raises(IndexError):
        ds[len(chosen)]
    with pytest.raises(KeyError, match="not in this build"):
        PatchDataset(store, patch_ids=[*chosen, "EPSG32632-0000-0000_20230101_DT0000000001"])
    with pytest.raises(ValueError, match="duplicates"):
        PatchDataset(store, patch_ids=[chosen[0], chosen[0]])
    assert len(PatchDataset(store, patch_ids=[])) == 0


def test_band_subsets_by_index_and_by_number(store: BuildStore, raw: zarr.Group) -> None:
    numbers = read_array(raw, "band")
    full = one(PatchDataset(store, dtype="int16")[0])
    by_index = PatchDataset(store, bands=[0, 50, 201], dtype="int16")
    by_number = PatchDataset(
        store, bands=[int(numbers[0]), int(numbers[50]), int(numbers[201])], band_by="number"
    )
    assert _same(one(by_index[0]).reflectance, full.reflectance[[0, 50, 201]])
    assert _same(one(by_number[0]).reflectance, to_reflectance(full.reflectance[[0, 50, 201]]))
    assert np.array_equal(one(by_number[0]).wavelengths, full.wavelengths[[0, 50, 201]])
    assert list(by_index.band_numbers) == [numbers[0], numbers[50], numbers[201]]
    dropped = next(b for b in range(1, 225) if b not in set(numbers.tolist()))
    with pytest.raises(ValueError, match=f"band number {dropped} is not on"):
        PatchDataset(store, bands=[dropped], band_by="number")
    with pytest.raises(ValueError, match="outside"):
        PatchDataset(store, bands=[202])


def test_band_positions_pure() -> None:
    numbers = np.array([1, 2, 5, 9])
    assert band_positions(numbers, None, "index") is None
    assert list(band_positions(numbers, [3, 0], "index")) == [3, 0]
    assert list(band_positions(numbers, [9, 1], "number")) == [3, 0]
    with pytest.raises(ValueError, match="empty"):
        band_positions(numbers, [], "index")
    with pytest.raises(ValueError, match="band_by"):
        band_positions(numbers, [1], "wavelength")  # type: ignore[arg-type]


# Units and nodata ---------------------------------------------------------------------------------


def test_to_reflectance_scales_and_masks_the_fill() -> None:
    stored = np.array([[[0, 1, 10000, -32768], [32767, -1, -32768, 1234]]], dtype=np.int16)
    got = to_reflectance(stored)
    assert got.dtype == np.float32 and got.shape == stored.shape
    assert np.array_equal(np.isnan(got), stored == NODATA)
    valid = stored != NODATA
    assert np.array_equal(got[valid], (stored[valid].astype(np.float64) * 0.0001).astype(np.float32))
    assert got[0, 0, 2] == np.float32(1.0)
    every = np.arange(-32768, 32768, dtype=np.int64)
    table = to_reflectance(every.astype(np.int16))
    assert np.array_equal(table, to_reflectance(every), equal_nan=True)  # the table equals the arithmetic
    assert np.array_equal(table[1:], (every[1:] * 0.0001).astype(np.float32)) and np.isnan(table[0])
    with pytest.raises(TypeError):
        to_reflectance(stored.astype(np.float32))


def test_nodata_becomes_nan_through_the_loader(store: BuildStore, tmp_path: Path) -> None:
    copy = BuildStore(str(tmp_path / "build"))
    shutil.copytree(store.path("dataset.zarr"), copy.path("dataset.zarr"))
    array = zarr.open_array(copy.path("dataset.zarr/reflectance"), mode="r+")
    array[1, 7, 20, 30] = NODATA
    floats = one(PatchDataset(copy)[1]).reflectance
    stored = one(PatchDataset(copy, dtype="int16")[1]).reflectance
    assert np.isnan(floats[7, 20, 30]) and stored[7, 20, 30] == NODATA
    assert np.isnan(floats).sum() == 1


def test_decode_time() -> None:
    got = decode_time(np.array([0, 1_500_000]), "microseconds since 1970-01-01T00:00:00")
    assert list(got) == [
        np.datetime64("1970-01-01T00:00:00", "us"),
        np.datetime64("1970-01-01T00:00:01.5", "us"),
    ]
    assert decode_time(np.array([60]), "seconds since 2000-01-01 00:00:00")[0] == np.datetime64(
        "2000-01-01T00:01"
    )
    with pytest.raises(ValueError):
        decode_time(np.array([1]), "fortnights since 2000-01-01")


# Two views ----------------------------------------------------------------------------------------


def test_two_views_are_one_location_on_two_dates(store: BuildStore) -> None:
    locations = store.read_geodataframe("index/locations.parquet")
    multi = sorted(locations.loc[locations["n_dates"] >= 2, "location_id"])
    ds = PatchDataset(store, two_views=True, seed=3)
    assert len(ds) == len(multi) >= 2 and list(ds.group_locations) == multi
    for epoch in range(4):
        ds.set_epoch(epoch)
        for k in range(len(ds)):
            first, second = two(ds[k])
            assert first.location_id == second.location_id == multi[k]
            assert first.patch_id.split("_")[1] != second.patch_id.split("_")[1]
            assert first.time != second.time


def test_two_views_deterministic_per_seed_and_epoch(store: BuildStore) -> None:
    def pairs(seed: int, epoch: int) -> list[tuple[str, str]]:
        ds = PatchDataset(store, two_views=True, seed=seed)
        ds.set_epoch(epoch)
        return [(a.patch_id, b.patch_id) for a, b in (ds.pair(k) for k in range(len(ds)))]

    assert pairs(0, 0) == pairs(0, 0) and pairs(5, 2) == pairs(5, 2)
    # Two dates per location here, so a pair is one of two orders: over ten epochs both must occur.
    assert len({tuple(pairs(0, e)) for e in range(10)}) > 1


def test_two_views_of_a_subset_use_only_its_patches(store: BuildStore) -> None:
    all_ids = PatchDataset(store).patch_ids
    ds = PatchDataset(store, two_views=True)
    first, _ = two(ds[0])
    without = [p for p in all_ids if p != first.patch_id]
    assert len(PatchDataset(store, patch_ids=without, two_views=True)) == len(ds) - 1
    with pytest.raises(TypeError):
        ds.sample(0)
    with pytest.raises(TypeError):
        PatchDataset(store).pair(0)
    with pytest.raises(ValueError):
        ds.set_epoch(-1)


def test_pick_two_dates_pure() -> None:
    dates = np.array([20230101, 20230101, 20230301, 20230401, 20230501])
    seen = set()
    for index in range(50):
        for epoch in range(10):
            a, b = pick_two_dates(dates, seed=1, epoch=epoch, index=index)
            assert dates[a] != dates[b]
            assert (a, b) == pick_two_dates(dates, seed=1, epoch=epoch, index=index)
            seen.add((a, b))
    # Every ordered pair of positions on different dates occurs: 5 * 4 - 2 (positions 0 and 1 share one).
    assert len(seen) == 18
    per_epoch = [[pick_two_dates(dates, 1, e, i) for i in range(50)] for e in range(3)]
    assert per_epoch[0] != per_epoch[1] != per_epoch[2]
    assert per_epoch[0] != [pick_two_dates(dates, 2, 0, i) for i in range(50)]
    with pytest.raises(ValueError):
        pick_two_dates(np.array([1, 1]), 0, 0, 0)


# Pickling and worker processes --------------------------------------------------------------------


def test_pickles_without_handles_and_gives_the_same_items(store: BuildStore) -> None:
    ds = PatchDataset(store, two_views=True, seed=4, bands=[3, 4])
    ds.set_epoch(2)
    before = ds[1]  # opens the arrays in this process
    state = ds.__getstate__()
    assert state["_handles"] is None
    payload = pickle.dumps(ds)
    assert len(payload) < 20_000
    copy = pickle.loads(payload)
    assert copy._handles is None and copy.epoch == 2
    after = copy[1]
    for x, y in zip(two(before), two(after), strict=True):
        assert (
            x.patch_id == y.patch_id and _same(x.reflectance, y.reflectance) and _same(x.quality, y.quality)
        )


def _checksum(args: tuple[PatchDataset, int]) -> tuple[str, float]:
    ds, k = args
    sample = ds[k]
    assert isinstance(sample, PatchSample)
    return sample.patch_id, float(np.nansum(sample.reflectance))


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_worker_processes_read_the_same_items(store: BuildStore, method: str) -> None:
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {method} start method here")
    ds = PatchDataset(store)
    expected = [_checksum((ds, k)) for k in range(len(ds))]  # handles open in the parent first
    with multiprocessing.get_context(method).Pool(2) as pool:
        got = pool.map(_checksum, [(ds, k) for k in range(len(ds))])
    assert got == expected


# Normalize ----------------------------------------------------------------------------------------


def test_normalize_against_numpy() -> None:
    rng = np.random.default_rng(0)
    stored = rng.integers(-100, 5000, size=(3, 4, 5)).astype(np.int16)
    stored[1, 2, 3] = NODATA
    mean, std = np.array([100.0, 2000.0, 50.0]), np.array([10.0, 500.0, 0.0])
    by_stored = Normalize(mean, std, units="stored")
    expected = (
        np.where(stored == NODATA, np.nan, stored.astype(np.float64)) - mean[:, None, None]
    ) / np.array([10.0, 500.0, 1.0])[:, None, None]
    got = by_stored(stored)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected.astype(np.float32), rtol=1e-6)
    assert np.isnan(got[1, 2, 3]) and np.isnan(got).sum() == 1
    # The same statistics in reflectance units, on the float reflectance of the same values.
    by_reflectance = by_stored.to_units("reflectance")
    np.testing.assert_allclose(by_reflectance.mean, mean * 0.0001)
    np.testing.assert_allclose(by_reflectance(to_reflectance(stored)), got, rtol=1e-5, atol=1e-5)
    assert np.isnan(by_reflectance(to_reflectance(stored))[1, 2, 3])
    with pytest.raises(ValueError, match="units='stored'"):
        by_reflectance(stored)
    with pytest.raises(ValueError, match="3 bands"):
        by_stored(stored[:2])
    assert np.array_equal(by_stored.select([2, 0]).mean, mean[[2, 0]])


def test_normalize_from_the_statistics_the_write_stage_wrote(store: BuildStore) -> None:
    normalize = Normalize.from_build(store)
    assert normalize.units == "reflectance" and normalize.mean.shape == (202,)
    sample = one(PatchDataset(store, transform=normalize)[0])
    assert sample.units == "normalized" and np.isfinite(sample.reflectance).all()


def test_normalize_from_build_and_as_transform(store: BuildStore, tmp_path: Path) -> None:
    copy = BuildStore(str(tmp_path / "build"))
    shutil.copytree(store.path("dataset.zarr"), copy.path("dataset.zarr"))
    with pytest.raises(FileNotFoundError, match="stats/mean.npy"):
        Normalize.from_build(copy)
    cube = np.stack([one(PatchDataset(copy, dtype="int16")[k]).reflectance for k in range(3)]).astype(
        np.float64
    )
    mean, std = cube.mean(axis=(0, 2, 3)).astype(np.float32), cube.std(axis=(0, 2, 3)).astype(np.float32)
    for name, values in (("stats/mean.npy", mean), ("stats/std.npy", std)):
        import io

        buffer = io.BytesIO()
        np.save(buffer, values)
        copy.write_bytes(name, buffer.getvalue())
    stored = Normalize.from_build(copy, units="stored")
    assert np.array_equal(stored.mean, mean.astype(np.float64)) and stored.units == "stored"
    reflectance = Normalize.from_build(copy.uri)
    assert reflectance.units == "reflectance"
    np.testing.assert_allclose(reflectance.std, std * 0.0001)
    # As a dataset transform, on float reflectance and on stored values alike.
    numbers = PatchDataset(copy).band_numbers
    subset = Normalize.from_build(copy, bands=[int(numbers[5]), int(numbers[9])], band_by="number")
    ds = PatchDataset(copy, transform=subset, bands=[5, 9])
    sample = one(ds[0])
    assert sample.units == "normalized" and sample.reflectance.dtype == np.float32
    raw0 = one(PatchDataset(copy, dtype="int16")[0]).reflectance[[5, 9]].astype(np.float64)
    expected = (raw0 - mean[[5, 9], None, None]) / std[[5, 9], None, None]
    np.testing.assert_allclose(sample.reflectance, expected, rtol=1e-4, atol=1e-4)
    on_stored = one(PatchDataset(copy, transform=stored.select([5, 9]), bands=[5, 9], dtype="int16")[0])
    np.testing.assert_allclose(on_stored.reflectance, sample.reflectance, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="'stored' units but the sample holds 'reflectance'"):
        PatchDataset(copy, transform=stored)[0]
    with pytest.raises(ValueError, match="band position 1"):
        Normalize(np.array([1.0, 1.0]), np.array([1.0, np.nan]))


# PyTorch ------------------------------------------------------------------------------------------


def test_loader_imports_without_torch() -> None:
    code = "import sys, pipeline.loader; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_torch_adapter_explains_a_missing_torch(store: BuildStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(ImportError, match="install torch"):
        TorchPatchDataset(PatchDataset(store))
    with pytest.raises(ImportError, match="install torch"):
        as_torch(PatchDataset(store))


def test_torch_adapter_gives_tensors(store: BuildStore) -> None:
    torch = pytest.importorskip("torch")
    base = PatchDataset(store)
    ds = as_torch(base)
    assert len(ds) == len(base)
    item = ds[0]
    sample = one(base[0])
    assert isinstance(item["reflectance"], torch.Tensor) and item["reflectance"].dtype == torch.float32
    assert np.array_equal(item["reflectance"].numpy(), sample.reflectance, equal_nan=True)
    assert item["quality"].dtype == torch.int32
    assert np.array_equal(item["quality"].numpy(), sample.quality.astype(np.int32))
    assert item["patch_id"] == sample.patch_id
    assert item["time_us"] == int(sample.time.astype(np.int64))
    raw = TorchPatchDataset(PatchDataset(store, dtype="int16"))[0]
    assert raw["reflectance"].dtype == torch.int16


def test_torch_dataloader_batches_and_pairs(store: BuildStore) -> None:
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader, Dataset

    # TorchPatchDataset is a map-style dataset by duck typing (the loader needs no torch to import), so
    # torch's stubs do not see a Dataset in it.
    dataset = cast("Dataset[Any]", as_torch(PatchDataset(store)))
    batch = next(iter(DataLoader(dataset, batch_size=3, num_workers=0)))
    assert batch["reflectance"].shape == (3, 202, 128, 128) and len(batch["patch_id"]) == 3
    pairs = as_torch(PatchDataset(store, two_views=True, seed=1))
    pairs.set_epoch(1)
    # Worker processes are covered by test_worker_processes_read_the_same_items; DataLoader warns when
    # num_workers exceeds the CPUs it sees, which filterwarnings=error would turn into a failure here.
    loader: DataLoader[Any] = DataLoader(cast("Dataset[Any]", pairs), batch_size=2, num_workers=0)
    first, second = next(iter(loader))
    assert first["location_id"] == second["location_id"]
    assert all(a != b for a, b in zip(first["patch_id"], second["patch_id"], strict=True))
    assert isinstance(first["reflectance"], torch.Tensor)
