"""Stage 5, `write`: copy the kept patches into `dataset.zarr` (Zarr format 3), bit-exact.

Layout (SPEC): `reflectance` int16 (patch, band, y, x), one patch per inner chunk, several patches per
shard (sharding codec, Blosc zstd + bitshuffle, fill -32768, CF scale/fill attributes); `quality`
uint16 (patch, y, x), same chunking; 1-D arrays over patch and band. The driver preallocates the
arrays (the template) and writes the small 1-D arrays; each task then fills whole shards by region.

Tasks: shards are grouped so that no two tasks need the same read unit, a (scene, grid row) strip of
the kept bands; each task opens each of its scenes once and reads each of its strips once, over just
the columns its patches span. So every shard is written whole by exactly one task (concurrent partial
writes to one shard lose data in zarr-python) and no row of a source scene is read by two tasks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import rasterio
from rasterio.windows import Window

from pipeline.enmap.product import open_product
from pipeline.inventory import SceneRecord
from pipeline.manifest import Manifest
from pipeline.quality import NODATA_VALUE
from pipeline.stats import BandMoments, npy_bytes
from pipeline.storage import BuildStore, StageRecord, Stopwatch

STAGE = "write"
DATASET = "dataset.zarr"
SHARDS_TABLE = "write/shards.parquet"
REFLECTANCE_SCALE = 0.0001
PATCH_FIELDS = ("patch_id", "location_id", "scene_id", "time", "epsg", "x_ul", "y_ul")


@dataclass(frozen=True, slots=True)
class PatchRef:
    """What a write task needs of one index row."""

    row: int
    scene_id: str
    row_off: int
    col_off: int


@dataclass(frozen=True, slots=True)
class WriteTask:
    first_shard: int
    last_shard: int  # inclusive
    patches: tuple[PatchRef, ...]  # the rows of these shards, in row order


def read_units(patches: Sequence[PatchRef]) -> set[tuple[str, int]]:
    return {(p.scene_id, p.row_off) for p in patches}


MAX_SHARDS_PER_TASK = 8


def plan_tasks(
    patches: Sequence[PatchRef], per_shard: int, max_shards: int = MAX_SHARDS_PER_TASK
) -> list[WriteTask]:
    """Group consecutive shards into tasks; pure.

    Rows are ordered by scene and raster position (dedup), so a shard boundary may cut a grid row of a
    scene (a read unit). Shards that share a unit join one task, which reads the unit once, up to
    `max_shards` per task so a long chain cannot serialise the build. Where a chain is cut, the two
    tasks read disjoint column ranges of the unit (its patches are in column order), so no pixel is
    ever read twice; only a strip-organised source may then decode that grid row's strips twice.
    """
    if max_shards < 1:
        raise ValueError("max_shards must be >= 1")
    ordered = sorted(patches, key=lambda p: p.row)
    if [p.row for p in ordered] != list(range(len(ordered))):
        raise ValueError("index rows must be 0..N-1")
    shards = [tuple(ordered[k : k + per_shard]) for k in range(0, len(ordered), per_shard)]
    tasks: list[WriteTask] = []
    current: list[int] = []
    for index, shard in enumerate(shards):
        joined = current and read_units(shards[current[-1]]) & read_units(shard)
        if current and (not joined or len(current) >= max_shards):
            tasks.append(_task(current, shards))
            current = []
        current.append(index)
    if current:
        tasks.append(_task(current, shards))
    return tasks


def _task(indices: list[int], shards: list[tuple[PatchRef, ...]]) -> WriteTask:
    return WriteTask(indices[0], indices[-1], tuple(p for k in indices for p in shards[k]))


def unit_windows(patches: Sequence[PatchRef], size: int) -> dict[tuple[str, int], Window]:
    """The one window each read unit (scene, grid row) is read with: the columns its patches span."""
    spans: dict[tuple[str, int], tuple[int, int]] = {}
    for p in patches:
        first, last = spans.get((p.scene_id, p.row_off), (p.col_off, p.col_off))
        spans[(p.scene_id, p.row_off)] = (min(first, p.col_off), max(last, p.col_off))
    return {
        (scene, row): Window(first, row, last + size - first, size)
        for (scene, row), (first, last) in spans.items()
    }


def dataset_attrs(manifest: Manifest, n_patches: int) -> dict[str, Any]:
    return {
        "title": f"{manifest.name}: EnMAP L2A patches",
        "patch_size": manifest.grid.patch_size,
        "pixel_size_m": manifest.grid.pixel_size,
        "patches_per_shard": manifest.write.patches_per_shard,
        "n_patches": n_patches,
        "Conventions": "CF-1.10",
    }


def create_template(
    store: BuildStore,
    manifest: Manifest,
    index: Any,
    bands: Sequence[tuple[int, float, float]],
) -> None:
    """Preallocate every array and write the 1-D arrays (over patch and band). No pixels yet."""
    import zarr
    from zarr.codecs import BloscCodec, BloscShuffle

    n = len(index)
    size = manifest.grid.patch_size
    per_shard = manifest.write.patches_per_shard
    codec = BloscCodec(cname="zstd", clevel=manifest.write.compression_level, shuffle=BloscShuffle.bitshuffle)
    group = zarr.open_group(zarr_store(store), mode="w", zarr_format=3)
    group.attrs.update(dataset_attrs(manifest, n))
    coordinates = "patch_id location_id scene_id time epsg x_ul y_ul band wavelength fwhm"
    group.create_array(
        "reflectance",
        shape=(n, len(bands), size, size),
        chunks=(1, len(bands), size, size),
        shards=(per_shard, len(bands), size, size),
        dtype="int16",
        fill_value=NODATA_VALUE,
        compressors=codec,
        dimension_names=("patch", "band", "y", "x"),
        attributes={
            "long_name": "surface reflectance",
            "units": "1",
            "scale_factor": REFLECTANCE_SCALE,
            "add_offset": 0.0,
            "_FillValue": NODATA_VALUE,
            "coordinates": coordinates,
        },
    )
    group.create_array(
        "quality",
        shape=(n, size, size),
        chunks=(1, size, size),
        shards=(per_shard, size, size),
        dtype="uint16",
        fill_value=0,
        compressors=codec,
        dimension_names=("patch", "y", "x"),
        attributes={
            "long_name": "quality mask bit flags",
            "flag_masks": [1, 2, 4, 8, 16, 32, 64 | 128, 256, 512, 1024],
            "flag_meanings": "nodata background unclassified cloud cloud_shadow haze cirrus_level snow water "
            "defective",
            "coordinates": "patch_id location_id scene_id time epsg x_ul y_ul",
        },
    )
    one_d: dict[str, tuple[np.ndarray, str, dict[str, Any]]] = {
        "patch_id": (index["patch_id"].to_numpy(dtype=str), "patch", {}),
        "location_id": (index["location_id"].to_numpy(dtype=str), "patch", {}),
        "scene_id": (index["scene_id"].to_numpy(dtype=str), "patch", {}),
        "time": (
            _epoch_microseconds(index["start_time"]),
            "patch",
            {
                "units": "microseconds since 1970-01-01T00:00:00",
                "calendar": "proleptic_gregorian",
                "standard_name": "time",
            },
        ),
        "epsg": (
            index["epsg"].to_numpy(dtype="int32"),
            "patch",
            {"long_name": "EPSG code of the patch's UTM CRS"},
        ),
        "x_ul": (
            index["x_ul"].to_numpy(dtype="float64"),
            "patch",
            {"units": "m", "long_name": "upper-left x"},
        ),
        "y_ul": (
            index["y_ul"].to_numpy(dtype="float64"),
            "patch",
            {"units": "m", "long_name": "upper-left y"},
        ),
        "band": (
            np.array([b[0] for b in bands], dtype="int16"),
            "band",
            {"long_name": "band number in the product"},
        ),
        "wavelength": (np.array([b[1] for b in bands], dtype="float64"), "band", {"units": "nm"}),
        "fwhm": (np.array([b[2] for b in bands], dtype="float64"), "band", {"units": "nm"}),
    }
    for name, (values, dimension, attributes) in one_d.items():
        array = group.create_array(
            name,
            shape=values.shape,
            chunks=(max(1, len(values)),),
            dtype=values.dtype if values.dtype.kind != "U" else str,
            dimension_names=(dimension,),
            attributes=attributes,
        )
        if len(values):
            array[:] = values


def _epoch_microseconds(times: Any) -> np.ndarray:
    import pandas as pd

    stamps = pd.to_datetime(times, utc=True)
    return np.asarray(
        (stamps - pd.Timestamp("1970-01-01", tz="UTC")) // pd.Timedelta(microseconds=1), dtype="int64"
    )


def zarr_store(store: BuildStore) -> Any:
    """The zarr store of `dataset.zarr`: a local path, or an fsspec store for object storage."""
    if store.is_local:
        return store.path(DATASET)
    from zarr.storage import FsspecStore

    return FsspecStore.from_url(store.uri_of(DATASET), storage_options=dict(store.storage_options))


def shard_key(array: str, shard: int, ndim: int) -> str:
    """Store key of a shard (default chunk key encoding: `c/<i>/0/0...`)."""
    return f"{DATASET}/{array}/c/{shard}" + "/0" * (ndim - 1)


def write_task(
    task: WriteTask,
    records: dict[str, SceneRecord],
    manifest: Manifest,
    build_uri: str,
    storage_options: dict | None = None,
) -> list[dict[str, Any]]:
    """The per-task work: fill the task's shards one after the other, each whole, and checksum them.

    Each scene is opened once and each read unit read once, over the columns of all the task's patches
    in it; a unit is dropped from memory after the last shard that needs it, so memory stays at about
    one shard plus the open strips.
    """
    import contextlib

    import zarr

    from pipeline.tile import read_mask

    store = BuildStore(build_uri, storage_options or {})
    size = manifest.grid.patch_size
    per_shard = manifest.write.patches_per_shard
    scene_ids = sorted({p.scene_id for p in task.patches})
    kept_sets = {manifest.bands.kept_bands(records[s].wavelengths_nm) for s in scene_ids}
    if len(kept_sets) != 1:
        raise ValueError("scenes of one build must share the band axis")
    kept = list(kept_sets.pop())
    windows = unit_windows(task.patches, size)
    last_use = {(p.scene_id, p.row_off): p.row // per_shard for p in task.patches}
    group = zarr.open_group(zarr_store(store), mode="r+", zarr_format=3)
    reflectance, quality = group["reflectance"], group["quality"]
    assert isinstance(reflectance, zarr.Array) and isinstance(quality, zarr.Array)
    n = reflectance.shape[0]
    checksums = []
    with contextlib.ExitStack() as stack:
        sources = {}
        masks = {}
        for scene_id in scene_ids:
            opened = stack.enter_context(
                open_product(records[scene_id].location(), storage_options, unpack=("SPECTRAL_IMAGE",))
            )
            sources[scene_id] = stack.enter_context(rasterio.open(opened.spectral_path))
            masks[scene_id] = read_mask(store, scene_id)
        units: dict[tuple[str, int], np.ndarray] = {}
        for shard in range(task.first_shard, task.last_shard + 1):
            start, stop = shard * per_shard, min((shard + 1) * per_shard, n)
            cube = np.empty((stop - start, len(kept), size, size), dtype=np.int16)
            bits = np.empty((stop - start, size, size), dtype=np.uint16)
            for p in task.patches[start - task.first_shard * per_shard : stop - task.first_shard * per_shard]:
                key = (p.scene_id, p.row_off)
                window = windows[key]
                if key not in units:
                    units[key] = sources[p.scene_id].read(kept, window=window)
                c = p.col_off - window.col_off
                cube[p.row - start] = units[key][:, :, c : c + size]
                bits[p.row - start] = masks[p.scene_id][
                    p.row_off : p.row_off + size, p.col_off : p.col_off + size
                ]
            reflectance[start:stop] = cube
            quality[start:stop] = bits
            moments = BandMoments.of_block(cube)
            for key in [k for k in units if last_use[k] <= shard]:
                del units[key]
            checksums.append(
                {
                    "shard": shard,
                    "first_row": start,
                    "stop_row": stop,
                    "reflectance_sha256": hashlib.sha256(
                        store.read_bytes(shard_key("reflectance", shard, 4))
                    ).hexdigest(),
                    "quality_sha256": hashlib.sha256(
                        store.read_bytes(shard_key("quality", shard, 3))
                    ).hexdigest(),
                    "scenes": sorted({p.scene_id for p in task.patches if start <= p.row < stop}),
                    "moments": json.dumps(moments.to_json()),
                }
            )
    return checksums


SHARDS_SCHEMA = pa.schema(
    [
        ("shard", pa.int64()),
        ("first_row", pa.int64()),
        ("stop_row", pa.int64()),
        ("reflectance_sha256", pa.string()),
        ("quality_sha256", pa.string()),
        ("scenes", pa.list_(pa.string())),
        ("moments", pa.string()),  # per-band BandMoments of the shard (JSON), merged into stats/
    ]
)


def kept_band_axis(manifest: Manifest, records: Sequence[SceneRecord]) -> list[tuple[int, float, float]]:
    """(band number, wavelength nm, fwhm nm) of the build's band axis, from the first scene."""
    if not records:
        return []
    first = records[0]
    kept = manifest.bands.kept_bands(first.wavelengths_nm)
    return [(b, first.wavelengths_nm[b - 1], first.fwhm_nm[b - 1]) for b in kept]


def run_write(
    manifest: Manifest,
    store: BuildStore,
    scheduler: Any,
    storage_options: dict | None = None,
    force: bool = False,
) -> Any:
    from pipeline.dedup import INDEX_PATCHES
    from pipeline.mask import StageResult, read_scenes

    watch = Stopwatch()
    if not store.exists(INDEX_PATCHES):
        raise FileNotFoundError(f"{store.uri_of(INDEX_PATCHES)} is missing: run the dedup stage first")
    index_bytes = store.read_bytes(INDEX_PATCHES)
    index = store.read_geodataframe(INDEX_PATCHES).sort_values("row").reset_index(drop=True)
    records = {r.scene_id: r for r in read_scenes(store)}
    config_hash = manifest.stage_hash(STAGE)
    input_fingerprint = hashlib.sha256(index_bytes).hexdigest()[:16]
    previous = store.read_stage_record(STAGE)
    if (
        not force
        and previous
        and previous["config_hash"] == config_hash
        and previous["input_fingerprint"] == input_fingerprint
        and store.exists(SHARDS_TABLE)
    ):
        return StageResult(previous["counts"], skipped=True)
    used = [records[s] for s in sorted(set(index["scene_id"]))]
    bands = kept_band_axis(manifest, used)
    create_template(store, manifest, index, bands)
    watch.lap("template")
    refs = [
        PatchRef(int(r.row), r.scene_id, int(r.row_off), int(r.col_off))
        for r in index[["row", "scene_id", "row_off", "col_off"]].itertuples(index=False)
    ]
    tasks = plan_tasks(refs, manifest.write.patches_per_shard, max_shards=MAX_SHARDS_PER_TASK)
    # Each task carries only the scene records it reads.
    pairs = [(task, {p.scene_id: records[p.scene_id] for p in task.patches}) for task in tasks]
    results = scheduler.map(_run_task, pairs, manifest, store.uri, storage_options, label="write")
    watch.lap("write")
    checksums = sorted((c for result in results for c in result), key=lambda c: c["shard"])
    store.write_table(SHARDS_TABLE, pa.Table.from_pylist(checksums, schema=SHARDS_SCHEMA))
    write_statistics(store, [BandMoments.from_json(json.loads(c["moments"])) for c in checksums], bands)
    _consolidate(store)
    counts = {
        "patches": len(index),
        "bands": len(bands),
        "shards": len(checksums),
        "tasks": len(tasks),
        "dataset_bytes": _dataset_bytes(store),
    }
    watch.lap("finish")
    store.write_stage_record(StageRecord(STAGE, config_hash, input_fingerprint, counts, watch.timings))
    return StageResult(counts, skipped=False)


def _run_task(
    pair: tuple[WriteTask, dict[str, SceneRecord]],
    manifest: Manifest,
    build_uri: str,
    storage_options: dict | None,
) -> list[dict[str, Any]]:
    task, records = pair
    return write_task(task, records, manifest, build_uri, storage_options)


def write_statistics(
    store: BuildStore, shard_moments: list[BandMoments], bands: Sequence[tuple[int, float, float]]
) -> BandMoments:
    """Merge the shards' moments (in shard order, so the result is the same on every run) and save
    them as `stats/mean.npy`, `stats/std.npy` (float32, one value per kept band, stored int16 units),
    `stats/statistics.json`, and in the reflectance array's attributes."""
    import zarr

    total = BandMoments.empty(len(bands))
    for moments in shard_moments:
        total = total.merge(moments)
    store.write_bytes("stats/mean.npy", npy_bytes(total.mean.astype(np.float32)))
    store.write_bytes("stats/std.npy", npy_bytes(total.std.astype(np.float32)))
    summary = {
        "units": "stored int16 (reflectance x 10000); nodata -32768 excluded",
        "band": [b[0] for b in bands],
        "wavelength_nm": [b[1] for b in bands],
        "count": total.count.tolist(),
        "mean": _finite(total.mean),
        "std": _finite(total.std),
        "min": _finite(total.minimum),
        "max": _finite(total.maximum),
    }
    store.write_json("stats/statistics.json", summary)
    array = zarr.open_array(zarr_store(store), path="reflectance", mode="r+")
    array.attrs.update(
        {"band_statistics": {k: summary[k] for k in ("units", "count", "mean", "std", "min", "max")}}
    )
    return total


def _finite(values: np.ndarray) -> list[float | None]:
    """JSON-safe: a band without valid pixels has no mean, std, min or max (null, not NaN/Infinity)."""
    return [float(v) if np.isfinite(v) else None for v in values]


def _consolidate(store: BuildStore) -> None:
    import warnings

    import zarr

    with warnings.catch_warnings():
        # zarr 3.1 warns that consolidated metadata is not yet in the v3 spec; xarray relies on it.
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        zarr.consolidate_metadata(zarr_store(store))


def _dataset_bytes(store: BuildStore) -> int:
    return int(sum(info.get("size", 0) for info in store.fs.find(store.path(DATASET), detail=True).values()))
