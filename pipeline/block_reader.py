"""Reading remote objects in place, in large aligned blocks: what inventory uses to read a remote
product's ZIP directory, METADATA.XML and raster headers without fetching the product whole.

A `BlockReader` makes one ranged GET per aligned block (the fetch part size, at least 8 MiB; an object's
last block is shorter) and keeps a few blocks (LRU); Python reads through it, and GDAL through rasterio's
file-opener registration, so `/vsizip/` stacks on it too.
"""

from __future__ import annotations

import contextlib
import io
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import IO, Any

# rasterio's file-opener registration (what `rasterio.open(..., opener=)` uses) is the one way to serve a
# Python file to GDAL under a path that `/vsizip/` can be stacked on; it is private, so a rasterio upgrade
# must keep tests/test_s3_reads.py passing.
from rasterio._vsiopener import _opener_registration

from pipeline.fetch import (
    FetchSettings,
    RemoteObjectFile,
    filesystem_for,
    get_part,
    object_size,
    range_reader,
    run_parallel,
)
from pipeline.manifest import Manifest

# Blocks a `BlockReader` holds at most (LRU): a raster's header, its offsets table and its last block,
# a ZIP's central directory, all at once; bounded whatever the product's size.
DEFAULT_CACHED_BLOCKS = 4


# Reading in place, in large aligned blocks -------------------------------------------------------------


class BlockReader:
    """Random access to remote objects that costs one ranged GET per `settings.part`-sized, aligned block
    touched (the last block of an object is shorter), never one per strip or seek: what `inventory`
    reads of a product (a ZIP's central directory and local headers, METADATA.XML, each raster's header,
    offsets table and last block) costs a few blocks, not the product. At most `max_blocks` blocks are
    held (least recently used dropped first). Objects are served to Python (`open`) and to GDAL
    (`gdal_path`, through rasterio's file opener, while `serving()` is entered) by URI; GDAL is only
    served objects whose size is known (listed with the product, or asked for by `open`), so its probes
    for sidecars that do not exist (`.aux.xml`, `.msk`) cost no request.

    A read that fails because of the storage is retried as in `fetch_ranges`; GDAL sees only "read
    failed", so the fault is kept in `fault` for the caller to raise as what it is (transient)."""

    def __init__(
        self,
        source: Any,
        settings: FetchSettings | None = None,
        max_blocks: int = DEFAULT_CACHED_BLOCKS,
    ) -> None:
        self._source = source
        self._read = range_reader(source)
        self._settings = settings or FetchSettings()
        self._max_blocks = max(1, max_blocks)
        self._sizes: dict[str, int] = {}
        self._blocks: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._lock = threading.Lock()
        self._prefix: str | None = None
        self.fault: BaseException | None = None

    @property
    def block_bytes(self) -> int:
        return self._settings.part

    @property
    def blocks_held(self) -> int:
        return len(self._blocks)

    def add_sizes(self, sizes: Mapping[str, int]) -> None:
        """Sizes of objects as listed (no HEAD is made for them)."""
        self._sizes.update(sizes)

    def size(self, uri: str) -> int:
        if uri not in self._sizes:
            self._sizes[uri] = object_size(self._source, uri)
        return self._sizes[uri]

    def read(self, uri: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of `uri` (clipped to its size), from its blocks; missing blocks are
        fetched, several in flight."""
        end = min(end, self.size(uri))
        if end <= start:
            return b""
        block = self.block_bytes
        indices = range(start // block, (end - 1) // block + 1)
        found: dict[int, bytes] = {}
        with self._lock:
            for index in indices:
                data = self._blocks.get((uri, index))
                if data is not None:
                    self._blocks.move_to_end((uri, index))
                    found[index] = data
        missing = [index for index in indices if index not in found]
        jobs = [self._fetch_job(uri, index, found) for index in missing]
        try:
            run_parallel(jobs, self._settings.concurrency)
        except BaseException as exc:
            self.fault = exc
            raise
        with self._lock:
            for index in missing:
                self._blocks[(uri, index)] = found[index]
            while len(self._blocks) > self._max_blocks:
                self._blocks.popitem(last=False)
        joined = b"".join(found[index] for index in indices)
        offset = indices[0] * block
        return joined[start - offset : end - offset]

    def _fetch_job(self, uri: str, index: int, into: dict[int, bytes]) -> Callable[[], None]:
        def run() -> None:
            start = index * self.block_bytes
            end = min(start + self.block_bytes, self.size(uri))
            into[index] = get_part(self._read, uri, start, end, self._settings)

        return run

    def open(self, uri: str, for_gdal: bool = False) -> IO[bytes]:
        """`uri` as a seekable binary file reading through the blocks (one HEAD when its size is not
        known yet). A file `for_gdal` never raises from a read (an exception escaping into GDAL's
        read callback aborts the process): a failed read returns no bytes and leaves `fault` set."""
        return io.BufferedReader(_BlockFile(self, uri, self.size(uri), for_gdal), buffer_size=64 * 1024)

    @contextlib.contextmanager
    def serving(self) -> Iterator[BlockReader]:
        """While entered, `gdal_path(uri)` is a path GDAL reads through this reader (also inside a ZIP:
        `/vsizip/` + that path + `/member`)."""
        with _opener_registration("blocks://objects", self._gdal_open) as registered:
            self._prefix = registered.split("/", 2)[1]
            try:
                yield self
            finally:
                self._prefix = None

    def gdal_path(self, uri: str) -> str:
        if self._prefix is None:
            raise RuntimeError("BlockReader.gdal_path outside serving()")
        scheme, _, rest = uri.partition("://")
        return f"/{self._prefix}/{scheme}/{rest}"

    def _gdal_open(self, path: str, mode: str = "rb") -> IO[bytes]:
        scheme, _, rest = path.lstrip("/").partition("/")
        uri = f"{scheme}://{rest}"
        if "w" in mode or "a" in mode or "+" in mode:
            raise PermissionError(f"{uri} is read-only here")
        if uri not in self._sizes:  # a sidecar GDAL probes for (.aux.xml, .msk): not in the product
            raise FileNotFoundError(uri)
        return self.open(uri, for_gdal=True)


class _BlockFile(RemoteObjectFile):
    """A read-only, seekable view of one object through a `BlockReader`."""

    def __init__(self, reader: BlockReader, uri: str, size: int, for_gdal: bool = False) -> None:
        self._reader, self._uri, self._size, self._position = reader, uri, size, 0
        self._for_gdal = for_gdal

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        try:
            data = self._reader.read(self._uri, self._position, self._position + len(view))
        except Exception as exc:
            if not self._for_gdal:
                raise
            self._reader.fault = exc  # GDAL sees a short read; the caller raises the fault
            return 0
        view[: len(data)] = data
        self._position += len(data)
        return len(data)


def block_reader(manifest: Manifest, storage_options: Mapping[str, Any] | None, uri: str) -> BlockReader:
    """The reader `inventory` reads remote products through: the manifest's part size and concurrency,
    at most `DEFAULT_CACHED_BLOCKS` blocks (down to two when the memory budget is smaller)."""
    settings = FetchSettings(
        part_bytes=manifest.storage.fetch_part_bytes, concurrency=manifest.storage.fetch_concurrency
    )
    blocks = min(DEFAULT_CACHED_BLOCKS, max(2, manifest.limits.memory_bytes // settings.part))
    return BlockReader(filesystem_for(uri, storage_options or {}), settings, blocks)
