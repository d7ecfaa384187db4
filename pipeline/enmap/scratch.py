"""Scratch space for what a product unpacks, and the budget it stays within.

Scratch folders are `<SPECTRALEARTH_SCRATCH or the system temp folder>/spectralearth-scratch-*`, each
with an owner file naming the host, pid and process start time of the task that made it, so the scratch
a killed task left behind is removed at the next start (`clean_stale_scratch`, called by `discover` and
`open_product`). `ScratchBudget` is what one opened product may still unpack (`limits.scratch_bytes`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psutil

from pipeline.enmap.product_errors import ProductError, format_size, over_budget

# Scratch folders are `<SPECTRALEARTH_SCRATCH or the system temp folder>/spectralearth-scratch-*`,
# each with an owner file naming the host, pid and process start time of the task that made it.
SCRATCH_PREFIX = "spectralearth-scratch-"


SCRATCH_OWNER = "owner.json"


# A scratch folder without a readable owner file (its task was killed between creating it and
# writing the file) is stale once it is this old.
UNOWNED_SCRATCH_AGE_S = 600.0


@dataclass
class ScratchBudget:
    """What one opened product may still unpack to scratch (`limits.scratch_bytes` in all)."""

    limit: int
    used: int = 0

    def reserve(self, size: int, what: str) -> None:
        if self.used + size > self.limit:
            already = f" ({format_size(self.used)} of it already unpacked)" if self.used else ""
            raise ProductError(over_budget(what, "unpacks to", size, self.limit, "scratch") + already)
        self.used += size


def scratch_base() -> str:
    """Where scratch folders live: `SPECTRALEARTH_SCRATCH`, else the system's temporary folder."""
    return os.environ.get("SPECTRALEARTH_SCRATCH") or tempfile.gettempdir()


def _process_start(pid: int) -> float | None:
    """The start time of a live process, None when there is none with that pid."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return float(process.create_time())
    except psutil.NoSuchProcess:
        return None
    except psutil.AccessDenied:
        return -1.0  # it exists, we may not look at it: alive


def _owner_alive(owner: dict[str, Any]) -> bool:
    started = _process_start(int(owner["pid"]))
    if started is None:
        return False
    # A pid reused by a later process is not the owner (start times agree to well within a second).
    return started < 0 or abs(started - float(owner["started"])) < 1.0


def clean_stale_scratch(base: str | None = None) -> list[str]:
    """Remove the scratch folders whose owning process (on this host) is gone; returns their paths.

    Cheap (one listing of the scratch folder): called at the start of `discover` and `open_product`,
    so the scratch of a killed task is removed by the next task on the machine.
    """
    base = base or scratch_base()
    try:
        entries = list(os.scandir(base))
    except FileNotFoundError:
        return []
    host = socket.gethostname()
    removed = []
    for entry in sorted(entries, key=lambda e: e.name):
        if not entry.name.startswith(SCRATCH_PREFIX) or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            with open(os.path.join(entry.path, SCRATCH_OWNER), encoding="utf-8") as handle:
                owner = json.load(handle)
            stale = owner["host"] == host and not _owner_alive(owner)
        except FileNotFoundError:
            try:
                stale = time.time() - entry.stat(follow_symlinks=False).st_mtime > UNOWNED_SCRATCH_AGE_S
            except FileNotFoundError:
                continue  # removed meanwhile by another cleaner or its owner
        except (ValueError, KeyError, TypeError):
            stale = time.time() - entry.stat(follow_symlinks=False).st_mtime > UNOWNED_SCRATCH_AGE_S
        if stale:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    return removed


@contextlib.contextmanager
def scratch_dir() -> Iterator[str]:
    base = scratch_base()
    os.makedirs(base, exist_ok=True)
    path = tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=base)
    try:
        owner = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": _process_start(os.getpid()),
        }
        staging = os.path.join(path, SCRATCH_OWNER + ".tmp")
        with open(staging, "w", encoding="utf-8") as handle:
            json.dump(owner, handle)
        os.replace(staging, os.path.join(path, SCRATCH_OWNER))
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
