"""Smoke test of the benchmark harness: `bench/run.py --quick` on tiny products, every case in one run.

No timing or ratio is asserted (those are measured by `make bench`, as ratios in one run); what is
asserted is that each case measured what it says: the floor encoded exactly the patches the build stored
from every product, with the fastest reader (numpy at byte offsets) for each packaging; the naive way
covered the same patches; the S3 build read every packaging from the server, counted its GETs per
product and produced the local build's dataset byte for byte; the codec table round-trips; the
metadata archive's search agrees with a naive scan.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.stages import ORDER

REPO = Path(__file__).resolve().parent.parent
STAGES = set(ORDER)
KINDS = {"folder/GTiff", "zip-deflated/BSQ", "zip-stored/GTiff", "targz/BIL"}


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    tmp_path = tmp_path_factory.mktemp("bench")
    out = tmp_path / "results.json"
    command = [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--out", str(out)]
    command += ["--cache", str(tmp_path / "cache")]
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return json.loads(out.read_text()), completed.stdout


pytestmark = [pytest.mark.slow, pytest.mark.timeout(1600)]


def test_builds_floor_and_naive_cover_the_same_patches(quick_results: tuple[dict, str]) -> None:
    results, _ = quick_results
    assert results["meta"]["mode"] == "quick"
    assert {p["kind"] for p in results["products"]["per_product"].values()} == KINDS
    assert set(results["builds"]) == {"2", "4"}
    for build in results["builds"].values():
        assert set(build["stages"]) == STAGES
        assert build["peak_worker_rss_mb"] > 0
    patches = results["builds"]["4"]["throughput"]["patches"]
    assert patches > 0
    floor = results["floor"]
    # the floor read every product once with numpy at byte offsets and encoded exactly the stored patches
    assert floor["patches"] == patches
    assert {s["kind"] for s in floor["per_scene"]} <= KINDS
    assert all(s["reader"] == "raw_reader" for s in floor["per_scene"])
    assert floor["encoded_bytes"] > 0
    assert results["naive"]["patches_total"] == patches
    ratios = results["ratios"]
    assert ratios["build_over_floor"] == pytest.approx(ratios["build_s"] / ratios["floor_s"], rel=1e-2)
    assert ratios["write_over_floor"] == pytest.approx(ratios["write_s"] / ratios["floor_s"], rel=1e-2)


def test_s3_build_reads_every_packaging_and_equals_the_local_build(quick_results: tuple[dict, str]) -> None:
    results, _ = quick_results
    s3 = results["s3"]
    assert s3["finished"], s3.get("error") or f"stopped in {s3['build']['running']}"
    assert s3["same_dataset_as_local"] is True
    per_product = s3["per_product"]
    assert {v["kind"] for v in per_product.values()} == KINDS
    for entry in per_product.values():
        # the fetch made at least one GET per object, and the build read every product from the server
        assert entry["fetch_gets"] >= entry["objects"] >= 1
        assert entry["build_gets"] >= 1
    assert sum(s3["build_gets_by_stage"].values()) == sum(v["build_gets"] for v in per_product.values())
    assert s3["fetch_once_s"] > 0
    assert s3["goal_bound_s"] == pytest.approx(s3["fetch_once_s"] + 1.5 * s3["local_build_s"], rel=1e-3)


def test_profile_codecs_archive_and_table(quick_results: tuple[dict, str]) -> None:
    results, stdout = quick_results
    profile = results["profile"]
    assert set(profile["stage_wall_s"]) == STAGES
    assert profile["by_cumulative_time"] and profile["by_own_time"]
    codecs = results["codecs"]["codecs"]
    assert {"zstd-5", "zstd-1/1m", "lz4"} <= set(codecs)
    assert all(v["ratio"] > 1 and v["encode_mb_s"] > 0 and v["decode_mb_s"] > 0 for v in codecs.values())

    archive = results["archive"]
    assert set(archive["per_step"]) == {"generate", "dedup", "catalog", "query"}
    assert archive["steps"]["catalog"]["items"] == archive["steps"]["dedup"]["counts"]["patches"] > 0
    query = archive["steps"]["query"]
    assert query["same_result"] is True
    assert query["matched"] == query["naive_matched"]

    # the table: one row per goal, each marked met / MISSED, printed too
    assert {row["status"] for row in results["summary"]} <= {"met", "MISSED", "info"}
    goals = {row["case"] for row in results["summary"] if row["status"] != "info"}
    for case in ("whole build / floor", "write / floor", "peak MB per worker"):
        assert case in goals
    assert any(case.startswith("S3 build") for case in goals)
    assert any(case.startswith("query over") for case in goals)
    assert "whole build / floor" in stdout and "status" in stdout
