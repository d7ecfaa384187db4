"""Stage 1, `inventory`: find products, check each one, apply the manifest's scene filters.

The pure core is `check_product` (metadata + raster facts in, a `SceneRecord` or a one-line reason
out); `inspect_source` is the per-source Dask task (I/O); `run_inventory` writes
`inventory/scenes.parquet` (GeoParquet), `inventory/rejected.parquet` and `_stages/inventory.json`.
Reading is cheap by design: metadata and raster headers, never the whole cube. A remote folder or ZIP
is read in place through a `pipeline.block_reader.BlockReader` (a few aligned blocks of at least 8 MiB per
product; `mask` is the one stage that reads the cube); a remote tar.gz is streamed once (gzip is
sequential). A truncated raster is caught by reading its last pixel where that costs one seek (a local
folder), and elsewhere (inside a ZIP, where reaching the last pixel would inflate the whole member; on
object storage, where it would cost one more block) by checking that the file holds every byte the
raster's own header says its data occupies.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import rasterio
from rasterio.enums import Interleaving
from rasterio.errors import RasterioError
from rasterio.windows import Window

from pipeline import tables
from pipeline.block_reader import BlockReader, block_reader
from pipeline.engine import (
    ItemStage,
    StageResult,
    WorkItem,
    content_key,
    prune_checkpoints,
    run_items,
    up_to_date,
)
from pipeline.enmap.discovery import ProductLocation, ProductSource, discover
from pipeline.enmap.metadata import MetadataError, SceneMetadata
from pipeline.enmap.names import SPECTRAL_IMAGE, ProductName, ProductNameError, parse_file_name
from pipeline.enmap.product import OpenedProduct, iter_products
from pipeline.enmap.product_errors import ArchiveRejected, ProductError, format_size
from pipeline.errors import TransientError, is_transient, one_line
from pipeline.fetch import product_fetcher
from pipeline.manifest import Manifest
from pipeline.storage import BuildStore, StageRecord, Stopwatch, canonical_json, fingerprint_of, is_remote
from pipeline.tables import Rejection, read_geodataframe_checked, read_table_checked

STAGE = "inventory"
SCENES_TABLE = tables.SCENES
REJECTED_TABLE = tables.INVENTORY_REJECTED
QUALITY_LAYERS = (
    "QL_QUALITY_CLASSES",
    "QL_QUALITY_CLOUD",
    "QL_QUALITY_CLOUDSHADOW",
    "QL_QUALITY_HAZE",
    "QL_QUALITY_SNOW",
    "QL_QUALITY_CIRRUS",
    "QL_PIXELMASK",
)
PIXEL_SIZE_M = 30.0
# The name carries the start time truncated to whole seconds; METADATA.XML the exact one.
START_TIME_TOLERANCE = timedelta(seconds=1)
# What a raster file may hold beyond the end of its full-resolution data (overviews are at most a
# third of it, plus IFDs and tags; generous, since the last block need not be the last bytes); a
# member holding more carries bytes no reader needs, which would only cost an unpack (a cube with
# 20 GiB appended once went to scratch whole).
APPENDED_SLACK_SHARE = 1.0
APPENDED_SLACK_BYTES = 64 * 1024**2


@dataclass(frozen=True, slots=True)
class RasterFacts:
    """What inventory needs to know of one raster, read from its header (and one pixel)."""

    count: int
    width: int
    height: int
    dtype: str
    epsg: int | None
    transform: tuple[float, float, float, float, float, float]


@dataclass(frozen=True, slots=True)
class SceneRecord:
    """One accepted product: a row of `inventory/scenes.parquet`."""

    scene_id: str
    datatake_id: str
    tile_id: int
    start_time: datetime
    stop_time: datetime
    datatake_start: datetime
    processor_version: str
    processing_time: datetime
    epsg: int
    transform: tuple[float, float, float, float, float, float]
    width: int
    height: int
    band_count: int
    wavelengths_nm: tuple[float, ...]
    fwhm_nm: tuple[float, ...]
    no_data_bands: tuple[int, ...]
    cloud_cover: float
    cloud_shadow: float
    haze_cover: float
    cirrus_cover: float
    snow_cover: float
    water_cover: float
    sun_elevation: float
    sun_azimuth: float
    across_off_nadir: float
    along_off_nadir: float
    scene_azimuth: float
    orbit_number: int
    orbit_direction: str
    footprint_lonlat: tuple[tuple[float, float], ...]
    source_uri: str
    packaging: str
    variant: str
    container_uri: str
    inner_zip: str | None
    members: tuple[tuple[str, int], ...]
    fingerprint: str
    metadata_schema: str = ""

    def location(self) -> ProductLocation:
        """Where later stages open this product from, without walking the inputs again."""
        return ProductLocation(
            self.scene_id, self.packaging, self.variant, self.container_uri, self.inner_zip, self.members
        )


def fingerprint(metadata: bytes, location: ProductLocation) -> str:
    """Content fingerprint: the metadata bytes and every file's name and size (no cube read)."""
    digest = hashlib.sha256(metadata)
    digest.update(canonical_json(sorted(location.basenames().items())).encode())
    return digest.hexdigest()


def check_product(
    location: ProductLocation,
    metadata: SceneMetadata,
    rasters: dict[str, RasterFacts],
    metadata_bytes: bytes,
) -> SceneRecord:
    """Cross-check a product's name, metadata, file list and rasters; raise ProductError with the reason."""
    try:
        name = ProductName.parse(location.scene_id)
    except ProductNameError as exc:
        raise ProductError(str(exc)) from None
    _check_names(location, metadata, name)
    _check_files(location, metadata, rasters)
    cube = rasters[SPECTRAL_IMAGE]
    epsg = _check_cube(cube, metadata)
    _check_quality_layers(rasters, cube, metadata)
    if not all(350.0 <= w <= 2600.0 for w in metadata.wavelengths_nm):
        raise ProductError("METADATA.XML band wavelengths outside 350-2600 nm")
    return _scene_record(location, metadata, name, cube, epsg, metadata_bytes)


def _check_names(location: ProductLocation, metadata: SceneMetadata, name: ProductName) -> None:
    """The product name, METADATA.XML's product, datatake, tile and start time agree."""
    if metadata.scene_id != location.scene_id:
        raise ProductError(f"METADATA.XML names product {metadata.scene_id}, not {location.scene_id}")
    if metadata.datatake_id != name.datatake_id or metadata.tile_id != name.tile:
        raise ProductError(
            f"METADATA.XML datatake {metadata.datatake_id} tile {metadata.tile_id} "
            "disagree with the product name"
        )
    if abs(metadata.start_time - name.start) > START_TIME_TOLERANCE:
        raise ProductError(
            f"metadata startTime {metadata.start_time.isoformat()} disagrees with the name's "
            f"{name.start.isoformat()} (more than 1 s apart)"
        )


def _check_files(location: ProductLocation, metadata: SceneMetadata, rasters: dict[str, RasterFacts]) -> None:
    """Every file METADATA.XML lists is there, and every layer the stages read."""
    listed_missing = [f for f in metadata.file_names if not _listed_file_present(f, location)]
    if listed_missing:
        raise ProductError(f"missing file listed in METADATA.XML: {listed_missing[0]}")
    for layer in (SPECTRAL_IMAGE, *QUALITY_LAYERS):
        if layer not in rasters:
            raise ProductError(f"missing file: no {layer} in the product")


def _check_cube(cube: RasterFacts, metadata: SceneMetadata) -> int:
    """SPECTRAL_IMAGE: int16, north-up 30 m, the size, bands and CRS METADATA.XML says; returns its EPSG."""
    if cube.dtype != "int16":
        raise ProductError(f"SPECTRAL_IMAGE is {cube.dtype}, expected int16")
    if cube.count != metadata.band_count:
        raise ProductError(
            f"SPECTRAL_IMAGE has {cube.count} bands, METADATA.XML describes {metadata.band_count}"
        )
    if (cube.width, cube.height) != (metadata.width, metadata.height):
        raise ProductError(
            f"SPECTRAL_IMAGE is {cube.width} x {cube.height} px, "
            f"METADATA.XML says {metadata.width} x {metadata.height}"
        )
    if cube.epsg is None:
        raise ProductError("SPECTRAL_IMAGE has no CRS")
    if cube.epsg != metadata.epsg:
        raise ProductError(
            f"SPECTRAL_IMAGE CRS EPSG:{cube.epsg} disagrees with METADATA.XML {metadata.projection} "
            f"(EPSG:{metadata.epsg})"
        )
    a, b, _, d, e, _ = cube.transform
    if (a, b, d, e) != (PIXEL_SIZE_M, 0.0, 0.0, -PIXEL_SIZE_M):
        raise ProductError(f"SPECTRAL_IMAGE grid is not north-up 30 m (transform {cube.transform})")
    return cube.epsg


def _check_quality_layers(
    rasters: dict[str, RasterFacts], cube: RasterFacts, metadata: SceneMetadata
) -> None:
    """The quality layers are uint8 on the cube's grid; QL_PIXELMASK has a band per spectral band."""
    for layer in QUALITY_LAYERS:
        facts = rasters[layer]
        if (facts.width, facts.height, facts.epsg, facts.transform) != (
            cube.width,
            cube.height,
            cube.epsg,
            cube.transform,
        ):
            raise ProductError(f"{layer} grid disagrees with SPECTRAL_IMAGE")
        if facts.dtype != "uint8":
            raise ProductError(f"{layer} is {facts.dtype}, expected uint8")
    if rasters["QL_PIXELMASK"].count != metadata.band_count:
        raise ProductError(
            f"QL_PIXELMASK has {rasters['QL_PIXELMASK'].count} bands for {metadata.band_count} spectral bands"
        )


def _scene_record(
    location: ProductLocation,
    metadata: SceneMetadata,
    name: ProductName,
    cube: RasterFacts,
    epsg: int,
    metadata_bytes: bytes,
) -> SceneRecord:
    return SceneRecord(
        scene_id=location.scene_id,
        datatake_id=name.datatake_id,
        tile_id=name.tile,
        start_time=metadata.start_time,
        stop_time=metadata.stop_time,
        datatake_start=metadata.datatake_start,
        processor_version=name.processor_version,
        processing_time=name.processing_time,
        epsg=epsg,
        transform=cube.transform,
        width=cube.width,
        height=cube.height,
        band_count=cube.count,
        wavelengths_nm=metadata.wavelengths_nm,
        fwhm_nm=tuple(b.fwhm_nm for b in metadata.bands),
        no_data_bands=metadata.no_data_bands,
        cloud_cover=metadata.quality.cloud,
        cloud_shadow=metadata.quality.cloud_shadow,
        haze_cover=metadata.quality.haze,
        cirrus_cover=metadata.quality.cirrus,
        snow_cover=metadata.quality.snow,
        water_cover=metadata.quality.water,
        sun_elevation=metadata.angles.sun_elevation,
        sun_azimuth=metadata.angles.sun_azimuth,
        across_off_nadir=metadata.angles.across_off_nadir,
        along_off_nadir=metadata.angles.along_off_nadir,
        scene_azimuth=metadata.angles.scene_azimuth,
        orbit_number=metadata.orbit_number,
        orbit_direction=metadata.orbit_direction,
        footprint_lonlat=tuple(metadata.footprint_lonlat()),
        source_uri=location.source_uri,
        packaging=location.packaging,
        variant=location.variant,
        container_uri=location.container_uri,
        inner_zip=location.inner_zip,
        members=location.members,
        fingerprint=fingerprint(metadata_bytes, location),
        metadata_schema=metadata.schema,
    )


def _listed_file_present(listed: str, location: ProductLocation) -> bool:
    """A file METADATA.XML lists is present under its own name, in any case, or spelt as its
    delivery spells that layer (`_COG.tiff` for `.TIF`, `-METADATA.XML.XML` for `-METADATA.XML`)."""
    present = location.basenames()
    if listed in present or listed.lower() in {name.lower() for name in present}:
        return True
    parsed = parse_file_name(listed)
    if parsed is None:
        return False
    keys = {found.key for name in present if (found := parse_file_name(name)) is not None}
    return parsed.key in keys


def read_raster_facts(
    path: str, stored_bytes: int | None = None, read_last_pixel: bool | None = None
) -> RasterFacts:
    """Header facts of one raster, after checking it is whole and holds nothing beyond its data.

    With the file's size (`stored_bytes`, uncompressed for a ZIP member) the data extent its header
    gives is checked against it: truncated when the data ends beyond it, refused when far more bytes
    follow the data than overviews and tags could fill. The last pixel is read where that costs one
    seek (`read_last_pixel`, default: when the size is unknown; never inside a ZIP, where it would
    inflate the whole member). A read that fails because of the storage (permission, network) raises
    TransientError: the product is not rejected for it.
    """
    layer = path.rsplit("-", 1)[-1]
    try:
        with rasterio.open(path) as src:
            extent = data_extent(src) if stored_bytes is not None else None
            if extent is not None and stored_bytes is not None:
                if extent > stored_bytes:
                    raise ProductError(
                        f"unreadable raster {layer}: truncated, its data ends at byte {extent} "
                        f"but the file holds {stored_bytes}"
                    )
                if stored_bytes - extent > extent * APPENDED_SLACK_SHARE + APPENDED_SLACK_BYTES:
                    raise ProductError(
                        f"raster {layer} holds {format_size(stored_bytes)} but its data ends at "
                        f"{format_size(extent)}: {format_size(stored_bytes - extent)} appended beyond it"
                    )
            if read_last_pixel or (read_last_pixel is None and extent is None):
                src.read(src.count, window=Window(src.width - 1, src.height - 1, 1, 1))
            epsg = src.crs.to_epsg() if src.crs else None
            t = src.transform
            return RasterFacts(
                count=src.count,
                width=src.width,
                height=src.height,
                dtype=src.dtypes[0],
                epsg=epsg,
                transform=(t.a, t.b, t.c, t.d, t.e, t.f),
            )
    except RasterioError as exc:
        if is_transient(exc):
            raise TransientError(f"reading raster {layer}: {one_line(exc)}") from exc
        raise ProductError(f"unreadable raster {layer}: {one_line(exc)}") from None


def data_extent(src: Any) -> int | None:
    """Where the raster's data ends in its file, from its header alone (None when unknown): for a
    GeoTIFF the end of the furthest last block of any band, for ENVI the header offset plus the cube."""
    if src.driver == "GTiff":
        block_rows, block_cols = src.block_shapes[0]
        last = f"{(src.width - 1) // block_cols}_{(src.height - 1) // block_rows}"
        bands = range(1, src.count + 1) if src.interleaving == Interleaving.band else [1]
        ends = []
        for band in bands:
            offset = src.get_tag_item(f"BLOCK_OFFSET_{last}", "TIFF", bidx=band)
            size = src.get_tag_item(f"BLOCK_SIZE_{last}", "TIFF", bidx=band)
            if offset is None or size is None:
                return None
            ends.append(int(offset) + int(size))
        return max(ends)
    if src.driver == "ENVI":
        envi = src.tags(ns="ENVI")
        header = int(envi.get("header_offset", 0))
        itemsize = np.dtype(src.dtypes[0]).itemsize
        return header + src.width * src.height * src.count * itemsize
    return None


def inspect_product(
    opened: OpenedProduct, manifest: Manifest, reader: BlockReader | None = None
) -> SceneRecord | Rejection:
    """Check one opened product. With the `reader` it is read through (a remote product read in
    place), a read that failed because of the storage (GDAL reports only "read failed") raises
    TransientError instead of rejecting the product."""
    location = opened.location
    if reader is not None:
        reader.fault = None
    try:
        metadata_bytes = opened.metadata_bytes()
        metadata = SceneMetadata.from_xml(metadata_bytes, max_bytes=manifest.limits.xml_bytes)
        layers = location.layers()
        sizes = dict(location.members)
        # The last pixel of a local folder's raster costs one seek; read in place on object storage
        # it would cost a block (a GET) more per raster: there the header's data extent against the
        # listed size shows truncation (as inside a ZIP), and the last pixel is read only when the
        # extent is unknown.
        last_pixel = (location.packaging == "folder") if reader is None else None
        rasters = {
            layer: read_raster_facts(opened.gdal_path(layer), sizes.get(layers[layer]), last_pixel)
            for layer in (SPECTRAL_IMAGE, *QUALITY_LAYERS)
            if layer in layers
        }
        if reader is not None and reader.fault is not None:
            raise ProductError("a read through the block reader failed")  # the fault is raised below
        record = check_product(location, metadata, rasters, metadata_bytes)
    except (ProductError, MetadataError) as exc:
        if reader is not None and reader.fault is not None:
            fault = reader.fault
            if is_transient(fault):
                raise TransientError(f"reading {location.source_uri}: {one_line(fault)}") from fault
            raise fault from exc
        return Rejection(location.source_uri, location.scene_id, STAGE, str(exc))
    band_problem = manifest.bands.check(record.wavelengths_nm)
    if band_problem:
        return Rejection(location.source_uri, location.scene_id, STAGE, band_problem)
    reason = manifest.filters.reject_reason(record.start_time, record.cloud_cover, record.processor_version)
    if reason:
        return Rejection(location.source_uri, location.scene_id, STAGE, reason)
    return record


def inspect_source(
    source: ProductSource, manifest: Manifest, storage_options: dict | None = None
) -> list[SceneRecord | Rejection]:
    """The per-source task: resolve the source into products and check each one.

    What the products are (corrupt, malformed, over budget, an archive refused whole) comes back as
    rejections; a fault of the storage while listing or reading (OSError, a network or permission
    error from GDAL) raises out of the task, so the stage retries it instead of rejecting anything.
    """
    results: list[SceneRecord | Rejection] = []
    try:
        with contextlib.ExitStack() as stack:
            fetcher = product_fetcher(manifest, storage_options)
            # A remote folder or ZIP is read in place, in large aligned blocks: the ZIP's directory,
            # METADATA.XML and each raster's header and offsets, never the whole cube (mask reads
            # that, once). A tar.gz is fetched whole by the fetcher: gzip is sequential, so reaching
            # the product ZIP inside it streams it once anyway.
            reader = None
            if is_remote(source.uri) and source.kind in ("folder", "zip"):
                reader = stack.enter_context(block_reader(manifest, storage_options, source.uri).serving())
            for item in iter_products(source, storage_options, manifest.limits, fetcher, reader):
                if isinstance(item, Rejection):
                    results.append(item)
                    continue
                results.append(_inspected(item, manifest, reader, source))
    except ArchiveRejected as exc:
        # Refused whole: whatever was read from it before the bad entry is dropped too.
        return [Rejection(source.uri, None, STAGE, str(exc))]
    except ProductError as exc:
        results.append(Rejection(source.uri, None, STAGE, one_line(exc)))
    return results


def _inspected(
    opened: OpenedProduct, manifest: Manifest, reader: BlockReader | None, source: ProductSource
) -> SceneRecord | Rejection:
    result = inspect_product(opened, manifest, reader)
    if isinstance(result, SceneRecord) and source.stamp:
        # The product's fingerprint also covers its files' modification stamps (mtime, ETag)
        # as listed with its source: no byte of the cube is read for it.
        result = replace(result, fingerprint=fingerprint_of([result.fingerprint, source.stamp]))
    return result


def split_duplicates(
    results: list[SceneRecord | Rejection],
) -> tuple[list[SceneRecord], list[Rejection]]:
    """Accepted records with one per scene_id (the first found, by source order), and the rejections."""
    accepted: dict[str, SceneRecord] = {}
    rejected: list[Rejection] = []
    for item in results:
        if isinstance(item, Rejection):
            rejected.append(item)
        elif item.scene_id in accepted:
            first = accepted[item.scene_id].source_uri
            rejected.append(
                Rejection(item.source_uri, item.scene_id, STAGE, f"same product already found at {first}")
            )
        else:
            accepted[item.scene_id] = item
    return sorted(accepted.values(), key=lambda r: r.scene_id), rejected


# Tables ---------------------------------------------------------------------------------------------

REJECTED_SCHEMA = pa.schema(
    [("source_uri", pa.string()), ("scene_id", pa.string()), ("stage", pa.string()), ("reason", pa.string())]
)


def rejected_table(rejections: list[Rejection]) -> pa.Table:
    rows = sorted(rejections, key=lambda r: (r.source_uri, r.scene_id or "", r.reason))
    return pa.Table.from_pylist([asdict(r) for r in rows], schema=REJECTED_SCHEMA)


def scenes_frame(records: list[SceneRecord]) -> Any:
    """GeoDataFrame of accepted scenes, footprint in EPSG:4326 as the geometry."""
    import geopandas
    from shapely.geometry import Polygon

    rows = []
    for record in records:
        row = asdict(record)
        row["footprint"] = Polygon(row.pop("footprint_lonlat"))
        row["transform"] = list(record.transform)
        row["wavelengths_nm"] = list(record.wavelengths_nm)
        row["fwhm_nm"] = list(record.fwhm_nm)
        row["no_data_bands"] = list(record.no_data_bands)
        row["members"] = json.dumps([list(m) for m in record.members])
        rows.append(row)
    columns = [f for f in SceneRecord.__dataclass_fields__ if f != "footprint_lonlat"]
    frame = geopandas.GeoDataFrame(
        rows, columns=[*columns, "footprint"], geometry="footprint", crs="EPSG:4326"
    )
    return frame


def read_scenes(store: BuildStore) -> list[SceneRecord]:
    """The accepted scenes of `inventory/scenes.parquet` (checked against its declared schema)."""
    return records_from_frame(read_geodataframe_checked(store, SCENES_TABLE))


def records_from_frame(frame: Any) -> list[SceneRecord]:
    """SceneRecords back from `inventory/scenes.parquet` (what later stages read)."""
    records = []
    for row in frame.to_dict("records"):
        geometry = row.pop("footprint")
        members = tuple((m, int(s)) for m, s in json.loads(row.pop("members")))
        records.append(
            SceneRecord(
                **{
                    **row,
                    "start_time": row["start_time"].to_pydatetime(),
                    "stop_time": row["stop_time"].to_pydatetime(),
                    "datatake_start": row["datatake_start"].to_pydatetime(),
                    "processing_time": row["processing_time"].to_pydatetime(),
                    "transform": tuple(float(v) for v in row["transform"]),
                    "wavelengths_nm": tuple(float(v) for v in row["wavelengths_nm"]),
                    "fwhm_nm": tuple(float(v) for v in row["fwhm_nm"]),
                    "no_data_bands": tuple(int(v) for v in row["no_data_bands"]),
                    "inner_zip": row["inner_zip"] if isinstance(row["inner_zip"], str) else None,
                },
                footprint_lonlat=tuple(geometry.exterior.coords),
                members=members,
            )
        )
    return records


# Stage I/O ------------------------------------------------------------------------------------------


def source_key(source: ProductSource) -> str:
    payload = [source.kind, source.uri, [list(e) for e in source.entries], source.stamp]
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:24]


def result_to_json(result: SceneRecord | Rejection) -> dict[str, Any]:
    if isinstance(result, Rejection):
        return {"rejection": asdict(result)}
    row = asdict(result)
    for name in ("start_time", "stop_time", "datatake_start", "processing_time"):
        row[name] = getattr(result, name).isoformat()
    return {"record": row}


def result_from_json(data: dict[str, Any]) -> SceneRecord | Rejection:
    if "rejection" in data:
        return Rejection(**data["rejection"])
    row = dict(data["record"])
    for name in ("start_time", "stop_time", "datatake_start", "processing_time"):
        row[name] = datetime.fromisoformat(row[name])
    for name in ("transform", "wavelengths_nm", "fwhm_nm", "no_data_bands"):
        row[name] = tuple(row[name])
    row["footprint_lonlat"] = tuple(tuple(p) for p in row["footprint_lonlat"])
    row["members"] = tuple((m, int(s)) for m, s in row["members"])
    return SceneRecord(**row)


def sources_fingerprint(sources: list[ProductSource]) -> str:
    payload = [[s.kind, s.uri, [list(e) for e in s.entries], s.stamp] for s in sources]
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:16]


def summarise(records: list[SceneRecord], rejections: list[Rejection]) -> dict[str, Any]:
    by_reason: dict[str, int] = {}
    for rejection in rejections:
        # Group reasons by their kind (the text before the first colon), not by their particulars.
        kind = rejection.reason.split(":", 1)[0]
        by_reason[kind] = by_reason.get(kind, 0) + 1
    return {
        "products_found": len(records) + sum(1 for r in rejections if r.scene_id),
        "scenes_accepted": len(records),
        "rejected": len(rejections),
        "rejected_by_reason": dict(sorted(by_reason.items())),
        "datatakes": len({r.datatake_id for r in records}),
        "epsg_codes": sorted({r.epsg for r in records}),
        "processor_versions": sorted({r.processor_version for r in records}),
        "packagings": {
            p: sum(1 for r in records if r.packaging == p) for p in sorted({r.packaging for r in records})
        },
    }


def _outputs_valid(store: Any) -> bool:
    read_geodataframe_checked(store, SCENES_TABLE)
    read_table_checked(store, REJECTED_TABLE)
    return True


def run_inventory(
    manifest: Manifest,
    store: Any,
    inputs: list[str],
    scheduler: Any,
    storage_options: dict | None = None,
    force: bool = False,
) -> StageResult:
    """Discover, check (one content-keyed, checkpointed task per source), and write the inventory
    tables and stage record. A source listed exactly as before keeps its results."""
    watch = Stopwatch()
    sources, rejections = discover(inputs, storage_options, manifest.limits)
    watch.lap("discover")
    config_hash = manifest.stage_hash(STAGE)
    items = [WorkItem(content_key(source_key(s), config_hash), s.uri, s) for s in sources]
    input_fingerprint = fingerprint_of(
        [sorted(item.key for item in items), sorted(canonical_json(result_to_json(r)) for r in rejections)]
    )
    done = up_to_date(store, STAGE, config_hash, input_fingerprint, lambda: _outputs_valid(store), force)
    if done:
        return done
    stage = ItemStage(
        name=STAGE,
        task=inspect_source,
        task_args=(manifest, storage_options),
        encode=lambda results: [result_to_json(r) for r in results],
        decode=lambda data: [result_from_json(r) for r in data],
        on_failure=lambda item, reason: [Rejection(item.payload.uri, None, STAGE, reason)],
    )
    outcome = run_items(store, stage, items, scheduler, force=force)
    watch.lap("inspect")
    per_source = [outcome.results[item.key] for item in items]
    records, more_rejections = split_duplicates([item for items in per_source for item in items])
    rejections = rejections + more_rejections
    store.write_geodataframe(SCENES_TABLE, scenes_frame(records))
    store.write_table(REJECTED_TABLE, rejected_table(rejections))
    prune_checkpoints(store, STAGE, [item.key for item in items])
    watch.lap("write")
    counts = summarise(records, rejections) | {
        "sources_inspected": outcome.done,
        "sources_reused": outcome.reused,
    }
    store.write_stage_record(StageRecord(STAGE, config_hash, input_fingerprint, counts, watch.timings))
    return StageResult(counts, skipped=False)
