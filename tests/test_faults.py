"""The fault suite: whatever happens during a build, a rerun heals it to the bytes of an undisturbed one.

Faults: SIGKILL during each stage (a real process killed), transient permission and disk-full errors
(retried; when they persist the stage fails and nothing is recorded as a rejection), corrupted outputs of
each stage (validated before they are trusted: the stage that made them redoes them). Fault injection lives
here and in tests/faults.py, never in the production task path. S3 outages are in tests/test_s3_faults.py.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from pipeline import stages
from pipeline.engine import RetryPolicy
from pipeline.enmap.synth import Truth
from pipeline.errors import StageFailed
from pipeline.manifest import Manifest
from pipeline.scheduler import Scheduler
from pipeline.storage import BuildStore
from tests.helpers import read_array

REPO = Path(__file__).resolve().parent.parent
FAST_RETRY = RetryPolicy((0.0, 0.0, 0.0))
SYNC = Scheduler("synchronous", progress=False, retry=FAST_RETRY)
pytestmark = pytest.mark.slow

# Stage records hold timings and completion times; STAC files hold created/updated: not part of "the
# same result" (SPEC, Names and formats).
VOLATILE_JSON_KEYS = {"created", "updated"}


def build_all(manifest: Manifest, build: Path, products: Path, scheduler: Scheduler = SYNC) -> dict:
    store = BuildStore(str(build))
    return {
        name: stages.run_stage(name, manifest, store, scheduler, inputs=[str(products)])
        for name in stages.ORDER
    }


def _without_volatile(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_volatile(v) for k, v in value.items() if k not in VOLATILE_JSON_KEYS}
    if isinstance(value, list):
        return [_without_volatile(v) for v in value]
    return value


def _relative(value: Any, roots: tuple[Path | str, ...]) -> Any:
    """`value` with the builds' absolute locations replaced by a placeholder, created/updated dropped."""
    if isinstance(value, dict):
        return {k: _relative(v, roots) for k, v in value.items() if k not in VOLATILE_JSON_KEYS}
    if isinstance(value, list):
        return [_relative(v, roots) for v in value]
    if isinstance(value, str):
        for root in roots:
            if isinstance(root, Path):
                value = value.replace(root.resolve().as_uri(), "<build>").replace(
                    str(root.resolve()), "<build>"
                )
            else:
                value = value.replace(root, "<build>")
        return value
    return value


def assert_same_build(build: Path, reference: Path, roots: tuple[Path | str, ...] = ()) -> None:
    """The SPEC's "same result": identical Zarr values, identical table rows, STAC equal but for
    created/updated; plus identical masks and statistics."""
    got = zarr.open_group(str(build / "dataset.zarr"), mode="r")
    want = zarr.open_group(str(reference / "dataset.zarr"), mode="r")
    assert sorted(got.array_keys()) == sorted(want.array_keys())
    for name in want.array_keys():
        assert np.array_equal(read_array(got, name), read_array(want, name)), name
    tables = sorted(p.relative_to(reference) for p in reference.rglob("*.parquet"))
    assert tables == sorted(p.relative_to(build) for p in build.rglob("*.parquet"))
    for table in tables:
        left, right = pq.read_table(build / table), pq.read_table(reference / table)
        if table.parts[0] == "stac":
            # items.parquet carries absolute hrefs to where a build lives (a copied build keeps those of
            # its original until its catalog is remade): compare them relative to either location.
            where = (build, reference, *roots)
            assert _relative(left.to_pylist(), where) == _relative(right.to_pylist(), where), table
        else:
            assert left.equals(right), table
    for mask in (reference / "mask").glob("*.tif"):
        assert (build / "mask" / mask.name).read_bytes() == mask.read_bytes(), mask.name
    for stat in (reference / "stats").iterdir():
        assert (build / "stats" / stat.name).read_bytes() == stat.read_bytes(), stat.name
    stac = sorted(p.relative_to(reference) for p in (reference / "stac").rglob("*.json"))
    assert stac == sorted(p.relative_to(build) for p in (build / "stac").rglob("*.json"))
    for path in stac:
        left = _without_volatile(json.loads((build / path).read_text()))
        assert left == _without_volatile(json.loads((reference / path).read_text())), path


# The reference build: products, their truth, its manifest (path and parsed) and its build folder.
Reference = tuple[Path, Truth, Path, Manifest, Path]


@pytest.fixture(scope="module")
def reference(demo_products: tuple[Path, Truth], small_shards_build: tuple[Path, Path]) -> Reference:
    """The uninterrupted small-shards build (the session's, shared with test_resume: read-only)."""
    products, truth = demo_products
    manifest_path, build = small_shards_build
    return products, truth, manifest_path, Manifest.from_yaml(manifest_path), build


def cli_run(
    manifest_path: Path, build: Path, products: Path, kill: str | None = None
) -> subprocess.CompletedProcess[str]:
    arguments = [
        "run",
        "--manifest",
        str(manifest_path),
        "--build",
        str(build),
        "--input",
        str(products),
        "--scheduler",
        "synchronous",
        "--no-progress",
    ]
    prefix = ["-m", "tests.faults", kill, "--"] if kill else ["-m", "pipeline.cli"]
    return subprocess.run(
        [sys.executable, *prefix, *arguments], cwd=REPO, capture_output=True, text=True, timeout=600
    )


# SIGKILL during each stage -------------------------------------------------------------------------

KILLS = {
    # stage: (module:function, a text in the repr of the call's arguments that aims at one item)
    "inventory": ("pipeline.inventory:inspect_source", "folder"),
    "mask": ("pipeline.mask:mask_scene", "SceneRecord(scene_id='ENMAP01-____L2A-DT0000001875"),
    "tile": ("pipeline.tile:plan_scene", "SceneRecord(scene_id='ENMAP01-____L2A-DT0000001913"),
    "dedup": ("pipeline.dedup:build_index", ""),
    "write": ("pipeline.write:write_shard_task", "ShardJob(shard=1,"),
    "catalog": ("stac.catalog_writer:build_catalog", ""),
}


@pytest.mark.parametrize("stage", list(KILLS))
def test_sigkill_during_a_stage_resumes_to_the_same_result(
    stage: str, reference: Reference, tmp_path: Path
) -> None:
    products, _, manifest_path, _, reference_build = reference
    build = tmp_path / "build"
    target, text = KILLS[stage]
    killed = cli_run(manifest_path, build, products, kill=f"{target}:{text}:{tmp_path / 'marker'}")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (build / "_stages" / f"{stage}.json").exists(), "the killed stage has no record"
    resumed = cli_run(manifest_path, build, products)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Traceback" not in resumed.stderr
    assert_same_build(build, reference_build)
    record = json.loads((build / "_stages" / f"{stage}.json").read_text())
    if stage in ("mask", "tile"):
        # Items finished before the kill were checkpointed and not done again.
        reused = record["counts"]["reused"] if stage == "mask" else 8 - record["counts"]["scenes_planned"]
        assert reused >= 1, record["counts"]


# Transient errors: retried; persistent ones fail the stage and reject nothing -------------------------


class Flaky:
    """Wraps a function: raises `error` on the first `times` calls whose arguments mention `text`."""

    def __init__(
        self, function: Callable[..., Any], error: BaseException, times: int, text: str = ""
    ) -> None:
        self.function, self.error, self.left, self.text = function, error, times, text
        self.raised = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.left > 0 and self.text in repr(args):
            self.left -= 1
            self.raised += 1
            raise self.error
        return self.function(*args, **kwargs)


@pytest.mark.parametrize(
    "error",
    [
        PermissionError(errno.EACCES, "Permission denied"),
        OSError(errno.ENOSPC, "No space left on device"),
        ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
    ],
    ids=["permission", "disk-full", "connection-reset"],
)
def test_a_transient_error_that_clears_is_retried_and_rejects_nothing(
    error: BaseException, reference: Reference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.mask

    products, _, _, manifest, reference_build = reference
    flaky = Flaky(pipeline.mask.compute_mask, error, times=2, text="DT0000001875")
    monkeypatch.setattr(pipeline.mask, "compute_mask", flaky)
    results = build_all(manifest, tmp_path / "build", products)
    assert flaky.raised == 2
    assert results["mask"].counts["rejected"] == 0
    assert_same_build(tmp_path / "build", reference_build)


def test_a_persistent_transient_error_fails_the_stage_and_a_rerun_heals(
    reference: Reference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.mask

    products, _, _, manifest, reference_build = reference
    build = tmp_path / "build"
    flaky = Flaky(
        pipeline.mask.compute_mask, PermissionError(errno.EACCES, "Permission denied"), 99, "DT0000001875"
    )
    monkeypatch.setattr(pipeline.mask, "compute_mask", flaky)
    store = BuildStore(str(build))
    stages.run_stage("inventory", manifest, store, SYNC, inputs=[str(products)])
    with pytest.raises(StageFailed, match="nothing was rejected") as failed:
        stages.run_stage("mask", manifest, store, SYNC)
    assert "DT0000001875" in str(failed.value) and "Permission denied" in str(failed.value)
    assert not (build / "_stages" / "mask.json").exists()
    assert not (build / "mask" / "rejected.parquet").exists()
    # The other scenes were masked and saved before the stage failed.
    assert len(list((build / "_work" / "mask").iterdir())) == 6
    monkeypatch.setattr(pipeline.mask, "compute_mask", flaky.function)
    results = build_all(manifest, build, products)
    assert results["mask"].counts["reused"] == 6 and results["mask"].counts["rejected"] == 0
    assert_same_build(build, reference_build)


def test_unreadable_metadata_for_one_run_is_not_a_rejection(
    reference: Reference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once rejected for a permission error, a product stayed rejected ("inventory: up to date")."""
    from pipeline.enmap import product

    products, _, _, manifest, reference_build = reference
    build = tmp_path / "build"
    original = product.OpenedProduct.metadata_bytes
    flaky = Flaky(original, PermissionError(errno.EACCES, "Permission denied: METADATA.XML"), 99)
    monkeypatch.setattr(product.OpenedProduct, "metadata_bytes", flaky)
    with pytest.raises(StageFailed, match="Permission denied"):
        stages.run_stage("inventory", manifest, BuildStore(str(build)), SYNC, inputs=[str(products)])
    assert not (build / "inventory" / "rejected.parquet").exists()
    monkeypatch.setattr(product.OpenedProduct, "metadata_bytes", original)
    build_all(manifest, build, products)
    assert_same_build(build, reference_build)


def test_a_full_disk_while_saving_outputs_is_retried(
    reference: Reference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline import storage

    products, _, _, manifest, reference_build = reference
    monkeypatch.setattr(storage, "STORE_RETRY_DELAYS", (0.0, 0.0, 0.0))
    flaky = Flaky(storage.BuildStore._write_bytes, OSError(errno.ENOSPC, "No space left on device"), 3)
    monkeypatch.setattr(storage.BuildStore, "_write_bytes", lambda self, *args: flaky(self, *args))
    build_all(manifest, tmp_path / "build", products)
    assert flaky.raised == 3
    assert_same_build(tmp_path / "build", reference_build)


# Corrupt outputs: validated before they are trusted -------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00not what it should be\xff" * 7)


def _first(folder: Path, pattern: str) -> Path:
    return sorted(folder.glob(pattern))[0]


CORRUPTIONS = {
    "scenes-truncated": lambda b: _truncate(b / "inventory" / "scenes.parquet"),
    "masks-table-garbage": lambda b: _garbage(b / "mask" / "masks.parquet"),
    "mask-raster-garbage": lambda b: _garbage(_first(b / "mask", "*.tif")),
    "mask-checkpoint-garbage": lambda b: _garbage(_first(b / "_work" / "mask", "*.json")),
    "plan-truncated": lambda b: _truncate(b / "plan" / "patches.parquet"),
    "index-truncated": lambda b: _truncate(b / "index" / "patches.parquet"),
    "locations-garbage": lambda b: _garbage(b / "index" / "locations.parquet"),
    "zarr-json-garbage": lambda b: _garbage(b / "dataset.zarr" / "zarr.json"),
    "array-json-garbage": lambda b: _garbage(b / "dataset.zarr" / "quality" / "zarr.json"),
    "shard-record-garbage": lambda b: _garbage(_first(b / "write" / "shards", "*.json")),
    "shards-table-truncated": lambda b: _truncate(b / "write" / "shards.parquet"),
    "items-truncated": lambda b: _truncate(b / "stac" / "items.parquet"),
    "stage-record-garbage": lambda b: _garbage(b / "_stages" / "dedup.json"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupt_output_is_redone_by_its_stage(
    corruption: str, reference: Reference, tmp_path: Path
) -> None:
    products, _, manifest_path, _, reference_build = reference
    build = tmp_path / "build"
    shutil.copytree(reference_build, build)
    CORRUPTIONS[corruption](build)
    healed = cli_run(manifest_path, build, products)
    if healed.returncode != 0:
        # A fault found downstream (a corrupt mask raster seen by tile) names the stage to rerun; the
        # next run heals it.
        assert "Traceback" not in healed.stderr and "rerun" in healed.stderr, healed.stderr[-2000:]
        healed = cli_run(manifest_path, build, products)
    assert healed.returncode == 0, healed.stderr[-2000:]
    assert "Traceback" not in healed.stderr
    assert_same_build(build, reference_build)


def test_a_corrupt_index_gives_one_line_to_a_downstream_stage(reference: Reference, tmp_path: Path) -> None:
    """`write` alone on a truncated index: a one-line error naming the stage to rerun, no traceback."""
    _, _, manifest_path, _, reference_build = reference
    build = tmp_path / "build"
    shutil.copytree(reference_build, build)
    _truncate(build / "index" / "patches.parquet")
    for command in (
        ["write", "--manifest", str(manifest_path)],
        ["verify"],
        ["report", "--manifest", str(manifest_path)],
    ):
        completed = subprocess.run(
            [
                sys.executable,
                "-m",
                "pipeline.cli",
                *command,
                "--build",
                str(build),
                *(["--scheduler", "synchronous", "--no-progress"] if "--manifest" in command else []),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert completed.returncode != 0, command
        assert "Traceback" not in completed.stderr, completed.stderr[-2000:]
        assert "index/patches.parquet" in completed.stderr and "rerun dedup" in completed.stderr, (
            completed.stderr
        )


def test_a_scene_masked_again_reaches_the_dataset(
    reference: Reference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wrong mask (left by a fault) redone with `mask --force` must reach every stored row: rows are
    keyed by their scene's mask too, never only by patch, scene and product fingerprint."""
    import pipeline.mask

    products, _, _, manifest, reference_build = reference
    build = tmp_path / "build"
    original = pipeline.mask.quality_bits

    def with_water(*args: Any, **kwargs: Any) -> np.ndarray:
        # The water bit limits nothing in the demo manifest: the same patches are kept, with other bits.
        return original(*args, **kwargs) | np.uint16(512)

    monkeypatch.setattr(pipeline.mask, "quality_bits", with_water)
    build_all(manifest, build, products)
    quality = read_array(zarr.open_group(str(build / "dataset.zarr"), mode="r"), "quality")
    assert quality.size and np.all(quality & 512), "the wrong masks were written"
    monkeypatch.setattr(pipeline.mask, "quality_bits", original)
    store = BuildStore(str(build))
    stages.run_stage("mask", manifest, store, SYNC, force=True)
    build_all(manifest, build, products)
    assert_same_build(build, reference_build)


def test_an_up_to_date_mask_stage_reads_no_mask(
    reference: Reference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checking that the masks are as the stage left them costs one listing, not a read of every mask
    (gigabytes at archive scale); a mask rewritten behind its back is still found."""
    from pipeline import storage

    products, _, _, manifest, reference_build = reference
    build = tmp_path / "build"
    shutil.copytree(reference_build, build)
    read: list[str] = []
    for name in ("read_bytes", "cat_many"):
        original = getattr(storage.BuildStore, name)

        def spy(self: BuildStore, what: str | Iterable[str], _original: Callable[..., Any] = original) -> Any:
            read.extend([what] if isinstance(what, str) else list(what))
            return _original(self, what)

        monkeypatch.setattr(storage.BuildStore, name, spy)
    store = BuildStore(str(build))
    assert stages.run_stage("mask", manifest, store, SYNC).skipped
    assert not [p for p in read if p.endswith(".tif")], read
    mask = _first(build / "mask", "*.tif")
    mask.write_bytes(mask.read_bytes())  # same bytes, rewritten: not as the stage left it
    assert not stages.run_stage("mask", manifest, store, SYNC).skipped
