"""Raster writers: GeoTIFF, COG (via a temporary GeoTIFF) and ENVI with an upper-case `.HDR`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
import rasterio.windows
from affine import Affine
from pyproj import CRS

from pipeline.enmap.synth.config import GRID_OFFSET, PIXEL
from pipeline.enmap.synth.plan import Plan, Product


class RasterSink:
    """One raster layer being written, in GTiff, COG (via a temporary GTiff) or ENVI."""

    def __init__(
        self,
        path: Path,
        fmt: str,
        count: int,
        dtype: str,
        plan: Plan,
        p: Product,
        nodata: float | None,
        interleave: str,
        descriptions: Sequence[str] = (),
        wavelengths: np.ndarray | None = None,
        fwhm: np.ndarray | None = None,
        compress: str | None = None,
    ):
        self.path, self.fmt, self.count, self.dtype = path, fmt, count, np.dtype(dtype)
        self.width, self.height = plan.config.width, plan.config.height
        self.interleave = interleave
        self.epsg = p.datatake.site.epsg
        self.x0, self.y0 = GRID_OFFSET + PIXEL * p.kx, GRID_OFFSET + PIXEL * p.ky
        self.transform = Affine(PIXEL, 0.0, self.x0, 0.0, -PIXEL, self.y0)
        self.nodata = nodata
        self.descriptions, self.wavelengths, self.fwhm = descriptions, wavelengths, fwhm
        if fmt == "ENVI":
            self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
            self._file.truncate(self.width * self.height * count * self.dtype.itemsize)
        else:
            self._tmp = path.with_name(path.name + ".tmp.tif") if fmt == "COG" else path
            opts: dict[str, Any] = {"tiled": False, "interleave": "band"}
            if compress:
                opts["compress"] = compress
            if fmt == "COG":
                opts = {"tiled": True, "blockxsize": 256, "blockysize": 256, "interleave": "band"}
            self._ds = rasterio.open(
                self._tmp,
                "w",
                driver="GTiff",
                width=self.width,
                height=self.height,
                count=count,
                dtype=dtype,
                crs=CRS.from_epsg(self.epsg),
                transform=self.transform,
                nodata=nodata,
                **opts,
            )

    def write_rows(self, row0: int, cube: np.ndarray) -> None:
        """cube: (rows, W, count) pixel-major."""
        rows = cube.shape[0]
        if self.fmt != "ENVI":
            self._ds.write(
                np.ascontiguousarray(cube.transpose(2, 0, 1)),
                window=rasterio.windows.Window(0, row0, self.width, rows),
            )
            return
        isz = self.dtype.itemsize
        f = self._file
        if self.interleave == "bip":
            f.seek(row0 * self.width * self.count * isz)
            f.write(np.ascontiguousarray(cube, dtype=self.dtype.newbyteorder("<")).tobytes())
        elif self.interleave == "bil":
            f.seek(row0 * self.width * self.count * isz)
            f.write(
                np.ascontiguousarray(cube.transpose(0, 2, 1), dtype=self.dtype.newbyteorder("<")).tobytes()
            )
        else:
            for b in range(self.count):
                f.seek((b * self.height + row0) * self.width * isz)
                f.write(np.ascontiguousarray(cube[:, :, b], dtype=self.dtype.newbyteorder("<")).tobytes())

    def write_band(self, band: int, array: np.ndarray) -> None:
        """band: 1-based; array (H, W)."""
        if self.fmt != "ENVI":
            self._ds.write(array.astype(self.dtype), band)
            return
        if self.interleave != "bsq":
            raise ValueError("band-wise ENVI writing needs BSQ")
        self._file.seek((band - 1) * self.height * self.width * self.dtype.itemsize)
        self._file.write(np.ascontiguousarray(array, dtype=self.dtype.newbyteorder("<")).tobytes())

    def write(self, array: np.ndarray) -> None:
        """array (count, H, W)."""
        for b in range(array.shape[0]):
            self.write_band(b + 1, array[b])

    def close(self) -> None:
        if self.fmt == "ENVI":
            self._file.close()
            self._write_header()
            return
        self._ds.close()
        if self.fmt == "COG":
            # No overviews: GDAL 3.10 needs minutes and ~1 GB to build them for a 224-band pixel-interleaved
            # COG (the pipeline never reads them). 256 px blocks bound the copy's swath to ~150 MB.
            rasterio.shutil.copy(
                self._tmp,
                self.path,
                driver="COG",
                COMPRESS="DEFLATE",
                PREDICTOR="YES",
                BLOCKSIZE="256",
                OVERVIEWS="NONE",
            )
            self._tmp.unlink()

    def _write_header(self) -> None:
        dtype_code = {np.dtype("int16"): 2, np.dtype("uint8"): 1}[self.dtype]
        zone = self.epsg % 100
        hemi = "North" if self.epsg < 32700 else "South"
        wkt = CRS.from_epsg(self.epsg).to_wkt("WKT1_ESRI")
        lines = [
            "ENVI",
            f"description = {{{self.path.stem}}}",
            f"samples = {self.width}",
            f"lines = {self.height}",
            f"bands = {self.count}",
            "header offset = 0",
            "file type = ENVI Standard",
            f"data type = {dtype_code}",
            f"interleave = {self.interleave}",
            "byte order = 0",
            f"map info = {{UTM, 1, 1, {self.x0:.1f}, {self.y0:.1f}, {PIXEL:.1f}, {PIXEL:.1f}, "
            f"{zone}, {hemi}, WGS-84, units=Meters}}",
            f"coordinate system string = {{{wkt}}}",
        ]
        if self.nodata is not None:
            lines.append(f"data ignore value = {int(self.nodata)}")
        if self.descriptions:
            lines.append("band names = {" + ", ".join(self.descriptions) + "}")
        if self.wavelengths is not None and self.fwhm is not None:
            lines.append("wavelength units = Nanometers")
            lines.append("wavelength = {" + ", ".join(f"{v:g}" for v in self.wavelengths) + "}")
            lines.append("fwhm = {" + ", ".join(f"{v:g}" for v in self.fwhm) + "}")
            lines.append("reflectance scale factor = 10000")
        hdr = self.path.with_suffix(".HDR")
        hdr.write_text("\n".join(lines) + "\n", encoding="ascii", newline="\n")


def layer_file(name: str, layer: str, p: Product) -> tuple[str, str, str]:
    """(file name, sink format, interleave) of a raster layer."""
    if p.packaging == "ard":
        return f"{name}-{layer}_COG.{p.ard_raster_extension}", "COG", "band"
    if p.fmt == "GTiff":
        return f"{name}-{layer}.TIF", "GTiff", "band"
    interleave = p.fmt.lower() if layer == "SPECTRAL_IMAGE" else "bsq"
    return f"{name}-{layer}.{interleave.upper()}", "ENVI", interleave
