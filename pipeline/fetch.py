"""Few, large requests on object storage.

Reading a product through GDAL's `/vsis3/` (or `/vsizip//vsis3/`) costs one request per strip, block or
ZIP seek: hundreds to thousands of GETs per product, each paying the store's latency (and its bill). Here
an object, or a byte range of one (a ZIP member), is fetched in a handful of ranged GETs of at least
8 MiB, several in flight, each retried when the fault is the environment's (`pipeline.errors.is_transient`)
and checked to hold exactly the bytes asked for. Bytes land in memory, or, past a memory budget, in a
file in scratch, written part by part so memory stays bounded by `concurrency x part_bytes`.

`fetch_product_files` reads a set of pieces (every member of a ZIP, every file of a folder product) by
first merging neighbouring pieces of one object (gaps up to `max_gap` are fetched and dropped): the
members of a ZIP cost the same few GETs as the whole ZIP.

The source is an fsspec file system (s3fs: its `cat_file` with `start`/`end`) or a boto3/botocore S3
client (`get_object` with `Range`); both are safe to call from several threads.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import posixpath
import tempfile
import time
import uuid
import zipfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
from rasterio.io import MemoryFile

from pipeline.enmap.product_errors import ProductError
from pipeline.enmap.scratch import ScratchBudget
from pipeline.enmap.zip_members import ZIP_LOCAL_HEADER
from pipeline.errors import BuildFault, TransientError, is_transient, one_line
from pipeline.manifest import Manifest

MiB = 1024 * 1024
MIN_PART_BYTES = 8 * MiB  # below this, per-request latency dominates on object storage
DEFAULT_PART_BYTES = 16 * MiB
DEFAULT_CONCURRENCY = 4
DEFAULT_RETRIES = 4
DEFAULT_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 8.0
# The end of a ZIP read to list it: an EnMAP product ZIP's central directory (~30 members) is a few KB.
DEFAULT_ZIP_TAIL_BYTES = 1 * MiB
# Pieces of one object closer than this are fetched in one range (the gap is read and dropped): one more
# request costs more than reading 1 MiB.
DEFAULT_MAX_GAP = 1 * MiB


@dataclass(frozen=True, slots=True)
class FileSlice:
    """A byte range of a local file: a stored ZIP member, or fetched bytes that landed in scratch."""

    path: str
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class Piece:
    """`length` bytes of object `uri` from byte `start`."""

    uri: str
    start: int
    length: int


@dataclass(frozen=True, slots=True)
class FetchSettings:
    part_bytes: int = DEFAULT_PART_BYTES
    concurrency: int = DEFAULT_CONCURRENCY
    retries: int = DEFAULT_RETRIES
    backoff_seconds: float = DEFAULT_BACKOFF_SECONDS

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.retries < 0 or self.backoff_seconds < 0:
            raise ValueError(f"bad fetch settings: {self}")

    @property
    def part(self) -> int:
        return max(self.part_bytes, MIN_PART_BYTES)


class SizeMismatch(BuildFault):
    """The store answered with other bytes than the size expected: the object is not what was listed
    (replaced or truncated since). Not a network fault (not retried), and no property of the product as
    inventory found it either (never a rejection, in mask least of all): the product changed under the
    build, so the stage fails, naming inventory to rerun; it lists the object again and sees its new
    fingerprint."""


def split_range(start: int, length: int, part_bytes: int) -> list[tuple[int, int]]:
    """[start, start + length) as (start, end) parts of at most `part_bytes`, as equal as possible (no
    small trailing part)."""
    if length <= 0:
        return []
    count = math.ceil(length / part_bytes)
    edges = [start + (length * k) // count for k in range(count + 1)]
    return list(zip(edges, edges[1:], strict=False))


def merge_pieces(pieces: Iterable[Piece], max_gap: int = DEFAULT_MAX_GAP) -> list[Piece]:
    """The ranges to fetch for `pieces`: per object, pieces that overlap or lie within `max_gap` of each
    other become one range; empty pieces are left out."""
    by_uri: dict[str, list[Piece]] = defaultdict(list)
    for piece in pieces:
        if piece.start < 0 or piece.length < 0:
            raise ValueError(f"bad piece {piece}")
        if piece.length:  # an empty piece needs no bytes
            by_uri[piece.uri].append(piece)
    merged: list[Piece] = []
    for uri in sorted(by_uri):
        ranges = sorted((p.start, p.start + p.length) for p in by_uri[uri])
        start, end = ranges[0]
        for s, e in ranges[1:]:
            if s <= end + max_gap:
                end = max(end, e)
            else:
                merged.append(Piece(uri, start, end - start))
                start, end = s, e
        merged.append(Piece(uri, start, end - start))
    return merged


# Talking to the store ------------------------------------------------------------------------------


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def range_reader(source: Any) -> Callable[[str, int, int], bytes]:
    """A function (uri, start, end) -> bytes of [start, end) for an fsspec file system or an S3 client."""
    if hasattr(source, "get_object"):

        def read_client(uri: str, start: int, end: int) -> bytes:
            bucket, key = _split_s3(uri)
            response = source.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}")
            with contextlib.closing(response["Body"]) as body:
                return body.read()

        return read_client

    def read_fs(uri: str, start: int, end: int) -> bytes:
        return source.cat_file(uri, start=start, end=end)

    return read_fs


def object_size(source: Any, uri: str) -> int:
    """The size of an object (one HEAD request)."""
    if hasattr(source, "head_object"):
        bucket, key = _split_s3(uri)
        return int(source.head_object(Bucket=bucket, Key=key)["ContentLength"])
    return int(source.info(uri)["size"])


def get_part(
    read: Callable[[str, int, int], bytes], uri: str, start: int, end: int, settings: FetchSettings
) -> bytes:
    """Bytes [start, end) of `uri`, retrying transient faults with exponential backoff; a persistent one
    raises TransientError, and a short or unsatisfiable answer SizeMismatch."""
    for attempt in range(settings.retries + 1):
        try:
            data = read(uri, start, end)
        except Exception as exc:
            text = str(exc)
            if "InvalidRange" in text or "not satisfiable" in text:
                raise SizeMismatch(
                    f"{uri} holds fewer than the {end} bytes expected ({one_line(exc)}): "
                    "it changed since inventory listed it, rerun inventory (or run)"
                ) from exc
            if not is_transient(exc):
                raise
            if attempt == settings.retries:
                raise TransientError(
                    f"reading {uri} bytes {start}-{end - 1} failed {attempt + 1} times: {one_line(exc)}"
                ) from exc
            time.sleep(min(settings.backoff_seconds * 2**attempt, MAX_BACKOFF_SECONDS))
            continue
        if len(data) != end - start:
            raise SizeMismatch(
                f"{uri}: bytes {start}-{end - 1} came back as {len(data)} bytes, not {end - start}: "
                "it changed since inventory listed it, rerun inventory (or run)"
            )
        return data
    raise AssertionError("unreachable")


def run_parallel(jobs: list[Callable[[], None]], concurrency: int) -> None:
    """Run `jobs` with at most `concurrency` at once; the first failure cancels what has not started
    and is raised once the running ones are done."""
    if len(jobs) <= 1 or concurrency == 1:
        for job in jobs:
            job()
        return
    with ThreadPoolExecutor(max_workers=min(concurrency, len(jobs)), thread_name_prefix="fetch") as pool:
        futures: list[Future[None]] = [pool.submit(job) for job in jobs]
        _, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for future in pending:
            future.cancel()
        failed = [f for f in futures if f.done() and not f.cancelled() and f.exception() is not None]
    if failed:
        raise failed[0].exception()  # type: ignore[misc]


# Public functions ------------------------------------------------------------------------------------


def fetch_ranges(
    source: Any,
    uri: str,
    size: int | None = None,
    *,
    start: int = 0,
    settings: FetchSettings | None = None,
) -> bytearray:
    """`size` bytes of `uri` from byte `start` (the rest of the object when `size` is None: one HEAD
    more), in ranged GETs of `settings.part_bytes` (at least 8 MiB), `settings.concurrency` in flight."""
    settings = settings or FetchSettings()
    if size is None:
        size = object_size(source, uri) - start
    out = bytearray(size)
    whole = Piece(uri, start, size)
    read, sink = range_reader(source), _memory_sink(out)
    jobs = [_part_job(read, whole, s, e, sink, settings) for s, e in split_range(start, size, settings.part)]
    run_parallel(jobs, settings.concurrency)
    return out


def fetch_to_file(
    source: Any,
    uri: str,
    size: int,
    target: str | os.PathLike[str],
    *,
    start: int = 0,
    settings: FetchSettings | None = None,
) -> FileSlice:
    """Like `fetch_ranges`, into the file `target` (created or replaced), each part written at its offset
    as it arrives: memory holds at most `concurrency` parts. On failure the file is removed."""
    settings = settings or FetchSettings()
    whole = Piece(uri, start, size)
    read = range_reader(source)
    path = os.fspath(target)
    try:
        with open(path, "wb") as handle:
            handle.truncate(size)
            sink = _file_sink(handle.fileno())
            jobs = [
                _part_job(read, whole, s, e, sink, settings)
                for s, e in split_range(start, size, settings.part)
            ]
            run_parallel(jobs, settings.concurrency)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(path)
        raise
    return FileSlice(path, 0, size)


def fetch(
    source: Any,
    uri: str,
    size: int,
    *,
    start: int = 0,
    memory_budget: int,
    scratch_dir: str | os.PathLike[str],
    settings: FetchSettings | None = None,
) -> bytearray | FileSlice:
    """`size` bytes of `uri` from `start`: in memory when they fit `memory_budget`, else streamed into a
    new file in `scratch_dir` (the caller removes it, e.g. with the scratch folder)."""
    if size <= memory_budget:
        return fetch_ranges(source, uri, size, start=start, settings=settings)
    handle, path = tempfile.mkstemp(prefix="fetch-", dir=scratch_dir)
    os.close(handle)
    return fetch_to_file(source, uri, size, path, start=start, settings=settings)


def fetch_product_files(
    source: Any,
    pieces: Iterable[Piece],
    *,
    max_gap: int = DEFAULT_MAX_GAP,
    memory_budget: int | None = None,
    scratch_dir: str | os.PathLike[str] | None = None,
    settings: FetchSettings | None = None,
) -> Mapping[Piece, memoryview | FileSlice]:
    """The bytes of every piece, fetched as merged ranges (see `merge_pieces`) split into large parts,
    all parts of all objects through one pool of `concurrency` requests.

    The pieces are views of the merged ranges' buffers (no copy); when the merged ranges add up to more
    than `memory_budget`, each range is written to its own file in `scratch_dir` and the pieces are
    FileSlices of those files (the caller removes them with its scratch folder)."""
    settings = settings or FetchSettings()
    wanted = list(dict.fromkeys(pieces))
    ranges = merge_pieces(wanted, max_gap)
    total = sum(r.length for r in ranges)
    read = range_reader(source)
    to_disk = memory_budget is not None and total > memory_budget
    if to_disk and scratch_dir is None:
        raise ValueError(f"{total} bytes exceed the memory budget and no scratch folder was given")

    buffers: dict[Piece, bytearray] = {}
    files: dict[Piece, str] = {}
    jobs: list[Callable[[], None]] = []
    with contextlib.ExitStack() as stack:
        for merged in ranges:
            if to_disk:
                fd, path = tempfile.mkstemp(prefix="fetch-", dir=scratch_dir)
                handle = stack.enter_context(os.fdopen(fd, "wb"))
                handle.truncate(merged.length)
                files[merged] = path
                sink: Callable[[int, bytes], None] = _file_sink(handle.fileno())
            else:
                buffers[merged] = bytearray(merged.length)
                sink = _memory_sink(buffers[merged])
            for part_start, part_end in split_range(merged.start, merged.length, settings.part):
                jobs.append(_part_job(read, merged, part_start, part_end, sink, settings))
        try:
            run_parallel(jobs, settings.concurrency)
        except BaseException:
            stack.close()
            for path in files.values():
                with contextlib.suppress(OSError):
                    os.remove(path)
            raise

    out: dict[Piece, memoryview | FileSlice] = {}
    for piece in wanted:
        holder = _holder(piece, ranges)
        if holder is None:
            out[piece] = memoryview(b"")
        elif to_disk:
            out[piece] = FileSlice(files[holder], piece.start - holder.start, piece.length)
        else:
            offset = piece.start - holder.start
            out[piece] = memoryview(buffers[holder])[offset : offset + piece.length]
    return out


def _holder(piece: Piece, ranges: list[Piece]) -> Piece | None:
    """The merged range that holds `piece` (None for an empty piece, which needs no bytes)."""
    if piece.length == 0:
        return None
    end = piece.start + piece.length
    return next(
        r for r in ranges if r.uri == piece.uri and r.start <= piece.start and end <= r.start + r.length
    )


def _memory_sink(buffer: bytearray | memoryview) -> Callable[[int, bytes], None]:
    view = memoryview(buffer)

    def put(offset: int, data: bytes) -> None:
        view[offset : offset + len(data)] = data

    return put


def _file_sink(fd: int) -> Callable[[int, bytes], None]:
    def put(offset: int, data: bytes) -> None:
        written = 0
        while written < len(data):
            written += os.pwrite(fd, memoryview(data)[written:], offset + written)

    return put


def _part_job(
    read: Callable[[str, int, int], bytes],
    merged: Piece,
    part_start: int,
    part_end: int,
    sink: Callable[[int, bytes], None],
    settings: FetchSettings,
) -> Callable[[], None]:
    def run() -> None:
        sink(part_start - merged.start, get_part(read, merged.uri, part_start, part_end, settings))

    return run


# ZIP members on object storage ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ZipMember:
    """A member of a remote ZIP, from its central directory entry."""

    name: str
    compress_type: int
    compress_size: int
    file_size: int
    crc: int
    flag_bits: int
    # From the member's local header to the next member's (or the central directory): its data sits at
    # an offset only the local header tells (see `member_data`).
    piece: Piece


class RemoteObjectFile(io.RawIOBase):
    """A read-only, seekable file of `_size` bytes whose subclasses read at `_position`. A seek before
    the start stays at 0 rather than raising: GDAL reads these files through a callback, where an
    exception would abort the process."""

    _size = 0
    _position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position


class _SparseFile(RemoteObjectFile):
    """A read-only, seekable view of a remote object of which some ranges are already fetched; a read
    outside them fetches just what it asks for (one ranged GET)."""

    def __init__(
        self, size: int, cached: dict[int, bytes | bytearray], fetch_range: Callable[[int, int], bytes]
    ):
        self._size, self._cached, self._fetch_range, self._position = size, dict(cached), fetch_range, 0

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        start, end = self._position, min(self._size, self._position + len(view))
        if end <= start:
            return 0
        for origin, data in self._cached.items():
            if origin <= start and end <= origin + len(data):
                view[: end - start] = data[start - origin : end - origin]
                break
        else:
            data = self._fetch_range(start, end)
            self._cached[start] = data
            view[: end - start] = data
        self._position = end
        return end - start


def list_zip(
    source: Any,
    uri: str,
    size: int | None = None,
    *,
    tail_bytes: int = DEFAULT_ZIP_TAIL_BYTES,
    settings: FetchSettings | None = None,
) -> list[ZipMember]:
    """The members of a ZIP on object storage, from one GET of its last `tail_bytes` (one more when the
    central directory is larger), in the order of their data in the ZIP. A ZIP that is not one raises
    ProductError."""
    settings = settings or FetchSettings()
    if size is None:
        size = object_size(source, uri)
    tail_start = max(0, size - tail_bytes)
    tail = fetch_ranges(source, uri, size - tail_start, start=tail_start, settings=settings)
    read = range_reader(source)
    handle = _SparseFile(size, {tail_start: tail}, lambda s, e: get_part(read, uri, s, e, settings))
    try:
        with zipfile.ZipFile(handle) as archive:
            infos = sorted(archive.infolist(), key=lambda info: info.header_offset)
            directory_start = int(archive.start_dir)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as exc:
        raise ProductError(f"corrupt ZIP {uri}: {exc}") from None
    members = []
    for info, after in zip(infos, [i.header_offset for i in infos[1:]] + [directory_start], strict=True):
        if not info.header_offset <= after <= size:
            raise ProductError(f"corrupt ZIP {uri}: member {info.filename} lies outside the archive")
        members.append(
            ZipMember(
                name=info.filename,
                compress_type=info.compress_type,
                compress_size=info.compress_size,
                file_size=info.file_size,
                crc=info.CRC,
                flag_bits=info.flag_bits,
                piece=Piece(uri, info.header_offset, after - info.header_offset),
            )
        )
    return members


def member_data(member: ZipMember, fetched: memoryview | FileSlice) -> memoryview | FileSlice:
    """The member's (compressed) data within its fetched piece, found from its local header."""
    if isinstance(fetched, FileSlice):
        with open(fetched.path, "rb") as handle:
            handle.seek(fetched.offset)
            head = handle.read(ZIP_LOCAL_HEADER.size)
    else:
        head = bytes(fetched[: ZIP_LOCAL_HEADER.size])
    if len(head) < ZIP_LOCAL_HEADER.size:
        raise ProductError(f"corrupt ZIP entry {member.name}: no local header")
    signature, name_length, extra_length = ZIP_LOCAL_HEADER.unpack(head)
    offset = ZIP_LOCAL_HEADER.size + name_length + extra_length
    if signature != b"PK\x03\x04" or offset + member.compress_size > member.piece.length:
        raise ProductError(f"corrupt ZIP entry {member.name}: its local header does not fit its data")
    if isinstance(fetched, FileSlice):
        return FileSlice(fetched.path, fetched.offset + offset, member.compress_size)
    return fetched[offset : offset + member.compress_size]


# Whole products -------------------------------------------------------------------------------------


def filesystem_for(uri: str, storage_options: Mapping[str, Any]) -> Any:
    return fsspec.core.url_to_fs(uri, **dict(storage_options))[0]


def fetch_objects(
    objects: Sequence[tuple[str, int | None]],
    scratch_dir: str | os.PathLike[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
    memory_budget: int,
    scratch: ScratchBudget | None = None,
    settings: FetchSettings | None = None,
) -> dict[str, MemoryFile | str]:
    """Every object of `objects` ((uri, size), size None when unknown: one HEAD), whole, in large ranged
    GETs through one pool. When they add up to at most `memory_budget`, each lands in a GDAL in-memory
    file (rasterio MemoryFile, all in one in-memory folder so an ENVI header sits beside its data file;
    the caller closes them together, after dropping any view of them: closing one removes the folder),
    written part by part in place: the product is held once, never copied.
    Else each lands in its own file in `scratch_dir`, named by its basename, within the `scratch` budget
    (over it: ProductError, before a byte is fetched). Objects on one store only."""
    settings = settings or FetchSettings()
    if not objects:
        return {}
    fs = filesystem_for(objects[0][0], storage_options or {})
    sized = [(uri, object_size(fs, uri) if size is None else size) for uri, size in objects]
    names = [posixpath.basename(uri) for uri, _ in sized]
    if len(set(names)) != len(names):
        raise ValueError(f"objects with the same file name cannot be fetched together: {names}")
    total = sum(size for _, size in sized)
    if total <= memory_budget:
        return _fetch_to_memory(fs, sized, settings)
    if scratch is not None:
        what = sized[0][0] if len(sized) == 1 else posixpath.dirname(sized[0][0])
        scratch.reserve(total, f"fetching {what}")
    os.makedirs(scratch_dir, exist_ok=True)
    pieces = [Piece(uri, 0, size) for uri, size in sized]
    fetched = fetch_product_files(fs, pieces, memory_budget=0, scratch_dir=scratch_dir, settings=settings)
    out: dict[str, MemoryFile | str] = {}
    for piece in pieces:
        target = os.path.join(os.fspath(scratch_dir), posixpath.basename(piece.uri))
        got = fetched[piece]
        if isinstance(got, FileSlice):
            os.replace(got.path, target)
        else:  # an empty object
            open(target, "wb").close()
        out[piece.uri] = target
    return out


def _fetch_to_memory(
    fs: Any, sized: list[tuple[str, int]], settings: FetchSettings
) -> dict[str, MemoryFile | str]:
    folder = f"spectralearth-fetch-{os.getpid()}-{uuid.uuid4().hex}"
    read = range_reader(fs)
    out: dict[str, MemoryFile | str] = {}
    jobs: list[Callable[[], None]] = []
    try:
        for uri, size in sized:
            memory = MemoryFile(dirname=folder, filename=posixpath.basename(uri))
            out[uri] = memory
            if size == 0:
                continue
            memory.seek(size - 1)
            memory.write(b"\0")  # GDAL allocates the whole file once; parts are copied into it
            view = np.asarray(memory.getbuffer()).data
            whole = Piece(uri, 0, size)
            jobs += [
                _part_job(read, whole, s, e, _memory_sink(view), settings)
                for s, e in split_range(0, size, settings.part)
            ]
        run_parallel(jobs, settings.concurrency)
    except BaseException:
        jobs.clear()
        for memory in out.values():
            if isinstance(memory, MemoryFile):
                memory.close()
        raise
    return out


def fetch_product(
    uri: str,
    scratch_dir: str | os.PathLike[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
    memory_budget: int,
    members: Sequence[tuple[str, int | None]] = (),
    settings: FetchSettings | None = None,
) -> dict[str, MemoryFile | str]:
    """A remote product's bytes, once, in large ranged GETs: the whole object for an archive (`uri` a
    ZIP or tar.gz), or, for a product folder, every file of `members` ((name relative to `uri`, size)).
    In memory within `memory_budget`, else in `scratch_dir`. Keys: the object URIs."""
    if members:
        objects = [(f"{uri.rstrip('/')}/{name}", size) for name, size in members]
    else:
        objects = [(uri, None)]
    return fetch_objects(
        objects, scratch_dir, storage_options=storage_options, memory_budget=memory_budget, settings=settings
    )


@dataclass(frozen=True)
class ProductFetcher:
    """What `pipeline.enmap.product` calls to bring a remote product's objects here (see
    `fetch_objects`): the storage options, the memory budget and the fetch settings of a stage."""

    storage_options: Mapping[str, Any]
    memory_budget: int
    settings: FetchSettings = FetchSettings()

    def __call__(
        self, objects: Sequence[tuple[str, int | None]], scratch_dir: str, scratch: ScratchBudget
    ) -> dict[str, MemoryFile | str]:
        return fetch_objects(
            objects,
            scratch_dir,
            storage_options=self.storage_options,
            memory_budget=self.memory_budget,
            scratch=scratch,
            settings=self.settings,
        )


def product_fetcher(manifest: Manifest, storage_options: Mapping[str, Any] | None) -> ProductFetcher:
    """The fetcher a stage hands `open_product`/`iter_products`: the manifest's memory budget and its
    storage section's part size and concurrency."""
    return ProductFetcher(
        dict(storage_options or {}),
        manifest.limits.memory_bytes,
        FetchSettings(
            part_bytes=manifest.storage.fetch_part_bytes, concurrency=manifest.storage.fetch_concurrency
        ),
    )
