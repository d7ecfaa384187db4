"""Synthetic EnMAP L2A products for the benchmark: generated once into a cache, reused by every run.

`ensure_products(cache, config)` writes `cache/products-<config hash>/` (products + truth.json) unless it
already holds a complete set (a `.complete` marker written last), and returns the folder and the truth.
`write_subset_lists` writes one scene-list file per subset (the inventory accepts a text file naming one
input per line), so the 2-, 4- and 8-scene builds read the very same files without copies or links.
`spectral_path` gives the GDAL path of a product's spectral image *as delivered* (a file in the product
folder, or `/vsizip/` into the product ZIP), from truth.json alone, independent of the pipeline's reader.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.enmap.synth import SynthConfig, Truth, generate

MARKER = ".complete"


def full_config(seed: int = 2025) -> SynthConfig:
    """8 full-size products: 4 sites x 2 dates; folder/ZIP x GeoTIFF/ENVI BSQ, each pairing twice."""
    return SynthConfig(
        seed=seed,
        sites=4,
        revisits=2,
        overlapping_tiles=0,
        reprocessed=0,
        width=1250,
        height=1250,
        packagings=("folder", "zip"),
        formats=("GTiff", "GTiff", "BSQ", "BSQ"),
    )


def quick_config(seed: int = 2025) -> SynthConfig:
    """2 small products (one folder/GeoTIFF, one ZIP/BSQ) for `--quick`."""
    return SynthConfig(
        seed=seed,
        sites=1,
        revisits=2,
        overlapping_tiles=0,
        reprocessed=0,
        width=300,
        height=280,
        packagings=("folder", "zip"),
        formats=("GTiff", "BSQ"),
    )


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


def pick_subsets(products: list[Any], sizes: list[int]) -> dict[int, list[Any]]:
    """Subsets that keep the packaging/format mix: products ordered so that every prefix alternates
    (folder GTiff, ZIP BSQ, ZIP GTiff, folder BSQ, ...) as far as the set allows."""
    by_kind: dict[tuple[str, str], list[Any]] = {}
    for p in products:
        by_kind.setdefault((p.packaging, p.format), []).append(p)
    preference = [("folder", "GTiff"), ("zip", "BSQ"), ("zip", "GTiff"), ("folder", "BSQ")]
    kinds = [k for k in preference if k in by_kind] + sorted(k for k in by_kind if k not in preference)
    ordered: list[Any] = []
    while any(by_kind[k] for k in kinds):
        for kind in kinds:
            if by_kind[kind]:
                ordered.append(by_kind[kind].pop(0))
    return {n: ordered[:n] for n in sizes if n <= len(ordered)}


def write_subset_lists(folder: Path, subsets: dict[int, list[Any]], into: Path) -> dict[int, Path]:
    into.mkdir(parents=True, exist_ok=True)
    out = {}
    for n, products in subsets.items():
        path = into / f"scenes-{n}.txt"
        path.write_text("".join(f"{(folder / p.path).resolve()}\n" for p in products))
        out[n] = path
    return out


def spectral_member(product: Any) -> str:
    return next(f for f in product.files if "-SPECTRAL_IMAGE" in f and not f.upper().endswith(".HDR"))


def spectral_path(folder: Path, product: Any) -> str:
    """GDAL path of the spectral image as delivered (folder file, or /vsizip/ into the ZIP)."""
    member = spectral_member(product)
    container = (folder / product.path).resolve()
    if product.packaging == "zip":
        return f"/vsizip/{container}/{product.scene_id}/{member}"
    return str(container / member)


def container_files(folder: Path, product: Any) -> list[Path]:
    container = (folder / product.path).resolve()
    return sorted(p for p in container.rglob("*") if p.is_file()) if container.is_dir() else [container]


def spectral_bytes_on_disk(folder: Path, product: Any) -> int:
    """Size of the spectral image as stored (the deflated member size inside a ZIP)."""
    import zipfile

    member = spectral_member(product)
    container = (folder / product.path).resolve()
    if product.packaging == "zip":
        with zipfile.ZipFile(container) as archive:
            return archive.getinfo(f"{product.scene_id}/{member}").compress_size
    return (container / member).stat().st_size


def warm_page_cache(paths: list[Path]) -> int:
    """Read every file once so that every measured read sees the same (warm) page cache."""
    total = 0
    for path in paths:
        with path.open("rb") as stream:
            while chunk := stream.read(16 << 20):
                total += len(chunk)
    return total
