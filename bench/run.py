"""`make bench`: the SPEC's performance goals, measured as ratios in one run; writes bench/results.json.

    .venv/bin/python bench/run.py            # full size (~15 min; +2 min the first time for the products)
    .venv/bin/python bench/run.py --quick    # tiny sizes, ~1-2 min (the smoke test runs this)

Cases (every time and ratio comes from this one run, on this machine):
 1. products: synthetic EnMAP L2A products (8 x 1250 x 1250 x 224 px; folder and ZIP, GeoTIFF and ENVI
    BSQ), generated once into bench/cache/products-<config hash>/ and reused; subsets of 2, 4, 8 scenes
    are scene-list files naming the same products (the inventory reads lists).
 2. end to end: each subset built from scratch through every stage with the default scheduler
    (`local`: a dask.distributed LocalCluster, one single-threaded worker process per core), each
    build in its own process; patches/s, input MB/s, per-stage times (`_stages/<stage>.json`).
 3. floor: read the kept bands of the same files once + encode the same patches with the same codec,
    chunks and shard size, same number of processes, no pipeline; write / floor and build / floor.
 4. naive (SPEC): one process, per kept patch a windowed rasterio read of the kept bands from the
    product as delivered + an uncompressed GeoTIFF (release layout); naive / build.
 5. memory: peak RSS per worker process for 2, 4 and 8 scenes (psutil sampling of the cluster's
    worker processes), plus ru_maxrss of synchronous-scheduler builds as a second view; time per scene.
 6. read side: random single-patch reads from dataset.zarr vs one GeoTIFF per patch; bytes on disk.
 7. metadata at full scale (bench/archive.py): 11,636 scene footprints, ~540,000 patches; dedup,
    catalog geoparquet, query latency vs a naive scan; time and peak memory per step.
Page cache: every product file is read once before the first measurement, so all cases read warm.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from common import BENCH, MB, REPO, folder_bytes, run_step, table
from pipeline_cases import kept_bands, raw_read_throughput, run_floor, run_naive, run_read_side
from products import (
    container_files,
    ensure_products,
    full_config,
    pick_subsets,
    quick_config,
    spectral_bytes_on_disk,
    warm_page_cache,
    write_subset_lists,
)

MANIFEST = REPO / "manifests" / "spectralearth.yaml"
SPECTRALEARTH_SCENES = 11636
GOALS = {
    "write_over_floor": 1.2,
    "build_over_floor": 1.5,
    "naive_over_build": 3.0,
    "memory_growth": 1.25,  # peak per worker at the largest / smallest build: "flat"
    "time_per_scene_growth": 1.25,
    "query_s": 0.5,  # "well under a second"
    "zarr_patch_read_ms": 50.0,  # "readable from Zarr in milliseconds"
}


LOAD: list[dict[str, Any]] = []  # the machine's 1-minute load average at each step (other work skews times)


def log(message: str) -> None:
    load = round(os.getloadavg()[0], 2)
    LOAD.append({"time": time.strftime("%H:%M:%S"), "step": message, "load_1min": load})
    print(f"[bench {time.strftime('%H:%M:%S')}] {message} (load {load})", flush=True)


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("inf")


def _naive_if_folders(naive: dict[str, Any]) -> float | None:
    folder = [s["measured_s"] / s["done"] for s in naive["per_scene"] if s["kind"].startswith("folder/")]
    return round(sum(folder) / len(folder) * naive["patches_total"], 1) if folder else None


def pixel_cases(args: argparse.Namespace, results: dict[str, Any]) -> None:
    config = quick_config() if args.quick else full_config()
    sizes = [1, 2] if args.quick else [2, 4, 8]
    sync_sizes = sizes if args.quick else sizes[:2]
    log(f"products: {config.sites * config.revisits} x {config.width} x {config.height} x {config.bands}")
    products = ensure_products(args.cache, config)
    subsets = pick_subsets(products.products, sizes)
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    lists = write_subset_lists(products.folder, subsets, work / "lists")
    largest = max(subsets)
    files = sorted({f for p in subsets[largest] for f in container_files(products.folder, p)})
    warmed = warm_page_cache(files)
    per_product = {
        p.scene_id: {
            "packaging": p.packaging,
            "format": p.format,
            "width": p.width,
            "height": p.height,
            "bands": p.bands,
            "spectral_bytes": p.width * p.height * p.bands * 2,
            "spectral_bytes_on_disk": spectral_bytes_on_disk(products.folder, p),
            "cells_inside_footprint": len(p.cells),
        }
        for p in products.products
    }
    results["products"] = {
        "folder": str(products.folder),
        "config": config.to_dict(),
        "generated_s": None if products.generated_seconds is None else round(products.generated_seconds, 1),
        "reused_from_cache": products.generated_seconds is None,
        "subsets": {str(n): [p.scene_id for p in subset] for n, subset in subsets.items()},
        "product_files_bytes": sum(f.stat().st_size for f in files),
        "page_cache_warmed_bytes": warmed,
        "per_product": per_product,
    }

    builds: dict[str, Any] = {}
    for n in sizes:
        log(f"build: {n} scene(s), scheduler local")
        result = run_step(
            "build_step.py",
            ["--manifest", str(MANIFEST), "--scenes", str(lists[n]), "--build", str(work / f"build-{n}")]
            + ["--scheduler", "local", "--tag", f"local-{n}"],
        )
        scene_ids = [p.scene_id for p in subsets[n]]
        spectral = sum(per_product[s]["spectral_bytes"] for s in scene_ids)
        patches = result["stages"]["write"]["counts"].get("patches", 0)
        result["throughput"] = {
            "patches": patches,
            "patches_per_s": round(patches / result["wall_s"], 3),
            "input_spectral_bytes": spectral,
            "input_MBps": round(spectral / MB / result["wall_s"], 1),
            "s_per_scene": round(result["wall_s"] / n, 3),
            "s_per_patch": round(result["wall_s"] / max(patches, 1), 3),
        }
        builds[str(n)] = result
        if n != largest:
            shutil.rmtree(work / f"build-{n}", ignore_errors=True)
    results["builds"] = builds

    sync: dict[str, Any] = {}
    if not args.no_sync_view:
        for n in sync_sizes:
            log(f"build: {n} scene(s), scheduler synchronous (memory view: ru_maxrss of the process)")
            result = run_step(
                "build_step.py",
                ["--manifest", str(MANIFEST), "--scenes", str(lists[n]), "--build", str(work / f"sync-{n}")]
                + ["--scheduler", "synchronous", "--tag", f"sync-{n}"],
            )
            shutil.rmtree(work / f"sync-{n}", ignore_errors=True)
            sync[str(n)] = {
                "wall_s": result["wall_s"],
                "s_per_scene": round(result["wall_s"] / n, 3),
                "driver_maxrss_mb": result["driver_maxrss_mb"],
                "driver_baseline_rss_mb": result["driver_baseline_rss_mb"],
                "stage_wall_s": {k: v["wall_s"] for k, v in result["stages"].items()},
            }
    results["builds_synchronous"] = sync

    build_dir = work / f"build-{largest}"
    bands = kept_bands(MANIFEST)
    workers = os.cpu_count() or 1
    log(f"floor: {largest} scenes, {workers} processes")
    floor = run_floor(MANIFEST, build_dir, products.folder, products.products, bands, work / "floor", workers)
    spectral_files = sorted(
        f
        for p in subsets[largest]
        for f in container_files(products.folder, p)
        if "-SPECTRAL_IMAGE" in f.name or f.suffix.upper() == ".ZIP"
    )
    floor["raw_file_read"] = raw_read_throughput(spectral_files)
    results["floor"] = floor

    log(f"naive: {largest} scenes, one process, budget {args.naive_seconds:.0f} s")
    naive = run_naive(
        build_dir, products.folder, products.products, bands, work / "naive", args.naive_seconds
    )
    files = naive.pop("files")
    results["naive"] = naive

    log("read side: random single-patch reads")
    results["read_side"] = run_read_side(build_dir, files, 40 if args.quick else 200)
    results["read_side"]["geotiff_files_measured"] = len(files)
    results["read_side"]["naive_release_bytes_written"] = folder_bytes(work / "naive")
    if not args.keep:
        shutil.rmtree(work / "naive", ignore_errors=True)
        shutil.rmtree(build_dir, ignore_errors=True)

    # ratios of the largest build
    big = builds[str(largest)]
    write_s = big["stages"]["write"]["wall_s"]
    results["ratios"] = {
        "scenes": largest,
        "build_s": big["wall_s"],
        "write_s": write_s,
        "floor_s": floor["wall_s"],
        "write_over_floor": _ratio(write_s, floor["wall_s"]),
        "build_over_floor": _ratio(big["wall_s"], floor["wall_s"]),
        "naive_s": naive["estimated_total_s"],
        "naive_extrapolated": naive["extrapolated"],
        "naive_over_build": _ratio(naive["estimated_total_s"], big["wall_s"]),
        "naive_over_write": _ratio(naive["estimated_total_s"], write_s),
        "write_read_tasks": big["stages"]["write"]["counts"].get("read_tasks"),
        "write_stitched_shards": big["stages"]["write"]["counts"].get("stitched_shards"),
        "write_shards": big["stages"]["write"]["counts"].get("shards"),
        "workers": workers,
        # what the naive way would take if every product were an unpacked folder (its per-patch time
        # on the folder products of this run, times all patches): the ZIPs make most of the naive time
        "naive_if_all_folders_s": _naive_if_folders(naive),
    }
    first, last = str(sizes[0]), str(largest)
    results["memory"] = {
        "what": "peak RSS of any one dask worker process while the build ran (psutil, every 0.1 s); the "
        "pipeline keeps its LocalCluster for every stage of a build, so a stage's figure includes what a "
        "worker still holds from earlier stages. Synchronous view: ru_maxrss of the single build process "
        "(every task runs in it).",
        "peak_worker_rss_mb": {n: b["peak_worker_rss_mb"] for n, b in builds.items()},
        "peak_worker_rss_mb_by_stage": {
            n: {s: v["peak_worker_rss_mb"] for s, v in b["stages"].items()} for n, b in builds.items()
        },
        "growth_largest_over_smallest": _ratio(
            builds[last]["peak_worker_rss_mb"], builds[first]["peak_worker_rss_mb"]
        ),
        "synchronous_maxrss_mb": {n: s["driver_maxrss_mb"] for n, s in sync.items()},
        "s_per_scene": {n: b["throughput"]["s_per_scene"] for n, b in builds.items()},
        "time_per_scene_growth": _ratio(
            builds[last]["throughput"]["s_per_scene"], builds[first]["throughput"]["s_per_scene"]
        ),
    }


def archive_cases(args: argparse.Namespace, results: dict[str, Any]) -> None:
    scenes = args.archive_scenes or (2000 if args.quick else SPECTRALEARTH_SCENES)
    work = args.work / "archive"
    shutil.rmtree(work, ignore_errors=True)
    steps: dict[str, Any] = {}
    for step in ("generate", "dedup", "catalog", "query"):
        log(f"metadata archive ({scenes} scenes): {step}")
        extra = ["--scenes", str(scenes)] if step == "generate" else []
        if step == "catalog":
            extra = ["--json-sample", "2000" if args.quick else "20000"]
        steps[step] = run_step("archive.py", [step, "--work", str(work), *extra])
    scale = SPECTRALEARTH_SCENES / scenes
    results["archive"] = {
        "scenes": scenes,
        "fraction_of_spectralearth": round(1 / scale, 4),
        "steps": steps,
        "per_step": {
            step: {"seconds": r["step_s"], "peak_rss_mb": r["maxrss_mb"]} for step, r in steps.items()
        },
        # linear in the number of scenes; only an estimate when fewer scenes were run
        "full_scale_estimate_s": None
        if scale == 1
        else {step: round(r["step_s"] * scale, 1) for step, r in steps.items() if step != "query"},
    }
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def summary_rows(results: dict[str, Any], quick: bool) -> list[tuple[str, str, str, str]]:
    rows: list[tuple[str, str, str, str]] = []

    def status(ok: bool | None) -> str:
        return "info" if ok is None else ("met" if ok else "MISSED")

    r = results.get("ratios", {})
    if r:
        n = r["scenes"]
        big = results["builds"][str(n)]["throughput"]
        rows.append(
            (
                f"throughput, {n} scenes",
                f"{big['patches_per_s']:.2f} patches/s, {big['input_MBps']:.0f} MB/s in",
                "-",
                status(None),
            )
        )
        stages = results["builds"][str(n)]["stages"]
        rows.append(
            (
                f"stage wall s, {n} scenes",
                " / ".join(f"{name} {v['wall_s']:.1f}" for name, v in stages.items()),
                "-",
                status(None),
            )
        )
        rows.append(
            (
                "write / floor",
                f"{r['write_over_floor']:.2f}x ({r['write_s']:.1f} s / {r['floor_s']:.1f} s)",
                f"<= {GOALS['write_over_floor']}x",
                status(r["write_over_floor"] <= GOALS["write_over_floor"]),
            )
        )
        rows.append(
            (
                "whole build / floor",
                f"{r['build_over_floor']:.2f}x ({r['build_s']:.1f} s / {r['floor_s']:.1f} s)",
                f"<= {GOALS['build_over_floor']}x",
                status(r["build_over_floor"] <= GOALS["build_over_floor"]),
            )
        )
        label = "naive / whole build" + (" (naive extrapolated)" if r["naive_extrapolated"] else "")
        rows.append(
            (
                label,
                f"{r['naive_over_build']:.2f}x ({r['naive_s']:.0f} s / {r['build_s']:.1f} s)",
                f">= {GOALS['naive_over_build']}x",
                status(r["naive_over_build"] >= GOALS["naive_over_build"]),
            )
        )
        if r.get("naive_if_all_folders_s") is not None:
            by_kind = results["naive"]["s_per_patch_by_kind"]
            rows.append(
                (
                    "naive s per patch by packaging/format",
                    ", ".join(f"{k} {v:.2f}" for k, v in by_kind.items()),
                    "-",
                    status(None),
                )
            )
            rows.append(
                (
                    "naive / build if all were folders (est.)",
                    f"{r['naive_if_all_folders_s'] / r['build_s']:.2f}x",
                    "-",
                    status(None),
                )
            )
        m = results["memory"]
        peaks = ", ".join(f"{k}: {v:.0f}" for k, v in m["peak_worker_rss_mb"].items())
        rows.append(
            (
                "peak MB per worker (scenes: MB)",
                f"{peaks} -> {m['growth_largest_over_smallest']:.2f}x",
                f"flat (<= {GOALS['memory_growth']}x)",
                status(m["growth_largest_over_smallest"] <= GOALS["memory_growth"]),
            )
        )
        if m["synchronous_maxrss_mb"]:
            sync = ", ".join(f"{k}: {v:.0f}" for k, v in m["synchronous_maxrss_mb"].items())
            rows.append(("maxrss MB, synchronous (scenes: MB)", sync, "flat", status(None)))
        per = ", ".join(f"{k}: {v:.1f}" for k, v in m["s_per_scene"].items())
        rows.append(
            (
                "s per scene (scenes: s)",
                f"{per} -> {m['time_per_scene_growth']:.2f}x",
                f"flat (<= {GOALS['time_per_scene_growth']}x)",
                status(m["time_per_scene_growth"] <= GOALS["time_per_scene_growth"]),
            )
        )
        rs = results["read_side"]
        rows.append(
            (
                "patch read: zarr vs GeoTIFF",
                f"{rs['zarr_ms_per_patch']:.1f} ms vs {rs['geotiff_ms_per_patch']:.1f} ms per patch",
                f"ms (< {GOALS['zarr_patch_read_ms']:.0f} ms)",
                status(rs["zarr_ms_per_patch"] < GOALS["zarr_patch_read_ms"]),
            )
        )
        rows.append(
            (
                "bytes per patch: zarr vs GeoTIFF",
                f"{rs['zarr_bytes_per_patch'] / MB:.2f} MB vs {rs['geotiff_bytes_per_patch'] / MB:.2f} MB",
                "-",
                status(None),
            )
        )
    a = results.get("archive")
    if a:
        q = a["steps"]["query"]
        d = a["steps"]["dedup"]["counts"]
        scale = (
            "" if a["fraction_of_spectralearth"] == 1 else f" ({a['fraction_of_spectralearth']:.0%} scale)"
        )
        rows.append(
            (
                f"archive{scale}: patches / locations / multi",
                f"{d['patches']} / {d['locations']} / {d['multi_date_share']:.1%}",
                "~540k / ~415k / ~17.5%" if not quick else "-",
                status(None),
            )
        )
        for step in ("dedup", "catalog"):
            s = a["per_step"][step]
            rows.append(
                (
                    f"archive {step}",
                    f"{s['seconds']:.1f} s, peak {s['peak_rss_mb']:.0f} MB",
                    "-",
                    status(None),
                )
            )
        worst = max(q["median_ms"]["bbox_datetime_cloud"], q["median_ms"]["id_lookup"]) / 1000
        rows.append(
            (
                f"query over {q['items']} items (bbox+dt+cloud; id)",
                f"{q['median_ms']['bbox_datetime_cloud']:.0f} ms; {q['median_ms']['id_lookup']:.0f} ms "
                f"(naive scan {q['naive_bbox_query_s']:.1f} s)",
                f"< {GOALS['query_s']} s",
                status(worst < GOALS["query_s"] and q["same_result"]),
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test), ~1-2 minutes")
    parser.add_argument("--out", type=Path, default=BENCH / "results.json")
    parser.add_argument("--cache", type=Path, default=BENCH / "cache", help="synthetic products cache")
    parser.add_argument("--work", type=Path, default=None, help="scratch builds (default: <cache>/work)")
    parser.add_argument("--naive-seconds", type=float, default=None, help="time budget of the naive case")
    parser.add_argument("--archive-scenes", type=int, default=None, help="scenes of the metadata archive")
    parser.add_argument("--skip-pixels", action="store_true", help="only the metadata archive")
    parser.add_argument("--skip-archive", action="store_true", help="only the pixel cases")
    parser.add_argument("--no-sync-view", action="store_true", help="skip the synchronous-scheduler builds")
    parser.add_argument("--keep", action="store_true", help="keep the scratch builds")
    args = parser.parse_args()
    args.work = args.work or args.cache / ("work-quick" if args.quick else "work")
    if args.naive_seconds is None:
        args.naive_seconds = 20.0 if args.quick else 90.0
    start = time.perf_counter()
    results: dict[str, Any] = {
        "meta": {
            "mode": "quick" if args.quick else "full",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": {
                "cpus": os.cpu_count(),
                "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1),
                "python": sys.version.split()[0],
                "platform": platform.platform(),
            },
            "manifest": str(MANIFEST.relative_to(REPO)),
            "goals": GOALS,
        },
        "products": {},
        "builds": {},
        "builds_synchronous": {},
        "floor": {},
        "naive": {},
        "read_side": {},
        "ratios": {},
        "memory": {},
        "archive": {},
    }
    if not args.skip_pixels:
        pixel_cases(args, results)
    if not args.skip_archive:
        archive_cases(args, results)
    log("done")
    results["meta"]["load"] = LOAD
    rows = summary_rows(results, args.quick)
    loads = [entry["load_1min"] for entry in LOAD]
    rows.append(
        (
            "machine load (1-min avg) at each step",
            f"{min(loads):.2f} - {max(loads):.2f} on {os.cpu_count()} cores",
            "idle besides the bench",
            "info",
        )
    )
    results["summary"] = [{"case": c, "measured": m, "goal": g, "status": s} for c, m, g, s in rows]
    results["elapsed_s"] = round(time.perf_counter() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print()
    print(table(rows))
    print(f"\n{results['elapsed_s']:.0f} s; results in {args.out}")


if __name__ == "__main__":
    main()
