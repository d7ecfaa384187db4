"""Planning of the `write` stage (pure): which shards to write, and which task reads what.

Two constraints shape the plan. Concurrent partial writes to one Zarr shard lose data (zarr-python
#3514, #3682), so every shard is written whole by exactly one task. And a source scene is expensive
to open: a deflated ZIP member is unpacked in full before any pixel of it can be read. So every scene
is read by exactly one *read task*, each of its (scene, grid row) units once, over just the columns
its patches span.

Rows are ordered by scene (dedup), so a shard often holds patches of two scenes. Scenes are split into
runs of consecutive scenes of about equal cost, one read task per run. A read task writes the shards
whose source patches all come from its own scenes, and *stages* its part of every other shard it
touches (`write/staging/`); a *stitch task* per such shard then assembles the staged parts (plus any
stored rows it keeps) and writes the shard. So no scene is read twice, no pixel is decoded twice, and
tasks can run in parallel however the rows fall on shards.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rasterio.windows import Window

from pipeline import tables

STAGING = tables.WRITE_STAGING
# Cost of opening a scene that must be unpacked (a deflated ZIP member), in patches written: measured
# in `make bench` on 1250 x 1250 x 224 products, unpacking takes ~3.5 s and writing one patch (read of
# its strip + encode) ~0.08 s.
UNPACK_COST_PATCHES = 40


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
class ReadTask:
    """Read a run of scenes once; write the shards only they fill, stage their part of the others."""

    number: int
    scenes: tuple[str, ...]
    jobs: tuple[ShardJob, ...]  # every shard with a source patch in `scenes`, in shard order
    owned: tuple[int, ...]  # the shards of `jobs` this task writes whole

    @property
    def patches(self) -> tuple[PatchRef, ...]:
        scenes = set(self.scenes)
        return tuple(p for job in self.jobs for p in job.source if p.scene_id in scenes)

    def staged(self) -> tuple[ShardJob, ...]:
        owned = set(self.owned)
        return tuple(job for job in self.jobs if job.shard not in owned)


@dataclass(frozen=True, slots=True)
class StitchTask:
    """Write one shard from the parts staged by read tasks (and its kept stored rows)."""

    job: ShardJob
    parts: tuple[int, ...]  # numbers of the read tasks that staged part of it


@dataclass(frozen=True, slots=True)
class WritePlan:
    reads: tuple[ReadTask, ...]
    stitches: tuple[StitchTask, ...]


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


def staging_path(shard: int, read_task: int) -> str:
    return tables.staging_part(shard, read_task)


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


def scene_costs(jobs: Sequence[ShardJob], unpacked: Mapping[str, bool]) -> dict[str, int]:
    """Estimated work per scene, in patches written: its source patches, plus the unpacking of a scene
    that must be unpacked before it can be read (`unpacked[scene]`)."""
    costs: dict[str, int] = {}
    for job in jobs:
        for p in job.source:
            costs[p.scene_id] = costs.get(p.scene_id, 0) + 1
    return {s: n + (UNPACK_COST_PATCHES if unpacked.get(s, False) else 0) for s, n in costs.items()}


def partition_runs(costs: Sequence[int], groups: int) -> list[int]:
    """Cut a sequence of costs into at most `groups` runs of consecutive items, minimising the
    largest run's total; returns the run sizes (their sum is len(costs))."""
    if not costs:
        return []
    if groups < 1:
        raise ValueError("groups must be >= 1")

    def runs_under(cap: int) -> list[int]:
        sizes, total = [0], 0
        for cost in costs:
            if sizes[-1] and total + cost > cap:
                sizes.append(0)
                total = 0
            sizes[-1] += 1
            total += cost
        return sizes

    low, high = max(costs), sum(costs)
    while low < high:
        middle = (low + high) // 2
        if len(runs_under(middle)) <= groups:
            high = middle
        else:
            low = middle + 1
    return runs_under(low)


def plan_tasks(
    jobs: Sequence[ShardJob],
    unpacked: Mapping[str, bool],
    patches_per_task: int,
    parallelism: int = 1,
) -> WritePlan:
    """Read and stitch tasks for the shard jobs (pure).

    Scenes are taken in the order of their first row and cut into runs of consecutive scenes: as many
    runs as the work needs at about `patches_per_task` patches each, and at least two per worker
    (`parallelism`) so that a small build keeps every worker busy; runs are balanced by estimated cost.
    """
    if patches_per_task < 1:
        raise ValueError("patches_per_task must be >= 1")
    ordered = sorted(jobs, key=lambda j: j.shard)
    first_row: dict[str, int] = {}
    for job in ordered:
        for p in job.source:
            first_row.setdefault(p.scene_id, p.row)
    scenes = sorted(first_row, key=lambda s: (first_row[s], s))
    costs = scene_costs(ordered, unpacked)
    total = sum(costs.values())
    wanted = max(math.ceil(total / patches_per_task), 2 * max(parallelism, 1))
    sizes = partition_runs([costs[s] for s in scenes], min(wanted, len(scenes)) or 1)
    run_of: dict[str, int] = {}
    position = 0
    for number, size in enumerate(sizes):
        for scene in scenes[position : position + size]:
            run_of[scene] = number
        position += size
    touching: dict[int, list[ShardJob]] = {n: [] for n in range(len(sizes))}
    owners: dict[int, int] = {}
    stitches = []
    for job in ordered:
        runs = sorted({run_of[p.scene_id] for p in job.source})
        for number in runs:
            touching[number].append(job)
        if len(runs) == 1:
            owners[job.shard] = runs[0]
        else:  # parts of several runs, or no source row at all (only stored rows kept)
            stitches.append(StitchTask(job, tuple(runs)))
    reads = []
    position = 0
    for number, size in enumerate(sizes):
        run_scenes = tuple(scenes[position : position + size])
        position += size
        run_jobs = tuple(touching[number])
        owned = tuple(j.shard for j in run_jobs if owners.get(j.shard) == number)
        reads.append(ReadTask(number, run_scenes, run_jobs, owned))
    return WritePlan(tuple(reads), tuple(stitches))
