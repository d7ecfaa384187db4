"""Stage 2, `mask`: the per-pixel quality mask of each scene and its per-scene fractions.

Per scene (one Dask task): read every layer once, block by block of rows aligned to the grid's cell
rows (so each block holds whole cells), so memory stays at a few scene-sized 2-D arrays plus one block
of the kept bands; combine into the uint16 flags of `pipeline.quality`; write `mask/<scene_id>.tif`
(tiled, deflate) atomically; report the fractions of each flag over the footprint and the kept bands
that hold no data at all in this scene.

This is the build's only read of the spectral cube. In the same pass every candidate cell that passes
the quality thresholds is cut: encoded once into the dataset's chunks, written to `cut/<scene_id>/`
(`pipeline.cut`, which holds the format), from which `write` assembles shards without opening a
product. The kept bands are read by `pipeline.enmap.cube_reader` (numpy where exact, GDAL otherwise).
The stage runs through `pipeline.engine`: one content-keyed, checkpointed task per scene.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import rasterio
from rasterio.errors import RasterioError
from rasterio.io import MemoryFile
from rasterio.windows import Window

from pipeline import tables
from pipeline.cut import (
    BLOCK_ROWS,
    CutIndex,
    CutPlan,
    Cutter,
    Spool,
    cut_bin_path,
    cut_index_path,
    prune_cut,
    read_cut_index,
    remove_cut,
)
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
from pipeline.enmap.cube_reader import CubeReader
from pipeline.enmap.product import Fetcher, open_product
from pipeline.enmap.product_errors import ProductError
from pipeline.enmap.scratch import scratch_dir
from pipeline.errors import BuildFault, TransientError, is_open_failure, is_transient, one_line
from pipeline.fetch import product_fetcher
from pipeline.grid import OffLatticeError, check_lattice, snap_to_lattice
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
    listing_fingerprint,
)
from pipeline.tables import Rejection, read_table_checked
from pipeline.zarr_chunks import quality_codec, reflectance_codec

STAGE = "mask"
MASKS_TABLE = tables.MASKS
REJECTED_TABLE = tables.MASK_REJECTED
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
            reader = CubeReader(opened, "SPECTRAL_IMAGE", sources["SPECTRAL_IMAGE"], kept_bands)
            # QL_PIXELMASK has a band per spectral band: as large a read as the cube's (uint8).
            defects_reader = CubeReader(opened, "QL_PIXELMASK", sources["QL_PIXELMASK"], kept_bands)
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
        spool = Spool(store, cut_bin_path(record.scene_id, key), scratch)
        return _mask_and_cut(record, manifest, store, kept, config_hash, key, spool, storage_options)


def _mask_and_cut(
    record: SceneRecord,
    manifest: Manifest,
    store: BuildStore,
    kept: tuple[int, ...],
    config_hash: str,
    key: str,
    spool: Spool,
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
    remove_cut(store, record.scene_id, keep=key, spool=spool.path)
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


def forget_scenes(store: BuildStore, manifest: Manifest, records: list[SceneRecord]) -> None:
    """Make the next mask run read these scenes again (their cut is needed and absent or damaged):
    their checkpoints, cut files and the stage's record go."""
    for record in records:
        checkpoint = store.path(checkpoint_path(STAGE, scene_key(record, manifest)))
        if store.fs.exists(checkpoint):
            store.fs.rm(checkpoint)
        remove_cut(store, record.scene_id)
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
