"""Read uncompressed rasters with numpy at their byte offsets: GeoTIFF (strips or tiles, chunky or planar)
and ENVI (BSQ, BIL, BIP), from a file, a byte range of a file (a stored ZIP member), or bytes in memory.

GDAL reads such files correctly but pays per block: its block cache, a copy per strip and, for ENVI BIL
and BIP, a pass over the file per band. Here the layout is worked out once from the TIFF tags (tifffile)
or the ENVI header, and the pixels are copied with a few numpy assignments (or read straight into the
output with `preadv` where the bytes already sit in the output's order). The result is (bands, rows,
cols) in native byte order, bit-exact against GDAL.

`layout_of` says whether a source can be read this way (`None`: compressed, a predictor, an unsupported
sample type, sparse blocks, ...; GDAL stays the reader for compressed COGs and JPEG2000) and raises
`ProductError` when the bytes contradict their own tags (truncated data, short strips).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from pipeline.enmap.product_errors import ProductError
from pipeline.enmap.zip_members import BufferFile, member_data_offset
from pipeline.fetch import FileSlice

Source = str | os.PathLike[str] | bytes | bytearray | memoryview | FileSlice

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# Sample types read here (GDAL returns the stored values of these unchanged).
SUPPORTED_DTYPES = frozenset(
    np.dtype(t) for t in ("int8", "uint8", "int16", "uint16", "int32", "uint32", "float32", "float64")
)
# ENVI `data type` codes (ENVI header format); complex types (6, 9) are left to GDAL.
ENVI_DTYPES = {
    1: "uint8",
    2: "int16",
    3: "int32",
    4: "float32",
    5: "float64",
    12: "uint16",
    13: "uint32",
    14: "int64",
    15: "uint64",
}
ENVI_ORDERS = ("bsq", "bil", "bip")
TIFF_NONE, TIFF_PLANAR_SEPARATE, TIFF_YCBCR = 1, 2, 6
# Pixel-interleaved rows are transposed in blocks of about this size (fits in a core's L2 cache).
TRANSPOSE_BLOCK_BYTES = 1536 * 1024


@dataclass(frozen=True, slots=True, eq=False)
class RawLayout:
    """Where the pixels of an uncompressed raster sit in its bytes.

    The raster is a grid of chunks (TIFF strips or tiles; one chunk for ENVI). Planar chunks hold one
    band each; the others hold every band in `order`: "bsq" (band, row, col), "bil" (row, band, col) or
    "bip" (row, col, band). Tiles are stored whole at the raster's edges (`padded`); strips and ENVI
    cubes hold only the rows that exist.
    """

    width: int
    height: int
    bands: int
    dtype: np.dtype  # as stored, with the file's byte order
    chunk_height: int
    chunk_width: int
    padded: bool
    planar: bool
    order: str
    offsets: np.ndarray  # int64 (planes, chunks down, chunks across): byte offset of each chunk
    source_bytes: int  # size of the source, checked against the chunks' extent

    @property
    def planes(self) -> int:
        return self.bands if self.planar else 1

    @property
    def chunk_bands(self) -> int:
        return 1 if self.planar else self.bands

    def chunk_shape(self, i: int, j: int) -> tuple[int, int]:
        """Rows and columns stored in chunk (i, j)."""
        if self.padded:
            return self.chunk_height, self.chunk_width
        return (
            min(self.chunk_height, self.height - i * self.chunk_height),
            min(self.chunk_width, self.width - j * self.chunk_width),
        )

    def chunk_bytes(self, i: int, j: int) -> int:
        rows, cols = self.chunk_shape(i, j)
        return rows * cols * self.chunk_bands * self.dtype.itemsize

    def extent(self) -> int:
        """The end of the last byte any chunk needs."""
        ends = [
            int(self.offsets[:, i, j].max()) + self.chunk_bytes(i, j)
            for i in range(self.offsets.shape[1])
            for j in range(self.offsets.shape[2])
        ]
        return max(ends)


def _source_size(source: Source) -> int:
    if isinstance(source, FileSlice):
        return source.size
    if isinstance(source, bytes | bytearray | memoryview):
        return memoryview(source).nbytes
    return os.stat(source).st_size


def _head(source: Source, n: int) -> bytes:
    if isinstance(source, FileSlice):
        with open(source.path, "rb") as handle:
            handle.seek(source.offset)
            return handle.read(min(n, source.size))
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(memoryview(source)[:n])
    with open(source, "rb") as handle:
        return handle.read(n)


def header_path(path: str | os.PathLike[str]) -> Path | None:
    """The ENVI header beside a data file, where GDAL looks for it (`X.hdr`, `X.HDR`, `X.BSQ.hdr`...)."""
    data = Path(path)
    for candidate in (
        data.with_suffix(".hdr"),
        data.with_suffix(".HDR"),
        data.with_name(data.name + ".hdr"),
        data.with_name(data.name + ".HDR"),
    ):
        if candidate.is_file():
            return candidate
    return None


def layout_of(source: Source, header: bytes | str | None = None) -> RawLayout | None:
    """The byte layout of `source`, or None when it needs GDAL (compressed, unsupported type...).

    `header` is the ENVI header's text for sources without a file beside them (bytes, ZIP members); for
    a data file on disk the header is found beside it. Raises ProductError when the tags or header
    describe more bytes than the source holds.
    """
    size = _source_size(source)
    if _head(source, 4) in TIFF_MAGIC:
        return _tiff_layout(source, size)
    if header is None and isinstance(source, str | os.PathLike) and not isinstance(source, FileSlice):
        found = header_path(source)
        if found is not None:
            header = found.read_bytes()
    if header is None:
        return None
    return _envi_layout(header, size)


def can_read_fast(source: Source, header: bytes | str | None = None) -> bool:
    """True when `read` can read `source` (an uncompressed GeoTIFF, or ENVI with its header) exactly as
    GDAL would. Anything doubtful is False: GDAL, the fallback, then reads it or gives the reason."""
    try:
        return layout_of(source, header) is not None
    except (ProductError, OSError, ValueError, tifffile.TiffFileError):
        return False


# TIFF --------------------------------------------------------------------------------------------


def _open_tiff(source: Source) -> tifffile.TiffFile:
    if isinstance(source, FileSlice):
        return tifffile.TiffFile(source.path, offset=source.offset, size=source.size)
    if isinstance(source, bytes | bytearray | memoryview):
        # Over the bytes in place: io.BytesIO would copy an inflated cube whole just to read its tags.
        return tifffile.TiffFile(io.BufferedReader(BufferFile(source)))
    return tifffile.TiffFile(os.fspath(source))


def _tiff_layout(source: Source, size: int) -> RawLayout | None:
    try:
        with _open_tiff(source) as tif:
            page = tif.pages.first
            byteorder = tif.byteorder
            return _page_layout(page, byteorder, size)
    except tifffile.TiffFileError as exc:
        raise ProductError(f"corrupt TIFF: {exc}") from None


def _page_layout(page: Any, byteorder: str, size: int) -> RawLayout | None:
    if page.compression != TIFF_NONE or page.predictor not in (0, 1):
        return None
    if page.photometric == TIFF_YCBCR or page.imagedepth != 1 or page.tiledepth != 1:
        return None
    if page.dtype is None or np.dtype(page.dtype) not in SUPPORTED_DTYPES:
        return None
    bits = page.bitspersample
    if isinstance(bits, tuple) or bits != np.dtype(page.dtype).itemsize * 8:
        return None
    width, height, bands = int(page.imagewidth), int(page.imagelength), int(page.samplesperpixel)
    dtype = np.dtype(page.dtype).newbyteorder(byteorder)
    planar = page.planarconfig == TIFF_PLANAR_SEPARATE and bands > 1
    planes = bands if planar else 1
    if page.is_tiled:
        chunk_height, chunk_width, padded = int(page.tilelength), int(page.tilewidth), True
    else:
        chunk_height, chunk_width, padded = min(int(page.rowsperstrip) or height, height), width, False
    down, across = math.ceil(height / chunk_height), math.ceil(width / chunk_width)
    offsets = np.asarray(page.dataoffsets, dtype=np.int64)
    counts = np.asarray(page.databytecounts, dtype=np.int64)
    if offsets.size != planes * down * across or counts.size != offsets.size:
        raise ProductError(
            f"corrupt TIFF: {offsets.size} strips or tiles where its size needs {planes * down * across}"
        )
    if (offsets == 0).any() or (counts == 0).any():
        return None  # sparse blocks: GDAL fills them, leave that to GDAL
    layout = RawLayout(
        width=width,
        height=height,
        bands=bands,
        dtype=dtype,
        chunk_height=chunk_height,
        chunk_width=chunk_width,
        padded=padded,
        planar=planar,
        order="bip",
        offsets=offsets.reshape(planes, down, across),
        source_bytes=size,
    )
    expected = np.array(
        [[layout.chunk_bytes(i, j) for j in range(across)] for i in range(down)], dtype=np.int64
    )
    short = counts.reshape(planes, down, across) < expected
    if short.any():
        k = int(np.flatnonzero(short)[0])
        raise ProductError(
            f"corrupt TIFF: block {k} holds {int(counts[k])} bytes, "
            f"{int(expected.reshape(-1)[k % (down * across)])} expected"
        )
    if not padded and down > 1:
        layout = _merge_strips(layout, counts.reshape(planes, down, across), expected)
    _check_extent(layout)
    return layout


def _merge_strips(layout: RawLayout, counts: np.ndarray, expected: np.ndarray) -> RawLayout:
    """Strips that follow each other in the file (as GDAL writes them) are one chunk of the whole
    height per plane: one view instead of one per strip."""
    offsets = layout.offsets[:, :, 0]
    exact = bool((counts == expected).all())
    if not exact or not bool((offsets[:, 1:] == offsets[:, :-1] + counts[:, :-1, 0]).all()):
        return layout
    return RawLayout(
        width=layout.width,
        height=layout.height,
        bands=layout.bands,
        dtype=layout.dtype,
        chunk_height=layout.height,
        chunk_width=layout.width,
        padded=False,
        planar=layout.planar,
        order=layout.order,
        offsets=offsets[:, :1].reshape(layout.planes, 1, 1).copy(),
        source_bytes=layout.source_bytes,
    )


def _check_extent(layout: RawLayout) -> None:
    extent = layout.extent()
    if extent > layout.source_bytes:
        raise ProductError(
            f"truncated raster: its data needs {extent} bytes, the file holds {layout.source_bytes}"
        )


# ENVI --------------------------------------------------------------------------------------------

_ENVI_ENTRY = re.compile(r"^\s*([^=\n]+?)\s*=\s*(\{[^}]*\}|[^\n]*)", re.MULTILINE)


def parse_envi_header(text: bytes | str) -> dict[str, str]:
    """The `key = value` entries of an ENVI header (keys lower-case; `{...}` values may span lines)."""
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    if not text.lstrip().startswith("ENVI"):
        raise ProductError("not an ENVI header (it does not start with ENVI)")
    return {m.group(1).strip().lower(): m.group(2).strip() for m in _ENVI_ENTRY.finditer(text)}


def _envi_int(entries: dict[str, str], key: str, default: int | None = None) -> int:
    value = entries.get(key)
    if value is None:
        if default is None:
            raise ProductError(f"ENVI header has no {key!r}")
        return default
    try:
        return int(value)
    except ValueError:
        raise ProductError(f"ENVI header: {key} = {value!r} is not an integer") from None


def _envi_layout(header: bytes | str, size: int) -> RawLayout | None:
    entries = parse_envi_header(header)
    if _envi_int(entries, "file compression", 0) != 0:
        return None
    code = _envi_int(entries, "data type")
    order = entries.get("interleave", "bsq").strip().lower()
    byte_order = entries.get("byte order")
    if code not in ENVI_DTYPES or order not in ENVI_ORDERS or byte_order not in ("0", "1"):
        return None  # complex data, an unknown interleave, or no byte order: GDAL decides
    width, height = _envi_int(entries, "samples"), _envi_int(entries, "lines")
    bands, offset = _envi_int(entries, "bands", 1), _envi_int(entries, "header offset", 0)
    if min(width, height, bands) < 1 or offset < 0:
        raise ProductError(f"ENVI header: bad size {width} x {height} x {bands} or offset {offset}")
    layout = RawLayout(
        width=width,
        height=height,
        bands=bands,
        dtype=np.dtype(ENVI_DTYPES[code]).newbyteorder(">" if byte_order == "1" else "<"),
        chunk_height=height,
        chunk_width=width,
        padded=False,
        planar=False,
        order=order,
        offsets=np.full((1, 1, 1), offset, dtype=np.int64),
        source_bytes=size,
    )
    _check_extent(layout)
    return layout


# Reading -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Bytes:
    """The source's bytes as a buffer numpy can view, and a file descriptor when it is a file."""

    buffer: Any
    fd: int | None
    base: int  # offset of the source's byte 0 in the file


@contextlib.contextmanager
def _opened(source: Source) -> Iterator[_Bytes]:
    """The source's bytes: memory as it is, a file (or a range of one) mapped read-only."""
    if isinstance(source, bytes | bytearray | memoryview):
        yield _Bytes(memoryview(source).cast("B"), None, 0)
        return
    if isinstance(source, FileSlice):
        path, base, size = source.path, source.offset, source.size
    else:
        path, base, size = os.fspath(source), 0, None
    with open(path, "rb") as handle:
        mapped = np.memmap(handle, dtype=np.uint8, mode="r", offset=base, shape=size)
        yield _Bytes(mapped, handle.fileno(), base)


def _runs(indices: np.ndarray) -> Iterator[tuple[int, int, int]]:
    """(output position, first band, stop band) of each run of consecutive band numbers."""
    start = 0
    for k in range(1, len(indices) + 1):
        if k == len(indices) or indices[k] != indices[k - 1] + 1:
            yield start, int(indices[start]), int(indices[k - 1]) + 1
            start = k


def _span(window: tuple[int, int] | None, size: int, what: str) -> tuple[int, int]:
    start, stop = (0, size) if window is None else (int(window[0]), int(window[1]))
    if not 0 <= start < stop <= size:
        raise ValueError(f"{what} window {window} is outside 0..{size}")
    return start, stop


def read(
    source: Source,
    *,
    header: bytes | str | None = None,
    layout: RawLayout | None = None,
    bands: Sequence[int] | None = None,
    rows: tuple[int, int] | None = None,
    cols: tuple[int, int] | None = None,
) -> np.ndarray:
    """Pixels of `source` as (bands, rows, cols) in native byte order.

    `bands` are 0-based band indices (any order, repeats allowed), `rows` and `cols` half-open windows.
    Raises ValueError when the source needs GDAL (see `can_read_fast`), ProductError when it is truncated.
    """
    if layout is None:
        layout = layout_of(source, header)
        if layout is None:
            raise ValueError("this raster is not an uncompressed GeoTIFF or ENVI file: read it with GDAL")
    if _source_size(source) < layout.extent():
        raise ProductError(f"truncated raster: its data needs {layout.extent()} bytes")
    band_index = np.arange(layout.bands) if bands is None else np.asarray(bands, dtype=np.int64).reshape(-1)
    if band_index.size == 0 or band_index.min() < 0 or band_index.max() >= layout.bands:
        raise ValueError(f"bands {list(band_index)} are outside 0..{layout.bands - 1}")
    r0, r1 = _span(rows, layout.height, "row")
    c0, c1 = _span(cols, layout.width, "column")
    out = np.empty((band_index.size, r1 - r0, c1 - c0), dtype=layout.dtype.newbyteorder("="))
    with _opened(source) as data:
        _copy(layout, data, out, band_index, (r0, r1), (c0, c1))
    return out


def _copy(
    layout: RawLayout,
    data: _Bytes,
    out: np.ndarray,
    band_index: np.ndarray,
    rows: tuple[int, int],
    cols: tuple[int, int],
) -> None:
    (r0, r1), (c0, c1) = rows, cols
    ch, cw = layout.chunk_height, layout.chunk_width
    runs = list(_runs(band_index))
    for i in range(r0 // ch, (r1 - 1) // ch + 1):
        for j in range(c0 // cw, (c1 - 1) // cw + 1):
            stored_rows, stored_cols = layout.chunk_shape(i, j)
            a, b = max(r0, i * ch) - i * ch, min(r1, i * ch + stored_rows) - i * ch
            ca, cb = max(c0, j * cw) - j * cw, min(c1, j * cw + stored_cols) - j * cw
            dest = out[:, i * ch + a - r0 : i * ch + b - r0, j * cw + ca - c0 : j * cw + cb - c0]
            if layout.planar or layout.order == "bsq":
                _copy_planes(layout, data, dest, runs, (i, j), (a, b), (ca, cb))
                continue
            offset = int(layout.offsets[0, i, j])
            if layout.order == "bil":
                view = _view(layout, data, offset, (stored_rows, layout.bands, stored_cols))
                for k, first, stop in runs:
                    dest[k : k + stop - first] = view[a:b, first:stop, ca:cb].transpose(1, 0, 2)
            else:
                view = _view(layout, data, offset, (stored_rows, stored_cols, layout.bands))
                # A few rows at a time, so each source block stays in cache while every band is taken
                # from it (one whole-cube transposing copy sweeps the source once per band: ~8x slower).
                step = max(1, TRANSPOSE_BLOCK_BYTES // (stored_cols * layout.bands * layout.dtype.itemsize))
                for row in range(a, b, step):
                    end = min(b, row + step)
                    for k, first, stop in runs:
                        dest[k : k + stop - first, row - a : end - a] = view[
                            row:end, ca:cb, first:stop
                        ].transpose(2, 0, 1)


def _view(
    layout: RawLayout,
    data: _Bytes,
    offset: int,
    shape: tuple[int, ...],
    strides: tuple[int, ...] | None = None,
) -> np.ndarray:
    """A read-only numpy view of the source's bytes (bounds-checked by numpy against the buffer)."""
    return np.ndarray(shape, dtype=layout.dtype, buffer=data.buffer, offset=offset, strides=strides)


def _copy_planes(
    layout: RawLayout,
    data: _Bytes,
    dest: np.ndarray,
    runs: list[tuple[int, int, int]],
    chunk: tuple[int, int],
    row_span: tuple[int, int],
    col_span: tuple[int, int],
) -> None:
    """Copy from a chunk whose bands are (rows, cols) planes: TIFF planar chunks, ENVI BSQ.

    From a file, each band's rows are one contiguous `preadv` (fewer page faults than a mapped view).
    From memory, the planes of a run of bands are one strided view when they are evenly spaced."""
    i, j = chunk
    (a, b), (ca, cb) = row_span, col_span
    rows, cols = layout.chunk_shape(i, j)
    isz = layout.dtype.itemsize
    if layout.planar:
        offsets = layout.offsets[:, i, j]
    else:
        offsets = int(layout.offsets[0, i, j]) + np.arange(layout.bands, dtype=np.int64) * rows * cols * isz
    for k, first, stop in runs:
        if data.fd is not None:
            for band in range(first, stop):
                start = data.base + int(offsets[band]) + a * cols * isz
                _pread_rows(data.fd, start, layout.dtype, cols, (ca, cb), dest[k + band - first])
            continue
        steps = np.diff(offsets[first:stop])
        if steps.size == 0 or (steps[0] > 0 and bool((steps == steps[0]).all())):
            step = int(steps[0]) if steps.size else rows * cols * isz
            view = _view(
                layout, data, int(offsets[first]), (stop - first, rows, cols), (step, cols * isz, isz)
            )
            dest[k : k + stop - first] = view[:, a:b, ca:cb]
            continue
        for band in range(first, stop):
            view = _view(layout, data, int(offsets[band]), (rows, cols))
            dest[k + band - first] = view[a:b, ca:cb]


def _pread_rows(
    fd: int, start: int, dtype: np.dtype, cols: int, col_span: tuple[int, int], target: np.ndarray
) -> None:
    """Rows of one band's plane, `cols` wide in the file from byte `start`, columns `col_span` of them
    into `target` (rows, columns). Full-width rows go straight into `target` when it is contiguous."""
    ca, cb = col_span
    direct = ca == 0 and cb == cols and target.flags.c_contiguous
    buffer = target if direct else np.empty((target.shape[0], cols), dtype=dtype)
    raw = buffer.data.cast("B")
    if os.preadv(fd, [raw], start) != raw.nbytes:
        raise ProductError("truncated raster: the file ended inside its data")
    if not direct:
        target[...] = buffer[:, ca:cb]
    elif not dtype.isnative:
        target.byteswap(inplace=True)


def stored_member(zip_path: str | os.PathLike[str], member: str) -> FileSlice | None:
    """Where the bytes of a stored (uncompressed) ZIP member sit in a local ZIP file, or None when the
    member is compressed (it must then be inflated first)."""
    with open(zip_path, "rb") as handle:
        try:
            with zipfile.ZipFile(handle) as archive:
                info = archive.getinfo(member)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise ProductError(f"corrupt ZIP or missing member {member}: {exc}") from None
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        return FileSlice(os.fspath(zip_path), member_data_offset(handle, info), info.file_size)
