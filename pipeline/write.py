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

import contextlib
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
SHARD_RECORDS = "write/shards"
REFLECTANCE_SCALE = 0.0001


@dataclass(frozen=True, slots=True)
class PatchRef:
    """What a write task needs of one index row."""

    row: int
    scene_id: str
    row_off: int
    col_off: int


@dataclass(frozen=True, slots=True)
class ShardJob:
    """One shard to (re)write: which rows come from a source product and which are kept as stored."""

    shard: int
    start: int
    stop: int
    source: tuple[PatchRef, ...]  # rows whose pixels are read from their product
    copy: tuple[int, ...]  # rows whose stored pixels are unchanged and copied from the existing shard
    active: tuple[int, ...]  # rows listed in the index (statistics cover these)
    row_keys: tuple[str, ...]  # content key of every row start..stop-1


@dataclass(frozen=True, slots=True)
class WriteTask:
    jobs: tuple[ShardJob, ...]  # consecutive shards, in order

    @property
    def first_shard(self) -> int:
        return self.jobs[0].shard

    @property
    def last_shard(self) -> int:
        return self.jobs[-1].shard

    @property
    def patches(self) -> tuple[PatchRef, ...]:
        return tuple(p for job in self.jobs for p in job.source)


def read_units(patches: Sequence[PatchRef]) -> set[tuple[str, int]]:
    return {(p.scene_id, p.row_off) for p in patches}


MAX_SHARDS_PER_TASK = 8


def group_jobs(jobs: Sequence[ShardJob], max_shards: int = MAX_SHARDS_PER_TASK) -> list[WriteTask]:
    """Group shard jobs into tasks; pure.

    Rows are ordered by scene and raster position (dedup), so a shard boundary may cut a grid row of a
    scene (a read unit). Consecutive shards that share a unit join one task, which reads the unit
    once, up to `max_shards` per task so a long chain cannot serialise the build. Where a chain is
    cut, the two tasks read disjoint column ranges of the unit (its patches are in column order), so
    no pixel is ever read twice; only a strip-organised source may then decode that grid row's strips
    twice.
    """
    if max_shards < 1:
        raise ValueError("max_shards must be >= 1")
    tasks: list[WriteTask] = []
    current: list[ShardJob] = []
    for job in sorted(jobs, key=lambda j: j.shard):
        joined = (
            current
            and current[-1].shard + 1 == job.shard
            and read_units(current[-1].source) & read_units(job.source)
        )
        if current and (not joined or len(current) >= max_shards):
            tasks.append(WriteTask(tuple(current)))
            current = []
        current.append(job)
    if current:
        tasks.append(WriteTask(tuple(current)))
    return tasks


def plan_tasks(
    patches: Sequence[PatchRef], per_shard: int, max_shards: int = MAX_SHARDS_PER_TASK
) -> list[WriteTask]:
    """Tasks for a build written from scratch: every row read from its source."""
    ordered = sorted(patches, key=lambda p: p.row)
    if [p.row for p in ordered] != list(range(len(ordered))):
        raise ValueError("index rows must be 0..N-1")
    jobs = []
    for shard, start in enumerate(range(0, len(ordered), per_shard)):
        rows = ordered[start : start + per_shard]
        jobs.append(
            ShardJob(shard, start, start + len(rows), tuple(rows), (), tuple(p.row for p in rows), ())
        )
    return group_jobs(jobs, max_shards)


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
    try:
        group = zarr.open_group(zarr_store(store), mode="r+", zarr_format=3, use_consolidated=False)
        kept = group.attrs.get("layout_key") == layout and {"reflectance", "quality"} <= set(
            group.array_keys()
        )
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
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
    return f"{DATASET}/{array}/c/{shard}" + "/0" * (ndim - 1)


def write_task(
    task: WriteTask,
    records: dict[str, SceneRecord],
    manifest: Manifest,
    build_uri: str,
    layout_key: str,
    storage_options: dict | None = None,
) -> list[dict[str, Any]]:
    """The per-task work: fill the task's shards one after the other, each whole, and record each.

    Each scene is opened once and each read unit read once, over the columns of all the task's source
    patches in it; a unit is dropped from memory after the last shard that needs it. Rows whose
    stored pixels are unchanged are copied from the existing shard (read before it is replaced).
    After a shard is written, its record (`write/shards/<shard>.json`: content keys, checksums,
    statistics) is written atomically: a shard without a valid record is rewritten on resume.
    """
    import zarr

    from pipeline.tile import read_mask

    store = BuildStore(build_uri, storage_options or {})
    size = manifest.grid.patch_size
    scene_ids = sorted({p.scene_id for p in task.patches})
    kept_sets = {manifest.bands.kept_bands(records[s].wavelengths_nm) for s in scene_ids}
    if len(kept_sets) > 1:
        raise ValueError("scenes of one build must share the band axis")
    windows = unit_windows(task.patches, size)
    last_use = {(p.scene_id, p.row_off): job.shard for job in task.jobs for p in job.source}
    # Write empty chunks too: a clean patch's quality is all 0 (the fill value), and every shard must
    # exist on disk to be checksummed and found on resume. Not the consolidated metadata: it is
    # rewritten only at the end of the stage and may still give an older shape.
    with zarr.config.set({"array.write_empty_chunks": True}):
        group = zarr.open_group(zarr_store(store), mode="r+", zarr_format=3, use_consolidated=False)
        reflectance, quality = group["reflectance"], group["quality"]
    assert isinstance(reflectance, zarr.Array) and isinstance(quality, zarr.Array)
    bands = reflectance.shape[1]
    written = []
    masks = {scene_id: read_mask(store, scene_id) for scene_id in scene_ids}
    kept = list(kept_sets.pop()) if kept_sets else []
    units: dict[tuple[str, int], np.ndarray] = {}
    with _OneSceneAtATime(records, storage_options, kept, windows) as reader:
        for job in task.jobs:
            count = job.stop - job.start
            if job.copy:
                cube = np.asarray(reflectance[job.start : job.stop])
                bits = np.asarray(quality[job.start : job.stop])
            else:
                cube = np.empty((count, bands, size, size), dtype=np.int16)
                bits = np.empty((count, size, size), dtype=np.uint16)
            for p in job.source:
                key = (p.scene_id, p.row_off)
                if key not in units:
                    units.update(
                        reader.read(
                            key, [k for k, last in last_use.items() if last >= job.shard and k not in units]
                        )
                    )
                window = windows[key]
                c = p.col_off - window.col_off
                cube[p.row - job.start] = units[key][:, :, c : c + size]
                bits[p.row - job.start] = masks[p.scene_id][
                    p.row_off : p.row_off + size, p.col_off : p.col_off + size
                ]
            reflectance[job.start : job.stop] = cube
            quality[job.start : job.stop] = bits
            for key in [k for k in units if last_use[k] <= job.shard]:
                del units[key]
            active = [row - job.start for row in job.active]
            moments = BandMoments.of_block(cube[active]) if active else BandMoments.empty(bands)
            record = shard_record(store, job, layout_key, moments)
            store.write_json(shard_record_path(job.shard), record)
            written.append(record)
    return written


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
    return f"{SHARD_RECORDS}/{shard:06d}.json"


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


def kept_band_axis(manifest: Manifest, records: Sequence[SceneRecord]) -> list[tuple[int, float, float]]:
    """(band number, wavelength nm, fwhm nm) of the build's band axis, from the first scene."""
    if not records:
        return []
    first = records[0]
    kept = manifest.bands.kept_bands(first.wavelengths_nm)
    return [(b, first.wavelengths_nm[b - 1], first.fwhm_nm[b - 1]) for b in kept]


def row_key(patch_id: str, scene_id: str, fingerprint: str) -> str:
    """Content key of one row: the same key means the same stored pixels."""
    return hashlib.sha256(f"{patch_id}|{scene_id}|{fingerprint}".encode()).hexdigest()[:16]


def plan_jobs(
    rows: Any,
    per_shard: int,
    fingerprints: dict[str, str],
    records_by_shard: dict[int, dict[str, Any]],
    layout: str,
    arrays_kept: bool,
    valid_shards: set[int],
) -> tuple[list[ShardJob], dict[int, dict[str, Any]]]:
    """Which shards to write, and how (pure over the tables): (jobs, reusable records by shard).

    A shard is kept as stored when its record has this layout, the same content key for every row,
    the same active rows, and the stored object passed the check (`valid_shards`). Otherwise it is
    rewritten whole by one task: active rows whose key changed are read from their product, all other
    rows are copied from the existing shard.
    """
    jobs, reusable = [], {}
    n = len(rows)
    for shard, start in enumerate(range(0, n, per_shard)):
        stop = min(start + per_shard, n)
        part = rows.iloc[start:stop]
        keys, sources, copies, active = [], [], [], []
        old = records_by_shard.get(shard) if arrays_kept else None
        old_keys = (
            dict(zip(range(old["first_row"], old["stop_row"]), old["row_keys"], strict=True)) if old else {}
        )
        for r in part.itertuples(index=False):
            row = int(r.row)
            if r.active:
                key = row_key(r.patch_id, r.scene_id, fingerprints.get(r.scene_id, ""))
                active.append(row)
                if old_keys.get(row) == key and shard in valid_shards:
                    copies.append(row)
                else:
                    sources.append(PatchRef(row, r.scene_id, int(r.row_off), int(r.col_off)))
            else:
                # A retired row keeps what it holds; its key carries over from the shard's record.
                key = old_keys.get(row, f"retired:{r.patch_id}|{r.scene_id}")
                copies.append(row)
            keys.append(key)
        unchanged = (
            old is not None
            and shard in valid_shards
            and old["layout_key"] == layout
            and (old["first_row"], old["stop_row"]) == (start, stop)
            and old["row_keys"] == keys
            and old["active_rows"] == active
        )
        if unchanged and old is not None:
            reusable[shard] = old
        else:
            jobs.append(
                ShardJob(shard, start, stop, tuple(sources), tuple(copies), tuple(active), tuple(keys))
            )
    return jobs, reusable


def read_shard_records(store: BuildStore) -> dict[int, dict[str, Any]]:
    folder = store.path(SHARD_RECORDS)
    if not store.fs.exists(folder):
        return {}
    records = {}
    for path in sorted(store.fs.find(folder)):
        if path.endswith(".json"):
            record = json.loads(store.fs.cat_file(path))
            records[int(record["shard"])] = record
    return records


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

    active = store.read_geodataframe(INDEX_PATCHES)
    active["active"] = True
    parts = [active]
    if store.exists(INDEX_RETIRED):
        retired = store.read_geodataframe(INDEX_RETIRED)
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
    from pipeline.mask import StageResult, read_scenes

    watch = Stopwatch()
    if not store.exists(INDEX_PATCHES):
        raise FileNotFoundError(f"{store.uri_of(INDEX_PATCHES)} is missing: run the dedup stage first")
    digest = hashlib.sha256(store.read_bytes(INDEX_PATCHES))
    if store.exists(INDEX_RETIRED):
        digest.update(store.read_bytes(INDEX_RETIRED))
    input_fingerprint = digest.hexdigest()[:16]
    config_hash = manifest.stage_hash(STAGE)
    previous = store.read_stage_record(STAGE)
    shard_records = read_shard_records(store)
    if (
        not force
        and previous
        and previous["config_hash"] == config_hash
        and previous["input_fingerprint"] == input_fingerprint
        and store.exists(SHARDS_TABLE)
        and len(check_shards(store, shard_records, checksums=verify)) == previous["counts"]["shards"]
    ):
        return StageResult(previous["counts"], skipped=True)
    rows = index_rows(store)
    records = {r.scene_id: r for r in read_scenes(store)}
    active = rows[rows["active"]]
    bands = kept_band_axis(manifest, [records[s] for s in sorted(set(active["scene_id"]))])
    lineage = store.read_json(INDEX_LINEAGE)["lineage"] if store.exists(INDEX_LINEAGE) else "none"
    layout = layout_key(manifest, bands, lineage)
    arrays_kept = ensure_arrays(store, manifest, len(rows), bands, layout) and not force
    write_row_arrays(store, rows, bands)
    watch.lap("template")
    valid = check_shards(store, shard_records, checksums=verify) if arrays_kept else set()
    fingerprints = {sid: r.fingerprint for sid, r in records.items()}
    per_shard = manifest.write.patches_per_shard
    jobs, reusable = plan_jobs(rows, per_shard, fingerprints, shard_records, layout, arrays_kept, valid)
    tasks = group_jobs(jobs, manifest.write.max_shards_per_task)
    # Each task carries only the scene records it reads.
    pairs = [(task, {p.scene_id: records[p.scene_id] for p in task.patches}) for task in tasks]
    results = scheduler.map(_run_task, pairs, manifest, store.uri, layout, storage_options, label="write")
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
        "tasks": len(tasks),
        "dataset_bytes": _dataset_bytes(store),
    }
    watch.lap("finish")
    store.write_stage_record(StageRecord(STAGE, config_hash, input_fingerprint, counts, watch.timings))
    return StageResult(counts, skipped=False)


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


def _run_task(
    pair: tuple[WriteTask, dict[str, SceneRecord]],
    manifest: Manifest,
    build_uri: str,
    layout: str,
    storage_options: dict | None,
) -> list[dict[str, Any]]:
    task, records = pair
    return write_task(task, records, manifest, build_uri, layout, storage_options)


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


@dataclass(frozen=True, slots=True)
class VerifyResult:
    shards: int
    bad: tuple[int, ...]  # shards whose stored bytes do not match their recorded SHA-256 (or are missing)
    unrecorded: tuple[int, ...]  # shards the arrays need but that have no record (an interrupted write)


def verify_build(store: BuildStore, repair: bool = False) -> VerifyResult:
    """Check every shard of dataset.zarr against its recorded checksum. With `repair`, forget the bad
    shards' records (and the write stage's record) so that the next `write` rewrites exactly those."""
    from pipeline.dedup import INDEX_PATCHES

    if not store.exists(INDEX_PATCHES) or not store.exists(f"{DATASET}/zarr.json"):
        raise FileNotFoundError(f"{store.uri} holds no written dataset: run the write stage first")
    records = read_shard_records(store)
    rows = index_rows(store)
    per_shard = int(store.read_json(f"{DATASET}/zarr.json")["attributes"]["patches_per_shard"])
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
