"""The FastAPI application behind `spectralearth serve`: stac-fastapi with the geoparquet backend, adapted
to a build (see `stac.serve` for what is served and why). Importing this module needs the `serve` extra;
`stac.serve.create_app` turns its absence into a one-line error.
"""

from __future__ import annotations

import json
from typing import Any

import attr
import cql2
from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from rustac import RustacError
from rustac.rustac import DuckdbClient
from rustac_duckdb_extensions import extension_directory
from stac_fastapi.api.app import StacApi
from stac_fastapi.extensions.core.fields import FieldsExtension
from stac_fastapi.extensions.core.filter import SearchFilterExtension
from stac_fastapi.extensions.core.filter.client import BaseFiltersClient
from stac_fastapi.extensions.core.pagination import OffsetPaginationExtension
from stac_fastapi.extensions.core.sort import SortExtension
from stac_fastapi.geoparquet.api import lifespan
from stac_fastapi.geoparquet.client import Client, collection_with_links
from stac_fastapi.geoparquet.models import GetSearchRequestModel, ItemsGetRequestModel, PostSearchRequestModel
from stac_fastapi.geoparquet.settings import Settings
from stac_fastapi.types.errors import NotFoundError

from stac.schema import spectralearth_schema
from stac.serve import GEOPARQUET_MEDIA_TYPE, SCHEMA_ROUTE, ServedCatalog, queryables, sort_column


def checked_filter(kwargs: dict[str, Any], search: Any) -> bool:
    """Parse the request's filter before the backend sees it (rustac answers a filter it cannot parse
    with every item); True when the request has one. A GET filter arrives as text whatever its
    language and rustac reads text as cql2-text, so cql2-json text is rewritten as cql2-text (the
    `next` link, a GET query string, then carries a filter in the language it names). An invalid
    filter is the request's fault: 400."""
    text = kwargs.get("filter_expr")
    language = kwargs.get("filter_lang") or "cql2-text"
    body = getattr(search, "filter_expr", None)
    try:
        if isinstance(text, str) and language == "cql2-json":
            kwargs["filter_expr"] = cql2.parse_json(text).to_text()
            kwargs["filter_lang"] = "cql2-text"
        elif isinstance(text, str):
            cql2.parse_text(text).validate()
        if isinstance(body, dict):
            cql2.Expr(body).validate()
    except (ValueError, cql2.ParseError, cql2.ValidationError) as exc:
        reason = " ".join(str(exc).split())
        raise HTTPException(400, f"invalid {language} filter: {reason}") from None
    return text is not None or body is not None


def bare_sort_keys(kwargs: dict[str, Any], search: Any) -> None:
    """sortby names item fields as `properties.<name>` (STAC API) or `<name>`; DuckDB's columns are the
    bare names."""
    if isinstance(kwargs.get("sortby"), list):
        kwargs["sortby"] = [sort_column(str(key)) for key in kwargs["sortby"]]
    for key in getattr(search, "sortby", None) or []:
        if hasattr(key, "field"):
            key.field = sort_column(key.field)


@attr.s
class BuildClient(Client):
    """The geoparquet client, with the build's collections as clients see them and item hrefs that
    resolve (see `ServedCatalog.public_href`)."""

    served: ServedCatalog = attr.ib(kw_only=True)

    def all_collections(self, **kwargs: Any) -> Any:
        out = super().all_collections(**kwargs)
        out["collections"] = [self.get_collection(c.id, **kwargs) for c in self.served.collections]
        return out

    def get_collection(self, collection_id: str, **kwargs: Any) -> Any:
        found = self.served.find(collection_id)
        if found is None:
            raise NotFoundError(f"Collection does not exist: {collection_id}")
        collection = json.loads(json.dumps(found.document))
        licence = [entry for entry in collection["links"] if entry.get("rel") == "license"]
        collection = collection_with_links(collection, kwargs["request"])
        collection["links"].extend(licence)
        return collection

    def search(self, *, request: Any, url: str, search: Any, **kwargs: Any) -> Any:
        has_filter = checked_filter(kwargs, search)
        bare_sort_keys(kwargs, search)
        try:
            return super().search(request=request, url=url, search=search, **kwargs)
        except RustacError as exc:
            if not has_filter:
                raise
            raise HTTPException(400, f"invalid filter: {' '.join(str(exc).split())}") from None

    def item_with_links(self, item: Any, request: Any, collection: str) -> Any:
        item = super().item_with_links(item, request, collection)
        scenes = self.served.scene_collection_id
        for entry in item.get("links", []):
            if entry.get("rel") == "derived_from" and scenes is not None and entry.get("title"):
                # the source scene is served too: link its item in this API (its title is its id)
                url = request.url_for("Get Item", collection_id=scenes, item_id=entry["title"])
                entry.update(href=str(url), type="application/geo+json")
                continue
            entry["href"] = self.served.public_href(entry["href"])
        for asset in item.get("assets", {}).values():
            asset["href"] = self.served.public_href(asset["href"])
        return item


@attr.s
class Queryables(BaseFiltersClient):
    def get_queryables(self, collection_id: str | None = None, **kwargs: Any) -> dict[str, Any]:
        return queryables(collection_id)


def backend_collections(served: ServedCatalog) -> list[dict[str, Any]]:
    """The collections as the backend wants them: each reads its items from a `data` asset."""
    out = []
    for collection in served.collections:
        backend = json.loads(json.dumps(collection.document))
        backend["assets"] = {
            "data": {
                "href": collection.items_parquet,
                "type": GEOPARQUET_MEDIA_TYPE,
                "roles": ["collection-mirror"],
            }
        }
        out.append(backend)
    return out


def build_app(served: ServedCatalog) -> FastAPI:
    settings = Settings(
        stac_fastapi_landing_id=served.catalog_id,
        stac_fastapi_title=served.title,
        stac_fastapi_description=served.description,
    )
    # rustac's Python wrapper that would find the bundled extensions does not construct (rustac 0.9.8):
    # the native client is given the wheel's extension folder and told never to download
    client = DuckdbClient(extension_directory=extension_directory(), install_extensions=False)
    app = FastAPI(
        lifespan=lifespan,
        openapi_url=settings.openapi_url,
        docs_url=settings.docs_url,
        redoc_url=settings.docs_url,
        settings=settings,
        collections=backend_collections(served),
        duckdb_client=client,
    )

    @app.get(SCHEMA_ROUTE, include_in_schema=False)
    def schema() -> Any:
        return JSONResponse(spectralearth_schema(), media_type="application/schema+json")

    StacApi(
        settings=settings,
        client=BuildClient(
            landing_page_id=served.catalog_id,
            title=served.title,
            description=served.description,
            served=served,
        ),
        app=app,
        # the backend's request models, made at run time from its extensions (mypy cannot follow)
        search_get_request_model=GetSearchRequestModel,  # type: ignore[arg-type]
        search_post_request_model=PostSearchRequestModel,  # type: ignore[arg-type]
        items_get_request_model=ItemsGetRequestModel,  # type: ignore[arg-type]
        extensions=[
            OffsetPaginationExtension(),
            SearchFilterExtension(client=Queryables()),
            FieldsExtension(),
            SortExtension(),
        ],
    )
    return app
