"""Deflated rasters inside product ZIPs: inflated once (ISA-L, CRC-checked) into memory or scratch,
read back bit for bit; a corrupt member costs its own scene only, with a one-line reason."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import rasterio

from pipeline import stages
from pipeline.enmap.product import open_product
from pipeline.enmap.synth import SynthConfig, Truth, generate
from pipeline.inventory import read_scenes
from pipeline.manifest import Limits, Manifest
from pipeline.scheduler import Scheduler
from pipeline.storage import BuildStore

REPO = Path(__file__).resolve().parent.parent
SYNC = Scheduler("synchronous", progress=False)


@pytest.fixture(scope="module")
def zipped(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Truth]:
    """Two deflated product ZIPs: one ENVI BSQ, one GeoTIFF."""
    out = tmp_path_factory.mktemp("zipped")
    config = SynthConfig(
        seed=21,
        sites=1,
        revisits=2,
        overlapping_tiles=0,
        reprocessed=0,
        width=210,
        height=190,
        packagings=("zip",),
        formats=("BSQ", "GTiff"),
    )
    return out, generate(out, config)


def spectral_member(archive: zipfile.ZipFile) -> zipfile.ZipInfo:
    return next(
        i for i in archive.infolist() if "-SPECTRAL_IMAGE." in i.filename and not i.filename.endswith(".HDR")
    )


def reference_cube(container: Path, tmp_path: Path) -> np.ndarray:
    """The cube read by plain rasterio from a copy extracted with the standard library."""
    with zipfile.ZipFile(container) as archive:
        archive.extractall(tmp_path / "extracted")
        member = spectral_member(archive).filename
    with rasterio.open(tmp_path / "extracted" / member) as src:
        return src.read()


@pytest.mark.parametrize("where", ["memory", "scratch"])
def test_inflated_members_read_bit_for_bit(zipped: tuple[Path, Truth], tmp_path: Path, where: str) -> None:
    out, truth = zipped
    manifest = Manifest.from_yaml(REPO / "manifests" / "demo.yaml")
    store = BuildStore(str(tmp_path / "build"))
    stages.run_stage("inventory", manifest, store, SYNC, inputs=[str(out)])
    # A memory budget below every member sends them to scratch.
    limits = Limits(memory_bytes=1) if where == "scratch" else Limits()
    records = read_scenes(store)
    assert {r.packaging for r in records} == {"zip"} and len(records) == 2
    for record in records:
        with zipfile.ZipFile(record.container_uri) as archive:
            assert spectral_member(archive).compress_type == zipfile.ZIP_DEFLATED
        with open_product(record.location(), unpack=("SPECTRAL_IMAGE",), limits=limits) as opened:
            path = opened.spectral_path
            assert path.startswith("/vsimem/") if where == "memory" else Path(path).is_file()
            with rasterio.open(path) as src:
                cube = src.read()
        assert np.array_equal(cube, reference_cube(Path(record.container_uri), tmp_path / record.scene_id))
        if where == "scratch":
            assert not Path(path).exists(), "scratch is removed when the product is closed"


def test_corrupt_member_rejects_its_scene_in_mask_only(zipped: tuple[Path, Truth], tmp_path: Path) -> None:
    out, truth = zipped
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    victim, other = truth.products
    for p in truth.products:
        (inputs / p.path).write_bytes((out / p.path).read_bytes())
    container = inputs / victim.path
    with zipfile.ZipFile(container) as archive:
        info = spectral_member(archive)
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data = bytearray(container.read_bytes())
    middle = start + info.compress_size // 2
    data[middle : middle + 64] = bytes(64)
    container.write_bytes(bytes(data))

    manifest = Manifest.from_yaml(REPO / "manifests" / "demo.yaml")
    store = BuildStore(str(tmp_path / "build"))
    stages.run_stage("inventory", manifest, store, SYNC, inputs=[str(inputs)])
    assert len(read_scenes(store)) == 2, "the headers are intact: inventory accepts both"
    stages.run_stage("mask", manifest, store, SYNC)
    rejected = [r for r in store.read_table("mask/rejected.parquet").to_pylist()]
    assert [r["scene_id"] for r in rejected] == [victim.scene_id]
    reason = rejected[0]["reason"]
    assert reason.startswith("unreadable while masking: corrupt ZIP entry") and "\n" not in reason
    assert store.exists(f"mask/{other.scene_id}.tif") and not store.exists(f"mask/{victim.scene_id}.tif")
