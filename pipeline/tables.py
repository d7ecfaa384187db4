"""Every output of a build, declared once: its path (relative to the build), the stage that makes it,
and, for tables and JSON records, what a reader may rely on.

Stages import their paths from here, and read what an earlier stage wrote through `read_table_checked`,
`read_geodataframe_checked` or `read_json_checked`: a file that is truncated, holds random bytes, lacks
a required column (or key) or has one of an incompatible type raises `CorruptOutput`, a ValueError
whose one line names the file, what is wrong, and which stage remakes it. A missing file raises
`MissingOutput` (a CorruptOutput). I/O errors while fetching the bytes (network, permission, disk) are
not caught here: they are faults of the environment, not of the file, and must reach the retry logic.

Declared types are the Arrow types today's writers produce. A reader accepts the compatible family,
because pandas and pyarrow do not always pick the same width for the same data: `string` or
`large_string`, any integer width, `list` or `large_list` with a compatible element (a list column
whose every list is empty is written as `list<null>`), any timestamp unit. A column of Arrow type
`null` (every value missing) is accepted in an empty table, or where the column is declared nullable.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import BuildFault
from pipeline.quality import FLAG_NAMES

if TYPE_CHECKING:
    from pipeline.storage import BuildStore

# Paths ---------------------------------------------------------------------------------------------

STAGES_DIR = "_stages"

SCENES = "inventory/scenes.parquet"
INVENTORY_REJECTED = "inventory/rejected.parquet"
INVENTORY_SOURCES = "inventory/sources.json"  # per-source results, reused by an incremental inventory

MASKS = "mask/masks.parquet"
MASK_REJECTED = "mask/rejected.parquet"

PLAN_PATCHES = "plan/patches.parquet"
PLAN_REJECTED = "plan/rejected.parquet"

INDEX_PATCHES = "index/patches.parquet"
INDEX_LOCATIONS = "index/locations.parquet"
INDEX_RETIRED = "index/retired.parquet"
INDEX_LINEAGE = "index/lineage.json"

DATASET = "dataset.zarr"
DATASET_METADATA = f"{DATASET}/zarr.json"
SHARDS = "write/shards.parquet"
SHARD_RECORDS = "write/shards"
STATS_MEAN = "stats/mean.npy"
STATS_STD = "stats/std.npy"
STATS_SUMMARY = "stats/statistics.json"

STAC_DIR = "stac"
STAC_ROOT = f"{STAC_DIR}/catalog.json"
STAC_ITEMS = f"{STAC_DIR}/items.parquet"

REPORT = "report/index.html"
SPLITS_DIR = "splits"

# The rejections of each stage that can reject a product (same columns for all three).
REJECTED_BY_STAGE = {"inventory": INVENTORY_REJECTED, "mask": MASK_REJECTED, "tile": PLAN_REJECTED}


def mask_raster(scene_id: str) -> str:
    """`mask/<scene_id>.tif`: the uint16 quality flags of one scene on its own grid."""
    return f"mask/{scene_id}.tif"


def shard_record(shard: int) -> str:
    """`write/shards/<shard>.json` (six digits): the content keys and checksums of one stored shard."""
    return f"{SHARD_RECORDS}/{shard:06d}.json"


def shard_object(array: str, shard: int, ndim: int) -> str:
    """Store key of one shard of a Zarr array (default chunk key encoding: `c/<i>/0/0...`)."""
    return f"{DATASET}/{array}/c/{shard}" + "/0" * (ndim - 1)


def stage_record(stage: str) -> str:
    """`_stages/<stage>.json`: what a stage did, with which configuration and inputs."""
    return f"{STAGES_DIR}/{stage}.json"


def split_files(name: str) -> tuple[str, str]:
    """`splits/<name>.parquet` and `splits/<name>.json`."""
    return f"{SPLITS_DIR}/{name}.parquet", f"{SPLITS_DIR}/{name}.json"


def producer_of(path: str) -> str:
    """The stage that (re)makes `path`: what to rerun when it is missing or corrupt."""
    if path.startswith(f"{STAGES_DIR}/"):
        return path.removeprefix(f"{STAGES_DIR}/").removesuffix(".json")
    for prefix, stage in (
        ("inventory/", "inventory"),
        ("mask/", "mask"),
        ("plan/", "tile"),
        ("index/", "dedup"),
        (f"{DATASET}/", "write"),
        ("write/", "write"),
        ("stats/", "write"),
        (f"{STAC_DIR}/", "catalog"),
        ("report/", "report"),
        (f"{SPLITS_DIR}/", "split"),
    ):
        if path.startswith(prefix) or path == prefix.rstrip("/"):
            return stage
    return "run"


# Errors --------------------------------------------------------------------------------------------


class CorruptOutput(BuildFault, ValueError):
    """A build file that cannot be trusted; its one-line message names it and what remakes it."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        self.stage = producer_of(path)
        super().__init__(self._message())

    def _message(self) -> str:
        return f"{self.path} is corrupt ({self.reason}): rerun {self.stage}"

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across Dask workers
        return (type(self), (self.path, self.reason))


class MissingOutput(CorruptOutput):
    """A build file that should exist and does not."""

    def __init__(self, path: str, reason: str = "missing") -> None:
        super().__init__(path, reason)

    def _message(self) -> str:
        return f"{self.path} is missing: run {self.stage}"


# Table schemas -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type: pa.DataType
    nullable: bool = False  # may be all-null (Arrow type `null`) in a non-empty table


@dataclass(frozen=True, slots=True)
class TableSchema:
    """The columns a reader of one table relies on (a table may hold more)."""

    path: str
    columns: tuple[Column, ...]
    geometry: str | None = None  # the GeoParquet geometry column, for GeoDataFrame tables

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def arrow_schema(self) -> pa.Schema:
        return pa.schema([(c.name, c.type) for c in self.columns])


def _columns(*pairs: tuple[str, pa.DataType], nullable: tuple[str, ...] = ()) -> tuple[Column, ...]:
    return tuple(Column(name, kind, name in nullable) for name, kind in pairs)


_TEXT, _INT, _FLOAT, _BOOL, _WKB = pa.string(), pa.int64(), pa.float64(), pa.bool_(), pa.binary()
_TIME = pa.timestamp("us", tz="UTC")
_FRACTIONS = tuple((f"{flag}_fraction", _FLOAT) for flag in FLAG_NAMES)


@dataclass(frozen=True, slots=True)
class Rejection:
    """A product a stage refused, and why: one row of `<stage>/rejected.parquet` (REJECTED_COLUMNS)."""

    source_uri: str
    scene_id: str | None
    stage: str
    reason: str


REJECTED_COLUMNS = _columns(
    ("source_uri", _TEXT), ("scene_id", _TEXT), ("stage", _TEXT), ("reason", _TEXT), nullable=("scene_id",)
)

SCENES_SCHEMA = TableSchema(
    SCENES,
    _columns(
        ("scene_id", _TEXT),
        ("datatake_id", _TEXT),
        ("tile_id", _INT),
        ("start_time", _TIME),
        ("stop_time", _TIME),
        ("datatake_start", _TIME),
        ("processor_version", _TEXT),
        ("processing_time", _TIME),
        ("epsg", _INT),
        ("transform", pa.list_(_FLOAT)),
        ("width", _INT),
        ("height", _INT),
        ("band_count", _INT),
        ("wavelengths_nm", pa.list_(_FLOAT)),
        ("fwhm_nm", pa.list_(_FLOAT)),
        ("no_data_bands", pa.list_(_INT)),
        ("cloud_cover", _FLOAT),
        ("cloud_shadow", _FLOAT),
        ("haze_cover", _FLOAT),
        ("cirrus_cover", _FLOAT),
        ("snow_cover", _FLOAT),
        ("water_cover", _FLOAT),
        ("sun_elevation", _FLOAT),
        ("sun_azimuth", _FLOAT),
        ("across_off_nadir", _FLOAT),
        ("along_off_nadir", _FLOAT),
        ("scene_azimuth", _FLOAT),
        ("orbit_number", _INT),
        ("orbit_direction", _TEXT),
        ("source_uri", _TEXT),
        ("packaging", _TEXT),
        ("variant", _TEXT),
        ("container_uri", _TEXT),
        ("inner_zip", _TEXT),
        ("members", _TEXT),
        ("fingerprint", _TEXT),
        ("metadata_schema", _TEXT),
        ("footprint", _WKB),
        nullable=("inner_zip",),
    ),
    geometry="footprint",
)

MASKS_SCHEMA = TableSchema(
    MASKS,
    _columns(
        ("scene_id", _TEXT),
        ("fingerprint", _TEXT),
        ("config_hash", _TEXT),
        ("mask_sha256", _TEXT),
        ("kept_bands", pa.list_(pa.int32())),
        ("empty_kept_bands", pa.list_(pa.int32())),
        ("footprint_pixels", _INT),
        *_FRACTIONS,
    ),
)

PLAN_SCHEMA = TableSchema(
    PLAN_PATCHES,
    _columns(
        ("scene_id", _TEXT),
        ("location_id", _TEXT),
        ("epsg", _INT),
        ("i", _INT),
        ("j", _INT),
        ("col_off", _INT),
        ("row_off", _INT),
        ("size", _INT),
        ("kept", _BOOL),
        ("reason", _TEXT),
        ("disqualifying_pixels", _INT),
        ("x_min", _FLOAT),
        ("y_min", _FLOAT),
        ("x_max", _FLOAT),
        ("y_max", _FLOAT),
        ("start_time", _TIME),
        ("datatake_start", _TIME),
        ("datatake_id", _TEXT),
        ("tile_id", _INT),
        ("processor_version", _TEXT),
        ("scene_transform", pa.list_(_FLOAT)),
        ("mask_sha256", _TEXT),
        *_FRACTIONS,
        ("geometry", _WKB),
        nullable=("reason",),
    ),
    geometry="geometry",
)

_INDEX_PATCH_COLUMNS = (
    ("row", _INT),
    ("patch_id", _TEXT),
    ("location_id", _TEXT),
    ("scene_id", _TEXT),
    ("duplicates", pa.list_(_TEXT)),
    ("acquisition_date", _TEXT),
    ("epsg", _INT),
    ("i", _INT),
    ("j", _INT),
    ("col_off", _INT),
    ("row_off", _INT),
    ("size", _INT),
    ("x_ul", _FLOAT),
    ("y_ul", _FLOAT),
    ("start_time", _TIME),
    ("datatake_id", _TEXT),
    ("tile_id", _INT),
    ("processor_version", _TEXT),
    ("disqualifying_pixels", _INT),
    ("scene_transform", pa.list_(_FLOAT)),
    *_FRACTIONS,
    ("geometry", _WKB),
)

INDEX_PATCHES_SCHEMA = TableSchema(
    INDEX_PATCHES, _columns(*_INDEX_PATCH_COLUMNS, ("n_dates", _INT)), geometry="geometry"
)
INDEX_RETIRED_SCHEMA = TableSchema(
    INDEX_RETIRED, _columns(*_INDEX_PATCH_COLUMNS, ("retired_reason", _TEXT)), geometry="geometry"
)
INDEX_LOCATIONS_SCHEMA = TableSchema(
    INDEX_LOCATIONS,
    _columns(
        ("location_id", _TEXT),
        ("epsg", _INT),
        ("i", _INT),
        ("j", _INT),
        ("n_dates", _INT),
        ("first_date", pa.date32()),
        ("last_date", pa.date32()),
        ("patch_ids", pa.list_(_TEXT)),
        ("neighbour_zone_overlaps", pa.list_(_TEXT)),
        ("geometry", _WKB),
    ),
    geometry="geometry",
)

SHARDS_SCHEMA = TableSchema(
    SHARDS,
    _columns(
        ("shard", _INT),
        ("first_row", _INT),
        ("stop_row", _INT),
        ("reflectance_sha256", _TEXT),
        ("quality_sha256", _TEXT),
        ("scenes", pa.list_(_TEXT)),
        ("moments", _TEXT),  # per-band BandMoments of the shard (JSON)
    ),
)

# The columns `stac.search` and `pipeline.query` read; the full item schema is stac.geoparquet's.
STAC_ITEMS_SCHEMA = TableSchema(
    STAC_ITEMS,
    _columns(
        ("id", _TEXT),
        ("geometry", _WKB),
        ("bbox", pa.struct([("xmin", _FLOAT), ("ymin", _FLOAT), ("xmax", _FLOAT), ("ymax", _FLOAT)])),
        ("datetime", _TIME),
        ("eo:cloud_cover", _FLOAT),
        ("spectralearth:row", _INT),
        ("spectralearth:location_id", _TEXT),
        ("spectralearth:n_dates", _INT),
        ("spectralearth:scene_id", _TEXT),
        nullable=("eo:cloud_cover",),
    ),
)

TABLES: dict[str, TableSchema] = {
    schema.path: schema
    for schema in (
        SCENES_SCHEMA,
        TableSchema(INVENTORY_REJECTED, REJECTED_COLUMNS),
        MASKS_SCHEMA,
        TableSchema(MASK_REJECTED, REJECTED_COLUMNS),
        PLAN_SCHEMA,
        TableSchema(PLAN_REJECTED, REJECTED_COLUMNS),
        INDEX_PATCHES_SCHEMA,
        INDEX_RETIRED_SCHEMA,
        INDEX_LOCATIONS_SCHEMA,
        SHARDS_SCHEMA,
        STAC_ITEMS_SCHEMA,
    )
}


def _family(kind: pa.DataType) -> str:
    for name, test in (
        ("null", pa.types.is_null),
        ("text", lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)),
        ("bool", pa.types.is_boolean),
        ("integer", pa.types.is_integer),
        ("float", pa.types.is_floating),
        ("timestamp", pa.types.is_timestamp),
        ("date", pa.types.is_date),
        ("binary", lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t)),
        ("list", lambda t: pa.types.is_list(t) or pa.types.is_large_list(t)),
        ("struct", pa.types.is_struct),
    ):
        if test(kind):
            return name
    return str(kind)


def compatible(actual: pa.DataType, declared: pa.DataType) -> bool:
    """Whether a column written as `actual` reads as `declared` (same family, element-wise for lists;
    a struct must hold the declared fields)."""
    family = _family(actual)
    if family != _family(declared):
        return False
    if family == "list":
        element = actual.value_type
        return pa.types.is_null(element) or compatible(element, declared.value_type)
    if family == "struct":
        fields = {actual.field(k).name: actual.field(k).type for k in range(actual.num_fields)}
        return all(
            declared.field(k).name in fields
            and compatible(fields[declared.field(k).name], declared.field(k).type)
            for k in range(declared.num_fields)
        )
    return True


def schema_problem(table: pa.Table, schema: TableSchema) -> str | None:
    """What makes `table` unfit to be read as `schema`, in a few words, or None."""
    missing = [c.name for c in schema.columns if c.name not in table.column_names]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        return f"missing column(s) {shown}"
    for column in schema.columns:
        actual = table.schema.field(column.name).type
        if pa.types.is_null(actual) and (table.num_rows == 0 or column.nullable):
            continue
        if not compatible(actual, column.type):
            return f"column {column.name} is {actual}, expected {column.type}"
    return None


def schema_of(path: str) -> TableSchema:
    if path in TABLES:
        return TABLES[path]
    raise KeyError(f"no declared schema for {path}")


# Checked readers -----------------------------------------------------------------------------------


def _fetch(store: BuildStore, path: str) -> bytes:
    """The file's bytes; MissingOutput when it is not there. Other I/O errors propagate unchanged."""
    try:
        return store.read_bytes(path)
    except FileNotFoundError:
        raise MissingOutput(path) from None


def parse_table(data: bytes, schema: TableSchema) -> pa.Table:
    """Pure: the parquet bytes as a validated Arrow table, or CorruptOutput."""
    try:
        # From memory: any error here is about the bytes, never about I/O.
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise CorruptOutput(schema.path, _parquet_reason(data, exc)) from None
    problem = schema_problem(table, schema)
    if problem:
        raise CorruptOutput(schema.path, problem)
    return table


def _parquet_reason(data: bytes, exc: BaseException) -> str:
    if not data:
        return "empty file"
    if data[:4] != b"PAR1":
        return "not a parquet file"
    if data[-4:] != b"PAR1":
        return "truncated parquet file"
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"unreadable parquet: {first[:120]}"


def read_table_checked(store: BuildStore, path: str, schema: TableSchema | None = None) -> pa.Table:
    """Read one of the build's parquet tables and check it against its declared schema."""
    return parse_table(_fetch(store, path), schema or schema_of(path))


def read_geodataframe_checked(store: BuildStore, path: str, schema: TableSchema | None = None) -> Any:
    """`read_table_checked` for a GeoParquet table, as a GeoDataFrame (its geometry column active)."""
    import geopandas

    declared = schema or schema_of(path)
    data = _fetch(store, path)
    parse_table(data, declared)
    try:
        frame = geopandas.read_parquet(io.BytesIO(data))
    except (pa.ArrowException, OSError, ValueError, TypeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CorruptOutput(path, f"not GeoParquet: {first[:120]}") from None
    if declared.geometry and frame.geometry.name != declared.geometry:
        raise CorruptOutput(path, f"geometry column is {frame.geometry.name}, expected {declared.geometry}")
    return frame


# JSON records --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JsonSchema:
    """The keys a reader of one kind of JSON record relies on, with the Python types they may hold."""

    kind: str
    required: Mapping[str, type | tuple[type, ...]]

    def problem(self, value: Any, within: str = "") -> str | None:
        """What is wrong with `value`, or None; `within` names the object it sits in (`attributes.`)."""
        if not isinstance(value, dict):
            return f"{within or 'record'} is not a JSON object but {type(value).__name__}"
        missing = [within + key for key in self.required if key not in value]
        if missing:
            return f"missing key(s) {', '.join(missing[:3])}"
        for key, kinds in self.required.items():
            # JSON true/false parse as bool, a subclass of int: not a count or an index.
            wrong_bool = isinstance(value[key], bool) and bool not in _tuple(kinds)
            if not isinstance(value[key], kinds) or wrong_bool:
                return f"key {within}{key} holds {type(value[key]).__name__}"
        return None


def _tuple(kinds: type | tuple[type, ...]) -> tuple[type, ...]:
    return kinds if isinstance(kinds, tuple) else (kinds,)


STAGE_RECORD_SCHEMA = JsonSchema(
    "stage record",
    {
        "stage": str,
        "config_hash": str,
        "input_fingerprint": str,
        "counts": dict,
        "timings": dict,
        "versions": dict,
        "completed_at": str,
    },
)
SHARD_RECORD_SCHEMA = JsonSchema(
    "shard record",
    {
        "shard": int,
        "first_row": int,
        "stop_row": int,
        "layout_key": str,
        "row_keys": list,
        "active_rows": list,
        "reflectance_sha256": str,
        "reflectance_bytes": int,
        "quality_sha256": str,
        "quality_bytes": int,
        "scenes": list,
        "moments": dict,
    },
)
LINEAGE_SCHEMA = JsonSchema("index lineage", {"lineage": str, "rows": int})
# The Zarr group's metadata as `write` makes it (zarr.json of dataset.zarr).
DATASET_METADATA_SCHEMA = JsonSchema(
    "Zarr group metadata", {"zarr_format": int, "node_type": str, "attributes": dict}
)
DATASET_ATTRIBUTES_SCHEMA = JsonSchema(
    "dataset attributes", {"patch_size": int, "patches_per_shard": int, "n_patches": int}
)
STATISTICS_SCHEMA = JsonSchema(
    "band statistics",
    {"band": list, "wavelength_nm": list, "count": list, "mean": list, "std": list, "min": list, "max": list},
)


def json_schema_of(path: str) -> JsonSchema:
    if path.startswith(f"{STAGES_DIR}/"):
        return STAGE_RECORD_SCHEMA
    if path.startswith(f"{SHARD_RECORDS}/"):
        return SHARD_RECORD_SCHEMA
    known = {
        INDEX_LINEAGE: LINEAGE_SCHEMA,
        DATASET_METADATA: DATASET_METADATA_SCHEMA,
        STATS_SUMMARY: STATISTICS_SCHEMA,
    }
    if path in known:
        return known[path]
    raise KeyError(f"no declared JSON schema for {path}")


def parse_json(path: str, data: bytes, schema: JsonSchema | None = None) -> dict[str, Any]:
    """Pure: the bytes of a JSON record, parsed and checked, or CorruptOutput."""
    declared = schema or json_schema_of(path)
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CorruptOutput(path, "not valid JSON" if data else "empty file") from None
    problem = declared.problem(value)
    if problem is None and declared is DATASET_METADATA_SCHEMA:
        problem = DATASET_ATTRIBUTES_SCHEMA.problem(value["attributes"], within="attributes.")
    if problem is None and declared is STAGE_RECORD_SCHEMA and value["stage"] != producer_of(path):
        problem = f"records stage {value['stage']!r}"
    if problem is None and declared is SHARD_RECORD_SCHEMA and path != shard_record(value["shard"]):
        problem = f"records shard {value['shard']}"
    if problem:
        raise CorruptOutput(path, f"{declared.kind}: {problem}")
    return value


def read_json_checked(store: BuildStore, path: str, schema: JsonSchema | None = None) -> dict[str, Any]:
    """Read one of the build's JSON records (stage record, shard record, lineage, zarr.json, statistics)
    and check that it parses and holds the keys its readers use."""
    return parse_json(path, _fetch(store, path), schema)


def check_written(store: BuildStore, path: str) -> None:
    """Validate any declared output at `path` (table or JSON record); CorruptOutput if it is unfit."""
    reader: Callable[[BuildStore, str], Any]
    if path in TABLES:
        reader = read_geodataframe_checked if TABLES[path].geometry else read_table_checked
    else:
        reader = read_json_checked
    reader(store, path)


# Empty tables --------------------------------------------------------------------------------------


def empty_geodataframe(schema: TableSchema, columns: Sequence[str] | None = None) -> Any:
    """A GeoDataFrame of no rows whose columns have the declared types (so that an empty build's table
    reads like any other: datetimes are datetimes, `kept` is boolean); `columns` picks and orders them
    (an undeclared `*_fraction` column is float64, any other undeclared one untyped)."""
    import geopandas

    declared = {c.name: c.type for c in schema.columns}
    names = list(columns) if columns is not None else list(schema.names)

    def kind(name: str) -> pa.DataType:
        return declared.get(name, pa.float64() if name.endswith("_fraction") else pa.null())

    # numpy has no typed empty list or date column: those are untyped (written as Arrow `null`, which
    # an empty table may hold; pandas' ArrowDtype would keep the type but does not read back).
    frame = pa.schema([(n, kind(n)) for n in names if n != schema.geometry]).empty_table().to_pandas()
    geometry = schema.geometry or "geometry"
    frame[geometry] = geopandas.GeoSeries([], crs="EPSG:4326")
    return geopandas.GeoDataFrame(
        frame[names] if geometry in names else frame, geometry=geometry, crs="EPSG:4326"
    )
