"""`stac/items.parquet`: the patch items in stac-geoparquet form (one row per item); `stac/scenes.parquet`.

Written with `stac_geoparquet.arrow` (GeoParquet 1.1: WKB `geometry`, a `bbox` struct column
(xmin, ymin, xmax, ymax) declared as the geometry's covering, properties as top-level columns, `datetime`
a UTC timestamp). Items are converted in chunks against a fixed Arrow schema, so memory stays flat in the
number of items and every chunk has the same column types (an inferred schema would, for example, type
an all-empty `spectralearth:duplicates` chunk as a list of nulls).

Hrefs (links, the Zarr asset) are absolute: where the build was when its catalog was written (a local
build's absolute path, or its `s3://` URI), since a row is read on its own (DuckDB, a STAC server,
xpystac) without the JSON tree around it. A build moved since then is rebased by `rebase_href` (the
location it was written for is `written_build_root`). `stac/scenes.parquet` holds the scene items the same
way (`write_inferred_items_parquet`: their assets vary with the packaging, so types are inferred).
Rows are in catalog order (zone, 64 x 64-cell block, location, time), so row groups are spatially compact
and their bbox statistics let readers skip most of them.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import pyarrow as pa

from stac.builders import join_uri

ROW_GROUP_SIZE = 8192

_LINK = pa.struct(
    [("rel", pa.string()), ("href", pa.string()), ("type", pa.string()), ("title", pa.string())]
)
_OPEN_KWARGS = pa.struct([("engine", pa.string()), ("consolidated", pa.bool_()), ("zarr_format", pa.int64())])
_DATASET_ASSET = pa.struct(
    [
        ("href", pa.string()),
        ("type", pa.string()),
        ("title", pa.string()),
        ("description", pa.string()),
        ("roles", pa.list_(pa.string())),
        ("xarray:open_kwargs", _OPEN_KWARGS),
    ]
)


def patch_item_schema(flags: Sequence[str]) -> pa.Schema:
    """Arrow schema of a patch item in its JSON shape (geometry as WKB), as `build.patch_item` makes it."""
    f64, i64, text = pa.float64(), pa.int64(), pa.string()
    properties = pa.struct(
        [
            ("datetime", text),
            ("platform", text),
            ("instruments", pa.list_(text)),
            ("gsd", f64),
            ("processing:level", text),
            ("processing:facility", text),
            ("proj:code", text),
            ("proj:shape", pa.list_(i64)),
            ("proj:transform", pa.list_(f64)),
            ("proj:bbox", pa.list_(f64)),
            ("eo:cloud_cover", f64),
            ("eo:snow_cover", f64),
            ("view:off_nadir", f64),
            ("view:azimuth", f64),
            ("view:sun_azimuth", f64),
            ("view:sun_elevation", f64),
            ("sat:orbit_state", text),
            ("sat:absolute_orbit", i64),
            ("grid:code", text),
            ("processing:version", text),
            ("processing:datetime", text),
            ("spectralearth:row", i64),
            ("spectralearth:location_id", text),
            ("spectralearth:n_dates", i64),
            ("spectralearth:scene_id", text),
            ("spectralearth:datatake_id", text),
            ("spectralearth:scene_window", pa.list_(i64)),
            ("spectralearth:duplicates", pa.list_(text)),
            ("spectralearth:quality_fractions", pa.struct([(flag, f64) for flag in flags])),
        ]
    )
    return pa.schema(
        [
            ("type", text),
            ("stac_version", text),
            ("stac_extensions", pa.list_(text)),
            ("id", text),
            ("geometry", pa.binary()),
            ("bbox", pa.list_(f64)),
            ("properties", properties),
            ("links", pa.list_(_LINK)),
            ("assets", pa.struct([("dataset", _DATASET_ASSET)])),
            ("collection", text),
        ]
    )


def batched(values: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(values)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _check_keys(items: Iterable[dict[str, Any]], schema: pa.Schema) -> Iterator[dict[str, Any]]:
    """Pass items through, failing loudly on a property the fixed schema would silently drop."""
    known = {field.name for field in schema.field("properties").type}
    for item in items:
        extra = set(item["properties"]) - known
        if extra:
            raise ValueError(f"item {item['id']}: properties {sorted(extra)} missing from the parquet schema")
        yield item


def _to_arrow(items: list[dict[str, Any]], schema: pa.Schema) -> pa.RecordBatch:
    """One chunk of JSON-shaped items as a stac-geoparquet record batch.

    Geometries are encoded to WKB here (stac_geoparquet's `StacJsonBatch.from_dicts` would deep-copy
    every item first, which dominated the run time); the flattening of properties, the timestamp and
    bbox-struct conversion and the geoarrow metadata are stac_geoparquet's own (`to_arrow_batch`; private
    in 0.8, hence the pin stac-geoparquet<0.9)."""
    from stac_geoparquet.arrow._batch import StacJsonBatch

    wkb = _wkb([item["geometry"] for item in items])
    rows = [{**item, "geometry": geometry} for item, geometry in zip(items, wkb, strict=True)]
    array = pa.array(rows, type=pa.struct(schema))
    batch = StacJsonBatch(pa.RecordBatch.from_struct_array(array))
    return batch.to_arrow_batch(drop_invalid_properties=False).inner


def _empty_batch(schema: pa.Schema) -> pa.RecordBatch:
    """No rows, with exactly the columns and types a non-empty chunk converts to (stac_geoparquet's
    conversion cannot run on zero rows, so one placeholder item is converted and sliced away)."""
    placeholder = {
        "type": "Feature",
        "id": "placeholder",
        "geometry": {"type": "Polygon", "coordinates": [[[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]]},
        "bbox": [0.0, 0.0, 1.0, 1.0],
        "properties": {"datetime": "1970-01-01T00:00:00Z"},
        "links": [],
        "assets": {},
    }
    return _to_arrow([placeholder], schema).slice(0, 0)


def _wkb(geometries: list[dict[str, Any]]) -> list[bytes]:
    """ISO WKB of GeoJSON geometries; 2-D polygons (every patch item) are built array-wise, since one
    shapely object per item cost more than the rest of the conversion."""
    import numpy as np
    import shapely
    from shapely.geometry import shape

    def one_by_one() -> list[bytes]:
        return [shapely.to_wkb(shape(geometry), flavor="iso") for geometry in geometries]

    if not geometries or any(g.get("type") != "Polygon" or not g.get("coordinates") for g in geometries):
        return one_by_one()
    rings = [ring for geometry in geometries for ring in geometry["coordinates"]]
    try:
        points = np.asarray([point for ring in rings for point in ring], dtype=np.float64)
    except ValueError:  # points of mixed dimension
        return one_by_one()
    if points.ndim != 2 or points.shape[1] != 2 or any(len(ring) < 4 for ring in rings):
        return one_by_one()
    ring_offsets = np.cumsum([0, *(len(ring) for ring in rings)])
    if not (points[ring_offsets[:-1]] == points[ring_offsets[1:] - 1]).all():  # shape() closes open rings
        return one_by_one()
    polygon_offsets = np.cumsum([0, *(len(geometry["coordinates"]) for geometry in geometries)])
    polygons = shapely.from_ragged_array(
        shapely.GeometryType.POLYGON, points, (ring_offsets, polygon_offsets)
    )
    return list(shapely.to_wkb(polygons, flavor="iso"))


def write_items_parquet(
    store: Any,
    relative: str,
    items: Iterable[dict[str, Any]],
    flags: Sequence[str],
    collection: dict[str, Any] | None = None,
) -> None:
    """Write `items` (JSON-shaped dicts, hrefs already relative to the parquet file) to `relative`.

    Through a local temporary file, then one atomic `store.write_bytes` (a single PUT on S3).
    """
    from stac_geoparquet.arrow import to_parquet

    schema = patch_item_schema(flags)
    batches = (_to_arrow(chunk, schema) for chunk in batched(_check_keys(items, schema), ROW_GROUP_SIZE))
    first = next(batches, None)
    if first is None:  # a build that kept no patch: a valid, empty table with the same columns
        first = _empty_batch(schema)
    reader = pa.RecordBatchReader.from_batches(first.schema, itertools.chain([first], batches))
    handle, temporary = tempfile.mkstemp(suffix=".parquet")
    os.close(handle)
    try:
        to_parquet(
            reader,
            temporary,
            collections=None if collection is None else {collection["id"]: collection},
            compression="zstd",
            write_statistics=True,
        )
        with open(temporary, "rb") as stream:
            store.write_bytes(relative, stream.read())
    finally:
        os.remove(temporary)


def write_inferred_items_parquet(
    store: Any, relative: str, items: Sequence[dict[str, Any]], collection: dict[str, Any]
) -> None:
    """Items whose shape varies (scene items: their assets depend on how each product was packed) as
    stac-geoparquet, column types inferred from all of them; through a local temporary file, then one
    atomic `store.write_bytes`."""
    from stac_geoparquet.arrow import parse_stac_items_to_arrow, to_parquet

    reader = parse_stac_items_to_arrow(list(items), schema="FullFile", drop_invalid_properties=False)
    handle, temporary = tempfile.mkstemp(suffix=".parquet")
    os.close(handle)
    try:
        to_parquet(
            reader,
            temporary,
            collections={collection["id"]: collection},
            compression="zstd",
            write_statistics=True,
        )
        with open(temporary, "rb") as stream:
            store.write_bytes(relative, stream.read())
    finally:
        os.remove(temporary)


# Where the hrefs point --------------------------------------------------------------------------------
def written_build_root(items_parquet: Any) -> str | None:
    """The build location (absolute path or URI) an items.parquet was written for: its first item's
    `root` link is the absolute href of `<build>/stac/catalog.json`. None when its hrefs are relative
    (catalogs written before items.parquet carried absolute hrefs) or it has no row. `items_parquet` is
    a path or an open binary file."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(items_parquet)
    if parquet.metadata.num_rows == 0:
        return None
    first = parquet.read_row_group(0, columns=["links"]).column("links")[0].as_py() or []
    suffix = "/stac/catalog.json"
    for entry in first:
        href = entry.get("href") or ""
        if entry.get("rel") == "root" and href.endswith(suffix) and ("://" in href or href.startswith("/")):
            return str(href[: -len(suffix)])
    return None


def rebase_href(href: str, build_root: str, written_root: str | None) -> str:
    """An href of items.parquet as it resolves for the build now at `build_root`: an absolute href
    under `written_root` (where the build was when the catalog was written) moved onto `build_root`;
    a relative one resolved against the parquet file (`<build_root>/stac/`); any other returned as is."""
    if "://" not in href and not href.startswith("/"):
        return join_uri(f"{build_root}/stac", href)
    if written_root is not None and written_root != build_root and href.startswith(written_root + "/"):
        return build_root + href[len(written_root) :]
    return href
