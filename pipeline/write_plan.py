"""Planning of the `write` stage (pure): which shards to write, and where each row's chunks come from.

`write` opens no product: the reading pass (`pipeline.mask`) encoded every kept candidate into the
bytes of one inner chunk per array (`cut/`), and a shard is assembled from its rows' chunks by byte
copy. Concurrent partial writes to one Zarr shard lose data (zarr-python #3514, #3682), so every shard
is written whole by exactly one task (one `ShardJob`). A row's chunks come either from its scene's cut
(`source`: an active row that is new or changed) or from the shard object already stored (`copy`: an
unchanged active row, or a retired row, which keeps what it holds).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class PatchRef:
    """What a write task needs of one row: where its encoded chunks are (scene and cell)."""

    row: int
    scene_id: str
    location_id: str


@dataclass(frozen=True, slots=True)
class ShardJob:
    """One shard to (re)write: which rows come from the cut and which are copied as stored."""

    shard: int
    start: int
    stop: int
    source: tuple[PatchRef, ...]  # rows whose chunks are taken from their scene's cut
    # Rows whose stored chunks are copied from the existing shard (unchanged active rows, retired rows);
    # a damaged stored shard has them taken from the cut too.
    copy: tuple[PatchRef, ...]
    active: tuple[int, ...]  # rows listed in the index (statistics cover these)
    row_keys: tuple[str, ...]  # content key of every row start..stop-1
    # The SHA-256 of the per-row sums the shard's previous write recorded (`write/sums/`), which the
    # copied active rows' statistics come from; "" when no active row is copied.
    sums_sha256: str = ""

    @property
    def scenes(self) -> tuple[str, ...]:
        """Every scene a row of this shard comes from (the cuts the task may need)."""
        return tuple(sorted({p.scene_id for p in (*self.source, *self.copy)}))


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
    rewritten whole by one task: active rows whose key changed (or whose shard failed its check) take
    their chunks from the cut, all other rows are copied from the existing shard.
    """
    jobs, reusable = [], {}
    n = len(rows)
    for shard, start in enumerate(range(0, n, per_shard)):
        stop = min(start + per_shard, n)
        part = rows.iloc[start:stop]
        keys, sources, copies, active = [], [], [], []
        copied_active = False
        old = records_by_shard.get(shard) if arrays_kept else None
        if old is not None and old["layout_key"] != layout:
            old = None  # written for another layout: nothing of it is reused
        old_keys = (
            dict(zip(range(old["first_row"], old["stop_row"]), old["row_keys"], strict=True)) if old else {}
        )
        for r in part.itertuples(index=False):
            row = int(r.row)
            ref = PatchRef(row, str(r.scene_id), str(r.location_id))
            if r.active:
                key = row_key(r.patch_id, r.scene_id, fingerprints.get(r.scene_id, ""))
                active.append(row)
                if old_keys.get(row) == key and shard in valid_shards:
                    copies.append(ref)
                    copied_active = True
                else:
                    sources.append(ref)
            else:
                # A retired row keeps what it holds; its key carries over from the shard's record.
                key = old_keys.get(row, f"retired:{r.patch_id}|{r.scene_id}")
                copies.append(ref)
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
                ShardJob(
                    shard,
                    start,
                    stop,
                    tuple(sources),
                    tuple(copies),
                    tuple(active),
                    tuple(keys),
                    str(old["sums_sha256"]) if old is not None and copied_active else "",
                )
            )
    return jobs, reusable
