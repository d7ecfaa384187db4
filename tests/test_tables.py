"""pipeline.tables: every table a real build writes matches its declaration, and a damaged output (truncated,
random bytes, a column missing or of another type, unparseable or incomplete JSON) is refused with one line
naming the file and the stage that remakes it."""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from pipeline import tables
from pipeline.cli import main
from pipeline.enmap.synth import SynthConfig, generate
from pipeline.manifest import Manifest
from pipeline.stages import ORDER, BuildContext
from pipeline.storage import BuildStore
from pipeline.tables import CorruptOutput, MissingOutput

REPO = Path(__file__).resolve().parent.parent
BANDS = 30


def small_manifest() -> Manifest:
    demo = Manifest.from_yaml(REPO / "manifests" / "demo.yaml")
    return dataclasses.replace(
        demo, bands=dataclasses.replace(demo.bands, expected_count=BANDS, drop_bands=())
    )


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A whole small build: 3 scenes (one reprocessed), patches kept, dropped and deduplicated."""
    root = tmp_path_factory.mktemp("tables")
    config = SynthConfig(
        seed=3,
        sites=1,
        revisits=2,
        overlapping_tiles=0,
        reprocessed=1,
        width=300,
        height=280,
        bands=BANDS,
        packagings=("folder",),
        formats=("GTiff",),
        cloud_amount=0.0,
    )
    generate(root / "products", config)
    context = BuildContext.create(
        small_manifest(), str(root / "build"), scheduler="synchronous", progress=False
    )
    for stage in ORDER:
        context.run(stage, inputs=[str(root / "products")])
    return root / "build"


@pytest.fixture
def damaged(build: Path, tmp_path: Path) -> BuildStore:
    """A copy of the build that a test may damage."""
    target = tmp_path / "build"
    shutil.copytree(build, target)
    return BuildStore(str(target))


GEO_TABLES = [path for path, schema in tables.TABLES.items() if schema.geometry]
PLAIN_TABLES = [path for path, schema in tables.TABLES.items() if not schema.geometry]


def test_every_declared_table_of_a_real_build_validates(build: Path) -> None:
    store = BuildStore(str(build))
    assert len(store.read_table(tables.INDEX_PATCHES)) > 0, "the build keeps patches"
    for path in GEO_TABLES:
        frame = tables.read_geodataframe_checked(store, path)
        assert frame.geometry.name == tables.TABLES[path].geometry
        assert len(frame) == store.read_table(path).num_rows
    for path in PLAIN_TABLES:
        assert tables.read_table_checked(store, path).equals(store.read_table(path))


def test_declarations_name_every_column_the_writers_write(build: Path) -> None:
    # A writer that adds, drops or renames a column must update its declaration (the STAC items table
    # is stac-geoparquet's, of which the declaration names only what search reads).
    store = BuildStore(str(build))
    for path, schema in tables.TABLES.items():
        written = store.read_table(path).column_names
        if path == tables.STAC_ITEMS:
            assert set(schema.names) <= set(written), path
        else:
            assert sorted(written) == sorted(schema.names), path


def test_json_records_of_a_real_build_validate(build: Path) -> None:
    store = BuildStore(str(build))
    for stage in ORDER:
        record = tables.read_json_checked(store, tables.stage_record(stage))
        assert record["stage"] == stage
    shards = sorted(p.name for p in (build / tables.SHARD_RECORDS).glob("*.json"))
    assert shards
    for name in shards:
        record = tables.read_json_checked(store, f"{tables.SHARD_RECORDS}/{name}")
        assert tables.shard_record(record["shard"]) == f"{tables.SHARD_RECORDS}/{name}"
    assert tables.read_json_checked(store, tables.DATASET_METADATA)["attributes"]["patch_size"] == 128
    assert (
        tables.read_json_checked(store, tables.INDEX_LINEAGE)["rows"]
        == store.read_table(tables.INDEX_PATCHES).num_rows
    )
    assert len(tables.read_json_checked(store, tables.STATS_SUMMARY)["band"]) == BANDS


@pytest.mark.parametrize("path", list(tables.TABLES))
def test_truncated_table_is_corrupt(damaged: BuildStore, path: str) -> None:
    data = damaged.read_bytes(path)
    damaged.write_bytes(path, data[: len(data) // 2])
    with pytest.raises(CorruptOutput) as caught:
        tables.check_written(damaged, path)
    message = str(caught.value)
    assert message == f"{path} is corrupt (truncated parquet file): rerun {tables.producer_of(path)}"
    assert "\n" not in message


@pytest.mark.parametrize("path", list(tables.TABLES))
def test_random_bytes_are_corrupt(damaged: BuildStore, path: str) -> None:
    size = len(damaged.read_bytes(path))
    damaged.write_bytes(path, np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8).tobytes())
    with pytest.raises(CorruptOutput, match=rf"^{path} is corrupt \(not a parquet file\): rerun "):
        tables.check_written(damaged, path)


@pytest.mark.parametrize("path", list(tables.TABLES))
def test_a_missing_column_is_corrupt(damaged: BuildStore, path: str) -> None:
    table = pq.read_table(io.BytesIO(damaged.read_bytes(path)))
    dropped = tables.TABLES[path].names[1]
    damaged.write_table(path, table.drop_columns([dropped]))
    with pytest.raises(CorruptOutput) as caught:
        tables.check_written(damaged, path)
    assert caught.value.path == path
    assert str(caught.value) == f"{path} is corrupt (missing column(s) {dropped}): rerun {caught.value.stage}"


def test_a_column_of_another_type_is_corrupt(damaged: BuildStore) -> None:
    table = pq.read_table(io.BytesIO(damaged.read_bytes(tables.INDEX_PATCHES)))
    position = table.column_names.index("row")
    as_text = pa.array([str(v) for v in table.column("row").to_pylist()])
    damaged.write_table(tables.INDEX_PATCHES, table.set_column(position, "row", as_text))
    with pytest.raises(
        CorruptOutput,
        match=r"^index/patches.parquet is corrupt \(column row is string, expected int64\): rerun dedup$",
    ):
        tables.read_geodataframe_checked(damaged, tables.INDEX_PATCHES)


def test_parquet_without_geoparquet_metadata_is_corrupt_for_a_geo_reader(damaged: BuildStore) -> None:
    table = pq.read_table(io.BytesIO(damaged.read_bytes(tables.SCENES)))
    damaged.write_table(tables.SCENES, table.replace_schema_metadata(None))
    tables.read_table_checked(damaged, tables.SCENES)  # the columns are all there
    with pytest.raises(CorruptOutput, match=r"^inventory/scenes.parquet is corrupt \(not GeoParquet"):
        tables.read_geodataframe_checked(damaged, tables.SCENES)


def test_a_missing_output_names_the_stage_to_run(damaged: BuildStore) -> None:
    damaged.fs.rm(damaged.path(tables.INDEX_LOCATIONS))
    with pytest.raises(MissingOutput) as caught:
        tables.read_geodataframe_checked(damaged, tables.INDEX_LOCATIONS)
    assert str(caught.value) == "index/locations.parquet is missing: run dedup"
    assert isinstance(caught.value, CorruptOutput) and isinstance(caught.value, ValueError)


def test_io_errors_are_not_taken_for_corruption(build: Path) -> None:
    # A permission or network error says nothing about the file: it must reach the retry logic as it is.
    class Unreadable(BuildStore):
        def read_bytes(self, relative: str) -> bytes:
            raise PermissionError(13, "Permission denied", relative)

    with pytest.raises(PermissionError):
        tables.read_table_checked(Unreadable(str(build)), tables.MASKS)
    with pytest.raises(PermissionError):
        tables.read_json_checked(Unreadable(str(build)), tables.stage_record("mask"))


def test_damaged_json_records_are_corrupt(damaged: BuildStore, build: Path) -> None:
    record = tables.stage_record("write")
    damaged.write_bytes(record, damaged.read_bytes(record)[:40])
    with pytest.raises(
        CorruptOutput, match=r"^_stages/write.json is corrupt \(not valid JSON\): rerun write$"
    ):
        tables.read_json_checked(damaged, record)

    shard = sorted((build / tables.SHARD_RECORDS).glob("*.json"))[0].name
    path = f"{tables.SHARD_RECORDS}/{shard}"
    content = json.loads(damaged.read_bytes(path))
    del content["quality_sha256"]
    damaged.write_bytes(path, json.dumps(content).encode())
    with pytest.raises(
        CorruptOutput,
        match=rf"^{path} is corrupt \(shard record: missing key\(s\) quality_sha256\): rerun write$",
    ):
        tables.read_json_checked(damaged, path)

    content = json.loads((build / path).read_text())
    content["shard"] = 7  # a record copied to another shard's name
    damaged.write_bytes(path, json.dumps(content).encode())
    with pytest.raises(CorruptOutput, match=r"records shard 7"):
        tables.read_json_checked(damaged, path)

    metadata = json.loads(damaged.read_bytes(tables.DATASET_METADATA))
    metadata["attributes"]["patches_per_shard"] = "four"
    damaged.write_bytes(tables.DATASET_METADATA, json.dumps(metadata).encode())
    with pytest.raises(
        CorruptOutput,
        match=r"^dataset.zarr/zarr.json is corrupt \(Zarr group metadata: key attributes.patches_per_shard "
        r"holds str\): rerun write$",
    ):
        tables.read_json_checked(damaged, tables.DATASET_METADATA)

    damaged.write_bytes(tables.INDEX_LINEAGE, b"[1, 2]")
    with pytest.raises(CorruptOutput, match=r"index lineage: record is not a JSON object but list"):
        tables.read_json_checked(damaged, tables.INDEX_LINEAGE)

    damaged.write_bytes(tables.stage_record("tile"), damaged.read_bytes(tables.stage_record("mask")))
    with pytest.raises(CorruptOutput, match=r"records stage 'mask'"):
        tables.read_json_checked(damaged, tables.stage_record("tile"))


def test_corrupt_output_crosses_process_boundaries_intact() -> None:
    error = CorruptOutput(tables.INDEX_PATCHES, "truncated parquet file")
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is CorruptOutput and str(again) == str(error) and again.stage == "dedup"
    missing = pickle.loads(pickle.dumps(MissingOutput(tables.SHARDS)))
    assert str(missing) == "write/shards.parquet is missing: run write"


def test_paths_and_their_producers() -> None:
    assert tables.mask_raster("S1") == "mask/S1.tif"
    assert tables.shard_record(12) == "write/shards/000012.json"
    assert tables.shard_object("reflectance", 3, 4) == "dataset.zarr/reflectance/c/3/0/0/0"
    assert tables.shard_object("quality", 3, 3) == "dataset.zarr/quality/c/3/0/0"
    assert tables.stage_record("tile") == "_stages/tile.json"
    assert tables.split_files("blocked") == ("splits/blocked.parquet", "splits/blocked.json")
    producers = {
        tables.SCENES: "inventory",
        tables.MASK_REJECTED: "mask",
        tables.mask_raster("S1"): "mask",
        tables.PLAN_PATCHES: "tile",
        tables.INDEX_RETIRED: "dedup",
        tables.DATASET_METADATA: "write",
        tables.SHARDS: "write",
        tables.STATS_SUMMARY: "write",
        tables.STAC_ITEMS: "catalog",
        tables.stage_record("dedup"): "dedup",
    }
    assert {path: tables.producer_of(path) for path in producers} == producers
    assert set(tables.REJECTED_BY_STAGE) == {"inventory", "mask", "tile"}


def test_empty_tables_have_the_declared_types() -> None:
    for path in GEO_TABLES:
        schema = tables.TABLES[path]
        frame = tables.empty_geodataframe(schema)
        assert len(frame) == 0 and list(frame.columns) == list(schema.names)
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        # Written and read back as any other table: it validates, and no scalar column degrades to
        # `null` (pandas has no typed empty list or date column, so those are written as `null`, which
        # an empty table may hold).
        table = tables.parse_table(buffer.getvalue(), schema)
        untyped_in_pandas = {
            c.name for c in schema.columns if pa.types.is_list(c.type) or pa.types.is_date(c.type)
        }
        degraded = [
            f.name for f in table.schema if pa.types.is_null(f.type) and f.name not in untyped_in_pandas
        ]
        assert degraded == [], path


_FAMILIES = {
    "text": [pa.string(), pa.large_string()],
    "integer": [pa.int8(), pa.int16(), pa.int32(), pa.int64(), pa.uint32()],
    "float": [pa.float32(), pa.float64()],
    "timestamp": [pa.timestamp("us", tz="UTC"), pa.timestamp("ns", tz="UTC"), pa.timestamp("ms")],
    "bool": [pa.bool_()],
}


@given(
    st.sampled_from(sorted(_FAMILIES)),
    st.sampled_from(sorted(_FAMILIES)),
    st.integers(0, 4),
    st.integers(0, 4),
    st.booleans(),
    st.booleans(),
)
def test_compatible_is_same_family_elementwise(
    a: str, b: str, i: int, j: int, list_a: bool, list_b: bool
) -> None:
    # Oracle: two types are compatible exactly when both are lists or both are not, and their
    # (element) types are of the same family.
    actual = _FAMILIES[a][i % len(_FAMILIES[a])]
    declared = _FAMILIES[b][j % len(_FAMILIES[b])]
    if list_a:
        actual = pa.list_(actual) if i % 2 else pa.large_list(actual)
    if list_b:
        declared = pa.list_(declared)
    assert tables.compatible(actual, declared) == (a == b and list_a == list_b)


def test_empty_lists_and_all_null_columns() -> None:
    assert tables.compatible(pa.list_(pa.null()), pa.list_(pa.string()))
    schema = tables.TableSchema(
        "x.parquet", (tables.Column("a", pa.int64()), tables.Column("b", pa.string(), nullable=True))
    )
    empty = pa.table({"a": pa.array([], pa.null()), "b": pa.array([], pa.null())})
    assert tables.schema_problem(empty, schema) is None
    rows = pa.table({"a": pa.array([None], pa.null()), "b": pa.array([None], pa.null())})
    assert tables.schema_problem(rows, schema) == "column a is null, expected int64"


def test_readers_of_a_damaged_build_answer_in_one_line(damaged: BuildStore) -> None:
    def fails_with(*args: str) -> str:
        result = CliRunner().invoke(main, list(args))
        assert result.exit_code != 0 and "Traceback" not in result.output
        return result.output.strip().splitlines()[-1]

    build = damaged.uri
    metadata = damaged.read_bytes(tables.DATASET_METADATA)
    damaged.write_bytes(tables.DATASET_METADATA, metadata[:50])
    assert fails_with("verify", "--build", build).endswith(
        "dataset.zarr/zarr.json is corrupt (not valid JSON): rerun write"
    )
    damaged.write_bytes(tables.DATASET_METADATA, metadata)
    index = damaged.read_bytes(tables.INDEX_PATCHES)
    damaged.write_bytes(tables.INDEX_PATCHES, index[: len(index) // 3])
    expected = "index/patches.parquet is corrupt (truncated parquet file): rerun dedup"
    assert fails_with("verify", "--build", build).endswith(expected)
    report = ("report", "--manifest", str(REPO / "manifests" / "demo.yaml"), "--build", build)
    assert fails_with(*report, "--scheduler", "synchronous").endswith(expected)
