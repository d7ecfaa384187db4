"""Issue 13 item 4, arrays as readers expect: float32 reflectance from `query().to_xarray()`,
`PatchDataset` (numpy and torch paths) and the README's xarray line, bit for bit the same values; id
arrays read by a second Zarr v3 implementation (TensorStore) through the README's recipe.

The float32 rule (documented in README "Reading the dataset"): reflectance is the float32 nearest to
stored / 10000, which for every int16 value equals `float32(float64(stored) * 1e-4)` (xarray's float64
decoding, then a cast) and `float32(stored) / float32(10000)`, but not `float32(stored) * float32(1e-4)`
(1e-4 is inexact in float32 and the product is rounded a second time). The oracle below is exact
rational arithmetic, independent of all of those.
"""

from __future__ import annotations

import re
import shutil
import sys
import types
import warnings
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorstore as ts
import xarray as xr
import zarr

from pipeline import stages, tables
from pipeline.enmap.synth import SynthConfig, generate
from pipeline.loader import NODATA, PatchDataset, as_torch, to_reflectance
from pipeline.manifest import Manifest
from pipeline.query import query
from pipeline.scheduler import Scheduler
from pipeline.storage import BuildStore
from tests.helpers import REPO, read_array, small_shards_manifest, zarr_array

pytestmark = pytest.mark.slow

ID_ARRAYS = ("patch_id", "location_id", "scene_id")
EVERY_INT16 = np.arange(-32768, 32768, dtype=np.int32).astype(np.int16)


def _nearest_float32(value: int) -> np.float32:
    """The float32 nearest to value / 10000, by exact rational arithmetic over the candidates."""
    exact = Fraction(value, 10000)
    guess = np.float32(value / 10000)
    neighbours = [np.nextafter(guess, np.float32(-np.inf)), guess, np.nextafter(guess, np.float32(np.inf))]
    return min(neighbours, key=lambda f: abs(Fraction(float(f)) - exact))


@lru_cache(maxsize=1)
def _oracle_table() -> np.ndarray:
    """The exact oracle over every int16 value (index: value + 32768), NaN for the fill."""
    table = np.array([_nearest_float32(int(v)) for v in EVERY_INT16], dtype=np.float32)
    table[NODATA + 32768] = np.nan
    return table


def _expected_float32(stored: np.ndarray) -> np.ndarray:
    """float32 reflectance of int16 values through the exact oracle."""
    return _oracle_table()[stored.astype(np.int32) + 32768]


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# Two dates of one site and a reprocessed version of one acquisition, added in a second run (a grown build).
GROWN = SynthConfig(
    seed=7,
    sites=1,
    revisits=2,
    overlapping_tiles=0,
    reprocessed=1,
    width=420,
    height=400,
    cloud_amount=0.05,
    packagings=("folder", "zip"),
    formats=("GTiff", "BSQ"),
)


def _copy_products(products: Path, chosen: list, target: Path) -> None:
    target.mkdir(exist_ok=True)
    for product in chosen:
        source = products / product.path
        if source.is_dir():
            shutil.copytree(source, target / product.path)
        else:
            shutil.copy2(source, target / product.path)


@pytest.fixture(scope="module")
def build_with_every_int16(tmp_path_factory: pytest.TempPathFactory) -> BuildStore:
    """A small grown build (two patches per shard, through catalog): built from GROWN's products but one, then
    grown with its reprocessed product, so some rows are retired (`active` 0) and their patch ids sit in two
    rows. Then its first active row is overwritten with zarr-python to hold every int16 value, the fill -32768
    included: kept patches hold no nodata, and this way each reader is checked on all 65,536 stored values.
    Not read-only."""
    products = tmp_path_factory.mktemp("products")
    truth = generate(products, GROWN)
    newer = [p for p in truth.products if p.supersedes]
    assert newer, "GROWN holds a reprocessed product"
    inputs = tmp_path_factory.mktemp("inputs")
    manifest = Manifest.from_yaml(small_shards_manifest(tmp_path_factory.mktemp("manifest")))
    store = BuildStore(str(tmp_path_factory.mktemp("build")))
    scheduler = Scheduler("synchronous", progress=False)
    for chosen in ([p for p in truth.products if not p.supersedes], newer):
        _copy_products(products, chosen, inputs)
        for name in stages.ORDER:
            stages.run_stage(name, manifest, store, scheduler, inputs=[str(inputs)])
    group = zarr.open_group(store.path(tables.DATASET), mode="r+", use_consolidated=False)
    active = read_array(group, "active")
    assert 0 < (active == 0).sum() < len(active), "the grown build retired some rows, not all"
    reflectance = zarr_array(group, "reflectance")
    reflectance[int(np.flatnonzero(active)[0])] = np.resize(EVERY_INT16, reflectance.shape[1:])
    return store


@pytest.fixture(scope="module")
def active_rows(build_with_every_int16: BuildStore) -> list[int]:
    """The rows the index lists, from index/patches.parquet, in row order."""
    index = pq.read_table(build_with_every_int16.path(tables.INDEX_PATCHES), columns=["row"])
    return sorted(int(r) for r in index.column("row").to_pylist())


@pytest.fixture(scope="module")
def stored(build_with_every_int16: BuildStore) -> np.ndarray:
    """The int16 reflectance of every row, read independently with zarr-python."""
    return np.asarray(zarr.open_array(build_with_every_int16.path("dataset.zarr/reflectance"), mode="r")[:])


def test_the_float32_rule_over_every_int16_value() -> None:
    expected = _expected_float32(EVERY_INT16)
    assert _same_bits(to_reflectance(EVERY_INT16), expected)
    valid = EVERY_INT16 != NODATA
    double_then_cast = (EVERY_INT16[valid].astype(np.float64) * 1e-4).astype(np.float32)
    divided = EVERY_INT16[valid].astype(np.float32) / np.float32(10000)
    assert _same_bits(double_then_cast, expected[valid]) and _same_bits(divided, expected[valid])
    # The tempting float32 product is not the same rule: it differs on tens of thousands of values.
    product = EVERY_INT16[valid].astype(np.float32) * np.float32(1e-4)
    assert (product != expected[valid]).sum() > 10_000


def test_query_to_xarray_gives_float32_bit_for_bit(
    build_with_every_int16: BuildStore, stored: np.ndarray, active_rows: list[int]
) -> None:
    result = query(build_with_every_int16.uri)
    ds = result.to_xarray()
    assert ds["reflectance"].dtype == np.float32
    index = build_with_every_int16.read_geodataframe(tables.INDEX_PATCHES).set_index("patch_id")
    rows = [int(index.loc[p, "row"]) for p in result.ids]
    assert sorted(rows) == active_rows
    assert _same_bits(ds["reflectance"].values, _expected_float32(stored[rows]))
    assert ds["reflectance"].attrs["units"] == "1"
    raw = result.to_xarray(mask_and_scale=False)["reflectance"].values
    assert _same_bits(raw, stored[rows])


def test_patch_dataset_gives_float32_bit_for_bit(
    build_with_every_int16: BuildStore, stored: np.ndarray, active_rows: list[int]
) -> None:
    floats = PatchDataset(build_with_every_int16)
    ints = PatchDataset(build_with_every_int16, dtype="int16")
    # only the index's rows, never the rows a grown build keeps for superseded patches
    assert floats.rows.tolist() == ints.rows.tolist() == active_rows
    for k in range(len(floats)):
        sample = floats.sample(k)
        assert sample.reflectance.dtype == np.float32 and sample.units == "reflectance"
        assert _same_bits(sample.reflectance, _expected_float32(stored[sample.row]))
        assert _same_bits(ints.sample(k).reflectance, stored[sample.row])
    every = floats.sample(0)
    assert every.row == active_rows[0]
    assert np.isnan(every.reflectance).sum() == (stored[every.row] == NODATA).sum() > 0


def test_patch_dataset_picks_the_active_row_of_a_superseded_id(
    build_with_every_int16: BuildStore, active_rows: list[int]
) -> None:
    index = pq.read_table(build_with_every_int16.path(tables.INDEX_PATCHES), columns=["row", "patch_id"])
    retired = pq.read_table(build_with_every_int16.path(tables.INDEX_RETIRED), columns=["patch_id"])
    row_of = dict(zip(index.column("patch_id").to_pylist(), index.column("row").to_pylist(), strict=True))
    superseded = [p for p in retired.column("patch_id").to_pylist() if p in row_of]
    assert superseded, "the grown build holds a patch id in an active and a retired row"
    dataset = PatchDataset(build_with_every_int16, patch_ids=superseded)
    assert dataset.rows.tolist() == [row_of[p] for p in superseded]


def test_torch_adapter_hands_torch_the_float32_array(
    build_with_every_int16: BuildStore, stored: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch is not installed here: a recording `from_numpy` stands in for torch's, which keeps the
    dtype of the array it wraps. What the adapter hands it is what is checked."""
    handed: list[np.ndarray] = []

    def from_numpy(array: np.ndarray) -> np.ndarray:
        handed.append(array)
        return array

    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(from_numpy=from_numpy))
    item = as_torch(PatchDataset(build_with_every_int16))[0]
    assert item["reflectance"] is handed[0]
    assert _same_bits(handed[0], _expected_float32(stored[item["row"]]))


def _readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(f"### {title}\n")
    end = text.find("\n## ", start + 1)
    following = text.find("\n### ", start + 1)
    return text[start : min(e for e in (end, following) if e != -1)]


def _readme_blocks(title: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", _readme_section(title), flags=re.DOTALL)


def _run_readme_block(block: str, build: BuildStore, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Run a README block as written, from a folder where `build/demo` is the test build."""
    workdir = Path(build.root).parent / "readme-cwd"
    (workdir / "build").mkdir(parents=True, exist_ok=True)
    link = workdir / "build" / "demo"
    if not link.exists():
        link.symlink_to(build.root, target_is_directory=True)
    monkeypatch.chdir(workdir)
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        exec(compile(block, "README.md", "exec"), namespace)
    return namespace


def test_readme_xarray_line_gives_float32_and_says_why(
    build_with_every_int16: BuildStore,
    stored: np.ndarray,
    active_rows: list[int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    section = _readme_section("Reading the dataset")
    assert "float64" in section and "JSON" in section
    (block,) = [b for b in _readme_blocks("Reading the dataset") if "xr.open_zarr" in b]
    namespace = _run_readme_block(block, build_with_every_int16, monkeypatch)
    ds = namespace["ds"]
    assert ds["reflectance"].dtype == np.float32
    assert _same_bits(ds["reflectance"].values, _expected_float32(stored[active_rows]))
    assert _same_bits(namespace["raw"]["reflectance"].values, stored)
    wanted = namespace["wanted"]
    assert _same_bits(namespace["patch"].values[0], _expected_float32(stored[active_rows[0]]))
    assert str(ds["patch_id"].values[0]) == wanted
    # and xarray alone (what the README warns about) decodes to float64
    plain = xr.open_zarr(build_with_every_int16.path("dataset.zarr"), consolidated=True)
    assert plain["reflectance"].dtype == np.float64


def test_tensorstore_refuses_the_string_id_arrays(build_with_every_int16: BuildStore) -> None:
    """TensorStore (0.1.86 here) knows neither zarr-python's `string` data type (vlen-utf8) nor the
    fixed-length ones; when this starts to pass without raising, the README can drop its recipe."""
    for name in ID_ARRAYS:
        path = build_with_every_int16.path(f"dataset.zarr/{name}")
        with pytest.raises(ValueError, match="string data type is not one of the supported data types"):
            ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}).result()


def test_readme_tensorstore_recipe_gives_the_zarr_ids(
    build_with_every_int16: BuildStore,
    stored: np.ndarray,
    active_rows: list[int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (block,) = [b for b in _readme_blocks("Reading the dataset") if "tensorstore" in b]
    namespace = _run_readme_block(block, build_with_every_int16, monkeypatch)
    group = zarr.open_group(build_with_every_int16.path("dataset.zarr"), mode="r", use_consolidated=False)
    zarr_ids = {name: [str(v) for v in read_array(group, name)] for name in ID_ARRAYS}
    ids: pa.Table = namespace["ids"]
    assert ids.num_rows == len(stored) and ids.column("row").to_pylist() == list(range(len(stored)))
    for name in ID_ARRAYS:
        assert ids.column(name).to_pylist() == zarr_ids[name]
    # the README's cube read by row, against zarr-python
    assert namespace["row"] in active_rows
    assert _same_bits(np.asarray(namespace["cube"]), stored[namespace["row"]])
    # the index file is what `spectralearth query` searches: the ids agree with it too
    index = pq.read_table(build_with_every_int16.path(tables.INDEX_PATCHES), columns=["row", "patch_id"])
    listed = index.to_pydict()
    assert [zarr_ids["patch_id"][row] for row in listed["row"]] == listed["patch_id"] != []
