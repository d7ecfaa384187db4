"""Reading a labelled benchmark back: its table, its included patches, its array, its summary."""

from __future__ import annotations

from typing import Any

import zarr

from pipeline.dataset_arrays import DATASET, quiet_zarr, zarr_store
from pipeline.labels.spec import LABELS_DIR
from pipeline.storage import BuildStore

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
    with quiet_zarr():
        group = zarr.open_group(zarr_store(store), mode="r+" if writable else "r", use_consolidated=False)
        try:
            array = group[f"{LABELS_DIR}/{name}"]
        except KeyError:
            raise FileNotFoundError(
                f"{store.uri_of(DATASET)} has no labels/{name}: run `spectralearth labels` first"
            ) from None
    assert isinstance(array, zarr.Array)
    return array
