"""Stage 5, `write`: copy the kept patches into `dataset.zarr` (Zarr format 3), bit-exact.

Layout (SPEC): declared in `pipeline.dataset_arrays` (sharded `reflectance` and `quality`, one patch per
inner chunk; 1-D arrays over patch and band). `run_write` reads the plan first (rows, band axis, which
shards to write and which to reuse), preallocates the arrays (the template) and writes the small 1-D
arrays; each task then fills one whole shard; the driver then merges the statistics and records.

`write` opens no product. The reading pass (`pipeline.mask`) encoded every kept candidate once into
the bytes of one inner chunk per array and recorded its exact per-band sums (`cut/`); here every shard
that needs writing (`pipeline.write_plan`) is written whole by exactly one task (concurrent partial
writes to one shard lose data in zarr-python), assembled by byte copy (`pipeline.zarr_chunks.
assemble_shard`) from its new or changed rows' chunks in the cut and its unchanged or retired rows'
chunks in the shard as stored. No patch is decoded or re-encoded. Statistics merge the active rows'
sums, kept per row in each shard's record, so a partly rewritten shard still merges exactly.
A row whose chunks are needed and absent (the cut removed by `write.keep_cut: false`, or damaged) has
its scene read again by the mask stage: `write` forgets that scene's mask checkpoint and fails with
one line asking for `mask` (or `run`), and writes no fill patch.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import tables
from pipeline.cell_moments import CellSums, shard_moments
from pipeline.cut import CUT, chunk_sha, cut_bin_path, read_cut_index
from pipeline.dataset_arrays import (
    DATASET,
    consolidate,
    ensure_arrays,
    layout_key,
    write_row_arrays,
    zarr_store,
)
from pipeline.engine import StageResult, TaskError, up_to_date, with_retries
from pipeline.errors import BuildFault, StageFailed, one_line
from pipeline.inventory import SceneRecord, read_scenes
from pipeline.manifest import Manifest
from pipeline.mask import MASKS_TABLE, forget_scenes, scene_key, summaries_from_table
from pipeline.stats import BandMoments, npy_bytes
from pipeline.storage import BuildStore, StageRecord, Stopwatch, canonical_json
from pipeline.tables import (
    INDEX_LINEAGE,
    INDEX_PATCHES,
    INDEX_RETIRED,
    read_geodataframe_checked,
    read_table_checked,
)
from pipeline.write_plan import PatchRef, ShardJob, plan_jobs
from pipeline.zarr_chunks import (
    ChunkCodec,
    CorruptShard,
    assemble_shard,
    reflectance_codec,
    shard_chunks,
)

STAGE = "write"
SHARDS_TABLE = tables.SHARDS
SHARD_RECORDS = tables.SHARD_RECORDS
SHARD_SUMS = "write/sums"  # per shard: the CellSums of its active rows (JSON), named by its record


def shard_key(array: str, shard: int, ndim: int) -> str:
    """Store key of a shard (default chunk key encoding: `c/<i>/0/0...`)."""
    return tables.shard_object(array, shard, ndim)


@dataclass(frozen=True, slots=True)
class ShardCodecs:
    """The inner-chunk codecs of the two sharded arrays, and their inner chunks per shard."""

    reflectance: ChunkCodec
    quality: ChunkCodec
    per_shard: int
    bands: int  # the band axis' length (the reflectance chunk is at least 1 band wide)


@dataclass(frozen=True, slots=True)
class MissingCut:
    """A shard task's answer when a row's encoded chunks are absent or damaged: the scenes that must
    be read again (nothing of the shard was written)."""

    shard: int
    scenes: tuple[str, ...]
    reason: str


# Chunks of one scene's .bin closer than this are fetched in one ranged read (fewer requests).
MERGE_GAP_BYTES = 1024 * 1024


def _read_spans(store: BuildStore, path: str, spans: list[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
    """The bytes of each (offset, length) of one object, in a few ranged reads (nearby spans merged)."""
    out: dict[tuple[int, int], bytes] = {}
    ordered = sorted(set(spans))
    groups: list[list[tuple[int, int]]] = []
    for span in ordered:
        if groups and span[0] - (groups[-1][-1][0] + groups[-1][-1][1]) <= MERGE_GAP_BYTES:
            groups[-1].append(span)
        else:
            groups.append([span])
    for group in groups:
        first = group[0][0]
        last = max(offset + length for offset, length in group)
        data = store.fs.cat_file(store.path(path), start=first, end=last)
        if len(data) != last - first:
            raise FileNotFoundError(f"{path} is shorter than its index says")
        for offset, length in group:
            out[(offset, length)] = bytes(data[offset - first : offset - first + length])
    return out


def _chunks_from_cut(
    store: BuildStore, refs: list[PatchRef], scene_keys: dict[str, str], codecs: ShardCodecs
) -> tuple[dict[int, tuple[bytes, bytes, CellSums]], dict[str, str]]:
    """The encoded chunks and sums of these rows from their scenes' cuts: (by row, missing scenes
    with the reason). A chunk whose bytes do not match its recorded checksum counts as missing."""
    found: dict[int, tuple[bytes, bytes, CellSums]] = {}
    missing: dict[str, str] = {}
    by_scene: dict[str, list[PatchRef]] = {}
    for ref in refs:
        by_scene.setdefault(ref.scene_id, []).append(ref)
    for scene_id, scene_refs in by_scene.items():
        key = scene_keys.get(scene_id)
        index = read_cut_index(store, scene_id, key) if key else None
        if index is None:
            missing[scene_id] = "no encoded chunks"
            continue
        if (index.reflectance_codec, index.quality_codec) != (codecs.reflectance.key(), codecs.quality.key()):
            missing[scene_id] = "encoded with other codec settings"
            continue
        cells = [index.cells.get(ref.location_id) for ref in scene_refs]
        if any(cell is None for cell in cells):
            missing[scene_id] = "a needed cell was not encoded"
            continue
        spans = [span for cell in cells if cell is not None for span in (cell.reflectance, cell.quality)]
        try:
            data = _read_spans(store, cut_bin_path(scene_id, index.key), spans)
        except FileNotFoundError:
            missing[scene_id] = "its encoded chunks are gone"
            continue
        for ref, cell in zip(scene_refs, cells, strict=True):
            assert cell is not None
            reflectance, quality = data[cell.reflectance], data[cell.quality]
            if (chunk_sha(reflectance), chunk_sha(quality)) != cell.sha:
                missing[scene_id] = "an encoded chunk fails its checksum"
                break
            found[ref.row] = (reflectance, quality, cell.sums)
    return found, missing


def _stored_chunks(store: BuildStore, job: ShardJob, codecs: ShardCodecs) -> tuple[list, list] | None:
    """The chunks of the shard as stored (for the rows it copies), or None when an object is missing or
    damaged (its rows are then taken from the cut)."""
    try:
        return (
            shard_chunks(
                codecs.reflectance, store.read_bytes(shard_key("reflectance", job.shard, 4)), codecs.per_shard
            ),
            shard_chunks(
                codecs.quality, store.read_bytes(shard_key("quality", job.shard, 3)), codecs.per_shard
            ),
        )
    except (FileNotFoundError, CorruptShard) as exc:
        print(f"write: shard {job.shard} as stored is unusable ({one_line(exc)}); its rows come from the cut")
        return None


def write_shard_task(
    pair: tuple[ShardJob, dict[str, str]],
    build_uri: str,
    codecs: ShardCodecs,
    layout: str,
    storage_options: dict | None = None,
) -> dict[str, Any] | MissingCut:
    """Write one whole shard of both arrays from encoded chunks, then its record (`write/shards/
    <shard>.json`: content keys, checksums, per-row sums, moments): rows from the cut (`job.source`)
    and rows copied from the stored shard (`job.copy`), by byte copy. `pair` carries the cut key of
    every scene the shard's rows come from. A shard without a valid record is rewritten on resume."""
    job, scene_keys = pair
    store = BuildStore(build_uri, storage_options or {})
    count = job.stop - job.start
    reflectance: list[bytes | None] = [None] * count
    quality: list[bytes | None] = [None] * count
    sums: dict[int, CellSums] = {}
    from_cut = list(job.source)
    stored = _stored_chunks(store, job, codecs) if job.copy else None
    recorded = _recorded_sums(store, job) if job.sums_sha256 else {}
    active = set(job.active)
    for ref in job.copy:
        slot = ref.row - job.start
        if stored is None or stored[0][slot] is None or stored[1][slot] is None:
            from_cut.append(ref)
            continue
        if ref.row in active:
            if ref.row not in recorded:
                from_cut.append(ref)  # its statistics are not on record: its cell has them
                continue
            sums[ref.row] = recorded[ref.row]
        reflectance[slot], quality[slot] = stored[0][slot], stored[1][slot]
    found, missing = _chunks_from_cut(store, from_cut, scene_keys, codecs)
    if missing:
        scenes = tuple(sorted(missing))
        return MissingCut(job.shard, scenes, f"{scenes[0]}: {missing[scenes[0]]}")
    for row, (chunk, bits, cell_sums) in found.items():
        reflectance[row - job.start], quality[row - job.start] = chunk, bits
        sums[row] = cell_sums
    if any(row not in sums for row in job.active):
        raise ValueError(f"shard {job.shard}: an active row has no recorded sums")
    objects = {
        "reflectance": assemble_shard(codecs.reflectance, reflectance, codecs.per_shard),
        "quality": assemble_shard(codecs.quality, quality, codecs.per_shard),
    }
    if store.exists(shard_record_path(job.shard)):
        # The old record goes first: killed between here and the new record, the shard is unrecorded
        # (rewritten on resume), never vouched for by a record of other content of the same size.
        store.fs.rm(store.path(shard_record_path(job.shard)))
    for array, ndim in (("reflectance", 4), ("quality", 3)):
        data = objects[array]
        if data is None:  # every row is stored, so a shard always has chunks
            raise ValueError(f"shard {job.shard} of {array} assembled empty")
        store.write_bytes(shard_key(array, job.shard, ndim), data)
    moments = shard_moments([sums[row] for row in job.active], codecs.bands)
    # The per-row sums go beside the record (read only when the shard is partly rewritten), named in
    # it by checksum, so a record never vouches for another write's sums.
    row_sums = json.dumps({str(row): sums[row].to_json() for row in job.active}, sort_keys=True).encode()
    store.write_bytes(shard_sums_path(job.shard), row_sums)
    record = {
        "shard": job.shard,
        "first_row": job.start,
        "stop_row": job.stop,
        "layout_key": layout,
        "row_keys": list(job.row_keys),
        "active_rows": list(job.active),
        "reflectance_sha256": hashlib.sha256(objects["reflectance"] or b"").hexdigest(),
        "reflectance_bytes": len(objects["reflectance"] or b""),
        "quality_sha256": hashlib.sha256(objects["quality"] or b"").hexdigest(),
        "quality_bytes": len(objects["quality"] or b""),
        "scenes": sorted({p.scene_id for p in job.source}),
        "sums_sha256": hashlib.sha256(row_sums).hexdigest(),
        "moments": moments.to_json(),
    }
    store.write_json(shard_record_path(job.shard), record)
    return record


def shard_record_path(shard: int) -> str:
    return tables.shard_record(shard)


def shard_sums_path(shard: int) -> str:
    return f"{SHARD_SUMS}/{shard:06d}.json"


def _recorded_sums(store: BuildStore, job: ShardJob) -> dict[int, CellSums]:
    """The per-row sums of the shard's previous write, when they are the ones its record names (else
    none: the copied rows' sums then come from their cells in cut/)."""
    try:
        data = store.read_bytes(shard_sums_path(job.shard))
        if hashlib.sha256(data).hexdigest() != job.sums_sha256:
            raise ValueError("not the sums its record names")
        return {int(row): CellSums.from_json(value) for row, value in json.loads(data).items()}
    except (FileNotFoundError, ValueError, KeyError, TypeError, AttributeError) as exc:
        print(f"write: shard {job.shard}'s recorded sums are unusable ({one_line(exc)}); using cut/")
        return {}


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
        "sums_sha256",
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


@dataclass(frozen=True, slots=True)
class Template:
    """The dataset's rows and band axis, with its arrays made (or kept) for them."""

    rows: Any  # every row (pandas): index patches (active) and retired rows, by row
    records: dict[str, SceneRecord]  # every inventoried scene, by id
    bands: list[tuple[int, float, float]]
    layout: str
    arrays_kept: bool  # the stored arrays had this layout (their shards may be reused)


@dataclass(frozen=True, slots=True)
class ShardPlan:
    """The shards to write (one task each, with the cut key of every scene its rows come from) and the
    stored shards reused as they are."""

    jobs: list[ShardJob]
    pairs: list[tuple[ShardJob, dict[str, str]]]
    reusable: dict[int, dict[str, Any]]
    codecs: ShardCodecs


def _input_fingerprint(store: BuildStore) -> tuple[str, dict[str, str]]:
    """The write's input fingerprint (index, retired rows, masks) and each scene's mask checksum."""
    digest = hashlib.sha256(store.read_bytes(INDEX_PATCHES))
    digest.update(store.read_bytes(INDEX_RETIRED))
    # The masks are part of every row's content: a scene masked again (other quality bits) must be
    # written again even when its patch ids, scene and product are unchanged.
    mask_sha = {
        s.scene_id: s.mask_sha256 for s in summaries_from_table(read_table_checked(store, MASKS_TABLE))
    }
    digest.update(canonical_json(sorted(mask_sha.items())).encode())
    return digest.hexdigest()[:16], mask_sha


def _prepare_template(manifest: Manifest, store: BuildStore, force: bool) -> Template:
    """Read the rows and the band axis, make (or keep and grow) the arrays, write the 1-D arrays."""
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
    return Template(rows, records, bands, layout, arrays_kept)


def _plan_shards(
    manifest: Manifest,
    store: BuildStore,
    template: Template,
    shard_records: dict[int, dict[str, Any]],
    mask_sha: dict[str, str],
    verify: bool,
) -> ShardPlan:
    """Which shards to write and which to reuse; fails before any task when the cut cannot serve."""
    records, bands = template.records, template.bands
    valid = check_shards(store, shard_records, checksums=verify) if template.arrays_kept else set()
    fingerprints = {sid: f"{r.fingerprint}|{mask_sha.get(sid, '')}" for sid, r in records.items()}
    per_shard = manifest.write.patches_per_shard
    jobs, reusable = plan_jobs(
        template.rows, per_shard, fingerprints, shard_records, template.layout, template.arrays_kept, valid
    )
    codecs = array_codecs(store, len(bands), per_shard)
    if codecs.reflectance.key() != reflectance_codec(manifest, len(bands)).key():
        # The arrays were kept, so their codec is the manifest's: a mismatch is a bug, never patched over.
        raise ValueError("dataset.zarr's codec differs from the manifest's write.codec")
    for sid in sorted({p.scene_id for job in jobs for p in job.source}):
        if sid in records and len(manifest.bands.kept_bands(records[sid].wavelengths_nm)) != len(bands):
            # Its cut holds chunks of another shape: re-reading it would not help.
            raise BuildFault(
                f"write: {sid} keeps another number of bands than the dataset's {len(bands)}: the scenes "
                f"of one build must share the band axis (check bands in the manifest)"
            )
    keys = {sid: scene_key(r, manifest) for sid, r in records.items()}
    pairs = [(job, {sid: keys[sid] for sid in job.scenes if sid in keys}) for job in jobs]
    return ShardPlan(jobs, pairs, reusable, codecs)


def _run_shard_tasks(
    plan: ShardPlan, store: BuildStore, scheduler: Any, layout: str, storage_options: dict | None
) -> list[Any]:
    """Every planned shard written by its own task: records, MissingCut answers (a failed task fails)."""
    # Each shard task rides out transient faults of the store with the engine's backoff.
    task = functools.partial(with_retries, write_shard_task, scheduler.retry)
    results = scheduler.map(task, plan.pairs, store.uri, plan.codecs, layout, storage_options, label="write")
    failed = [r for r in results if isinstance(r, TaskError)]
    if failed:
        raise StageFailed(f"write: {len(failed)} shard task(s) failed: {failed[0].label}: {failed[0].reason}")
    return list(results)


def _fail_on_missing_cuts(
    store: BuildStore, manifest: Manifest, records: dict[str, SceneRecord], results: list[Any]
) -> None:
    """Shards that needed absent or damaged chunks: their scenes' mask checkpoints are forgotten (so
    the mask stage reads them again) and the stage fails with one line."""
    missing = [r for r in results if isinstance(r, MissingCut)]
    if not missing:
        return
    scenes = sorted({sid for m in missing for sid in m.scenes})
    gone = [sid for sid in scenes if sid not in records]
    forget_scenes(store, manifest, [records[sid] for sid in scenes if sid in records])
    if gone:
        # Only a retired row of a product no longer inventoried can get here (its stored shard is
        # damaged): nothing can read it again, and no fill patch is written in its place.
        more = f" (and {len(gone) - 1} more)" if len(gone) > 1 else ""
        raise BuildFault(
            f"write: {gone[0]}{more} is no longer inventoried and its stored rows are damaged: "
            f"restore its product to the inputs and rerun, or rebuild the index"
        )
    raise BuildFault(
        f"write: {len(missing)} shard(s) need encoded chunks that are absent or damaged "
        f"({missing[0].reason}); the other shards are written: "
        f"rerun mask (or run) to re-read {len(scenes)} scene(s)"
    )


def _remove_stale_records(
    store: BuildStore, shard_records: dict[int, dict[str, Any]], shard_count: int
) -> None:
    """Records (and sums) of shards past the end of the arrays: left by a longer earlier write."""
    for stale in [s for s in shard_records if s >= shard_count]:
        store.fs.rm(store.path(shard_record_path(stale)))
        if store.exists(shard_sums_path(stale)):
            store.fs.rm(store.path(shard_sums_path(stale)))


def _finish(
    manifest: Manifest,
    store: BuildStore,
    template: Template,
    plan: ShardPlan,
    shard_records: dict[int, dict[str, Any]],
    results: list[Any],
) -> dict[str, int]:
    """The shard table, statistics and consolidated metadata; the cut removed unless kept. The counts."""
    rows, bands, jobs = template.rows, template.bands, plan.jobs
    per_shard = manifest.write.patches_per_shard
    shard_count = (len(rows) + per_shard - 1) // per_shard
    _remove_stale_records(store, shard_records, shard_count)
    final = {**plan.reusable, **{r["shard"]: r for r in results if isinstance(r, dict)}}
    ordered = [final[s] for s in range(shard_count)]
    store.write_table(SHARDS_TABLE, shards_table(ordered))
    write_statistics(store, [BandMoments.from_json(r["moments"]) for r in ordered], bands)
    consolidate(store)
    if not manifest.write.keep_cut:
        # Every shard is written: the encoded candidates are no longer needed (a later write that
        # needs one has its scene read again).
        remove_cut(store)
    return {
        "patches": len(rows[rows["active"]]),
        "rows": len(rows),
        "bands": len(bands),
        "shards": shard_count,
        "shards_written": len(jobs),
        "rows_from_cut": sum(len(j.source) for j in jobs),
        "rows_copied": sum(len(j.copy) for j in jobs),
        "active_rows_copied": sum(len({p.row for p in j.copy} & set(j.active)) for j in jobs),
        "dataset_bytes": _dataset_bytes(store),
    }


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
    `verify`); every other shard is written whole by exactly one task, from encoded chunks.
    """
    watch = Stopwatch()
    input_fingerprint, mask_sha = _input_fingerprint(store)
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
    template = _prepare_template(manifest, store, force)
    watch.lap("template")
    plan = _plan_shards(manifest, store, template, shard_records, mask_sha, verify)
    results = _run_shard_tasks(plan, store, scheduler, template.layout, storage_options)
    watch.lap("write")
    _fail_on_missing_cuts(store, manifest, template.records, results)
    counts = _finish(manifest, store, template, plan, shard_records, results)
    watch.lap("finish")
    store.write_stage_record(StageRecord(STAGE, config_hash, input_fingerprint, counts, watch.timings))
    return StageResult(counts, skipped=False)


def array_codecs(store: BuildStore, bands: int, per_shard: int) -> ShardCodecs:
    """The inner-chunk codecs of the arrays as created, read from their `zarr.json`."""
    metadata = {name: store.read_json(f"{DATASET}/{name}/zarr.json") for name in ("reflectance", "quality")}
    reflectance = ChunkCodec.from_array_metadata(metadata["reflectance"])
    quality = ChunkCodec.from_array_metadata(metadata["quality"])
    return ShardCodecs(reflectance, quality, per_shard, bands)


def remove_cut(store: BuildStore) -> None:
    if store.exists(CUT):
        store.fs.rm(store.path(CUT), recursive=True)


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
