"""The layout of `dataset.zarr` (Zarr format 3), declared once: where it is, how its arrays are made,
grown and described, and how it is opened quietly.

`reflectance` int16 (patch, band, y, x), one patch per inner chunk, several patches per shard (sharding
codec, Blosc zstd + bitshuffle, fill -32768, CF scale/fill attributes); `quality` uint16 (patch, y, x),
same chunking; 1-D arrays over patch and band. The write stage (`pipeline.write`) preallocates the two
sharded arrays here (the template) and then fills their shards by byte copy; readers (`pipeline.loader`,
`pipeline.export`, `pipeline.labels`) open the same store with `zarr_store` inside `quiet_zarr`.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import numpy as np

from pipeline import tables
from pipeline.errors import is_transient
from pipeline.manifest import Manifest
from pipeline.quality import CF_FLAG_MASKS, CF_FLAG_MEANINGS, NODATA_VALUE
from pipeline.storage import BuildStore

DATASET = tables.DATASET
REFLECTANCE_SCALE = 0.0001


@contextmanager
def quiet_zarr() -> Iterator[None]:
    """zarr 3.1 warns on consolidated v3 metadata and on its variable-length string dtype; both are
    how this dataset is written on purpose (xarray relies on consolidated metadata). Only those two
    warnings are silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        warnings.filterwarnings(
            "ignore", message=r"The data type \(.*\) does not have a Zarr V3 specification"
        )
        yield


def zarr_store(store: BuildStore) -> Any:
    """The zarr store of `dataset.zarr`: a local path, or an fsspec store for object storage."""
    if store.is_local:
        return store.path(DATASET)
    from zarr.storage import FsspecStore

    return FsspecStore.from_url(store.uri_of(DATASET), storage_options=dict(store.storage_options))


def consolidate(store: BuildStore) -> None:
    """Write the consolidated metadata of `dataset.zarr` (one read opens it)."""
    import zarr

    with quiet_zarr():
        zarr.consolidate_metadata(zarr_store(store))


def dataset_attrs(manifest: Manifest, n_patches: int) -> dict[str, Any]:
    return {
        "title": f"{manifest.name}: EnMAP L2A patches",
        "patch_size": manifest.grid.patch_size,
        "pixel_size_m": manifest.grid.pixel_size,
        "patches_per_shard": manifest.write.patches_per_shard,
        "n_patches": n_patches,
        "Conventions": "CF-1.10",
    }


def layout_key(manifest: Manifest, bands: Sequence[tuple[int, float, float]], lineage: str) -> str:
    """What makes stored shards reusable: the band axis, patch size, shard size, codec, index lineage."""
    payload = {
        "bands": [list(b) for b in bands],
        "patch_size": manifest.grid.patch_size,
        "patches_per_shard": manifest.write.patches_per_shard,
        "codec": asdict(manifest.write.codec),
        "lineage": lineage,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _grow_labels(group: Any, rows: int) -> None:
    """Benchmark labels (`labels/<name>`, made by the labels stage) follow the dataset's rows: grown
    with it, the new rows hold 0 ("no label") until the labels stage labels them."""
    import zarr

    if "labels" not in group.group_keys():
        return
    for _, array in group["labels"].arrays():
        assert isinstance(array, zarr.Array)
        if array.shape[0] < rows:
            array.resize((rows, *array.shape[1:]))


def _matching_group(store: BuildStore, layout: str) -> Any | None:
    """The dataset's group when it already holds both sharded arrays with this layout, else None."""
    import zarr

    try:
        group = zarr.open_group(zarr_store(store), mode="r+", zarr_format=3, use_consolidated=False)
        kept = group.attrs.get("layout_key") == layout and {"reflectance", "quality"} <= set(
            group.array_keys()
        )
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return None
    except Exception as exc:
        if is_transient(exc):
            raise
        # Metadata that does not parse is not trusted: the arrays are made afresh (every shard rewritten).
        print(f"write: dataset.zarr's metadata is unreadable ({type(exc).__name__}); writing it afresh")
        return None
    return group if kept else None


def ensure_arrays(
    store: BuildStore, manifest: Manifest, rows: int, bands: Sequence[tuple[int, float, float]], layout: str
) -> bool:
    """Preallocate `reflectance` and `quality` for `rows` patches, reusing the existing arrays (grown
    if needed) when their layout matches. Returns True when the existing arrays were kept."""
    import zarr

    group = _matching_group(store, layout)
    if group is None:
        _create_arrays(store, manifest, rows, bands, layout)
        return False
    for name in ("reflectance", "quality"):
        array = group[name]
        assert isinstance(array, zarr.Array)
        if array.shape[0] != rows:
            array.resize((rows, *array.shape[1:]))
    _grow_labels(group, rows)
    group.attrs.update(dataset_attrs(manifest, rows) | {"layout_key": layout})
    return True


def _create_arrays(
    store: BuildStore, manifest: Manifest, rows: int, bands: Sequence[tuple[int, float, float]], layout: str
) -> None:
    """A new group with the two sharded arrays, empty (every shard is written later)."""
    import zarr
    from zarr.codecs import BloscCname, BloscCodec, BloscShuffle

    size = manifest.grid.patch_size
    per_shard = manifest.write.patches_per_shard
    # A chunk dimension must be at least 1, even along an axis of length 0 (a build that kept no patch,
    # or has no band axis at all, still gets well-formed empty arrays).
    band_chunk = max(1, len(bands))
    settings = manifest.write.codec
    # The codec `pipeline.zarr_chunks.reflectance_codec` / `quality_codec` encode with: the reading
    # pass encodes candidates with those, and shards are assembled from them by byte copy.
    codec = BloscCodec(
        cname=BloscCname(settings.cname),
        clevel=settings.clevel,
        shuffle=BloscShuffle.bitshuffle,
        blocksize=settings.blocksize,
    )
    group = zarr.open_group(zarr_store(store), mode="w", zarr_format=3)
    group.attrs.update(dataset_attrs(manifest, rows) | {"layout_key": layout})
    group.create_array(
        "reflectance",
        shape=(rows, len(bands), size, size),
        chunks=(1, band_chunk, size, size),
        shards=(per_shard, band_chunk, size, size),
        dtype="int16",
        fill_value=NODATA_VALUE,
        compressors=codec,
        dimension_names=("patch", "band", "y", "x"),
        attributes={
            "long_name": "surface reflectance",
            "units": "1",
            "scale_factor": REFLECTANCE_SCALE,
            "add_offset": 0.0,
            "_FillValue": NODATA_VALUE,
            "coordinates": "patch_id location_id scene_id time epsg x_ul y_ul active band wavelength fwhm",
        },
    )
    group.create_array(
        "quality",
        shape=(rows, size, size),
        chunks=(1, size, size),
        shards=(per_shard, size, size),
        dtype="uint16",
        fill_value=0,
        compressors=codec,
        dimension_names=("patch", "y", "x"),
        attributes={
            "long_name": "quality mask bit flags",
            "flag_masks": list(CF_FLAG_MASKS),
            "flag_meanings": CF_FLAG_MEANINGS,
            "coordinates": "patch_id location_id scene_id time epsg x_ul y_ul active",
        },
    )


def row_arrays(
    rows: Any, bands: Sequence[tuple[int, float, float]]
) -> dict[str, tuple[np.ndarray, str, dict[str, Any]]]:
    """The 1-D arrays over patch and band: name -> (values, dimension, attributes)."""
    return {
        "patch_id": (rows["patch_id"].to_numpy(dtype=str), "patch", {}),
        "location_id": (rows["location_id"].to_numpy(dtype=str), "patch", {}),
        "scene_id": (rows["scene_id"].to_numpy(dtype=str), "patch", {}),
        "time": (
            _epoch_microseconds(rows["start_time"]),
            "patch",
            {
                "units": "microseconds since 1970-01-01T00:00:00",
                "calendar": "proleptic_gregorian",
                "standard_name": "time",
            },
        ),
        "epsg": (
            rows["epsg"].to_numpy(dtype="int32"),
            "patch",
            {"long_name": "EPSG code of the patch's UTM CRS"},
        ),
        "x_ul": (
            rows["x_ul"].to_numpy(dtype="float64"),
            "patch",
            {"units": "m", "long_name": "upper-left x"},
        ),
        "y_ul": (
            rows["y_ul"].to_numpy(dtype="float64"),
            "patch",
            {"units": "m", "long_name": "upper-left y"},
        ),
        "active": (
            rows["active"].to_numpy(dtype="uint8"),
            "patch",
            {"long_name": "1: in the index; 0: superseded or dropped, hidden from catalog and queries"},
        ),
        "band": (
            np.array([b[0] for b in bands], dtype="int16"),
            "band",
            {"long_name": "band number in the product"},
        ),
        "wavelength": (np.array([b[1] for b in bands], dtype="float64"), "band", {"units": "nm"}),
        "fwhm": (np.array([b[2] for b in bands], dtype="float64"), "band", {"units": "nm"}),
    }


def write_row_arrays(store: BuildStore, rows: Any, bands: Sequence[tuple[int, float, float]]) -> None:
    """The 1-D arrays over patch (from every row: index patches and retired rows) and over band.

    Small, so rewritten whole on every run. `active` is 1 for rows listed in the index and 0 for rows
    that hold a superseded or dropped patch (kept in place so that no shard has to be rewritten).
    """
    import zarr

    group = zarr.open_group(zarr_store(store), mode="r+", zarr_format=3, use_consolidated=False)
    for name, (values, dimension, attributes) in row_arrays(rows, bands).items():
        array = group.create_array(
            name,
            shape=values.shape,
            chunks=(max(1, len(values)),),
            dtype=values.dtype if values.dtype.kind != "U" else str,
            dimension_names=(dimension,),
            attributes=attributes,
            overwrite=True,
        )
        if len(values):
            array[:] = values


def _epoch_microseconds(times: Any) -> np.ndarray:
    import pandas as pd

    stamps = pd.to_datetime(times, utc=True)
    return np.asarray(
        (stamps - pd.Timestamp("1970-01-01", tz="UTC")) // pd.Timedelta(microseconds=1), dtype="int64"
    )
