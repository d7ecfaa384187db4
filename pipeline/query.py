"""Stage 7, `query`: find patches through the catalog's geoparquet mirror, then read or export them.

```python
from pipeline.query import query

result = query("build/demo", bbox=(11.0, 47.0, 12.0, 48.0), datetime="2023-06-01/..", max_cloud=5)
ds = result.to_xarray()                      # the matching patches from dataset.zarr
result.export_geotiffs("subset/")            # enmap/<location>/<scene>.tif, the release layout
```
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.cloud import StorageSettings, storage_options_for
from pipeline.storage import BuildStore

ITEMS_PARQUET = "stac/items.parquet"


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
        from pipeline.export import open_patches

        return open_patches(self.store, self.ids, mask_and_scale=mask_and_scale)

    def to_geojson(self) -> dict[str, Any]:
        return dict(self.search.to_geojson())

    def to_table(self) -> Any:
        return self.search.to_table()

    def export_zarr(self, target: str) -> int:
        from pipeline.export import export_zarr

        return export_zarr(self.store, self.ids, target)

    def export_geotiffs(self, target_dir: str | Path) -> list[Path]:
        from pipeline.export import export_geotiffs

        return export_geotiffs(self.store, self.ids, target_dir)


def open_build(build: str | BuildStore, storage: StorageSettings | None = None) -> BuildStore:
    if isinstance(build, BuildStore):
        return build
    settings = storage or StorageSettings.from_dict(None)
    return BuildStore(build, storage_options_for(build, settings))


def query(
    build: str | BuildStore,
    bbox: Sequence[float] | None = None,
    intersects: Any = None,
    datetime: Any = None,
    max_cloud: float | None = None,
    min_dates: int | None = None,
    ids: Iterable[str] | None = None,
    limit: int | None = None,
) -> QueryResult:
    """Search the build's items (STAC API semantics: bbox/intersects, closed datetime interval in UTC,
    `eo:cloud_cover` <= max_cloud, at least min_dates dates at the location, ids, limit)."""
    from stac.search import search

    store = open_build(build)
    if not store.exists(ITEMS_PARQUET):
        raise FileNotFoundError(f"{store.uri_of(ITEMS_PARQUET)} is missing: run the catalog stage first")
    found = search(
        store,
        bbox=bbox,
        intersects=intersects,
        datetime=datetime,
        max_cloud=max_cloud,
        min_dates=min_dates,
        ids=ids,
        limit=limit,
    )
    return QueryResult(store, found)
