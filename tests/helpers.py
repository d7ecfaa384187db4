"""Test helpers: synthetic products made once per session, and independent readers of them.

The readers here open products with zipfile/tarfile/rasterio directly, never with pipeline code, so
tests compare the pipeline against an independent reading of the source.
"""

from __future__ import annotations

import os
import tarfile
import zipfile
from pathlib import Path

from pipeline.enmap.synth import ProductTruth


def spectral_gdal_path(products_dir: Path, product: ProductTruth, scratch: Path) -> str:
    """GDAL path of a synthetic product's spectral image, found with zipfile/tarfile and globbing."""
    container = products_dir / product.path
    if product.packaging in ("folder", "ard"):
        (match,) = [
            p for p in container.iterdir() if "-SPECTRAL_IMAGE" in p.name and not p.name.endswith(".HDR")
        ]
        return str(match)
    if product.packaging == "targz":
        local_zip = scratch / f"{product.scene_id}.ZIP"
        if not local_zip.exists():
            with tarfile.open(container) as tar:
                member = tar.getmember(product.member)
                stream = tar.extractfile(member)
                assert stream is not None
                local_zip.write_bytes(stream.read())
        container = local_zip
    with zipfile.ZipFile(container) as archive:
        (member,) = [
            n for n in archive.namelist() if "-SPECTRAL_IMAGE" in n and not n.upper().endswith(".HDR")
        ]
    return f"/vsizip/{os.path.abspath(container)}/{member}"
