"""Reading ZIP members ourselves, bounded (archives are untrusted).

A member's data offset from its local header; its bytes inflated in one call (`member_bytes`: ISA-L,
~1.5x zlib's speed), into a buffer of its size a piece at a time (`inflate_into`), or streamed
(`member_chunks`), CRC-checked, refused before a byte is read when it
declares more than the budget or a compressed size it cannot have, and never inflated past its
declared size; an archive member copied to scratch within the product's scratch budget and the free
space (`copy_member`, `write_member`); `BufferFile`, a seekable file over bytes in memory.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import struct
import zipfile
from collections.abc import Callable, Iterator
from typing import IO, Any, cast

from isal import isal_zlib

from pipeline.enmap.product_errors import ProductError, format_size, over_budget
from pipeline.enmap.scratch import ScratchBudget

COPY_CHUNK = 8 * 1024 * 1024
# `inflate_into` reads this many compressed bytes per call and inflates at most this many per call: small
# enough to stay in cache on their way into the target, large enough to cost nothing per call.
INFLATE_INPUT_BYTES = 256 * 1024
INFLATE_OUTPUT_BYTES = 4 * 1024 * 1024


# Deflate cannot expand data by more than ~0.03 % plus a few bytes per block; a member whose
# compressed size claims more than this over its uncompressed size is corrupt.
DEFLATE_SLACK = 1 / 100


# isal's stubs declare its error as an instance; it is the exception class.
INFLATE_ERROR = cast("type[Exception]", isal_zlib.error)


ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature ... file name length, extra field length


def copy_member(stream: IO[bytes], target: str, declared: int, what: str, budget: ScratchBudget) -> None:
    """Copy one archive member, refusing more bytes than its header declared or the scratch budget."""
    write_member(iter(lambda: stream.read(COPY_CHUNK), b""), target, declared, what, budget)


def write_member(
    chunks: Iterator[bytes], target: str, declared: int, what: str, budget: ScratchBudget
) -> None:
    """Write an archive member's bytes to scratch: size-checked against its header and the product's
    scratch budget (a product property: rejected), then the free space (the environment: raised)."""
    budget.reserve(declared, f"member {what}")
    free = shutil.disk_usage(os.path.dirname(target)).free
    if declared > free:
        raise OSError(
            errno.ENOSPC,
            f"No space left on the scratch disk to unpack {what} ({format_size(declared)}, "
            f"{format_size(free)} free)",
        )
    with open(target, "wb") as out:
        for chunk in bounded(chunks, declared, what):
            out.write(chunk)


def bounded(chunks: Iterator[bytes], declared: int, what: str) -> Iterator[bytes]:
    """The chunks, refusing more bytes than declared and fewer at the end."""
    written = 0
    for chunk in chunks:
        written += len(chunk)
        if written > declared:
            raise ProductError(f"archive entry {what} is larger than its declared {declared} bytes")
        yield chunk
    if written != declared:
        raise ProductError(f"archive entry {what} is truncated: {written} of {declared} bytes")


def member_data_offset(handle: IO[bytes], info: zipfile.ZipInfo) -> int:
    if info.flag_bits & 0x1:
        raise ProductError(f"archive entry {info.filename} is encrypted")
    handle.seek(info.header_offset)
    signature, name_length, extra_length = ZIP_LOCAL_HEADER.unpack(handle.read(ZIP_LOCAL_HEADER.size))
    if signature != b"PK\x03\x04":
        raise ProductError(f"corrupt ZIP entry {info.filename}: no local header at its offset")
    return info.header_offset + ZIP_LOCAL_HEADER.size + name_length + extra_length


def _check_crc(info: zipfile.ZipInfo, crc: int) -> None:
    if crc != info.CRC:
        raise ProductError(f"corrupt ZIP entry {info.filename}: CRC mismatch")


def _check_compressed_size(info: zipfile.ZipInfo) -> None:
    """Refuse a member whose compressed size cannot belong to its declared size (it would make us
    read that many bytes into memory)."""
    most = info.file_size
    if info.compress_type != zipfile.ZIP_STORED:
        most += int(info.file_size * DEFLATE_SLACK) + 4096
    if info.compress_size > most:
        raise ProductError(
            f"corrupt ZIP entry {info.filename}: {format_size(info.compress_size)} compressed for "
            f"{format_size(info.file_size)} declared"
        )


def member_bytes(handle: IO[bytes], info: zipfile.ZipInfo, memory_bytes: int, kind: str = "memory") -> bytes:
    """The uncompressed bytes of a stored or deflated ZIP member, inflated in one call (a streamed
    inflate plus growing the in-memory file cost ~0.6 s more per GB); refused before reading when it
    declares more than `memory_bytes`, never inflated past its declared size; CRC-checked."""
    if info.file_size > memory_bytes:
        raise ProductError(
            over_budget(f"member {info.filename}", "inflates to", info.file_size, memory_bytes, kind)
        )
    _check_compressed_size(info)
    handle.seek(member_data_offset(handle, info))
    raw = handle.read(info.compress_size)
    if len(raw) != info.compress_size:
        raise ProductError(f"archive entry {info.filename} is truncated in the container")
    if info.compress_type == zipfile.ZIP_DEFLATED:
        inflater = isal_zlib.decompressobj(-15)
        try:
            # One byte more than declared is enough to tell a member that lies about its size.
            data = inflater.decompress(raw, info.file_size + 1)
        except INFLATE_ERROR as exc:
            raise ProductError(f"corrupt ZIP entry {info.filename}: {exc}") from None
        del raw
    else:
        data = raw
    if len(data) != info.file_size:
        more = "more than " if len(data) > info.file_size else ""
        raise ProductError(
            f"corrupt ZIP entry {info.filename}: holds {more}{min(len(data), info.file_size)} bytes, "
            f"{info.file_size} declared"
        )
    _check_crc(info, isal_zlib.crc32(data))
    return data


def inflate_into(
    handle: IO[bytes], info: zipfile.ZipInfo, allocate: Callable[[int], memoryview], memory_bytes: int
) -> memoryview:
    """Inflate (or copy) a stored or deflated ZIP member straight into the writable buffer of its
    declared size that `allocate` returns, and return that buffer: the compressed bytes are read and
    inflated a piece at a time, so nothing but the member itself is held (`member_bytes` holds the
    compressed member beside it: +50 % at the peak for a cube). Refused before anything is allocated or
    read when it declares more than `memory_bytes`, never inflated past its declared size, CRC-checked."""
    if info.file_size > memory_bytes:
        raise ProductError(
            over_budget(f"member {info.filename}", "inflates to", info.file_size, memory_bytes, "memory")
        )
    _check_compressed_size(info)
    target = allocate(info.file_size)
    if target.nbytes != info.file_size:
        raise ValueError(f"a buffer of {target.nbytes} bytes for a member of {info.file_size}")
    handle.seek(member_data_offset(handle, info))
    inflater = isal_zlib.decompressobj(-15) if info.compress_type == zipfile.ZIP_DEFLATED else None
    out = target.cast("B")
    remaining, written, crc = info.compress_size, 0, 0

    def put(piece: bytes) -> None:
        nonlocal written, crc
        if written + len(piece) > info.file_size:
            raise ProductError(
                f"corrupt ZIP entry {info.filename}: holds more than {info.file_size} bytes, "
                f"{info.file_size} declared"
            )
        out[written : written + len(piece)] = piece
        crc = isal_zlib.crc32(piece, crc)
        written += len(piece)

    try:
        while remaining:
            raw = handle.read(min(INFLATE_INPUT_BYTES, remaining))
            if not raw:
                raise ProductError(f"archive entry {info.filename} is truncated in the container")
            remaining -= len(raw)
            if inflater is None:
                put(raw)
                continue
            while raw:
                # One byte more than is left is enough to tell a member that lies about its size.
                put(inflater.decompress(raw, min(INFLATE_OUTPUT_BYTES, info.file_size - written + 1)))
                raw = inflater.unconsumed_tail
        if inflater is not None:
            put(inflater.flush())
    except INFLATE_ERROR as exc:
        raise ProductError(f"corrupt ZIP entry {info.filename}: {exc}") from None
    if written != info.file_size:
        raise ProductError(
            f"corrupt ZIP entry {info.filename}: holds {written} bytes, {info.file_size} declared"
        )
    _check_crc(info, crc)
    return target


def member_chunks(handle: IO[bytes], info: zipfile.ZipInfo) -> Iterator[bytes]:
    """The uncompressed bytes of a stored or deflated ZIP member, streamed and CRC-checked (for members
    too large to hold in memory)."""
    _check_compressed_size(info)
    handle.seek(member_data_offset(handle, info))
    inflater = isal_zlib.decompressobj(-15) if info.compress_type == zipfile.ZIP_DEFLATED else None
    remaining, crc = info.compress_size, 0
    try:
        while remaining:
            raw = handle.read(min(COPY_CHUNK, remaining))
            if not raw:
                raise ProductError(f"archive entry {info.filename} is truncated in the container")
            remaining -= len(raw)
            if inflater is None:
                crc = isal_zlib.crc32(raw, crc)
                yield raw
                continue
            # Inflate in bounded pieces: a chunk of zeros may expand a thousandfold.
            while raw:
                out = inflater.decompress(raw, COPY_CHUNK)
                raw = inflater.unconsumed_tail
                crc = isal_zlib.crc32(out, crc)
                yield out
        if inflater:
            tail = inflater.flush()
            crc = isal_zlib.crc32(tail, crc)
            yield tail
    except INFLATE_ERROR as exc:
        raise ProductError(f"corrupt ZIP entry {info.filename}: {exc}") from None
    _check_crc(info, crc)


class BufferFile(io.RawIOBase):
    """A read-only, seekable file over bytes in memory, without copying them (io.BytesIO would copy
    anything but a bytes object, and a memoryview slice of one)."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._view, self._position = memoryview(data).cast("B"), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: len(self._view)}[whence]
        if base + offset < 0:
            raise OSError(errno.EINVAL, "negative seek position")
        self._position = base + offset
        return self._position

    def readinto(self, buffer: Any) -> int:
        out = memoryview(buffer).cast("B")
        chunk = self._view[self._position : self._position + len(out)]
        out[: len(chunk)] = chunk
        self._position += len(chunk)
        return len(chunk)
