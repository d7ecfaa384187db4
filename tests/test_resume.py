"""Resume and idempotence: a rerun does no work, a write killed with SIGKILL resumes to the same
result, a corrupted shard is found by its checksum and rewritten, and configurations never mix."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
import zarr

from pipeline import stages, tables
from pipeline.enmap.synth import Truth
from pipeline.manifest import Manifest
from pipeline.scheduler import Scheduler
from pipeline.stages import StaleStageError
from pipeline.storage import BuildStore
from pipeline.write import verify_build
from tests.helpers import read_array

REPO = Path(__file__).resolve().parent.parent
SYNC = Scheduler("synchronous", progress=False)
pytestmark = pytest.mark.slow


def run_all(manifest: Manifest, build: Path, products: Path, names: Sequence[str] = stages.ORDER) -> dict:
    store = BuildStore(str(build))
    return {name: stages.run_stage(name, manifest, store, SYNC, inputs=[str(products)]) for name in names}


def dataset(build: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(build / "dataset.zarr"), mode="r")
    return {name: read_array(group, name) for name in group.array_keys()}


def same_tables(a: Path, b: Path) -> None:
    for table in (
        tables.SCENES,
        tables.PLAN_PATCHES,
        tables.INDEX_PATCHES,
        tables.INDEX_LOCATIONS,
        tables.SHARDS,
    ):
        left, right = pq.read_table(a / table), pq.read_table(b / table)
        assert left.equals(right), table


@pytest.fixture(scope="module")
def reference(
    demo_products: tuple[Path, Truth], small_shards_build: tuple[Path, Path]
) -> tuple[Path, Path, Manifest, Path]:
    """An uninterrupted build with small shards, to compare resumed builds against (the session's, shared
    with the fault suite: read-only)."""
    products, _ = demo_products
    manifest_path, build = small_shards_build
    return products, manifest_path, Manifest.from_yaml(manifest_path), build


def test_rerun_with_nothing_changed_does_no_work(reference: tuple[Path, Path, Manifest, Path]) -> None:
    products, _, manifest, build = reference
    before = {p: p.stat().st_mtime_ns for p in build.rglob("*") if p.is_file()}
    results = run_all(manifest, build, products)
    assert all(result.skipped for result in results.values())
    after = {p: p.stat().st_mtime_ns for p in build.rglob("*") if p.is_file()}
    assert after == before


def test_write_killed_with_sigkill_resumes_to_the_same_result(
    reference: tuple[Path, Path, Manifest, Path], tmp_path: Path
) -> None:
    products, manifest_path, manifest, reference_build = reference
    build = tmp_path / "build"
    run_all(manifest, build, products, names=stages.through("dedup"))
    shards = dataset(reference_build)["reflectance"].shape[0] // 2
    assert shards >= 3
    # Killed when assembling shard 1 (tasks run in shard order here): shard 0 is written.
    kill = f"pipeline.write:write_shard_task:ShardJob(shard=1,:{tmp_path / 'marker'}"
    arguments = [
        "write",
        "--manifest",
        str(manifest_path),
        "--build",
        str(build),
        "--scheduler",
        "synchronous",
        "--no-progress",
    ]
    command = [sys.executable, "-m", "tests.faults", kill, "--", *arguments]
    killed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    done = sorted(int(p.stem) for p in (build / "write" / "shards").iterdir())
    assert done and 1 not in done, "some shards were written before the kill, shard 1 was not"
    assert not (build / "write" / "staging").exists(), "nothing is staged: shards come from cut/"
    assert sorted(p.name for p in (build / "cut").iterdir()) == sorted(
        p.stem for p in (build / "mask").glob("*.tif")
    ), "every masked scene has its encoded candidates"
    assert not (build / "_stages" / "write.json").exists()
    # No partial shard: every stored shard object is complete and matches its record, or absent.
    assert verify_build(BuildStore(str(build))).bad == ()

    command = [sys.executable, "-m", "pipeline.cli", *arguments]
    resumed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    counts = json.loads((build / "_stages" / "write.json").read_text())["counts"]
    assert counts["shards_written"] == shards - len(done), "shards done before the kill are not written again"
    got, want = dataset(build), dataset(reference_build)
    assert got.keys() == want.keys()
    for name in want:
        assert np.array_equal(got[name], want[name]), name
    same_tables(build, reference_build)
    assert np.array_equal(
        np.load(build / "stats" / "mean.npy"), np.load(reference_build / "stats" / "mean.npy")
    )


def test_corrupted_shard_is_found_and_rewritten(
    reference: tuple[Path, Path, Manifest, Path], tmp_path: Path
) -> None:
    products, _, manifest, reference_build = reference
    build = tmp_path / "build"
    shutil.copytree(reference_build, build)
    shard = build / "dataset.zarr" / "reflectance" / "c" / "1" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[100:108] = bytes(8 * [0xFF])
    shard.write_bytes(bytes(data))
    store = BuildStore(str(build))
    assert verify_build(store).bad == (1,)
    assert verify_build(store, repair=True).bad == (1,)
    result = stages.run_stage("write", manifest, store, SYNC)
    assert result.counts["shards_written"] == 1
    # Healed from the encoded chunks: both rows of shard 1 come from cut/, no product is read.
    assert result.counts["rows_from_cut"] == 2
    assert verify_build(store).bad == ()
    assert np.array_equal(dataset(build)["reflectance"], dataset(reference_build)["reflectance"])
    assert (build / "dataset.zarr" / "reflectance" / "c" / "1" / "0" / "0" / "0").read_bytes() == (
        reference_build / "dataset.zarr" / "reflectance" / "c" / "1" / "0" / "0" / "0"
    ).read_bytes()


def test_removed_cut_is_not_missing_until_a_shard_needs_it_then_its_scenes_are_read_again(
    reference: tuple[Path, Path, Manifest, Path], tmp_path: Path
) -> None:
    from pipeline.errors import BuildFault

    products, manifest_path, manifest, reference_build = reference
    build = tmp_path / "build"
    shutil.copytree(reference_build, build)
    dropping = dataclasses.replace(manifest, write=dataclasses.replace(manifest.write, keep_cut=False))
    first = run_all(dropping, build, products)
    # Only write's settings changed: it keeps every shard and removes the encoded candidates.
    assert first["mask"].skipped and first["write"].counts["shards_written"] == 0
    assert not (build / "cut").exists()
    # Removed by the setting, they are not missing: nothing is read again.
    again = run_all(dropping, build, products)
    assert all(result.skipped for result in again.values())
    # A corrupt shard needs its rows' chunks: its scenes are read again, never patched with fill.
    shard = build / "dataset.zarr" / "reflectance" / "c" / "1" / "0" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:-8] + bytes(8))
    store = BuildStore(str(build))
    assert verify_build(store, repair=True).bad == (1,)
    index = store.read_geodataframe(tables.INDEX_PATCHES)
    scenes = set(index[index["row"].isin([2, 3])]["scene_id"])
    with pytest.raises(BuildFault, match=rf"rerun mask \(or run\) to re-read {len(scenes)} scene\(s\)$"):
        stages.run_stage("write", dropping, store, SYNC)
    # Asked again on the command line (the mask stage is now due): one line naming it, no traceback.
    raw = yaml.safe_load(manifest_path.read_text())
    raw["write"]["keep_cut"] = False
    (tmp_path / "dropping.yaml").write_text(yaml.safe_dump(raw))
    arguments = ["write", "--manifest", str(tmp_path / "dropping.yaml"), "--build", str(build)]
    command = [sys.executable, "-m", "pipeline.cli", *arguments, "--scheduler", "synchronous"]
    failed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert failed.returncode != 0 and "Traceback" not in failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1 and "spectralearth mask" in failed.stderr
    healed = run_all(dropping, build, products)
    assert healed["mask"].counts["reused"] == healed["mask"].counts["masked"] - len(scenes)
    assert healed["tile"].skipped and healed["dedup"].skipped
    assert healed["write"].counts["shards_written"] == 1 and healed["write"].counts["rows_from_cut"] == 2
    assert not (build / "cut").exists()
    assert verify_build(store).bad == ()
    for name, values in dataset(reference_build).items():
        assert np.array_equal(dataset(build)[name], values), name


def test_verify_cli_names_the_bad_shard(reference: tuple[Path, Path, Manifest, Path], tmp_path: Path) -> None:
    from click.testing import CliRunner

    from pipeline.cli import main

    _, _, _, reference_build = reference
    build = tmp_path / "build"
    shutil.copytree(reference_build, build)
    shard = build / "dataset.zarr" / "quality" / "c" / "0" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:-4] + b"\x00\x00\x00\x00")
    result = CliRunner().invoke(main, ["verify", "--build", str(build)])
    assert result.exit_code == 2
    assert "shard 0: stored bytes do not match" in result.output


def test_changed_manifest_never_mixes_configurations(
    reference: tuple[Path, Path, Manifest, Path], tmp_path: Path
) -> None:
    products, _, manifest, reference_build = reference
    build = tmp_path / "build"
    shutil.copytree(reference_build, build)
    stricter = dataclasses.replace(
        manifest,
        quality=dataclasses.replace(
            manifest.quality,
            max_fraction=tuple((f, 0.02 if f == "cloud" else v) for f, v in manifest.quality.max_fraction),
        ),
    )
    store = BuildStore(str(build))
    with pytest.raises(StaleStageError, match="the mask outputs .* other manifest settings"):
        stages.run_stage("write", stricter, store, SYNC)
    # Rerunning from the first affected stage redoes exactly the affected stages.
    results = {
        name: stages.run_stage(name, stricter, store, SYNC, inputs=[str(products)]) for name in stages.ORDER
    }
    assert results["inventory"].skipped
    assert not results["mask"].skipped and results["mask"].counts["reused"] == 0
    assert not results["tile"].skipped and not results["write"].skipped
    fresh = tmp_path / "fresh"
    run_all(stricter, fresh, products)
    for name, values in dataset(fresh).items():
        assert np.array_equal(dataset(build)[name], values), name
    assert results["dedup"].counts["patches"] < 8
