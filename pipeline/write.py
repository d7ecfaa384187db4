"""Stage 5, `write`: copy the kept patches into `dataset.zarr` (Zarr format 3), bit-exact.

Layout (SPEC): `reflectance` int16 (patch, band, y, x), one patch per inner chunk, several patches per
shard (sharding codec, Blosc zstd + bitshuffle, fill -32768, CF scale/fill attributes); `quality`
uint16 (patch, y, x), same chunking; 1-D arrays over patch and band. The driver preallocates the
arrays (the template) and writes the small 1-D arrays; each task then fills whole shards by region.

Tasks (planned in `pipeline.write_plan`): every scene is read by exactly one read task, each of its
(scene, grid row) units once, over just the columns its patches span; every shard is written whole
by exactly one task (concurrent partial writes to one shard lose data in zarr-python). A shard whose
patches come from the scenes of two read tasks is staged in parts and written by a stitch task.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import rasterio
from rasterio.windows import Window

from pipeline import tables
from pipeline.engine import StageResult, up_to_date
from pipeline.enmap.product import open_product
from pipeline.errors import is_transient
from pipeline.inventory import SceneRecord
from pipeline.manifest import Manifest
from pipeline.quality import NODATA_VALUE
from pipeline.stats import BandMoments, npy_bytes
from pipeline.storage import BuildStore, StageRecord, Stopwatch, canonical_json
from pipeline.tables import read_geodataframe_checked, read_table_checked
from pipeline.write_plan import (
    STAGING,
    ReadTask,
    ShardJob,
    StitchTask,
    WritePlan,
    plan_jobs,
    plan_tasks,
    staging_path,
    unit_windows,
)

STAGE = "write"
DATASET = tables.DATASET
SHARDS_TABLE = tables.SHARDS
SHARD_RECORDS = tables.SHARD_RECORDS
REFLECTANCE_SCALE = 0.0001


def dataset_attrs(manifest: Manifest, n_patches: int) -> dict[str, Any]:
    return {
        "title": f"{manifest.name}: EnMAP L2A patches",
        "patch_size": manifest.grid.patch_size,
        "pixel_size_m": manifest.grid.pixel_size,
        "patches_per_shard": manifest.write.patches_per_shard,
        "n_patches": n_patches,
        "Conventions": "CF-1.10",
    }


def layout_key(manifest: Manifest, bands: Sequence[tuple[int, float, float]], lineage: str) -> str:
    """What makes stored shards reusable: the band axis, patch size, shard size, codec, index lineage."""
    payload = {
        "bands": [list(b) for b in bands],
        "patch_size": manifest.grid.patch_size,
        "patches_per_shard": manifest.write.patches_per_shard,
        "compression_level": manifest.write.compression_level,
        "lineage": lineage,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def ensure_arrays(
    store: BuildStore, manifest: Manifest, rows: int, bands: Sequence[tuple[int, float, float]], layout: str
) -> bool:
    """Preallocate `reflectance` and `quality` for `rows` patches, reusing the existing arrays (grown
    if needed) when their layout matches. Returns True when the existing arrays were kept."""
    import zarr
    from zarr.codecs import BloscCodec, BloscShuffle

    size = manifest.grid.patch_size
    per_shard = manifest.write.patches_per_shard
    # A chunk dimension must be at least 1, even along an axis of length 0 (a build that kept no patch,
    # or has no band axis at all, still gets well-formed empty arrays).
    band_chunk = max(1, len(bands))
    try:
        group = zarr.open_group(zarr_store(store), mode="r+", zarr_format=3, use_consolidated=False)
        kept = group.attrs.get("layout_key") == layout and {"reflectance", "quality"} <= set(
            group.array_keys()
        )
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        kept = False
    except Exception as exc:
        if is_transient(exc):
            raise
        # Metadata that does not parse is not trusted: the arrays are made afresh (every shard rewritten).
        print(f"write: dataset.zarr's metadata is unreadable ({type(exc).__name__}); writing it afresh")
        kept = False
    if kept:
        for name in ("reflectance", "quality"):
            array = group[name]
            assert isinstance(array, zarr.Array)
            if array.shape[0] != rows:
                array.resize((rows, *array.shape[1:]))
        group.attrs.update(dataset_attrs(manifest, rows) | {"layout_key": layout})
        return True
    codec = BloscCodec(cname="zstd", clevel=manifest.write.compression_level, shuffle=BloscShuffle.bitshuffle)
    group = zarr.open_group(zarr_store(store), mode="w", zarr_format=3)
    group.attrs.update(dataset_attrs(manifest, rows) | {"layout_key": layout})
    group.create_array(
        "reflectance",
        shape=(rows, len(bands), size, size),
        chunks=(1, band_chunk, size, size),
        shards=(per_shard, band_chunk, size, size),
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
            "coordinates": "patch_id location_id scene_id time epsg x_ul y_ul active band wavelength fwhm",
        },
    )
    group.create_array(
        "quality",
        shape=(rows, size, size),
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
            "coordinates": "patch_id location_id scene_id time epsg x_ul y_ul active",
        },
    )
    return False


def write_row_arrays(store: BuildStore, rows: Any, bands: Sequence[tuple[int, float, float]]) -> None:
    """The 1-D arrays over patch (from every row: index patches and retired rows) and over band.

    Small, so rewritten whole on every run. `active` is 1 for rows listed in the index and 0 for rows
    that hold a superseded or dropped patch (kept in place so that no shard has to be rewritten).
    """
    import zarr

    group = zarr.open_group(zarr_store(store), mode="r+", zarr_format=3, use_consolidated=False)
    one_d: dict[str, tuple[np.ndarray, str, dict[str, Any]]] = {
        "patch_id": (rows["patch_id"].to_numpy(dtype=str), "patch", {}),
        "location_id": (rows["location_id"].to_numpy(dtype=str), "patch", {}),
        "scene_id": (rows["scene_id"].to_numpy(dtype=str), "patch", {}),
        "time": (
            _epoch_microseconds(rows["start_time"]),
            "patch",
            {
                "units": "microseconds since 1970-01-01T00:00:00",
                "calendar": "proleptic_gregorian",
                "standard_name": "time",
            },
        ),
        "epsg": (
            rows["epsg"].to_numpy(dtype="int32"),
            "patch",
            {"long_name": "EPSG code of the patch's UTM CRS"},
        ),
        "x_ul": (
            rows["x_ul"].to_numpy(dtype="float64"),
            "patch",
            {"units": "m", "long_name": "upper-left x"},
        ),
        "y_ul": (
            rows["y_ul"].to_numpy(dtype="float64"),
            "patch",
            {"units": "m", "long_name": "upper-left y"},
        ),
        "active": (
            rows["active"].to_numpy(dtype="uint8"),
            "patch",
            {"long_name": "1: in the index; 0: superseded or dropped, hidden from catalog and queries"},
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
            overwrite=True,
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
    return tables.shard_object(array, shard, ndim)


def _open_arrays(store: BuildStore) -> tuple[Any, Any]:
    import zarr

    # Write empty chunks too: a clean patch's quality is all 0 (the fill value), and every shard must
    # exist on disk to be checksummed and found on resume. Not the consolidated metadata: it is
    # rewritten only at the end of the stage and may still give an older shape.
    with zarr.config.set({"array.write_empty_chunks": True}):
        group = zarr.open_group(zarr_store(store), mode="r+", zarr_format=3, use_consolidated=False)
        reflectance, quality = group["reflectance"], group["quality"]
    assert isinstance(reflectance, zarr.Array) and isinstance(quality, zarr.Array)
    return reflectance, quality


def _write_shard(
    store: BuildStore,
    arrays: tuple[Any, Any],
    job: ShardJob,
    filled: tuple[np.ndarray, np.ndarray],
    layout_key: str,
) -> dict[str, Any]:
    """Write one whole shard, then its record (`write/shards/<shard>.json`: content keys, checksums,
    statistics), atomically: a shard without a valid record is rewritten on resume."""
    reflectance, quality = arrays
    cube, bits = filled
    reflectance[job.start : job.stop] = cube
    quality[job.start : job.stop] = bits
    active = [row - job.start for row in job.active]
    moments = BandMoments.of_block(cube[active]) if active else BandMoments.empty(cube.shape[1])
    record = shard_record(store, job, layout_key, moments)
    store.write_json(shard_record_path(job.shard), record)
    return record


def _shard_buffers(arrays: tuple[Any, Any], job: ShardJob) -> tuple[np.ndarray, np.ndarray]:
    """Buffers for one shard: the stored shard when it keeps rows (read before it is replaced), else
    empty; the rows read from source are filled in afterwards."""
    reflectance, quality = arrays
    if job.copy:
        return np.asarray(reflectance[job.start : job.stop]), np.asarray(quality[job.start : job.stop])
    count = job.stop - job.start
    _, bands, size, _ = reflectance.shape
    return (
        np.empty((count, bands, size, size), dtype=np.int16),
        np.empty((count, size, size), dtype=np.uint16),
    )


def read_task(
    task: ReadTask,
    records: dict[str, SceneRecord],
    manifest: Manifest,
    build_uri: str,
    layout_key: str,
    storage_options: dict | None = None,
) -> list[dict[str, Any]]:
    """The per-run work: read the run's scenes (each opened once, each unit read once), go through
    the shards it touches in order, write the ones it owns and stage its patches of the others.

    A unit is dropped from memory after the last shard that needs it, so a task holds about one
    shard of patches at a time.
    """
    from pipeline.tile import read_mask

    store = BuildStore(build_uri, storage_options or {})
    size = manifest.grid.patch_size
    kept_sets = {manifest.bands.kept_bands(records[s].wavelengths_nm) for s in task.scenes}
    if len(kept_sets) > 1:
        raise ValueError("scenes of one build must share the band axis")
    kept = list(kept_sets.pop()) if kept_sets else []
    mine = set(task.scenes)
    patches = task.patches
    windows = unit_windows(patches, size)
    last_use = {
        (p.scene_id, p.row_off): job.shard for job in task.jobs for p in job.source if p.scene_id in mine
    }
    owned = set(task.owned)
    arrays = _open_arrays(store)
    masks = {scene_id: read_mask(store, scene_id) for scene_id in task.scenes}
    written = []
    units: dict[tuple[str, int], np.ndarray] = {}
    with _OneSceneAtATime(records, storage_options, kept, windows) as reader:
        for job in task.jobs:
            source = [p for p in job.source if p.scene_id in mine]
            if job.shard in owned:
                cube, bits = _shard_buffers(arrays, job)
                slots = [p.row - job.start for p in source]
            else:
                _, bands, _, _ = arrays[0].shape
                cube = np.empty((len(source), bands, size, size), dtype=np.int16)
                bits = np.empty((len(source), size, size), dtype=np.uint16)
                slots = list(range(len(source)))
            for slot, p in zip(slots, source, strict=True):
                key = (p.scene_id, p.row_off)
                if key not in units:
                    needed = [k for k, last in last_use.items() if last >= job.shard and k not in units]
                    units.update(reader.read(key, needed))
                c = p.col_off - windows[key].col_off
                cube[slot] = units[key][:, :, c : c + size]
                bits[slot] = masks[p.scene_id][p.row_off : p.row_off + size, p.col_off : p.col_off + size]
            if job.shard in owned:
                written.append(_write_shard(store, arrays, job, (cube, bits), layout_key))
            else:
                store.write_bytes(
                    staging_path(job.shard, task.number),
                    _npz(rows=np.array([p.row for p in source], dtype=np.int64), cube=cube, bits=bits),
                )
            for key in [k for k in units if last_use[k] <= job.shard]:
                del units[key]
    return written


def stitch_task(
    task: StitchTask, build_uri: str, layout_key: str, storage_options: dict | None = None
) -> list[dict[str, Any]]:
    """Assemble one shard from the parts its read tasks staged (and its kept stored rows), write it,
    then drop the staged parts."""
    store = BuildStore(build_uri, storage_options or {})
    job = task.job
    arrays = _open_arrays(store)
    cube, bits = _shard_buffers(arrays, job)
    expected = {p.row for p in job.source}
    filled: set[int] = set()
    for part in task.parts:
        with np.load(io.BytesIO(store.read_bytes(staging_path(job.shard, part)))) as staged:
            rows = staged["rows"]
            cube[rows - job.start] = staged["cube"]
            bits[rows - job.start] = staged["bits"]
            filled.update(int(r) for r in rows)
    if filled != expected:
        raise RuntimeError(f"shard {job.shard}: staged rows do not match the plan")
    record = _write_shard(store, arrays, job, (cube, bits), layout_key)
    for part in task.parts:
        store.fs.rm(store.path(staging_path(job.shard, part)))
    return [record]


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


class _OneSceneAtATime:
    """Reads units (scene, grid row) with at most one product open, so scratch holds at most one
    unpacked archive per worker: before switching scenes, the units of the open scene that the task
    still needs are read, then it is closed."""

    def __init__(
        self,
        records: dict[str, SceneRecord],
        storage_options: dict | None,
        kept: list[int],
        windows: dict[tuple[str, int], Window],
    ) -> None:
        self.records, self.storage_options, self.kept, self.windows = records, storage_options, kept, windows
        self.scene: str | None = None
        self.stack: contextlib.ExitStack | None = None
        self.source: Any = None

    def __enter__(self) -> _OneSceneAtATime:
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()

    def _close(self) -> None:
        if self.stack is not None:
            self.stack.close()
        self.scene, self.stack, self.source = None, None, None

    def read(
        self, key: tuple[str, int], still_needed: list[tuple[str, int]]
    ) -> dict[tuple[str, int], np.ndarray]:
        out: dict[tuple[str, int], np.ndarray] = {}
        scene_id = key[0]
        if self.scene != scene_id:
            if self.scene is not None:
                for other in still_needed:
                    if other[0] == self.scene:
                        out[other] = self.source.read(self.kept, window=self.windows[other])
                self._close()
            self.stack = contextlib.ExitStack()
            opened = self.stack.enter_context(
                open_product(
                    self.records[scene_id].location(), self.storage_options, unpack=("SPECTRAL_IMAGE",)
                )
            )
            self.source = self.stack.enter_context(rasterio.open(opened.spectral_path))
            self.scene = scene_id
        out[key] = self.source.read(self.kept, window=self.windows[key])
        return out


def shard_record_path(shard: int) -> str:
    return tables.shard_record(shard)


def shard_record(store: BuildStore, job: ShardJob, layout_key: str, moments: BandMoments) -> dict[str, Any]:
    reflectance = store.read_bytes(shard_key("reflectance", job.shard, 4))
    quality = store.read_bytes(shard_key("quality", job.shard, 3))
    return {
        "shard": job.shard,
        "first_row": job.start,
        "stop_row": job.stop,
        "layout_key": layout_key,
        "row_keys": list(job.row_keys),
        "active_rows": list(job.active),
        "reflectance_sha256": hashlib.sha256(reflectance).hexdigest(),
        "reflectance_bytes": len(reflectance),
        "quality_sha256": hashlib.sha256(quality).hexdigest(),
        "quality_bytes": len(quality),
        "scenes": sorted({p.scene_id for p in job.source}),
        "moments": moments.to_json(),
    }


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


def kept_band_axis(
    manifest: Manifest, records: Sequence[SceneRecord], fallback: Sequence[SceneRecord] = ()
) -> list[tuple[int, float, float]]:
    """(band number, wavelength nm, fwhm nm) of the build's band axis, from the first scene of
    `records` (the scenes patches come from), else from the first of `fallback` (every inventoried
    scene): a build that kept no patch still has its products' band axis, so its empty arrays are
    (0, B, size, size) like any other build's."""
    if not records:
        records = fallback
    if not records:
        return []
    first = records[0]
    kept = manifest.bands.kept_bands(first.wavelengths_nm)
    return [(b, first.wavelengths_nm[b - 1], first.fwhm_nm[b - 1]) for b in kept]


def read_shard_records(store: BuildStore) -> dict[int, dict[str, Any]]:
    folder = store.path(SHARD_RECORDS)
    if not store.fs.exists(folder):
        return {}
    records = {}
    paths = [p for p in sorted(store.fs.find(folder)) if p.endswith(".json")]
    for path, raw in store.cat_many(paths).items():
        # A record that does not parse or lacks what a reader relies on is not trusted: its shard is
        # treated as unrecorded and written again (verify reports it).
        try:
            record = json.loads(raw)
            shard = int(record["shard"])
            missing = SHARD_RECORD_KEYS - set(record)
        except (ValueError, KeyError, TypeError):
            print(f"write: ignoring the unreadable shard record {path.rsplit('/', 1)[-1]}")
            continue
        if missing or path.rsplit("/", 1)[-1] != f"{shard:06d}.json":
            print(f"write: ignoring the incomplete shard record {path.rsplit('/', 1)[-1]}")
            continue
        records[shard] = record
    return records


SHARD_RECORD_KEYS = frozenset(
    {
        "shard",
        "first_row",
        "stop_row",
        "row_keys",
        "active_rows",
        "layout_key",
        "reflectance_sha256",
        "quality_sha256",
        "reflectance_bytes",
        "quality_bytes",
        "moments",
        "scenes",
    }
)


def check_shards(store: BuildStore, records: dict[int, dict[str, Any]], checksums: bool) -> set[int]:
    """Shards whose stored objects match their records: by size (cheap), or by SHA-256 (`checksums`)."""
    valid = set()
    for shard, record in records.items():
        ok = True
        for array, ndim in (("reflectance", 4), ("quality", 3)):
            key = shard_key(array, shard, ndim)
            if not store.exists(key):
                ok = False
                break
            if checksums:
                ok = hashlib.sha256(store.read_bytes(key)).hexdigest() == record[f"{array}_sha256"]
            else:
                ok = int(store.fs.size(store.path(key))) == record[f"{array}_bytes"]
            if not ok:
                break
        if ok:
            valid.add(shard)
    return valid


def index_rows(store: BuildStore) -> Any:
    """Every row of the Zarr arrays: the index patches (active) and the retired rows, by row."""
    import pandas as pd

    from pipeline.dedup import INDEX_PATCHES, INDEX_RETIRED

    active = read_geodataframe_checked(store, INDEX_PATCHES)
    active["active"] = True
    parts = [active]
    retired = read_geodataframe_checked(store, INDEX_RETIRED)
    if len(retired):
        retired["active"] = False
        parts.append(retired)
    rows = pd.concat(parts, ignore_index=True).sort_values("row").reset_index(drop=True)
    if list(rows["row"]) != list(range(len(rows))):
        raise ValueError("index rows are not 0..N-1: rebuild the index (dedup --force)")
    return rows


def run_write(
    manifest: Manifest,
    store: BuildStore,
    scheduler: Any,
    storage_options: dict | None = None,
    force: bool = False,
    verify: bool = False,
) -> Any:
    """Write (or resume, or extend) dataset.zarr so that it holds every index row.

    Shards already stored with the right content are kept (checked by size, or by checksum with
    `verify`); every other shard is written whole by exactly one task.
    """
    from pipeline.dedup import INDEX_LINEAGE, INDEX_PATCHES, INDEX_RETIRED
    from pipeline.mask import MASKS_TABLE, read_scenes, summaries_from_table

    watch = Stopwatch()
    digest = hashlib.sha256(store.read_bytes(INDEX_PATCHES))
    digest.update(store.read_bytes(INDEX_RETIRED))
    # The masks are part of every row's content: a scene masked again (other quality bits) must be
    # written again even when its patch ids, scene and product are unchanged.
    mask_sha = {
        s.scene_id: s.mask_sha256 for s in summaries_from_table(read_table_checked(store, MASKS_TABLE))
    }
    digest.update(canonical_json(sorted(mask_sha.items())).encode())
    input_fingerprint = digest.hexdigest()[:16]
    config_hash = manifest.stage_hash(STAGE)
    shard_records = read_shard_records(store)
    done = up_to_date(
        store,
        STAGE,
        config_hash,
        input_fingerprint,
        lambda: _outputs_valid(store, shard_records, verify),
        force,
    )
    if done:
        return done
    rows = index_rows(store)
    records = {r.scene_id: r for r in read_scenes(store)}
    active = rows[rows["active"]]
    bands = kept_band_axis(
        manifest, [records[s] for s in sorted(set(active["scene_id"]))], fallback=list(records.values())
    )
    lineage = store.read_json(INDEX_LINEAGE)["lineage"] if store.exists(INDEX_LINEAGE) else "none"
    layout = layout_key(manifest, bands, lineage)
    arrays_kept = ensure_arrays(store, manifest, len(rows), bands, layout) and not force
    write_row_arrays(store, rows, bands)
    watch.lap("template")
    valid = check_shards(store, shard_records, checksums=verify) if arrays_kept else set()
    fingerprints = {sid: f"{r.fingerprint}|{mask_sha.get(sid, '')}" for sid, r in records.items()}
    per_shard = manifest.write.patches_per_shard
    jobs, reusable = plan_jobs(rows, per_shard, fingerprints, shard_records, layout, arrays_kept, valid)
    plan = plan_tasks(
        jobs,
        {sid: r.packaging != "folder" for sid, r in records.items()},
        per_shard * manifest.write.max_shards_per_task,
        scheduler.parallelism,
    )
    results = run_plan(plan, records, manifest, store, layout, scheduler, storage_options)
    watch.lap("write")
    shard_count = (len(rows) + per_shard - 1) // per_shard
    for stale in [s for s in shard_records if s >= shard_count]:
        store.fs.rm(store.path(shard_record_path(stale)))
    final = {**reusable, **{r["shard"]: r for result in results for r in result}}
    ordered = [final[s] for s in range(shard_count)]
    store.write_table(SHARDS_TABLE, shards_table(ordered))
    write_statistics(store, [BandMoments.from_json(r["moments"]) for r in ordered], bands)
    _consolidate(store)
    counts = {
        "patches": len(active),
        "rows": len(rows),
        "bands": len(bands),
        "shards": shard_count,
        "shards_written": len(jobs),
        "rows_read_from_source": sum(len(j.source) for j in jobs),
        "read_tasks": len(plan.reads),
        "stitched_shards": len(plan.stitches),
        "dataset_bytes": _dataset_bytes(store),
    }
    watch.lap("finish")
    store.write_stage_record(StageRecord(STAGE, config_hash, input_fingerprint, counts, watch.timings))
    return StageResult(counts, skipped=False)


def _outputs_valid(store: BuildStore, shard_records: dict[int, dict[str, Any]], checksums: bool) -> bool:
    """The dataset's metadata parses, the shard table validates, and every shard it lists is stored
    as its record says (by size, or by checksum with `checksums`)."""
    for path in (f"{DATASET}/zarr.json", f"{DATASET}/reflectance/zarr.json", f"{DATASET}/quality/zarr.json"):
        metadata = store.read_json(path)
        if not isinstance(metadata, dict) or metadata.get("zarr_format") != 3:
            return False
    table = read_table_checked(store, SHARDS_TABLE)
    listed = set(table.column("shard").to_pylist())
    return listed <= set(shard_records) and listed <= check_shards(
        store, {s: shard_records[s] for s in listed}, checksums
    )


def shards_table(records: list[dict[str, Any]]) -> pa.Table:
    rows = [
        {
            "shard": r["shard"],
            "first_row": r["first_row"],
            "stop_row": r["stop_row"],
            "reflectance_sha256": r["reflectance_sha256"],
            "quality_sha256": r["quality_sha256"],
            "scenes": r["scenes"],
            "moments": json.dumps(r["moments"], sort_keys=True),
        }
        for r in records
    ]
    return pa.Table.from_pylist(rows, schema=SHARDS_SCHEMA)


def run_plan(
    plan: WritePlan,
    records: dict[str, SceneRecord],
    manifest: Manifest,
    store: BuildStore,
    layout: str,
    scheduler: Any,
    storage_options: dict | None,
) -> list[list[dict[str, Any]]]:
    """Read tasks in parallel, each stitch task as soon as the read tasks it needs are done; staging is
    removed after (and before: parts left by an interrupted run belong to an older plan)."""
    _remove_staging(store)
    # Each read task carries only the scene records it reads.
    pairs = [(task, {s: records[s] for s in task.scenes}) for task in plan.reads]
    # A stitch task starts as soon as the read tasks that stage its parts are done.
    reads, stitches = scheduler.map_then(
        _run_read_task,
        pairs,
        _run_stitch_task,
        list(plan.stitches),
        [stitch.parts for stitch in plan.stitches],
        manifest,
        store.uri,
        layout,
        storage_options,
        label="write",
    )
    results = [*reads, *stitches]
    _remove_staging(store)
    return results


def _remove_staging(store: BuildStore) -> None:
    if store.fs.exists(store.path(STAGING)):
        store.fs.rm(store.path(STAGING), recursive=True)


def _run_stitch_task(
    task: StitchTask, manifest: Manifest, build_uri: str, layout: str, storage_options: dict | None
) -> list[dict[str, Any]]:
    return stitch_task(task, build_uri, layout, storage_options)


def _run_read_task(
    pair: tuple[ReadTask, dict[str, SceneRecord]],
    manifest: Manifest,
    build_uri: str,
    layout: str,
    storage_options: dict | None,
) -> list[dict[str, Any]]:
    task, records = pair
    return read_task(task, records, manifest, build_uri, layout, storage_options)


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
    store.write_bytes(tables.STATS_MEAN, npy_bytes(total.valid_mean.astype(np.float32)))
    store.write_bytes(tables.STATS_STD, npy_bytes(total.std.astype(np.float32)))
    summary = {
        "units": "stored int16 (reflectance x 10000); nodata -32768 excluded",
        "band": [b[0] for b in bands],
        "wavelength_nm": [b[1] for b in bands],
        "count": total.count.tolist(),
        "mean": _finite(total.valid_mean),
        "std": _finite(total.std),
        "min": _finite(total.minimum),
        "max": _finite(total.maximum),
    }
    store.write_json(tables.STATS_SUMMARY, summary)
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


@dataclass(frozen=True, slots=True)
class VerifyResult:
    shards: int
    bad: tuple[int, ...]  # shards whose stored bytes do not match their recorded SHA-256 (or are missing)
    unrecorded: tuple[int, ...]  # shards the arrays need but that have no record (an interrupted write)


def verify_build(store: BuildStore, repair: bool = False) -> VerifyResult:
    """Check every shard of dataset.zarr against its recorded checksum. With `repair`, forget the bad
    shards' records (and the write stage's record) so that the next `write` rewrites exactly those."""
    from pipeline.dedup import INDEX_PATCHES

    if not store.exists(INDEX_PATCHES) or not store.exists(tables.DATASET_METADATA):
        raise FileNotFoundError(f"{store.uri} holds no written dataset: run the write stage first")
    records = read_shard_records(store)
    rows = index_rows(store)
    # Checked: a damaged zarr.json is named in one line (rerun write), not a KeyError or a JSON traceback.
    metadata = tables.read_json_checked(store, tables.DATASET_METADATA)
    per_shard = metadata["attributes"]["patches_per_shard"]
    if per_shard < 1:
        raise tables.CorruptOutput(tables.DATASET_METADATA, f"patches_per_shard is {per_shard}")
    expected = set(range((len(rows) + per_shard - 1) // per_shard))
    valid = check_shards(store, {s: r for s, r in records.items() if s in expected}, checksums=True)
    bad = tuple(sorted(s for s in records if s in expected and s not in valid))
    unrecorded = tuple(sorted(expected - set(records)))
    if repair and (bad or unrecorded):
        for shard in bad:
            store.fs.rm(store.path(shard_record_path(shard)))
        record = store.stage_record_path(STAGE)
        if store.exists(record):
            store.fs.rm(store.path(record))
    return VerifyResult(len(expected), bad, unrecorded)
