"""Encoded chunks and assembled shards (pipeline.zarr_chunks) against zarr-python as the oracle, read
back by zarr-python and TensorStore; per-cell sums (pipeline.cell_moments) against BandMoments."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import tensorstore as ts
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from zarr.codecs import BloscCodec, BloscShuffle
from zarr.core.indexing import _morton_order

from pipeline.cell_moments import CellSums, shard_moments
from pipeline.manifest import Manifest
from pipeline.quality import NODATA_VALUE
from pipeline.stats import BandMoments
from pipeline.storage import BuildStore
from pipeline.write import DATASET, ensure_arrays, shard_key
from pipeline.zarr_chunks import (
    ABSENT,
    ChunkCodec,
    CorruptShard,
    assemble_shard,
    decode_chunk,
    encode_chunk,
    morton_order,
    quality_codec,
    reflectance_codec,
    shard_chunks,
    shard_grid,
    shard_grid_of,
)
from tests.helpers import read_array

KINDS = ("spectra", "fill", "holes", "constant", "noise")


def manifest(patch_size: int, per_shard: int, level: int = 5) -> Manifest:
    """The default manifest with a small patch and shard (the grid's own validation wants a cell over
    1 km, irrelevant to the storage layout under test)."""
    base = Manifest.from_dict(
        {"name": "chunks", "write": {"patches_per_shard": per_shard, "compression_level": level}}
    )
    return replace(base, grid=replace(base.grid, patch_size=patch_size))


def band_axis(count: int) -> list[tuple[int, float, float]]:
    return [(b + 1, 420.0 + 6.5 * b, 7.0) for b in range(count)]


def make_patch(rng: np.random.Generator, kind: str, bands: int, size: int) -> np.ndarray:
    """One (B, P, P) int16 patch: smooth spectra with noise (compressible like reflectance), all fill,
    spectra with some -32768 pixels, a constant, or white noise over the whole int16 range."""
    if kind == "fill":
        return np.full((bands, size, size), NODATA_VALUE, np.int16)
    if kind == "constant":
        return np.full((bands, size, size), int(rng.integers(-32767, 32767)), np.int16)
    if kind == "noise":
        return rng.integers(-32768, 32768, (bands, size, size)).astype(np.int16)
    curve = 1500 + 1200 * np.sin(np.linspace(0, 3, bands))[:, None, None]
    field = rng.normal(0, 300, (1, size, size)) + rng.normal(0, 25, (bands, size, size))
    patch = np.clip(np.rint(curve + field), 0, 16000).astype(np.int16)
    if kind == "holes":
        patch[rng.random(patch.shape) < 0.1] = NODATA_VALUE
    return patch


def make_quality(rng: np.random.Generator, size: int, clean: bool) -> np.ndarray:
    if clean:  # a kept patch's mask is usually all 0, the fill value
        return np.zeros((size, size), np.uint16)
    bits = rng.choice(np.array([0, 0, 0, 8, 32, 64, 256, 1024], np.uint16), (size, size))
    return bits.astype(np.uint16)


def open_arrays(store: BuildStore, write_empty: bool) -> tuple[zarr.Array, zarr.Array]:
    with zarr.config.set({"array.write_empty_chunks": write_empty}):
        group = zarr.open_group(store.path(DATASET), mode="r+", zarr_format=3, use_consolidated=False)
        reflectance, quality = group["reflectance"], group["quality"]
    assert isinstance(reflectance, zarr.Array) and isinstance(quality, zarr.Array)
    return reflectance, quality


def stored_shard(store: BuildStore, array: str, shard: int, ndim: int) -> bytes | None:
    key = shard_key(array, shard, ndim)
    return store.read_bytes(key) if store.exists(key) else None


def assembled(codec: ChunkCodec, chunks: list[bytes | None], per_shard: int) -> list[bytes | None]:
    """Every shard of an array assembled from its rows' chunks (the last one partial)."""
    return [
        assemble_shard(codec, chunks[s : s + per_shard], per_shard) for s in range(0, len(chunks), per_shard)
    ]


@st.composite
def datasets(draw: st.DrawFn) -> dict[str, Any]:
    rows = draw(st.integers(1, 11))
    return {
        "bands": draw(st.integers(1, 6)),
        "size": draw(st.sampled_from([5, 8, 16, 17])),
        "per_shard": draw(st.integers(2, 5)),
        "level": draw(st.sampled_from([1, 5])),
        "kinds": draw(st.lists(st.sampled_from(KINDS), min_size=rows, max_size=rows)),
        "clean": draw(st.lists(st.booleans(), min_size=rows, max_size=rows)),
        "written": draw(st.lists(st.booleans(), min_size=rows, max_size=rows)),
        "whole": draw(st.booleans()),
        "write_empty": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


@settings(max_examples=40, deadline=None)
@given(datasets())
def test_assembled_shards_are_the_bytes_zarr_writes(case: dict[str, Any]) -> None:
    """Rows written by zarr-python into arrays made by `ensure_arrays`, either row by row (rows not
    written stay absent) or as whole arrays (rows not chosen hold the fill value), with and without
    write_empty_chunks: every shard object, present or not, equals the assembly of encode_chunk."""
    rng = np.random.default_rng(case["seed"])
    bands, size, per_shard, rows = case["bands"], case["size"], case["per_shard"], len(case["kinds"])
    cube = np.stack([make_patch(rng, kind, bands, size) for kind in case["kinds"]])
    bits = np.stack([make_quality(rng, size, clean) for clean in case["clean"]])
    written = case["written"]
    if case["whole"]:
        for row in range(rows):
            if not written[row]:
                cube[row], bits[row] = NODATA_VALUE, 0
    m = manifest(size, per_shard, case["level"])
    with tempfile.TemporaryDirectory() as folder:
        store = BuildStore(folder)
        ensure_arrays(store, m, rows, band_axis(bands), "layout")
        reflectance, quality = open_arrays(store, case["write_empty"])
        if case["whole"]:
            reflectance[:], quality[:] = cube, bits
        else:
            for row in np.flatnonzero(written).tolist():
                reflectance[row], quality[row] = cube[row], bits[row]
        codecs = {
            "reflectance": reflectance_codec(m, bands, write_empty_chunks=case["write_empty"]),
            "quality": quality_codec(m, write_empty_chunks=case["write_empty"]),
        }
        for name, values, ndim in (("reflectance", cube, 4), ("quality", bits, 3)):
            codec = codecs[name]
            chunks = [
                encode_chunk(codec, values[row]) if case["whole"] or written[row] else None
                for row in range(rows)
            ]
            expected = assembled(codec, chunks, per_shard)
            stored = [stored_shard(store, name, s, ndim) for s in range(len(expected))]
            assert stored == expected, name
            # And the inverse: the stored shards' chunks are the encoded ones.
            for s, shard in enumerate(stored):
                mine = chunks[s * per_shard : (s + 1) * per_shard]
                assert shard_chunks(codec, shard, per_shard) == mine + [None] * (per_shard - len(mine))


def test_full_size_patches_match_zarr(tmp_path: Path) -> None:
    """The real layout once: 202 bands x 128 x 128, 3 patches per shard, 4 rows (last shard partial),
    one patch with nodata pixels, one all-fill patch, clean and flagged masks; the pipeline's setting
    (write_empty_chunks on)."""
    rng = np.random.default_rng(202)
    m = manifest(128, 3)
    kinds = ["spectra", "holes", "fill", "spectra"]
    cube = np.stack([make_patch(rng, kind, 202, 128) for kind in kinds])
    bits = np.stack([make_quality(rng, 128, clean) for clean in (True, False, True, False)])
    store = BuildStore(str(tmp_path))
    ensure_arrays(store, m, len(kinds), band_axis(202), "layout")
    reflectance, quality = open_arrays(store, write_empty=True)
    reflectance[:], quality[:] = cube, bits
    for name, codec, values, ndim in (
        ("reflectance", reflectance_codec(m, 202), cube, 4),
        ("quality", quality_codec(m), bits, 3),
    ):
        chunks = [encode_chunk(codec, v) for v in values]
        assert all(c is not None for c in chunks)  # write_empty_chunks on: even the fill patch
        stored = [stored_shard(store, name, s, ndim) for s in range(2)]
        assert stored == assembled(codec, chunks, 3)
        # The partial shard's index marks its two trailing chunks absent.
        partial, fourth = stored[1], chunks[3]
        assert partial is not None and fourth is not None
        index = np.frombuffer(partial[-4 - 16 * 3 : -4], "<u8").reshape(3, 2)
        assert index[0].tolist() == [0, len(fourth)]
        assert (index[1:] == ABSENT).all()


def write_assembled(
    store: BuildStore, m: Manifest, cube: np.ndarray, bits: np.ndarray, present: list[bool]
) -> list[np.ndarray]:
    """A dataset whose shards were never written by zarr: metadata from `ensure_arrays`, shard objects
    assembled here. Returns the values a reader must see (fill where a chunk is absent)."""
    rows, bands = cube.shape[:2]
    per_shard = m.write.patches_per_shard
    ensure_arrays(store, m, rows, band_axis(bands), "layout")
    expected = []
    for name, codec, values, ndim in (
        ("reflectance", reflectance_codec(m, bands), cube, 4),
        ("quality", quality_codec(m), bits, 3),
    ):
        chunks = [encode_chunk(codec, v) if keep else None for v, keep in zip(values, present, strict=True)]
        for s, shard in enumerate(assembled(codec, chunks, per_shard)):
            key = shard_key(name, s, ndim)
            if shard is not None:
                store.write_bytes(key, shard)
        seen = values.copy()
        seen[~np.asarray(present)] = codec.fill_value
        expected.append(seen)
    return expected


@pytest.mark.parametrize(
    "rows, per_shard, present",
    [
        (7, 3, [True, False, True, True, True, True, False]),  # absent middle and trailing chunks
        (5, 4, [True] * 5),  # last shard holds one row
        (6, 2, [False, False, True, True, True, False]),  # a shard with no chunk: no object at all
    ],
)
def test_assembled_shards_read_back_with_zarr_and_tensorstore(
    tmp_path: Path, rows: int, per_shard: int, present: list[bool]
) -> None:
    rng = np.random.default_rng(rows * 10 + per_shard)
    m = manifest(16, per_shard)
    kinds = [KINDS[i % len(KINDS)] for i in range(rows)]
    cube = np.stack([make_patch(rng, kind, 5, 16) for kind in kinds])
    bits = np.stack([make_quality(rng, 16, clean=i % 2 == 0) for i in range(rows)])
    store = BuildStore(str(tmp_path))
    want_cube, want_bits = write_assembled(store, m, cube, bits, present)
    group = zarr.open_group(store.path(DATASET), mode="r", zarr_format=3, use_consolidated=False)
    np.testing.assert_array_equal(read_array(group, "reflectance"), want_cube)
    np.testing.assert_array_equal(read_array(group, "quality"), want_bits)
    for name, want in (("reflectance", want_cube), ("quality", want_bits)):
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": store.path(f"{DATASET}/{name}")}}
        array = ts.open(spec).result()
        got = array.read().result()
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(array[rows - 1].read().result(), want[rows - 1])


def test_codec_from_manifest_is_the_arrays_codec(tmp_path: Path) -> None:
    """The manifest-built codecs equal the ones parsed from the zarr.json that ensure_arrays writes."""
    m = manifest(24, 6, level=3)
    store = BuildStore(str(tmp_path))
    ensure_arrays(store, m, 13, band_axis(7), "layout")
    for name, codec, ndim in (("reflectance", reflectance_codec(m, 7), 4), ("quality", quality_codec(m), 3)):
        metadata = json.loads(store.read_bytes(f"{DATASET}/{name}/zarr.json"))
        assert ChunkCodec.from_array_metadata(metadata) == codec
        assert shard_grid_of(metadata) == shard_grid(m, ndim) == (6,) + (1,) * (ndim - 1)
    assert reflectance_codec(m, 7).chunk_shape == (1, 7, 24, 24) and reflectance_codec(m, 7).clevel == 3


def test_other_layouts_are_refused(tmp_path: Path) -> None:
    plain = zarr.create_array(str(tmp_path / "plain"), shape=(4, 4), chunks=(2, 2), dtype="int16")
    with pytest.raises(ValueError, match="sharded"):
        ChunkCodec.from_array_metadata(plain.metadata.to_dict())
    start = zarr.create_array(
        str(tmp_path / "start"),
        shape=(4, 4),
        chunks=(1, 4),
        shards=(2, 4),
        dtype="int16",
        compressors=BloscCodec(cname="zstd", clevel=5, shuffle=BloscShuffle.bitshuffle),
    )
    metadata: dict[str, Any] = start.metadata.to_dict()
    metadata["codecs"][0]["configuration"]["index_location"] = "start"
    with pytest.raises(ValueError, match="end"):
        ChunkCodec.from_array_metadata(metadata)


@pytest.mark.parametrize("grid", [(4, 2, 2), (3, 3), (5, 1, 1, 1), (2, 3, 5), (1, 7), (6,)])
def test_morton_order_is_zarrs(grid: tuple[int, ...]) -> None:
    flat = [int(np.ravel_multi_index(tuple(c), grid)) for c in _morton_order(grid)]
    assert list(morton_order(grid)) == flat


def test_multidimensional_shard_grid_matches_zarr(tmp_path: Path) -> None:
    """Shards of 4 x 2 x 2 inner chunks, where Morton order differs from C order."""
    rng = np.random.default_rng(7)
    blosc = BloscCodec(cname="zstd", clevel=5, shuffle=BloscShuffle.bitshuffle)
    array = zarr.create_array(
        str(tmp_path / "a"), shape=(7, 6, 8), chunks=(1, 3, 4), shards=(4, 6, 8), dtype="int16",
        fill_value=NODATA_VALUE, compressors=blosc,
    )  # fmt: skip
    values = rng.integers(0, 3000, (7, 6, 8)).astype(np.int16)
    values[1, :3, :4] = NODATA_VALUE  # one all-fill inner chunk: not stored (default setting)
    array[:] = values
    codec = ChunkCodec.from_array_metadata(array.metadata.to_dict(), write_empty_chunks=False)
    grid = (4, 2, 2)
    for shard in range(2):
        chunks: list[bytes | None] = []
        for i, j, k in np.ndindex(*grid):
            row = shard * 4 + i
            block = values[row : row + 1, j * 3 : j * 3 + 3, k * 4 : k * 4 + 4]
            chunks.append(encode_chunk(codec, block) if row < 7 else None)
        assert (tmp_path / "a" / "c" / str(shard) / "0" / "0").read_bytes() == assemble_shard(
            codec, chunks, grid
        )


@pytest.mark.parametrize(
    "cname, clevel, blocksize", [("lz4", 5, 0), ("zstd", 1, 1024 * 1024), ("zstd", 3, 65536)]
)
def test_other_blosc_settings_match_zarr(
    tmp_path: Path, cname: Literal["lz4", "zstd"], clevel: int, blocksize: int
) -> None:
    """The codec choices the bench compares (another compressor, an explicit block size) are still
    byte-identical to zarr-python's shards."""
    rng = np.random.default_rng(clevel)
    blosc = BloscCodec(cname=cname, clevel=clevel, shuffle=BloscShuffle.bitshuffle, blocksize=blocksize)
    array = zarr.create_array(
        str(tmp_path / "a"), shape=(3, 40, 64, 64), chunks=(1, 40, 64, 64), shards=(2, 40, 64, 64),
        dtype="int16", fill_value=NODATA_VALUE, compressors=blosc,
    )  # fmt: skip
    values = np.stack([make_patch(rng, "spectra", 40, 64) for _ in range(3)])
    array[:] = values
    codec = ChunkCodec.from_array_metadata(array.metadata.to_dict(), write_empty_chunks=False)
    assert (codec.cname, codec.clevel, codec.blocksize) == (cname, clevel, blocksize)
    chunks = [encode_chunk(codec, v) for v in values]
    for shard in range(2):
        stored = (tmp_path / "a" / "c" / str(shard) / "0" / "0" / "0").read_bytes()
        assert stored == assemble_shard(codec, chunks[2 * shard : 2 * shard + 2], 2)


def test_encode_chunk_edges() -> None:
    m = manifest(8, 2)
    codec = reflectance_codec(m, 3)
    patch = make_patch(np.random.default_rng(1), "holes", 3, 8)
    little = encode_chunk(codec, patch)
    assert little is not None
    assert encode_chunk(codec, patch[None]) == little
    # A big-endian cube (ENVI byte order 1) encodes to the same bytes: values, not bytes, are kept.
    assert encode_chunk(codec, patch.astype(">i2")) == little
    np.testing.assert_array_equal(decode_chunk(codec, little), patch[None])
    fill = np.full((3, 8, 8), NODATA_VALUE, np.int16)
    assert encode_chunk(codec, fill) is not None
    assert encode_chunk(replace(codec, write_empty_chunks=False), fill) is None
    np.testing.assert_array_equal(decode_chunk(codec, None), fill[None])
    with pytest.raises(ValueError, match="shape"):
        encode_chunk(codec, patch[:2])
    with pytest.raises(ValueError, match="dtype"):
        encode_chunk(codec, patch.astype(np.uint16))
    with pytest.raises(ValueError, match="fit"):
        assemble_shard(codec, [little] * 3, 2)
    assert assemble_shard(codec, [None, None], 2) is None
    assert assemble_shard(codec, [], 2) is None


def test_corrupt_shards_are_reported() -> None:
    codec = quality_codec(manifest(8, 3))
    rng = np.random.default_rng(3)
    chunks = [encode_chunk(codec, make_quality(rng, 8, clean=False)) for _ in range(2)]
    shard = assemble_shard(codec, chunks, 3)
    assert shard is not None
    assert shard_chunks(codec, shard, 3) == [*chunks, None]
    assert shard_chunks(codec, None, 3) == [None, None, None]
    flipped = bytearray(shard)
    flipped[-10] ^= 1  # inside the index
    with pytest.raises(CorruptShard, match="crc32c"):
        shard_chunks(codec, bytes(flipped), 3)
    with pytest.raises(CorruptShard, match="shorter"):
        shard_chunks(codec, shard[-20:], 3)
    with pytest.raises(CorruptShard, match="outside"):
        shard_chunks(codec, shard[:5] + shard[-52:], 3)  # payload cut: the index points past it


# ------------------------------------------------------------------------------------ per-cell sums

int16_values = st.one_of(
    st.just(NODATA_VALUE), st.integers(-32767, 32767), st.sampled_from([-32767, 32767, 0])
)


def moments_equal(a: BandMoments, b: BandMoments) -> bool:
    return all(
        np.array_equal(getattr(a, f), getattr(b, f)) for f in ("count", "mean", "m2", "minimum", "maximum")
    )


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 9),
    st.integers(1, 4),
    st.integers(1, 6),
    st.integers(1, 4),
    st.integers(0, 2**32 - 1),
    st.data(),
)
def test_cell_sums_merge_to_todays_statistics(
    rows: int, bands: int, size: int, per_shard: int, seed: int, data: st.DataObject
) -> None:
    """Cells' sums merged per shard equal, bit for bit, BandMoments.of_block of the shard's active
    rows (what write records today); merged over the whole array they equal of_block of the whole
    array; and merging the shards' moments in shard order gives today's statistics."""
    rng = np.random.default_rng(seed)
    cube = rng.integers(-32768, 32768, (rows, bands, size, size)).astype(np.int16)
    # Sprinkle nodata and extremes, and make some bands or patches all nodata.
    cube[rng.random(cube.shape) < data.draw(st.sampled_from([0.0, 0.2, 0.9]))] = NODATA_VALUE
    for row in data.draw(st.lists(st.integers(0, rows - 1), max_size=2)):
        cube[row, data.draw(st.integers(0, bands - 1))] = NODATA_VALUE
    cube.flat[0] = data.draw(int16_values)
    active = data.draw(st.lists(st.booleans(), min_size=rows, max_size=rows))
    cells = [CellSums.of_patch(patch) for patch in cube]
    today = BandMoments.empty(bands)
    merged = BandMoments.empty(bands)
    for start in range(0, rows, per_shard):
        keep = [r for r in range(start, min(rows, start + per_shard)) if active[r]]
        shard_today = BandMoments.of_block(cube[keep]) if keep else BandMoments.empty(bands)
        from_cells = shard_moments([cells[r] for r in keep], bands)
        assert moments_equal(from_cells, shard_today)
        today, merged = today.merge(shard_today), merged.merge(from_cells)
    assert moments_equal(merged, today)
    assert moments_equal(shard_moments(cells, bands), BandMoments.of_block(cube))
    assert all(CellSums.from_json(json.loads(json.dumps(c.to_json()))) == c for c in cells)


def test_cell_sums_of_a_full_size_patch_are_exact() -> None:
    """Extreme values over a 202 x 128 x 128 patch: Python-integer sums, no overflow on merging."""
    patch = np.full((202, 128, 128), 32767, np.int16)
    patch[1, ::2] = -32767
    patch[2] = NODATA_VALUE
    cells = [CellSums.of_patch(patch)] * 600
    total = CellSums.empty(202)
    for cell in cells:
        total = total.merge(cell)
    assert total.squares[0] == 600 * 128 * 128 * 32767**2  # beyond int64 over a whole dataset
    assert total.count[2] == 0 and total.minimum[2] == 32767
    moments = total.to_band_moments()
    assert moments.mean[0] == 32767 and moments.m2[0] == 0
    assert moments.mean[1] == 0 and moments.minimum[2] == np.inf and moments.maximum[2] == -np.inf
    with pytest.raises(ValueError, match="int16"):
        CellSums.of_patch(patch.astype(np.int32))


def test_chunk_codec_checks_its_settings() -> None:
    codec = quality_codec(manifest(8, 2))
    for bad in (
        {"dtype": ">u2"},
        {"dtype": "<f4"},
        {"shuffle": "bytes"},
        {"chunk_shape": (1, 0, 8)},
        {"fill_value": -1},
    ):
        with pytest.raises(ValueError):
            replace(codec, **bad)
    assert codec.nbytes == 8 * 8 * 2
    assert codec.key() == quality_codec(manifest(8, 5)).key()  # not the shard size
    assert codec.key() != replace(codec, clevel=4).key() != replace(codec, write_empty_chunks=False).key()


def test_tensorstore_reads_a_zarr_written_dataset_too(tmp_path: Path) -> None:
    """Sanity check of the TensorStore oracle itself on a dataset zarr-python wrote."""
    m = manifest(8, 2)
    store = BuildStore(str(tmp_path))
    ensure_arrays(store, m, 3, band_axis(2), "layout")
    reflectance, _ = open_arrays(store, write_empty=True)
    values = make_patch(np.random.default_rng(0), "spectra", 2, 8)[None].repeat(3, axis=0)
    reflectance[:] = values
    spec = {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": str(Path(store.path(DATASET)) / "reflectance")},
    }
    np.testing.assert_array_equal(ts.open(spec).result().read().result(), values)


def test_codec_bench_runs_and_reports_every_choice(tmp_path: Path) -> None:
    """bench/codec_bench.py --quick: a table and a dict with every choice (no timing is asserted)."""
    out = tmp_path / "codecs.json"
    bench = Path(__file__).resolve().parent.parent / "bench" / "codec_bench.py"
    command = [
        sys.executable,
        str(bench),
        "--quick",
        "--repeats",
        "1",
        "--cache",
        str(tmp_path),
        "--json",
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["patch_shape"] == [202, 128, 128] and result["patches"] >= 1
    assert {"zstd-5", "zstd-1", "lz4"} <= set(result["codecs"])  # the choices issue 12 names
    for label, figures in result["codecs"].items():
        assert figures["shuffle"] == "bitshuffle" and label in done.stdout
        assert figures["encode_mb_s"] > 0 and figures["decode_mb_s"] > 0
        assert figures["ratio"] > 1  # spectra compress
        assert abs(figures["stored_mb"] * figures["ratio"] - result["raw_mb"]) < 0.05 * result["raw_mb"]
