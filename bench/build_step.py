"""One fresh build in its own process (run by bench/run.py): every stage, timings, memory.

Its own process because the pipeline keeps one LocalCluster per process for all stages (worker
processes start once): builds of 2, 4 and 8 scenes run in separate processes so each starts with fresh
workers, and worker peaks of one build are not carried into the next.

Memory views written to the result:
- `peak_worker_rss_mb`: with a distributed scheduler, the largest RSS of any one worker process
  (psutil sampling of this process's children every 0.1 s), per stage and overall;
- `driver_maxrss_mb`: ru_maxrss of this process (for `--scheduler synchronous`, every task runs here,
  so this is the peak of the single "worker").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import MB, ChildMemorySampler, current_rss_bytes, maxrss_bytes, write_result
from pipeline_cases import run_build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--scenes", type=Path, required=True, help="scene list file (inventory input)")
    parser.add_argument("--build", type=Path, required=True)
    parser.add_argument("--scheduler", default="local")
    parser.add_argument("--tag", default="build")
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args()
    baseline = current_rss_bytes()
    with ChildMemorySampler() as sampler:
        result = run_build(args.manifest, args.scenes, args.build, sampler, args.tag, args.scheduler)
    result["scheduler"] = args.scheduler
    result["scenes"] = len([line for line in args.scenes.read_text().splitlines() if line.strip()])
    result["driver_baseline_rss_mb"] = round(baseline / MB, 1)
    result["driver_maxrss_mb"] = round(maxrss_bytes() / MB, 1)
    result["memory_samples"] = sampler.samples
    write_result(args.result, result)
    print(json.dumps({"wall_s": result["wall_s"]}))


if __name__ == "__main__":
    main()
