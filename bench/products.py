"""Synthetic EnMAP L2A products for the benchmark: generated once into a cache, reused by every run.

The bench set holds one full-size product per packaging the pipeline reads (two synthetic configs, as a
config sets one ZIP deflate level for all its products):
  folder GeoTIFF, deflated ZIP (ENVI BSQ)            seed 2025, zip_compresslevel 1
  stored ZIP (GeoTIFF), DLR tar.gz (ENVI BIL inside)  seed 2026, zip_compresslevel 0
`ensure_products(cache, config)` writes `cache/products-<config hash>/` (products + truth.json) unless it
already holds a complete set (a `.complete` marker written last). `write_subset_lists` writes one
scene-list file per subset (the inventory accepts a text file naming one input per line), so the 2- and
4-scene builds read the very same files. Product files are located from truth.json and zipfile/tarfile
alone, independent of the pipeline's reader.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.enmap.synth import SynthConfig, Truth, generate

MARKER = ".complete"
FULL_SIZE = (1250, 1250)  # an EnMAP L2A tile is ~1,000-1,300 px a side, 224 bands
QUICK_SIZE = (520, 490)


def bench_configs(quick: bool) -> list[SynthConfig]:
    """The two configs of the bench set (see the module docstring): four products, four packagings."""
    width, height = QUICK_SIZE if quick else FULL_SIZE
    common: dict[str, Any] = {
        "sites": 2,
        "revisits": 1,
        "overlapping_tiles": 0,
        "reprocessed": 0,
        "width": width,
        "height": height,
    }
    if quick:
        # Small scenes hold few 128 px cells: no detector line (it drops every cell it crosses) and
        # fewer clouds, so that the quick builds store some patches.
        common |= {"defective_bands": 0, "cloud_amount": 0.03}
    return [
        SynthConfig(
            seed=2025, packagings=("folder", "zip"), formats=("GTiff", "BSQ"), zip_compresslevel=1, **common
        ),
        SynthConfig(
            seed=2026, packagings=("zip", "targz"), formats=("GTiff", "BIL"), zip_compresslevel=0, **common
        ),
    ]


def config_hash(config: SynthConfig) -> str:
    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class ProductSet:
    folder: Path
    truth: Truth
    generated_seconds: float | None  # None when reused from the cache

    @property
    def products(self) -> list[Any]:
        return list(self.truth.products)


@dataclass(frozen=True)
class BenchProduct:
    """One product of the bench set: the folder it was generated in and its truth record."""

    folder: Path
    truth: Any  # pipeline.enmap.synth.ProductTruth

    @property
    def scene_id(self) -> str:
        return str(self.truth.scene_id)

    @property
    def container(self) -> Path:
        return (self.folder / self.truth.path).resolve()

    @property
    def kind(self) -> str:
        """Packaging and format, the ZIP's member compression included: `zip-deflated/BSQ`."""
        packaging = self.truth.packaging
        if packaging == "zip":
            with zipfile.ZipFile(self.container) as archive:
                info = archive.getinfo(f"{self.scene_id}/{spectral_member(self.truth)}")
            packaging = "zip-stored" if info.compress_type == zipfile.ZIP_STORED else "zip-deflated"
        return f"{packaging}/{self.truth.format}"


def ensure_products(cache: Path, config: SynthConfig) -> ProductSet:
    folder = cache / f"products-{config_hash(config)}"
    if (folder / MARKER).exists() and (folder / "truth.json").exists():
        return ProductSet(folder, Truth.from_json(folder / "truth.json"), None)
    partial = cache / f"{folder.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    partial.mkdir(parents=True)
    start = time.perf_counter()
    truth = generate(partial, config)
    seconds = time.perf_counter() - start
    (partial / MARKER).write_text(json.dumps({"seconds": round(seconds, 1)}) + "\n")
    partial.rename(folder)
    return ProductSet(folder, truth, seconds)


def ensure_bench_set(cache: Path, quick: bool) -> tuple[list[BenchProduct], float]:
    """The bench set's products in subset order (folder GeoTIFF, deflated ZIP, stored ZIP, tar.gz: every
    prefix mixes packagings) and the seconds spent generating (0 when all came from the cache)."""
    products: list[BenchProduct] = []
    seconds = 0.0
    for config in bench_configs(quick):
        made = ensure_products(cache, config)
        seconds += made.generated_seconds or 0.0
        products += [BenchProduct(made.folder, p) for p in made.products]
    order = {"folder": 0, "zip-deflated": 1, "zip-stored": 2, "targz": 3}
    products.sort(key=lambda p: (order.get(p.kind.split("/")[0], 9), p.scene_id))
    return products, seconds


def write_subset_lists(products: list[BenchProduct], sizes: list[int], into: Path) -> dict[int, Path]:
    """One scene-list file per subset size: the first n products."""
    into.mkdir(parents=True, exist_ok=True)
    out = {}
    for n in sizes:
        path = into / f"scenes-{n}.txt"
        path.write_text("".join(f"{p.container}\n" for p in products[:n]))
        out[n] = path
    return out


def spectral_member(product: Any) -> str:
    return next(f for f in product.files if "-SPECTRAL_IMAGE" in f and not f.upper().endswith(".HDR"))


def spectral_header(product: Any) -> str | None:
    """The ENVI header's file name beside the spectral image (None for a GeoTIFF)."""
    return next((f for f in product.files if "-SPECTRAL_IMAGE" in f and f.upper().endswith(".HDR")), None)


def spectral_path(folder: Path, product: Any) -> str:
    """GDAL path of the spectral image as delivered (folder file, or /vsizip/ into the ZIP). A tar.gz
    delivery has no such path (GDAL cannot open a ZIP inside a tar.gz in place): see `inner_zip`."""
    member = spectral_member(product)
    container = (folder / product.path).resolve()
    if product.packaging == "zip":
        return f"/vsizip/{container}/{product.scene_id}/{member}"
    if product.packaging == "targz":
        raise ValueError("a tar.gz delivery's spectral image has no GDAL path: unpack its ZIP first")
    return str(container / member)


def inner_zip(product: BenchProduct, target: Path) -> Path:
    """Unpack a tar.gz delivery's product ZIP to `target` (streamed); returns `target`."""
    with tarfile.open(product.container, mode="r|gz") as tar:
        for info in tar:
            if info.name == product.truth.member:
                stream = tar.extractfile(info)
                assert stream is not None
                with stream, target.open("wb") as out:
                    shutil.copyfileobj(stream, out, 16 << 20)
                return target
    raise FileNotFoundError(f"{product.truth.member} not in {product.container}")


def container_files(product: BenchProduct) -> list[Path]:
    container = product.container
    return sorted(p for p in container.rglob("*") if p.is_file()) if container.is_dir() else [container]


def spectral_bytes_on_disk(product: BenchProduct) -> int:
    """Size of the spectral image as stored (the member's compressed size inside a ZIP; the whole
    delivery for a tar.gz)."""
    member = spectral_member(product.truth)
    if product.truth.packaging == "zip":
        with zipfile.ZipFile(product.container) as archive:
            return archive.getinfo(f"{product.scene_id}/{member}").compress_size
    if product.truth.packaging == "targz":
        return product.container.stat().st_size
    return (product.container / member).stat().st_size


def warm_page_cache(paths: list[Path]) -> int:
    """Read every file once so that every measured read sees the same (warm) page cache."""
    total = 0
    for path in paths:
        with path.open("rb") as stream:
            while chunk := stream.read(16 << 20):
                total += len(chunk)
    return total
