"""Planning of write tasks (pure): shards partitioned into tasks, units read once, disjoint windows."""

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.write import PatchRef, plan_tasks, read_units, unit_windows


@st.composite
def index_rows(draw):
    """Patches in dedup's row order: by scene, then grid row, then column, on a 128 px lattice."""
    refs = []
    for scene in range(draw(st.integers(1, 4))):
        for grid_row in range(draw(st.integers(1, 4))):
            columns = sorted(draw(st.sets(st.integers(0, 8), min_size=1, max_size=6)))
            refs += [(f"S{scene}", 17 + 128 * grid_row, 5 + 128 * c) for c in columns]
    return [PatchRef(row, scene, r, c) for row, (scene, r, c) in enumerate(refs)]


@settings(max_examples=300, deadline=None)
@given(index_rows(), st.integers(2, 6), st.integers(1, 4))
def test_tasks_partition_shards_and_never_overlap_reads(refs, per_shard, max_shards):
    tasks = plan_tasks(refs, per_shard, max_shards=max_shards)
    shards = (len(refs) + per_shard - 1) // per_shard
    # Every shard in exactly one task, in order, none larger than allowed.
    assert [s for t in tasks for s in range(t.first_shard, t.last_shard + 1)] == list(range(shards))
    assert all(t.last_shard - t.first_shard + 1 <= max_shards for t in tasks)
    assert [p for t in tasks for p in t.patches] == refs
    # A task ends at a shared unit only when it reached max_shards.
    for before, after in zip(tasks, tasks[1:], strict=False):
        if read_units(before.patches) & read_units(after.patches):
            assert before.last_shard - before.first_shard + 1 == max_shards
    # The windows all tasks read never share a pixel, and each covers its patches.
    windows = [(key[0], w) for t in tasks for key, w in unit_windows(t.patches, 128).items()]
    for a in range(len(windows)):
        for b in range(a + 1, len(windows)):
            (sa, wa), (sb, wb) = windows[a], windows[b]
            if sa != sb:
                continue
            overlap = (
                wa.col_off < wb.col_off + wb.width
                and wb.col_off < wa.col_off + wa.width
                and wa.row_off < wb.row_off + wb.height
                and wb.row_off < wa.row_off + wa.height
            )
            assert not overlap
    for t in tasks:
        w = unit_windows(t.patches, 128)
        for p in t.patches:
            window = w[(p.scene_id, p.row_off)]
            assert window.col_off <= p.col_off and p.col_off + 128 <= window.col_off + window.width


def test_unlimited_chain_reads_each_unit_in_one_task():
    refs = [PatchRef(k, "S", 0, 128 * k) for k in range(10)]  # one grid row of 10 patches
    (task,) = plan_tasks(refs, 3, max_shards=100)
    assert (task.first_shard, task.last_shard) == (0, 3)
