"""`spectralearth publish`: load a build's patch collection and items into pgstac, for stac-fastapi-pgstac.

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
from pathlib import Path
from typing import Any

from stac.serve import ServedCatalog, load_catalog

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
    items: int  # upserted
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


def _link_href(catalog: ServedCatalog, href: str) -> str:
    """A link href as stac-fastapi-pgstac passes it on: it reads a link starting with `/` as a path of
    the API itself, so a local build's files are written as `file://` URIs."""
    public = catalog.public_href(href)
    return Path(public).as_uri() if public.startswith("/") else public


def served_items(catalog: ServedCatalog, batch_rows: int = BATCH_ROWS) -> Iterator[dict[str, Any]]:
    """The patch items of items.parquet as STAC dicts, hrefs as clients can open them."""
    import pyarrow.parquet as pq
    from stac_geoparquet.arrow import stac_table_to_items

    from stac.records import iso_utc

    parquet = pq.ParquetFile(catalog.items_parquet)
    for batch in parquet.iter_batches(batch_size=batch_rows):
        times = batch.column(batch.schema.get_field_index("datetime")).to_pylist()
        for index, item in enumerate(stac_table_to_items(batch)):
            item["properties"] = {k: v for k, v in item["properties"].items() if v is not None}
            item["properties"]["datetime"] = iso_utc(times[index])
            item["bbox"] = [float(v) for v in item["bbox"]]
            item["collection"] = catalog.collection_id
            # root/parent/collection/self are the API's to make; the rest keep their resolving hrefs
            item["links"] = [
                {
                    **{k: v for k, v in entry.items() if v is not None},
                    "href": _link_href(catalog, entry["href"]),
                }
                for entry in item.get("links", [])
                if entry.get("rel") not in ("root", "parent", "collection", "self")
            ]
            for asset in item.get("assets", {}).values():
                for key in [k for k, v in asset.items() if v is None]:
                    del asset[key]
                asset["href"] = catalog.public_href(asset["href"])
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
    collection = dict(catalog.collection)
    collection["links"] = [entry for entry in collection.get("links", []) if entry.get("rel") == "license"]
    published: list[str] = []

    def recorded() -> Iterator[dict[str, Any]]:
        for item in served_items(catalog):
            published.append(item["id"])
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
            loader.load_collections(iter([collection]), insert_mode=Methods.upsert)
            loader.load_items(recorded(), insert_mode=Methods.upsert)
            removed = db.query_one(
                "WITH gone AS (DELETE FROM pgstac.items WHERE collection = %s AND NOT (id = ANY(%s))"
                " RETURNING 1) SELECT count(*) FROM gone",
                [catalog.collection_id, published],
            )
            info = db.connect().info
            where = f"{info.host}:{info.port}/{info.dbname}"
    except OperationalError as exc:
        raise PublishError(f"cannot publish to PostgreSQL: {_reason(exc)}") from None
    return PublishSummary(
        collection_id=catalog.collection_id,
        items=len(published),
        removed=int(removed or 0),
        database=where,
    )
