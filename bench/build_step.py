"""One fresh build in its own process (run by bench/run.py): every stage, timings, memory.

Its own process because the pipeline keeps one LocalCluster per process for all stages (worker
processes start once): each build starts with fresh workers, and worker peaks of one build are not
carried into the next. The S3 build runs here too, with the server's endpoint in its environment.

Memory views written to the result:
- `peak_worker_rss_mb`: with a distributed scheduler, the largest RSS of any one worker process
  (psutil sampling of this process's children every 0.1 s), per stage and overall;
- `driver_maxrss_mb`: ru_maxrss of this process (for `--scheduler synchronous`, every task runs here,
  so this is the peak of the single "worker").
With `--profile N` (synchronous scheduler: every task in this process) the build runs under cProfile
and the result holds the N functions with the most own time and the N with the most cumulative time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
from pathlib import Path
from typing import Any

from common import MB, ChildMemorySampler, current_rss_bytes, maxrss_bytes, write_result
from pipeline_cases import run_build


def top_functions(profile: cProfile.Profile, count: int, key: str) -> list[dict[str, Any]]:
    stats = pstats.Stats(profile, stream=io.StringIO())
    rows = []
    for (filename, line, name), (_calls, ncalls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        short = "/".join(Path(filename).parts[-2:]) if filename != "~" else ""
        rows.append(
            {"function": f"{short}:{line}({name})", "calls": ncalls, "own_s": tottime, "cum_s": cumtime}
        )
    rows.sort(key=lambda r: -r[key])
    return [{**r, "own_s": round(r["own_s"], 3), "cum_s": round(r["cum_s"], 3)} for r in rows[:count]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--input", action="append", required=True, help="inventory input (repeatable)")
    parser.add_argument("--build", type=Path, required=True)
    parser.add_argument("--scheduler", default="local")
    parser.add_argument("--tag", default="build")
    parser.add_argument("--progress", type=Path, default=None)
    parser.add_argument("--profile", type=int, default=0, help="cProfile: how many functions to report")
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args()
    baseline = current_rss_bytes()
    profile = cProfile.Profile() if args.profile else None
    with ChildMemorySampler() as sampler:
        if profile is not None:
            profile.enable()
        result = run_build(
            args.manifest, args.input, args.build, sampler, args.tag, args.scheduler, args.progress
        )
        if profile is not None:
            profile.disable()
    if profile is not None:
        result["profile"] = {
            "by_own_time": top_functions(profile, args.profile, "own_s"),
            "by_cumulative_time": top_functions(profile, args.profile, "cum_s"),
        }
    result["scheduler"] = args.scheduler
    result["driver_baseline_rss_mb"] = round(baseline / MB, 1)
    result["driver_maxrss_mb"] = round(maxrss_bytes() / MB, 1)
    result["memory_samples"] = sampler.samples
    write_result(args.result, result)
    print(json.dumps({"wall_s": result["wall_s"]}))


if __name__ == "__main__":
    main()
