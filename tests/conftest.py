"""Shared fixtures. Tests that need ../shared (real EnMAP samples, STAC schemas) skip without it."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline import stages
from pipeline.demo import DEMO_CONFIG
from pipeline.enmap.synth import Truth, generate
from pipeline.manifest import Manifest
from pipeline.scheduler import Scheduler
from pipeline.storage import BuildStore
from tests.helpers import small_shards_manifest
from tests.s3_proxy import moto_server

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
SAMPLES = SHARED / "enmap-samples"
REAL_SCENE = "ENMAP01-____L2A-DT0000326721_20170626T102020Z_001_V000204_20200406T201930Z"
DEMO_MANIFEST = REPO / "manifests" / "demo.yaml"


@pytest.fixture(scope="session")
def samples() -> Path:
    if not SAMPLES.is_dir():
        pytest.skip(f"real EnMAP samples not found at {SAMPLES} (they sit beside the clone in CI)")
    return SAMPLES


@pytest.fixture(scope="session")
def real_metadata_bytes(samples: Path) -> bytes:
    return (samples / f"{REAL_SCENE}-METADATA.XML").read_bytes()


@pytest.fixture(scope="session")
def demo_products(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Truth]:
    """The demo's synthetic products (every packaging and format), generated once per test session."""
    out = tmp_path_factory.mktemp("demo-products")
    return out, generate(out, DEMO_CONFIG)


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    """moto's standalone S3 server in its own process on 127.0.0.1 (a thread in this process would
    deadlock: GDAL holds the GIL while it waits for the server's answer): its endpoint URL."""
    with moto_server() as (host, port):
        yield f"http://{host}:{port}"


# Builds shared by the whole session ---------------------------------------------------------------
# Building the demo takes a minute or two on a busy 2-core machine, so the modules that only read a
# build share one. They must not change it: a test that changes a build copies it first
# (`copy_build`), and each shared build checks at the end of the session that no file was added,
# removed or rewritten, so a test that writes into it by mistake fails instead of tainting the others.


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root`: its size and modification time (ns)."""
    return {
        path.relative_to(root).as_posix(): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in root.rglob("*")
        if path.is_file()
    }


def _assert_unchanged(root: Path, before: dict[str, tuple[int, int]], name: str) -> None:
    after = _snapshot(root)
    changed = sorted(
        set(before) ^ set(after) | {k for k in set(before) & set(after) if before[k] != after[k]}
    )
    assert not changed, f"a test changed the shared {name} (copy it first with copy_build): {changed[:10]}"


def run_stages(manifest: Manifest, store: BuildStore, scheduler: Scheduler, products: Path) -> dict[str, Any]:
    """Every stage in order (inventory to catalog) on `products`: each stage's result by name."""
    return {
        name: stages.run_stage(name, manifest, store, scheduler, inputs=[str(products)])
        for name in stages.ORDER
    }


def copy_build(source: BuildStore | Path, target: Path) -> BuildStore:
    """A private copy of a (shared) build to change: files keep their modification times."""
    shutil.copytree(Path(source.root) if isinstance(source, BuildStore) else source, target)
    return BuildStore(str(target))


@pytest.fixture(scope="session")
def demo_manifest() -> Manifest:
    return Manifest.from_yaml(DEMO_MANIFEST)


@pytest.fixture(scope="session")
def demo_build(
    tmp_path_factory: pytest.TempPathFactory, demo_products: Any, demo_manifest: Manifest
) -> Iterator[BuildStore]:
    """The demo products built once per session with the demo manifest through every stage
    (inventory to catalog) on two threads. Read-only: copy it (`copy_build`) to change it."""
    products, _ = demo_products
    store = BuildStore(str(tmp_path_factory.mktemp("demo-build")))
    run_stages(demo_manifest, store, Scheduler("threads", workers=2, progress=False), products)
    root = Path(store.root)
    before = _snapshot(root)
    yield store
    _assert_unchanged(root, before, "demo build")


@pytest.fixture(scope="session")
def small_shards_build(
    tmp_path_factory: pytest.TempPathFactory, demo_products: Any
) -> Iterator[tuple[Path, Path]]:
    """The demo products built once per session, synchronously, with two patches per shard (many shard
    tasks, shards mixing scenes): the uninterrupted reference that resumed and faulted builds are
    compared with. Its manifest path (for the CLI) and build folder. Read-only: copy it to change it."""
    products, _ = demo_products
    folder = tmp_path_factory.mktemp("small-shards")
    manifest_path = small_shards_manifest(folder)
    build = folder / "build"
    run_stages(
        Manifest.from_yaml(manifest_path),
        BuildStore(str(build)),
        Scheduler("synchronous", progress=False),
        products,
    )
    before = _snapshot(build)
    yield manifest_path, build
    _assert_unchanged(build, before, "small-shards build")
