"""`spectralearth publish`: load a build's collections and items into pgstac, for stac-fastapi-pgstac.

For teams that outgrow one items.parquet: PostgreSQL with PostGIS and the pgstac schema (installed with
`pypgstac migrate`). The connection comes from libpq's own sources only: the standard `PG*` environment
variables (PGHOST, PGPORT, PGDATABASE, PGUSER, PGPASSWORD or ~/.pgpass) or a service name from
pg_service.conf (`--service`); a password is never taken on the command line.

Publishing upserts: the collection and every item are inserted or replaced by id, so publishing a build
again after it grew adds the new items and updates the changed ones; items of the collection that the
build no longer holds (a rebuild that dropped patches) are then deleted, so the collection in pgstac holds
exactly the build's items. Items carry the same absolute hrefs as `spectralearth serve` gives them
(rebased onto the build's current location).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from stac.records import iso_utc
from stac.serve import ServedCatalog, ServedCollection, load_catalog

PUBLISH_EXTRA = "install pypgstac with: pip install 'spectralearth-pipeline[serve]' (or `make setup`)"
BATCH_ROWS = 4096
CONNECT_TIMEOUT_S = 10
_SERVICE = re.compile(r"[A-Za-z0-9_.-]+")


def _reason(exc: Exception) -> str:
    """libpq's message on one line (it names host, port and user, never the password)."""
    return " ".join(str(exc).split())


class PublishError(ValueError):
    """The build cannot be published (bad service name, database without pgstac): one line."""


@dataclass(frozen=True, slots=True)
class PublishSummary:
    collection_id: str
    items: int  # patch items upserted
    scene_items: int  # scene items upserted (catalogs that mirror their scenes in scenes.parquet)
    removed: int  # items of the collection in pgstac that the build no longer holds
    database: str  # host/port/database as libpq resolved them (never the password)


def conninfo(service: str | None = None) -> str:
    """The libpq connection string: empty (libpq reads the PG* variables) or `service=NAME`."""
    if service is None:
        return ""
    if not _SERVICE.fullmatch(service):
        raise PublishError(
            f"--service must be a pg_service.conf name (letters, digits, '._-'), got {service!r}"
        )
    return f"service={service}"


def _link(catalog: ServedCatalog, entry: dict[str, Any]) -> dict[str, Any]:
    """A link as stac-fastapi-pgstac passes it on. It reads an href starting with `/` as a path of the
    API itself: a patch's source scene, published too, is linked that way (`/collections/<scenes>/items/
    <scene_id>`, the link's title); a local build's files as `file://` URIs."""
    out = {key: value for key, value in entry.items() if value is not None}
    scenes = catalog.scene_collection_id
    if out.get("rel") == "derived_from" and scenes is not None and out.get("title"):
        return {**out, "href": f"/collections/{scenes}/items/{out['title']}", "type": "application/geo+json"}
    public = catalog.public_href(out["href"])
    out["href"] = Path(public).as_uri() if public.startswith("/") else public
    return out


def _text_times(properties: dict[str, Any]) -> dict[str, Any]:
    """Properties with None dropped and timestamps (read back from parquet) as RFC 3339 text."""
    return {
        key: iso_utc(value) if isinstance(value, datetime) else value
        for key, value in properties.items()
        if value is not None
    }


def served_items(
    catalog: ServedCatalog, collection: ServedCollection | None = None, batch_rows: int = BATCH_ROWS
) -> Iterator[dict[str, Any]]:
    """The items of a collection's stac-geoparquet file (the patch collection by default) as STAC
    dicts, hrefs as clients can open them."""
    import pyarrow.parquet as pq
    from stac_geoparquet.arrow import stac_table_to_items

    collection = collection or catalog.collections[0]
    parquet = pq.ParquetFile(collection.items_parquet)
    for batch in parquet.iter_batches(batch_size=batch_rows):
        for item in stac_table_to_items(batch):
            item["properties"] = _text_times(item["properties"])
            item["bbox"] = [float(v) for v in item["bbox"]]
            item["collection"] = collection.id
            # root/parent/collection/self are the API's to make; the rest keep their resolving hrefs
            item["links"] = [
                _link(catalog, entry)
                for entry in item.get("links", [])
                if entry.get("rel") not in ("root", "parent", "collection", "self")
            ]
            assets = {}
            for key, asset in (item.get("assets") or {}).items():
                if asset is None:  # a key other rows of the file have (inferred columns)
                    continue
                asset = {name: value for name, value in asset.items() if value is not None}
                asset["href"] = catalog.public_href(asset["href"])
                assets[key] = asset
            item["assets"] = assets
            yield item


def publish(build: Any, service: str | None = None) -> PublishSummary:
    """Upsert the build's patch collection and items into the pgstac database libpq connects to."""
    try:
        import psycopg
        from psycopg import OperationalError
        from pypgstac.db import PgstacDB
        from pypgstac.load import Loader, Methods
    except ImportError as exc:
        raise PublishError(f"pypgstac is not installed ({exc.name}): {PUBLISH_EXTRA}") from None

    catalog = load_catalog(build)
    published: dict[str, list[str]] = {collection.id: [] for collection in catalog.collections}

    def recorded(collection: ServedCollection) -> Iterator[dict[str, Any]]:
        for item in served_items(catalog, collection):
            published[collection.id].append(item["id"])
            yield item

    dsn = conninfo(service)
    try:
        # one direct attempt first: libpq's own reason at once (pypgstac's pool would retry for 30 s
        # and log each failure)
        psycopg.connect(dsn, connect_timeout=CONNECT_TIMEOUT_S).close()
    except OperationalError as exc:
        raise PublishError(f"cannot connect to PostgreSQL: {_reason(exc)}") from None
    try:
        with PgstacDB(dsn=dsn) as db:
            version = db.version
            if not version:
                raise PublishError("the database has no pgstac schema: run `pypgstac migrate` first")
            loader = Loader(db=db)
            removed = 0
            for collection in catalog.collections:
                loader.load_collections(iter([collection.document]), insert_mode=Methods.upsert)
                loader.load_items(recorded(collection), insert_mode=Methods.upsert)
                gone = db.query_one(
                    "WITH gone AS (DELETE FROM pgstac.items WHERE collection = %s AND NOT (id = ANY(%s))"
                    " RETURNING 1) SELECT count(*) FROM gone",
                    [collection.id, published[collection.id]],
                )
                removed += int(gone or 0)
            info = db.connect().info
            where = f"{info.host}:{info.port}/{info.dbname}"
    except OperationalError as exc:
        raise PublishError(f"cannot publish to PostgreSQL: {_reason(exc)}") from None
    scenes = catalog.scene_collection_id
    return PublishSummary(
        collection_id=catalog.collection_id,
        items=len(published[catalog.collection_id]),
        scene_items=0 if scenes is None else len(published[scenes]),
        removed=removed,
        database=where,
    )
