"""Golden files for what readers of a build rely on: the dataset's `zarr.json` documents (the group's and
each array's) and every declared table's Arrow schema, both as declared in `pipeline.tables` and as
written by a real build (the session's demo build).

A change to the layout, a codec, an attribute name, a column or its type shows up here as a diff against
tests/golden/. If the change is intended, regenerate the files with `UPDATE_GOLDEN=1` (the same flag as
the STAC golden files in test_stac_catalog.py) and review the diff before committing it.

Volatile values are normalised away so that the files describe the layout, not one build's data: the
number of patches (the first dimension of the patch arrays, the group's `n_patches`) and the per-band
statistics (their numbers; their names and lengths stay)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import tables
from pipeline.storage import BuildStore

GOLDEN = Path(__file__).resolve().parent / "golden"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"
PATCHES = "<patches>"  # stands for the number of patches, which depends on the products


def compare_with_golden(folder: Path, produced: dict[str, Any]) -> None:
    """Each document equals its golden file `folder/<relative>` and no golden file is left over; with
    UPDATE_GOLDEN=1 the folder is rewritten from `produced` first."""
    if UPDATE:
        for existing in folder.rglob("*.json") if folder.exists() else []:
            existing.unlink()
        for relative, document in produced.items():
            target = folder / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    expected = {
        path.relative_to(folder).as_posix(): json.loads(path.read_text(encoding="utf-8"))
        for path in (folder.rglob("*.json") if folder.exists() else [])
    }
    assert expected, f"no golden files in {folder}: run with UPDATE_GOLDEN=1"
    assert sorted(produced) == sorted(expected), "documents differ from the golden files' names"
    for relative, document in produced.items():
        # Through JSON, so tuples and lists compare alike.
        assert json.loads(json.dumps(document)) == expected[relative], (
            f"{relative} differs from its golden file"
        )


# zarr.json ----------------------------------------------------------------------------------------


def normalise_array(metadata: dict[str, Any]) -> dict[str, Any]:
    """An array's zarr.json without its patch count and statistics values."""
    out = dict(metadata)
    if (out.get("dimension_names") or [None])[0] == "patch":
        patches = out["shape"][0]
        out["shape"] = [PATCHES, *out["shape"][1:]]
        grid = out["chunk_grid"]["configuration"]
        if grid["chunk_shape"][0] == patches and len(grid["chunk_shape"]) == 1:  # one chunk: the whole array
            out["chunk_grid"] = {**out["chunk_grid"], "configuration": {**grid, "chunk_shape": [PATCHES]}}
    attributes = dict(out.get("attributes", {}))
    if "band_statistics" in attributes:
        attributes["band_statistics"] = {
            key: f"<{len(value)} numbers>" if isinstance(value, list) else value
            for key, value in attributes["band_statistics"].items()
        }
    out["attributes"] = attributes
    return out


def normalise_group(metadata: dict[str, Any]) -> dict[str, Any]:
    """The group's zarr.json without its patch count; its consolidated metadata normalised like the
    arrays' (and compared key by key, so their order does not matter)."""
    out = dict(metadata)
    attributes = dict(out.get("attributes", {}))
    if "n_patches" in attributes:
        attributes["n_patches"] = PATCHES
    out["attributes"] = attributes
    consolidated = out.get("consolidated_metadata")
    if consolidated:
        out["consolidated_metadata"] = {
            **consolidated,
            "metadata": {name: normalise_array(array) for name, array in consolidated["metadata"].items()},
        }
    return out


def zarr_documents(dataset: Path) -> dict[str, Any]:
    documents = {"zarr.json": normalise_group(json.loads((dataset / "zarr.json").read_text()))}
    for path in sorted(dataset.glob("*/zarr.json")):
        documents[path.relative_to(dataset).as_posix()] = normalise_array(json.loads(path.read_text()))
    return documents


def test_normalising_keeps_the_layout_and_drops_only_the_patch_count() -> None:
    array: dict[str, Any] = {
        "shape": [8, 3],
        "dimension_names": ["patch", "band"],
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [4, 3]}},
        "attributes": {"units": "1", "band_statistics": {"units": "x", "mean": [1.5, 2.0, 3.0]}},
    }
    assert normalise_array(array) == {
        "shape": [PATCHES, 3],
        "dimension_names": ["patch", "band"],
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [4, 3]}},
        "attributes": {"units": "1", "band_statistics": {"units": "x", "mean": "<3 numbers>"}},
    }
    one_chunk: dict[str, Any] = {
        "shape": [8],
        "dimension_names": ["patch"],
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [8]}},
    }
    assert normalise_array(one_chunk)["chunk_grid"]["configuration"]["chunk_shape"] == [PATCHES]
    band = {"shape": [8], "dimension_names": ["band"], "chunk_grid": one_chunk["chunk_grid"]}
    assert normalise_array(band)["shape"] == [8], "only the patch dimension is volatile"
    group: dict[str, Any] = {
        "attributes": {"n_patches": 8, "patch_size": 128},
        "consolidated_metadata": {"metadata": {"a": array}},
    }
    normalised = normalise_group(group)
    assert normalised["attributes"] == {"n_patches": PATCHES, "patch_size": 128}
    assert normalised["consolidated_metadata"]["metadata"]["a"] == normalise_array(array)
    assert array["shape"] == [8, 3] and group["attributes"]["n_patches"] == 8, "inputs left alone"


@pytest.mark.slow
def test_zarr_metadata_matches_the_golden_files(demo_build: BuildStore) -> None:
    documents = zarr_documents(Path(demo_build.path(tables.DATASET)))
    assert {"zarr.json", "reflectance/zarr.json", "quality/zarr.json"} <= set(documents)
    compare_with_golden(GOLDEN / "zarr", documents)


# Table schemas ------------------------------------------------------------------------------------


def schema_fields(schema: pa.Schema) -> list[dict[str, Any]]:
    return [{"name": field.name, "type": str(field.type), "nullable": field.nullable} for field in schema]


def geo_metadata(schema: pa.Schema) -> dict[str, Any] | None:
    """What a GeoParquet reader relies on: the version, primary column and each column's encoding (not
    the bounding boxes, which depend on the data)."""
    raw = (schema.metadata or {}).get(b"geo")
    if raw is None:
        return None
    geo = json.loads(raw)
    return {
        "version": geo.get("version"),
        "primary_column": geo.get("primary_column"),
        "columns": {name: {"encoding": column.get("encoding")} for name, column in geo["columns"].items()},
    }


def golden_name(path: str) -> str:
    return f"{path}.json"


def test_declared_table_schemas_match_the_golden_files() -> None:
    documents = {
        golden_name(path): {
            "path": schema.path,
            "geometry": schema.geometry,
            "columns": [
                {"name": column.name, "type": str(column.type), "nullable": column.nullable}
                for column in schema.columns
            ],
        }
        for path, schema in tables.TABLES.items()
    }
    compare_with_golden(GOLDEN / "tables" / "declared", documents)


@pytest.mark.slow
def test_written_table_schemas_match_the_golden_files(demo_build: BuildStore) -> None:
    documents = {}
    for path in tables.TABLES:
        schema = pq.read_schema(demo_build.path(path))
        documents[golden_name(path)] = {"fields": schema_fields(schema), "geo": geo_metadata(schema)}
    compare_with_golden(GOLDEN / "tables" / "written", documents)
