"""A DLR tar.gz delivery is inflated once per build: mask reuses the inner ZIP inventory unpacked (kept
under the scratch folder, verified before use), and a kept ZIP that is not the one kept is unpacked
again, never read."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import stages
from pipeline.enmap import product as product_module
from pipeline.enmap.scratch import (
    ZIP_CACHE_AGE_S,
    claim_inner_zip,
    clean_stale_scratch,
    keep_inner_zip,
    zip_cache_dir,
)
from pipeline.enmap.synth import SynthConfig, generate
from pipeline.manifest import Manifest
from pipeline.scheduler import Scheduler
from pipeline.storage import BuildStore
from tests.conftest import DEMO_MANIFEST, REPO

# One tar.gz delivery (ENVI BIL inside), small and not a multiple of the patch size.
ONE_TAR = SynthConfig(
    seed=7,
    sites=1,
    revisits=1,
    overlapping_tiles=0,
    reprocessed=0,
    width=300,
    height=270,
    packagings=("targz",),
    formats=("BIL",),
)


@pytest.fixture(scope="module")
def delivery(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one-tar")
    generate(out, ONE_TAR)
    assert len(list(out.rglob("*.tar.gz"))) == 1
    return out


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "scratch"
    monkeypatch.setenv("SPECTRALEARTH_SCRATCH", str(folder))
    product_module.TAR_INFLATIONS.clear()
    return folder


def _run(stage: str, products: Path, build: Path) -> None:
    manifest = Manifest.from_yaml(DEMO_MANIFEST)
    scheduler = Scheduler("synchronous", progress=False)
    stages.run_stage(stage, manifest, BuildStore(str(build)), scheduler, inputs=[str(products)])


def _outputs(build: Path) -> dict[str, bytes]:
    """What mask made: the scene masks and the encoded candidates, by path."""
    return {
        path.relative_to(build).as_posix(): path.read_bytes()
        for folder in ("mask", "cut")
        for path in sorted((build / folder).rglob("*"))
        if path.is_file() and path.suffix in (".tif", ".bin", ".json")
    }


def _kept(scratch: Path) -> list[Path]:
    return sorted(Path(zip_cache_dir(str(scratch))).glob("*.zip"))


def test_inventory_and_mask_inflate_a_delivery_once(delivery: Path, scratch: Path, tmp_path: Path) -> None:
    _run("inventory", delivery, tmp_path / "build")
    assert product_module.TAR_INFLATIONS == {"inventory": 1}
    assert len(_kept(scratch)) == 1, "inventory keeps the inner ZIP for mask"
    _run("mask", delivery, tmp_path / "build")
    assert product_module.TAR_INFLATIONS == {"inventory": 1, "reused": 1}
    assert _kept(scratch) == [], "mask removes the ZIP it used"
    assert _outputs(tmp_path / "build"), "mask wrote masks and candidates"

    # The same build without the kept ZIP (mask unpacks the delivery itself, into memory) is identical.
    product_module.TAR_INFLATIONS.clear()
    _run("inventory", delivery, tmp_path / "again")
    for kept in _kept(scratch):
        kept.unlink()
    _run("mask", delivery, tmp_path / "again")
    assert product_module.TAR_INFLATIONS == {"inventory": 1, "mask": 1}
    assert _outputs(tmp_path / "again") == _outputs(tmp_path / "build")


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "replace"])
def test_a_damaged_kept_zip_is_unpacked_again(
    damage: str, delivery: Path, scratch: Path, tmp_path: Path
) -> None:
    _run("inventory", delivery, tmp_path / "reference")
    _run("mask", delivery, tmp_path / "reference")
    product_module.TAR_INFLATIONS.clear()

    _run("inventory", delivery, tmp_path / "build")
    (kept,) = _kept(scratch)
    data = bytearray(kept.read_bytes())
    if damage == "flip a byte":  # same size: only the CRC tells
        data[len(data) // 2] ^= 0x40
    elif damage == "truncate":
        del data[-1000:]
    else:  # another file of the same size under the same name
        data = bytearray(random.Random(3).randbytes(len(data)))
    kept.write_bytes(bytes(data))
    _run("mask", delivery, tmp_path / "build")
    assert product_module.TAR_INFLATIONS == {"inventory": 1, "mask": 1}, "the damaged ZIP was not used"
    assert _kept(scratch) == [], "the damaged ZIP was removed"
    assert _outputs(tmp_path / "build") == _outputs(tmp_path / "reference")


def test_a_replaced_delivery_is_not_served_the_kept_zip(
    delivery: Path, scratch: Path, tmp_path: Path
) -> None:
    products = tmp_path / "products"
    products.mkdir()
    (source,) = delivery.rglob("*.tar.gz")
    copy = products / source.name
    copy.write_bytes(source.read_bytes())
    _run("inventory", products, tmp_path / "build")
    stamp = copy.stat().st_mtime + 10
    os.utime(copy, (stamp, stamp))  # rewritten since inventory: its stamp no longer matches the key
    _run("mask", products, tmp_path / "build")
    assert product_module.TAR_INFLATIONS["mask"] == 1
    assert product_module.TAR_INFLATIONS["reused"] == 0


def _cli(stage: str, products: Path, build: Path, scratch: Path, kill: str | None = None) -> int:
    arguments = ["--manifest", str(DEMO_MANIFEST), "--build", str(build)]
    arguments += ["--input", str(products)] if stage == "inventory" else []
    arguments += ["--scheduler", "synchronous", "--no-progress"]
    prefix = ["-m", "tests.faults", kill, "--"] if kill else ["-m", "pipeline.cli"]
    env = {**os.environ, "SPECTRALEARTH_SCRATCH": str(scratch)}
    done = subprocess.run(
        [sys.executable, *prefix, stage, *arguments], cwd=REPO, env=env, capture_output=True, timeout=600
    )
    assert b"Traceback" not in done.stderr, done.stderr[-2000:]
    return done.returncode


def test_sigkill_after_mask_took_the_kept_zip_resumes_to_the_same_scene(
    delivery: Path, scratch: Path, tmp_path: Path
) -> None:
    """Killed between taking the kept ZIP and using it, mask leaves it in its own scratch folder (removed
    as stale by the next task); the resumed mask unpacks the delivery again, to the same outputs."""
    _run("inventory", delivery, tmp_path / "reference")
    _run("mask", delivery, tmp_path / "reference")
    build = tmp_path / "build"
    assert _cli("inventory", delivery, build, scratch) == 0
    assert len(_kept(scratch)) == 1
    kill = f"pipeline.enmap.product:_kept_intact:kept.zip:{tmp_path / 'marker'}"
    assert _cli("mask", delivery, build, scratch, kill) == -9
    assert _kept(scratch) == [], "the killed task had taken it"
    assert _cli("mask", delivery, build, scratch) == 0
    assert _outputs(build) == _outputs(tmp_path / "reference")
    assert [p.name for p in scratch.iterdir()] == ["spectralearth-zipcache"], "stale scratch removed"


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=12))
def test_kept_zips_stay_within_the_budget(sizes: list[int], tmp_path_factory: pytest.TempPathFactory) -> None:
    """Oracle: the cache holds the most recently kept ZIPs that fit, newest first, never more bytes than
    the limit; one larger than the limit is not kept."""
    base = tmp_path_factory.mktemp("zipcache")
    limit = 8000
    held: list[tuple[str, int]] = []  # (key, size), oldest first
    for number, size in enumerate(sizes):
        staged = base / f"staged-{number}.zip"
        staged.write_bytes(b"z" * size)
        key = f"{number:032x}"
        kept = keep_inner_zip(str(staged), key, 0, limit, base=str(base))
        assert kept == (size <= limit)
        if kept:
            held.append((key, size))
            while sum(s for _, s in held) > limit:
                held.pop(0)
        entries = sorted(Path(zip_cache_dir(str(base))).glob("*.zip"))
        assert sum(e.stat().st_size for e in entries) <= limit
        assert sorted(e.name.split("-")[0] for e in entries) == sorted(k for k, _ in held)
        time.sleep(0.01)  # distinct modification times: least recently kept is well defined


def test_a_kept_zip_is_claimed_once_and_stale_ones_are_cleaned(tmp_path: Path) -> None:
    base, task = tmp_path / "base", tmp_path / "task"
    task.mkdir()
    base.mkdir()
    staged = base / "staged.zip"
    staged.write_bytes(b"PK" * 50)
    assert keep_inner_zip(str(staged), "a" * 32, 1234, 10_000, base=str(base))
    claimed = claim_inner_zip("a" * 32, str(task), base=str(base))
    assert claimed is not None and (claimed.size, claimed.crc) == (100, 1234)
    assert Path(claimed.path).parent == task and Path(claimed.path).read_bytes() == b"PK" * 50
    assert claim_inner_zip("a" * 32, str(task), base=str(base)) is None, "claimed once"

    for name, age in (("fresh", 60.0), ("stale", ZIP_CACHE_AGE_S + 60)):
        staged = base / f"{name}.zip"
        staged.write_bytes(b"x")
        assert keep_inner_zip(str(staged), name.ljust(32, "0"), 0, 10_000, base=str(base))
        (entry,) = Path(zip_cache_dir(str(base))).glob(f"{name}*.zip")
        then = time.time() - age
        os.utime(entry, (then, then))
    removed = clean_stale_scratch(str(base))
    assert [Path(p).name.split("-")[0] for p in removed] == ["stale".ljust(32, "0")]
    assert [p.name.split("-")[0] for p in Path(zip_cache_dir(str(base))).glob("*.zip")] == [
        "fresh".ljust(32, "0")
    ]
