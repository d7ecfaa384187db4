"""The S3 case: the bench set on moto's standalone S3 server, built by the pipeline from there.

Measured in one run, against one server:
- `fetch_once_s`: each product's bytes (every object of it) fetched once with `pipeline.fetch`'s ranged
  GETs and its default settings (parts of 16 MiB, 4 in flight), one product after the other: what a
  reader that only transfers costs on this server (moto serves a ranged GET by reading the object, so
  its transfer time is the server's, not ours);
- the S3 build: the same `build_step.py` as the local builds, products read from `s3://` (the build
  location stays local, so only the reading differs), stopped once it has taken twice the goal's
  bound (fetch once + 1.5 x the local build; at least 60 s, at most `timeout`): it has missed by then;
- GETs per product, counted at the server from moto's request log (every client: GDAL, s3fs, boto),
  for the fetch and for the build separately, with the bytes each product holds.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common import MB, StepTimedOut, run_step
from products import BenchProduct

from pipeline.fetch import fetch_ranges

BUCKET = "enmap-products"
GETS_EXTRA = 2
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "bench-key",
    "AWS_SECRET_ACCESS_KEY": "bench-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# werkzeug's request log: 127.0.0.1 - - [date] "GET /bucket/key?query HTTP/1.1" 206 -
REQUEST_LINE = re.compile(r'"(?:\x1b\[[0-9;]*m)*([A-Z]+) (\S+) HTTP/[0-9.]+(?:\x1b\[[0-9;]*m)*" (\d{3})')


@contextlib.contextmanager
def moto_logged(log: Path) -> Iterator[str]:
    """moto's S3 server in its own process on 127.0.0.1, its request log going to `log`; yields the
    endpoint URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with log.open("w") as sink:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise RuntimeError("moto's S3 server did not start") from None
                    time.sleep(0.2)
            yield f"http://127.0.0.1:{port}"
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def requests_in(log: Path, start: int, stop: int | None = None) -> tuple[list[tuple[str, str]], int]:
    """(method, path) of every request logged between bytes `start` and `stop` (the end) of the log,
    and the offset read up to."""
    text = log.read_bytes()
    stop = len(text) if stop is None else stop
    found = [
        (m.group(1), m.group(2).split("?", 1)[0])
        for m in REQUEST_LINE.finditer(text[start:stop].decode(errors="replace"))
    ]
    return found, stop


class StageWatcher:
    """Polls the build's progress file every 0.1 s in a thread and notes the server log's size when the
    running stage changes: the requests between two marks are that stage's (to 0.1 s)."""

    def __init__(self, progress: Path, log: Path) -> None:
        self.progress, self.log = progress, log
        self.marks: list[tuple[str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-stages", daemon=True)

    def __enter__(self) -> StageWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        current: str | None = None
        while not self._stop.wait(0.1):
            try:
                running = json.loads(self.progress.read_text()).get("running") or ""
            except (OSError, ValueError):
                continue
            if running != current:
                current = running
                self.marks.append((running, self.log.stat().st_size))


def product_prefix(product: BenchProduct) -> str:
    """The key (file product) or key prefix (folder product) of a product in the bucket."""
    return product.truth.path + ("/" if product.container.is_dir() else "")


def gets_per_product(requests: list[tuple[str, str]], products: list[BenchProduct]) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for method, path in requests:
        if method != "GET" or not path.startswith(f"/{BUCKET}/"):
            continue
        key = path[len(BUCKET) + 2 :]
        for product in products:
            prefix = product_prefix(product)
            if key == prefix or (prefix.endswith("/") and key.startswith(prefix)):
                counts[product.scene_id] += 1
                break
        else:
            counts["(other)"] += 1
    return {p.scene_id: counts.get(p.scene_id, 0) for p in products} | (
        {"(other)": counts["(other)"]} if counts.get("(other)") else {}
    )


def upload_products(fs: Any, products: list[BenchProduct]) -> float:
    """Every product as delivered into the bucket (a folder product as its files); the seconds taken."""
    fs.mkdir(BUCKET)
    start = time.perf_counter()
    for product in products:
        target = f"{BUCKET}/{product.truth.path}"
        if product.container.is_dir():
            fs.put(str(product.container) + "/", target + "/", recursive=True)
        else:
            fs.put_file(str(product.container), target)
    return time.perf_counter() - start


def fetch_once(fs: Any, products: list[BenchProduct]) -> tuple[dict[str, Any], float]:
    """Each product's objects fetched once with pipeline.fetch, one product after the other: per product
    its kind, objects, bytes and fetch time, and the total seconds."""
    per_product: dict[str, Any] = {}
    fetch_total = 0.0
    for product in products:
        objects = {
            f"s3://{key}": int(info["size"])
            for key, info in fs.find(f"{BUCKET}/{product.truth.path}", detail=True).items()
        }
        began = time.perf_counter()
        for uri, size in objects.items():
            fetch_ranges(fs, uri, size)  # pipeline.fetch defaults: 16 MiB parts, 4 in flight
        seconds = time.perf_counter() - began
        fetch_total += seconds
        total = sum(objects.values())
        per_product[product.scene_id] = {
            "kind": product.kind,
            "objects": len(objects),
            "bytes": total,
            "fetch_once_s": round(seconds, 3),
            "fetch_MBps": round(total / MB / max(seconds, 1e-9), 1),
        }
    return per_product, fetch_total


def s3_build(
    command: list[str], progress: Path, timeout_s: float, env: dict[str, str], watcher: StageWatcher
) -> dict[str, Any]:
    """The build from s3:// under the watcher; when stopped or failed, the stages it finished, the one it
    was running, and after how long (or why it failed)."""
    out: dict[str, Any] = {}
    try:
        with watcher:
            result = run_step("build_step.py", command, timeout=timeout_s, env=env)
        out["build"] = result
        out["finished"] = True
    except (StepTimedOut, RuntimeError) as stopped:
        state = json.loads(progress.read_text()) if progress.exists() else {}
        out["build"] = {"stages": state.get("stages", {}), "running": state.get("running")}
        out["finished"] = False
        out["stopped_after_s"] = round(state.get("elapsed_s", 0.0), 1)
        if isinstance(stopped, StepTimedOut):
            out["stopped_after_s"] = round(stopped.seconds, 1)
        else:  # the build failed: its last line says why
            out["error"] = str(stopped).strip().splitlines()[-1][:500]
    return out


def gets_by_stage(
    log: Path, marks: list[tuple[str, int]], mark: int, end: int, products: list[BenchProduct]
) -> dict[str, int]:
    """GETs of product objects in each stage: the log between the offsets seen at stage changes."""
    spans = [(stage, offset) for stage, offset in marks if offset >= mark] + [("", end)]
    by_stage: dict[str, int] = {}
    for (stage, begin), (_, stop) in zip(spans, spans[1:], strict=False):
        if stage:
            during, _ = requests_in(log, begin, stop)
            by_stage[stage] = by_stage.get(stage, 0) + sum(gets_per_product(during, products).values())
    return by_stage


def run_s3_case(
    products: list[BenchProduct],
    manifest: Path,
    work: Path,
    local_build_s: float,
    timeout: float,
) -> dict[str, Any]:
    """The S3 case on one moto server: upload, fetch each product once, then the build from s3:// (stopped
    past twice the goal's bound, at most `timeout`), with the GETs of each phase counted per product."""
    import s3fs

    log = work / "moto.log"
    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"bucket": BUCKET, "build_location": "local (only the products are on S3)"}
    with moto_logged(log) as endpoint:
        fs = s3fs.S3FileSystem(
            key=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            secret=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            client_kwargs={"endpoint_url": endpoint},
        )
        out["upload_s"] = round(upload_products(fs, products), 3)

        _, mark = requests_in(log, 0)
        per_product, fetch_total = fetch_once(fs, products)
        fetched, mark = requests_in(log, mark)
        for scene_id, gets in gets_per_product(fetched, products).items():
            per_product.setdefault(scene_id, {})["fetch_gets"] = gets
        out["fetch_once_s"] = round(fetch_total, 3)

        env = CREDENTIALS | {"AWS_ENDPOINT_URL": endpoint, "SPECTRALEARTH_SCRATCH": str(work / "scratch")}
        progress = work / "s3-build-progress.json"
        build_dir = work / "build-s3"
        out["timeout_s"] = round(min(timeout, max(60.0, 2 * (fetch_total + 1.5 * local_build_s))), 1)
        watcher = StageWatcher(progress, log)
        command = ["--manifest", str(manifest), "--input", f"s3://{BUCKET}/", "--build", str(build_dir)]
        command += ["--scheduler", "local", "--tag", "s3", "--progress", str(progress)]
        out |= s3_build(command, progress, out["timeout_s"], env, watcher)
        built, end = requests_in(log, mark)
        out["build_gets_by_stage"] = gets_by_stage(log, watcher.marks, mark, end, products)
        for scene_id, gets in gets_per_product(built, products).items():
            entry = per_product.setdefault(scene_id, {})
            entry["build_gets"] = gets
            if "bytes" in entry:
                # issue 12's bound: at most its bytes / 8 MiB + a small constant (here: one per object + 2)
                entry["gets_bound"] = int(entry["bytes"] // (8 * MB)) + entry["objects"] + GETS_EXTRA
        out["requests_during_build"] = dict(Counter(m for m, _ in built))
    out["per_product"] = per_product
    out["build_dir"] = str(build_dir)
    return out
