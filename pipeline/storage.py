"""Where a build lives (a local folder or an `s3://` prefix): paths, atomic writes, stage records.

Everything goes through fsspec, so the same code serves local disks and object stores. A write is
atomic for readers: locally a temporary file renamed into place, on S3 a single PUT.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import posixpath
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from typing import Any

import fsspec
import geopandas
import pyarrow as pa
import pyarrow.parquet as pq
import rasterio
from fsspec.implementations.local import LocalFileSystem

from pipeline import __version__, tables
from pipeline.errors import is_transient

STAGES_DIR = tables.STAGES_DIR


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def gdal_path(uri: str) -> str:
    """The path GDAL opens for `uri`: `/vsis3/bucket/key` for S3, an absolute path locally."""
    if uri.startswith("s3://"):
        return "/vsis3/" + uri.removeprefix("s3://")
    if uri.startswith("file://"):
        uri = uri.removeprefix("file://")
    if is_remote(uri):
        raise ValueError(f"no GDAL virtual file system for {uri!r}")
    return os.path.abspath(uri)


def join(base: str, *parts: str) -> str:
    """Join URI or path parts with `/` (object stores have no OS separator)."""
    return posixpath.join(base.rstrip("/"), *parts) if parts else base


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def fingerprint_of(value: Any) -> str:
    """Short stable fingerprint of a JSON-able value (SHA-256 of its canonical JSON)."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()[:16]


@dataclass
class BuildStore:
    """A build location. Relative paths (`inventory/scenes.parquet`) are resolved under `uri`."""

    uri: str
    storage_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.uri = self.uri.rstrip("/") or "/"
        fs, root = fsspec.core.url_to_fs(self.uri, **dict(self.storage_options))
        self.fs: fsspec.AbstractFileSystem = fs
        self.root: str = root

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def path(self, relative: str) -> str:
        return posixpath.join(self.root, relative)

    def uri_of(self, relative: str) -> str:
        return join(self.uri, relative)

    def exists(self, relative: str) -> bool:
        return bool(self.fs.exists(self.path(relative)))

    def read_bytes(self, relative: str) -> bytes:
        return bytes(_retrying(self.fs.cat_file, self.path(relative)))

    def cat_many(self, paths: list[str]) -> dict[str, bytes]:
        """Several objects at once (full paths as `path()` gives them): concurrent GETs on S3."""
        if not paths:
            return {}
        found = _retrying(self.fs.cat, paths, on_error="omit")
        # fsspec may return keys without the protocol; map them back to the paths asked for.
        by_stripped = {self.fs._strip_protocol(p): p for p in paths}
        return {by_stripped.get(self.fs._strip_protocol(k), k): bytes(v) for k, v in found.items()}

    def write_bytes(self, relative: str, data: bytes) -> None:
        _retrying(self._write_bytes, relative, data)

    def _write_bytes(self, relative: str, data: bytes) -> None:
        target = self.path(relative)
        if self.is_local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            temporary = f"{target}.tmp-{uuid.uuid4().hex}"
            try:
                with open(temporary, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(temporary, target)
            finally:
                if os.path.exists(temporary):
                    os.remove(temporary)
        else:
            self.fs.pipe_file(target, data)

    def read_json(self, relative: str) -> Any:
        return json.loads(self.read_bytes(relative))

    def write_json(self, relative: str, value: Any) -> None:
        self.write_bytes(relative, (json.dumps(value, indent=2, sort_keys=True, default=str) + "\n").encode())

    def write_table(self, relative: str, table: pa.Table) -> None:
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        self.write_bytes(relative, buffer.getvalue())

    def read_table(self, relative: str) -> pa.Table:
        return pq.read_table(io.BytesIO(self.read_bytes(relative)))

    def write_geodataframe(self, relative: str, frame: Any) -> None:
        buffer = io.BytesIO()
        frame.to_parquet(buffer, compression="zstd", index=False)
        self.write_bytes(relative, buffer.getvalue())

    def read_geodataframe(self, relative: str) -> Any:
        return geopandas.read_parquet(io.BytesIO(self.read_bytes(relative)))

    # Stage records -------------------------------------------------------------------------------
    def stage_record_path(self, stage: str) -> str:
        return tables.stage_record(stage)

    def read_stage_record(self, stage: str) -> dict[str, Any] | None:
        """The stage's record, or None when there is none or it cannot be trusted (not JSON, not an
        object with a config hash): the stage then runs again."""
        relative = self.stage_record_path(stage)
        if not self.exists(relative):
            return None
        try:
            record = self.read_json(relative)
        except ValueError:  # JSONDecodeError, UnicodeDecodeError
            print(f"{stage}: its stage record {relative} is unreadable; the stage runs again")
            return None
        return record if isinstance(record, dict) and "config_hash" in record else None

    def write_stage_record(self, record: StageRecord) -> None:
        self.write_json(self.stage_record_path(record.stage), record.to_json())

    def up_to_date(
        self,
        stage: str,
        config_hash: str,
        input_fingerprint: str,
        outputs: tuple[str, ...],
        force: bool = False,
    ) -> dict[str, Any] | None:
        """The stage's record when its outputs exist and were made from these inputs with this
        configuration (a rerun then does no work); None when the stage has to run."""
        previous = self.read_stage_record(stage)
        if (
            force
            or previous is None
            or previous["config_hash"] != config_hash
            or previous["input_fingerprint"] != input_fingerprint
            or not all(self.exists(output) for output in outputs)
        ):
            return None
        return previous


# Reads and writes of the build location ride out a brief outage of the store (a restarting S3
# endpoint, a full disk being cleaned): transient faults are retried with backoff, others raised at once.
STORE_RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


def _retrying(function: Any, *args: Any, **kwargs: Any) -> Any:
    for delay in (*STORE_RETRY_DELAYS, None):
        try:
            return function(*args, **kwargs)
        except FileNotFoundError:
            raise
        except Exception as exc:
            if delay is None or not is_transient(exc):
                raise
            time.sleep(delay)
    raise AssertionError("unreachable")


def listing_fingerprint(store: BuildStore, folder: str) -> str:
    """Every file under `folder` by name, size and modification stamp (ETag on S3, mtime locally), from
    one listing: any file removed, added or rewritten since changes it, and no file is read for it."""
    root = store.path(folder)
    listing = store.fs.find(root, detail=True) if store.fs.exists(root) else {}
    entries = sorted(
        (
            posixpath.relpath(path, root),
            int(info.get("size") or 0),
            str(info.get("ETag") or info.get("mtime") or info.get("LastModified") or ""),
        )
        for path, info in listing.items()
    )
    return fingerprint_of(entries)


def software_versions() -> dict[str, str]:
    versions = {
        "pipeline": __version__,
        "python": platform.python_version(),
        "gdal": rasterio.__gdal_version__,
    }
    for package in ("numpy", "rasterio", "pyarrow", "dask", "zarr", "geopandas"):
        try:
            versions[package] = version(package)
        except Exception:  # a package that is not installed is simply not recorded
            continue
    return versions


@dataclass
class StageRecord:
    """`_stages/<stage>.json`: what a stage did, with which configuration and inputs."""

    stage: str
    config_hash: str
    input_fingerprint: str
    counts: dict[str, Any]
    timings: dict[str, float]
    versions: dict[str, str] = field(default_factory=software_versions)
    completed_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    # Fingerprint of the listing of the stage's own files when it finished (`listing_fingerprint`), for
    # stages whose outputs are many files: a rerun checks them with one listing instead of reading them.
    outputs: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "config_hash": self.config_hash,
            "input_fingerprint": self.input_fingerprint,
            "counts": self.counts,
            "timings": self.timings,
            "versions": self.versions,
            "completed_at": self.completed_at,
            "outputs": self.outputs,
        }


class Stopwatch:
    """Named wall-clock timings for a stage record."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._start = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self._start, 3)
        self._start = now
