"""Scheduler.map_then: each then-task runs only after the first-tasks it names, results in order,
a failure stops with the failing item named, on local schedulers and a real LocalCluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.scheduler import Scheduler, TaskFailed


def make(item: int, folder: str) -> int:
    if item < 0:
        raise ValueError(f"bad item {item}")
    (Path(folder) / f"first-{item}").write_text("done")
    return item * 10


def combine(item: tuple[int, ...], folder: str) -> list[str]:
    missing = [k for k in item if not (Path(folder) / f"first-{k}").exists()]
    assert not missing, f"ran before first tasks {missing}"
    (Path(folder) / f"then-{'-'.join(map(str, item))}").write_text("done")
    return [f"first-{k}" for k in item]


@pytest.mark.parametrize("name", ["synchronous", "threads", pytest.param("local", marks=pytest.mark.slow)])
def test_then_tasks_wait_for_their_first_tasks(name: str, tmp_path: Path) -> None:
    scheduler = Scheduler(name, workers=2, progress=False)
    firsts = [0, 1, 2, 3]
    thens = [(0, 1), (3,), (1, 2, 3), ()]
    first_results, then_results = scheduler.map_then(
        make, firsts, combine, thens, [list(t) for t in thens], str(tmp_path)
    )
    assert first_results == [0, 10, 20, 30]
    assert then_results == [["first-0", "first-1"], ["first-3"], ["first-1", "first-2", "first-3"], []]


@pytest.mark.parametrize("name", ["synchronous", pytest.param("local", marks=pytest.mark.slow)])
def test_a_failed_first_task_stops_the_stage_and_its_dependents(name: str, tmp_path: Path) -> None:
    scheduler = Scheduler(name, workers=2, progress=False)
    with pytest.raises(TaskFailed, match="bad item -1"):
        scheduler.map_then(make, [0, -1], combine, [(0, -1)], [[0, 1]], str(tmp_path))
    assert not list(tmp_path.glob("then-*")), "the dependent task never ran"
