"""Stage 7, `query`: find patches through the catalog's geoparquet mirror, then read or export them.

```python
from pipeline.query import query

result = query("build/demo", bbox=(11.0, 47.0, 12.0, 48.0), datetime="2023-06-01/..", max_cloud=5)
ds = result.to_xarray()                      # the matching patches from dataset.zarr
result.export_geotiffs("subset/")            # enmap/<location>/<scene>.tif, the release layout
result.export_geotiffs("cogs/", cog=True)    # the same as Cloud-Optimized GeoTIFFs
query("build/demo", split="blocked:train")   # only that split's patches
```

Parameters that cannot be used (NaN or out-of-range coordinates, malformed GeoJSON, a limit out of range,
an unknown split, ...) raise `QueryError`, a ValueError with a one-line message; see `stac.search`.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Unpack

from pipeline import tables
from pipeline.export import export_geotiffs, export_zarr, open_patches
from pipeline.splits import BUFFER, SPLITS, SPLITS_DIR, split_filter
from pipeline.storage import BuildStore
from pipeline.storage_settings import StorageSettings, refuse_credentials, storage_options_for
from stac.search import QueryError, SearchCriteria, search

ITEMS_PARQUET = tables.STAC_ITEMS
__all__ = ["ITEMS_PARQUET", "QueryError", "QueryResult", "open_build", "query", "split_ids"]


@dataclass
class QueryResult:
    store: BuildStore
    search: Any  # stac.search.SearchResult

    @property
    def ids(self) -> list[str]:
        return list(self.search.ids)

    def __len__(self) -> int:
        return len(self.search.ids)

    def to_xarray(self, mask_and_scale: bool = True) -> Any:

        return open_patches(self.store, self.ids, mask_and_scale=mask_and_scale)

    def to_geojson(self) -> dict[str, Any]:
        return dict(self.search.to_geojson())

    def to_table(self) -> Any:
        return self.search.to_table()

    def export_zarr(self, target: str) -> int:

        return export_zarr(self.store, self.ids, target)

    def export_geotiffs(self, target_dir: str | Path, cog: bool = False) -> list[Path]:

        return export_geotiffs(self.store, self.ids, target_dir, cog=cog)


def open_build(build: str | BuildStore, storage: StorageSettings | None = None) -> BuildStore:
    if isinstance(build, BuildStore):
        return build
    refuse_credentials(build)
    settings = storage or StorageSettings.from_dict(None)
    return BuildStore(build, storage_options_for(build, settings))


def split_ids(store: BuildStore, spec: str | tuple[str, str]) -> set[str]:
    """The patch ids of one part of one split, from "NAME:PART" (e.g. "blocked:train") or (NAME, PART).
    A spec that names nothing raises QueryError listing what the build has."""

    parts = (*SPLITS, BUFFER)
    if isinstance(spec, str):
        name, colon, part = spec.partition(":")
    else:
        name, part = spec
        colon = ":"
    found = sorted(
        posixpath.basename(path).removesuffix(".parquet")
        for path in store.fs.glob(store.path(f"{SPLITS_DIR}/*.parquet"))
    )
    have = (
        f"this build has the splits {', '.join(found)}"
        if found
        else "this build has no split yet (make one with `spectralearth split`)"
    )
    if not colon or not name or not part:
        raise QueryError(f"split must be NAME:PART with PART one of {', '.join(parts)}, got {spec!r}; {have}")
    if name not in found:
        raise QueryError(f"no split named {name!r}; {have}")
    if part not in parts:
        raise QueryError(f"split {name!r} has no part {part!r}; its parts: {', '.join(parts)}")
    return split_filter(store, name, part)


def query(
    build: str | BuildStore, *, split: str | tuple[str, str] | None = None, **criteria: Unpack[SearchCriteria]
) -> QueryResult:
    """Search the build's items (STAC API semantics: bbox/intersects, closed datetime interval in UTC,
    `eo:cloud_cover` <= max_cloud, at least min_dates dates at the location, ids, limit); `split`
    ("NAME:PART") keeps only that part of a split made with `spectralearth split`."""
    store = open_build(build)
    if split is not None:
        wanted = split_ids(store, split)
        ids = criteria.get("ids")
        criteria["ids"] = (
            wanted if ids is None else wanted & {str(i) for i in ([ids] if isinstance(ids, str) else ids)}
        )
    if not store.exists(ITEMS_PARQUET):
        raise FileNotFoundError(f"{store.uri_of(ITEMS_PARQUET)} is missing: run the catalog stage first")
    found = search(store, **criteria)
    return QueryResult(store, found)
