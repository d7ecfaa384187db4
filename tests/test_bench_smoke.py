"""Smoke test of the benchmark harness: `bench/run.py --quick` runs and writes every result key.

Only the harness is checked (it runs, the files it makes have the expected shape, its cross-checks
hold); no timing or ratio is asserted: those are measured by `make bench`, as ratios in one run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

TOP_LEVEL = {
    "meta",
    "products",
    "builds",
    "builds_synchronous",
    "floor",
    "naive",
    "read_side",
    "ratios",
    "memory",
    "archive",
    "summary",
    "elapsed_s",
}
STAGES = {"inventory", "mask", "tile", "dedup", "write", "catalog"}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_bench_writes_all_results(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    command = [
        sys.executable,
        str(REPO / "bench" / "run.py"),
        "--quick",
        "--out",
        str(out),
        "--cache",
        str(tmp_path / "cache"),
    ]
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=880)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "status" in completed.stdout  # the table was printed

    results = json.loads(out.read_text())
    assert TOP_LEVEL <= set(results)
    assert results["meta"]["mode"] == "quick"

    # end to end: every subset built through every stage, with per-stage records and memory
    assert set(results["builds"]) == {"1", "2"}
    for build in results["builds"].values():
        assert set(build["stages"]) == STAGES
        assert build["throughput"]["patches"] >= 0
        assert build["peak_worker_rss_mb"] > 0
        for stage in build["stages"].values():
            assert {"wall_s", "timings", "counts", "peak_worker_rss_mb"} <= set(stage)
    assert set(results["builds_synchronous"]) == {"1", "2"}
    assert all(s["driver_maxrss_mb"] > 0 for s in results["builds_synchronous"].values())

    # floor, naive and read side ran over the same patches as the largest build
    patches = results["builds"]["2"]["throughput"]["patches"]
    assert results["floor"]["patches"] == patches
    assert results["naive"]["patches_total"] == patches
    assert {"write_over_floor", "build_over_floor", "naive_over_build"} <= set(results["ratios"])
    assert {"peak_worker_rss_mb", "growth_largest_over_smallest", "time_per_scene_growth"} <= set(
        results["memory"]
    )
    assert {"zarr_ms_per_patch", "zarr_bytes_per_patch", "geotiff_bytes_per_patch"} <= set(
        results["read_side"]
    )

    # metadata archive: every step ran in its own process; search agrees with the naive scan
    archive = results["archive"]
    assert set(archive["per_step"]) == {"generate", "dedup", "catalog", "query"}
    assert archive["steps"]["dedup"]["counts"]["patches"] > 0
    assert archive["steps"]["catalog"]["items"] == archive["steps"]["dedup"]["counts"]["patches"]
    query = archive["steps"]["query"]
    assert query["same_result"] is True
    assert query["matched"] == query["naive_matched"]

    # the table: one row per case, each with a goal status
    assert {row["status"] for row in results["summary"]} <= {"met", "MISSED", "info"}
    cases = " ".join(row["case"] for row in results["summary"])
    for word in ("floor", "naive", "worker", "scene", "zarr", "query"):
        assert word in cases
