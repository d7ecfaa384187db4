"""Cases over real pixels: the end-to-end build, the floor, the naive way and the read side.

Only public entry points of the pipeline are used: `BuildContext.create(...).run(stage, inputs=...)`,
`Manifest`, the build's own tables (`index/patches.parquet`, `_stages/<stage>.json`, `dataset.zarr`).
Product files are located from the generator's truth.json, not through the pipeline's reader.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from common import MB, ChildMemorySampler, folder_bytes
from products import spectral_path

STAGES = ("inventory", "mask", "tile", "dedup", "write", "catalog")
PATCH = 128
NODATA = -32768


# End to end -------------------------------------------------------------------------------------------
def run_build(
    manifest_path: Path,
    scene_list: Path,
    build_dir: Path,
    sampler: ChildMemorySampler,
    tag: str,
    scheduler: str = "local",
) -> dict[str, Any]:
    """Every stage of a fresh build with the given scheduler; wall time, record timings, worker peaks."""
    from pipeline.manifest import Manifest
    from pipeline.stages import BuildContext

    shutil.rmtree(build_dir, ignore_errors=True)
    manifest = Manifest.from_yaml(manifest_path)
    context = BuildContext.create(manifest, str(build_dir), scheduler, None, False)
    stages: dict[str, Any] = {}
    start = time.perf_counter()
    for name in STAGES:
        label = f"{tag}:{name}"
        sampler.label = label
        began = time.perf_counter()
        context.run(name, inputs=[str(scene_list)] if name == "inventory" else None)
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
    sampler.label = "idle"
    peaks = [s["peak_worker_rss_mb"] for s in stages.values()]
    return {
        "wall_s": round(total, 3),
        "stages": stages,
        "peak_worker_rss_mb": max(peaks, default=0.0),
        "build_bytes": folder_bytes(build_dir),
        "dataset_bytes": folder_bytes(build_dir / "dataset.zarr"),
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
def _inflated(path: str) -> tuple[list[Any], str, float]:
    """A `/vsizip/` spectral image inflated once into memory (with its .HDR sidecar), served to GDAL
    from /vsimem/: reading a band-interleaved raster through /vsizip/ seeks backwards in the deflate
    stream for every strip (minutes per cube), so a fast reader inflates the member once. The fastest
    inflate at hand (ISA-L, one call per member) and no scratch file, so the floor is not slower than
    the pipeline's own reader. Returns the memory files (kept open by the caller), the path, seconds."""
    import zipfile

    from isal import isal_zlib
    from rasterio.io import MemoryFile

    if not path.startswith("/vsizip/"):
        return [], path, 0.0
    start = time.perf_counter()
    container, member = path[len("/vsizip/") :].split(".ZIP/", 1)
    container += ".ZIP"
    files, folder = [], f"floor-{os.getpid()}-{time.monotonic_ns()}"
    with zipfile.ZipFile(container) as archive, open(container, "rb") as raw:
        stem = member.rsplit(".", 1)[0]
        for info in archive.infolist():
            if info.filename != member and not info.filename.startswith(stem + "."):
                continue
            raw.seek(info.header_offset + 26)
            skip = int.from_bytes(raw.read(2), "little") + int.from_bytes(raw.read(2), "little")
            raw.seek(skip, 1)
            data = raw.read(info.compress_size)
            if info.compress_type == zipfile.ZIP_DEFLATED:
                data = isal_zlib.decompressobj(-15).decompress(data)
            files.append(MemoryFile(data, dirname=folder, filename=Path(info.filename).name))
    return files, f"/vsimem/{folder}/{Path(member).name}", time.perf_counter() - start


def _floor_task(job: dict[str, Any]) -> dict[str, Any]:
    """Read one scene's kept bands once (band by band: sequential in a band-interleaved file), encode
    its patches with the same codec, inner chunks and shard size as dataset.zarr."""
    import rasterio
    import zarr
    from zarr.codecs import BloscCodec, BloscShuffle

    bands: list[int] = job["bands"]
    windows: list[tuple[int, int]] = job["windows"]
    times: dict[str, float] = {}
    start = time.perf_counter()
    files, path, times["unzip_s"] = _inflated(job["path"])
    with rasterio.Env(GDAL_CACHEMAX=256 * MB, GDAL_NUM_THREADS="1"), rasterio.open(path) as src:
        cube = np.empty((len(bands), src.height, src.width), dtype=np.int16)
        for k, band in enumerate(bands):
            src.read(band, out=cube[k])
        spectral_bytes = len(bands) * src.width * src.height * 2
    for file in files:
        file.close()
    with rasterio.open(job["mask"]) as mask_src:
        mask = mask_src.read(1)
    times["read_s"] = time.perf_counter() - start
    start = time.perf_counter()
    patches = np.stack([cube[:, r : r + PATCH, c : c + PATCH] for r, c in windows])
    bits = np.stack([mask[r : r + PATCH, c : c + PATCH] for r, c in windows])
    del cube
    codec = BloscCodec(cname="zstd", clevel=job["level"], shuffle=BloscShuffle.bitshuffle)
    group = zarr.open_group(job["store"], mode="w", zarr_format=3)
    per_shard = job["per_shard"]
    reflectance = group.create_array(
        "reflectance",
        shape=patches.shape,
        chunks=(1, *patches.shape[1:]),
        shards=(per_shard, *patches.shape[1:]),
        dtype="int16",
        fill_value=NODATA,
        compressors=codec,
    )
    quality = group.create_array(
        "quality",
        shape=bits.shape,
        chunks=(1, *bits.shape[1:]),
        shards=(per_shard, *bits.shape[1:]),
        dtype="uint16",
        fill_value=0,
        compressors=codec,
    )
    reflectance[:] = patches
    quality[:] = bits
    times["encode_s"] = time.perf_counter() - start
    return {
        "scene_id": job["scene_id"],
        "patches": len(windows),
        "input_bytes": spectral_bytes,
        **{k: round(v, 3) for k, v in times.items()},
    }


def run_floor(
    manifest_path: Path,
    build_dir: Path,
    product_folder: Path,
    products: list[Any],
    bands: list[int],
    workdir: Path,
    workers: int,
) -> dict[str, Any]:
    """The floor: read the kept bands of every scene once (whole cube, same files, as delivered) and
    encode the same patches with the same codec, with no pipeline around it; as many processes as the
    pipeline has workers, one task per scene (the write stage's tasks are per group of shards)."""
    from pipeline.manifest import Manifest

    manifest = Manifest.from_yaml(manifest_path)
    index = index_frame(build_dir)
    by_id = {p.scene_id: p for p in products}
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    jobs: list[dict[str, Any]] = []
    for scene_id, group in index.groupby("scene_id", sort=True):
        jobs.append(
            {
                "scene_id": scene_id,
                "path": spectral_path(product_folder, by_id[scene_id]),
                "mask": str(build_dir / "mask" / f"{scene_id}.tif"),
                "bands": bands,
                "windows": [
                    (int(r), int(c)) for r, c in zip(group["row_off"], group["col_off"], strict=True)
                ],
                "store": str(workdir / f"{len(jobs):03d}.zarr"),
                "level": manifest.write.compression_level,
                "per_shard": manifest.write.patches_per_shard,
            }
        )
    jobs.sort(key=lambda j: -len(j["windows"]))  # longest first: the same greedy order a scheduler takes
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(_floor_task, jobs))
    wall = time.perf_counter() - start
    # The same reads and encodes, one after the other in this process: the single-core floor.
    read_total = sum(r["read_s"] for r in results)
    encode_total = sum(r["encode_s"] for r in results)
    out = {
        "workers": workers,
        "wall_s": round(wall, 3),
        "serial_read_s": round(read_total, 3),
        "serial_encode_s": round(encode_total, 3),
        "serial_total_s": round(read_total + encode_total, 3),
        "encoded_bytes": folder_bytes(workdir),
        "patches": int(sum(r["patches"] for r in results)),
        "per_scene": results,
    }
    shutil.rmtree(workdir, ignore_errors=True)
    return out


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
def run_naive(
    build_dir: Path,
    product_folder: Path,
    products: list[Any],
    bands: list[int],
    out_dir: Path,
    max_seconds: float,
    seed: int = 0,
) -> dict[str, Any]:
    """SPEC's naive way, one process: for each kept patch, open the product as delivered (a folder file or
    `/vsizip/` into the ZIP), a windowed read of the kept bands, an uncompressed GeoTIFF in the
    SpectralEarth release layout (`enmap/<7-digit location>/<5-digit scene>.tif`).

    Stratified by scene: each scene's patches in a seeded random order, each scene getting an equal
    share of `max_seconds` (at least one patch). The total is sum over scenes of (mean time per patch x
    patches), exact when every patch was done and an extrapolation (flagged) otherwise.
    """
    import rasterio
    from rasterio.windows import Window

    index = index_frame(build_dir)
    by_id = {p.scene_id: p for p in products}
    location_number = {loc: k for k, loc in enumerate(sorted(set(index["location_id"])))}
    scene_number = {s: k for k, s in enumerate(sorted(set(index["scene_id"])))}
    shutil.rmtree(out_dir, ignore_errors=True)
    rng = random.Random(seed)
    groups = {scene_id: list(group.index) for scene_id, group in index.groupby("scene_id", sort=True)}
    share = max_seconds / max(len(groups), 1)
    written: list[str] = []
    per_scene = []
    with rasterio.Env(GDAL_NUM_THREADS="1"):
        for scene_id, positions in groups.items():
            product = by_id[scene_id]
            source = spectral_path(product_folder, product)
            rng.shuffle(positions)
            done = 0
            start = time.perf_counter()
            for position in positions:
                row = index.iloc[position]
                with rasterio.open(source) as src:
                    window = Window(int(row["col_off"]), int(row["row_off"]), PATCH, PATCH)
                    cube = src.read(bands, window=window)
                    transform = src.window_transform(window)
                    crs = src.crs
                path = out_dir / "enmap" / f"{location_number[row['location_id']]:07d}"
                path = path / f"{scene_number[scene_id]:05d}.tif"
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
                written.append(str(path))
                done += 1
                if time.perf_counter() - start > share:
                    break
            seconds = time.perf_counter() - start
            per_scene.append(
                {
                    "scene_id": scene_id,
                    "kind": f"{product.packaging}/{product.format}",
                    "patches": len(positions),
                    "done": done,
                    "measured_s": round(seconds, 3),
                    "s_per_patch": round(seconds / done, 4),
                }
            )
    total = len(index)
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
