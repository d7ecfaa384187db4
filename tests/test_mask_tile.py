"""mask and tile on small synthetic scenes: empty kept bands, off-lattice scenes, and the pure core."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import rasterio
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import stages, tables
from pipeline.enmap.synth import SynthConfig, generate
from pipeline.grid import GridSpec, snap_to_lattice
from pipeline.manifest import Manifest, QualityPolicy
from pipeline.mask import MASKS_TABLE, summaries_from_table
from pipeline.quality import BACKGROUND, CLOUD, NODATA
from pipeline.scheduler import Scheduler
from pipeline.storage import BuildStore
from pipeline.tile import decide_cells

REPO = Path(__file__).resolve().parent.parent
SYNC = Scheduler("synchronous", progress=False)


def build_through_tile(products: Path, build: Path, manifest: Manifest) -> BuildStore:
    store = BuildStore(str(build))
    for name in stages.through("tile"):
        stages.run_stage(name, manifest, store, SYNC, inputs=[str(products)])
    return store


@pytest.fixture
def manifest() -> Manifest:
    return Manifest.from_yaml(REPO / "manifests" / "demo.yaml")


def test_empty_kept_band_is_reported_and_drops_the_scene(tmp_path: Path, manifest: Manifest) -> None:
    # Band 10 (~470 nm) is kept by the SpectralEarth policy; here it holds no data at all.
    config = SynthConfig(
        seed=2,
        sites=1,
        revisits=1,
        overlapping_tiles=0,
        reprocessed=0,
        width=300,
        height=280,
        packagings=("folder",),
        formats=("GTiff",),
        no_data_bands=(10, 131),
        cloud_amount=0.0,
    )
    generate(tmp_path / "products", config)
    store = build_through_tile(tmp_path / "products", tmp_path / "build", manifest)
    (summary,) = summaries_from_table(store.read_table(MASKS_TABLE))
    assert summary.empty_kept_bands == (10,)
    plan = store.read_geodataframe(tables.PLAN_PATCHES)
    assert len(plan) > 0 and not plan["kept"].any()
    assert plan["reason"].str.startswith("empty kept band: band(s) 10 hold no data").all()


def _shift_rasters(folder: Path, dx: float) -> None:
    for path in folder.glob("*.TIF"):
        with rasterio.open(path, "r+") as dst:
            t = dst.transform
            dst.transform = rasterio.Affine(t.a, t.b, t.c + dx, t.d, t.e, t.f)


def test_off_lattice_scene_is_rejected_or_snapped(tmp_path: Path, manifest: Manifest) -> None:
    config = SynthConfig(
        seed=4,
        sites=1,
        revisits=2,
        overlapping_tiles=0,
        reprocessed=0,
        width=300,
        height=280,
        packagings=("folder",),
        formats=("GTiff",),
        cloud_amount=0.0,
    )
    truth = generate(tmp_path / "products", config)
    shifted = truth.products[1]
    _shift_rasters(tmp_path / "products" / shifted.path, 10.0)

    store = build_through_tile(tmp_path / "products", tmp_path / "reject", manifest)
    (row,) = store.read_table("plan/rejected.parquet").to_pylist()
    assert row["scene_id"] == shifted.scene_id and row["stage"] == "tile"
    assert row["reason"].startswith("off the grid lattice: origin x")
    plan = store.read_geodataframe(tables.PLAN_PATCHES)
    assert set(plan["scene_id"]) == {truth.products[0].scene_id}

    snapping = dataclasses.replace(manifest, grid=dataclasses.replace(manifest.grid, off_lattice="nearest"))
    store = build_through_tile(tmp_path / "products", tmp_path / "snap", snapping)
    assert store.read_table("plan/rejected.parquet").num_rows == 0
    plan = store.read_geodataframe(tables.PLAN_PATCHES)
    moved = plan[plan["scene_id"] == shifted.scene_id]
    assert len(moved) > 0
    # Snapped by -10 m (nearest lattice point), so its cells are the lattice's own.
    assert (moved["x_min"] % 3840 == 15).all()
    transform = moved["scene_transform"].iloc[0]
    assert transform[2] == shifted.transform[2]
    # The reading pass cut the snapped scene on the same cells tile keeps.
    from pipeline.cut import read_cut_index
    from pipeline.inventory import read_scenes
    from pipeline.mask import scene_key

    for record in read_scenes(store):
        cut = read_cut_index(store, record.scene_id, scene_key(record, snapping))
        kept = plan[(plan["scene_id"] == record.scene_id) & plan["kept"]]
        assert cut is not None and sorted(cut.cells) == sorted(kept["location_id"])
    assert moved["kept"].any()


def test_snap_to_lattice_moves_at_most_half_a_pixel() -> None:
    spec = GridSpec()
    assert snap_to_lattice((30, 0, 628790.0, 0, -30, 5294284.0), spec)[2:6:3] == (628785.0, 5294295.0)
    assert snap_to_lattice((30, 0, 628799.0, 0, -30, 5294265.0), spec)[2] == 628785.0
    assert snap_to_lattice((30, 0, 628801.0, 0, -30, 5294265.0), spec)[2] == 628815.0


def test_decide_cells_reasons_and_fractions() -> None:
    spec = GridSpec(patch_size=4, pixel_size=30, offset=15)
    transform = (30.0, 0.0, 15.0, 0.0, -30.0, 15.0 + 30 * 12)  # 12 x 12 px raster: 3 x 3 cells
    bits = np.zeros((12, 12), dtype=np.uint16)
    bits[0:4, 0:4] = BACKGROUND  # top-left cell wholly outside the footprint: not a candidate
    bits[0:4, 4:6] = BACKGROUND | NODATA  # top-middle touches the footprint: dropped, background first
    bits[4:8, 0:2] = CLOUD  # middle-left: half cloud
    bits[4, 4] = CLOUD  # centre: 1/16 cloud
    policy = QualityPolicy(max_fraction=(("nodata", 0.0), ("background", 0.0), ("cloud", 0.1)))
    decisions = {(d.cell.i, d.cell.j): d for d in decide_cells(bits, transform, 32632, spec, policy, ())}
    assert len(decisions) == 8
    top_middle = decisions[(1, 2)]
    assert not top_middle.kept and top_middle.reason is not None
    assert top_middle.reason.startswith("background: 50.00%")
    middle_left = decisions[(0, 1)]
    assert not middle_left.kept and middle_left.reason is not None
    assert middle_left.reason.startswith("cloud: 50.00%")
    centre = decisions[(1, 1)]
    assert centre.kept and dict(centre.fractions)["cloud"] == 1 / 16
    assert centre.disqualifying_pixels == 1


def _make_big_endian(folder: Path) -> None:
    """Rewrite a folder product's ENVI cube big-endian (same values): GDAL and the pipeline read it
    by its header's byte order."""
    (header,) = [p for p in folder.iterdir() if "-SPECTRAL_IMAGE" in p.name and p.suffix.upper() == ".HDR"]
    (data,) = [p for p in folder.iterdir() if "-SPECTRAL_IMAGE" in p.name and p.suffix.upper() != ".HDR"]
    text = header.read_text()
    assert "byte order = 0" in text
    header.write_text(text.replace("byte order = 0", "byte order = 1"))
    data.write_bytes(np.frombuffer(data.read_bytes(), dtype="<i2").astype(">i2").tobytes())


def _store_members(archive: Path) -> None:
    """Rewrite a product ZIP with every member stored (uncompressed), as some deliveries are."""
    import zipfile

    with zipfile.ZipFile(archive) as source:
        members = [(info.filename, source.read(info)) for info in source.infolist()]
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as target:
        for name, data in members:
            target.writestr(name, data)


def test_mask_cuts_every_kept_cell_once_bit_exact(tmp_path: Path, manifest: Manifest) -> None:
    """The reading pass encodes exactly the cells tile keeps, each decoding to an independent rasterio
    read of its source (big-endian ENVI, BIL, GeoTIFF, ZIP), its quality chunk to the mask, with the
    patch's exact sums; a scene with an empty kept band has nothing cut."""
    from pipeline.cut import cut_bin_path, read_cut_index
    from pipeline.inventory import read_scenes
    from pipeline.mask import read_mask, scene_key
    from pipeline.zarr_chunks import decode_chunk, quality_codec, reflectance_codec
    from tests.helpers import spectral_gdal_path

    config = SynthConfig(
        seed=6,
        sites=1,
        revisits=4,
        overlapping_tiles=0,
        reprocessed=0,
        width=300,
        height=280,
        packagings=("folder", "folder", "zip", "folder"),
        formats=("BIL", "GTiff", "BSQ", "BIP"),
        cloud_amount=0.0,
    )
    truth = generate(tmp_path / "products", config)
    big = next(p for p in truth.products if p.packaging == "folder" and p.format == "BIL")
    _make_big_endian(tmp_path / "products" / big.path)
    stored = next(p for p in truth.products if p.packaging == "zip")
    _store_members(tmp_path / "products" / stored.path)
    store = build_through_tile(tmp_path / "products", tmp_path / "build", manifest)
    plan = store.read_geodataframe(tables.PLAN_PATCHES)
    kept_plan = plan[plan["kept"]]
    assert len(kept_plan) > 0 and big.scene_id in set(kept_plan["scene_id"])
    records = read_scenes(store)
    # The folder cubes and the stored ZIP member are read with numpy at their byte offsets.
    from pipeline.enmap.cube_reader import raw_source
    from pipeline.enmap.product import open_product
    from pipeline.fetch import FileSlice

    for record in records:
        with open_product(record.location(), None, unpack=("SPECTRAL_IMAGE",)) as opened:
            found = raw_source(opened, "SPECTRAL_IMAGE")
        assert found is not None, record.packaging
        assert isinstance(found[0], FileSlice) == (record.scene_id == stored.scene_id)
        assert (found[1] is not None) == (record.scene_id == stored.scene_id)  # its ENVI header
    for record in records:
        bands = list(manifest.bands.kept_bands(record.wavelengths_nm))
        key = scene_key(record, manifest)
        cut = read_cut_index(store, record.scene_id, key)
        assert cut is not None
        mine = kept_plan[kept_plan["scene_id"] == record.scene_id]
        assert sorted(cut.cells) == sorted(mine["location_id"]), record.scene_id
        payload = store.read_bytes(cut_bin_path(record.scene_id, key))
        bits = read_mask(store, record.scene_id)
        product = truth.product(record.scene_id)
        with rasterio.open(spectral_gdal_path(tmp_path / "products", product, tmp_path)) as src:
            for row in mine.itertuples():
                col = (row.x_min - src.transform.c) / 30.0
                line = (src.transform.f - row.y_max) / 30.0
                assert col == int(col) and line == int(line)
                window = rasterio.windows.Window(int(col), int(line), 128, 128)
                source = src.read(bands, window=window)
                cell = cut.cells[row.location_id]
                start, length = cell.reflectance
                chunk = decode_chunk(reflectance_codec(manifest, len(bands)), payload[start : start + length])
                assert np.array_equal(chunk[0], source), (record.scene_id, row.location_id)
                start, length = cell.quality
                mask = decode_chunk(quality_codec(manifest), payload[start : start + length])
                assert np.array_equal(mask[0], bits[int(line) : int(line) + 128, int(col) : int(col) + 128])
                values = source.reshape(len(bands), -1).astype(np.int64)
                assert (values != -32768).all()
                assert list(cell.sums.count) == [values.shape[1]] * len(bands)
                assert list(cell.sums.total) == values.sum(axis=1).tolist()
                assert list(cell.sums.squares) == (values**2).sum(axis=1).tolist()
                assert list(cell.sums.minimum) == values.min(axis=1).tolist()
                assert list(cell.sums.maximum) == values.max(axis=1).tolist()


def test_a_scene_with_an_empty_kept_band_has_nothing_cut(tmp_path: Path, manifest: Manifest) -> None:
    from pipeline.cut import read_cut_index
    from pipeline.inventory import read_scenes
    from pipeline.mask import scene_key

    config = SynthConfig(
        seed=2,
        sites=1,
        revisits=1,
        overlapping_tiles=0,
        reprocessed=0,
        width=300,
        height=280,
        packagings=("folder",),
        formats=("GTiff",),
        no_data_bands=(10,),
        cloud_amount=0.0,
    )
    generate(tmp_path / "products", config)
    store = build_through_tile(tmp_path / "products", tmp_path / "build", manifest)
    (record,) = read_scenes(store)
    cut = read_cut_index(store, record.scene_id, scene_key(record, manifest))
    assert cut is not None and cut.cells == {} and cut.bin_bytes >= 0
    assert not store.read_geodataframe(tables.PLAN_PATCHES)["kept"].any()


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 5),
    st.integers(1, 24),
    st.integers(0, 2**32 - 1),
    st.sampled_from(["random", "extremes", "with-nodata"]),
)
def test_cut_patch_sums_equal_the_reference_sums(bands: int, size: int, seed: int, kind: str) -> None:
    """The reading pass's fast sums of a cut patch are `CellSums.of_patch`'s exactly."""
    from pipeline.cell_moments import CellSums
    from pipeline.cut import clean_patch_sums

    rng = np.random.default_rng(seed)
    patch = rng.integers(-32767, 32768, size=(bands, size, size)).astype(np.int16)
    if kind == "extremes":
        patch[:] = rng.choice(np.array([-32767, 32767], dtype=np.int16), size=patch.shape)
    elif kind == "with-nodata":
        patch[rng.integers(bands), rng.integers(size), rng.integers(size)] = -32768
    assert clean_patch_sums(patch) == CellSums.of_patch(patch)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 1400), st.sampled_from([48, 64, 128, 256, 512]), st.integers(0, 511), st.data())
def test_blocks_hold_whole_cell_rows(height: int, size: int, first: int, data: st.DataObject) -> None:
    """Every cell row is read as exactly one block (of any patch size, above or below BLOCK_ROWS), the
    blocks cover the scene's rows once, and the other blocks stay within BLOCK_ROWS."""
    from pipeline.cut import BLOCK_ROWS, block_edges

    first %= size
    rows = {first + k * size for k in range((height - first) // size)} if first < height else set()
    rows = set(data.draw(st.sets(st.sampled_from(sorted(rows)))) if rows else set())
    edges = block_edges(rows, height, size)
    assert edges[0] == 0 and edges[-1] == height and edges == sorted(set(edges))
    blocks = list(zip(edges, edges[1:]))
    for row in rows:
        assert (row, row + size) in blocks
    for start, stop in blocks:
        assert start in rows or stop - start <= BLOCK_ROWS
