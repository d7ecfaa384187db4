"""Reading the layers of an opened product without GDAL where that is exact and faster: where
`pipeline.enmap.raw_reader` can read a layer (`raw_source`: a plain local or fetched file, a stored ZIP
member, or a deflated member already inflated into memory, with its ENVI header) and the `CubeReader`
that reads the kept bands of a block of rows through it, or through GDAL otherwise.

A deflated cube is inflated once per open (`pipeline.enmap.product`); its bytes are then read here with
numpy views at the offsets of its ENVI header or TIFF tags, a block of rows at a time, so the only full
copy is the inflated one (GDAL reading the same bytes from /vsimem/ was slower and, through its block
cache, held a second copy of the kept bands).
"""

from __future__ import annotations

import io
import os
import posixpath
import zipfile
from typing import Any

import numpy as np
from rasterio.windows import Window

from pipeline.enmap import raw_reader
from pipeline.enmap.product_errors import ProductError
from pipeline.enmap.zip_members import BufferFile, member_data_offset
from pipeline.errors import is_transient
from pipeline.storage import gdal_path, is_remote

HEADER_BYTES = 1024 * 1024  # an ENVI header larger than this is not read here (GDAL reads the cube)


def _header_member(members: list[str], member: str) -> str | None:
    sidecars = {f"{posixpath.splitext(member)[0]}.hdr".lower(), f"{member}.hdr".lower()}
    return next((name for name in members if name.lower() in sidecars), None)


def raw_source(opened: Any, layer: str) -> tuple[raw_reader.Source, bytes | None] | None:
    """Where `raw_reader` can read a layer of an opened product: a plain local file (also a fetched
    one, or a member inflated to scratch), a fetched file in memory, a member inflated into memory, or
    a stored member of a local or fetched ZIP (a folder delivery's ZIP, or a tar.gz's unpacked ZIP),
    with its ENVI header's bytes; None otherwise (remote, or a deflated member not inflated: GDAL
    reads it)."""
    location = opened.location
    member = location.member(layer)
    in_memory = _in_memory(opened, member)
    if in_memory is not None:
        return in_memory
    path = opened.gdal_path(layer)
    if not path.startswith("/vsi"):
        return (path, None) if os.path.isfile(path) else None
    if opened.zip_bytes is not None:
        return _stored_in_memory(opened.zip_bytes, member, path == f"/vsizip/{opened.local_zip}/{member}")
    if opened.local_zip:
        zip_path = opened.local_zip
    elif location.packaging != "folder" and not is_remote(location.container_uri):
        zip_path = gdal_path(location.container_uri)
    else:
        return None
    if path != f"/vsizip/{zip_path}/{member}":
        return None  # a deflated member GDAL reads from memory
    piece = raw_reader.stored_member(zip_path, member)
    if piece is None:
        return None
    with zipfile.ZipFile(zip_path) as archive:
        return piece, _zip_header(archive, member)


def _in_memory(opened: Any, member: str) -> tuple[raw_reader.Source, bytes | None] | None:
    """A member held in memory, with its ENVI header's bytes: inflated from a deflated ZIP member
    (`OpenedProduct.inflated`), or a fetched folder file (`OpenedProduct.fetched`); None otherwise."""
    data = opened.inflated.get(member)
    if data is None:
        fetched = opened.fetched.get(member)
        data = fetched if isinstance(fetched, memoryview) else None
    if data is None:
        return None
    header_name = _header_member([name for name, _ in opened.location.members], member)
    if header_name is None:
        return data, None
    header = opened.inflated.get(header_name, opened.fetched.get(header_name))
    if isinstance(header, str):  # a fetched header that landed in scratch
        with open(header, "rb") as handle:
            header = handle.read(HEADER_BYTES + 1)
    elif header is None and opened.location.packaging != "folder":
        with opened.open_zip() as archive:  # a header left in the ZIP (its stem differs)
            return data, _zip_header(archive, member)
    return data, bytes(header) if header is not None and len(header) <= HEADER_BYTES else None


def _zip_header(archive: zipfile.ZipFile, member: str) -> bytes | None:
    """The ENVI header beside a ZIP member, when there is one of a sane size."""
    name = _header_member(archive.namelist(), member)
    if name is None or archive.getinfo(name).file_size > HEADER_BYTES:
        return None
    return archive.read(name)


def _stored_in_memory(
    zip_bytes: memoryview, member: str, read_in_place: bool
) -> tuple[raw_reader.Source, bytes | None] | None:
    """A stored member of a fetched ZIP as a view of its bytes (None when it is compressed, or GDAL
    reads an inflated copy), with its ENVI header."""
    if not read_in_place:
        return None
    handle = io.BufferedReader(BufferFile(zip_bytes))
    with zipfile.ZipFile(handle) as archive:
        info = archive.getinfo(member)
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        start = member_data_offset(handle, info)
        return zip_bytes[start : start + info.file_size], _zip_header(archive, member)


class CubeReader:
    """The kept bands of a block of rows of a multi-band layer (the cube, QL_PIXELMASK): numpy at the
    byte offsets for an uncompressed GeoTIFF or ENVI file on local disk, stored in a ZIP, or inflated
    into memory (`pipeline.enmap.raw_reader`, bit-exact against GDAL), GDAL otherwise (compressed,
    remote). `kind` says which one reads."""

    def __init__(self, opened: Any, layer: str, source: Any, kept_bands: tuple[int, ...]) -> None:
        self.source, self.kept = source, list(kept_bands)
        self.path = opened.gdal_path(layer)
        self.raw: raw_reader.Source | None = None
        self.layout = None
        try:
            found = raw_source(opened, layer)
            if found is not None:
                self.layout = raw_reader.layout_of(found[0], found[1])
                self.raw = found[0]
        except (ProductError, OSError, ValueError, zipfile.BadZipFile) as exc:
            if is_transient(exc):
                raise
            self.layout = None  # GDAL reads it, or gives the reason
        self.zero_based = [b - 1 for b in self.kept]

    @property
    def kind(self) -> str:
        """Which reader reads the layer: `raw_reader` (numpy at byte offsets) or `gdal`."""
        return "raw_reader" if self.layout is not None and self.raw is not None else "gdal"

    def read(self, window: Window) -> np.ndarray:
        if self.layout is not None and self.raw is not None and self.kept:
            rows = (int(window.row_off), int(window.row_off + window.height))
            return raw_reader.read(self.raw, layout=self.layout, bands=self.zero_based, rows=rows)
        return self.source.read(self.kept, window=window)
