"""Stage 2, `mask`: the per-pixel quality mask of each scene and its per-scene fractions.

Per scene (one Dask task): read every layer once, block by block of rows, so memory stays at a few
scene-sized 2-D arrays plus one block of the kept bands; combine into the uint16 flags of
`pipeline.quality`; write `mask/<scene_id>.tif` (tiled, deflate) atomically; report the fractions of
each flag over the footprint and the kept bands that hold no data at all in this scene.
This is the first of the two reads of the spectral cube a build makes (the other is `write`).
The stage runs through `pipeline.engine`: one content-keyed, checkpointed task per scene.
"""

from __future__ import annotations

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
from pipeline.engine import (
    ItemStage,
    StageResult,
    WorkItem,
    content_key,
    prune_checkpoints,
    run_items,
    up_to_date,
)
from pipeline.enmap.product import ProductError, Rejection, open_product
from pipeline.errors import TransientError, is_transient, one_line
from pipeline.inventory import SCENES_TABLE, SceneRecord, records_from_frame, rejected_table
from pipeline.manifest import Manifest
from pipeline.quality import (
    BACKGROUND,
    FLAG_NAMES,
    NODATA_VALUE,
    PIXELMASK_DEFECTIVE,
    flag_counts,
    quality_bits,
)
from pipeline.storage import BuildStore, StageRecord, Stopwatch, fingerprint_of
from pipeline.tables import read_geodataframe_checked, read_table_checked

STAGE = "mask"
MASKS_TABLE = tables.MASKS
REJECTED_TABLE = tables.MASK_REJECTED
BLOCK_ROWS = 128  # rows per read: one block of kept bands is ~B x 128 x W int16 (about 65 MB at full size)
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


def compute_mask(
    record: SceneRecord, kept_bands: tuple[int, ...], storage_options: dict | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read the layers once and return (uint16 flags, per-kept-band count of valid pixels)."""
    height, width = record.height, record.width
    bits = np.zeros((height, width), dtype=np.uint16)
    valid_per_band = np.zeros(len(kept_bands), dtype=np.int64)
    with (
        open_product(record.location(), storage_options, unpack=("SPECTRAL_IMAGE", "QL_PIXELMASK")) as opened,
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
            for row in range(0, height, BLOCK_ROWS):
                window = Window(0, row, width, min(BLOCK_ROWS, height - row))
                cube = sources["SPECTRAL_IMAGE"].read(list(kept_bands), window=window)
                is_nodata = cube == NODATA_VALUE
                valid_per_band += (~is_nodata).sum(axis=(1, 2))
                defects = sources["QL_PIXELMASK"].read(list(kept_bands), window=window)
                block = quality_bits(
                    classes=sources["QL_QUALITY_CLASSES"].read(1, window=window),
                    binary_layers={name: sources[name].read(1, window=window) for name in BINARY_LAYERS},
                    cirrus=sources["QL_QUALITY_CIRRUS"].read(1, window=window),
                    nodata_any=is_nodata.any(axis=0),
                    defective_any=(defects == PIXELMASK_DEFECTIVE).any(axis=0),
                )
                bits[row : row + window.height] = block
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
                BITS="1 nodata, 2 background, 4 unclassified, 8 cloud, 16 cloud shadow, "
                "32 haze, 64|128 cirrus level, 256 snow, 512 water, 1024 defective",
            )
        return bytes(memory.read())


def mask_scene(
    record: SceneRecord, manifest: Manifest, build_uri: str, storage_options: dict | None = None
) -> MaskSummary | Rejection:
    """The per-scene task: compute, write and summarise one mask."""
    store = BuildStore(build_uri, storage_options or {})
    kept = manifest.bands.kept_bands(record.wavelengths_nm)
    config_hash = stage_config_hash(manifest)
    try:
        bits, valid = compute_mask(record, kept, storage_options)
    except (RasterioError, ProductError, OSError) as exc:
        if is_transient(exc):
            raise
        if isinstance(exc, FileNotFoundError) or "No such file" in str(exc):
            # The product changed under the build since inventory: not a property of the product.
            raise TransientError(
                f"{record.scene_id}: a file of the product vanished: {one_line(exc)}"
            ) from exc
        return Rejection(
            record.source_uri, record.scene_id, STAGE, f"unreadable while masking: {one_line(exc)}"
        )
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


def read_scenes(store: BuildStore) -> list[SceneRecord]:
    return records_from_frame(read_geodataframe_checked(store, SCENES_TABLE))


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


def _mask_intact(store: BuildStore, result: MaskSummary | Rejection) -> bool:
    """A saved mask result holds while its mask file has the checksum it was made with."""
    if isinstance(result, Rejection):
        return True
    path = mask_path(result.scene_id)
    try:
        return hashlib.sha256(store.read_bytes(path)).hexdigest() == result.mask_sha256
    except FileNotFoundError:
        return False


def _outputs_valid(store: BuildStore, scene_ids: list[str]) -> bool:
    summaries = summaries_from_table(read_table_checked(store, MASKS_TABLE))
    read_table_checked(store, REJECTED_TABLE)
    listed = {s.scene_id for s in summaries}
    present = set(store.fs.find(store.path("mask"))) if store.exists("mask") else set()
    present = {p.rsplit("/", 1)[-1] for p in present}
    return listed <= set(scene_ids) and all(mask_path(s).rsplit("/", 1)[-1] in present for s in listed)


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
    items = [WorkItem(content_key(r.fingerprint, config_hash), r.scene_id, r) for r in records]
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
        still_valid=lambda item, result: _mask_intact(store, result),
    )
    outcome = run_items(store, stage, items, scheduler, force=force)
    watch.lap("mask")
    results = [outcome.results[item.key] for item in items]
    summaries = [r for r in results if isinstance(r, MaskSummary)]
    rejections = [r for r in results if isinstance(r, Rejection)]
    store.write_table(MASKS_TABLE, masks_table(summaries))
    store.write_table(REJECTED_TABLE, rejected_table(rejections))
    prune_checkpoints(store, STAGE, [item.key for item in items])
    counts = {
        "scenes": len(records),
        "masked": len(summaries),
        "reused": outcome.reused,
        "rejected": len(rejections),
        "scenes_with_empty_kept_bands": sum(1 for s in summaries if s.empty_kept_bands),
        "kept_bands": len(summaries[0].kept_bands) if summaries else 0,
    }
    watch.lap("write")
    store.write_stage_record(StageRecord(STAGE, config_hash, input_fingerprint, counts, watch.timings))
    return StageResult(counts, skipped=False)
