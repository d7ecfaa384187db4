"""Scratch space for what a product unpacks, and the budget it stays within.

Scratch folders are `<SPECTRALEARTH_SCRATCH or the system temp folder>/spectralearth-scratch-*`, each
with an owner file naming the host, pid and process start time of the task that made it, so the scratch
a killed task left behind is removed at the next start (`clean_stale_scratch`, called by `discover` and
`open_product`). `ScratchBudget` is what one opened product may still unpack (`limits.scratch_bytes`).

Beside them, `spectralearth-zipcache/` holds the inner ZIPs of tar.gz deliveries that inventory
unpacked, for mask on the same machine to take instead of inflating the delivery again: each moved
in by an atomic rename under its key (the delivery's URI, size and modification stamp), size and
CRC-32; the least recently kept evicted so the folder never holds more than `limits.scratch_bytes`
(nor half the disk space it could have);
taken (moved into the taking task's scratch folder) by exactly one task; removed by the stale
cleaning when not taken within `ZIP_CACHE_AGE_S`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
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
    return removed + clean_stale_zip_cache(base)


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


# The inner ZIPs of tar.gz deliveries that inventory unpacked, kept for mask (`keep_inner_zip`,
# `claim_inner_zip`): `<scratch base>/spectralearth-zipcache/<key>-<size>-<crc32>.zip`.
ZIP_CACHE = "spectralearth-zipcache"


# A kept inner ZIP not claimed within this time is stale (its build moved on, or mask runs elsewhere).
ZIP_CACHE_AGE_S = 6 * 3600.0


@dataclass(frozen=True)
class KeptZip:
    """A kept inner ZIP claimed by a task: its path (now in the task's scratch folder) and what was
    recorded when it was kept (its declared size and CRC-32, to verify it before use)."""

    path: str
    size: int
    crc: int


def zip_cache_dir(base: str | None = None) -> str:
    return os.path.join(base or scratch_base(), ZIP_CACHE)


def inner_zip_key(container_uri: str, inner_zip: str, stamp: str) -> str:
    """The cache key of a delivery's inner ZIP: the delivery and its size + modification stamp, so a
    replaced delivery never finds the ZIP of the one before."""
    return hashlib.sha256("\n".join((container_uri, inner_zip, stamp)).encode()).hexdigest()[:32]


@contextlib.contextmanager
def _cache_locked(cache: str) -> Iterator[None]:
    """Exclusive use of the cache folder across processes (eviction and insertion stay in budget)."""
    os.makedirs(cache, exist_ok=True)
    with open(os.path.join(cache, ".lock"), "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _cache_entries(cache: str) -> list[tuple[float, str, int]]:
    """The kept ZIPs: (last use, path, bytes), least recently used first."""
    entries = []
    for entry in os.scandir(cache):
        if entry.name.endswith(".zip") and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                stat = entry.stat(follow_symlinks=False)
                entries.append((stat.st_mtime, entry.path, stat.st_size))
    return sorted(entries)


def keep_inner_zip(path: str, key: str, crc: int, limit: int, base: str | None = None) -> bool:
    """Move an unpacked inner ZIP (a file in a scratch folder, so on the same file system) into the
    cache under `key`, evicting the least recently kept ZIPs so the cache never holds more than
    `limit` bytes, nor more than half the disk space it could have; False (and the file stays where it
    is) when it alone is over that."""
    size = os.path.getsize(path)
    if size > limit:
        return False
    cache = zip_cache_dir(base)
    with _cache_locked(cache):
        entries = _cache_entries(cache)
        held = sum(entry_size for _, _, entry_size in entries)
        # Never more than half of the space the disk would have without the cache: the stages' own
        # unpacks and outputs keep the other half.
        room = min(limit, (shutil.disk_usage(cache).free + held) // 2)
        if size > room:
            return False
        for _, old, old_size in entries:
            if held + size <= room:
                break
            with contextlib.suppress(FileNotFoundError):
                os.remove(old)
            held -= old_size
        # Renamed in place under its final name: the rename is atomic, a reader never sees half a file.
        target = os.path.join(cache, f"{key}-{size}-{crc:08x}.zip")
        os.replace(path, target)
        os.utime(target)  # its last use, for eviction and the stale check
    return True


def claim_inner_zip(key: str, folder: str, base: str | None = None) -> KeptZip | None:
    """Take the inner ZIP kept under `key` out of the cache into `folder` (a task's scratch folder, so
    it goes with that folder), or None when none is kept here. The caller verifies it."""
    cache = zip_cache_dir(base)
    if not os.path.isdir(cache):
        return None
    with _cache_locked(cache):
        for _, path, _ in _cache_entries(cache):
            name = os.path.basename(path)[: -len(".zip")]
            parts = name.split("-")
            if len(parts) != 3 or parts[0] != key:
                continue
            try:
                size, crc = int(parts[1]), int(parts[2], 16)
            except ValueError:
                continue
            target = os.path.join(folder, "kept.zip")
            os.replace(path, target)
            return KeptZip(target, size, crc)
    return None


def clean_stale_zip_cache(base: str | None = None, max_age_s: float = ZIP_CACHE_AGE_S) -> list[str]:
    """Remove kept inner ZIPs older than `max_age_s` (and staging files left by a killed task)."""
    cache = zip_cache_dir(base)
    if not os.path.isdir(cache):
        return []
    removed = []
    now = time.time()
    with _cache_locked(cache):
        for entry in os.scandir(cache):
            if entry.name == ".lock":
                continue
            with contextlib.suppress(FileNotFoundError):
                if now - entry.stat(follow_symlinks=False).st_mtime > max_age_s:
                    os.remove(entry.path)
                    removed.append(entry.path)
    return removed
