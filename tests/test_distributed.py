"""A real dask.distributed LocalCluster with two worker processes: the same result as the
synchronous scheduler, survival of a worker that dies mid-stage, and a product that keeps killing
workers rejected with its reason instead of being retried forever."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import dask
import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from pipeline import stages, tables
from pipeline.enmap.synth import Truth
from pipeline.manifest import Manifest
from pipeline.scheduler import Scheduler
from pipeline.storage import BuildStore
from tests.faults import KillOnTask
from tests.helpers import read_array

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return Manifest.from_yaml(REPO / "manifests" / "demo.yaml")


def build(
    manifest: Manifest,
    scheduler: Scheduler,
    products: Path,
    target: Path,
    names: Sequence[str] = stages.ORDER,
) -> dict:
    store = BuildStore(str(target))
    return {
        name: stages.run_stage(name, manifest, store, scheduler, inputs=[str(products)]) for name in names
    }


def arrays(target: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(target / "dataset.zarr"), mode="r")
    return {name: read_array(group, name) for name in group.array_keys()}


@pytest.fixture(scope="module")
def synchronous_build(
    tmp_path_factory: pytest.TempPathFactory, demo_products: tuple[Path, Truth], manifest: Manifest
) -> Path:
    products, _ = demo_products
    target = tmp_path_factory.mktemp("sync")
    build(manifest, Scheduler("synchronous", progress=False), products, target)
    return target


def test_local_cluster_equals_synchronous_and_survives_a_dead_worker(
    demo_products: tuple[Path, Truth], manifest: Manifest, synchronous_build: Path, tmp_path: Path
) -> None:
    products, truth = demo_products
    victim = truth.products[0].scene_id
    # The first task of this scene's SceneRecord (its mask task) kills its worker process (SIGKILL);
    # the nanny restarts it and the scheduler reruns the task.
    faulty = Scheduler("local", workers=2, progress=False)
    with faulty.client() as client:
        client.register_plugin(KillOnTask(f"mask-{victim}", str(tmp_path / "markers")))
    target = tmp_path / "cluster"
    try:
        results = build(manifest, faulty, products, target)
    finally:
        with faulty.client() as client:
            client.unregister_worker_plugin(KillOnTask.name)
    assert (tmp_path / "markers").exists(), "the fault fired: a worker died during the build"
    assert results["mask"].counts["rejected"] == 0
    got, want = arrays(target), arrays(synchronous_build)
    for name in want:
        assert np.array_equal(got[name], want[name]), name
    for table in (tables.SCENES, tables.PLAN_PATCHES, tables.INDEX_PATCHES):
        assert pq.read_table(target / table).equals(pq.read_table(synchronous_build / table)), table
    # Workers (the restarted one too) run without distributed's malloc trim setting and profiler.
    with faulty.client() as client:
        assert set(client.run(os.environ.get, "MALLOC_TRIM_THRESHOLD_").values()) == {None}
        assert set(client.run(dask.config.get, "distributed.worker.profile.enabled").values()) == {False}


def test_product_that_keeps_killing_workers_is_rejected(
    demo_products: tuple[Path, Truth], manifest: Manifest, tmp_path: Path
) -> None:
    products, truth = demo_products
    victim = truth.products[1].scene_id
    faulty = Scheduler("local", workers=2, progress=False, allowed_failures=1)
    with faulty.client() as client:
        client.register_plugin(KillOnTask(f"mask-{victim}", str(tmp_path / "markers"), always=True))
    target = tmp_path / "cluster"
    try:
        results = build(manifest, faulty, products, target, names=("inventory", "mask"))
    finally:
        with faulty.client() as client:
            client.unregister_worker_plugin(KillOnTask.name)
    assert results["mask"].counts["rejected"] == 1
    (row,) = pq.read_table(target / "mask" / "rejected.parquet").to_pylist()
    assert row["scene_id"] == victim and row["stage"] == "mask"
    assert row["reason"] == "worker process died on every try: the product keeps killing workers"
    masked = pq.read_table(target / "mask" / "masks.parquet").column("scene_id").to_pylist()
    assert victim not in masked and len(masked) == len(truth.products) - 1
