"""Label sources: rasters read by window and polygon layers read by bounding box, sampled at points."""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Mapping, Sequence
from typing import Any

import fsspec
import numpy as np
import pyarrow.parquet as pq
import rasterio
import shapely
from pyproj import CRS
from rasterio.warp import transform as transform_points
from rasterio.windows import Window

from pipeline.errors import is_transient, redact
from pipeline.labels.sampling import remap_codes
from pipeline.labels.spec import LabelSourceError
from pipeline.storage import gdal_path, is_remote

_NONE = np.iinfo(np.int64).max  # "no polygon here" while taking the smallest covering class


# Reading sources ----------------------------------------------------------------------------------


def source_version(uri: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What identifies the source's bytes without reading them: size and mtime (local) or ETag (S3)."""
    fs, path = fsspec.core.url_to_fs(uri, **dict(storage_options or {}))
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"label source {redact(uri)} does not exist") from None
    stamp = (
        info.get("ETag")
        or info.get("etag")
        or info.get("mtime")
        or info.get("LastModified")
        or info.get("created")
    )
    return {"uri": redact(uri), "size": int(info.get("size") or 0), "stamp": str(stamp)}


def _curl_extensions(uri: str) -> dict[str, str]:
    """GDAL configuration that lets /vsis3/ open this source: the build's GDAL settings list the
    extensions of EnMAP products in CPL_VSIL_CURL_ALLOWED_EXTENSIONS; a label source adds its own."""
    allowed = os.environ.get("CPL_VSIL_CURL_ALLOWED_EXTENSIONS")
    suffix = posixpath.splitext(uri)[1]
    if not is_remote(uri) or not allowed or not suffix or suffix in allowed.split(","):
        return {}
    return {"CPL_VSIL_CURL_ALLOWED_EXTENSIONS": f"{allowed},{suffix}"}


def _ogr_path(uri: str) -> str:
    """The path pyogrio opens (its own GDAL build: the extension is allowed there, once per process)."""
    extra = _curl_extensions(uri)
    if extra:
        import pyogrio

        pyogrio.set_gdal_config_options(extra)
    return gdal_path(uri)


class RasterSource:
    """An open categorical raster: exact point sampling from windowed reads."""

    def __init__(self, uri: str) -> None:
        try:
            with rasterio.Env(**_curl_extensions(uri)):
                self.dataset = rasterio.open(gdal_path(uri))
        except rasterio.errors.RasterioIOError as exc:
            if is_transient(exc):
                raise
            raise LabelSourceError(
                f"label source {redact(uri)} is not a readable raster: {redact(str(exc))}"
            ) from None
        if self.dataset.crs is None:
            raise LabelSourceError(f"label source {redact(uri)} has no CRS")
        self.transform = self.dataset.transform
        if self.transform.b != 0 or self.transform.d != 0:
            raise LabelSourceError(f"label source {redact(uri)} is rotated: warp it to a north-up grid first")
        self.resolution = min(abs(self.transform.a), abs(self.transform.e))

    def close(self) -> None:
        self.dataset.close()

    def crs_wkt(self) -> str:
        return str(self.dataset.crs.to_wkt())

    def sample(self, epsg: int, xs: np.ndarray, ys: np.ndarray) -> np.ndarray | None:
        """Source values at the points (int64, 0 where no valid source pixel), or None when the
        points all fall outside the raster (nothing read)."""

        sx, sy = transform_points(f"EPSG:{epsg}", self.dataset.crs, xs.ravel(), ys.ravel())
        t = self.transform  # north-up (checked on open): pixel coordinates are two divisions
        cols = np.floor((np.asarray(sx) - t.c) / t.a).astype(np.int64)
        rows = np.floor((np.asarray(sy) - t.f) / t.e).astype(np.int64)
        inside = (cols >= 0) & (cols < self.dataset.width) & (rows >= 0) & (rows < self.dataset.height)
        if not inside.any():
            return None
        c0, c1 = int(cols[inside].min()), int(cols[inside].max()) + 1
        r0, r1 = int(rows[inside].min()), int(rows[inside].max()) + 1
        window = self.dataset.read(1, window=Window(c0, r0, c1 - c0, r1 - r0), masked=True)
        values = np.asarray(window.filled(0) if window.dtype.kind != "f" else window.filled(np.nan))
        valid = ~np.ma.getmaskarray(window)
        out = np.zeros(cols.shape, dtype=values.dtype)
        r, c = rows[inside] - r0, cols[inside] - c0
        out[inside] = np.where(valid[r, c], values[r, c], 0)
        return out.reshape(xs.shape)


def read_polygons(
    uri: str,
    bbox: tuple[float, float, float, float],
    attribute: str,
    storage_options: Mapping[str, Any] | None = None,
) -> Any:
    """The features of a polygon layer whose bounding box meets `bbox` (in the layer's CRS)."""
    import geopandas

    if uri.lower().endswith((".parquet", ".geoparquet")):
        frame = geopandas.read_parquet(
            uri,
            columns=[attribute, "geometry"],
            bbox=bbox,
            storage_options=dict(storage_options or {}) or None,
        )
    else:
        frame = geopandas.read_file(_ogr_path(uri), bbox=bbox, columns=[attribute], engine="pyogrio")
    if attribute not in frame.columns:
        raise LabelSourceError(f"label source {redact(uri)} has no column {attribute!r}")
    return frame


def _is_parquet(uri: str) -> bool:
    return uri.lower().endswith((".parquet", ".geoparquet"))


def _integer_codes(column: Any) -> np.ndarray:
    values = np.asarray(column)
    if values.dtype.kind in "iu":
        return values.astype(np.int64)
    try:
        numbers = values.astype(np.float64)
    except (TypeError, ValueError):
        raise LabelSourceError(
            "the class attribute holds non-numeric values: class codes must be integers"
        ) from None
    finite = np.isfinite(numbers)
    if not np.array_equal(numbers[finite], np.round(numbers[finite])):
        raise LabelSourceError("the class attribute holds non-integer values: class codes must be integers")
    return np.where(finite, numbers, 0).astype(np.int64)


def layer_crs(uri: str, attribute: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """The CRS (WKT) of a polygon layer, from its metadata; checks that `attribute` exists."""
    if _is_parquet(uri):
        with fsspec.open(uri, "rb", **dict(storage_options or {})) as handle:
            schema = pq.ParquetFile(handle).schema_arrow
        if attribute not in schema.names:
            raise LabelSourceError(f"label source {redact(uri)} has no column {attribute!r}")
        meta = json.loads((schema.metadata or {}).get(b"geo", b"{}"))
        geometry = meta.get("columns", {}).get(meta.get("primary_column", "geometry"), {})
        crs = geometry.get("crs", "OGC:CRS84")  # GeoParquet: a missing crs means OGC:CRS84
        if crs is None:
            raise LabelSourceError(f"label source {redact(uri)} has no CRS")
        return str(
            CRS.from_json_dict(crs).to_wkt() if isinstance(crs, dict) else CRS.from_user_input(crs).to_wkt()
        )
    import pyogrio

    info = pyogrio.read_info(_ogr_path(uri))
    if attribute not in list(info["fields"]):
        raise LabelSourceError(f"label source {redact(uri)} has no column {attribute!r}")
    if not info.get("crs"):
        raise LabelSourceError(f"label source {redact(uri)} has no CRS")
    return str(CRS.from_user_input(info["crs"]).to_wkt())


def largest_code(uri: str, attribute: str, storage_options: Mapping[str, Any] | None = None) -> int:
    """The largest class code of a polygon layer (reads the code column only)."""
    if _is_parquet(uri):
        with fsspec.open(uri, "rb", **dict(storage_options or {})) as handle:
            column = pq.ParquetFile(handle).read(columns=[attribute]).column(0).to_numpy(zero_copy_only=False)
    else:
        import pyogrio

        column = pyogrio.read_dataframe(_ogr_path(uri), columns=[attribute], read_geometry=False)[attribute]
    codes = remap_codes(_integer_codes(column), ())
    return int(codes.max()) if codes.size else 0


class VectorSource:
    """A polygon layer: features read per bounding box, points classified by the polygon covering them."""

    def __init__(
        self,
        uri: str,
        attribute: str,
        classes: Sequence[tuple[int, int]],
        storage_options: Mapping[str, Any] | None,
    ) -> None:
        self.uri, self.attribute, self.classes = uri, attribute, classes
        self.storage_options = storage_options
        self.crs_wkt = layer_crs(uri, attribute, storage_options)
        self._cache: tuple[tuple[float, float, float, float], Any, Any, np.ndarray] | None = None

    def prepare(self, bbox: tuple[float, float, float, float]) -> None:
        """Read the features under `bbox` (layer CRS) once for the patches that follow."""
        frame = read_polygons(self.uri, bbox, self.attribute, self.storage_options)
        codes = remap_codes(_integer_codes(frame[self.attribute].to_numpy()), self.classes)
        geoms = frame.geometry.to_numpy()
        keep = (
            np.array([g is not None and not g.is_empty for g in geoms], dtype=bool)
            if len(geoms)
            else np.zeros(0, bool)
        )
        geoms, codes = geoms[keep], codes[keep]
        shapely.prepare(geoms)
        self._cache = (bbox, shapely.STRtree(geoms), geoms, codes)

    def sample(self, epsg: int, xs: np.ndarray, ys: np.ndarray) -> np.ndarray | None:
        """Class of the polygon covering each point (smallest class where several do; 0 where
        none), or None when no polygon lies under the points."""
        assert self._cache is not None, "prepare() first"
        _, tree, geoms, codes = self._cache
        if not len(geoms):
            return None
        sx, sy = transform_points(f"EPSG:{epsg}", self.crs_wkt, xs.ravel(), ys.ravel())
        px, py = np.asarray(sx), np.asarray(sy)
        candidates = tree.query(shapely.box(px.min(), py.min(), px.max(), py.max()), predicate="intersects")
        if not len(candidates):
            return None
        best = np.full(px.shape, _NONE, dtype=np.int64)
        for k, (x0, y0, x1, y1) in zip(
            candidates.tolist(), shapely.bounds(geoms[candidates]).tolist(), strict=True
        ):
            near = np.flatnonzero((px >= x0) & (px <= x1) & (py >= y0) & (py <= y1))
            if not len(near):
                continue
            inside = near[shapely.intersects_xy(geoms[k], px[near], py[near])]  # the boundary counts
            code = int(codes[k]) or _NONE  # a class beats an unmapped (0) polygon
            best[inside] = np.minimum(best[inside], code)
        best[best == _NONE] = 0
        return best.reshape(xs.shape)

    def close(self) -> None:
        self._cache = None
