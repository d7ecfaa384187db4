"""Find EnMAP L2A products under the inputs and open them, whatever their packaging.

Packagings: a product folder (also the ARD variant, `-SPECTRAL_IMAGE_COG.tiff` + `-METADATA.xml`), a
`<name>.ZIP` holding `<name>/`, and a DLR delivery `.tar.gz` with the ZIP somewhere inside. Inputs are
local paths or `s3://` URIs (through fsspec); rasters are opened by GDAL path (`/vsizip/`, `/vsimem/`).
The stages hand `open_product`/`iter_products` a `Fetcher` (`pipeline.fetch.ProductFetcher`): a remote
product is then brought here once, whole (a folder's files, its ZIP, its tar.gz), in a few large ranged
GETs, into memory (GDAL serves it from `/vsimem/`) or, past `limits.memory_bytes`, into scratch, and
read from there; GDAL's `/vsis3/` would cost a request per strip or block. Inventory, which reads
only a product's directory, metadata and raster headers, hands `iter_products` a `RemoteReader`
(`pipeline.block_reader.BlockReader`) instead: a remote folder or ZIP is then read in place, in large aligned
blocks, the few that hold what is read (a tar.gz is still fetched whole: gzip is sequential).

A product's files are resolved from the listing of its container, by product name and layer suffix,
never by guessing sibling names. GDAL cannot open a ZIP inside a tar.gz in place, so that ZIP is
unpacked, streaming and size-checked: inventory unpacks it to scratch and, done, keeps it for mask
(`pipeline.enmap.scratch`: keyed by the delivery's URI, size and modification stamp, within
`limits.scratch_bytes`), which takes it and checks its size and CRC-32 before use, so a delivery is
inflated once per build (gzip, ~10 s for a full-size product, was paid twice); when mask runs on
another machine or the kept ZIP is gone or damaged, mask unpacks it again, into memory when it fits
`limits.memory_bytes`, else to scratch.

A deflated raster that a stage reads in full is inflated once per open (ISA-L's inflate, ~1.5x
zlib's speed, CRC-checked) into GDAL's in-memory file system, or into scratch when it is larger than
the manifest's `limits.memory_bytes`: writing ~1 GB to a disk-backed scratch folder cost as much as
inflating it.

Archives are untrusted. Every inflate and unpack is bounded twice: by the size its header declares
(never a byte more is produced) and by the manifest's `limits` (memory for what is held in memory,
scratch for all one product unpacks, XML for METADATA.XML, checked before a byte is read); a member or
product over budget is rejected with its sizes. An archive with an entry that escapes its folder is
rejected whole. Scratch folders carry their owner's pid, so the scratch a killed task left behind is
removed at the next start (`clean_stale_scratch`).

The pieces live beside this module: `pipeline.enmap.discovery` (finding sources, resolving them into
product locations), `pipeline.enmap.scratch` (owned scratch folders, the scratch budget),
`pipeline.enmap.zip_members` (bounded, CRC-checked reads of ZIP members) and
`pipeline.enmap.product_errors`.

Faults are kept apart from product properties: an OSError or network error while listing or reading
(permission, disk full, connection refused) propagates as an exception, so the stage retries it;
only what the bytes say (a corrupt ZIP, a bomb, an escaping entry) becomes a `ProductError`.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import posixpath
import tarfile
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Protocol

import fsspec
import numpy as np
from rasterio.io import MemoryFile

from pipeline.enmap.discovery import (
    ZIP_SUFFIXES,
    ProductLocation,
    ProductSource,
    folder_products,
    tar_entry_problem,
    unsafe_member,
    zip_listing,
    zip_products,
)
from pipeline.enmap.names import METADATA, SPECTRAL_IMAGE, find_product_names
from pipeline.enmap.product_errors import (
    ArchiveRejected,
    ProductError,
    corrupt_bytes_error,
    format_size,
    over_budget,
)
from pipeline.enmap.scratch import (
    KeptZip,
    ScratchBudget,
    claim_inner_zip,
    clean_stale_scratch,
    inner_zip_key,
    keep_inner_zip,
    scratch_dir,
)
from pipeline.enmap.zip_members import (
    COPY_CHUNK,
    BufferFile,
    bounded,
    copy_member,
    inflate_into,
    member_bytes,
    member_chunks,
    write_member,
)
from pipeline.manifest import Limits
from pipeline.storage import gdal_path, is_remote, join
from pipeline.tables import Rejection

# Brings remote objects here ((uri, size or None), scratch folder, scratch budget) -> uri -> the bytes, or
# the path of a file in that scratch folder; `pipeline.fetch.ProductFetcher` is the one used (large
# ranged GETs). Without one, remote products are read in place (GDAL's /vsis3/, fsspec).
Fetcher = Callable[[Sequence[tuple[str, int | None]], str, "ScratchBudget"], Mapping[str, MemoryFile | str]]

# How often this process inflated a tar.gz delivery to its inner ZIP ("inventory", "mask") and how often
# mask reused the ZIP inventory kept ("reused"): what the tests count (one inflate per build).
TAR_INFLATIONS: Counter[str] = Counter()


class RemoteReader(Protocol):
    """Reads remote objects in place, in large blocks (`pipeline.block_reader.BlockReader`): for Python
    (`open`) and for GDAL (`gdal_path`)."""

    def add_sizes(self, sizes: Mapping[str, int]) -> None: ...

    def open(self, uri: str) -> IO[bytes]: ...

    def gdal_path(self, uri: str) -> str: ...


@dataclass
class OpenedProduct:
    """A product ready to read: GDAL paths of its layers and its metadata bytes."""

    location: ProductLocation
    storage_options: dict
    local_zip: str | None = None  # the unpacked inner ZIP of a tar.gz delivery
    local_members: dict[str, str] = field(default_factory=dict)  # member -> GDAL path of a local copy
    limits: Limits = field(default_factory=Limits)
    # A fetched remote product: the ZIP's bytes (`local_zip` is then its in-memory GDAL path), or a
    # folder's files (member -> bytes, or the path of the fetched file in scratch).
    zip_bytes: memoryview | None = None
    fetched: dict[str, memoryview | str] = field(default_factory=dict)
    # Members inflated into memory for a full read (member -> their bytes, also served to GDAL from
    # /vsimem/): `pipeline.enmap.cube_reader` reads the cube from these bytes with numpy.
    inflated: dict[str, memoryview] = field(default_factory=dict)
    # A remote product read in place, in large blocks (inventory: headers, not the cube).
    remote: RemoteReader | None = None

    def _zip_gdal_path(self) -> str:
        if self.local_zip:
            return self.local_zip
        if self.remote is not None:
            return self.remote.gdal_path(self.location.container_uri)
        return gdal_path(self.location.container_uri)

    def gdal_path(self, layer: str) -> str:
        member = self.location.member(layer)
        if member in self.local_members:
            return self.local_members[member]
        if self.location.packaging == "folder":
            uri = join(self.location.container_uri, member)
            return self.remote.gdal_path(uri) if self.remote is not None else gdal_path(uri)
        return f"/vsizip/{self._zip_gdal_path()}/{member}"

    @contextlib.contextmanager
    def open_container(self) -> Iterator[IO[bytes]]:
        """The product ZIP as a seekable binary file (local, or ranged reads through fsspec)."""
        if self.zip_bytes is not None:
            handle: IO[bytes] = io.BufferedReader(BufferFile(self.zip_bytes))
        elif self.local_zip:
            handle = open(self.local_zip, "rb")
        elif self.remote is not None:
            handle = self.remote.open(self.location.container_uri)
        else:
            handle = fsspec.open(self.location.container_uri, "rb", **self.storage_options).open()
        try:
            yield handle
        finally:
            handle.close()

    @contextlib.contextmanager
    def open_zip(self) -> Iterator[zipfile.ZipFile]:
        with self.open_container() as handle:
            try:
                with zipfile.ZipFile(handle) as archive:
                    yield archive
            except (zipfile.BadZipFile, EOFError) as exc:
                raise ProductError(f"corrupt ZIP {self.location.source_uri}: {exc}") from None

    def read_member(self, layer: str, budget: int | None = None, kind: str = "memory") -> bytes:
        """A layer's bytes, in memory: refused unread when it declares (listing, ZIP header) more than
        `budget` (default `limits.memory_bytes`), and never read or inflated past it."""
        budget = self.limits.memory_bytes if budget is None else budget
        member = self.location.member(layer)
        if self.location.packaging == "folder":
            listed = dict(self.location.members).get(member, 0)
            if listed > budget:
                raise ProductError(over_budget(f"member {member}", "holds", listed, budget, kind))
            copy = self.fetched.get(member)
            if isinstance(copy, memoryview):
                data = bytes(copy[: budget + 1])
            elif copy is None and self.remote is not None:
                with self.remote.open(join(self.location.container_uri, member)) as handle:
                    data = handle.read(budget + 1)
            else:
                where = copy if copy is not None else join(self.location.container_uri, member)
                with fsspec.open(where, "rb", **({} if copy else self.storage_options)) as handle:
                    data = handle.read(budget + 1)
            if len(data) > budget:
                raise ProductError(f"member {member} holds more than the {format_size(budget)} {kind} budget")
            return data
        with self.open_container() as handle:
            infos = {
                info.filename: info
                for info in zip_listing(handle, posixpath.basename(self.location.source_uri))
            }
            if member not in infos:
                raise ProductError(f"missing file: {member} is no longer in the archive")
            info = infos[member]
            if info.compress_type in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                return member_bytes(handle, info, budget, kind)
        if info.file_size > budget:
            raise ProductError(over_budget(f"member {member}", "inflates to", info.file_size, budget, kind))
        return b"".join(bounded(_zipfile_chunks(self, info), info.file_size, member))

    def metadata_bytes(self) -> bytes:
        """METADATA.XML, refused before a byte is read when it declares more than `limits.xml_bytes`."""
        return self.read_member(METADATA, self.limits.xml_bytes, "XML")

    @property
    def spectral_path(self) -> str:
        return self.gdal_path(SPECTRAL_IMAGE)


def iter_products(
    source: ProductSource,
    storage_options: dict | None = None,
    limits: Limits = Limits(),
    fetcher: Fetcher | None = None,
    reader: RemoteReader | None = None,
) -> Iterator[OpenedProduct | Rejection]:
    """Every product of a source, opened; each is valid until the next one is asked for.

    A tar.gz is streamed once: each product ZIP in it is unpacked (within `limits.scratch_bytes`),
    yielded, and moved out of the way before the stream moves on: kept for mask (within the same
    budget, `pipeline.enmap.scratch.keep_inner_zip`) when all its products were yielded, else removed.
    Raises `ArchiveRejected` for an archive refused whole (possibly after some of its products were
    yielded: the caller drops them), and OSError for a fault of the storage (never a rejection).
    With a `fetcher`, a remote source is brought here first, once, whole (a folder product's files, the
    ZIP, the tar.gz: see `pipeline.fetch`), and read from that copy, which is removed afterwards.
    With a `reader`, a remote folder or ZIP is read in place through it instead (what is read of
    it, in large blocks); a tar.gz is still fetched whole by the `fetcher` (gzip is sequential: no
    member can be reached without inflating all before it).
    """
    options = storage_options or {}
    if reader is not None and is_remote(source.uri) and source.kind in ("folder", "zip"):
        yield from _iter_in_place(source, options, limits, reader)
        return
    # Taken before a byte is read: a delivery replaced meanwhile never has its ZIP kept under the
    # stamp of the one before.
    stamp = _container_stamp(source.uri, options) if source.kind == "tar" else None
    remote = fetcher is not None and is_remote(source.uri)
    if source.kind == "folder":
        for location in folder_products(source):
            if fetcher is not None and remote:
                with scratch_dir() as scratch, contextlib.ExitStack() as stack:
                    opened = OpenedProduct(location, options, limits=limits)
                    _attach_folder(opened, fetcher, scratch, stack, ScratchBudget(limits.scratch_bytes))
                    yield opened
            else:
                yield OpenedProduct(location, options, limits=limits)
        return
    if fetcher is not None and remote:
        with scratch_dir() as scratch, contextlib.ExitStack() as stack:
            budget = ScratchBudget(limits.scratch_bytes)
            copy = fetcher([(source.uri, None)], os.path.join(scratch, "fetched"), budget)[source.uri]
            if isinstance(copy, MemoryFile):
                stack.callback(copy.close)
            if source.kind == "zip":
                yield from _iter_zip(source, options, limits, copy)
            else:
                yield from _iter_tar(source, options, limits, stamp, copy)
        return
    if source.kind == "zip":
        yield from _iter_zip(source, options, limits)
        return
    yield from _iter_tar(source, options, limits, stamp)


def _iter_in_place(
    source: ProductSource, options: dict, limits: Limits, remote: RemoteReader
) -> Iterator[OpenedProduct | Rejection]:
    """The products of a remote folder or ZIP source, read through `remote`."""
    if source.kind == "folder":
        for location in folder_products(source):
            remote.add_sizes({join(location.container_uri, m): size for m, size in location.members})
            yield OpenedProduct(location, options, limits=limits, remote=remote)
        return
    for opened in _iter_zip(source, options, limits, remote=remote):
        if isinstance(opened, OpenedProduct):
            opened.remote = remote
        yield opened


def _iter_zip(
    source: ProductSource,
    options: dict,
    limits: Limits,
    copy: MemoryFile | str | None = None,
    remote: RemoteReader | None = None,
) -> Iterator[OpenedProduct | Rejection]:
    """The products of a ZIP source, read in place (through `remote` when given) or from its fetched
    `copy`."""
    try:
        with _open_object(source.uri, options, copy, remote) as handle:
            infos = zip_listing(handle, posixpath.basename(source.uri))
    except ArchiveRejected:
        raise
    except ProductError as exc:
        yield Rejection(source.uri, None, "inventory", str(exc))
        return
    products, rejections = zip_products(infos, source.uri, "zip", None)
    yield from rejections
    local = _zip_copy(copy)
    for location in products:
        opened = OpenedProduct(location, options, limits=limits)
        opened.local_zip, opened.zip_bytes = local
        yield opened


@contextlib.contextmanager
def _open_object(
    uri: str, options: dict, copy: MemoryFile | str | None = None, remote: RemoteReader | None = None
) -> Iterator[IO[bytes]]:
    """An object as a binary file: its fetched copy (in memory or a local file), else in place (through
    `remote` when given)."""
    if remote is not None:
        with remote.open(uri) as handle:
            yield handle
    elif isinstance(copy, MemoryFile):
        with io.BufferedReader(BufferFile(in_memory_view(copy))) as handle:
            yield handle
    elif copy is not None:
        with open(copy, "rb") as handle:
            yield handle
    else:
        with fsspec.open(uri, "rb", **options) as handle:
            yield handle


def in_memory_view(memory: MemoryFile) -> memoryview:
    """The bytes of a GDAL in-memory file as a view (no copy); valid only while the file is open."""
    if not memory.exists():
        return memoryview(b"")
    return np.asarray(memory.getbuffer()).data


def _zip_copy(copy: MemoryFile | str | None) -> tuple[str | None, memoryview | None]:
    """(local_zip, zip_bytes) of a fetched ZIP: a scratch file, or a GDAL in-memory file and a view of
    its bytes (the caller closes the file)."""
    if copy is None or isinstance(copy, str):
        return copy, None
    return copy.name, in_memory_view(copy)


def _attach_folder(
    opened: OpenedProduct, fetcher: Fetcher, scratch: str, stack: contextlib.ExitStack, budget: ScratchBudget
) -> None:
    """Fetch every file of a remote folder product once and point its layers at the copies (in memory,
    in one in-memory folder so an ENVI header sits beside its data file; or in scratch)."""
    location = opened.location
    uris = {join(location.container_uri, member): member for member, _ in location.members}
    wanted = [(join(location.container_uri, member), size) for member, size in location.members]
    copies = fetcher(wanted, os.path.join(scratch, "fetched"), budget)
    for uri, copy in copies.items():
        member = uris[uri]
        if isinstance(copy, MemoryFile):
            stack.callback(copy.close)
            opened.fetched[member], opened.local_members[member] = in_memory_view(copy), copy.name
        else:
            opened.fetched[member] = opened.local_members[member] = copy
    stack.callback(opened.fetched.clear)  # (runs first) no view outlives its in-memory file


def _attach_zip(
    opened: OpenedProduct, fetcher: Fetcher, scratch: str, stack: contextlib.ExitStack, budget: ScratchBudget
) -> None:
    uri = opened.location.container_uri
    copy = fetcher([(uri, None)], os.path.join(scratch, "fetched"), budget)[uri]
    if isinstance(copy, MemoryFile):
        stack.callback(copy.close)
    opened.local_zip, opened.zip_bytes = _zip_copy(copy)
    stack.callback(setattr, opened, "zip_bytes", None)  # (runs first) no view outlives its file


def _tar_corrupt(exc: BaseException) -> bool:
    """An error of the tar stream that its bytes caused (not the storage)."""
    return isinstance(exc, tarfile.TarError | EOFError | zlib.error) or corrupt_bytes_error(exc)


def _iter_tar(
    source: ProductSource,
    options: dict,
    limits: Limits,
    stamp: str | None,
    copy: MemoryFile | str | None = None,
) -> Iterator[OpenedProduct | Rejection]:
    found_any = False
    with _open_object(source.uri, options, copy) as raw:
        try:
            tar = tarfile.open(fileobj=raw, mode="r|*")
        except Exception as exc:
            if not _tar_corrupt(exc):
                raise
            yield _corrupt_archive(source.uri, exc)
            return
        with tar:
            for info in _tar_entries(tar, source.uri):
                if isinstance(info, Rejection):  # the stream broke off
                    yield info
                    return
                problem = tar_entry_problem(info)
                if problem:
                    raise ArchiveRejected(problem)
                if not _is_product_zip(info):
                    if info.size > limits.scratch_bytes:
                        # Streaming past it would inflate that much (CPU, not disk): no entry of a
                        # usable delivery is larger than what one product may unpack.
                        reason = over_budget(
                            f"entry {info.name}", "declares", info.size, limits.scratch_bytes, "scratch"
                        )
                        yield Rejection(source.uri, None, "inventory", reason)
                        return
                    continue
                found_any = True
                corrupt = yield from _tar_zip_products(tar, info, source, options, limits, stamp)
                if corrupt:
                    return
    if not found_any:
        yield Rejection(source.uri, None, "inventory", "archive holds no EnMAP L2A product ZIP")


def _corrupt_archive(uri: str, exc: BaseException) -> Rejection:
    return Rejection(uri, None, "inventory", f"corrupt archive: {type(exc).__name__}: {exc}")


def _tar_entries(tar: tarfile.TarFile, uri: str) -> Iterator[tarfile.TarInfo | Rejection]:
    """The entries of a tar stream, then a Rejection if the stream breaks off because of its bytes (a
    fault of the storage raises)."""
    entries = iter(tar)
    while True:
        try:
            info = next(entries)
        except StopIteration:
            return
        except Exception as exc:
            if not _tar_corrupt(exc):
                raise
            yield _corrupt_archive(uri, exc)
            return
        yield info


def _is_product_zip(info: tarfile.TarInfo) -> bool:
    return info.isfile() and info.name.lower().endswith(ZIP_SUFFIXES) and bool(find_product_names(info.name))


def _tar_zip_products(
    tar: tarfile.TarFile,
    info: tarfile.TarInfo,
    source: ProductSource,
    options: dict,
    limits: Limits,
    stamp: str | None,
) -> Generator[OpenedProduct | Rejection, None, bool]:
    """The products of one product ZIP in a tar stream, unpacked to scratch for as long as they are in
    use, then kept for mask under the delivery's `stamp` (when known); returns True when the stream is
    corrupt (its rejection was the archive's last)."""
    name = info.name
    with scratch_dir() as scratch:
        local_zip = os.path.join(scratch, "product.zip")
        stream = tar.extractfile(info)
        if stream is None:
            return False
        key = inner_zip_key(source.uri, name, stamp) if stamp is not None else None
        crc = _Crc32()
        try:
            TAR_INFLATIONS["inventory"] += 1
            chunks = crc.of(iter(lambda: stream.read(COPY_CHUNK), b""))
            write_member(chunks, local_zip, info.size, name, ScratchBudget(limits.scratch_bytes))
            with open(local_zip, "rb") as handle:
                infos = zip_listing(handle, posixpath.basename(name))
            products, rejections = zip_products(infos, source.uri, "targz", name)
        except ArchiveRejected:
            raise
        except ProductError as exc:
            yield Rejection(f"{source.uri}!{name}", None, "inventory", str(exc))
            return False
        except Exception as exc:
            if not _tar_corrupt(exc):
                raise
            yield _corrupt_archive(source.uri, exc)
            return True
        yield from rejections
        for location in products:
            yield OpenedProduct(location, options, local_zip=local_zip, limits=limits)
        if products and key is not None:
            # Kept for mask on this machine, which would otherwise inflate the delivery again.
            with contextlib.suppress(OSError):  # a cache that cannot be written only costs that inflate
                keep_inner_zip(local_zip, key, crc.value, limits.scratch_bytes)
    return False


class _Crc32:
    """The running CRC-32 of the chunks passed through `of`."""

    def __init__(self) -> None:
        self.value = 0

    def of(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self.value = zlib.crc32(chunk, self.value)
            yield chunk


def _container_stamp(container_uri: str, options: dict) -> str | None:
    """A delivery's current size and modification stamp (mtime, ETag), or None when it cannot be had
    (its inner ZIP is then neither kept nor looked for)."""
    try:
        fs, path = fsspec.core.url_to_fs(container_uri, **options)
        info = fs.info(path)
    except Exception:  # no cache, no harm: the stage reads the delivery and meets the fault there
        return None
    return f"{info.get('size')}:{info.get('mtime') or info.get('ETag') or info.get('LastModified') or ''}"


def _kept_intact(kept: KeptZip) -> bool:
    """A kept inner ZIP is the one that was kept: its size and CRC-32 as recorded (a truncated, replaced
    or corrupted file is not used)."""
    if os.path.getsize(kept.path) != kept.size:
        return False
    crc = 0
    with open(kept.path, "rb") as handle:
        for chunk in iter(lambda: handle.read(COPY_CHUNK), b""):
            crc = zlib.crc32(chunk, crc)
    return crc == kept.crc


@contextlib.contextmanager
def open_product(
    location: ProductLocation,
    storage_options: dict | None = None,
    unpack: tuple[str, ...] = (),
    limits: Limits = Limits(),
    fetcher: Fetcher | None = None,
) -> Iterator[OpenedProduct]:
    """Open one known product (for the stages after inventory).

    With a `fetcher`, a remote product is brought here once, whole, in large requests (its folder's
    files, its ZIP, its tar.gz: `pipeline.fetch`), into memory or scratch, and every layer is read from
    that copy; nothing is read through GDAL's /vsis3/.

    A tar.gz delivery's ZIP is the one inventory kept on this machine (`pipeline.enmap.scratch`), taken
    and verified (size, CRC-32), else it is unpacked again: into memory when it fits
    `limits.memory_bytes`, else to scratch. `unpack` names layers that will be read in
    full: when such a layer sits deflated inside a ZIP, it (and its header sidecar) is inflated once,
    sequentially, into memory (or scratch, when large) for as long as the product is open, because
    GDAL's random access into a deflate stream restarts decompression on every backward seek, which
    made a band-by-band read of a 75 MB ENVI BIL cube take ~50 s instead of ~0.2 s.
    Members up to `limits.memory_bytes` go to memory; all the product unpacks to scratch (the inner
    ZIP of a tar.gz, larger members) stays within `limits.scratch_bytes`, else ProductError.
    """
    options = storage_options or {}
    clean_stale_scratch()
    budget = ScratchBudget(limits.scratch_bytes)
    with scratch_dir() as scratch:
        opened = OpenedProduct(location, options, limits=limits)
        remote = fetcher is not None and is_remote(location.container_uri)
        with contextlib.ExitStack() as stack:
            if location.packaging == "targz":
                _open_inner_zip(opened, scratch, stack, budget, fetcher if remote else None)
            elif fetcher is not None and remote and location.packaging == "zip":
                _attach_zip(opened, fetcher, scratch, stack, budget)
            elif fetcher is not None and remote:
                _attach_folder(opened, fetcher, scratch, stack, budget)
            if location.packaging != "folder" and unpack:
                _unpack_deflated(opened, unpack, scratch, stack, budget)
            yield opened


def _open_inner_zip(
    opened: OpenedProduct,
    scratch: str,
    stack: contextlib.ExitStack,
    budget: ScratchBudget,
    fetcher: Fetcher | None,
) -> None:
    """Point `opened` at its delivery's inner ZIP: the one inventory kept here when it is intact, else
    unpacked from the delivery (fetched first through `fetcher` when given) into memory or scratch."""
    location, options = opened.location, opened.storage_options
    assert location.inner_zip is not None, "a tar.gz product names its inner ZIP"
    stamp = _container_stamp(location.container_uri, options)
    kept = None
    if stamp is not None:
        kept = claim_inner_zip(inner_zip_key(location.container_uri, location.inner_zip, stamp), scratch)
    if kept is not None:
        if _kept_intact(kept):
            budget.reserve(kept.size, f"member {location.inner_zip}")
            opened.local_zip = kept.path  # removed with the scratch folder when the product closes
            TAR_INFLATIONS["reused"] += 1
            return
        os.remove(kept.path)  # not the ZIP that was kept: unpack it again
    copy = None
    if fetcher is not None:
        uri = location.container_uri
        copy = fetcher([(uri, None)], os.path.join(scratch, "fetched"), budget)[uri]
    try:
        TAR_INFLATIONS["mask"] += 1
        unpacked = _unpack_inner_zip(
            location, options, os.path.join(scratch, "product.zip"), budget, copy, opened.limits.memory_bytes
        )
    finally:  # the unpacked ZIP is what is read from now on
        if isinstance(copy, str):
            os.remove(copy)
        elif copy is not None:
            copy.close()
    if isinstance(unpacked, MemoryFile):
        stack.enter_context(unpacked)
        opened.local_zip, opened.zip_bytes = _zip_copy(unpacked)
        stack.callback(setattr, opened, "zip_bytes", None)  # (runs first) no view outlives its file
    else:
        opened.local_zip = unpacked


def _unpack_inner_zip(
    location: ProductLocation,
    options: dict,
    target: str,
    budget: ScratchBudget,
    copy: MemoryFile | str | None = None,
    memory_bytes: int = 0,
) -> MemoryFile | str:
    """Stream a tar.gz delivery (in place, or its fetched `copy`) to its product ZIP and unpack that:
    into memory when it declares at most `memory_bytes`, else to `target` (within the scratch budget);
    a corrupt stream is a ProductError, a storage fault propagates."""
    with _open_object(location.container_uri, options, copy) as raw:
        try:
            with tarfile.open(fileobj=raw, mode="r|*") as tar:
                for info in tar:
                    if info.name == location.inner_zip and info.isfile():
                        stream = tar.extractfile(info)
                        if stream is None:
                            break
                        if info.size <= memory_bytes:
                            return _unpacked_in_memory(stream, info)
                        copy_member(stream, target, info.size, info.name, budget)
                        return target
        except ProductError:
            raise
        except Exception as exc:
            if not _tar_corrupt(exc):
                raise
            raise ProductError(f"corrupt archive: {type(exc).__name__}: {exc}") from None
    raise ProductError(f"{location.inner_zip} is no longer in {location.container_uri}")


def _unpacked_in_memory(stream: IO[bytes], info: tarfile.TarInfo) -> MemoryFile:
    """A tar member streamed into GDAL's in-memory file, allocated once at its declared size (joining
    the pieces would hold it twice); refused when the stream gives fewer or more bytes."""
    memory = MemoryFile(ext=".zip")  # GDAL's /vsizip/ knows an archive by its suffix
    try:
        view = _in_memory_buffer(memory, info.size)
        filled = 0
        for piece in iter(lambda: stream.read(COPY_CHUNK), b""):
            if filled + len(piece) > info.size:
                raise ProductError(f"archive entry {info.name} is larger than its declared {info.size} bytes")
            view[filled : filled + len(piece)] = piece
            filled += len(piece)
        if filled != info.size:
            raise ProductError(f"archive entry {info.name} is truncated: {filled} of {info.size} bytes")
        view.release()
    except BaseException:
        memory.close()
        raise
    return memory


def _unpack_deflated(
    opened: OpenedProduct,
    layers: tuple[str, ...],
    scratch: str,
    stack: contextlib.ExitStack,
    budget: ScratchBudget,
) -> None:
    location = opened.location
    wanted = {location.member(layer) for layer in layers}
    stems = {posixpath.splitext(m)[0] for m in wanted}
    stack.callback(opened.inflated.clear)  # the inflated bytes go with the product
    with opened.open_container() as handle:
        infos = zip_listing(handle, location.source_uri)
        # One in-memory folder per opened product, so an ENVI header lands beside its data file.
        folder = f"spectralearth-{os.getpid()}-{id(opened):x}"
        # Stored members are read in place (GDAL seeks straight to their bytes); only deflated ones
        # (and the header beside a deflated data file) are unpacked.
        unpacked = [
            info
            for info in infos
            if posixpath.splitext(info.filename)[0] in stems
            and not unsafe_member(info.filename)
            and not (info.compress_type == zipfile.ZIP_STORED and info.filename in wanted)
        ]
        # A data file too large for memory goes to scratch, and its header with it: GDAL looks for the
        # header beside the data file.
        to_scratch = {
            posixpath.splitext(info.filename)[0]
            for info in unpacked
            if info.file_size > opened.limits.memory_bytes
            or info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
        }
        for info in unpacked:
            stem = posixpath.splitext(info.filename)[0]
            name = posixpath.basename(info.filename)
            standard = info.compress_type in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
            if stem not in to_scratch:
                # Inflated straight into GDAL's in-memory file, allocated once at its size: the member
                # is the only copy held (the compressed bytes are read a piece at a time).
                memory = stack.enter_context(MemoryFile(dirname=folder, filename=name))
                allocate = functools.partial(_in_memory_buffer, memory)
                data = inflate_into(handle, info, allocate, opened.limits.memory_bytes)
                opened.local_members[info.filename] = memory.name
                opened.inflated[info.filename] = data
                continue
            chunks = member_chunks(handle, info) if standard else _zipfile_chunks(opened, info)
            target = os.path.join(scratch, "members", name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            write_member(chunks, target, info.file_size, info.filename, budget)
            opened.local_members[info.filename] = target


def _in_memory_buffer(memory: MemoryFile, size: int) -> memoryview:
    """A writable view of an in-memory GDAL file grown to `size` bytes in one step (its pages are
    touched only when written)."""
    if size:
        memory.seek(size - 1)
        memory.write(b"\0")
        memory.seek(0)
    return in_memory_view(memory)


def _zipfile_chunks(opened: OpenedProduct, info: zipfile.ZipInfo) -> Iterator[bytes]:
    """Members compressed otherwise (bzip2, LZMA): through the standard library."""
    with opened.open_zip() as archive, archive.open(info) as stream:
        yield from iter(lambda: stream.read(COPY_CHUNK), b"")
