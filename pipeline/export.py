"""Read and export subsets of a build's patches (stage 7's reading side).

`open_patches` gives the selected patches as one xarray Dataset (lazy, from dataset.zarr);
`export_zarr` writes them as a new dataset.zarr with the same layout; `export_geotiffs` writes one
GeoTIFF per patch in the SpectralEarth release layout `enmap/<location number>/<scene number>.tif`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.dataset_arrays import REFLECTANCE_SCALE, quiet_zarr, zarr_store
from pipeline.dedup import INDEX_PATCHES
from pipeline.quality import NODATA_VALUE
from pipeline.storage import BuildStore, is_remote


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
    with quiet_zarr():
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


# Spectral metadata conventions the exported GeoTIFFs follow, so each tool finds the spectrum where it looks:
# GDAL's ENVI driver reports an ENVI header's fields in the "ENVI" domain (dataset: `wavelength = {...}`,
# `fwhm = {...}`, `wavelength_units`), which EnMAP-Box and other spectral tools read from any GDAL raster;
# GDAL 3.10 standardised per-band `CENTRAL_WAVELENGTH_UM`/`FWHM_UM` in the "IMAGERY" domain. The GTiff
# driver keeps every domain in the file's GDAL_METADATA tag (no .aux.xml sidecar).
ENVI_DOMAIN = "ENVI"
IMAGERY_DOMAIN = "IMAGERY"
WAVELENGTH_UNITS = "Nanometers"

# A COG patch: DEFLATE with horizontal differencing (lossless, read by every libtiff), 128 px tiles, and
# GDAL's AUTO overviews, which add none while the patch fits one tile (a 128 px patch is one tile per
# band: an overview would add a quarter to the file for a preview nobody needs at that size) and halve
# down to one tile for larger manifest patch sizes. COPY_SRC_MDD copies the non-default metadata domains
# (ENVI, IMAGERY), which the COG driver otherwise drops. GDAL 3.10's COG driver writes pixel interleave only.
COG_OPTIONS: dict[str, str | int] = {
    "compress": "DEFLATE",
    "predictor": "YES",
    "blocksize": 128,
    "overviews": "AUTO",
    "overview_resampling": "AVERAGE",
    "copy_src_mdd": "YES",
}


@dataclass(frozen=True, slots=True)
class SpectralBand:
    """One band of the build's band axis: the product's band number, centre wavelength and FWHM (nm)."""

    number: int
    wavelength_nm: float
    fwhm_nm: float

    @property
    def description(self) -> str:
        return f"band {self.number}: {_nm(self.wavelength_nm)} nm (FWHM {_nm(self.fwhm_nm)} nm)"


@dataclass(frozen=True, slots=True)
class TiffMetadata:
    """What a patch GeoTIFF says about itself besides its pixels and georeferencing."""

    scale: float
    offset: float
    nodata: int
    descriptions: tuple[str, ...]
    dataset_tags: dict[str, dict[str, str]]  # domain ("" is the default one) -> items
    band_tags: tuple[dict[str, dict[str, str]], ...]  # per band: domain -> items


def _nm(value: float) -> str:
    """A wavelength for people: at most three decimals, no trailing zeros."""
    return f"{float(value):.3f}".rstrip("0").rstrip(".")


def _envi_list(values: Sequence[float]) -> str:
    """An ENVI header list; repr keeps every float exact (it reads back to the same double)."""
    return "{" + ", ".join(repr(float(v)) for v in values) + "}"


def tiff_metadata(
    bands: Sequence[SpectralBand], scale: float, offset: float, nodata: int, identity: dict[str, str]
) -> TiffMetadata:
    """The metadata of one patch GeoTIFF (pure: the same bands give the same metadata)."""
    envi = {
        "wavelength": _envi_list([b.wavelength_nm for b in bands]),
        "fwhm": _envi_list([b.fwhm_nm for b in bands]),
        "wavelength_units": WAVELENGTH_UNITS,
    }
    per_band = tuple(
        {
            ENVI_DOMAIN: {"wavelength": repr(float(b.wavelength_nm)), "fwhm": repr(float(b.fwhm_nm))},
            IMAGERY_DOMAIN: {
                "CENTRAL_WAVELENGTH_UM": repr(float(b.wavelength_nm) / 1000.0),
                "FWHM_UM": repr(float(b.fwhm_nm) / 1000.0),
            },
        }
        for b in bands
    )
    # scale_factor/add_offset as dataset tags too: what the first exports carried, kept for their readers.
    default = {**identity, "scale_factor": repr(scale), "add_offset": repr(offset)}
    return TiffMetadata(
        scale=scale,
        offset=offset,
        nodata=nodata,
        descriptions=tuple(b.description for b in bands),
        dataset_tags={"": default, ENVI_DOMAIN: envi},
        band_tags=per_band,
    )


def _spectral_bands(group: Any) -> list[SpectralBand]:
    numbers, wavelengths, fwhms = (np.asarray(group[name][:]) for name in ("band", "wavelength", "fwhm"))
    return [
        SpectralBand(int(n), float(w), float(f)) for n, w, f in zip(numbers, wavelengths, fwhms, strict=True)
    ]


def write_geotiff(
    path: Path, cube: np.ndarray, profile: dict[str, Any], meta: TiffMetadata, cog: bool
) -> None:
    """One patch cube (bands x rows x columns, written as given) at `path` with its metadata; `profile`:
    dtype, count, width, height, crs, transform, nodata. `cog`: through GDAL's COG driver."""
    import rasterio

    # The COG driver cannot create in place: rasterio fills an in-memory dataset and copies it with the
    # COG driver on close (COPY_SRC_MDD carries the ENVI and IMAGERY domains across).
    options = {"driver": "COG", **COG_OPTIONS} if cog else {"driver": "GTiff"}
    with rasterio.open(path, "w", **profile, **options) as dst:
        dst.write(cube)
        dst.scales = [meta.scale] * cube.shape[0]
        dst.offsets = [meta.offset] * cube.shape[0]
        for k, description in enumerate(meta.descriptions, start=1):
            dst.set_band_description(k, description)
            for domain, items in meta.band_tags[k - 1].items():
                dst.update_tags(k, ns=domain or None, **items)
        for domain, items in meta.dataset_tags.items():
            dst.update_tags(ns=domain or None, **items)


def export_geotiffs(
    store: BuildStore, patch_ids: Sequence[str], target_dir: str | Path, cog: bool = False
) -> list[Path]:
    """One GeoTIFF per patch in the release layout: B x 128 x 128 int16 as stored (bit-exact), georeferenced,
    nodata -32768, band scale 0.0001 and offset 0, each band described (number, wavelength, FWHM) and the
    spectrum in the ENVI and IMAGERY metadata domains, all inside the .tif. `cog`: Cloud-Optimized GeoTIFFs
    (GDAL's COG driver, DEFLATE, 128 px tiles) instead of plain uncompressed ones."""
    import rasterio
    import zarr

    table = _index(store)  # read once: numbering, rows and per-patch georeferencing
    numbers = ReleaseNumbers.of(table)
    rows = rows_of(store, patch_ids, table)
    index = table.set_index("patch_id")

    group = zarr.open_group(zarr_store(store), mode="r")
    reflectance = group["reflectance"]
    assert isinstance(reflectance, zarr.Array)
    bands = _spectral_bands(group)
    attributes = dict(reflectance.attrs)
    scale = float(str(attributes.get("scale_factor", REFLECTANCE_SCALE)))
    offset = float(str(attributes.get("add_offset", 0.0)))
    nodata = int(str(attributes.get("_FillValue", NODATA_VALUE)))
    pixel = float(str(group.attrs.get("pixel_size_m", 30.0)))
    written = []
    for patch_id, row in zip(patch_ids, rows, strict=True):
        patch = index.loc[patch_id]
        path = Path(target_dir) / numbers.relative_path(patch["location_id"], patch["scene_id"])
        path.parent.mkdir(parents=True, exist_ok=True)
        cube = np.asarray(reflectance[row])
        size = cube.shape[-1]
        profile = {
            "dtype": "int16",
            "count": cube.shape[0],
            "width": size,
            "height": size,
            "crs": f"EPSG:{int(patch['epsg'])}",
            "transform": rasterio.Affine(pixel, 0.0, float(patch["x_ul"]), 0.0, -pixel, float(patch["y_ul"])),
            "nodata": nodata,
        }
        identity = {"patch_id": patch_id, "scene_id": patch["scene_id"], "location_id": patch["location_id"]}
        write_geotiff(path, cube, profile, tiff_metadata(bands, scale, offset, nodata, identity), cog)
        written.append(path)
    return written
