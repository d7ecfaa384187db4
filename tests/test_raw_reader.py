"""The fast local reader against rasterio (GDAL) as the oracle: bit-exact for every TIFF organisation and
ENVI interleave and byte order, for files, bytes in memory and byte ranges of a file (a stored ZIP member),
for the whole cube, band subsets and row/column windows; and the formats it must leave to GDAL."""

from __future__ import annotations

import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from affine import Affine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rasterio.windows import Window

from pipeline.enmap import raw_reader
from pipeline.enmap.product_errors import ProductError
from pipeline.enmap.synth import Truth
from pipeline.fetch import FileSlice

GTIFF_KINDS = [
    ("GTiff", "pixel", False),
    ("GTiff", "band", False),
    ("GTiff", "pixel", True),
    ("GTiff", "band", True),
]
ENVI_KINDS = [("ENVI", order, big) for order in ("BSQ", "BIL", "BIP") for big in (False, True)]
DTYPES = ("int16", "uint8", "uint16")
# The real sample's origin: pixel corners at 15 m + k x 30 m.
TRANSFORM = Affine(30.0, 0.0, 628785.0, 0.0, -30.0, 5294265.0)
GEO = {"crs": "EPSG:32632", "transform": TRANSFORM}


def _not_multiple_of_16(n: int) -> bool:
    return n % 16 != 0


def write_raster(
    folder: Path,
    cube: np.ndarray,
    kind: tuple[str, str, bool],
    strip_rows: int,
    big: bool = False,
    bigtiff: bool = False,
    envi_offset: int = 0,
) -> Path:
    """Write `cube` (bands, rows, cols) with GDAL: GTiff (strips of `strip_rows` rows, or 16 px tiles;
    pixel or band interleaved; uncompressed; little- or big-endian; classic or BigTIFF) or ENVI
    (BSQ/BIL/BIP; big-endian when the kind says so, by swapping the data file GDAL wrote and saying so in
    its header, which GDAL honours when it reads it back; `envi_offset` bytes of junk before the data,
    declared as the header offset)."""
    driver, layout, flag = kind
    bands, height, width = cube.shape
    profile = {
        "width": width,
        "height": height,
        "count": bands,
        "dtype": cube.dtype.name,
        "crs": "EPSG:32632",
        "transform": TRANSFORM,
    }
    if driver == "GTiff":
        path = folder / "cube.tif"
        options: dict = {
            "interleave": layout,
            "compress": "none",
            "endianness": "big" if big else "little",
            "bigtiff": "yes" if bigtiff else "no",
        }
        if flag:
            options.update(tiled=True, blockxsize=16, blockysize=16)
        else:
            options.update(blockysize=strip_rows)
        with rasterio.open(path, "w", driver="GTiff", **profile, **options) as dst:
            dst.write(cube)
        return path
    path = folder / f"cube.{layout}"
    with rasterio.open(path, "w", driver="ENVI", interleave=layout, **profile) as dst:
        dst.write(cube)
    header = path.with_suffix(".hdr")
    text = header.read_text()
    assert "byte order = 0" in text and "header offset = 0" in text
    data = np.fromfile(path, dtype=cube.dtype)
    if flag:
        data = data.byteswap()
        text = text.replace("byte order = 0", "byte order = 1")
    path.write_bytes(b"\xab" * envi_offset + data.tobytes())
    header.write_text(text.replace("header offset = 0", f"header offset = {envi_offset}"))
    return path


def rasterio_read(
    path: str | Path,
    bands: Sequence[int] | None = None,
    rows: tuple[int, int] | None = None,
    cols: tuple[int, int] | None = None,
) -> np.ndarray:
    with rasterio.open(path) as src:
        window = None
        if rows or cols:
            r0, r1 = rows or (0, src.height)
            c0, c1 = cols or (0, src.width)
            window = Window(c0, r0, c1 - c0, r1 - r0)
        indexes = None if bands is None else [b + 1 for b in bands]
        return src.read(indexes, window=window)


def as_source(path: Path, kind: str, folder: Path) -> tuple[raw_reader.Source, bytes | None]:
    """The raster as a path, as bytes in memory, or as a byte range at an odd offset inside a bigger
    file (how a stored ZIP member sits in its ZIP); with the ENVI header's bytes where no file is beside."""
    header_file = raw_reader.header_path(path)
    header = header_file.read_bytes() if header_file is not None and kind != "path" else None
    if kind == "path":
        return path, None
    data = path.read_bytes()
    if kind == "bytes":
        return data, header
    container = folder / "container.bin"
    container.write_bytes(b"\x07" * 1001 + data + b"\x09" * 333)
    return FileSlice(str(container), 1001, len(data)), header


# A drawn case: cube, kind, strip rows, writer variant, band subset, rows, cols, source kind.
RasterCase = tuple[
    np.ndarray, tuple[str, str, bool], int, dict[str, Any], list[int], tuple[int, int], tuple[int, int], str
]


@st.composite
def rasters(draw: st.DrawFn) -> RasterCase:
    height = draw(st.integers(1, 70).filter(_not_multiple_of_16))
    width = draw(st.integers(1, 70).filter(_not_multiple_of_16))
    bands = draw(st.integers(1, 7))
    dtype_name = draw(st.sampled_from(DTYPES))
    dtype = np.dtype(dtype_name)
    seed = draw(st.integers(0, 2**32 - 1))
    info = np.iinfo(dtype_name)
    cube = np.random.default_rng(seed).integers(
        info.min, info.max, size=(bands, height, width), dtype=dtype, endpoint=True
    )
    kind = draw(st.sampled_from(GTIFF_KINDS + ENVI_KINDS))
    strip_rows = draw(st.integers(1, height))
    band_subset = draw(st.lists(st.integers(0, bands - 1), min_size=1, max_size=bands + 2))
    r0 = draw(st.integers(0, height - 1))
    r1 = draw(st.integers(r0 + 1, height))
    c0 = draw(st.integers(0, width - 1))
    c1 = draw(st.integers(c0 + 1, width))
    source_kind = draw(st.sampled_from(["path", "bytes", "slice"]))
    variant = {
        "big": draw(st.booleans()),
        "bigtiff": draw(st.booleans()),
        "envi_offset": draw(st.sampled_from([0, 0, 128, 1001])),
    }
    return cube, kind, strip_rows, variant, band_subset, (r0, r1), (c0, c1), source_kind


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rasters())
def test_fast_read_equals_rasterio(case: RasterCase) -> None:
    cube, kind, strip_rows, variant, band_subset, rows, cols, source_kind = case
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = write_raster(folder, cube, kind, strip_rows, **variant)
        source, header = as_source(path, source_kind, folder)
        assert raw_reader.can_read_fast(source, header)
        if kind[0] == "GTiff":
            magic = path.read_bytes()[:4]
            assert magic[:2] == (b"MM" if variant["big"] else b"II")
            assert (b"+" in magic) == variant["bigtiff"]

        whole = raw_reader.read(source, header=header)
        expected = rasterio_read(path)
        assert np.array_equal(expected, cube)  # the writer (and the big-endian swap) kept the values
        assert whole.dtype == cube.dtype and whole.dtype.isnative
        assert whole.flags.c_contiguous and whole.flags.writeable
        np.testing.assert_array_equal(whole, expected)

        subset = raw_reader.read(source, header=header, bands=band_subset)
        np.testing.assert_array_equal(subset, rasterio_read(path, bands=band_subset))

        window = raw_reader.read(source, header=header, rows=rows)
        np.testing.assert_array_equal(window, rasterio_read(path, rows=rows))

        both = raw_reader.read(source, header=header, bands=band_subset, rows=rows, cols=cols)
        np.testing.assert_array_equal(both, rasterio_read(path, bands=band_subset, rows=rows, cols=cols))


def test_a_layout_is_reused_across_reads(tmp_path: Path) -> None:
    cube = np.arange(3 * 41 * 37, dtype=np.int16).reshape(3, 41, 37)
    path = write_raster(tmp_path, cube, ("GTiff", "band", False), 5)
    layout = raw_reader.layout_of(path)
    assert layout is not None and layout.planar and (layout.width, layout.height, layout.bands) == (37, 41, 3)
    # GDAL writes the strips of each band one after another: they are one chunk per band.
    assert layout.offsets.shape == (3, 1, 1)
    np.testing.assert_array_equal(
        raw_reader.read(path, layout=layout, bands=[2], rows=(40, 41)), cube[2:, 40:]
    )


# Formats left to GDAL, and broken files ------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"compress": "deflate"},
        {"compress": "lzw", "predictor": 2},
        {"compress": "deflate", "tiled": True, "blockxsize": 16, "blockysize": 16},
    ],
)
def test_compressed_tiffs_are_left_to_gdal(tmp_path: Path, options: dict[str, Any]) -> None:
    path = tmp_path / "c.tif"
    cube = np.ones((2, 20, 21), dtype=np.int16)
    with rasterio.open(
        path, "w", driver="GTiff", width=21, height=20, count=2, dtype="int16", **GEO, **options
    ) as d:
        d.write(cube)
    assert raw_reader.layout_of(path) is None
    assert not raw_reader.can_read_fast(path)
    with pytest.raises(ValueError, match="read it with GDAL"):
        raw_reader.read(path)


def test_unsupported_sample_types_are_left_to_gdal(tmp_path: Path) -> None:
    path = tmp_path / "complex.tif"
    with rasterio.open(path, "w", driver="GTiff", width=5, height=4, count=1, dtype="complex64", **GEO) as d:
        d.write(np.ones((1, 4, 5), dtype=np.complex64))
    assert not raw_reader.can_read_fast(path)
    envi = tmp_path / "x.bsq"
    envi.write_bytes(bytes(5 * 4 * 8))
    header = b"ENVI\nsamples = 5\nlines = 4\nbands = 1\ndata type = 6\ninterleave = bsq\nbyte order = 0\n"
    assert not raw_reader.can_read_fast(envi, header)
    assert not raw_reader.can_read_fast(envi, header.replace(b"byte order = 0\n", b""))
    assert not raw_reader.can_read_fast(
        envi, header.replace(b"data type = 6", b"data type = 2") + b"file compression = 1\n"
    )
    # Without a header an ENVI data file is just bytes: nothing to say how to read them.
    assert not raw_reader.can_read_fast(envi)


def test_truncated_rasters_are_product_errors(tmp_path: Path) -> None:
    cube = np.arange(2 * 30 * 31, dtype=np.int16).reshape(2, 30, 31)
    path = write_raster(tmp_path, cube, ("GTiff", "pixel", False), 7)
    data = path.read_bytes()
    layout = raw_reader.layout_of(path)
    assert layout is not None
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: layout.extent() - 100])
    with pytest.raises(ProductError, match="truncated"):
        raw_reader.layout_of(cut)
    assert not raw_reader.can_read_fast(cut)
    with pytest.raises(ProductError, match="truncated"):
        raw_reader.read(FileSlice(str(path), 0, layout.extent() - 1), layout=layout)

    envi = write_raster(tmp_path, cube, ("ENVI", "BIL", False), 1)
    header = envi.with_suffix(".hdr").read_bytes()
    with pytest.raises(ProductError, match="truncated"):
        raw_reader.read(envi.read_bytes()[:-2], header=header)
    with pytest.raises(ProductError, match="samples"):
        raw_reader.layout_of(envi, header.replace(b"samples", b"sample"))


def test_windows_outside_the_raster_are_refused(tmp_path: Path) -> None:
    cube = np.zeros((2, 10, 11), dtype=np.uint8)
    path = write_raster(tmp_path, cube, ("GTiff", "band", True), 3)
    kwargs: dict[str, Any]
    for kwargs in ({"bands": [2]}, {"bands": [-1]}, {"rows": (5, 11)}, {"cols": (3, 3)}, {"bands": []}):
        with pytest.raises(ValueError):
            raw_reader.read(path, **kwargs)


# The generator's products, as delivered ---------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_products(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Truth]]:
    from pipeline.enmap.synth import SynthConfig, generate

    out = {}
    for packaging in ("folder", "zip"):
        folder = tmp_path_factory.mktemp(f"raw-{packaging}")
        config = SynthConfig(
            seed=5,
            sites=2,
            revisits=2,
            overlapping_tiles=0,
            reprocessed=0,
            width=70,
            height=61,
            bands=9,
            no_data_bands=(3,),
            packagings=(packaging,),
            formats=("GTiff", "BSQ", "BIL", "BIP"),
            zip_compresslevel=0,
        )
        out[packaging] = (folder, generate(folder, config))
    return out


def _layers(names: list[str], scene_id: str) -> dict[str, str]:
    from pipeline.enmap.names import parse_file_name

    layers = {}
    for name in names:
        parsed = parse_file_name(Path(name).name)
        if parsed is not None and parsed.product == scene_id and not parsed.is_sidecar:
            layers[parsed.layer] = name
    return layers


def test_synthetic_folder_products_every_format(synthetic_products: dict[str, tuple[Path, Truth]]) -> None:
    folder, truth = synthetic_products["folder"]
    formats = set()
    for product in truth.products:
        directory = folder / product.path
        layers = _layers([p.name for p in directory.iterdir()], product.scene_id)
        formats.add(product.format)
        for layer in ("SPECTRAL_IMAGE", "QL_QUALITY_CLASSES", "QL_QUALITY_CLOUD", "QL_VNIR"):
            path = directory / layers[layer]
            assert raw_reader.can_read_fast(path), (product.format, layer)
            expected = rasterio_read(path)
            np.testing.assert_array_equal(raw_reader.read(path), expected)
            np.testing.assert_array_equal(
                raw_reader.read(path, bands=[0], rows=(11, 60)), expected[:1, 11:60]
            )
        # In GeoTIFF products the defective-pixel mask is DEFLATE-compressed, as in real ones: GDAL reads it.
        pixel_mask = directory / layers["QL_PIXELMASK"]
        assert raw_reader.can_read_fast(pixel_mask) == (product.format != "GTiff")
    assert formats == {"GTiff", "BSQ", "BIL", "BIP"}


def test_synthetic_zip_products_read_from_stored_members(
    synthetic_products: dict[str, tuple[Path, Truth]],
) -> None:
    folder, truth = synthetic_products["zip"]
    formats = set()
    for product in truth.products:
        archive_path = folder / product.path
        with zipfile.ZipFile(archive_path) as archive:
            names = archive.namelist()
            layers = _layers(names, product.scene_id)
            member = layers["SPECTRAL_IMAGE"]
            header = None
            if not member.upper().endswith(".TIF"):
                header = archive.read(str(Path(member).with_suffix(".HDR")))
        formats.add(product.format)
        piece = raw_reader.stored_member(archive_path, member)
        assert piece is not None and piece.offset > 0
        expected = rasterio_read(f"/vsizip/{archive_path}/{member}")
        assert expected.shape == (9, 61, 70)
        np.testing.assert_array_equal(raw_reader.read(piece, header=header), expected)
        kept = [0, 1, 4, 5, 8]
        np.testing.assert_array_equal(
            raw_reader.read(piece, header=header, bands=kept, rows=(7, 49)), expected[kept, 7:49]
        )
        # The same member's bytes in memory (as fetched from object storage) read the same.
        with open(archive_path, "rb") as handle:
            handle.seek(piece.offset)
            in_memory = handle.read(piece.size)
        np.testing.assert_array_equal(raw_reader.read(in_memory, header=header), expected)
    assert formats == {"GTiff", "BSQ", "BIL", "BIP"}


def test_deflated_members_are_not_served_as_stored(tmp_path: Path) -> None:
    archive_path = tmp_path / "x.zip"
    with zipfile.ZipFile(archive_path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a.bin", bytes(1000))
    assert raw_reader.stored_member(archive_path, "a.bin") is None
    with pytest.raises(ProductError, match="missing member"):
        raw_reader.stored_member(archive_path, "b.bin")
