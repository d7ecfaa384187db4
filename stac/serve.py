"""`spectralearth serve`: a STAC API over a build's catalog, read from `stac/items.parquet`.

Built on stac-fastapi with the stac-fastapi-geoparquet backend (DuckDB through rustac), the versions
pinned in the `serve` extra: core, collections, features, item search (bbox, intersects, datetime, ids,
limit, offset paging), CQL2 filters in text and JSON (`eo:cloud_cover`, `spectralearth:n_dates`, ...),
fields and sort, `/queryables` listing the fields a filter can use. DuckDB's spatial extension comes from
the `rustac-duckdb-extensions` wheel, so nothing is downloaded at run time.

What this module adds to the library:
- it needs only the build: the patch collection is found from `stac/catalog.json`, a build on `s3://` is
  served from a local copy of its `items.parquet` (DuckDB here has no httpfs extension);
- hrefs that resolve: `items.parquet` holds absolute hrefs written against the build's location at catalog
  time; when the build has since moved (copied elsewhere, synced to S3) they are rebased onto where it is
  now, and any relative href is resolved against the parquet file. The collection's assets are absolute
  too, and the packaged `spectralearth:*` schema is served at `/schemas/spectralearth/v1.0.0/schema.json`.
"""

from __future__ import annotations

import json
import posixpath
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.query import open_build
from stac.builders import absolute_hrefs
from stac.catalog_writer import ITEMS_PARQUET, ROOT, STAC_DIR, stac_root_of
from stac.geoparquet import rebase_href, written_build_root

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
GEOPARQUET_MEDIA_TYPE = "application/vnd.apache.parquet"
SCHEMA_ROUTE = "/schemas/spectralearth/v1.0.0/schema.json"
SERVE_EXTRA = "install the server with: pip install 'spectralearth-pipeline[serve]' (or `make setup`)"

# The fields a CQL2 filter can name (JSON schema types as in the items; `/queryables` lists them).
QUERYABLES: dict[str, dict[str, Any]] = {
    "id": {"description": "Patch id", "type": "string"},
    "datetime": {"description": "Acquisition start (UTC)", "type": "string", "format": "date-time"},
    "geometry": {"description": "Patch footprint", "$ref": "https://geojson.org/schema/Geometry.json"},
    "eo:cloud_cover": {
        "description": "Cloud pixels, percent",
        "type": "number",
        "minimum": 0,
        "maximum": 100,
    },
    "eo:snow_cover": {"description": "Snow pixels, percent", "type": "number", "minimum": 0, "maximum": 100},
    "spectralearth:n_dates": {"description": "Dates with a patch at the location", "type": "integer"},
    "spectralearth:location_id": {"description": "Grid cell EPSG<code>-<i>-<j>", "type": "string"},
    "spectralearth:scene_id": {"description": "Source product", "type": "string"},
    "spectralearth:row": {"description": "Row in dataset.zarr", "type": "integer"},
    "grid:code": {"description": "Grid cell (= spectralearth:location_id)", "type": "string"},
    "proj:code": {"description": "CRS of the patch, EPSG:<code>", "type": "string"},
    "processing:version": {"description": "EnMAP processor version", "type": "string"},
    "view:sun_elevation": {"description": "Sun elevation, degrees", "type": "number"},
    "view:off_nadir": {"description": "Off-nadir angle, degrees", "type": "number"},
    "sat:orbit_state": {"description": "ascending or descending", "type": "string"},
}


class ServeError(ValueError):
    """The build cannot be served (no catalog, no patch collection): said in one line."""


@dataclass(frozen=True)
class ServedCollection:
    """One collection and the stac-geoparquet file of its items."""

    document: dict[str, Any]  # as clients see it (absolute hrefs, no tree links)
    items_parquet: str  # local path DuckDB reads (the build's own file, or a local copy of it)

    @property
    def id(self) -> str:
        return str(self.document["id"])

    @property
    def holds_patches(self) -> bool:
        return "dataset" in self.document.get("assets", {})


@dataclass(frozen=True)
class ServedCatalog:
    """What the server needs from a build, read once at start: its collections with a stac-geoparquet
    mirror (the patches, and the scenes for catalogs that write `stac/scenes.parquet`)."""

    title: str
    description: str
    catalog_id: str
    collections: tuple[ServedCollection, ...]  # the patch collection first
    build_root: str  # absolute path or URI of the build now
    written_root: str | None  # the build location the parquet's absolute hrefs were written against

    @property
    def collection(self) -> dict[str, Any]:
        """The patch collection."""
        return self.collections[0].document

    @property
    def collection_id(self) -> str:
        return self.collections[0].id

    @property
    def items_parquet(self) -> str:
        return self.collections[0].items_parquet

    @property
    def scene_collection_id(self) -> str | None:
        return next((c.id for c in self.collections if not c.holds_patches), None)

    def find(self, collection_id: str) -> ServedCollection | None:
        return next((c for c in self.collections if c.id == collection_id), None)

    def public_href(self, href: str) -> str:
        """`href` of a served item as a client can open it (see `stac.geoparquet.rebase_href`)."""
        return rebase_href(href, self.build_root, self.written_root)


def _build_root(store: Any) -> str:
    return posixpath.dirname(stac_root_of(store))


def _mirrored_collections(store: Any) -> tuple[list[tuple[str, dict[str, Any], str]], dict[str, Any]]:
    """([(path under stac/, collection, its parquet's path under stac/)], root catalog): the collections
    that mirror their items in a stac-geoparquet asset, found by following the root catalog's links."""
    root_relative = f"{STAC_DIR}/{ROOT}"
    if not store.exists(root_relative):
        raise ServeError(f"{store.uri_of(root_relative)} is missing: run the catalog stage first")
    root = json.loads(store.read_bytes(root_relative))
    found = []
    for entry in root.get("links", []):
        if entry.get("rel") != "child" or "://" in entry["href"] or entry["href"].startswith("/"):
            continue
        relative = posixpath.normpath(entry["href"])
        document = json.loads(store.read_bytes(f"{STAC_DIR}/{relative}"))
        mirrors = [
            asset["href"]
            for asset in document.get("assets", {}).values()
            if "collection-mirror" in asset.get("roles", ()) and asset.get("type") == GEOPARQUET_MEDIA_TYPE
        ]
        if document.get("type") == "Collection" and mirrors:
            parquet = posixpath.normpath(posixpath.join(posixpath.dirname(relative), mirrors[0]))
            if store.exists(f"{STAC_DIR}/{parquet}"):
                found.append((relative, document, parquet))
    found.sort(key=lambda entry: "dataset" not in entry[1].get("assets", {}))  # patches first
    if not found or "dataset" not in found[0][1].get("assets", {}):
        raise ServeError(f"{store.uri_of(root_relative)} links no patch collection with an items.parquet")
    return found, root


def load_catalog(build: Any, cache_dir: str | Path | None = None) -> ServedCatalog:
    """Read what `serve` needs from a build (a path, an `s3://` URI or a `BuildStore`). A remote
    build's parquet files are copied to `cache_dir` (a new temporary folder by default)."""

    store = open_build(build)
    relative_parquet = f"{STAC_DIR}/{ITEMS_PARQUET}"
    if not store.exists(relative_parquet):
        raise ServeError(f"{store.uri_of(relative_parquet)} is missing: run the catalog stage first")
    found, root = _mirrored_collections(store)
    folder: Path | None = None
    collections = []
    for path, document, parquet in found:
        if store.is_local:
            local = store.path(f"{STAC_DIR}/{parquet}")
        else:
            if folder is None:
                folder = (
                    Path(cache_dir)
                    if cache_dir is not None
                    else Path(tempfile.mkdtemp(prefix="spectralearth-"))
                )
                folder.mkdir(parents=True, exist_ok=True)
            local = str(folder / parquet.replace("/", "_"))
            Path(local).write_bytes(store.read_bytes(f"{STAC_DIR}/{parquet}"))
        public = absolute_hrefs(document, path, stac_root_of(store))
        public["links"] = [entry for entry in public["links"] if entry.get("rel") == "license"]
        collections.append(ServedCollection(public, local))
    return ServedCatalog(
        title=str(root.get("title") or "SpectralEarth"),
        description=str(root.get("description") or ""),
        catalog_id=str(root.get("id") or "spectralearth"),
        collections=tuple(collections),
        build_root=_build_root(store),
        written_root=written_build_root(collections[0].items_parquet),
    )


def sort_column(key: str) -> str:
    """`-properties.eo:cloud_cover` -> `-eo:cloud_cover` (the sign, if any, kept)."""
    sign = key[0] if key[:1] in ("+", "-") else ""
    return sign + key[len(sign) :].removeprefix("properties.")


def queryables(collection_id: str | None = None) -> dict[str, Any]:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "queryables" if collection_id is None else f"collections/{collection_id}/queryables",
        "type": "object",
        "title": "SpectralEarth patch queryables",
        "description": "Fields a CQL2 filter (cql2-text or cql2-json) can compare.",
        "properties": QUERYABLES,
        "additionalProperties": True,
    }


def create_app(served: ServedCatalog) -> Any:
    """The FastAPI application serving `served` (import errors name the `serve` extra)."""
    try:
        # the server libraries are an optional extra: imported only when a server is asked for
        from stac.serve_app import build_app
    except ImportError as exc:
        raise ServeError(f"the STAC API server is not installed ({exc.name}): {SERVE_EXTRA}") from None
    return build_app(served)


def free_port(host: str = DEFAULT_HOST) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


@contextmanager
def running(app: Any, host: str = DEFAULT_HOST, port: int | None = None) -> Iterator[str]:
    """Serve `app` from a thread for the duration of the block; yields the base URL. Stopped cleanly
    (uvicorn's graceful exit) when the block ends."""
    import uvicorn

    port = free_port(host) if port is None else port
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="spectralearth-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise ServeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def serve(build: Any, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    """Serve the build until interrupted (Ctrl-C)."""
    try:
        import uvicorn
    except ImportError:
        raise ServeError(f"the STAC API server is not installed (uvicorn): {SERVE_EXTRA}") from None
    with tempfile.TemporaryDirectory(prefix="spectralearth-serve-") as cache:  # a remote build's parquet
        app = create_app(load_catalog(build, cache_dir=cache))
        uvicorn.run(app, host=host, port=port, log_level="info")
