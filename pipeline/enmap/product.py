"""Find EnMAP L2A products under the inputs and open them, whatever their packaging.

Packagings: a product folder (also the ARD variant, `-SPECTRAL_IMAGE_COG.tiff` + `-METADATA.xml`), a
`<name>.ZIP` holding `<name>/`, and a DLR delivery `.tar.gz` with the ZIP somewhere inside. Inputs are
local paths or `s3://` URIs (through fsspec); rasters are opened by GDAL path (`/vsizip/`, `/vsimem/`).
The stages hand `open_product`/`iter_products` a `Fetcher` (`pipeline.fetch.ProductFetcher`): a remote
product is then brought here once, whole (a folder's files, its ZIP, its tar.gz), in a few large ranged
GETs, into memory (GDAL serves it from `/vsimem/`) or, past `limits.memory_bytes`, into scratch, and
read from there; GDAL's `/vsis3/` would cost a request per strip or block.

A product's files are resolved from the listing of its container, by product name and layer suffix,
never by guessing sibling names. GDAL cannot open a ZIP inside a tar.gz in place, so that ZIP is
unpacked once, streaming and size-checked, into a scratch folder that is removed afterwards.

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

Faults are kept apart from product properties: an OSError or network error while listing or reading
(permission, disk full, connection refused) propagates as an exception, so the stage retries it;
only what the bytes say (a corrupt ZIP, a bomb, an escaping entry) becomes a `ProductError`.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import io
import json
import os
import posixpath
import shutil
import socket
import struct
import tarfile
import tempfile
import time
import zipfile
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Protocol, cast

import fsspec
import numpy as np
import psutil
from isal import isal_zlib
from rasterio.io import MemoryFile

from pipeline.enmap.names import METADATA, SPECTRAL_IMAGE, find_product_names, parse_file_name
from pipeline.errors import is_transient
from pipeline.manifest import Limits
from pipeline.storage import gdal_path, is_remote, join
from pipeline.tables import Rejection

ZIP_SUFFIXES = (".zip",)
TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")
SCENE_LIST_SUFFIXES = (".txt", ".list")
COPY_CHUNK = 8 * 1024 * 1024
# Scratch folders are `<SPECTRALEARTH_SCRATCH or the system temp folder>/spectralearth-scratch-*`,
# each with an owner file naming the host, pid and process start time of the task that made it.
SCRATCH_PREFIX = "spectralearth-scratch-"
SCRATCH_OWNER = "owner.json"
# A scratch folder without a readable owner file (its task was killed between creating it and
# writing the file) is stale once it is this old.
UNOWNED_SCRATCH_AGE_S = 600.0
# Deflate cannot expand data by more than ~0.03 % plus a few bytes per block; a member whose
# compressed size claims more than this over its uncompressed size is corrupt.
DEFLATE_SLACK = 1 / 100
# isal's stubs declare its error as an instance; it is the exception class.
INFLATE_ERROR = cast("type[Exception]", isal_zlib.error)
ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature ... file name length, extra field length
# Brings remote objects here ((uri, size or None), scratch folder, scratch budget) -> uri -> the bytes, or
# the path of a file in that scratch folder; `pipeline.fetch.ProductFetcher` is the one used (large
# ranged GETs). Without one, remote products are read in place (GDAL's /vsis3/, fsspec).
Fetcher = Callable[[Sequence[tuple[str, int | None]], str, "ScratchBudget"], Mapping[str, MemoryFile | str]]


class RemoteReader(Protocol):
    """Reads remote objects in place, in large blocks (`pipeline.fetch.BlockReader`): for Python
    (`open`) and for GDAL (`gdal_path`)."""

    def add_sizes(self, sizes: Mapping[str, int]) -> None: ...

    def open(self, uri: str) -> IO[bytes]: ...

    def gdal_path(self, uri: str) -> str: ...


class ProductError(Exception):
    """A product (or archive) that cannot be used; the message is the one-line reason."""


class ArchiveRejected(ProductError):
    """An archive refused whole (an entry escapes its folder: it is not a genuine delivery). Raised by
    `iter_products` even after products of the archive were yielded: the caller drops them."""


def format_size(size: int) -> str:
    """`20.0 GiB`, `3.0 MiB`, `512 bytes`: sizes as a user reads them in a reason."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def over_budget(what: str, verb: str, size: int, budget: int, kind: str) -> str:
    """The one-line reason for something over a budget, with both sizes."""
    return f"{what} {verb} {format_size(size)}, over the {format_size(budget)} {kind} budget"


@dataclass
class ScratchBudget:
    """What one opened product may still unpack to scratch (`limits.scratch_bytes` in all)."""

    limit: int
    used: int = 0

    def reserve(self, size: int, what: str) -> None:
        if self.used + size > self.limit:
            already = f" ({format_size(self.used)} of it already unpacked)" if self.used else ""
            raise ProductError(over_budget(what, "unpacks to", size, self.limit, "scratch") + already)
        self.used += size


@dataclass(frozen=True, slots=True)
class ProductSource:
    """Something found under the inputs that holds products: a folder's product files, a ZIP, a tar."""

    kind: str  # "folder" | "zip" | "tar"
    uri: str
    # For folders: the product files in it as (basename, size); archives are listed when resolved.
    entries: tuple[tuple[str, int], ...] = ()
    # Size and modification stamp of an archive, so a rerun can tell a changed input from the same one.
    stamp: str = ""


@dataclass(frozen=True, slots=True)
class ProductLocation:
    """Where one product's files are: its container and the members that belong to it."""

    scene_id: str
    packaging: str  # "folder" | "zip" | "targz"
    variant: str  # "standard" | "ard"
    container_uri: str  # the product folder, the ZIP, or the tar.gz
    inner_zip: str | None  # for "targz": the tar member that is the product ZIP
    members: tuple[tuple[str, int], ...]  # (path relative to the container or ZIP, size in bytes)

    @property
    def source_uri(self) -> str:
        return self.container_uri if self.inner_zip is None else f"{self.container_uri}!{self.inner_zip}"

    def layers(self) -> dict[str, str]:
        """Layer name (`SPECTRAL_IMAGE`, `QL_QUALITY_CLOUD`, `METADATA`...) -> member path.

        Header and auxiliary sidecars (`.HDR`) are not layers; GDAL finds them beside the data file.
        """
        out: dict[str, str] = {}
        for member, _ in self.members:
            parsed = parse_file_name(posixpath.basename(member))
            if parsed is None or parsed.product != self.scene_id or parsed.is_sidecar:
                continue
            if parsed.layer in out:
                raise ProductError(f"two files hold layer {parsed.layer}: {out[parsed.layer]} and {member}")
            out[parsed.layer] = member
        return out

    def member(self, layer: str) -> str:
        try:
            return self.layers()[layer]
        except KeyError:
            raise ProductError(f"missing file: no {layer} in the product") from None

    def basenames(self) -> dict[str, int]:
        return {posixpath.basename(m): size for m, size in self.members}


def _variant(names: list[str]) -> str:
    for name in names:
        parsed = parse_file_name(posixpath.basename(name))
        # The COG rasters make the ARD variant; how the metadata is spelt does not (a portal renames
        # standard products' metadata to `-METADATA.XML.XML` too).
        if parsed and parsed.is_cog:
            return "ard"
    return "standard"


def _unsafe_member(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":")


# Discovery -----------------------------------------------------------------------------------------


def discover(
    inputs: list[str], storage_options: dict | None = None, limits: Limits = Limits()
) -> tuple[list[ProductSource], list[Rejection]]:
    """Walk the inputs (folders, archives, scene-list files; local or s3://) and list product sources.

    Only listings are read here; archives are opened when a source is resolved, inside a task. A
    listing that fails (permission, network) raises: an input that cannot be read now is not
    rejected. Symlinks in a local input are followed when they stay inside it and reported (a
    rejection with the reason) when they leave it or lead nowhere.
    """
    clean_stale_scratch()
    sources: list[ProductSource] = []
    rejections: list[Rejection] = []
    for uri in inputs:
        found = _discover_one(uri, storage_options or {}, rejections, depth=0, limits=limits)
        if not found and not any(r.source_uri == uri for r in rejections):
            rejections.append(Rejection(uri, None, "inventory", f"no EnMAP L2A product found under {uri}"))
        sources.extend(found)
    # The same source reached twice (a folder and a list naming a file inside it) is one source.
    unique = {(s.kind, s.uri): s for s in sources}
    return sorted(unique.values(), key=lambda s: (s.uri, s.kind)), rejections


def _discover_one(
    uri: str, options: dict, rejections: list[Rejection], depth: int, limits: Limits
) -> list[ProductSource]:
    fs, root = fsspec.core.url_to_fs(uri, **options)
    protocol = uri.split("://", 1)[0] + "://" if "://" in uri else ""

    def to_uri(path: str) -> str:
        return protocol + path if protocol and not path.startswith(protocol) else path

    if not fs.exists(root):
        rejections.append(Rejection(uri, None, "inventory", f"input does not exist: {uri}"))
        return []
    if fs.isdir(root):
        if _is_local(fs):
            listing = _local_listing(root, rejections)
        else:
            listing = fs.find(root, withdirs=False, detail=True)
    else:
        listing = {root: fs.info(root)}
        if root.lower().endswith(SCENE_LIST_SUFFIXES):
            if depth > 0:
                rejections.append(Rejection(uri, None, "inventory", "scene list names another scene list"))
                return []
            size = int(listing[root].get("size") or 0)
            if size > limits.memory_bytes:
                reason = over_budget("scene list", "holds", size, limits.memory_bytes, "memory")
                rejections.append(Rejection(uri, None, "inventory", reason))
                return []
            return _discover_list(fs, root, to_uri, options, rejections, limits)

    sources: list[ProductSource] = []
    folders: dict[tuple[str, str], list[tuple[str, int]]] = defaultdict(list)
    folder_stamps: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path, info in sorted(listing.items()):
        lower = path.lower()
        basename = posixpath.basename(path)
        size = int(info.get("size") or 0)
        stamp = f"{size}:{info.get('mtime') or info.get('ETag') or info.get('LastModified') or ''}"
        if lower.endswith(ZIP_SUFFIXES):
            sources.append(ProductSource("zip", to_uri(path), stamp=stamp))
        elif lower.endswith(TAR_SUFFIXES):
            sources.append(ProductSource("tar", to_uri(path), stamp=stamp))
        elif (parsed := parse_file_name(basename)) is not None:
            folders[(posixpath.dirname(path), parsed.product)].append((basename, size))
            folder_stamps[(posixpath.dirname(path), parsed.product)].append(f"{basename}:{stamp}")
    for key, entries in sorted(folders.items()):
        # Every file's name, size and modification stamp (mtime or ETag): a file rewritten in place
        # with the same size is a changed product, found without reading it.
        stamp = hashlib.sha256("\n".join(sorted(folder_stamps[key])).encode()).hexdigest()[:24]
        sources.append(ProductSource("folder", to_uri(key[0]), tuple(sorted(entries)), stamp=stamp))
    return sources


def _is_local(fs: Any) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,)
    return bool({"file", "local"} & set(protocols))


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _local_listing(root: str, rejections: list[Rejection]) -> dict[str, dict[str, Any]]:
    """Every file under a local folder, as fsspec's `find(detail=True)` lists it, with symlinks
    resolved: a link whose target stays inside the input is followed (a linked file is listed under
    the link's name, with its target's size; a linked folder is reached through its real path, which
    the walk visits anyway, so nothing is found twice and a loop cannot recur), a link that leaves
    the input or leads nowhere is a rejection with its reason. A folder that cannot be listed raises.
    """
    real_root = os.path.realpath(root)
    listing: dict[str, dict[str, Any]] = {}

    def fail(exc: OSError) -> None:
        raise exc

    for directory, dirnames, filenames in os.walk(root, onerror=fail):
        for name in sorted(dirnames + filenames):
            path = os.path.join(directory, name)
            if os.path.islink(path):
                target = os.path.realpath(path)
                if not os.path.exists(target):
                    reason = f"broken symlink: {path} -> {os.readlink(path)} leads nowhere"
                    rejections.append(Rejection(path, None, "inventory", reason))
                    continue
                if not _inside(target, real_root):
                    reason = f"symlink leaves the input: {path} -> {target} is outside {root}"
                    rejections.append(Rejection(path, None, "inventory", reason))
                    continue
                if os.path.isdir(target):
                    continue  # walked through its real path
            elif name in dirnames:
                continue
            stat = os.stat(path)
            listing[path] = {"name": path, "size": stat.st_size, "type": "file", "mtime": stat.st_mtime}
    return listing


def _discover_list(
    fs: Any, root: str, to_uri: Any, options: dict, rejections: list[Rejection], limits: Limits
) -> list[ProductSource]:
    base = posixpath.dirname(root)
    sources: list[ProductSource] = []
    for line in fs.cat_file(root).decode("utf-8", errors="replace").splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if "://" not in entry and not entry.startswith("/"):
            entry = to_uri(posixpath.join(base, entry))
        found = _discover_one(entry, options, rejections, depth=1, limits=limits)
        if not found and not any(r.source_uri == entry for r in rejections):
            rejections.append(
                Rejection(entry, None, "inventory", f"no EnMAP L2A product found under {entry}")
            )
        sources.extend(found)
    return sources


# Resolving sources into products -------------------------------------------------------------------


def _group_members(members: list[tuple[str, int]]) -> dict[str, list[tuple[str, int]]]:
    groups: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for member, size in members:
        parsed = parse_file_name(posixpath.basename(member))
        if parsed is not None:
            groups[parsed.product].append((member, size))
    return groups


def folder_products(source: ProductSource) -> list[ProductLocation]:
    out = []
    for scene_id, entries in sorted(_group_members(list(source.entries)).items()):
        names = [name for name, _ in entries]
        out.append(
            ProductLocation(scene_id, "folder", _variant(names), source.uri, None, tuple(sorted(entries)))
        )
    return out


def _corrupt_bytes_error(exc: BaseException) -> bool:
    """An OSError that the archive's bytes caused (a gzip or bzip2 stream that is not one, a seek to a
    negative offset a corrupt directory names), as opposed to a fault of the file system or network."""
    if not isinstance(exc, OSError) or is_transient(exc):
        return False
    return isinstance(exc, gzip.BadGzipFile) or exc.errno in (None, errno.EINVAL)


def _zip_listing(handle: IO[bytes], what: str) -> list[zipfile.ZipInfo]:
    try:
        with zipfile.ZipFile(handle) as archive:
            return archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, NotImplementedError) as exc:
        raise ProductError(f"corrupt ZIP {what}: {exc}") from None
    except OSError as exc:
        if not _corrupt_bytes_error(exc):
            raise
        raise ProductError(f"corrupt ZIP {what}: {exc}") from None


def _zip_products(
    infos: list[zipfile.ZipInfo], container_uri: str, packaging: str, inner_zip: str | None
) -> tuple[list[ProductLocation], list[Rejection]]:
    """The products an archive listing holds; ArchiveRejected when any entry escapes its folder."""
    rejections: list[Rejection] = []
    members = []
    source = container_uri if inner_zip is None else f"{container_uri}!{inner_zip}"
    for info in infos:
        if _unsafe_member(info.filename):
            raise ArchiveRejected(_escape_reason(info.filename))
        if info.is_dir():
            continue
        members.append((info.filename, info.file_size))
    products = []
    for scene_id, entries in sorted(_group_members(members).items()):
        names = [m for m, _ in entries]
        products.append(
            ProductLocation(
                scene_id, packaging, _variant(names), container_uri, inner_zip, tuple(sorted(entries))
            )
        )
    if not products and not rejections:
        rejections.append(Rejection(source, None, "inventory", "archive holds no EnMAP L2A product"))
    return products, rejections


def _escape_reason(name: str, detail: str = "escapes its folder") -> str:
    return f"archive rejected whole: entry {name!r} {detail}"


def _tar_entry_problem(info: tarfile.TarInfo) -> str | None:
    """Why a tar entry makes its archive untrustworthy, or None: a path or link that leaves the
    archive's folder, or a device/FIFO (no genuine delivery holds one)."""
    if _unsafe_member(info.name):
        return _escape_reason(info.name)
    if info.issym():
        target = posixpath.normpath(posixpath.join(posixpath.dirname(info.name), info.linkname))
        if info.linkname.startswith(("/", "\\")) or _unsafe_member(target):
            return _escape_reason(info.name, f"is a symlink to {info.linkname!r}, outside its folder")
    if info.islnk() and _unsafe_member(info.linkname):
        return _escape_reason(info.name, f"is a hard link to {info.linkname!r}, outside its folder")
    if info.isdev():
        return _escape_reason(info.name, "is a device or FIFO")
    return None


# Scratch ----------------------------------------------------------------------------------------


def scratch_base() -> str:
    """Where scratch folders live: `SPECTRALEARTH_SCRATCH`, else the system's temporary folder."""
    return os.environ.get("SPECTRALEARTH_SCRATCH") or tempfile.gettempdir()


def _process_start(pid: int) -> float | None:
    """The start time of a live process, None when there is none with that pid."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return float(process.create_time())
    except psutil.NoSuchProcess:
        return None
    except psutil.AccessDenied:
        return -1.0  # it exists, we may not look at it: alive


def _owner_alive(owner: dict[str, Any]) -> bool:
    started = _process_start(int(owner["pid"]))
    if started is None:
        return False
    # A pid reused by a later process is not the owner (start times agree to well within a second).
    return started < 0 or abs(started - float(owner["started"])) < 1.0


def clean_stale_scratch(base: str | None = None) -> list[str]:
    """Remove the scratch folders whose owning process (on this host) is gone; returns their paths.

    Cheap (one listing of the scratch folder): called at the start of `discover` and `open_product`,
    so the scratch of a killed task is removed by the next task on the machine.
    """
    base = base or scratch_base()
    try:
        entries = list(os.scandir(base))
    except FileNotFoundError:
        return []
    host = socket.gethostname()
    removed = []
    for entry in sorted(entries, key=lambda e: e.name):
        if not entry.name.startswith(SCRATCH_PREFIX) or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            with open(os.path.join(entry.path, SCRATCH_OWNER), encoding="utf-8") as handle:
                owner = json.load(handle)
            stale = owner["host"] == host and not _owner_alive(owner)
        except FileNotFoundError:
            try:
                stale = time.time() - entry.stat(follow_symlinks=False).st_mtime > UNOWNED_SCRATCH_AGE_S
            except FileNotFoundError:
                continue  # removed meanwhile by another cleaner or its owner
        except (ValueError, KeyError, TypeError):
            stale = time.time() - entry.stat(follow_symlinks=False).st_mtime > UNOWNED_SCRATCH_AGE_S
        if stale:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    return removed


@contextlib.contextmanager
def _scratch_dir() -> Iterator[str]:
    base = scratch_base()
    os.makedirs(base, exist_ok=True)
    path = tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=base)
    try:
        owner = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": _process_start(os.getpid()),
        }
        staging = os.path.join(path, SCRATCH_OWNER + ".tmp")
        with open(staging, "w", encoding="utf-8") as handle:
            json.dump(owner, handle)
        os.replace(staging, os.path.join(path, SCRATCH_OWNER))
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _copy_member(stream: IO[bytes], target: str, declared: int, what: str, budget: ScratchBudget) -> None:
    """Copy one archive member, refusing more bytes than its header declared or the scratch budget."""
    _write_member(iter(lambda: stream.read(COPY_CHUNK), b""), target, declared, what, budget)


def _write_member(
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
        for chunk in _bounded(chunks, declared, what):
            out.write(chunk)


def _bounded(chunks: Iterator[bytes], declared: int, what: str) -> Iterator[bytes]:
    """The chunks, refusing more bytes than declared and fewer at the end."""
    written = 0
    for chunk in chunks:
        written += len(chunk)
        if written > declared:
            raise ProductError(f"archive entry {what} is larger than its declared {declared} bytes")
        yield chunk
    if written != declared:
        raise ProductError(f"archive entry {what} is truncated: {written} of {declared} bytes")


def _member_data_offset(handle: IO[bytes], info: zipfile.ZipInfo) -> int:
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


def _member_bytes(handle: IO[bytes], info: zipfile.ZipInfo, memory_bytes: int, kind: str = "memory") -> bytes:
    """The uncompressed bytes of a stored or deflated ZIP member, inflated in one call (a streamed
    inflate plus growing the in-memory file cost ~0.6 s more per GB); refused before reading when it
    declares more than `memory_bytes`, never inflated past its declared size; CRC-checked."""
    if info.file_size > memory_bytes:
        raise ProductError(
            over_budget(f"member {info.filename}", "inflates to", info.file_size, memory_bytes, kind)
        )
    _check_compressed_size(info)
    handle.seek(_member_data_offset(handle, info))
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


def _member_chunks(handle: IO[bytes], info: zipfile.ZipInfo) -> Iterator[bytes]:
    """The uncompressed bytes of a stored or deflated ZIP member, streamed and CRC-checked (for members
    too large to hold in memory)."""
    _check_compressed_size(info)
    handle.seek(_member_data_offset(handle, info))
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
                for info in _zip_listing(handle, posixpath.basename(self.location.source_uri))
            }
            if member not in infos:
                raise ProductError(f"missing file: {member} is no longer in the archive")
            info = infos[member]
            if info.compress_type in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                return _member_bytes(handle, info, budget, kind)
        if info.file_size > budget:
            raise ProductError(over_budget(f"member {member}", "inflates to", info.file_size, budget, kind))
        return b"".join(_bounded(_zipfile_chunks(self, info), info.file_size, member))

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
    yielded, and removed before the stream moves on, so scratch holds one unpacked archive at a time.
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
    remote = fetcher is not None and is_remote(source.uri)
    if source.kind == "folder":
        for location in folder_products(source):
            if fetcher is not None and remote:
                with _scratch_dir() as scratch, contextlib.ExitStack() as stack:
                    opened = OpenedProduct(location, options, limits=limits)
                    _attach_folder(opened, fetcher, scratch, stack, ScratchBudget(limits.scratch_bytes))
                    yield opened
            else:
                yield OpenedProduct(location, options, limits=limits)
        return
    if fetcher is not None and remote:
        with _scratch_dir() as scratch, contextlib.ExitStack() as stack:
            budget = ScratchBudget(limits.scratch_bytes)
            copy = fetcher([(source.uri, None)], os.path.join(scratch, "fetched"), budget)[source.uri]
            if isinstance(copy, MemoryFile):
                stack.callback(copy.close)
            if source.kind == "zip":
                yield from _iter_zip(source, options, limits, copy)
            else:
                yield from _iter_tar(source, options, limits, copy)
        return
    if source.kind == "zip":
        yield from _iter_zip(source, options, limits)
        return
    yield from _iter_tar(source, options, limits)


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
            infos = _zip_listing(handle, posixpath.basename(source.uri))
    except ArchiveRejected:
        raise
    except ProductError as exc:
        yield Rejection(source.uri, None, "inventory", str(exc))
        return
    products, rejections = _zip_products(infos, source.uri, "zip", None)
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
    return isinstance(exc, tarfile.TarError | EOFError | zlib.error) or _corrupt_bytes_error(exc)


def _iter_tar(
    source: ProductSource, options: dict, limits: Limits, copy: MemoryFile | str | None = None
) -> Iterator[OpenedProduct | Rejection]:
    found_any = False
    with _open_object(source.uri, options, copy) as raw:
        try:
            tar = tarfile.open(fileobj=raw, mode="r|*")
        except Exception as exc:
            if not _tar_corrupt(exc):
                raise
            yield Rejection(source.uri, None, "inventory", f"corrupt archive: {type(exc).__name__}: {exc}")
            return
        with tar:
            entries = iter(tar)
            while True:
                try:
                    info = next(entries)
                except StopIteration:
                    break
                except Exception as exc:
                    if not _tar_corrupt(exc):
                        raise
                    reason = f"corrupt archive: {type(exc).__name__}: {exc}"
                    yield Rejection(source.uri, None, "inventory", reason)
                    return
                problem = _tar_entry_problem(info)
                if problem:
                    raise ArchiveRejected(problem)
                name = info.name
                if (
                    not info.isfile()
                    or not name.lower().endswith(ZIP_SUFFIXES)
                    or not find_product_names(name)
                ):
                    if info.size > limits.scratch_bytes:
                        # Streaming past it would inflate that much (CPU, not disk): no entry of a
                        # usable delivery is larger than what one product may unpack.
                        reason = over_budget(
                            f"entry {name}", "declares", info.size, limits.scratch_bytes, "scratch"
                        )
                        yield Rejection(source.uri, None, "inventory", reason)
                        return
                    continue
                found_any = True
                with _scratch_dir() as scratch:
                    local_zip = os.path.join(scratch, "product.zip")
                    stream = tar.extractfile(info)
                    if stream is None:
                        continue
                    try:
                        _copy_member(stream, local_zip, info.size, name, ScratchBudget(limits.scratch_bytes))
                        with open(local_zip, "rb") as handle:
                            infos = _zip_listing(handle, posixpath.basename(name))
                        products, rejections = _zip_products(infos, source.uri, "targz", name)
                    except ArchiveRejected:
                        raise
                    except ProductError as exc:
                        yield Rejection(f"{source.uri}!{name}", None, "inventory", str(exc))
                        continue
                    except Exception as exc:
                        if not _tar_corrupt(exc):
                            raise
                        reason = f"corrupt archive: {type(exc).__name__}: {exc}"
                        yield Rejection(source.uri, None, "inventory", reason)
                        return
                    yield from rejections
                    for location in products:
                        yield OpenedProduct(location, options, local_zip=local_zip, limits=limits)
    if not found_any:
        yield Rejection(source.uri, None, "inventory", "archive holds no EnMAP L2A product ZIP")


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

    A tar.gz delivery's ZIP is unpacked to scratch first. `unpack` names layers that will be read in
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
    with _scratch_dir() as scratch:
        opened = OpenedProduct(location, options, limits=limits)
        remote = fetcher is not None and is_remote(location.container_uri)
        with contextlib.ExitStack() as stack:
            if location.packaging == "targz":
                opened.local_zip = os.path.join(scratch, "product.zip")
                copy = None
                if fetcher is not None and remote:
                    uri = location.container_uri
                    copy = fetcher([(uri, None)], os.path.join(scratch, "fetched"), budget)[uri]
                try:
                    _unpack_inner_zip(location, options, opened.local_zip, budget, copy)
                finally:  # the unpacked ZIP is what is read from now on
                    if isinstance(copy, str):
                        os.remove(copy)
                    elif copy is not None:
                        copy.close()
            elif fetcher is not None and remote and location.packaging == "zip":
                _attach_zip(opened, fetcher, scratch, stack, budget)
            elif fetcher is not None and remote:
                _attach_folder(opened, fetcher, scratch, stack, budget)
            if location.packaging != "folder" and unpack:
                _unpack_deflated(opened, unpack, scratch, stack, budget)
            yield opened


def _unpack_inner_zip(
    location: ProductLocation,
    options: dict,
    target: str,
    budget: ScratchBudget,
    copy: MemoryFile | str | None = None,
) -> None:
    """Stream a tar.gz delivery (in place, or its fetched `copy`) to its product ZIP and unpack that
    (within the scratch budget); a corrupt stream is a ProductError, a storage fault propagates."""
    with _open_object(location.container_uri, options, copy) as raw:
        try:
            with tarfile.open(fileobj=raw, mode="r|*") as tar:
                for info in tar:
                    if info.name == location.inner_zip and info.isfile():
                        stream = tar.extractfile(info)
                        if stream is None:
                            break
                        _copy_member(stream, target, info.size, info.name, budget)
                        return
        except ProductError:
            raise
        except Exception as exc:
            if not _tar_corrupt(exc):
                raise
            raise ProductError(f"corrupt archive: {type(exc).__name__}: {exc}") from None
    raise ProductError(f"{location.inner_zip} is no longer in {location.container_uri}")


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
    with opened.open_container() as handle:
        infos = _zip_listing(handle, location.source_uri)
        # One in-memory folder per opened product, so an ENVI header lands beside its data file.
        folder = f"spectralearth-{os.getpid()}-{id(opened):x}"
        # Stored members are read in place (GDAL seeks straight to their bytes); only deflated ones
        # (and the header beside a deflated data file) are unpacked.
        unpacked = [
            info
            for info in infos
            if posixpath.splitext(info.filename)[0] in stems
            and not _unsafe_member(info.filename)
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
                # MemoryFile serves the bytes object in place: no copy.
                data = _member_bytes(handle, info, opened.limits.memory_bytes)
                memory = stack.enter_context(MemoryFile(data, dirname=folder, filename=name))
                opened.local_members[info.filename] = memory.name
                continue
            chunks = _member_chunks(handle, info) if standard else _zipfile_chunks(opened, info)
            target = os.path.join(scratch, "members", name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            _write_member(chunks, target, info.file_size, info.filename, budget)
            opened.local_members[info.filename] = target


def _zipfile_chunks(opened: OpenedProduct, info: zipfile.ZipInfo) -> Iterator[bytes]:
    """Members compressed otherwise (bzip2, LZMA): through the standard library."""
    with opened.open_zip() as archive, archive.open(info) as stream:
        yield from iter(lambda: stream.read(COPY_CHUNK), b"")
