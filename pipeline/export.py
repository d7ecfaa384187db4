"""Read and export subsets of a build's patches (stage 7's reading side).

`open_patches` gives the selected patches as one xarray Dataset (lazy, from dataset.zarr);
`export_zarr` writes them as a new dataset.zarr with the same layout; `export_geotiffs` writes one
GeoTIFF per patch in the SpectralEarth release layout `enmap/<location number>/<scene number>.tif`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.dedup import INDEX_PATCHES
from pipeline.storage import BuildStore
from pipeline.write import zarr_store


class SelectionError(ValueError):
    """Patch ids that the build does not hold."""


def _index(store: BuildStore) -> Any:
    if not store.exists(INDEX_PATCHES):
        raise FileNotFoundError(f"{store.uri_of(INDEX_PATCHES)} is missing: build the index first")
    return store.read_geodataframe(INDEX_PATCHES)


def rows_of(store: BuildStore, patch_ids: Sequence[str], index: Any = None) -> list[int]:
    """Zarr rows of the patches, in the order given (`index`: the index table, if already read)."""
    index = _index(store) if index is None else index
    row_by_id = dict(zip(index["patch_id"], index["row"].astype(int), strict=True))
    missing = [pid for pid in patch_ids if pid not in row_by_id]
    if missing:
        raise SelectionError(f"{len(missing)} patch id(s) not in this build, e.g. {missing[0]}")
    return [row_by_id[pid] for pid in patch_ids]


def _open_dataset(store: BuildStore, **kwargs: Any) -> Any:
    import xarray as xr

    return xr.open_zarr(zarr_store(store), consolidated=True, **kwargs)


def open_patches(store: BuildStore, patch_ids: Sequence[str], mask_and_scale: bool = True) -> Any:
    """The patches as an xarray Dataset, in the order given (lazy: nothing is read until used).

    `mask_and_scale=True`: reflectance is float32 (value x 0.0001, NaN for the fill), the values
    `pipeline.loader.to_reflectance` gives. xarray alone decodes to float64, because the scale factor
    is a JSON (double) attribute; the float32 of that double product is the float32 nearest to
    value / 10000 for every int16 value (tests/test_arrays_readers.py). `False`: the stored int16."""
    rows = rows_of(store, patch_ids)
    dataset = _open_dataset(store, mask_and_scale=mask_and_scale).isel(patch=rows)
    if mask_and_scale:
        dataset["reflectance"] = dataset["reflectance"].astype(np.float32)
    return dataset


def export_zarr(
    store: BuildStore, patch_ids: Sequence[str], target: str, patches_per_shard: int | None = None
) -> int:
    """Copy the patches into a new dataset.zarr at `target` with the same layout. Returns the count."""
    import zarr
    from zarr.codecs import BloscCodec

    from pipeline.storage import is_remote

    rows = rows_of(store, patch_ids)
    source = zarr.open_group(zarr_store(store), mode="r")
    reflectance = source["reflectance"]
    assert isinstance(reflectance, zarr.Array)
    per_shard = patches_per_shard or int(str(source.attrs.get("patches_per_shard", 32)))
    blosc = [c for c in reflectance.compressors if isinstance(c, BloscCodec)]
    codec = blosc[0] if blosc else None
    target_store: Any = target
    if is_remote(target):
        from zarr.storage import FsspecStore

        target_store = FsspecStore.from_url(target)
    out = zarr.open_group(target_store, mode="w", zarr_format=3)
    out.attrs.update(
        {
            **dict(source.attrs),
            "n_patches": len(rows),
            "patches_per_shard": per_shard,
            "exported_from": store.uri,
        }
    )
    n = len(rows)
    for name in source.array_keys():
        array = source[name]
        assert isinstance(array, zarr.Array)
        dims = tuple(array.metadata.dimension_names or ())  # type: ignore[union-attr]
        attributes = dict(array.attrs)
        if dims and dims[0] == "patch" and array.ndim > 1:
            shape = (n, *array.shape[1:])
            new = out.create_array(
                name,
                shape=shape,
                chunks=(1, *array.shape[1:]),
                shards=(per_shard, *array.shape[1:]),
                dtype=array.dtype,
                fill_value=array.fill_value,
                compressors=codec,
                dimension_names=dims,
                attributes=attributes,
            )
            # One shard at a time, written whole: reads one patch chunk per row.
            for start in range(0, n, per_shard):
                chunk = rows[start : start + per_shard]
                new[start : start + len(chunk)] = np.stack([array[r] for r in chunk]) if chunk else array[0:0]
        elif dims and dims[0] == "patch":
            values = np.asarray(array[:])[rows] if n else np.asarray(array[:])[:0]
            new = out.create_array(
                name,
                shape=(n,),
                chunks=(max(1, n),),
                dtype=array.dtype if values.dtype.kind not in "UOT" else str,
                dimension_names=dims,
                attributes=attributes,
            )
            if n:
                new[:] = values
        else:
            values = np.asarray(array[:])
            new = out.create_array(
                name,
                shape=values.shape,
                chunks=values.shape,
                dtype=array.dtype,
                dimension_names=dims,
                attributes=attributes,
            )
            new[:] = values
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        zarr.consolidate_metadata(target_store)
    return n


@dataclass(frozen=True, slots=True)
class ReleaseNumbers:
    """The SpectralEarth release numbering of a build: stable for a given build."""

    location_number: dict[str, int]  # rank of location_id among the build's locations, from 0
    scene_number: dict[str, int]  # rank of scene_id among the build's scenes with kept patches, from 0

    @classmethod
    def of(cls, index: Any) -> ReleaseNumbers:
        """From the build's index table (`index/patches.parquet`)."""
        locations = sorted(set(index["location_id"]))
        scenes = sorted(set(index["scene_id"]))
        return cls({loc: k for k, loc in enumerate(locations)}, {s: k for k, s in enumerate(scenes)})

    def relative_path(self, location_id: str, scene_id: str) -> str:
        return f"enmap/{self.location_number[location_id]:07d}/{self.scene_number[scene_id]:05d}.tif"


def export_geotiffs(store: BuildStore, patch_ids: Sequence[str], target_dir: str | Path) -> list[Path]:
    """One GeoTIFF per patch: B x 128 x 128 int16, georeferenced, nodata -32768, release layout."""
    import rasterio
    import zarr

    table = _index(store)  # read once: numbering, rows and per-patch georeferencing
    numbers = ReleaseNumbers.of(table)
    rows = rows_of(store, patch_ids, table)
    index = table.set_index("patch_id")

    group = zarr.open_group(zarr_store(store), mode="r")
    reflectance = group["reflectance"]
    assert isinstance(reflectance, zarr.Array)
    wavelength_array, band_array = group["wavelength"], group["band"]
    assert isinstance(wavelength_array, zarr.Array) and isinstance(band_array, zarr.Array)
    wavelengths = np.asarray(wavelength_array[:])
    band_numbers = np.asarray(band_array[:])
    written = []
    for patch_id, row in zip(patch_ids, rows, strict=True):
        meta = index.loc[patch_id]
        path = Path(target_dir) / numbers.relative_path(meta["location_id"], meta["scene_id"])
        path.parent.mkdir(parents=True, exist_ok=True)
        cube = np.asarray(reflectance[row])
        size = cube.shape[-1]
        pixel = float(str(group.attrs.get("pixel_size_m", 30.0)))
        transform = rasterio.Affine(pixel, 0.0, float(meta["x_ul"]), 0.0, -pixel, float(meta["y_ul"]))
        profile = {
            "driver": "GTiff",
            "dtype": "int16",
            "count": cube.shape[0],
            "width": size,
            "height": size,
            "crs": f"EPSG:{int(meta['epsg'])}",
            "transform": transform,
            "nodata": -32768,
        }
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(cube)
            for k in range(cube.shape[0]):
                dst.set_band_description(k + 1, f"band {int(band_numbers[k])} {float(wavelengths[k]):.2f} nm")
            dst.update_tags(
                patch_id=patch_id,
                scene_id=meta["scene_id"],
                location_id=meta["location_id"],
                scale_factor="0.0001",
            )
        written.append(path)
    return written
