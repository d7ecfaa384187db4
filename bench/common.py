"""Shared helpers of the benchmark scripts: timers, memory views, subprocess steps, the result table."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
MB = 1024 * 1024


def maxrss_bytes(who: int = resource.RUSAGE_SELF) -> int:
    """Peak resident set size (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(who).ru_maxrss * 1024


def current_rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


@contextmanager
def timed(into: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        into[name] = round(time.perf_counter() - start, 3)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


# Worker memory --------------------------------------------------------------------------------------
@dataclass
class ChildMemorySampler:
    """Samples the RSS of every descendant process (the LocalCluster's worker processes) in a thread.

    The pipeline's default scheduler starts a `dask.distributed` LocalCluster inside each stage call
    (one worker process per core, one thread each); those workers are children of this process. Peaks
    are kept per stage label and per process: `peak_per_worker[label]` is the largest RSS any single
    worker reached while that label was active. Sampling every `interval` s can miss a spike shorter
    than that; block-wise work (rows of a scene, shards) lasts far longer.
    """

    interval: float = 0.1
    label: str = "idle"
    peaks: dict[str, dict[int, int]] = field(default_factory=dict)
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> ChildMemorySampler:
        self._thread = threading.Thread(target=self._run, name="bench-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            label = self.label
            try:
                children = me.children(recursive=True)
            except psutil.Error:
                children = []
            for child in children:
                try:
                    if any("resource_tracker" in part for part in child.cmdline()):
                        continue
                    rss = child.memory_info().rss
                except psutil.Error:
                    continue
                per_pid = self.peaks.setdefault(label, {})
                per_pid[child.pid] = max(per_pid.get(child.pid, 0), rss)
            self.samples += 1
            self._stop.wait(self.interval)

    def peak_per_worker(self, label: str) -> int:
        return max(self.peaks.get(label, {}).values(), default=0)

    def workers_seen(self, label: str) -> int:
        return len(self.peaks.get(label, {}))


# Subprocess steps -------------------------------------------------------------------------------------
class StepTimedOut(RuntimeError):
    """A step ran past its time limit and was stopped (its whole process group)."""

    def __init__(self, script: str, seconds: float) -> None:
        super().__init__(f"{script} stopped after {seconds:.0f} s")
        self.seconds = seconds


def run_step(
    script: str,
    args: list[str],
    timeout: float | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run `python bench/<script> <args> --result FILE` and return the JSON it wrote; the step's own
    ru_maxrss (RUSAGE_SELF, measured in the child) is in the result, so each step's peak is its own.
    The step runs in its own session: past `timeout` its whole process group (the step and the
    LocalCluster workers it started) is stopped and StepTimedOut raised."""
    import signal
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        result_path = Path(handle.name)
    with tempfile.TemporaryFile("w+") as stderr:
        try:
            command = [sys.executable, str(BENCH / script), *args, "--result", str(result_path)]
            start = time.perf_counter()
            child = subprocess.Popen(
                command,
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
            try:
                returncode = child.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
                    try:
                        os.killpg(child.pid, sig)
                    except ProcessLookupError:
                        break
                    try:
                        child.wait(timeout=grace)
                        time.sleep(1.0)  # let the workers of the group go too
                    except subprocess.TimeoutExpired:
                        continue
                raise StepTimedOut(script, time.perf_counter() - start) from None
            wall = time.perf_counter() - start
            if returncode != 0:
                stderr.seek(0)
                raise RuntimeError(
                    f"{script} {' '.join(args)} failed ({returncode}):\n{stderr.read()[-4000:]}"
                )
            result = json.loads(result_path.read_text())
            result["subprocess_wall_s"] = round(wall, 3)
            return result
        finally:
            result_path.unlink(missing_ok=True)


def write_result(path: str | os.PathLike[str], result: dict[str, Any]) -> None:
    result = dict(result)
    result["maxrss_mb"] = round(maxrss_bytes() / MB, 1)
    Path(path).write_text(json.dumps(result, indent=2, default=str) + "\n")


# The table ----------------------------------------------------------------------------------------------
def table(rows: list[tuple[str, str, str, str]]) -> str:
    header = ("case", "measured", "goal", "status")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(4)]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)), line]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(out)
