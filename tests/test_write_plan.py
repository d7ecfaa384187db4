"""Planning of the write stage (pure): every shard written whole by one job, each row's chunks taken
from the cut exactly when its stored bytes cannot be reused, every other row copied from its shard."""

from typing import Any

import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.write_plan import PatchRef, ShardJob, plan_jobs, row_key

LAYOUT = "layout"


@st.composite
def index_rows(draw: st.DrawFn) -> pd.DataFrame:
    """Index rows 0..N-1 in dedup's order (by scene), some retired (inactive)."""
    rows = []
    for scene in range(draw(st.integers(1, 5))):
        for cell in range(draw(st.integers(1, 6))):
            rows.append(
                {
                    "patch_id": f"EPSG32632-{cell:04d}-0001_2023010{scene}_DT{scene:010d}",
                    "scene_id": f"S{scene}",
                    "location_id": f"EPSG32632-{cell:04d}-0001",
                    "active": draw(st.booleans()) or draw(st.booleans()),
                }
            )
    frame = pd.DataFrame(rows)
    frame["row"] = range(len(frame))
    return frame


def records_for(
    frame: pd.DataFrame, per_shard: int, fingerprints: dict[str, str]
) -> dict[int, dict[str, Any]]:
    """The shard records a previous write of these rows left (naming its per-row sums)."""
    records: dict[int, dict[str, Any]] = {}
    for shard, start in enumerate(range(0, len(frame), per_shard)):
        part = frame.iloc[start : start + per_shard]
        keys = [
            row_key(r.patch_id, r.scene_id, fingerprints[r.scene_id])
            if r.active
            else f"retired:{r.patch_id}|{r.scene_id}"
            for r in part.itertuples()
        ]
        active = [int(r.row) for r in part.itertuples() if r.active]
        records[shard] = {
            "shard": shard,
            "first_row": start,
            "stop_row": start + len(part),
            "layout_key": LAYOUT,
            "row_keys": keys,
            "active_rows": active,
            "sums_sha256": f"sums-of-shard-{shard}",
        }
    return records


def check_partition(
    frame: pd.DataFrame, per_shard: int, jobs: list[ShardJob], reused: dict[int, dict[str, Any]]
) -> None:
    """Every shard is either reused or written by exactly one job that covers each of its rows once."""
    shards = (len(frame) + per_shard - 1) // per_shard
    assert sorted([j.shard for j in jobs] + list(reused)) == list(range(shards))
    for job in jobs:
        assert (job.start, job.stop) == (job.shard * per_shard, min(len(frame), (job.shard + 1) * per_shard))
        rows = sorted([p.row for p in job.source] + [p.row for p in job.copy])
        assert rows == list(range(job.start, job.stop))
        assert len(job.row_keys) == job.stop - job.start
        part = frame.iloc[job.start : job.stop]
        assert list(job.active) == [int(r.row) for r in part.itertuples() if r.active]
        for ref in (*job.source, *job.copy):
            assert (ref.scene_id, ref.location_id) == tuple(frame.iloc[ref.row][["scene_id", "location_id"]])
        assert set(job.scenes) == {p.scene_id for p in (*job.source, *job.copy)}


@settings(max_examples=200, deadline=None)
@given(index_rows(), st.integers(2, 5))
def test_a_fresh_write_takes_every_active_row_from_the_cut(frame: pd.DataFrame, per_shard: int) -> None:
    fingerprints = {s: f"fp-{s}" for s in frame["scene_id"]}
    jobs, reused = plan_jobs(frame, per_shard, fingerprints, {}, LAYOUT, False, set())
    check_partition(frame, per_shard, jobs, reused)
    assert reused == {}
    active = {int(r.row) for r in frame.itertuples() if r.active}
    assert {p.row for j in jobs for p in j.source} == active
    # Retired rows keep what they hold: copied, never re-read.
    assert {p.row for j in jobs for p in j.copy} == set(range(len(frame))) - active
    assert all(j.sums_sha256 == "" for j in jobs), "no recorded sums to copy from"


@settings(max_examples=200, deadline=None)
@given(index_rows(), st.integers(2, 5), st.data())
def test_only_changed_rows_come_from_the_cut(
    frame: pd.DataFrame, per_shard: int, data: st.DataObject
) -> None:
    fingerprints = {s: f"fp-{s}" for s in frame["scene_id"]}
    records = records_for(frame, per_shard, fingerprints)
    shards = set(records)
    valid = data.draw(st.sets(st.sampled_from(sorted(shards))))
    changed = data.draw(st.sets(st.sampled_from(sorted(set(frame["scene_id"])))))
    now = {s: (f"fp-{s}-new" if s in changed else fp) for s, fp in fingerprints.items()}
    jobs, reused = plan_jobs(frame, per_shard, now, records, LAYOUT, True, valid)
    check_partition(frame, per_shard, jobs, reused)
    for shard in reused:
        part = frame.iloc[shard * per_shard : (shard + 1) * per_shard]
        assert shard in valid and not (set(part[part["active"]]["scene_id"]) & changed)
        assert reused[shard] is records[shard]
    for job in jobs:
        for ref in job.source:
            # From the cut exactly when its key changed or its stored shard failed its check.
            assert frame.iloc[ref.row]["active"]
            assert ref.scene_id in changed or job.shard not in valid
        copied_active = [p for p in job.copy if frame.iloc[p.row]["active"]]
        for ref in copied_active:
            assert ref.scene_id not in changed and job.shard in valid
        # The statistics of copied active rows come from the sums the previous write recorded.
        assert job.sums_sha256 == (records[job.shard]["sums_sha256"] if copied_active else "")


def test_a_partly_changed_shard_copies_its_unchanged_rows_and_names_their_sums() -> None:
    frame = pd.DataFrame(
        {
            "patch_id": ["a", "b", "c"],
            "scene_id": ["S", "S", "T"],
            "location_id": ["L1", "L2", "L1"],
            "active": [True, False, True],
            "row": [0, 1, 2],
        }
    )
    fingerprints = {"S": "1", "T": "2"}
    records = records_for(frame, 4, fingerprints)
    # Scene T changed: the shard is rewritten; row 0 is unchanged, row 1 retired.
    jobs, reused = plan_jobs(frame, 4, {"S": "1", "T": "3"}, records, LAYOUT, True, {0})
    assert reused == {}
    (job,) = jobs
    assert job == ShardJob(
        0,
        0,
        3,
        (PatchRef(2, "T", "L1"),),
        (PatchRef(0, "S", "L1"), PatchRef(1, "S", "L2")),
        (0, 2),
        (*records[0]["row_keys"][:2], row_key("c", "T", "3")),
        "sums-of-shard-0",
    )
    # A stored shard that failed its check keeps only its retired row, whose bytes nothing else holds.
    (job,) = plan_jobs(frame, 4, {"S": "1", "T": "3"}, records, LAYOUT, True, set())[0]
    assert [p.row for p in job.source] == [0, 2] and [p.row for p in job.copy] == [1]
    assert job.sums_sha256 == ""
    # Another layout (other codec or shard size) keeps nothing as stored.
    jobs, reused = plan_jobs(frame, 4, fingerprints, records_for(frame, 4, fingerprints), "other", True, {0})
    assert (
        reused == {}
        and [p.row for p in jobs[0].source] == [0, 2]
        and jobs[0].copy == (PatchRef(1, "S", "L2"),)
    )


def test_a_failed_shard_task_is_named_by_its_shard() -> None:
    """Messages about a write task name its shard (the payload is (ShardJob, cut keys)); a ShardJob has
    `scenes`, which an older label of read tasks mistook for a read task and crashed on."""
    from pipeline.engine import DEFAULT_RETRY, TaskError, describe, with_retries
    from pipeline.write_plan import PatchRef, ShardJob

    job = ShardJob(3, 6, 8, (PatchRef(6, "S1", "EPSG32632-0001-0002"),), (), (6,), ("k",))
    assert describe((job, {"S1": "key"})) == "shard 3"

    def fails(payload: object, *args: object) -> None:
        raise ValueError("bad bytes")

    failed = with_retries(fails, DEFAULT_RETRY, (job, {}))
    assert failed == TaskError("shard 3", "ValueError: bad bytes")
