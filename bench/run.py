"""`make bench`: the SPEC's performance goals, measured as ratios in one run; writes build/bench/results.json.

    .venv/bin/python bench/run.py            # full size (7-11 min on 2 cores; +3 min the first time)
    .venv/bin/python bench/run.py --quick    # tiny products, 1-5 min (the smoke test runs this)

Cases (every time and ratio comes from this one run, on this machine):
 1. products: four synthetic EnMAP L2A products, one per packaging (folder GeoTIFF, deflated ZIP with
    ENVI BSQ, stored ZIP with GeoTIFF, DLR tar.gz with ENVI BIL; 1250 x 1250 x 224 px), generated once
    into bench/cache/ and reused; builds of 2 and 4 scenes read scene-list files naming them.
 2. end to end: each subset built from scratch through every stage with the default scheduler
    (`local`: a dask.distributed LocalCluster, one single-threaded worker process per core), each build
    in its own process; per-stage times (`_stages/<stage>.json`), peak RSS of each worker.
 3. floor: each cube read once with the fastest reader the pipeline has (`raw_reader` at byte offsets;
    a deflated member inflated once with ISA-L; a tar.gz's ZIP read once from the gzip stream) + each
    stored patch encoded once into one inner chunk with the dataset's codec (`zarr_chunks.encode_chunk`,
    reflectance and quality), as many processes as workers; build / floor and write / floor.
 4. naive (SPEC): one process, per kept patch a windowed rasterio read of the kept bands from the
    product as delivered + an uncompressed GeoTIFF (release layout); time-boxed, extrapolated per scene.
 5. S3 (bench/s3_case.py): the products on moto's S3 server; each product fetched once with
    `pipeline.fetch` (large ranged GETs), then the same build from `s3://`; GETs per product counted in
    the server's request log; the S3 build's dataset compared with the local build's, byte for byte.
 6. profile: the largest build once more with the synchronous scheduler under cProfile (top costs).
 7. codecs (bench/codec_bench.py): encode/decode MB/s and ratio of the Blosc choices on realistic spectra.
 8. metadata at full scale (bench/archive.py): 11,636 scene footprints, ~540,000 patches; dedup,
    catalog geoparquet, query latency vs a naive scan.
Page cache: every product file is read once before the first measurement, so all local cases read warm.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import codec_bench
from common import BENCH, MB, REPO, run_step, table
from pipeline_cases import kept_bands, run_floor, run_naive, run_read_side
from products import (
    BenchProduct,
    container_files,
    ensure_bench_set,
    spectral_bytes_on_disk,
    warm_page_cache,
    write_subset_lists,
)
from s3_case import GETS_EXTRA, run_s3_case

MANIFEST = REPO / "manifests" / "spectralearth.yaml"
SPECTRALEARTH_SCENES = 11636
GOALS = {
    "build_over_floor": 1.2,
    "write_over_floor": 0.15,
    "naive_over_build": 3.0,
    "s3_local_factor": 1.5,  # S3 build <= fetch once + 1.5 x local build
    "gets_extra": GETS_EXTRA,  # GETs per product <= bytes / 8 MiB + objects + this
    "worker_peak_mb": 1536.0,
    "memory_growth": 1.25,  # peak per worker at 4 scenes / 2 scenes: "flat"
    "query_s": 0.5,  # "well under a second"
    "zarr_patch_read_ms": 50.0,
}
LOAD: list[dict[str, Any]] = []  # the machine's 1-minute load average at each step (other work skews times)


def log(message: str) -> None:
    load = round(os.getloadavg()[0], 2)
    LOAD.append({"time": time.strftime("%H:%M:%S"), "step": message, "load_1min": load})
    print(f"[bench {time.strftime('%H:%M:%S')}] {message} (load {load})", flush=True)


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("inf")


def dataset_digest(build_dir: Path) -> dict[str, str]:
    """SHA-256 over the shard files of each array of dataset.zarr (names and bytes, sorted)."""
    out = {}
    root = build_dir / "dataset.zarr"
    for array in ("reflectance", "quality"):
        digest = hashlib.sha256()
        for path in sorted((root / array).rglob("*")):
            if path.is_file() and path.name != "zarr.json":
                digest.update(str(path.relative_to(root)).encode())
                digest.update(path.read_bytes())
        out[array] = digest.hexdigest()
    return out


def build(
    args: argparse.Namespace, inputs: list[str], build_dir: Path, tag: str, **extra: Any
) -> dict[str, Any]:
    command = ["--manifest", str(MANIFEST), "--build", str(build_dir), "--tag", tag]
    command += [item for i in inputs for item in ("--input", i)]
    command += ["--scheduler", extra.get("scheduler", "local")]
    if extra.get("profile"):
        command += ["--profile", str(extra["profile"])]
    return run_step("build_step.py", command)


def product_facts(
    products: list[BenchProduct], sizes: list[int], files: list[Path], generated: float, warmed: int
) -> dict[str, Any]:
    """What the bench set holds: the subsets, and per product its kind, size and bytes (spectral, on disk,
    container)."""
    per_product = {
        p.scene_id: {
            "kind": p.kind,
            "width": p.truth.width,
            "height": p.truth.height,
            "bands": p.truth.bands,
            "spectral_bytes": p.truth.width * p.truth.height * p.truth.bands * 2,
            "spectral_bytes_on_disk": spectral_bytes_on_disk(p),
            "container_bytes": sum(f.stat().st_size for f in container_files(p)),
        }
        for p in products
    }
    return {
        "generated_s": round(generated, 1),
        "reused_from_cache": generated == 0,
        "subsets": {str(n): [p.scene_id for p in products[:n]] for n in sizes},
        "product_files_bytes": sum(f.stat().st_size for f in files),
        "page_cache_warmed_bytes": warmed,
        "per_product": per_product,
    }


def subset_builds(
    args: argparse.Namespace,
    products: list[BenchProduct],
    sizes: list[int],
    lists: dict[int, Path],
    per_product: dict[str, Any],
) -> dict[str, Any]:
    """One local build per subset size with its throughput; only the largest build is kept on disk."""
    largest = sizes[-1]
    builds: dict[str, Any] = {}
    for n in sizes:
        log(f"build: {n} scenes, scheduler local")
        result = build(args, [str(lists[n])], args.work / f"build-{n}", f"local-{n}")
        patches = result["stages"]["write"]["counts"].get("patches", 0)
        spectral = sum(per_product[p.scene_id]["spectral_bytes"] for p in products[:n])
        result["throughput"] = {
            "patches": patches,
            "patches_per_s": round(patches / result["wall_s"], 3),
            "input_MBps": round(spectral / MB / result["wall_s"], 1),
            "s_per_scene": round(result["wall_s"] / n, 3),
        }
        builds[str(n)] = result
        if n != largest:
            shutil.rmtree(args.work / f"build-{n}", ignore_errors=True)
    return builds


def build_ratios(
    largest: int, big: dict[str, Any], floor: dict[str, Any], naive: dict[str, Any], workers: int
) -> dict[str, Any]:
    """The largest build against the floor and the naive way."""
    write_s = big["stages"]["write"]["wall_s"]
    return {
        "scenes": largest,
        "build_s": big["wall_s"],
        "write_s": write_s,
        "floor_s": floor["wall_s"],
        "build_over_floor": _ratio(big["wall_s"], floor["wall_s"]),
        "write_over_floor": _ratio(write_s, floor["wall_s"]),
        # where the rest goes: the stage that reads and encodes, and the one that lists and checks inputs
        "mask_over_floor": _ratio(big["stages"]["mask"]["wall_s"], floor["wall_s"]),
        "inventory_over_floor": _ratio(big["stages"]["inventory"]["wall_s"], floor["wall_s"]),
        "naive_s": naive["estimated_total_s"],
        "naive_extrapolated": naive["extrapolated"],
        "naive_over_build": _ratio(naive["estimated_total_s"], big["wall_s"]),
        "workers": workers,
    }


def memory_facts(builds: dict[str, Any], first: str, last: str) -> dict[str, Any]:
    """Peak worker memory of each build, by stage, and its growth from the smallest to the largest."""
    return {
        "what": "peak RSS of any one dask worker process while the build ran (psutil, every 0.1 s); the "
        "LocalCluster lives for the whole build, so a stage's figure includes what a worker still holds.",
        "peak_worker_rss_mb": {n: b["peak_worker_rss_mb"] for n, b in builds.items()},
        "peak_worker_rss_mb_by_stage": {
            n: {s: v["peak_worker_rss_mb"] for s, v in b["stages"].items()} for n, b in builds.items()
        },
        "growth_largest_over_smallest": _ratio(
            builds[last]["peak_worker_rss_mb"], builds[first]["peak_worker_rss_mb"]
        ),
        "s_per_scene": {n: b["throughput"]["s_per_scene"] for n, b in builds.items()},
    }


def s3_facts(
    args: argparse.Namespace, products: list[BenchProduct], local_s: float, local_digest: dict[str, str]
) -> dict[str, Any]:
    """The S3 case with its bound (fetch once + 1.5 x the local build) and whether its dataset matches."""
    s3 = run_s3_case(products, MANIFEST, args.work / "s3", local_s, args.s3_timeout)
    bound = s3["fetch_once_s"] + GOALS["s3_local_factor"] * local_s
    s3["goal_bound_s"] = round(bound, 3)
    s3["local_build_s"] = local_s
    if s3["finished"]:
        s3["build_s"] = s3["build"]["wall_s"]
        s3["same_dataset_as_local"] = dataset_digest(Path(s3["build_dir"])) == local_digest
    shutil.rmtree(args.work / "s3", ignore_errors=True)
    return s3


def profile_facts(args: argparse.Namespace, scene_list: Path) -> dict[str, Any]:
    """A synchronous build under cProfile: wall time per stage and the top functions."""
    work = args.work
    profiled = build(
        args, [str(scene_list)], work / "profiled", "profile", scheduler="synchronous", profile=25
    )
    facts = {
        "wall_s": profiled["wall_s"],
        "stage_wall_s": {k: v["wall_s"] for k, v in profiled["stages"].items()},
        **profiled["profile"],
    }
    shutil.rmtree(work / "profiled", ignore_errors=True)
    return facts


def pixel_cases(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """The cases over real pixels, in order: subset builds, floor, naive way, read side, ratios, memory,
    S3 and the profiled build; each writes its own key of `results`."""
    log(f"products: {'quick' if args.quick else 'full-size'} bench set")
    products, generated = ensure_bench_set(args.cache, args.quick)
    sizes = [2, len(products)]
    largest = sizes[-1]
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    lists = write_subset_lists(products, sizes, work / "lists")
    files = sorted({f for p in products for f in container_files(p)})
    warmed = warm_page_cache(files)
    results["products"] = product_facts(products, sizes, files, generated, warmed)

    builds = subset_builds(args, products, sizes, lists, results["products"]["per_product"])
    results["builds"] = builds
    build_dir = work / f"build-{largest}"
    local_digest = dataset_digest(build_dir)

    bands = kept_bands(MANIFEST)
    workers = os.cpu_count() or 1
    log(f"floor: {largest} scenes, {workers} processes")
    floor = run_floor(MANIFEST, build_dir, products, bands, workers)
    results["floor"] = floor

    log(f"naive: {largest} scenes, one process, budget {args.naive_seconds:.0f} s")
    naive = run_naive(build_dir, products, bands, work / "naive", args.naive_seconds)
    geotiffs = naive.pop("files")
    results["naive"] = naive
    log("read side: random single-patch reads")
    results["read_side"] = run_read_side(build_dir, geotiffs, 40 if args.quick else 200)
    shutil.rmtree(work / "naive", ignore_errors=True)

    big = builds[str(largest)]
    results["ratios"] = build_ratios(largest, big, floor, naive, workers)
    results["memory"] = memory_facts(builds, str(sizes[0]), str(largest))

    if not args.skip_s3:
        log(f"S3: {largest} products on moto, fetch once, then the build from s3://")
        results["s3"] = s3_facts(args, products, big["wall_s"], local_digest)

    if not args.no_profile:
        log(f"profile: {largest} scenes, synchronous scheduler, cProfile")
        results["profile"] = profile_facts(args, lists[largest])
    if not args.keep:
        shutil.rmtree(build_dir, ignore_errors=True)


def codec_cases(args: argparse.Namespace, results: dict[str, Any]) -> None:
    log("codecs: Blosc choices on realistic spectra, one thread")
    patches, source = codec_bench.realistic_patches(args.cache, args.quick)
    results["codecs"] = codec_bench.measure(patches, repeats=2 if args.quick else 3) | {"source": source}


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


Row = tuple[str, str, str, str]


def status(ok: bool | None) -> str:
    """A summary row's verdict: informational, goal met or missed."""
    return "info" if ok is None else ("met" if ok else "MISSED")


def build_rows(results: dict[str, Any]) -> list[Row]:
    """The local build against the floor and the naive way."""
    r = results["ratios"]
    n = r["scenes"]
    big = results["builds"][str(n)]
    stages = big["stages"]
    rows: list[Row] = []
    rows.append(
        (
            f"local build, {n} scenes ({big['throughput']['patches']} patches)",
            f"{r['build_s']:.1f} s: " + ", ".join(f"{k} {v['wall_s']:.1f}" for k, v in stages.items()),
            "-",
            status(None),
        )
    )
    f = results["floor"]
    rows.append(
        (
            "floor (read once + encode once)",
            f"{f['wall_s']:.1f} s on {f['workers']} processes (serial: read {f['serial_read_s']:.1f} + "
            f"encode {f['serial_encode_s']:.1f} s)",
            "-",
            status(None),
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
    rows.append(
        (
            "mask / floor, inventory / floor",
            f"{r['mask_over_floor']:.2f}x, {r['inventory_over_floor']:.2f}x",
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
    label = "naive / whole build" + (" (naive extrapolated)" if r["naive_extrapolated"] else "")
    rows.append(
        (
            label,
            f"{r['naive_over_build']:.1f}x ({r['naive_s']:.0f} s / {r['build_s']:.1f} s)",
            f">= {GOALS['naive_over_build']}x",
            status(r["naive_over_build"] >= GOALS["naive_over_build"]),
        )
    )
    return rows


def memory_and_read_rows(results: dict[str, Any]) -> list[Row]:
    """Peak memory per worker across subset sizes, and the read side (zarr vs GeoTIFF)."""
    rows: list[Row] = []
    m = results["memory"]
    peaks = ", ".join(f"{k} scenes {v:.0f}" for k, v in m["peak_worker_rss_mb"].items())
    worst = max(m["peak_worker_rss_mb"].values())
    rows.append(
        (
            "peak MB per worker",
            f"{peaks} ({m['growth_largest_over_smallest']:.2f}x)",
            f"<= {GOALS['worker_peak_mb']:.0f} MB, flat (<= {GOALS['memory_growth']}x)",
            status(
                worst <= GOALS["worker_peak_mb"]
                and m["growth_largest_over_smallest"] <= GOALS["memory_growth"]
            ),
        )
    )
    rs = results["read_side"]
    rows.append(
        (
            "patch read: zarr vs GeoTIFF",
            f"{rs['zarr_ms_per_patch']:.1f} ms vs {rs['geotiff_ms_per_patch']:.1f} ms per patch; "
            f"{rs['zarr_bytes_per_patch'] / MB:.2f} vs {rs['geotiff_bytes_per_patch'] / MB:.2f} MB",
            f"< {GOALS['zarr_patch_read_ms']:.0f} ms",
            status(rs["zarr_ms_per_patch"] < GOALS["zarr_patch_read_ms"]),
        )
    )
    return rows


def s3_rows(s3: dict[str, Any]) -> list[Row]:
    """The S3 build against its bound, and its GETs per product."""
    rows: list[Row] = []
    if s3["finished"]:
        measured = (
            f"{s3['build_s']:.1f} s vs fetch {s3['fetch_once_s']:.1f} + 1.5 x local "
            f"{s3['local_build_s']:.1f} = {s3['goal_bound_s']:.1f} s"
            + ("" if s3["same_dataset_as_local"] else "; DATASET DIFFERS from local")
        )
        ok = s3["build_s"] <= s3["goal_bound_s"] and s3["same_dataset_as_local"]
    else:
        how = f"failed ({s3['error']})" if "error" in s3 else "stopped"
        measured = (
            f"{how} after {s3['stopped_after_s']:.0f} s in {s3['build']['running']} "
            f"(bound fetch {s3['fetch_once_s']:.1f} + 1.5 x local {s3['local_build_s']:.1f} = "
            f"{s3['goal_bound_s']:.1f} s)"
        )
        ok = False
    rows.append(("S3 build (moto) vs fetch + 1.5 x local", measured, "<= bound, same dataset", status(ok)))
    gets = s3["per_product"]
    over = [k for k, v in gets.items() if "gets_bound" in v and v["build_gets"] > v["gets_bound"]]
    rows.append(
        (
            "GETs per product in the S3 build (fetch once)",
            "; ".join(
                f"{v['kind']} {v['bytes'] / MB:.0f} MB: {v.get('build_gets', '?')} ({v['fetch_gets']})"
                for v in gets.values()
                if "kind" in v
            ),
            f"<= MB / 8 + objects + {GOALS['gets_extra']}",
            status(not over and s3["finished"]),
        )
    )
    return rows


def codec_rows(c: dict[str, Any]) -> list[Row]:
    """One row per codec of the table (1 thread, bitshuffle)."""
    rows: list[Row] = []
    for label in ("zstd-5", "zstd-1/1m", "lz4"):
        v = c["codecs"][label]
        rows.append(
            (
                f"codec {label} + bitshuffle, 1 thread",
                f"encode {v['encode_mb_s']:.0f} MB/s, decode {v['decode_mb_s']:.0f} MB/s, "
                f"ratio {v['ratio']:.3f}",
                "-",
                status(None),
            )
        )
    return rows


def archive_rows(a: dict[str, Any], quick: bool) -> list[Row]:
    """The metadata archive's dedup counts and query times."""
    q = a["steps"]["query"]
    d = a["steps"]["dedup"]["counts"]
    scale = "" if a["fraction_of_spectralearth"] == 1 else f" ({a['fraction_of_spectralearth']:.0%} scale)"
    worst = max(q["median_ms"]["bbox_datetime_cloud"], q["median_ms"]["id_lookup"]) / 1000
    return [
        (
            f"archive{scale}: patches / locations / multi",
            f"{d['patches']} / {d['locations']} / {d['multi_date_share']:.1%}",
            "~540k / ~415k / ~17.5%" if not quick else "-",
            status(None),
        ),
        (
            f"query over {q['items']} items (bbox+dt+cloud; id)",
            f"{q['median_ms']['bbox_datetime_cloud']:.0f} ms; {q['median_ms']['id_lookup']:.0f} ms "
            f"(naive scan {q['naive_bbox_query_s']:.1f} s)",
            f"< {GOALS['query_s']} s",
            status(worst < GOALS["query_s"] and q["same_result"]),
        ),
    ]


def summary_rows(results: dict[str, Any], quick: bool) -> list[Row]:
    """The console table: one row per measured goal, for the cases that ran."""
    rows: list[Row] = []
    if results.get("ratios", {}):
        rows += build_rows(results) + memory_and_read_rows(results)
    s3 = results.get("s3")
    if s3:
        rows += s3_rows(s3)
    if s3 and s3.get("build_gets_by_stage"):
        by_stage = ", ".join(f"{k} {v}" for k, v in s3["build_gets_by_stage"].items() if v)
        rows.append(("S3 build: product GETs by stage", by_stage or "none", "-", status(None)))
    c = results.get("codecs")
    if c:
        rows += codec_rows(c)
    a = results.get("archive")
    if a:
        rows += archive_rows(a, quick)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny products (smoke test), ~2 minutes")
    parser.add_argument("--out", type=Path, default=REPO / "build" / "bench" / "results.json")
    parser.add_argument("--cache", type=Path, default=BENCH / "cache", help="synthetic products cache")
    parser.add_argument("--work", type=Path, default=None, help="scratch builds (default: <cache>/work)")
    parser.add_argument("--naive-seconds", type=float, default=None, help="time budget of the naive case")
    parser.add_argument("--s3-timeout", type=float, default=None, help="stop the S3 build after this at most")
    parser.add_argument("--archive-scenes", type=int, default=None, help="scenes of the metadata archive")
    parser.add_argument("--skip-pixels", action="store_true", help="no builds (codecs and archive only)")
    parser.add_argument("--skip-archive", action="store_true", help="no metadata archive")
    parser.add_argument("--skip-s3", action="store_true", help="no S3 case")
    parser.add_argument("--no-profile", action="store_true", help="no profiled build")
    parser.add_argument("--keep", action="store_true", help="keep the largest local build")
    args = parser.parse_args()
    args.work = args.work or args.cache / ("work-quick" if args.quick else "work")
    if args.naive_seconds is None:
        args.naive_seconds = 10.0 if args.quick else 45.0
    if args.s3_timeout is None:
        args.s3_timeout = 600.0
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
    }
    if not args.skip_pixels:
        pixel_cases(args, results)
    codec_cases(args, results)
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
    if "codecs" in results:
        print()
        print(codec_bench.format_table(results["codecs"]))
    print(f"\n{results['elapsed_s']:.0f} s; results in {args.out}")


if __name__ == "__main__":
    main()
