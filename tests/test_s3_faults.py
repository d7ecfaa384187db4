"""S3 unreachable for some seconds during each stage: the build rides it out (transient faults are
retried with backoff, in tasks and in every read and write of the build location) and ends in the same
result as an undisturbed S3 build, with nothing rejected.

moto's server forgets its objects when restarted, so the outage is made by a small proxy in front of it
(tests/s3_proxy.py) that refuses connections for a few seconds; every client (s3fs, GDAL's /vsis3/) goes
through the proxy. The build runs on a real LocalCluster: the proxy's threads live in this process, and
GDAL holds the GIL while it waits for an answer, so GDAL must not read through the proxy from here.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import s3fs

from pipeline import stages
from pipeline.manifest import Manifest
from pipeline.stages import BuildContext
from tests.helpers import write_few_products
from tests.s3_proxy import S3Proxy, products_behind_proxy
from tests.test_faults import assert_same_build

REPO = Path(__file__).resolve().parent.parent
OUTAGE_SECONDS = 3.0
pytestmark = pytest.mark.slow

# Per stage, a function of the driver that runs while the stage talks to S3: the outage starts at its
# first call (for the per-item stages, when their tasks are handed to the workers).
OUTAGE_AT = {
    "inventory": "pipeline.scheduler:Scheduler.run_items",
    "mask": "pipeline.scheduler:Scheduler.run_items",
    "tile": "pipeline.scheduler:Scheduler.run_items",
    "dedup": "pipeline.dedup:build_index",
    "write": "pipeline.scheduler:Scheduler.map",
    "catalog": "pipeline.catalog:build_catalog",  # the name the stage calls (imported at its top)
}


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[S3Proxy, s3fs.S3FileSystem]]:
    from pipeline.scheduler import _close_local_clusters

    products = write_few_products(tmp_path_factory.mktemp("s3-fault-products"))
    with products_behind_proxy(products, tmp_path_factory.mktemp("scratch")) as (proxy, fs):
        # Workers are spawned with this environment (credentials, endpoint): none left from before.
        _close_local_clusters()
        try:
            yield proxy, fs
        finally:
            _close_local_clusters()


def build(name: str) -> BuildContext:
    manifest = Manifest.from_yaml(REPO / "manifests" / "demo.yaml")
    context = BuildContext.create(
        manifest, f"s3://builds/{name}", scheduler="local", workers=2, progress=False
    )
    for stage in stages.ORDER:
        context.run(stage, inputs=["s3://enmap-products/"])
    return context


def download(fs: s3fs.S3FileSystem, name: str, target: Path) -> Path:
    fs.get(f"builds/{name}/", str(target) + "/", recursive=True)
    return target


@pytest.fixture(scope="module")
def reference(s3: tuple[S3Proxy, s3fs.S3FileSystem]) -> str:
    build("reference")
    return "reference"


@pytest.mark.parametrize("stage", list(OUTAGE_AT))
def test_s3_unreachable_during_a_stage_heals_to_the_same_build(
    stage: str,
    s3: tuple[S3Proxy, s3fs.S3FileSystem],
    reference: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proxy, fs = s3
    module_name, attribute = OUTAGE_AT[stage].split(":")
    owner: object = importlib.import_module(module_name)
    *path, function_name = attribute.split(".")
    for name in path:
        owner = getattr(owner, name)
    original = getattr(owner, function_name)
    started: list[bool] = []

    @functools.wraps(original)
    def with_outage(*args: Any, **kwargs: Any) -> Any:
        if not started and (function_name not in ("run_items", "map") or kwargs.get("label") == stage):
            started.append(True)
            proxy.fail_for(OUTAGE_SECONDS)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, function_name, with_outage)
    proxy.clear_counts()
    context = build(f"outage-{stage}")
    assert started, f"the outage was started during {stage}"
    rejected = {
        name: context.store.read_table(f"{folder}/rejected.parquet").to_pylist()
        for name, folder in (("inventory", "inventory"), ("mask", "mask"), ("tile", "plan"))
    }
    assert rejected == {"inventory": [], "mask": [], "tile": []}
    got = download(fs, f"outage-{stage}", tmp_path / "got")
    want = download(fs, reference, tmp_path / "want")
    assert_same_build(got, want, roots=(f"s3://builds/outage-{stage}", f"s3://builds/{reference}"))
