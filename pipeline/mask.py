"""Stage 2, `mask`: the per-pixel quality mask of each scene and its per-scene fractions.

Per scene (one Dask task): read every layer once, block by block of rows aligned to the grid's cell
rows (so each block holds whole cells), so memory stays at a few scene-sized 2-D arrays plus one block
of the kept bands; combine into the uint16 flags of `pipeline.quality`; write `mask/<scene_id>.tif`
(tiled, deflate) atomically; report the fractions of each flag over the footprint and the kept bands
that hold no data at all in this scene.

This is the build's only read of the spectral cube. In the same pass every candidate cell that passes
the quality thresholds (`pipeline.tile.decide_cells`, the very decision `tile` makes later) is cut:
its reflectance patch and its quality patch are encoded once into the bytes of one inner chunk each
(`pipeline.zarr_chunks.encode_chunk`, the dataset's codec) and its exact per-band sums are recorded
(`CellSums`). They go to `cut/<scene_id>/<key>.bin` (the payloads, concatenated) and
`cut/<scene_id>/<key>.json` (location_id -> offsets, lengths and checksums of both chunks, the sums,
and the size and SHA-256 of the .bin), bin first and index last, each atomically. `key` is the scene's
item key: the product fingerprint, the band policy, grid and quality thresholds, and the codec
settings (`ChunkCodec.key()`), never the shard size or row order, so a new dedup result never forces
a re-read. `write` assembles shards from these chunks without opening a product.
The stage runs through `pipeline.engine`: one content-keyed, checkpointed task per scene.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import posixpath
import tempfile
import uuid
import zipfile
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import rasterio
from rasterio.errors import RasterioError
from rasterio.io import MemoryFile
from rasterio.windows import Window

from pipeline import tables
from pipeline.cell_moments import CellSums
from pipeline.engine import (
    ItemStage,
    StageResult,
    WorkItem,
    checkpoint_path,
    content_key,
    prune_checkpoints,
    run_items,
    up_to_date,
)
from pipeline.enmap import raw_reader
from pipeline.enmap.product import (
    BufferFile,
    Fetcher,
    ProductError,
    _member_data_offset,
    open_product,
)
from pipeline.enmap.product import _scratch_dir as scratch_dir  # an owned scratch folder (cleaned when stale)
from pipeline.errors import BuildFault, TransientError, is_open_failure, is_transient, one_line
from pipeline.fetch import product_fetcher
from pipeline.grid import GridSpec, OffLatticeError, cells_in_raster, check_lattice, snap_to_lattice
from pipeline.inventory import SceneRecord, read_scenes, rejected_table
from pipeline.manifest import Limits, Manifest
from pipeline.quality import (
    BACKGROUND,
    FLAG_NAMES,
    MASK_BITS_TAG,
    NODATA_VALUE,
    PIXELMASK_DEFECTIVE,
    flag_counts,
    quality_bits,
)
from pipeline.storage import (
    BuildStore,
    StageRecord,
    Stopwatch,
    fingerprint_of,
    gdal_path,
    is_remote,
    listing_fingerprint,
)
from pipeline.tables import Rejection, read_table_checked
from pipeline.zarr_chunks import ChunkCodec, encode_chunk, quality_codec, reflectance_codec

STAGE = "mask"
MASKS_TABLE = tables.MASKS
REJECTED_TABLE = tables.MASK_REJECTED
BLOCK_ROWS = 128  # rows per read: one block of kept bands is ~B x 128 x W int16 (about 65 MB at full size)
CUT = "cut"  # the encoded candidates, per scene (build artefacts: see the module docstring)
CUT_FORMAT = 1
# rasterio passes an integer GDAL_CACHEMAX to GDAL as bytes (256 would mean 256 bytes, and a BIP cube
# read band by band then re-reads every scanline once per band).
GDAL_CACHE_BYTES = 256 * 1024 * 1024
BINARY_LAYERS = ("QL_QUALITY_CLOUD", "QL_QUALITY_CLOUDSHADOW", "QL_QUALITY_HAZE", "QL_QUALITY_SNOW")


def mask_path(scene_id: str) -> str:
    return tables.mask_raster(scene_id)


@dataclass(frozen=True, slots=True)
class MaskSummary:
    """A row of `mask/masks.parquet`."""

    scene_id: str
    fingerprint: str  # the inventory fingerprint of the product the mask was made from
    config_hash: str
    mask_sha256: str
    kept_bands: tuple[int, ...]
    empty_kept_bands: tuple[int, ...]  # kept bands that are -32768 everywhere in this scene
    footprint_pixels: int
    fractions: tuple[tuple[str, float], ...]  # flag -> fraction of footprint pixels

    def fraction(self, flag: str) -> float:
        return dict(self.fractions)[flag]


def cut_index_path(scene_id: str, key: str) -> str:
    return f"{CUT}/{scene_id}/{key}.json"


def cut_bin_path(scene_id: str, key: str) -> str:
    return f"{CUT}/{scene_id}/{key}.bin"


@dataclass(frozen=True, slots=True)
class CutPlan:
    """What the reading pass needs to cut a scene: the candidate decision's inputs and the codecs.
    `transform` is the scene's transform on the lattice (None: off the lattice, no cell is cut)."""

    transform: tuple[float, ...] | None
    epsg: int
    spec: GridSpec
    policy: Any  # pipeline.manifest.QualityPolicy
    reflectance: ChunkCodec
    quality: ChunkCodec


@dataclass(frozen=True, slots=True)
class CutCell:
    """Where one encoded candidate sits in its scene's .bin: (offset, length) of each chunk, a short
    SHA-256 of each payload (checked when a shard copies it), and the patch's exact sums."""

    reflectance: tuple[int, int]
    quality: tuple[int, int]
    sha: tuple[str, str]
    sums: CellSums


@dataclass(frozen=True)
class CutIndex:
    """The index of one scene's encoded candidates (`cut/<scene_id>/<key>.json`)."""

    scene_id: str
    key: str
    reflectance_codec: str
    quality_codec: str
    bin_bytes: int
    bin_sha256: str
    cells: dict[str, CutCell] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": CUT_FORMAT,
            "scene_id": self.scene_id,
            "key": self.key,
            "reflectance_codec": self.reflectance_codec,
            "quality_codec": self.quality_codec,
            "bin_bytes": self.bin_bytes,
            "bin_sha256": self.bin_sha256,
            "cells": {
                location: {
                    "reflectance": list(cell.reflectance),
                    "quality": list(cell.quality),
                    "sha": list(cell.sha),
                    "sums": cell.sums.to_json(),
                }
                for location, cell in sorted(self.cells.items())
            },
        }

    @classmethod
    def from_json(cls, data: Any) -> CutIndex:
        """Parse and check an index: every chunk lies inside the .bin it describes (ValueError if not)."""
        if not isinstance(data, dict) or data.get("format") != CUT_FORMAT:
            raise ValueError("not a cut index of this format")
        size = int(data["bin_bytes"])
        cells = {}
        for location, raw in dict(data["cells"]).items():
            spans = [(int(raw[name][0]), int(raw[name][1])) for name in ("reflectance", "quality")]
            if any(offset < 0 or length < 1 or offset + length > size for offset, length in spans):
                raise ValueError(f"cell {location} points outside the .bin")
            sha = (str(raw["sha"][0]), str(raw["sha"][1]))
            cells[str(location)] = CutCell(spans[0], spans[1], sha, CellSums.from_json(raw["sums"]))
        return cls(
            str(data["scene_id"]),
            str(data["key"]),
            str(data["reflectance_codec"]),
            str(data["quality_codec"]),
            size,
            str(data["bin_sha256"]),
            cells,
        )


def chunk_sha(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()[:16]


class _Spool:
    """The .bin of one scene's cut, written as the cube is read (memory holds one block, not the
    scene's payloads): straight beside its target on a local build, in a local temporary file for
    object storage; `commit` moves it in place whole (a reader never sees half a .bin)."""

    def __init__(self, store: BuildStore, relative: str, scratch: str | None = None) -> None:
        self.store, self.relative = store, relative
        if store.is_local:
            target = store.path(relative)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            self.path = f"{target}.tmp-{uuid.uuid4().hex}"
        else:
            # In the task's own scratch folder (`scratch`), which the next task on the machine removes
            # if this one is killed.
            handle, self.path = tempfile.mkstemp(prefix="cut-", suffix=".bin", dir=scratch)
            os.close(handle)
        self.handle: BinaryIO = open(self.path, "wb")
        self.digest = hashlib.sha256()
        self.size = 0

    def append(self, payload: bytes) -> tuple[int, int]:
        offset = self.size
        self.handle.write(payload)
        self.digest.update(payload)
        self.size += len(payload)
        return offset, len(payload)

    def commit(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        try:
            if self.store.is_local:
                os.replace(self.path, self.store.path(self.relative))
            else:
                self.store.fs.put_file(self.path, self.store.path(self.relative))
        finally:
            self.discard()

    def discard(self) -> None:
        if not self.handle.closed:
            self.handle.close()
        if os.path.exists(self.path):
            os.remove(self.path)


def block_edges(cell_rows: set[int], height: int, size: int) -> list[int]:
    """Row edges of the blocks a scene is read in (pure): each cell row [r, r + size) is exactly one
    block, whatever its size, so a block always holds whole cells; the rows outside cell rows are read
    in blocks of at most BLOCK_ROWS."""
    cells = {r for r in cell_rows if 0 <= r and r + size <= height}
    ordered = sorted({0, height} | cells | {r + size for r in cells})
    out = [ordered[0]]
    for edge in ordered[1:]:
        if out[-1] not in cells:
            while edge - out[-1] > BLOCK_ROWS:
                out.append(out[-1] + BLOCK_ROWS)
        out.append(edge)
    return out


class Cutter:
    """Cuts the candidate cells of a scene from the blocks the mask pass reads (see the module
    docstring): `take` gets each block of whole rows with its mask bits and kept-band cube."""

    def __init__(self, plan: CutPlan, spool: _Spool | None) -> None:
        self.plan, self.spool = plan, spool
        self.cells: dict[str, CutCell] = {}
        self.cell_rows: set[int] = set()

    def block_edges(self, width: int, height: int) -> list[int]:
        """Row edges of the blocks to read: every cell row is one block of exactly `patch_size` rows;
        the rows above, between (none) and below are read in blocks of at most BLOCK_ROWS."""
        plan = self.plan
        rows: set[int] = set()
        if plan.transform is not None:
            rows = {
                w.row_off for _, w in cells_in_raster(plan.epsg, plan.transform, width, height, plan.spec)
            }
        self.cell_rows = rows
        return block_edges(rows, height, plan.spec.patch_size)

    def take(self, row: int, bits: np.ndarray, cube: np.ndarray) -> None:
        """Encode the kept candidates of a block that is one whole cell row (others hold no cell)."""
        from pipeline.tile import decide_cells  # tile builds on mask: imported when used

        size = self.plan.spec.patch_size
        if self.plan.transform is None or row not in self.cell_rows or bits.shape[0] != size:
            return
        a, b, c, d, e, f = self.plan.transform[:6]
        # The block as a raster of its own: its origin moved down `row` pixels, so its cells are
        # exactly this cell row's, with windows relative to the block.
        shifted = (a, b, c + b * row, d, e, f + e * row)
        # Empty kept bands are only known after the whole scene; a scene with one has every cell
        # dropped by tile, and `finish` then drops what was cut.
        decisions = decide_cells(bits, shifted, self.plan.epsg, self.plan.spec, self.plan.policy, ())
        for decision in decisions:
            if not decision.kept:
                continue
            cols = slice(decision.col_off, decision.col_off + size)
            patch = cube[:, :, cols]
            if bool((patch == NODATA_VALUE).any()):
                continue  # never encode nodata (the decision already excludes it: this is a guard)
            reflectance = encode_chunk(self.plan.reflectance, patch)
            quality = encode_chunk(self.plan.quality, bits[:, cols])
            if reflectance is None or quality is None:  # only without write_empty_chunks
                raise ValueError("an all-fill chunk cannot be cut: the arrays store every chunk")
            assert self.spool is not None
            self.cells[decision.cell.location_id] = CutCell(
                self.spool.append(reflectance),
                self.spool.append(quality),
                (chunk_sha(reflectance), chunk_sha(quality)),
                clean_patch_sums(patch),
            )


def clean_patch_sums(patch: np.ndarray) -> CellSums:
    """`CellSums.of_patch` of a (B, y, x) int16 patch without nodata (every cut patch), without its
    int64 copy of the patch: the products are formed in int64 by einsum (as `BandMoments.of_block`
    does), so the sums are exact and the same."""
    values = patch.reshape(patch.shape[0], -1)
    if values.size and bool((values == NODATA_VALUE).any()):
        return CellSums.of_patch(patch)
    return CellSums(
        (values.shape[1],) * values.shape[0],
        tuple(values.sum(axis=1, dtype=np.int64).tolist()),
        tuple(np.einsum("bp,bp->b", values, values, dtype=np.int64, casting="unsafe").tolist()),
        tuple(values.min(axis=1, initial=np.iinfo(np.int16).max).tolist()),
        tuple(values.max(axis=1, initial=np.iinfo(np.int16).min).tolist()),
    )


def cut_plan(record: SceneRecord, manifest: Manifest, band_count: int) -> CutPlan:
    """The cut of one scene: on the lattice as `tile` puts it (snapped when the manifest says so)."""
    spec = manifest.grid.spec
    transform: tuple[float, ...] | None = tuple(record.transform)
    try:
        check_lattice(record.transform, spec)
    except OffLatticeError:
        transform = None
        if manifest.grid.off_lattice == "nearest":
            transform = snap_to_lattice(record.transform, spec)
    return CutPlan(
        transform,
        record.epsg,
        spec,
        manifest.quality,
        reflectance_codec(manifest, band_count),
        quality_codec(manifest),
    )


def scene_key(record: SceneRecord, manifest: Manifest) -> str:
    """The content key of a scene's mask and cut: the product, the stage's settings (bands, grid,
    quality thresholds) and the codec settings its candidates are encoded with."""
    try:
        band_count = len(manifest.bands.kept_bands(record.wavelengths_nm))
    except Exception:  # a product the band policy refuses: mask_scene gives the reason
        band_count = 0
    return content_key(
        record.fingerprint,
        stage_config_hash(manifest),
        reflectance_codec(manifest, band_count).key(),
        quality_codec(manifest).key(),
    )


HEADER_BYTES = 1024 * 1024  # an ENVI header larger than this is not read here (GDAL reads the cube)


def _header_member(members: list[str], member: str) -> str | None:
    sidecars = {f"{posixpath.splitext(member)[0]}.hdr".lower(), f"{member}.hdr".lower()}
    return next((name for name in members if name.lower() in sidecars), None)


def raw_source(opened: Any, layer: str) -> tuple[raw_reader.Source, bytes | None] | None:
    """Where `raw_reader` can read a layer of an opened product: a plain local file (also a fetched
    one), a fetched file in memory, or a stored member of a local or fetched ZIP (a folder delivery's
    ZIP, or a tar.gz's unpacked ZIP), with its ENVI header's bytes; None otherwise (remote, or inflated
    into GDAL's memory: GDAL reads it)."""
    location = opened.location
    member = location.member(layer)
    copy = opened.fetched.get(member)
    if isinstance(copy, memoryview):
        names = [name for name, _ in location.members]
        header_name = _header_member(names, member)
        header = opened.fetched.get(header_name) if header_name else None
        if isinstance(header, str):
            with open(header, "rb") as handle:
                header = handle.read(HEADER_BYTES + 1)
        text = bytes(header) if header is not None and len(header) <= HEADER_BYTES else None
        return copy, text
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
        start = _member_data_offset(handle, info)
        return zip_bytes[start : start + info.file_size], _zip_header(archive, member)


class _CubeReader:
    """The kept bands of a block of rows of a multi-band layer (the cube, QL_PIXELMASK): numpy at the
    byte offsets for an uncompressed GeoTIFF or ENVI file on local disk or stored in a local ZIP
    (`pipeline.enmap.raw_reader`, bit-exact against GDAL), GDAL otherwise (compressed, remote)."""

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

    def read(self, window: Window) -> np.ndarray:
        if self.layout is not None and self.raw is not None and self.kept:
            rows = (int(window.row_off), int(window.row_off + window.height))
            return raw_reader.read(self.raw, layout=self.layout, bands=self.zero_based, rows=rows)
        return self.source.read(self.kept, window=window)


def compute_mask(
    record: SceneRecord,
    kept_bands: tuple[int, ...],
    storage_options: dict | None = None,
    cutter: Cutter | None = None,
    fetcher: Fetcher | None = None,
    limits: Limits = Limits(),
) -> tuple[np.ndarray, np.ndarray]:
    """Read the layers once and return (uint16 flags, per-kept-band count of valid pixels); with a
    `cutter`, cut the scene's candidates from the same blocks. With a `fetcher`, a remote product is
    fetched once, whole, in large ranged GETs, and every layer is read from that copy."""
    height, width = record.height, record.width
    bits = np.zeros((height, width), dtype=np.uint16)
    valid_per_band = np.zeros(len(kept_bands), dtype=np.int64)
    edges = cutter.block_edges(width, height) if cutter else list(range(0, height, BLOCK_ROWS)) + [height]
    with (
        open_product(
            record.location(),
            storage_options,
            unpack=("SPECTRAL_IMAGE", "QL_PIXELMASK"),
            limits=limits,
            fetcher=fetcher,
        ) as opened,
        rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES),
    ):
        sources = {
            layer: rasterio.open(opened.gdal_path(layer))
            for layer in (
                "SPECTRAL_IMAGE",
                "QL_QUALITY_CLASSES",
                "QL_QUALITY_CIRRUS",
                "QL_PIXELMASK",
                *BINARY_LAYERS,
            )
        }
        try:
            reader = _CubeReader(opened, "SPECTRAL_IMAGE", sources["SPECTRAL_IMAGE"], kept_bands)
            # QL_PIXELMASK has a band per spectral band: as large a read as the cube's (uint8).
            defects_reader = _CubeReader(opened, "QL_PIXELMASK", sources["QL_PIXELMASK"], kept_bands)
            for row, stop in zip(edges, edges[1:]):
                if stop <= row:
                    continue
                window = Window(0, row, width, stop - row)
                cube = reader.read(window)
                is_nodata = cube == NODATA_VALUE
                valid_per_band += window.height * width - np.count_nonzero(is_nodata, axis=(1, 2))
                defects = defects_reader.read(window)
                block = quality_bits(
                    classes=sources["QL_QUALITY_CLASSES"].read(1, window=window),
                    binary_layers={name: sources[name].read(1, window=window) for name in BINARY_LAYERS},
                    cirrus=sources["QL_QUALITY_CIRRUS"].read(1, window=window),
                    nodata_any=is_nodata.any(axis=0),
                    defective_any=(defects == PIXELMASK_DEFECTIVE).any(axis=0),
                )
                bits[row : row + window.height] = block
                if cutter is not None:
                    cutter.take(row, block, cube)
        finally:
            for source in sources.values():
                source.close()
    return bits, valid_per_band


def summarise_mask(
    record: SceneRecord,
    bits: np.ndarray,
    kept_bands: tuple[int, ...],
    valid_per_band: np.ndarray,
    config_hash: str,
    mask_sha256: str,
    cirrus_min_level: int,
) -> MaskSummary:
    footprint = (bits & BACKGROUND) == 0
    inside = bits[footprint]
    counts = flag_counts(inside, cirrus_min_level)
    total = int(inside.size)
    empty = tuple(band for band, valid in zip(kept_bands, valid_per_band.tolist(), strict=True) if valid == 0)
    return MaskSummary(
        scene_id=record.scene_id,
        fingerprint=record.fingerprint,
        config_hash=config_hash,
        mask_sha256=mask_sha256,
        kept_bands=kept_bands,
        empty_kept_bands=empty,
        footprint_pixels=total,
        fractions=tuple((flag, counts[flag] / total if total else 0.0) for flag in FLAG_NAMES),
    )


def encode_mask(record: SceneRecord, bits: np.ndarray) -> bytes:
    """The mask as a tiled, deflate-compressed GeoTIFF on the scene's grid."""
    profile = {
        "driver": "GTiff",
        "dtype": "uint16",
        "count": 1,
        "width": record.width,
        "height": record.height,
        "crs": f"EPSG:{record.epsg}",
        "transform": rasterio.Affine(*record.transform),
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
        "predictor": 2,
    }
    with MemoryFile() as memory:
        with memory.open(**profile) as dst:
            dst.write(bits, 1)
            dst.update_tags(
                1,
                BITS=MASK_BITS_TAG,
            )
        return bytes(memory.read())


def mask_scene(
    record: SceneRecord, manifest: Manifest, build_uri: str, storage_options: dict | None = None
) -> MaskSummary | Rejection:
    """The per-scene task: read the scene once; write its cut (bin, then index), then its mask, and
    summarise the mask."""
    store = BuildStore(build_uri, storage_options or {})
    kept = manifest.bands.kept_bands(record.wavelengths_nm)
    config_hash = stage_config_hash(manifest)
    key = scene_key(record, manifest)
    with contextlib.ExitStack() as stack:
        scratch = None if store.is_local else stack.enter_context(scratch_dir())
        spool = _Spool(store, cut_bin_path(record.scene_id, key), scratch)
        return _mask_and_cut(record, manifest, store, kept, config_hash, key, spool, storage_options)


def _mask_and_cut(
    record: SceneRecord,
    manifest: Manifest,
    store: BuildStore,
    kept: tuple[int, ...],
    config_hash: str,
    key: str,
    spool: _Spool,
    storage_options: dict | None,
) -> MaskSummary | Rejection:
    cutter = Cutter(cut_plan(record, manifest, len(kept)), spool)
    try:
        fetcher = product_fetcher(manifest, storage_options)
        bits, valid = compute_mask(record, kept, storage_options, cutter, fetcher, manifest.limits)
    except (RasterioError, ProductError, OSError) as exc:
        spool.discard()
        if is_transient(exc):
            raise
        if is_open_failure(exc):
            # Inventory opened these files: the product changed under the build, or could not be
            # fetched. Not a property of the product.
            raise TransientError(
                f"{record.scene_id}: a file of the product could not be opened: {one_line(exc)}"
            ) from exc
        return Rejection(
            record.source_uri, record.scene_id, STAGE, f"unreadable while masking: {one_line(exc)}"
        )
    except BaseException:
        spool.discard()
        raise
    cells = cutter.cells if bool(np.all(valid > 0)) else {}  # an empty kept band drops every cell
    _remove_cut(store, record.scene_id, keep=key, spool=spool.path)
    if store.exists(cut_index_path(record.scene_id, key)):
        # The index goes before its .bin is replaced: an index always describes the .bin beside it.
        store.fs.rm(store.path(cut_index_path(record.scene_id, key)))
    spool.commit()
    index = CutIndex(
        record.scene_id,
        key,
        cutter.plan.reflectance.key(),
        cutter.plan.quality.key(),
        spool.size,
        spool.digest.hexdigest(),
        cells,
    )
    store.write_json(cut_index_path(record.scene_id, key), index.to_json())
    encoded = encode_mask(record, bits)
    store.write_bytes(mask_path(record.scene_id), encoded)
    return summarise_mask(
        record,
        bits,
        kept,
        valid,
        config_hash,
        hashlib.sha256(encoded).hexdigest(),
        manifest.quality.cirrus_min_level,
    )


def _remove_cut(store: BuildStore, scene_id: str, keep: str | None = None, spool: str = "") -> None:
    """Remove a scene's cut files, except the .bin and .json of key `keep` (and the file being
    spooled): another key's are stale, and so is what a killed task left half-written."""
    folder = store.path(f"{CUT}/{scene_id}")
    if not store.fs.exists(folder):
        return
    kept = {f"{keep}.bin", f"{keep}.json", os.path.basename(spool)} if keep else set()
    stale = [p for p in store.fs.find(folder) if p.rsplit("/", 1)[-1] not in kept]
    if stale:
        store.fs.rm(stale)


def read_cut_index(store: BuildStore, scene_id: str, key: str) -> CutIndex | None:
    """A scene's cut index, checked (parses, names its scene and key, every chunk inside a .bin of the
    recorded size); None when it is absent or fails a check (the caller has the scene read again)."""
    path = cut_index_path(scene_id, key)
    try:
        index = CutIndex.from_json(json.loads(store.read_bytes(path)))
        size = int(store.fs.size(store.path(cut_bin_path(scene_id, key))))
    except FileNotFoundError:
        return None
    except Exception as exc:
        if is_transient(exc):
            raise
        print(f"mask: the cut of {scene_id} is unreadable ({one_line(exc)}); it will be read again")
        return None
    if index.scene_id != scene_id or index.key != key or size != index.bin_bytes:
        return None
    return index


def stage_config_hash(manifest: Manifest) -> str:
    return manifest.stage_hash(STAGE)


# Tables ---------------------------------------------------------------------------------------------


def masks_table(summaries: list[MaskSummary]) -> pa.Table:
    rows = []
    for summary in sorted(summaries, key=lambda s: s.scene_id):
        row = asdict(summary)
        fractions = dict(row.pop("fractions"))
        row["kept_bands"] = list(summary.kept_bands)
        row["empty_kept_bands"] = list(summary.empty_kept_bands)
        row.update({f"{flag}_fraction": fractions[flag] for flag in FLAG_NAMES})
        rows.append(row)
    schema = pa.schema(
        [
            ("scene_id", pa.string()),
            ("fingerprint", pa.string()),
            ("config_hash", pa.string()),
            ("mask_sha256", pa.string()),
            ("kept_bands", pa.list_(pa.int32())),
            ("empty_kept_bands", pa.list_(pa.int32())),
            ("footprint_pixels", pa.int64()),
        ]
        + [(f"{flag}_fraction", pa.float64()) for flag in FLAG_NAMES]
    )
    return pa.Table.from_pylist(rows, schema=schema)


def summaries_from_table(table: pa.Table) -> list[MaskSummary]:
    out = []
    for row in table.to_pylist():
        out.append(
            MaskSummary(
                scene_id=row["scene_id"],
                fingerprint=row["fingerprint"],
                config_hash=row["config_hash"],
                mask_sha256=row["mask_sha256"],
                kept_bands=tuple(row["kept_bands"]),
                empty_kept_bands=tuple(row["empty_kept_bands"]),
                footprint_pixels=row["footprint_pixels"],
                fractions=tuple((flag, row[f"{flag}_fraction"]) for flag in FLAG_NAMES),
            )
        )
    return out


def read_mask(store: BuildStore, scene_id: str, sha256: str | None = None) -> np.ndarray:
    """A scene's mask; with `sha256`, checked first: a mask that does not match is removed (so the mask
    stage redoes it) and reported as a BuildFault, never planned from."""
    path = mask_path(scene_id)
    try:
        data = store.read_bytes(path)
    except FileNotFoundError:
        raise BuildFault(f"{path} is missing: rerun mask (or run)") from None
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        store.fs.rm(store.path(path))
        raise BuildFault(f"{path} did not match its checksum and was removed: rerun mask (or run)")
    with MemoryFile(data) as memory, memory.open() as src:
        return np.asarray(src.read(1))


# The stage -----------------------------------------------------------------------------------------


def encode_result(result: MaskSummary | Rejection) -> dict[str, Any]:
    """A checkpoint of one scene's result (JSON)."""
    if isinstance(result, Rejection):
        return {"rejection": asdict(result)}
    return {"summary": asdict(result)}


def decode_result(data: dict[str, Any]) -> MaskSummary | Rejection:
    if "rejection" in data:
        return Rejection(**data["rejection"])
    row = dict(data["summary"])
    return MaskSummary(
        scene_id=str(row["scene_id"]),
        fingerprint=str(row["fingerprint"]),
        config_hash=str(row["config_hash"]),
        mask_sha256=str(row["mask_sha256"]),
        kept_bands=tuple(int(b) for b in row["kept_bands"]),
        empty_kept_bands=tuple(int(b) for b in row["empty_kept_bands"]),
        footprint_pixels=int(row["footprint_pixels"]),
        fractions=tuple((str(flag), float(value)) for flag, value in row["fractions"]),
    )


def _mask_intact(store: BuildStore, item: WorkItem, result: MaskSummary | Rejection) -> bool:
    """A saved mask result holds while its mask file has the checksum it was made with, and its cut,
    when present, passes its checks. A cut absent altogether (removed after a write by
    `write.keep_cut: false`) is no reason to read the scene again: `write` asks for that when it
    needs one of its chunks."""
    if isinstance(result, Rejection):
        return True
    path = mask_path(result.scene_id)
    try:
        if hashlib.sha256(store.read_bytes(path)).hexdigest() != result.mask_sha256:
            return False
    except FileNotFoundError:
        return False
    if not store.exists(cut_index_path(result.scene_id, item.key)):
        return True
    return read_cut_index(store, result.scene_id, item.key) is not None


def prune_cut(store: BuildStore, keys: dict[str, str]) -> None:
    """Remove the cut of scenes no longer inventoried, and cut files of another key."""
    folder = store.path(CUT)
    if not store.fs.exists(folder):
        return
    for path in store.fs.ls(folder, detail=False):
        scene_id = str(path).rstrip("/").rsplit("/", 1)[-1]
        if scene_id in keys:
            _remove_cut(store, scene_id, keep=keys[scene_id])
        else:
            store.fs.rm(path, recursive=True)


def forget_scenes(store: BuildStore, manifest: Manifest, records: list[SceneRecord]) -> None:
    """Make the next mask run read these scenes again (their cut is needed and absent or damaged):
    their checkpoints, cut files and the stage's record go."""
    for record in records:
        checkpoint = store.path(checkpoint_path(STAGE, scene_key(record, manifest)))
        if store.fs.exists(checkpoint):
            store.fs.rm(checkpoint)
        _remove_cut(store, record.scene_id)
    stage_record = store.stage_record_path(STAGE)
    if store.exists(stage_record):
        store.fs.rm(store.path(stage_record))


def _outputs_valid(store: BuildStore, scene_ids: list[str]) -> bool:
    """The tables validate, and the mask folder is as this stage left it (one listing: names, sizes,
    modification stamps). `write` no longer reads the masks (their quality chunks were cut when they
    were made), so a removed or rewritten mask must be found here; reading every mask to check its
    checksum on each rerun would cost gigabytes at archive scale (`verify`-like checks happen on
    resume, in `_mask_intact`)."""
    summaries = summaries_from_table(read_table_checked(store, MASKS_TABLE))
    read_table_checked(store, REJECTED_TABLE)
    if not {s.scene_id for s in summaries} <= set(scene_ids):
        return False
    record = store.read_stage_record(STAGE) or {}
    return bool(record.get("outputs")) and record["outputs"] == listing_fingerprint(store, "mask")


def run_mask(
    manifest: Manifest,
    store: BuildStore,
    scheduler: Any,
    storage_options: dict | None = None,
    force: bool = False,
) -> StageResult:
    """Mask every inventoried scene; a scene whose product and settings are unchanged keeps its mask."""
    watch = Stopwatch()
    records = read_scenes(store)
    config_hash = stage_config_hash(manifest)
    items = [WorkItem(scene_key(r, manifest), r.scene_id, r) for r in records]
    input_fingerprint = fingerprint_of(sorted(item.key for item in items))
    scene_ids = [r.scene_id for r in records]
    done = up_to_date(
        store, STAGE, config_hash, input_fingerprint, lambda: _outputs_valid(store, scene_ids), force
    )
    if done:
        return done
    stage = ItemStage(
        name=STAGE,
        task=mask_scene,
        task_args=(manifest, store.uri, storage_options),
        encode=encode_result,
        decode=decode_result,
        on_failure=lambda item, reason: Rejection(
            item.payload.source_uri, item.payload.scene_id, STAGE, reason
        ),
        still_valid=lambda item, result: _mask_intact(store, item, result),
    )
    outcome = run_items(store, stage, items, scheduler, force=force)
    watch.lap("mask")
    results = [outcome.results[item.key] for item in items]
    summaries = [r for r in results if isinstance(r, MaskSummary)]
    rejections = [r for r in results if isinstance(r, Rejection)]
    store.write_table(MASKS_TABLE, masks_table(summaries))
    store.write_table(REJECTED_TABLE, rejected_table(rejections))
    prune_checkpoints(store, STAGE, [item.key for item in items])
    prune_cut(store, {item.payload.scene_id: item.key for item in items})
    counts = {
        "scenes": len(records),
        "masked": len(summaries),
        "reused": outcome.reused,
        "rejected": len(rejections),
        "scenes_with_empty_kept_bands": sum(1 for s in summaries if s.empty_kept_bands),
        "kept_bands": len(summaries[0].kept_bands) if summaries else 0,
    }
    watch.lap("write")
    outputs = listing_fingerprint(store, "mask")
    store.write_stage_record(
        StageRecord(STAGE, config_hash, input_fingerprint, counts, watch.timings, outputs=outputs)
    )
    return StageResult(counts, skipped=False)
