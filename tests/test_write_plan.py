"""Planning of the write stage (pure): every scene read by one task, every shard written by one task."""

import itertools
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.write_plan import (
    UNPACK_COST_PATCHES,
    PatchRef,
    ShardJob,
    partition_runs,
    plan_tasks,
    unit_windows,
)


def read_units(patches):
    """The (scene, grid row) strips the patches are read from."""
    return {(p.scene_id, p.row_off) for p in patches}


@st.composite
def index_rows(draw):
    """Patches in dedup's row order: by scene, then grid row, then column, on a 128 px lattice."""
    refs = []
    for scene in range(draw(st.integers(1, 6))):
        for grid_row in range(draw(st.integers(1, 4))):
            columns = sorted(draw(st.sets(st.integers(0, 8), min_size=1, max_size=6)))
            refs += [(f"S{scene}", 17 + 128 * grid_row, 5 + 128 * c) for c in columns]
    return [PatchRef(row, scene, r, c) for row, (scene, r, c) in enumerate(refs)]


def fresh_jobs(refs, per_shard):
    """Shard jobs of a build written from scratch: every row read from its source."""
    jobs = []
    for shard, start in enumerate(range(0, len(refs), per_shard)):
        rows = refs[start : start + per_shard]
        active = tuple(p.row for p in rows)
        jobs.append(ShardJob(shard, start, start + len(rows), tuple(rows), (), active, ()))
    return jobs


@settings(max_examples=300, deadline=None)
@given(
    index_rows(),
    st.integers(2, 6),
    st.integers(1, 80),
    st.integers(1, 4),
    st.sets(st.integers(0, 5)),
)
def test_every_scene_read_once_every_shard_written_once(refs, per_shard, per_task, workers, zipped):
    jobs = fresh_jobs(refs, per_shard)
    unpacked = {f"S{k}": True for k in zipped}
    plan = plan_tasks(jobs, unpacked, per_task, workers)
    scenes = list(dict.fromkeys(p.scene_id for p in refs))
    # Every scene in exactly one read task, runs of consecutive scenes in row order.
    assert [s for task in plan.reads for s in task.scenes] == scenes
    assert [task.number for task in plan.reads] == list(range(len(plan.reads)))
    total = len(refs) + UNPACK_COST_PATCHES * sum(1 for s in scenes if unpacked.get(s))
    assert len(plan.reads) <= min(len(scenes), max(math.ceil(total / per_task), 2 * workers))
    # Every shard written exactly once: owned by one read task whose scenes hold all its patches,
    # or stitched from the parts of exactly the read tasks whose scenes it holds.
    run_of = {s: task.number for task in plan.reads for s in task.scenes}
    writers = [s for task in plan.reads for s in task.owned] + [t.job.shard for t in plan.stitches]
    assert sorted(writers) == [job.shard for job in jobs]
    for task in plan.reads:
        assert [j.shard for j in task.jobs] == [
            j.shard for j in jobs if any(p.scene_id in task.scenes for p in j.source)
        ]
        for shard in task.owned:
            assert {run_of[p.scene_id] for p in jobs[shard].source} == {task.number}
        staged = {j.shard for j in task.staged()}
        assert staged == {t.job.shard for t in plan.stitches if task.number in t.parts}
    for stitch in plan.stitches:
        assert stitch.parts == tuple(sorted({run_of[p.scene_id] for p in stitch.job.source}))
        assert len(stitch.parts) >= 2
    # Each unit is read by one task only, so no two reads anywhere share a pixel.
    units = [u for task in plan.reads for u in read_units(task.patches)]
    assert len(units) == len(set(units)) == len(read_units(refs))
    assert sorted((p for task in plan.reads for p in task.patches), key=lambda p: p.row) == refs
    for task in plan.reads:
        windows = unit_windows(task.patches, 128)
        for p in task.patches:
            window = windows[(p.scene_id, p.row_off)]
            assert window.col_off <= p.col_off and p.col_off + 128 <= window.col_off + window.width


def brute_force_runs(costs, groups):
    """The smallest possible largest run over every cut of costs into at most `groups` runs."""
    n, best = len(costs), sum(costs)
    for k in range(1, min(groups, n) + 1):
        for cuts in itertools.combinations(range(1, n), k - 1):
            bounds = (0, *cuts, n)
            best = min(best, max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds)))
    return best


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 60), min_size=1, max_size=9), st.integers(1, 6))
def test_partition_runs_minimises_the_largest_run(costs, groups):
    sizes = partition_runs(costs, groups)
    assert sum(sizes) == len(costs) and all(size >= 1 for size in sizes)
    assert len(sizes) <= groups
    bounds = list(itertools.accumulate([0, *sizes]))
    largest = max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds))
    assert largest == brute_force_runs(costs, groups)


def test_a_small_build_is_split_for_every_worker():
    # 8 scenes of ~20 patches and 32 patches per shard: a chain of shards that all share a scene.
    refs = [PatchRef(row, f"S{row // 20}", 0, 128 * (row % 20)) for row in range(160)]
    plan = plan_tasks(fresh_jobs(refs, 32), {}, 32 * 8, parallelism=2)
    assert len(plan.reads) == 4
    assert [len(task.scenes) for task in plan.reads] == [2, 2, 2, 2]
    # Runs hold rows 0-39, 40-79, 80-119, 120-159: shards 1, 2 and 3 straddle a cut, 0 and 4 do not.
    assert [t.job.shard for t in plan.stitches] == [1, 2, 3]
    assert [task.owned for task in plan.reads] == [(0,), (), (), (4,)]


def test_shard_with_only_kept_rows_is_stitched_without_parts():
    keep = ShardJob(0, 0, 2, (), (0, 1), (0, 1), ("a", "b"))
    new = ShardJob(1, 2, 4, (PatchRef(2, "S", 0, 0), PatchRef(3, "S", 0, 128)), (), (2, 3), ("c", "d"))
    plan = plan_tasks([keep, new], {}, 8)
    assert [t.job.shard for t in plan.stitches] == [0] and plan.stitches[0].parts == ()
    assert plan.reads[0].owned == (1,)
