"""Finding products under the inputs, and resolving a source into its products.

`discover` walks the inputs (folders, archives, scene-list files; local or s3://), reading only
listings, into `ProductSource`s; a listing that fails raises (an input that cannot be read now is not
rejected). Local symlinks are followed when they stay inside the input and reported when they leave it
or lead nowhere. A source's listing (a folder's files, an archive's entries) resolves into
`ProductLocation`s, one per product, by product name and layer suffix, never by guessing sibling names;
an archive with an entry that escapes its folder (a path, a link, a device) is rejected whole
(`ArchiveRejected`). Opening the products is `pipeline.enmap.product`'s.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import tarfile
import zipfile
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO, Any

import fsspec

from pipeline.enmap.names import parse_file_name
from pipeline.enmap.product_errors import ArchiveRejected, ProductError, corrupt_bytes_error, over_budget
from pipeline.enmap.scratch import clean_stale_scratch
from pipeline.manifest import Limits
from pipeline.tables import Rejection

ZIP_SUFFIXES = (".zip",)


TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")


SCENE_LIST_SUFFIXES = (".txt", ".list")


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


def unsafe_member(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":")


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
            return _sources_of(_local_listing(root, rejections), to_uri)
        return _sources_of(fs.find(root, withdirs=False, detail=True), to_uri)
    listing = {root: fs.info(root)}
    if not root.lower().endswith(SCENE_LIST_SUFFIXES):
        return _sources_of(listing, to_uri)
    problem = _scene_list_problem(int(listing[root].get("size") or 0), depth, limits)
    if problem is not None:
        rejections.append(Rejection(uri, None, "inventory", problem))
        return []
    return _discover_list(fs, root, to_uri, options, rejections, limits)


def _scene_list_problem(size: int, depth: int, limits: Limits) -> str | None:
    """Why a scene list is not read, or None: a list named by another list, or one over the memory
    budget (it is read whole)."""
    if depth > 0:
        return "scene list names another scene list"
    if size > limits.memory_bytes:
        return over_budget("scene list", "holds", size, limits.memory_bytes, "memory")
    return None


def _sources_of(
    listing: Mapping[str, Mapping[str, Any]], to_uri: Callable[[str], str]
) -> list[ProductSource]:
    """The product sources in a listing (path -> fsspec info): each ZIP and tar, and each folder's
    product files, grouped by folder and product."""
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


def zip_listing(handle: IO[bytes], what: str) -> list[zipfile.ZipInfo]:
    try:
        with zipfile.ZipFile(handle) as archive:
            return archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, NotImplementedError) as exc:
        raise ProductError(f"corrupt ZIP {what}: {exc}") from None
    except OSError as exc:
        if not corrupt_bytes_error(exc):
            raise
        raise ProductError(f"corrupt ZIP {what}: {exc}") from None


def zip_products(
    infos: list[zipfile.ZipInfo], container_uri: str, packaging: str, inner_zip: str | None
) -> tuple[list[ProductLocation], list[Rejection]]:
    """The products an archive listing holds; ArchiveRejected when any entry escapes its folder."""
    rejections: list[Rejection] = []
    members = []
    source = container_uri if inner_zip is None else f"{container_uri}!{inner_zip}"
    for info in infos:
        if unsafe_member(info.filename):
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


def tar_entry_problem(info: tarfile.TarInfo) -> str | None:
    """Why a tar entry makes its archive untrustworthy, or None: a path or link that leaves the
    archive's folder, or a device/FIFO (no genuine delivery holds one)."""
    if unsafe_member(info.name):
        return _escape_reason(info.name)
    if info.issym():
        target = posixpath.normpath(posixpath.join(posixpath.dirname(info.name), info.linkname))
        if info.linkname.startswith(("/", "\\")) or unsafe_member(target):
            return _escape_reason(info.name, f"is a symlink to {info.linkname!r}, outside its folder")
    if info.islnk() and unsafe_member(info.linkname):
        return _escape_reason(info.name, f"is a hard link to {info.linkname!r}, outside its folder")
    if info.isdev():
        return _escape_reason(info.name, "is a device or FIFO")
    return None
