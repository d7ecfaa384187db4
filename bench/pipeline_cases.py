"""Cases over real pixels: the end-to-end build, the floor, the naive way and the read side.

Only public entry points of the pipeline are used: `BuildContext.create(...).run(stage, inputs=...)`,
`Manifest`, the build's own tables (`index/patches.parquet`, `_stages/<stage>.json`, `dataset.zarr`).
Product files are located from the generator's truth.json, not through the pipeline's reader.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import tarfile
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from common import MB, ChildMemorySampler, folder_bytes
from isal import isal_zlib
from products import BenchProduct, inner_zip, spectral_header, spectral_member, spectral_path

from pipeline.fetch import FileSlice
from pipeline.stages import ORDER

PATCH = 128
NODATA = -32768


# End to end -------------------------------------------------------------------------------------------
def run_build(
    manifest_path: Path,
    inputs: list[str],
    build_dir: Path,
    sampler: ChildMemorySampler,
    tag: str,
    scheduler: str = "local",
    progress: Path | None = None,
) -> dict[str, Any]:
    """Every stage of a fresh build with the given scheduler; wall time, record timings, worker peaks.
    With `progress`, the result so far is written there after each stage (and the stage being run
    before it starts), so a build stopped by a time limit still says where it was."""
    from pipeline.manifest import Manifest
    from pipeline.stages import BuildContext

    shutil.rmtree(build_dir, ignore_errors=True)
    manifest = Manifest.from_yaml(manifest_path)
    context = BuildContext.create(manifest, str(build_dir), scheduler, None, False)
    stages: dict[str, Any] = {}
    start = time.perf_counter()

    def report(running: str | None) -> None:
        if progress is not None:
            elapsed = round(time.perf_counter() - start, 3)
            state = {"stages": stages, "running": running, "elapsed_s": elapsed}
            progress.write_text(json.dumps(state, default=str))

    for name in ORDER:
        label = f"{tag}:{name}"
        sampler.label = label
        report(name)
        began = time.perf_counter()
        context.run(name, inputs=inputs if name == "inventory" else None)
        wall = time.perf_counter() - began
        record = json.loads((build_dir / "_stages" / f"{name}.json").read_text())
        stages[name] = {
            "wall_s": round(wall, 3),
            "timings": record.get("timings", {}),
            "counts": record.get("counts", {}),
            "peak_worker_rss_mb": round(sampler.peak_per_worker(label) / MB, 1),
            "worker_processes_seen": sampler.workers_seen(label),
        }
    total = time.perf_counter() - start
    report(None)
    sampler.label = "idle"
    peaks = [s["peak_worker_rss_mb"] for s in stages.values()]
    return {
        "wall_s": round(total, 3),
        "stages": stages,
        "peak_worker_rss_mb": max(peaks, default=0.0),
        "build_bytes": folder_bytes(build_dir),
        "dataset_bytes": folder_bytes(build_dir / "dataset.zarr"),
        "cut_bytes": folder_bytes(build_dir / "cut"),
    }


def index_frame(build_dir: Path) -> Any:
    import pandas as pd

    return pd.read_parquet(build_dir / "index" / "patches.parquet").sort_values("row").reset_index(drop=True)


def kept_bands(manifest_path: Path) -> list[int]:
    from pipeline.enmap.synth import load_band_table
    from pipeline.manifest import Manifest

    table = load_band_table(224)
    return list(Manifest.from_yaml(manifest_path).bands.kept_bands(tuple(float(w) for w in table.wavelength)))


# The floor --------------------------------------------------------------------------------------------
def _cube_bytes(product: BenchProduct) -> tuple[Any, bytes | None, dict[str, float]]:
    """The spectral image's bytes as the fastest reader the pipeline has takes them, and its ENVI header:
    a folder file in place, a stored ZIP member in place (a byte range of the ZIP), a deflated member
    inflated once into memory with ISA-L (the pipeline's inflater), a tar.gz delivery's inner ZIP read
    once from the gzip stream into memory (then its member as above)."""
    times: dict[str, float] = {}
    member = spectral_member(product.truth)
    header_name = spectral_header(product.truth)
    packaging = product.truth.packaging
    if packaging == "folder":
        header = (product.container / header_name).read_bytes() if header_name else None
        return str(product.container / member), header, times
    start = time.perf_counter()
    if packaging == "targz":
        with tarfile.open(product.container, mode="r|gz") as tar:
            for entry in tar:
                if entry.name == product.truth.member:
                    stream = tar.extractfile(entry)
                    assert stream is not None
                    zip_bytes: bytes | Path = stream.read()
                    break
            else:
                raise FileNotFoundError(product.truth.member)
        times["untar_s"] = time.perf_counter() - start
    else:
        zip_bytes = product.container
    start = time.perf_counter()
    opener = io.BytesIO(zip_bytes) if isinstance(zip_bytes, bytes) else open(zip_bytes, "rb")
    with opener as raw, zipfile.ZipFile(raw) as archive:
        info = archive.getinfo(f"{product.scene_id}/{member}")
        header = archive.read(f"{product.scene_id}/{header_name}") if header_name else None
        raw.seek(info.header_offset + 26)
        skip = int.from_bytes(raw.read(2), "little") + int.from_bytes(raw.read(2), "little")
        offset = info.header_offset + 30 + skip
        if info.compress_type == zipfile.ZIP_STORED:
            if isinstance(zip_bytes, bytes):
                return memoryview(zip_bytes)[offset : offset + info.file_size], header, times
            return FileSlice(str(zip_bytes), offset, info.file_size), header, times
        raw.seek(offset)
        data = isal_zlib.decompressobj(-15).decompress(raw.read(info.compress_size))
    times["inflate_s"] = time.perf_counter() - start
    return data, header, times


def _floor_task(job: dict[str, Any]) -> dict[str, Any]:
    """One scene: read its kept bands once (whole cube, `raw_reader`, GDAL only where it cannot), then
    encode each of its stored patches once into the bytes of one inner chunk with the dataset's codec
    (reflectance and quality, `pipeline.zarr_chunks.encode_chunk`)."""
    import numcodecs.blosc
    import rasterio

    from pipeline.enmap import raw_reader
    from pipeline.zarr_chunks import encode_chunk

    numcodecs.blosc.use_threads = False  # one thread per process, as in a worker task
    product: BenchProduct = job["product"]
    bands: list[int] = job["bands"]
    times: dict[str, float] = {}
    start = time.perf_counter()
    source, header, times = _cube_bytes(product)
    layout = raw_reader.layout_of(source, header)
    if layout is not None:
        reader = "raw_reader"
        cube = raw_reader.read(source, layout=layout, bands=[b - 1 for b in bands])
    else:  # compressed: GDAL (not the case for the bench set, which is uncompressed like L2A deliveries)
        reader = "rasterio"
        with rasterio.open(spectral_path(product.folder, product.truth)) as src:
            cube = src.read(bands)
    del source
    times["read_s"] = time.perf_counter() - start
    with rasterio.open(job["mask"]) as mask_src:
        mask = mask_src.read(1)
    start = time.perf_counter()
    stored = 0
    for r, c in job["windows"]:
        for codec, values in (
            (job["reflectance"], cube[:, r : r + PATCH, c : c + PATCH]),
            (job["quality"], mask[r : r + PATCH, c : c + PATCH]),
        ):
            payload = encode_chunk(codec, values)
            stored += len(payload) if payload is not None else 0
    times["encode_s"] = time.perf_counter() - start
    return {
        "scene_id": product.scene_id,
        "kind": product.kind,
        "reader": reader,
        "patches": len(job["windows"]),
        "input_bytes": int(cube.nbytes),
        "encoded_bytes": stored,
        **{k: round(v, 3) for k, v in times.items()},
    }


def run_floor(
    manifest_path: Path,
    build_dir: Path,
    products: list[BenchProduct],
    bands: list[int],
    workers: int,
) -> dict[str, Any]:
    """The floor (SPEC Performance): each cube read once with the fastest reader the pipeline has, plus
    each stored patch encoded once with the dataset's codec, no pipeline around it; as many processes
    as the build has workers, one task per scene, longest first."""
    from pipeline.manifest import Manifest
    from pipeline.zarr_chunks import quality_codec, reflectance_codec

    manifest = Manifest.from_yaml(manifest_path)
    index = index_frame(build_dir)
    by_id = {p.scene_id: p for p in products}
    reflectance = reflectance_codec(manifest, len(bands))
    quality = quality_codec(manifest)
    jobs: list[dict[str, Any]] = []
    for scene_id, group in index.groupby("scene_id", sort=True):
        jobs.append(
            {
                "product": by_id[scene_id],
                "mask": str(build_dir / "mask" / f"{scene_id}.tif"),
                "bands": bands,
                "windows": [
                    (int(r), int(c)) for r, c in zip(group["row_off"], group["col_off"], strict=True)
                ],
                "reflectance": reflectance,
                "quality": quality,
            }
        )
    jobs.sort(key=lambda j: -j["product"].truth.width * j["product"].truth.height)
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(_floor_task, jobs))
    wall = time.perf_counter() - start
    read_total = sum(r["read_s"] for r in results)
    encode_total = sum(r["encode_s"] for r in results)
    return {
        "workers": workers,
        "wall_s": round(wall, 3),
        "codec": {
            "cname": reflectance.cname,
            "clevel": reflectance.clevel,
            "blocksize": reflectance.blocksize,
        },
        "serial_read_s": round(read_total, 3),
        "serial_encode_s": round(encode_total, 3),
        "serial_total_s": round(read_total + encode_total, 3),
        "encoded_bytes": int(sum(r["encoded_bytes"] for r in results)),
        "patches": int(sum(r["patches"] for r in results)),
        "per_scene": results,
    }


def raw_read_throughput(paths: list[Path]) -> dict[str, Any]:
    """Plain sequential file reads (page cache warm): an upper bound on input bandwidth."""
    total = 0
    start = time.perf_counter()
    for path in paths:
        with path.open("rb", buffering=0) as stream:
            while chunk := stream.read(16 * MB):
                total += len(chunk)
    seconds = time.perf_counter() - start
    return {"bytes": total, "seconds": round(seconds, 3), "MBps": round(total / MB / max(seconds, 1e-9), 1)}


# The naive way -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NaivePlan:
    """What the naive way will do, parsed from the build's patch index before anything is timed: each
    scene's patch positions (in index order, shuffled per scene when run), the release layout's location
    and scene numbers, and each scene's share of the time budget."""

    index: Any  # the build's index/patches.parquet as a pandas DataFrame
    groups: dict[str, list[int]]
    location_number: dict[str, int]
    scene_number: dict[str, int]
    share_s: float


def plan_naive(build_dir: Path, max_seconds: float) -> NaivePlan:
    index = index_frame(build_dir)
    groups = {scene_id: list(group.index) for scene_id, group in index.groupby("scene_id", sort=True)}
    return NaivePlan(
        index=index,
        groups=groups,
        location_number={loc: k for k, loc in enumerate(sorted(set(index["location_id"])))},
        scene_number={s: k for k, s in enumerate(sorted(set(index["scene_id"])))},
        share_s=max_seconds / max(len(groups), 1),
    )


def naive_source(product: BenchProduct, out_dir: Path) -> str:
    """The path GDAL opens for a product as delivered; a tar.gz's inner ZIP is unpacked first (GDAL cannot
    open a ZIP inside a tar.gz in place)."""
    if product.truth.packaging == "targz":
        unpacked = inner_zip(product, out_dir.parent / f"{product.scene_id}.ZIP")
        member = f"{product.scene_id}/{spectral_member(product.truth)}"
        return f"/vsizip/{unpacked}/{member}"
    return spectral_path(product.folder, product.truth)


def write_naive_patch(source: str, row: Any, bands: list[int], path: Path) -> None:
    """Open the product, a windowed read of the kept bands, one uncompressed GeoTIFF."""
    import rasterio
    from rasterio.windows import Window

    with rasterio.open(source) as src:
        window = Window(int(row["col_off"]), int(row["row_off"]), PATCH, PATCH)
        cube = src.read(bands, window=window)
        transform = src.window_transform(window)
        crs = src.crs
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {
        "driver": "GTiff",
        "dtype": "int16",
        "count": len(bands),
        "width": PATCH,
        "height": PATCH,
        "crs": crs,
        "transform": transform,
        "nodata": NODATA,
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(cube)


def naive_scene(
    plan: NaivePlan,
    product: BenchProduct,
    positions: list[int],
    bands: list[int],
    out_dir: Path,
    written: list[str],
) -> dict[str, Any]:
    """One scene's patches in the given order until its time share is spent (at least one patch); the
    GeoTIFFs written are appended to `written`."""
    scene_id = product.scene_id
    done = 0
    start = time.perf_counter()
    source = naive_source(product, out_dir)
    for position in positions:
        row = plan.index.iloc[position]
        path = out_dir / "enmap" / f"{plan.location_number[row['location_id']]:07d}"
        path = path / f"{plan.scene_number[scene_id]:05d}.tif"
        write_naive_patch(source, row, bands, path)
        written.append(str(path))
        done += 1
        if time.perf_counter() - start > plan.share_s:
            break
    seconds = time.perf_counter() - start
    if product.truth.packaging == "targz":
        (out_dir.parent / f"{scene_id}.ZIP").unlink(missing_ok=True)
    return {
        "scene_id": scene_id,
        "kind": product.kind,
        "patches": len(positions),
        "done": done,
        "measured_s": round(seconds, 3),
        "s_per_patch": round(seconds / done, 4),
    }


def naive_summary(total: int, per_scene: list[dict[str, Any]], written: list[str]) -> dict[str, Any]:
    """Totals over the scenes: exact when every patch was done, else extrapolated from each scene's mean."""
    done_all = sum(s["done"] for s in per_scene)
    estimate = sum(s["measured_s"] / s["done"] * s["patches"] for s in per_scene)
    kinds: dict[str, list[float]] = {}
    for s in per_scene:
        kinds.setdefault(s["kind"], []).append(s["s_per_patch"])
    tif_bytes = sum(os.path.getsize(p) for p in written)
    return {
        "patches_total": total,
        "patches_done": done_all,
        "measured_s": round(sum(s["measured_s"] for s in per_scene), 3),
        "estimated_total_s": round(estimate, 3),
        "extrapolated": done_all < total,
        "s_per_patch_by_kind": {k: round(sum(v) / len(v), 4) for k, v in sorted(kinds.items())},
        "per_scene": per_scene,
        "geotiff_bytes_written": tif_bytes,
        "geotiff_bytes_per_patch": round(tif_bytes / max(done_all, 1)),
        "files": written,
    }


def run_naive(
    build_dir: Path,
    products: list[BenchProduct],
    bands: list[int],
    out_dir: Path,
    max_seconds: float,
    seed: int = 0,
) -> dict[str, Any]:
    """SPEC's naive way, one process: for each kept patch, open the product as delivered (a folder file or
    `/vsizip/` into the ZIP), a windowed read of the kept bands, an uncompressed GeoTIFF in the
    SpectralEarth release layout (`enmap/<7-digit location>/<5-digit scene>.tif`). GDAL cannot open a
    ZIP inside a tar.gz in place, so for a tar.gz delivery the naive way unpacks its ZIP once first
    (timed with that scene).

    Stratified by scene: each scene's patches in a seeded random order, each scene getting an equal
    share of `max_seconds` (at least one patch). The total is sum over scenes of (mean time per patch x
    patches), exact when every patch was done and an extrapolation (flagged) otherwise.
    """
    import rasterio

    plan = plan_naive(build_dir, max_seconds)
    by_id = {p.scene_id: p for p in products}
    shutil.rmtree(out_dir, ignore_errors=True)
    rng = random.Random(seed)
    written: list[str] = []
    per_scene = []
    with rasterio.Env(GDAL_NUM_THREADS="1"):
        for scene_id, positions in plan.groups.items():
            rng.shuffle(positions)
            per_scene.append(naive_scene(plan, by_id[scene_id], positions, bands, out_dir, written))
    return naive_summary(len(plan.index), per_scene, written)


# Read side ------------------------------------------------------------------------------------------------
def run_read_side(build_dir: Path, geotiffs: list[str], samples: int, seed: int = 1) -> dict[str, Any]:
    """Random single-patch reads: zarr indexing of one patch of dataset.zarr vs one GeoTIFF per patch."""
    import rasterio
    import zarr

    group = zarr.open_group(str(build_dir / "dataset.zarr"), mode="r")
    reflectance = group["reflectance"]
    assert isinstance(reflectance, zarr.Array)
    n = reflectance.shape[0]
    rng = random.Random(seed)
    rows = [rng.randrange(n) for _ in range(samples)]
    start = time.perf_counter()
    checksum = 0
    for row in rows:
        checksum += int(np.asarray(reflectance[row])[0, 0, 0])
    zarr_seconds = time.perf_counter() - start
    picks = [rng.choice(geotiffs) for _ in range(samples)] if geotiffs else []
    start = time.perf_counter()
    for path in picks:
        with rasterio.open(path) as src:
            checksum += int(src.read()[0, 0, 0])
    tif_seconds = time.perf_counter() - start
    zarr_bytes = folder_bytes(build_dir / "dataset.zarr" / "reflectance")
    tif_per_patch = (sum(os.path.getsize(p) for p in geotiffs) / len(geotiffs)) if geotiffs else 0.0
    return {
        "samples": samples,
        "zarr_reads_per_s": round(samples / max(zarr_seconds, 1e-9), 1),
        "geotiff_reads_per_s": round(len(picks) / max(tif_seconds, 1e-9), 1) if picks else None,
        "zarr_ms_per_patch": round(1000 * zarr_seconds / samples, 2),
        "geotiff_ms_per_patch": round(1000 * tif_seconds / len(picks), 2) if picks else None,
        "zarr_reflectance_bytes": zarr_bytes,
        "zarr_bytes_per_patch": round(zarr_bytes / max(n, 1)),
        "geotiff_bytes_per_patch": round(tif_per_patch),
        "geotiff_bytes_all_patches_est": round(tif_per_patch * n),
        "size_ratio_geotiff_over_zarr": round(tif_per_patch * n / max(zarr_bytes, 1), 2),
        "checksum": checksum,
    }
