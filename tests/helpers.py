"""Test helpers: synthetic products made once per session, and independent readers of them.

The readers here open products with zipfile/tarfile/rasterio directly, never with pipeline code, so
tests compare the pipeline against an independent reading of the source.
"""

from __future__ import annotations

import os
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import yaml
import zarr

from pipeline.enmap.scratch import zip_cache_dir
from pipeline.enmap.synth import ProductTruth, SynthConfig, generate

REPO = Path(__file__).resolve().parent.parent

# Three products (a folder, a ZIP, a tar.gz delivery; GeoTIFF and ENVI), with an overlapping tile: the
# small set the S3 tests upload.
FEW_PRODUCTS = SynthConfig(
    seed=21,
    sites=1,
    revisits=2,
    overlapping_tiles=1,
    reprocessed=0,
    width=300,
    height=280,
    packagings=("folder", "zip", "targz"),
    formats=("GTiff", "BSQ"),
)


def write_few_products(out: Path) -> Path:
    """`FEW_PRODUCTS` written to `out`, without the truth file (only products are uploaded)."""
    generate(out, FEW_PRODUCTS)
    (out / "truth.json").unlink()
    return out


def small_shards_manifest(folder: Path) -> Path:
    """The demo manifest with two patches per shard (many shard tasks, shards mixing scenes), saved in
    `folder` for the CLI."""
    raw = yaml.safe_load((REPO / "manifests" / "demo.yaml").read_text())
    raw["write"] = {"patches_per_shard": 2, "compression_level": 5, "max_shards_per_task": 1}
    path = folder / "manifest.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def spectral_gdal_path(products_dir: Path, product: ProductTruth, scratch: Path) -> str:
    """GDAL path of a synthetic product's spectral image, found with zipfile/tarfile and globbing."""
    container = products_dir / product.path
    if product.packaging in ("folder", "ard"):
        (match,) = [
            p for p in container.iterdir() if "-SPECTRAL_IMAGE" in p.name and not p.name.endswith(".HDR")
        ]
        return str(match)
    if product.packaging == "targz":
        local_zip = scratch / f"{product.scene_id}.ZIP"
        if not local_zip.exists():
            assert product.member is not None, "a tar.gz delivery names its ZIP member"
            with tarfile.open(container) as tar:
                stream = tar.extractfile(tar.getmember(product.member))
                assert stream is not None
                local_zip.write_bytes(stream.read())
        container = local_zip
    with zipfile.ZipFile(container) as archive:
        (member,) = [
            n for n in archive.namelist() if "-SPECTRAL_IMAGE" in n and not n.upper().endswith(".HDR")
        ]
    return f"/vsizip/{os.path.abspath(container)}/{member}"


def zarr_array(group: zarr.Group, name: str) -> zarr.Array:
    """The member `name` of `group`, which the test knows is an array (zarr types members as either)."""
    array = group[name]
    assert isinstance(array, zarr.Array), f"{name} is not an array"
    return array


def read_array(group: zarr.Group, name: str) -> np.ndarray:
    """Every value of the array `name` of `group`."""
    return np.asarray(zarr_array(group, name)[:])


def leftover_scratch(base: Path) -> list[Path]:
    """What a build left under the scratch base `base`: every scratch folder, and every inner ZIP of a
    tar.gz kept for mask and not taken (the folder that holds them and its lock file are no scratch)."""
    kept = Path(zip_cache_dir(str(base)))
    return sorted(p for p in base.iterdir() if p != kept) + sorted(kept.glob("*.zip"))


def two_sites_twice(seed: int, **overrides: Any) -> SynthConfig:
    """Small products: two sites seen on two dates each, no overlapping tiles or reprocessed versions,
    330 x 310 px (not multiples of 128), few clouds; `overrides` set packagings, formats and the rest."""
    settings: dict[str, Any] = {
        "sites": 2,
        "revisits": 2,
        "overlapping_tiles": 0,
        "reprocessed": 0,
        "width": 330,
        "height": 310,
        "cloud_amount": 0.02,
    }
    return SynthConfig(seed=seed, **(settings | overrides))
