"""Packaging: a product's folder, ZIP, DLR tar.gz delivery or ARD folder, moved into place whole."""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pipeline.enmap.synth.config import STAGING
from pipeline.enmap.synth.metadata import history_xml, metadata_xml
from pipeline.enmap.synth.plan import Plan, Product
from pipeline.enmap.synth.rasters import WrittenRasters, write_rasters


def _zip_time(t: datetime) -> tuple[int, int, int, int, int, int]:
    t = t.astimezone(UTC)
    return (max(1980, t.year), t.month, t.day, t.hour, t.minute, t.second - t.second % 2)


def _write_zip(folder: Path, name: str, target: Path, when: datetime, level: int) -> None:
    tmp = target.with_name(target.name + ".partial")
    stamp = _zip_time(when)
    method = zipfile.ZIP_DEFLATED if level > 0 else zipfile.ZIP_STORED
    with zipfile.ZipFile(tmp, "w", compression=method, compresslevel=level or None) as zf:
        d = zipfile.ZipInfo(f"{name}/", date_time=stamp)
        d.create_system = 3
        d.external_attr = (0o40755 << 16) | 0x10
        zf.writestr(d, b"")
        for f in sorted(folder.iterdir()):
            info = zipfile.ZipInfo(f"{name}/{f.name}", date_time=stamp)
            info.create_system = 3
            info.external_attr = 0o100644 << 16
            info.compress_type = method
            info._compresslevel = level or None  # type: ignore[attr-defined]  # else zipfile's default
            size = f.stat().st_size
            with open(f, "rb") as src, zf.open(info, "w", force_zip64=size > 2**31) as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
    os.replace(tmp, target)


def _write_targz(zip_path: Path, delivery: str, target: Path, when: datetime) -> str:
    member = f"{delivery}/ENMAP.HSI.L2A/{zip_path.name}"
    mtime = int(when.timestamp())
    tmp = target.with_name(target.name + ".partial")
    with (
        open(tmp, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=mtime, compresslevel=1) as gz,
    ):
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for d in (delivery, f"{delivery}/ENMAP.HSI.L2A"):
                ti = tarfile.TarInfo(d)
                ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, mtime
                ti.uname = ti.gname = "enmap"
                tar.addfile(ti)
            ti = tarfile.TarInfo(member)
            ti.size, ti.mode, ti.mtime = zip_path.stat().st_size, 0o644, mtime
            ti.uname = ti.gname = "enmap"
            with open(zip_path, "rb") as f:
                tar.addfile(ti, f)
    os.replace(tmp, target)
    return member


@contextlib.contextmanager
def removed_afterwards(path: Path) -> Iterator[None]:
    try:
        yield
    finally:
        remove_path(path)


def remove_path(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


@dataclass(frozen=True)
class PackagedProduct:
    """One product as delivered: its container relative to the output folder and what it holds."""

    path: str  # folder, .ZIP or .tar.gz
    member: str | None  # the inner ZIP's path in a tar.gz, else None
    files: tuple[str, ...]  # basenames in the product
    written: WrittenRasters


def write_product(plan: Plan, p: Product, out: Path) -> PackagedProduct:
    """Write the product's files in a staging folder, then move or pack them into place whole."""
    stage = out / STAGING / p.name
    remove_path(stage)
    stage.mkdir(parents=True)
    written, files = _write_files(plan, p, stage)
    path, member = _package(plan, p, stage, out)
    return PackagedProduct(path, member, tuple(sorted(files)), written)


def _write_files(plan: Plan, p: Product, stage: Path) -> tuple[WrittenRasters, dict[str, int]]:
    """Rasters, HISTORY.XML and METADATA.XML (which lists every file, itself included)."""
    name = p.name
    written = write_rasters(plan, p, stage)
    xml_extension = plan.config.ard_metadata_extension if p.packaging == "ard" else "XML"
    history_name = f"{name}-HISTORY.{xml_extension}"
    meta_name = f"{name}-METADATA.{xml_extension}"
    history = history_xml(p)
    (stage / history_name).write_bytes(history)
    files = dict(written.files)
    files[history_name] = len(history)
    meta_size = 0
    for _ in range(8):  # the metadata lists its own size: iterate to a fixed point
        xml = metadata_xml(plan, p, written, files, meta_name, meta_size)
        if len(xml) == meta_size:
            break
        meta_size = len(xml)
    (stage / meta_name).write_bytes(xml)
    files[meta_name] = len(xml)
    return written, files


def _package(plan: Plan, p: Product, stage: Path, out: Path) -> tuple[str, str | None]:
    """Move the staged folder into place, or pack it as a ZIP or a DLR tar.gz delivery:
    (path relative to `out`, tar.gz member or None)."""
    name, level = p.name, plan.config.zip_compresslevel
    if p.packaging in ("folder", "ard"):
        target = out / name
        remove_path(target)
        os.replace(stage, target)
        return name, None
    if p.packaging == "zip":
        target = out / f"{name}.ZIP"
        _write_zip(stage, name, target, p.processing_time, level)
        shutil.rmtree(stage)
        return target.name, None
    delivery = f"dims_op_oc_oc-en_{p.order_number:09d}_1"
    scratch = out / STAGING / f"{name}.zipdir"
    remove_path(scratch)
    scratch.mkdir()
    inner = scratch / f"{name}.ZIP"
    _write_zip(stage, name, inner, p.processing_time, level)
    shutil.rmtree(stage)
    target = out / f"{delivery}.tar.gz"
    member = _write_targz(inner, delivery, target, p.processing_time + timedelta(hours=5))
    shutil.rmtree(scratch)
    return target.name, member
