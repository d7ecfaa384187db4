"""Stage 9, `labels`: align label maps to the build's patches, for downstream benchmarks.

A benchmark is named in the manifest's `labels:` section (the names below are the interface):

```yaml
labels:
  cdl:
    source: s3://bucket/labels/cdl_2023.tif   # local path or s3:// URI
    kind: raster                # raster | vector
    attribute: null             # vector: the column holding the class code
    classes: null               # optional remap {source code: class}; default keeps the source codes
    resampling: nearest         # nearest | mode
    min_labelled_fraction: 0.5
    multilabel_min_fraction: null   # e.g. 0.05 for a multi-label benchmark (CORINE)
```

Label value 0 means "no label": outside the source, the source's nodata (or its mask), or a source code
that a `classes` remap leaves out. Each active patch is labelled on its own grid (its EPSG, `x_ul`,
`y_ul`, 30 m pixels, 128 x 128):

- sample points: `nearest` takes the centre of every pixel; `mode` takes an n x n lattice of points
  inside every pixel (rasters: n = ceil(2 x 30 m / source resolution), at least 3 and at most 15, so
  each source pixel is hit about twice per axis; polygons: n = 5) and keeps the majority class, ties
  to the smallest code (0, "no label", votes like any class, so a pixel mostly outside the source
  stays unlabelled);
- rasters: the points are transformed into the source CRS one by one with an exact transformer
  (`rasterio.warp.transform`, PROJ per point: no interpolated approximation), and each takes the source
  pixel that contains it (`floor` of its pixel coordinates, as GDAL's nearest neighbour does); only
  the window of the source under a patch is read, so a national map never sits in memory;
- polygons: the layer is read with a bounding-box filter (per task and UTM zone), the points are
  transformed into the layer's CRS, and each takes the polygon that covers it. Where polygons overlap,
  the smallest class code among them wins (0, an unmapped code, only when none has a class): a rule
  that does not depend on the order of the file.

Outputs (`name` is the benchmark's name):
- `dataset.zarr/labels/<name>`: uint8 (uint16 when codes may exceed 255), (patch, y, x) over every
  row of the dataset, retired rows included (they stay 0), fill 0, one patch per inner chunk and the
  shards of `quality`; attributes hold the class table, the source and the settings;
- `labels/<name>.parquet`: one row per active patch: `patch_id`, `row`, `labelled_fraction`, the class
  histogram (`class_codes`, `class_pixels`), for a multi-label benchmark `present_classes` (classes
  covering at least `multilabel_min_fraction` of the patch's labelled pixels) and `multi_hot` (over the
  class table), `included` and, when excluded, `reason`;
- `_stages/labels-<name>.json`: the stage record. A rerun with the same source (size and mtime, or
  S3 ETag), settings and dataset rows is a no-op; a changed source or setting re-labels everything;
  changed rows (appended by `write`, retired, moved) re-label only their shards.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import rasterio
import shapely
import zarr
from pyproj import CRS
from rasterio.warp import transform as transform_points
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from pipeline.cloud import StorageError, refuse_credentials
from pipeline.errors import is_transient, redact
from pipeline.manifest import Manifest, ManifestError
from pipeline.storage import BuildStore, StageRecord, Stopwatch, fingerprint_of, gdal_path, is_remote
from pipeline.write import DATASET, zarr_store

LABELS_DIR = "labels"
STAGE_PREFIX = "labels-"
MAX_CODE = 65535  # uint16
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_MODE_MIN, _MODE_MAX = 3, 15
VECTOR_MODE_FACTOR = 5  # polygons have no resolution: 5 x 5 points per pixel (6 m apart)
_NONE = np.iinfo(np.int64).max  # "no polygon here" while taking the smallest covering class


class LabelSourceError(ValueError):
    """A label source that cannot be used as configured (one line: what and why)."""


# Manifest section ---------------------------------------------------------------------------------


def _fraction(value: Any, key: str, *, allow_zero: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ManifestError(f"'{key}' must be a number in [0, 1], got {value!r}")
    if value > 1 or value < 0 or (not allow_zero and value == 0):
        raise ManifestError(f"'{key}' must be within {'[0' if allow_zero else '(0'}, 1], got {value!r}")
    return float(value)


def _code(value: Any, key: str, high: int | None = None) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < 0
        or (high is not None and value > high)
    ):
        bound = f"0..{high}" if high is not None else ">= 0"
        raise ManifestError(f"'{key}' must be an integer class code {bound}, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class LabelSpec:
    """One benchmark of the manifest's `labels:` section."""

    name: str
    source: str
    kind: str = "raster"  # raster | vector
    attribute: str | None = None  # vector: the column holding the class code
    classes: tuple[tuple[int, int], ...] = ()  # remap (source code, class); empty keeps source codes
    resampling: str = "nearest"  # nearest | mode
    min_labelled_fraction: float = 0.5
    multilabel_min_fraction: float | None = None

    KEYS = {
        "source",
        "kind",
        "attribute",
        "classes",
        "resampling",
        "min_labelled_fraction",
        "multilabel_min_fraction",
    }

    @classmethod
    def from_dict(cls, name: Any, raw: Any) -> LabelSpec:
        where = f"labels.{name}"
        if not isinstance(name, str) or _NAME.fullmatch(name) is None:
            raise ManifestError(
                f"'labels' names must be simple identifiers (letters, digits, _ . -), got {name!r}"
            )
        if not isinstance(raw, Mapping):
            raise ManifestError(f"'{where}' must be a mapping with at least 'source'")
        unknown = sorted(set(raw) - cls.KEYS)
        if unknown:
            raise ManifestError(
                f"unknown key '{where}.{unknown[0]}' (known keys: {', '.join(sorted(cls.KEYS))})"
            )
        source = raw.get("source")
        if not isinstance(source, str) or not source.strip():
            raise ManifestError(f"'{where}.source' must be a local path or an s3:// URI")
        try:
            refuse_credentials(source)
        except StorageError as exc:
            raise ManifestError(f"'{where}.source': {exc}") from None
        if is_remote(source) and not source.startswith("s3://"):
            raise ManifestError(
                f"'{where}.source' must be a local path or an s3:// URI, got {redact(source)!r}"
            )
        kind = raw.get("kind", "raster")
        if kind not in ("raster", "vector"):
            raise ManifestError(f"'{where}.kind' must be 'raster' or 'vector', got {kind!r}")
        attribute = raw.get("attribute")
        if kind == "vector" and (not isinstance(attribute, str) or not attribute):
            raise ManifestError(f"'{where}.attribute' must name the column holding the class code (vector)")
        if kind == "raster" and attribute is not None:
            raise ManifestError(f"'{where}.attribute' applies to vector sources only; leave it null")
        resampling = raw.get("resampling", "nearest")
        if resampling not in ("nearest", "mode"):
            raise ManifestError(f"'{where}.resampling' must be 'nearest' or 'mode', got {resampling!r}")
        remap = raw.get("classes")
        pairs: list[tuple[int, int]] = []
        if remap is not None:
            if not isinstance(remap, Mapping) or not remap:
                raise ManifestError(f"'{where}.classes' must be a mapping {{source code: class}} or null")
            for code, cls_ in remap.items():
                pairs.append(
                    (_code(code, f"{where}.classes key"), _code(cls_, f"{where}.classes.{code}", MAX_CODE))
                )
        multilabel = raw.get("multilabel_min_fraction")
        return cls(
            name=name,
            source=source,
            kind=kind,
            attribute=attribute if kind == "vector" else None,
            classes=tuple(sorted(pairs)),
            resampling=resampling,
            min_labelled_fraction=_fraction(
                raw.get("min_labelled_fraction", 0.5), f"{where}.min_labelled_fraction"
            ),
            multilabel_min_fraction=None
            if multilabel is None
            else _fraction(multilabel, f"{where}.multilabel_min_fraction", allow_zero=False),
        )

    @property
    def multilabel(self) -> bool:
        return self.multilabel_min_fraction is not None

    @property
    def stage(self) -> str:
        return f"{STAGE_PREFIX}{self.name}"

    @property
    def table_path(self) -> str:
        return f"{LABELS_DIR}/{self.name}.parquet"

    @property
    def array_path(self) -> str:
        return f"{LABELS_DIR}/{self.name}"

    def settings(self) -> dict[str, Any]:
        """What the labels depend on besides the source's bytes and the dataset's rows."""
        return {
            "kind": self.kind,
            "attribute": self.attribute,
            "classes": [list(p) for p in self.classes],
            "resampling": self.resampling,
            "min_labelled_fraction": self.min_labelled_fraction,
            "multilabel_min_fraction": self.multilabel_min_fraction,
        }


def parse_labels(raw: Any) -> tuple[LabelSpec, ...]:
    """The manifest's `labels:` section (a mapping of benchmark name to settings; empty when absent)."""
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        raise ManifestError("'labels' must be a mapping of benchmark names to their settings")
    return tuple(LabelSpec.from_dict(name, value) for name, value in raw.items())


def spec_named(manifest: Manifest, name: str | None) -> list[LabelSpec]:
    """The manifest's benchmarks, or the one named (an error naming the known ones otherwise)."""
    specs = list(getattr(manifest, "labels", ()) or ())
    if not specs:
        raise LabelSourceError(f"{manifest.source} has no 'labels' section: nothing to label")
    if name is None:
        return specs
    chosen = [s for s in specs if s.name == name]
    if not chosen:
        raise LabelSourceError(
            f"no benchmark {name!r} in {manifest.source}'s labels (known: {', '.join(s.name for s in specs)})"
        )
    return chosen


# Pure core ----------------------------------------------------------------------------------------


def mode_factor(source_resolution: float, pixel_size: float) -> int:
    """Sample points per pixel side for `mode`: about two per source pixel, within [3, 15]."""
    if not source_resolution > 0:
        return VECTOR_MODE_FACTOR
    return int(min(_MODE_MAX, max(_MODE_MIN, math.ceil(2 * pixel_size / source_resolution))))


def sample_points(
    x_ul: float, y_ul: float, pixel_size: float, size: int, factor: int
) -> tuple[np.ndarray, np.ndarray]:
    """Projected coordinates of the sample points of one patch: (size x factor)^2 points, row-major,
    the centres of a factor x factor subdivision of every pixel (factor 1: the pixel centres)."""
    step = pixel_size / factor
    offsets = (np.arange(size * factor, dtype=np.float64) + 0.5) * step
    xs = np.broadcast_to(x_ul + offsets[None, :], (size * factor, size * factor))
    ys = np.broadcast_to(y_ul - offsets[:, None], (size * factor, size * factor))
    return np.ascontiguousarray(xs), np.ascontiguousarray(ys)


def remap_codes(values: np.ndarray, classes: Sequence[tuple[int, int]]) -> np.ndarray:
    """Source codes to classes (int64): through the remap when given (unlisted codes become 0), else
    unchanged; codes outside 0..65535 or not integers are an error that names the remedy."""
    values = np.asarray(values)
    if values.dtype.kind == "f":
        finite = values[np.isfinite(values)]
        if finite.size and not np.array_equal(finite, np.round(finite)):
            raise LabelSourceError("the source holds non-integer values: class codes must be integers")
        values = np.where(np.isfinite(values), values, 0)
    codes = values.astype(np.int64)
    if classes:
        keys = np.array([k for k, _ in classes], dtype=np.int64)
        targets = np.array([v for _, v in classes], dtype=np.int64)
        position = np.clip(np.searchsorted(keys, codes), 0, len(keys) - 1)
        return np.where(keys[position] == codes, targets[position], 0)
    if codes.size and (codes.min() < 0 or codes.max() > MAX_CODE):
        bad = int(codes.min() if codes.min() < 0 else codes.max())
        raise LabelSourceError(
            f"the source holds class code {bad}, outside 0..{MAX_CODE}: give a 'classes' remap"
        )
    return codes


def mode_reduce(samples: np.ndarray, factor: int) -> np.ndarray:
    """(H*f, W*f) sample classes -> (H, W) majority class per f x f block; ties to the smallest code."""
    if factor == 1:
        return samples
    height, width = samples.shape[0] // factor, samples.shape[1] // factor
    blocks = samples.reshape(height, factor, width, factor).transpose(0, 2, 1, 3).reshape(height, width, -1)
    present = np.unique(blocks)  # ascending: argmax takes the first, that is the smallest, on ties
    counts = np.stack([(blocks == code).sum(axis=2) for code in present])
    return present[np.argmax(counts, axis=0)]


@dataclass(frozen=True, slots=True)
class PatchLabels:
    """What one patch's labels say, for the table."""

    row: int
    patch_id: str
    labelled_fraction: float
    class_codes: tuple[int, ...]
    class_pixels: tuple[int, ...]
    present_classes: tuple[int, ...]
    outside: bool  # the source has nothing under this patch (never read)


def summarise(
    row: int, patch_id: str, labels: np.ndarray | None, multilabel_min_fraction: float | None
) -> PatchLabels:
    """Histogram, labelled fraction and (multi-label) present classes of one patch's labels."""
    if labels is None:
        return PatchLabels(row, patch_id, 0.0, (), (), (), True)
    codes, pixels = np.unique(labels[labels != 0], return_counts=True)
    labelled = int(pixels.sum())
    present: tuple[int, ...] = ()
    if multilabel_min_fraction is not None and labelled:
        present = tuple(
            int(c) for c, n in zip(codes, pixels, strict=True) if n / labelled >= multilabel_min_fraction
        )
    return PatchLabels(
        row,
        patch_id,
        labelled / labels.size,
        tuple(int(c) for c in codes),
        tuple(int(n) for n in pixels),
        present,
        False,
    )


def exclusion_reason(result: PatchLabels, min_labelled_fraction: float) -> str | None:
    if result.outside:
        return "outside the label source"
    if result.labelled_fraction < min_labelled_fraction or result.labelled_fraction == 0:
        return (
            f"labelled fraction {result.labelled_fraction:.3f} "
            f"below min_labelled_fraction {min_labelled_fraction:g}"
        )
    return None


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


# The stage ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rows:
    """Every row of dataset.zarr with what labelling needs (read from the arrays themselves)."""

    patch_id: np.ndarray
    epsg: np.ndarray
    x_ul: np.ndarray
    y_ul: np.ndarray
    active: np.ndarray
    patch_size: int
    pixel_size: float
    patches_per_shard: int

    def fingerprint(self) -> str:
        import hashlib

        digest = hashlib.sha256()
        for values in (self.epsg, self.x_ul, self.y_ul, self.active):
            digest.update(np.ascontiguousarray(values).tobytes())
        digest.update("\n".join(self.patch_id.tolist()).encode())
        digest.update(f"{self.patch_size}/{self.pixel_size}/{self.patches_per_shard}".encode())
        return digest.hexdigest()[:16]


@contextmanager
def _quiet() -> Iterator[None]:
    """zarr 3.1 warns on consolidated v3 metadata and variable-length strings, both used on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        warnings.filterwarnings(
            "ignore", message=r"The data type \(.*\) does not have a Zarr V3 specification"
        )
        yield


def read_rows(store: BuildStore) -> Rows:
    if not store.exists(f"{DATASET}/zarr.json"):
        raise FileNotFoundError(f"{store.uri_of(DATASET)} is missing: run the write stage first")
    with _quiet():
        group = zarr.open_group(zarr_store(store), mode="r", use_consolidated=False)
        names = set(group.array_keys())

        def column(name: str) -> np.ndarray:
            array = group[name]
            assert isinstance(array, zarr.Array)
            return np.asarray(array[:])

        n = int(group["quality"].shape[0])  # type: ignore[union-attr]
        quality = group["quality"]
        assert isinstance(quality, zarr.Array)
        shards = quality.shards or quality.chunks
        return Rows(
            patch_id=np.array([str(v) for v in column("patch_id").tolist()], dtype=object),
            epsg=column("epsg").astype(np.int64),
            x_ul=column("x_ul").astype(np.float64),
            y_ul=column("y_ul").astype(np.float64),
            active=column("active").astype(bool) if "active" in names else np.ones(n, dtype=bool),
            patch_size=int(quality.shape[-1]),
            pixel_size=float(str(group.attrs.get("pixel_size_m", 30.0))),
            patches_per_shard=int(shards[0]),
        )


def label_dtype(spec: LabelSpec, storage_options: Mapping[str, Any] | None) -> str:
    """uint8 when every class fits in a byte (a remap's classes, an 8-bit raster, a code column whose
    largest value is at most 255), else uint16."""
    if spec.classes:
        return "uint8" if max(v for _, v in spec.classes) <= 255 else "uint16"
    if spec.kind == "vector":
        assert spec.attribute is not None
        largest = largest_code(spec.source, spec.attribute, storage_options)
        return "uint8" if largest <= 255 else "uint16"
    source = RasterSource(spec.source)
    try:
        dtype = np.dtype(source.dataset.dtypes[0])
    finally:
        source.close()
    return "uint8" if dtype.itemsize == 1 and dtype.kind in "ui" else "uint16"


def _create_array(
    store: BuildStore, spec: LabelSpec, rows: Rows, dtype: str, attributes: dict[str, Any]
) -> None:
    with _quiet():
        root = zarr.open_group(zarr_store(store), mode="r+", use_consolidated=False)
        quality = root["quality"]
        assert isinstance(quality, zarr.Array)
        group = root.require_group(LABELS_DIR)
        size = rows.patch_size
        group.create_array(
            spec.name,
            shape=(len(rows.patch_id), size, size),
            chunks=(1, size, size),
            shards=(rows.patches_per_shard, size, size),
            dtype=dtype,
            fill_value=0,
            compressors=quality.compressors,
            dimension_names=("patch", "y", "x"),
            attributes=attributes,
            overwrite=True,
        )


@dataclass(frozen=True, slots=True)
class ShardTask:
    shard: int
    start: int
    stop: int


def label_patch(
    source: Any,
    epsg: int,
    x_ul: float,
    y_ul: float,
    rows: Rows,
    factor: int,
    classes: Sequence[tuple[int, int]],
) -> np.ndarray | None:
    """One patch's labels (size x size int64), or None when the source has nothing under it."""
    xs, ys = sample_points(x_ul, y_ul, rows.pixel_size, rows.patch_size, factor)
    values = source.sample(epsg, xs, ys)
    if values is None:
        return None
    codes = values if isinstance(source, VectorSource) else remap_codes(values, classes)
    return mode_reduce(codes, factor)


def _open_source(spec: LabelSpec, storage_options: Mapping[str, Any] | None) -> Any:
    if spec.kind == "raster":
        return RasterSource(spec.source)
    assert spec.attribute is not None
    return VectorSource(spec.source, spec.attribute, spec.classes, storage_options)


def _patch_bbox_in(
    crs_wkt: str, epsg: int, xs: Sequence[float], ys: Sequence[float], extent: float
) -> tuple[float, float, float, float]:
    """Bounding box in the layer's CRS of patches (upper-left corners, side `extent`), with margin."""
    left, right = min(xs), max(xs) + extent
    top, bottom = max(ys), min(ys) - extent
    box = transform_bounds(f"EPSG:{epsg}", crs_wkt, left, bottom, right, top, densify_pts=21)
    pad = 1e-6 * max(abs(v) for v in box) + 1e-9
    return (box[0] - pad, box[1] - pad, box[2] + pad, box[3] + pad)


def shard_task(
    task: ShardTask,
    spec: LabelSpec,
    rows: Rows,
    build_uri: str,
    factor: int,
    storage_options: dict[str, Any] | None,
) -> list[PatchLabels]:
    """Label the active rows of one shard and write the shard whole (one writer per shard)."""
    store = BuildStore(build_uri, storage_options or {})
    size = rows.patch_size
    source = _open_source(spec, storage_options)
    results: list[PatchLabels] = []
    try:
        block = np.zeros((task.stop - task.start, size, size), dtype=np.int64)
        active = [r for r in range(task.start, task.stop) if rows.active[r]]
        if isinstance(source, VectorSource):
            by_zone: dict[int, list[int]] = {}
            for r in active:
                by_zone.setdefault(int(rows.epsg[r]), []).append(r)
            zones = list(by_zone.items())
        else:
            zones = [(0, active)]
        for epsg_of_zone, members in zones:
            if isinstance(source, VectorSource) and members:
                extent = rows.pixel_size * size
                source.prepare(
                    _patch_bbox_in(
                        source.crs_wkt,
                        epsg_of_zone,
                        rows.x_ul[members].tolist(),
                        rows.y_ul[members].tolist(),
                        extent,
                    )
                )
            for r in members:
                labels = label_patch(
                    source,
                    int(rows.epsg[r]),
                    float(rows.x_ul[r]),
                    float(rows.y_ul[r]),
                    rows,
                    factor,
                    spec.classes,
                )
                if labels is not None:
                    block[r - task.start] = labels
                results.append(summarise(r, str(rows.patch_id[r]), labels, spec.multilabel_min_fraction))
    finally:
        source.close()
    with _quiet():
        group = zarr.open_group(zarr_store(store), mode="r+", use_consolidated=False)
        array = group[spec.array_path]
        assert isinstance(array, zarr.Array)
        array[task.start : task.stop] = block.astype(array.dtype)
    return results


TABLE_SCHEMA = pa.schema(
    [
        ("patch_id", pa.string()),
        ("row", pa.int64()),
        ("epsg", pa.int32()),
        ("x_ul", pa.float64()),
        ("y_ul", pa.float64()),
        ("labelled_fraction", pa.float64()),
        ("class_codes", pa.list_(pa.int32())),
        ("class_pixels", pa.list_(pa.int64())),
        ("present_classes", pa.list_(pa.int32())),
        ("multi_hot", pa.list_(pa.uint8())),
        ("included", pa.bool_()),
        ("reason", pa.string()),
    ]
)


def class_table(spec: LabelSpec, results: Sequence[PatchLabels]) -> list[int]:
    """The benchmark's classes (0 excluded): a remap's classes, else every code seen under the patches."""
    if spec.classes:
        return sorted({v for _, v in spec.classes} - {0})
    return sorted({c for r in results for c in r.class_codes})


def results_table(
    spec: LabelSpec, results: Sequence[PatchLabels], classes: Sequence[int], rows: Rows
) -> pa.Table:
    position = {c: k for k, c in enumerate(classes)}
    ordered = sorted(results, key=lambda r: r.patch_id)
    reasons = [exclusion_reason(r, spec.min_labelled_fraction) for r in ordered]
    multi_hot: list[list[int] | None] = []
    for r in ordered:
        if spec.multilabel:
            vector = [0] * len(classes)
            for c in r.present_classes:
                vector[position[c]] = 1
            multi_hot.append(vector)
        else:
            multi_hot.append(None)
    return pa.table(
        {
            "patch_id": [r.patch_id for r in ordered],
            "row": [r.row for r in ordered],
            "epsg": [int(rows.epsg[r.row]) for r in ordered],
            "x_ul": [float(rows.x_ul[r.row]) for r in ordered],
            "y_ul": [float(rows.y_ul[r.row]) for r in ordered],
            "labelled_fraction": [r.labelled_fraction for r in ordered],
            "class_codes": [list(r.class_codes) for r in ordered],
            "class_pixels": [list(r.class_pixels) for r in ordered],
            "present_classes": [list(r.present_classes) if spec.multilabel else None for r in ordered],
            "multi_hot": multi_hot,
            "included": [reason is None for reason in reasons],
            "reason": reasons,
        },
        schema=TABLE_SCHEMA,
    )


def _set_attributes_and_consolidate(store: BuildStore, spec: LabelSpec, attributes: dict[str, Any]) -> None:
    with _quiet():
        group = zarr.open_group(zarr_store(store), mode="r+", use_consolidated=False)
        array = group[spec.array_path]
        assert isinstance(array, zarr.Array)
        array.attrs.update(attributes)
        zarr.consolidate_metadata(zarr_store(store))


@dataclass(frozen=True, slots=True)
class LabelsResult:
    name: str
    skipped: bool
    counts: dict[str, Any]


def reusable_shards(
    store: BuildStore,
    spec: LabelSpec,
    rows: Rows,
    record: Mapping[str, Any] | None,
    config_hash: str,
    version: Mapping[str, Any],
    dtype: str,
) -> tuple[set[int], list[PatchLabels]]:
    """Shards whose stored labels still stand, and their table rows: same settings, same source bytes,
    same array layout, and every row of the shard holds the same patch on the same grid as when it was
    labelled (an appended row, a retired row or a moved patch makes its shard be labelled again). This
    is what keeps a rerun after `write` grew the dataset from re-labelling everything."""
    if (
        record is None
        or record.get("config_hash") != config_hash
        or (record.get("counts") or {}).get("source_version") != dict(version)
        or not store.exists(spec.table_path)
        or not store.exists(f"{DATASET}/{spec.array_path}/zarr.json")
    ):
        return set(), []
    try:
        array = label_array(store, spec.name)
        table = read_label_table(store, spec.name)
    except (FileNotFoundError, KeyError, ValueError):
        return set(), []
    size, per_shard, n = rows.patch_size, rows.patches_per_shard, len(rows.patch_id)
    if (
        array.dtype != np.dtype(dtype)
        or tuple(array.shape[1:]) != (size, size)
        or (array.shards or array.chunks)[0] != per_shard
        or array.shape[0] > n
        or not {"epsg", "x_ul", "y_ul"} <= set(table.columns)
    ):
        return set(), []
    before = {
        int(r): (str(p), int(e), float(x), float(y))
        for r, p, e, x, y in zip(
            table["row"], table["patch_id"], table["epsg"], table["x_ul"], table["y_ul"], strict=True
        )
    }
    kept: set[int] = set()
    for shard, start in enumerate(range(0, n, per_shard)):
        stop = min(n, start + per_shard)
        if all(
            before.get(r)
            == (str(rows.patch_id[r]), int(rows.epsg[r]), float(rows.x_ul[r]), float(rows.y_ul[r]))
            if rows.active[r]
            else r not in before
            for r in range(start, stop)
        ):
            kept.add(shard)
    reused = [
        PatchLabels(
            int(entry.row),
            str(entry.patch_id),
            float(entry.labelled_fraction),
            tuple(int(c) for c in entry.class_codes),
            tuple(int(p) for p in entry.class_pixels),
            tuple(int(c) for c in entry.present_classes) if entry.present_classes is not None else (),
            entry.reason == "outside the label source",
        )
        for entry in table.itertuples(index=False)
        if int(entry.row) // per_shard in kept
    ]
    return kept, reused


def _grow_array(store: BuildStore, spec: LabelSpec, rows: Rows, attributes: dict[str, Any]) -> None:
    """Keep the stored labels: resize the array to the dataset's rows (new rows read 0)."""
    array = label_array(store, spec.name, writable=True)
    n = len(rows.patch_id)
    if array.shape[0] != n:
        array.resize((n, *array.shape[1:]))
    array.attrs.update(attributes)


def require_dataset(manifest: Manifest, store: BuildStore) -> None:
    from pipeline.stages import StaleStageError

    record = store.read_stage_record("write")
    if record is None:
        raise StaleStageError("labels needs the write stage first: run `spectralearth write` (or `run`)")
    if record["config_hash"] != manifest.stage_hash("write"):
        raise StaleStageError(
            f"the dataset in {store.uri} was written with other manifest settings than {manifest.source}: "
            "rerun the build first"
        )


def run_labels(
    manifest: Manifest,
    store: BuildStore,
    scheduler: Any,
    storage_options: dict[str, Any] | None = None,
    force: bool = False,
    name: str | None = None,
) -> list[LabelsResult]:
    """Label every benchmark of the manifest (or the one named); each skips when up to date."""
    require_dataset(manifest, store)
    return [
        label_benchmark(spec, store, scheduler, storage_options, force) for spec in spec_named(manifest, name)
    ]


def label_benchmark(
    spec: LabelSpec,
    store: BuildStore,
    scheduler: Any,
    storage_options: dict[str, Any] | None = None,
    force: bool = False,
) -> LabelsResult:
    watch = Stopwatch()
    rows = read_rows(store)
    version = source_version(spec.source, storage_options)
    config_hash = fingerprint_of({"settings": spec.settings()})
    input_fingerprint = fingerprint_of({"source": version, "rows": rows.fingerprint()})
    outputs = (spec.table_path, f"{DATASET}/{spec.array_path}/zarr.json")
    previous = store.up_to_date(spec.stage, config_hash, input_fingerprint, outputs, force)
    if previous is not None:
        return LabelsResult(spec.name, True, previous["counts"])
    probe = _open_source(spec, storage_options)  # a bad source stops here, before anything is written
    resolution = probe.resolution if isinstance(probe, RasterSource) else 0.0  # polygons: none
    probe.close()
    dtype = label_dtype(spec, storage_options)
    factor = mode_factor(resolution, rows.pixel_size) if spec.resampling == "mode" else 1
    base_attributes = {
        "long_name": f"{spec.name} labels (0: no label)",
        "source": version["uri"],
        "source_version": version,
        "settings": spec.settings(),
        "samples_per_pixel_side": factor,
        "pixel_size_m": rows.pixel_size,
        "coordinates": "patch_id location_id scene_id time epsg x_ul y_ul active",
    }
    record = None if force else store.read_stage_record(spec.stage)
    kept, reused = reusable_shards(store, spec, rows, record, config_hash, version, dtype)
    if kept:
        _grow_array(store, spec, rows, base_attributes)
    else:
        _create_array(store, spec, rows, dtype, base_attributes)
    watch.lap("prepare")
    per_shard = rows.patches_per_shard
    n = len(rows.patch_id)
    # A kept array's other shards are rewritten whole (a row may have been retired); a new array's
    # shards without active rows stay the fill.
    tasks = [
        ShardTask(k, start, min(n, start + per_shard))
        for k, start in enumerate(range(0, n, per_shard))
        if k not in kept and (bool(kept) or rows.active[start : min(n, start + per_shard)].any())
    ]
    outcome = scheduler.map(
        shard_task, tasks, spec, rows, store.uri, factor, storage_options, label=f"labels {spec.name}"
    )
    results = reused + [r for shard in outcome for r in shard]
    watch.lap("label")
    classes = class_table(spec, results)
    table = results_table(spec, results, classes, rows)
    store.write_table(spec.table_path, table)
    _set_attributes_and_consolidate(
        store,
        spec,
        base_attributes
        | {
            "flag_values": classes,
            "class_codes": classes,
            "multilabel": spec.multilabel,
            "table": spec.table_path,
        },
    )
    watch.lap("outputs")
    included = table.column("included").to_pylist()
    reasons: dict[str, int] = {}
    for reason in table.column("reason").to_pylist():
        if reason is not None:
            key = "outside the label source" if reason.startswith("outside") else "labelled fraction too low"
            reasons[key] = reasons.get(key, 0) + 1
    histogram: dict[int, int] = {}
    for r, keep in zip(sorted(results, key=lambda r: r.patch_id), included, strict=True):
        if keep:
            for c, p in zip(r.class_codes, r.class_pixels, strict=True):
                histogram[c] = histogram.get(c, 0) + p
    counts = {
        "patches": len(results),
        "included": int(sum(included)),
        "excluded": reasons,
        "classes": len(classes),
        "dtype": dtype,
        "histogram": {str(c): histogram[c] for c in sorted(histogram)},
        "shards_labelled": len(tasks),
        "shards_reused": len(kept),
        "source_version": version,
    }
    store.write_stage_record(StageRecord(spec.stage, config_hash, input_fingerprint, counts, watch.timings))
    return LabelsResult(spec.name, False, counts)


# Reading a benchmark ------------------------------------------------------------------------------


def read_label_table(store: BuildStore, name: str) -> Any:
    """`labels/<name>.parquet` as pandas."""
    relative = f"{LABELS_DIR}/{name}.parquet"
    if not store.exists(relative):
        raise FileNotFoundError(f"{store.uri_of(relative)} is missing: run `spectralearth labels` first")
    return store.read_table(relative).to_pandas()


def included_patches(store: BuildStore, name: str) -> list[str]:
    """The patch ids of a benchmark (its included patches), sorted."""
    table = read_label_table(store, name)
    return sorted(table.loc[table["included"], "patch_id"].astype(str))


def label_array(store: BuildStore, name: str, writable: bool = False) -> Any:
    """The zarr array `labels/<name>` of dataset.zarr (rows as the other arrays)."""
    with _quiet():
        group = zarr.open_group(zarr_store(store), mode="r+" if writable else "r", use_consolidated=False)
        try:
            array = group[f"{LABELS_DIR}/{name}"]
        except KeyError:
            raise FileNotFoundError(
                f"{store.uri_of(DATASET)} has no labels/{name}: run `spectralearth labels` first"
            ) from None
    assert isinstance(array, zarr.Array)
    return array


def histogram_lines(counts: Mapping[str, Any], width: int = 40) -> list[str]:
    """The class histogram of a stage record's counts, one line per class with its share of labelled
    pixels of the included patches."""
    histogram = {int(k): int(v) for k, v in (counts.get("histogram") or {}).items()}
    total = sum(histogram.values())
    lines = []
    for code in sorted(histogram):
        share = histogram[code] / total if total else 0.0
        lines.append(f"  class {code:>5d}: {share * 100:5.1f} %  {'#' * round(share * width)}")
    return lines


def print_labels_summary(result: LabelsResult) -> None:
    counts = result.counts
    excluded = counts.get("excluded") or {}
    reasons = ", ".join(f"{n} {why}" for why, n in sorted(excluded.items())) or "none"
    state = " (up to date)" if result.skipped else ""
    print(
        f"labels {result.name}{state}: {counts.get('patches', 0)} patches, {counts.get('included', 0)} "
        f"included (excluded: {reasons}); {counts.get('classes', 0)} classes, {counts.get('dtype')}"
    )
    for line in histogram_lines(counts):
        print(line)
