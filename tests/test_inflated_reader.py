"""A deflated cube inside a product ZIP is inflated once into memory and read from those bytes with numpy
(`CubeReader` over `raw_reader`), block of rows by block of rows, bit-exact against GDAL reading the
deflated member through /vsizip/ (the oracle) for every ENVI interleave and byte order and for GeoTIFF
strips and tiles; a compressed GeoTIFF stays GDAL's. The inflate itself (`inflate_into`) writes straight
into one buffer of the declared size, bit for bit what zipfile reads, and refuses a member that lies."""

from __future__ import annotations

import copy
import io
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rasterio.windows import Window

from pipeline.enmap.cube_reader import CubeReader, raw_source
from pipeline.enmap.discovery import ProductLocation, zip_listing, zip_products
from pipeline.enmap.product import open_product
from pipeline.enmap.product_errors import ProductError
from pipeline.enmap.synth import SynthConfig, Truth, generate
from pipeline.enmap.zip_members import inflate_into, member_data_offset
from pipeline.manifest import Limits
from tests.test_raw_reader import ENVI_KINDS, GTIFF_KINDS, write_raster

SCENE = "ENMAP01-____L2A-DT0000002549_20230407T102210Z_001_V010303_20230430T203244Z"
LAYERS = ("SPECTRAL_IMAGE", "QL_PIXELMASK")


def _deflated_product(folder: Path, cube_file: Path) -> Path:
    """A product ZIP whose SPECTRAL_IMAGE is `cube_file` (with its ENVI header), deflated."""
    archive_path = folder / f"{SCENE}.ZIP"
    suffix = "TIF" if cube_file.suffix == ".tif" else cube_file.suffix[1:].upper()
    stem = f"{SCENE}/{SCENE}-SPECTRAL_IMAGE"
    with zipfile.ZipFile(archive_path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        archive.write(cube_file, f"{stem}.{suffix}")
        if suffix != "TIF":
            archive.write(cube_file.with_suffix(".hdr"), f"{stem}.HDR")
    return archive_path


def _opened_location(archive_path: Path) -> ProductLocation:
    with open(archive_path, "rb") as handle:
        products, rejections = zip_products(
            zip_listing(handle, archive_path.name), str(archive_path), "zip", None
        )
    assert not rejections and len(products) == 1
    return products[0]


# A drawn case: cube, kind, strip rows, big-endian TIFF, kept bands (1-based), rows per block.
InflatedCase = tuple[np.ndarray, tuple[str, str, bool], int, bool, tuple[int, ...], int]


@st.composite
def inflated_cases(draw: st.DrawFn) -> InflatedCase:
    height = draw(st.integers(1, 60).filter(lambda n: n % 16 != 0))
    width = draw(st.integers(1, 60).filter(lambda n: n % 16 != 0))
    bands = draw(st.integers(1, 6))
    dtype = draw(st.sampled_from(["int16", "uint16", "uint8"]))
    info = np.iinfo(dtype)
    seed = draw(st.integers(0, 2**32 - 1))
    cube = np.random.default_rng(seed).integers(
        info.min, info.max, size=(bands, height, width), dtype=dtype, endpoint=True
    )
    kind = draw(st.sampled_from(GTIFF_KINDS + ENVI_KINDS))
    strip_rows = draw(st.integers(1, height))
    kept = tuple(sorted(draw(st.sets(st.integers(1, bands), min_size=1))))
    block_rows = draw(st.integers(1, height))
    return cube, kind, strip_rows, draw(st.booleans()), kept, block_rows


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inflated_cases())
def test_an_inflated_cube_is_read_with_numpy_bit_exact(case: InflatedCase) -> None:
    cube, kind, strip_rows, big_tiff, kept, block_rows = case
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "src").mkdir()
        written = write_raster(folder / "src", cube, kind, strip_rows, big=big_tiff and kind[0] == "GTiff")
        archive_path = _deflated_product(folder, written)
        location = _opened_location(archive_path)
        member = location.member("SPECTRAL_IMAGE")
        with open_product(location, unpack=("SPECTRAL_IMAGE",)) as opened:
            found = raw_source(opened, "SPECTRAL_IMAGE")
            # Read from the inflated bytes themselves, with the header beside them for ENVI.
            assert found is not None and isinstance(found[0], memoryview)
            assert found[0].obj is opened.inflated[member].obj
            assert (found[1] is None) == (kind[0] == "GTiff")
            with (
                rasterio.open(opened.gdal_path("SPECTRAL_IMAGE")) as fallback,
                rasterio.open(f"/vsizip/{archive_path}/{member}") as oracle,
            ):
                reader = CubeReader(opened, "SPECTRAL_IMAGE", fallback, kept)
                assert reader.kind == "raw_reader"
                height, width = cube.shape[1:]
                for row in range(0, height, block_rows):
                    window = Window(0, row, width, min(block_rows, height - row))
                    block = reader.read(window)
                    expected = oracle.read(list(kept), window=window)
                    assert block.dtype == expected.dtype and block.dtype.isnative
                    np.testing.assert_array_equal(block, expected)
                    np.testing.assert_array_equal(
                        block, cube[[b - 1 for b in kept], row : row + window.height]
                    )


@pytest.fixture(scope="module")
def deflated_products(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Truth]:
    """Deflated product ZIPs in every format the generator writes."""
    folder = tmp_path_factory.mktemp("deflated")
    config = SynthConfig(
        seed=12,
        sites=2,
        revisits=2,
        overlapping_tiles=0,
        reprocessed=0,
        width=75,
        height=70,
        bands=9,
        packagings=("zip",),
        formats=("GTiff", "BSQ", "BIL", "BIP"),
        zip_compresslevel=1,
    )
    return folder, generate(folder, config)


def test_the_mask_stage_reads_deflated_members_with_numpy(deflated_products: tuple[Path, Truth]) -> None:
    """What the mask stage opens (`unpack` of the cube and QL_PIXELMASK) is read by the numpy reader
    from the inflated bytes, except a compressed GeoTIFF (the generator's GeoTIFF QL_PIXELMASK, DEFLATE
    inside the TIFF as in real products), which GDAL reads. Both equal GDAL through /vsizip/."""
    folder, truth = deflated_products
    formats = set()
    kept = (1, 2, 5, 9)
    for product in truth.products:
        archive_path = folder / product.path
        with zipfile.ZipFile(archive_path) as archive:
            assert {i.compress_type for i in archive.infolist() if not i.is_dir()} == {zipfile.ZIP_DEFLATED}
        location = _opened_location(archive_path)
        formats.add(product.format)
        with open_product(location, unpack=LAYERS, limits=Limits()) as opened:
            for layer in LAYERS:
                member = location.member(layer)
                assert member in opened.inflated
                with (
                    rasterio.open(opened.gdal_path(layer)) as fallback,
                    rasterio.open(f"/vsizip/{archive_path}/{member}") as oracle,
                ):
                    reader = CubeReader(opened, layer, fallback, kept)
                    compressed_tiff = product.format == "GTiff" and layer == "QL_PIXELMASK"
                    assert reader.kind == ("gdal" if compressed_tiff else "raw_reader"), (
                        product.format,
                        layer,
                    )
                    for row, stop in ((0, 33), (33, 70)):
                        window = Window(0, row, 75, stop - row)
                        np.testing.assert_array_equal(
                            reader.read(window), oracle.read(list(kept), window=window)
                        )
        assert not opened.inflated  # the inflated bytes went with the product
    assert formats == {"GTiff", "BSQ", "BIL", "BIP"}


def test_a_member_too_large_for_memory_is_read_with_numpy_from_scratch(
    deflated_products: tuple[Path, Truth],
) -> None:
    """Over `limits.memory_bytes` the member is inflated to scratch (with its header beside it) and
    read with numpy from that file."""
    folder, truth = deflated_products
    product = next(p for p in truth.products if p.format == "BIL")
    archive_path = folder / product.path
    location = _opened_location(archive_path)
    member = location.member("SPECTRAL_IMAGE")
    with open_product(location, unpack=LAYERS, limits=Limits(memory_bytes=4096, xml_bytes=4096)) as opened:
        assert member not in opened.inflated
        found = raw_source(opened, "SPECTRAL_IMAGE")
        assert found is not None and isinstance(found[0], str) and Path(found[0]).is_file()
        with (
            rasterio.open(opened.gdal_path("SPECTRAL_IMAGE")) as fallback,
            rasterio.open(f"/vsizip/{archive_path}/{member}") as oracle,
        ):
            reader = CubeReader(opened, "SPECTRAL_IMAGE", fallback, (3, 4))
            assert reader.kind == "raw_reader"
            window = Window(0, 10, 75, 50)
            np.testing.assert_array_equal(reader.read(window), oracle.read([3, 4], window=window))


def _archive(folder: Path, payload: bytes, compression: int) -> tuple[Path, zipfile.ZipInfo]:
    path = folder / "member.zip"
    with zipfile.ZipFile(path, "w", compression=compression, compresslevel=1) as archive:
        archive.writestr("pad.bin", b"\x01" * 333)  # the member does not start the archive
        archive.writestr("member.bin", payload)
    with zipfile.ZipFile(path) as archive:
        return path, archive.getinfo("member.bin")


def _inflate(path: Path, info: zipfile.ZipInfo, memory_bytes: int = 1 << 30) -> tuple[bytes, list[int]]:
    allocated: list[int] = []

    def allocate(size: int) -> memoryview:
        allocated.append(size)
        return memoryview(bytearray(size))

    with open(path, "rb") as handle:
        return bytes(inflate_into(handle, info, allocate, memory_bytes)), allocated


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(0, 2**32 - 1),
    st.integers(0, 700_000),
    st.sampled_from([zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED]),
)
def test_inflate_into_equals_zipfile(seed: int, size: int, compression: int) -> None:
    """Bit for bit what zipfile reads, for sizes across several compressed pieces and none; the buffer
    is allocated once, at the declared size."""
    rng = np.random.default_rng(seed)
    # Half noise, half runs: compressed pieces that inflate to more and less than they hold.
    payload = (rng.integers(0, 256, size // 2, dtype=np.uint8).tobytes() + bytes(size - size // 2))[:size]
    with tempfile.TemporaryDirectory() as tmp:
        path, info = _archive(Path(tmp), payload, compression)
        data, allocated = _inflate(path, info)
    assert data == payload and allocated == [size]


def test_inflate_into_a_highly_compressed_member(tmp_path: Path) -> None:
    """A member that inflates a thousandfold comes out whole (many output pieces per input piece)."""
    payload = bytes(9_000_000) + b"end"
    path, info = _archive(tmp_path, payload, zipfile.ZIP_DEFLATED)
    assert info.compress_size < 100_000
    assert _inflate(path, info)[0] == payload


def test_inflate_into_refuses_what_its_header_does_not_say(tmp_path: Path) -> None:
    payload = np.random.default_rng(3).integers(0, 40, 300_000, dtype=np.uint8).tobytes()
    path, info = _archive(tmp_path, payload, zipfile.ZIP_DEFLATED)
    # Over the memory budget: refused before anything is allocated or read.
    with pytest.raises(ProductError, match="inflates to"):
        inflate_into(io.BytesIO(b""), info, lambda size: memoryview(bytearray(size)), 299_999)
    # More bytes than declared: never written past the declared size.
    smaller = copy.copy(info)
    smaller.file_size = 250_000
    with pytest.raises(ProductError, match="holds more than 250000 bytes"):
        _inflate(path, smaller)
    larger = copy.copy(info)
    larger.file_size = 300_001
    with pytest.raises(ProductError, match="holds 300000 bytes, 300001 declared"):
        _inflate(path, larger)
    wrong_crc = copy.copy(info)
    wrong_crc.CRC ^= 1
    with pytest.raises(ProductError, match="CRC mismatch"):
        _inflate(path, wrong_crc)
    # A damaged deflate stream is the member's fault: a one-line ProductError, never a crash.
    raw = bytearray(path.read_bytes())
    with open(path, "rb") as handle:
        start = member_data_offset(handle, info)
    raw[start + 10 : start + 60] = b"\xff" * 50
    path.write_bytes(bytes(raw))
    with pytest.raises(ProductError, match="corrupt ZIP entry member.bin"):
        _inflate(path, info)
