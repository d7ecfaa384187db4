"""Find EnMAP L2A products under the inputs and open them, whatever their packaging.

Packagings: a product folder (also the ARD variant, `-SPECTRAL_IMAGE_COG.tiff` + `-METADATA.xml`), a
`<name>.ZIP` holding `<name>/`, and a DLR delivery `.tar.gz` with the ZIP somewhere inside. Inputs are
local paths or `s3://` URIs (through fsspec); rasters are opened by GDAL path (`/vsizip/`, `/vsis3/`).

A product's files are resolved from the listing of its container, by product name and layer suffix,
never by guessing sibling names. GDAL cannot open a ZIP inside a tar.gz in place, so that ZIP is
unpacked once, streaming and size-checked, into a scratch folder that is removed afterwards.

A deflated raster that a stage reads in full is inflated once per open (ISA-L's inflate, ~1.5x
zlib's speed, CRC-checked) into GDAL's in-memory file system, or into scratch when it is larger than
`SPECTRALEARTH_MEMORY_UNPACK_BYTES`: writing ~1 GB to a disk-backed scratch folder cost as much as
inflating it.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import struct
import tarfile
import tempfile
import zipfile
import zlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, cast

import fsspec
from isal import isal_zlib
from rasterio.io import MemoryFile

from pipeline.enmap.names import METADATA, SPECTRAL_IMAGE, find_product_names, parse_file_name
from pipeline.storage import gdal_path, join

ZIP_SUFFIXES = (".zip",)
TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")
SCENE_LIST_SUFFIXES = (".txt", ".list")
# A product ZIP is a few GB; anything claiming more is refused rather than filling the scratch disk.
MAX_UNPACKED_BYTES = int(os.environ.get("SPECTRALEARTH_MAX_UNPACKED_BYTES", 64 * 1024**3))
COPY_CHUNK = 8 * 1024 * 1024
# Deflated members up to this size are inflated into memory (/vsimem/), larger ones into scratch.
MEMORY_UNPACK_BYTES = int(os.environ.get("SPECTRALEARTH_MEMORY_UNPACK_BYTES", 3 * 1024**3))
# isal's stubs declare its error as an instance; it is the exception class.
INFLATE_ERROR = cast("type[Exception]", isal_zlib.error)
ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature ... file name length, extra field length


class ProductError(Exception):
    """A product (or archive) that cannot be used; the message is the one-line reason."""


@dataclass(frozen=True, slots=True)
class Rejection:
    source_uri: str
    scene_id: str | None
    stage: str
    reason: str


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
        if parsed and (
            parsed.suffix.endswith("_COG") or (parsed.layer == METADATA and parsed.extension == "xml")
        ):
            return "ard"
    return "standard"


def _unsafe_member(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":")


# Discovery -----------------------------------------------------------------------------------------


def discover(
    inputs: list[str], storage_options: dict | None = None
) -> tuple[list[ProductSource], list[Rejection]]:
    """Walk the inputs (folders, archives, scene-list files; local or s3://) and list product sources.

    Only listings are read here; archives are opened when a source is resolved, inside a task.
    """
    sources: list[ProductSource] = []
    rejections: list[Rejection] = []
    for uri in inputs:
        found = _discover_one(uri, storage_options or {}, rejections, depth=0)
        if not found and not any(r.source_uri == uri for r in rejections):
            rejections.append(Rejection(uri, None, "inventory", f"no EnMAP L2A product found under {uri}"))
        sources.extend(found)
    # The same source reached twice (a folder and a list naming a file inside it) is one source.
    unique = {(s.kind, s.uri): s for s in sources}
    return sorted(unique.values(), key=lambda s: (s.uri, s.kind)), rejections


def _discover_one(uri: str, options: dict, rejections: list[Rejection], depth: int) -> list[ProductSource]:
    fs, root = fsspec.core.url_to_fs(uri, **options)
    protocol = uri.split("://", 1)[0] + "://" if "://" in uri else ""

    def to_uri(path: str) -> str:
        return protocol + path if protocol and not path.startswith(protocol) else path

    if not fs.exists(root):
        rejections.append(Rejection(uri, None, "inventory", f"input does not exist: {uri}"))
        return []
    if fs.isdir(root):
        listing = fs.find(root, withdirs=False, detail=True)
    else:
        listing = {root: fs.info(root)}
        if root.lower().endswith(SCENE_LIST_SUFFIXES):
            if depth > 0:
                rejections.append(Rejection(uri, None, "inventory", "scene list names another scene list"))
                return []
            return _discover_list(fs, root, to_uri, options, rejections)

    sources: list[ProductSource] = []
    folders: dict[tuple[str, str], list[tuple[str, int]]] = defaultdict(list)
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
    for (directory, _), entries in sorted(folders.items()):
        sources.append(ProductSource("folder", to_uri(directory), tuple(sorted(entries))))
    return sources


def _discover_list(fs, root: str, to_uri, options: dict, rejections: list[Rejection]) -> list[ProductSource]:
    base = posixpath.dirname(root)
    sources: list[ProductSource] = []
    for line in fs.cat_file(root).decode("utf-8", errors="replace").splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if "://" not in entry and not entry.startswith("/"):
            entry = to_uri(posixpath.join(base, entry))
        found = _discover_one(entry, options, rejections, depth=1)
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


def _zip_listing(handle: IO[bytes], what: str) -> list[zipfile.ZipInfo]:
    try:
        with zipfile.ZipFile(handle) as archive:
            return archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as exc:
        raise ProductError(f"corrupt ZIP {what}: {exc}") from None


def _zip_products(
    infos: list[zipfile.ZipInfo], container_uri: str, packaging: str, inner_zip: str | None
) -> tuple[list[ProductLocation], list[Rejection]]:
    rejections = []
    members = []
    source = container_uri if inner_zip is None else f"{container_uri}!{inner_zip}"
    for info in infos:
        if info.is_dir():
            continue
        if _unsafe_member(info.filename):
            rejections.append(
                Rejection(
                    source,
                    None,
                    "inventory",
                    f"unsafe archive entry {info.filename!r} escapes the folder; skipped",
                )
            )
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


@contextlib.contextmanager
def _scratch_dir() -> Iterator[str]:
    base = os.environ.get("SPECTRALEARTH_SCRATCH") or None
    if base:
        os.makedirs(base, exist_ok=True)
    path = tempfile.mkdtemp(prefix="spectralearth-", dir=base)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _copy_member(stream: IO[bytes], target: str, declared: int, what: str) -> None:
    """Copy one archive member, refusing more bytes than its header declared or the global cap."""
    _write_member(iter(lambda: stream.read(COPY_CHUNK), b""), target, declared, what)


def _write_member(chunks: Iterator[bytes], target: str, declared: int, what: str) -> None:
    """Write an archive member's bytes to scratch: size-checked against its header, the global cap
    and the free space."""
    _check_declared(declared, what)
    free = shutil.disk_usage(os.path.dirname(target)).free
    if declared > free:
        raise ProductError(f"not enough scratch space to unpack {what} ({declared} bytes, {free} free)")
    with open(target, "wb") as out:
        for chunk in _bounded(chunks, declared, what):
            out.write(chunk)


def _check_declared(declared: int, what: str) -> None:
    if declared > MAX_UNPACKED_BYTES:
        raise ProductError(
            f"archive entry {what} declares {declared} bytes, above the {MAX_UNPACKED_BYTES} cap"
        )


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


def _member_bytes(handle: IO[bytes], info: zipfile.ZipInfo) -> bytes:
    """The uncompressed bytes of a stored or deflated ZIP member, inflated in one call (a streamed
    inflate plus growing the in-memory file cost ~0.6 s more per GB); size- and CRC-checked."""
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
    handle.seek(_member_data_offset(handle, info))
    inflater = isal_zlib.decompressobj(-15) if info.compress_type == zipfile.ZIP_DEFLATED else None
    remaining, crc = info.compress_size, 0
    try:
        while remaining:
            raw = handle.read(min(COPY_CHUNK, remaining))
            if not raw:
                raise ProductError(f"archive entry {info.filename} is truncated in the container")
            remaining -= len(raw)
            out = inflater.decompress(raw) if inflater else raw
            crc = isal_zlib.crc32(out, crc)
            yield out
        if inflater:
            tail = inflater.flush()
            crc = isal_zlib.crc32(tail, crc)
            yield tail
    except INFLATE_ERROR as exc:
        raise ProductError(f"corrupt ZIP entry {info.filename}: {exc}") from None
    _check_crc(info, crc)


@dataclass
class OpenedProduct:
    """A product ready to read: GDAL paths of its layers and its metadata bytes."""

    location: ProductLocation
    storage_options: dict
    local_zip: str | None = None  # the unpacked inner ZIP of a tar.gz delivery
    local_members: dict[str, str] = field(default_factory=dict)  # ZIP member -> unpacked copy

    def _zip_gdal_path(self) -> str:
        return self.local_zip if self.local_zip else gdal_path(self.location.container_uri)

    def gdal_path(self, layer: str) -> str:
        member = self.location.member(layer)
        if self.location.packaging == "folder":
            return gdal_path(join(self.location.container_uri, member))
        if member in self.local_members:
            return self.local_members[member]
        return f"/vsizip/{self._zip_gdal_path()}/{member}"

    @contextlib.contextmanager
    def open_container(self) -> Iterator[IO[bytes]]:
        """The product ZIP as a seekable binary file (local, or ranged reads through fsspec)."""
        if self.local_zip:
            handle: IO[bytes] = open(self.local_zip, "rb")
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

    def read_member(self, layer: str) -> bytes:
        member = self.location.member(layer)
        if self.location.packaging == "folder":
            with fsspec.open(
                join(self.location.container_uri, member), "rb", **self.storage_options
            ) as handle:
                return handle.read()
        with self.open_zip() as archive:
            try:
                return archive.read(member)
            except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
                raise ProductError(f"corrupt ZIP entry {member}: {exc}") from None

    def metadata_bytes(self) -> bytes:
        return self.read_member(METADATA)

    @property
    def spectral_path(self) -> str:
        return self.gdal_path(SPECTRAL_IMAGE)


def iter_products(
    source: ProductSource, storage_options: dict | None = None
) -> Iterator[OpenedProduct | Rejection]:
    """Every product of a source, opened; each is valid until the next one is asked for.

    A tar.gz is streamed once: each product ZIP in it is unpacked, yielded, and removed before the
    stream moves on, so scratch holds one unpacked archive at a time.
    """
    options = storage_options or {}
    if source.kind == "folder":
        for location in folder_products(source):
            yield OpenedProduct(location, options)
        return
    if source.kind == "zip":
        try:
            with fsspec.open(source.uri, "rb", **options) as handle:
                infos = _zip_listing(handle, posixpath.basename(source.uri))
        except ProductError as exc:
            yield Rejection(source.uri, None, "inventory", str(exc))
            return
        products, rejections = _zip_products(infos, source.uri, "zip", None)
        yield from rejections
        for location in products:
            yield OpenedProduct(location, options)
        return
    yield from _iter_tar(source, options)


def _iter_tar(source: ProductSource, options: dict) -> Iterator[OpenedProduct | Rejection]:
    found_any = False
    try:
        with fsspec.open(source.uri, "rb", **options) as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for info in tar:
                name = info.name
                if _unsafe_member(name) or info.issym() or info.islnk() or info.isdev():
                    yield Rejection(
                        source.uri,
                        None,
                        "inventory",
                        f"unsafe archive entry {name!r} escapes the folder; skipped",
                    )
                    continue
                if (
                    not info.isfile()
                    or not name.lower().endswith(ZIP_SUFFIXES)
                    or not find_product_names(name)
                ):
                    continue
                found_any = True
                with _scratch_dir() as scratch:
                    local_zip = os.path.join(scratch, "product.zip")
                    stream = tar.extractfile(info)
                    if stream is None:
                        continue
                    try:
                        _copy_member(stream, local_zip, info.size, name)
                        with open(local_zip, "rb") as handle:
                            infos = _zip_listing(handle, posixpath.basename(name))
                    except ProductError as exc:
                        yield Rejection(f"{source.uri}!{name}", None, "inventory", str(exc))
                        continue
                    products, rejections = _zip_products(infos, source.uri, "targz", name)
                    yield from rejections
                    for location in products:
                        yield OpenedProduct(location, options, local_zip=local_zip)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        yield Rejection(source.uri, None, "inventory", f"corrupt archive: {type(exc).__name__}: {exc}")
        return
    if not found_any:
        yield Rejection(source.uri, None, "inventory", "archive holds no EnMAP L2A product ZIP")


@contextlib.contextmanager
def open_product(
    location: ProductLocation, storage_options: dict | None = None, unpack: tuple[str, ...] = ()
) -> Iterator[OpenedProduct]:
    """Open one known product (for the stages after inventory).

    A tar.gz delivery's ZIP is unpacked to scratch first. `unpack` names layers that will be read in
    full: when such a layer sits deflated inside a ZIP, it (and its header sidecar) is inflated once,
    sequentially, into memory (or scratch, when large) for as long as the product is open, because
    GDAL's random access into a deflate stream restarts decompression on every backward seek, which
    made a band-by-band read of a 75 MB ENVI BIL cube take ~50 s instead of ~0.2 s.
    """
    options = storage_options or {}
    with _scratch_dir() as scratch:
        opened = OpenedProduct(location, options)
        if location.packaging == "targz":
            opened.local_zip = os.path.join(scratch, "product.zip")
            with (
                fsspec.open(location.container_uri, "rb", **options) as raw,
                tarfile.open(fileobj=raw, mode="r|*") as tar,
            ):
                for info in tar:
                    if info.name == location.inner_zip and info.isfile():
                        stream = tar.extractfile(info)
                        if stream is None:
                            break
                        _copy_member(stream, opened.local_zip, info.size, info.name)
                        break
                else:
                    raise ProductError(f"{location.inner_zip} is no longer in {location.container_uri}")
        with contextlib.ExitStack() as stack:
            if location.packaging != "folder" and unpack:
                _unpack_deflated(opened, unpack, scratch, stack)
            yield opened


def _unpack_deflated(
    opened: OpenedProduct, layers: tuple[str, ...], scratch: str, stack: contextlib.ExitStack
) -> None:
    location = opened.location
    wanted = {location.member(layer) for layer in layers}
    stems = {posixpath.splitext(m)[0] for m in wanted}
    with opened.open_container() as handle:
        try:
            with zipfile.ZipFile(handle) as archive:
                infos = archive.infolist()
        except (zipfile.BadZipFile, EOFError) as exc:
            raise ProductError(f"corrupt ZIP {location.source_uri}: {exc}") from None
        # One in-memory folder per opened product, so an ENVI header lands beside its data file.
        folder = f"spectralearth-{os.getpid()}-{id(opened):x}"
        for info in infos:
            stem = posixpath.splitext(info.filename)[0]
            if stem not in stems or _unsafe_member(info.filename):
                continue
            # Stored members are read in place (GDAL seeks straight to their bytes); only deflated ones
            # (and the header beside a deflated data file) are unpacked.
            if info.compress_type == zipfile.ZIP_STORED and info.filename in wanted:
                continue
            name = posixpath.basename(info.filename)
            _check_declared(info.file_size, info.filename)
            standard = info.compress_type in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
            if standard and info.file_size <= MEMORY_UNPACK_BYTES:
                # MemoryFile serves the bytes object in place: no copy.
                memory = stack.enter_context(
                    MemoryFile(_member_bytes(handle, info), dirname=folder, filename=name)
                )
                opened.local_members[info.filename] = memory.name
                continue
            chunks = _member_chunks(handle, info) if standard else _zipfile_chunks(opened, info)
            target = os.path.join(scratch, "members", name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            _write_member(chunks, target, info.file_size, info.filename)
            opened.local_members[info.filename] = target


def _zipfile_chunks(opened: OpenedProduct, info: zipfile.ZipInfo) -> Iterator[bytes]:
    """Members compressed otherwise (bzip2, LZMA): through the standard library."""
    with opened.open_zip() as archive, archive.open(info) as stream:
        yield from iter(lambda: stream.read(COPY_CHUNK), b"")
