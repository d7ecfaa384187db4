"""Pure builders: records in, STAC dicts out. No I/O besides reading the packaged JSON fragments.

Constant content (extension lists, band template, asset templates, constant properties) lives in
`stac/fragments/*.json`; extension short names in those fragments are resolved to the schema URIs pinned
in `fragments/extensions.json`. Every href is relative (the catalog is self-contained): builders get the
STAC-root-relative path of the file they build and of each target, and `relative_href` links them.

Field notes:
- `eo:cloud_cover` / `eo:snow_cover` of a patch are its cloud / snow pixel fractions x 100 (rounded to 1e-4
  percent); other flags are in `spectralearth:quality_fractions` (0..1). A scene's are its METADATA.XML
  percentages.
- `view:off_nadir` combines EnMAP's signed across- and along-track off-nadir angles as the angle between
  nadir and a line of sight tilted by both: atan(sqrt(tan^2(across) + tan^2(along))); for EnMAP's small
  angles this is within 0.1 degree of sqrt(across^2 + along^2). `view:azimuth` is METADATA.XML's
  sceneAzimuthAngle (mod 360).
- `proj:transform` of a patch is its own 6-element affine (a, b, x_ul, d, e, y_ul); `proj:bbox` its
  projected bounds, from the corners.
"""

from __future__ import annotations

import json
import math
import posixpath
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from importlib import resources
from typing import Any

from pipeline.enmap.names import parse_file_name
from stac.records import Band, BBox, PatchRecord, ProductFiles, SceneRow
from stac.settings import CatalogSettings

STAC_VERSION = "1.1.0"
# The Zarr media type STAC readers match (xpystac knows `application/vnd+zarr` and `application/vnd.zarr`,
# not `application/vnd.zarr; version=3`); the format version is in `xarray:open_kwargs.zarr_format`.
ZARR_MEDIA_TYPE = "application/vnd+zarr"
GEOJSON = "application/geo+json"
JSON = "application/json"
DATASET_ASSET = "dataset"
GEOPARQUET_ASSET = "geoparquet"
# The extent of an empty collection (a build that kept nothing): STAC requires one bbox.
WHOLE_WORLD: BBox = (-180.0, -90.0, 180.0, 90.0)


# Fragments -----------------------------------------------------------------------------------------
@cache
def _fragment_text(name: str) -> str:
    return resources.files("stac").joinpath("fragments", f"{name}.json").read_text(encoding="utf-8")


def fragment(name: str) -> Any:
    """A fresh copy of `stac/fragments/<name>.json` (callers may modify it)."""
    return json.loads(_fragment_text(name))


@cache
def _parsed(name: str) -> Any:
    """The parsed fragment, shared: never hand it out without `_copy` (item builders run once per patch,
    and parsing the JSON for each of half a million items was a large share of the catalog's time)."""
    return json.loads(_fragment_text(name))


_SCALARS = (str, int, float, bool, type(None))


def _copy(value: Any) -> Any:
    """A deep copy of a JSON value (much cheaper than `copy.deepcopy` or re-parsing, for small ones)."""
    if isinstance(value, dict):
        return {key: inner if isinstance(inner, _SCALARS) else _copy(inner) for key, inner in value.items()}
    if isinstance(value, list):
        return [inner if isinstance(inner, _SCALARS) else _copy(inner) for inner in value]
    return value


@cache
def _extensions() -> dict[str, dict[str, str]]:
    known: dict[str, dict[str, str]] = fragment("extensions")
    return known


def _keys(value: Any) -> Iterator[str]:
    """Every key of a JSON document, nested ones included (geometries are skipped: no keys there)."""
    if isinstance(value, dict):
        for key, inner in value.items():
            yield key
            if key != "geometry" and isinstance(inner, dict | list):
                yield from _keys(inner)
    elif isinstance(value, list):
        for inner in value:
            if isinstance(inner, dict | list):
                yield from _keys(inner)


def with_extensions(document: dict[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """Set `stac_extensions` to the schema URIs of those of `names` whose fields the document uses
    (an extension listed without any of its fields fails its schema)."""
    if document.get("type") == "Feature":  # fields live in properties and assets only: a cheap scan
        keys = (
            *document["properties"],
            *(key for asset in document.get("assets", {}).values() for key in asset),
        )
        # items of one collection share their field names: resolve each distinct set once
        document["stac_extensions"] = list(_feature_extension_uris(keys, tuple(names)))
    else:
        document["stac_extensions"] = _extension_uris(_keys(document), names)
    return document


def _extension_uris(keys: Iterable[str], names: Iterable[str]) -> list[str]:
    known = _extensions()
    used = {key.split(":", 1)[0] + ":" for key in keys if ":" in key}
    return [known[name]["uri"] for name in names if known[name]["prefix"] in used]


@lru_cache(maxsize=1024)
def _feature_extension_uris(keys: tuple[str, ...], names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(_extension_uris(keys, names))


# Hrefs --------------------------------------------------------------------------------------------
def relative_href(source: str, target: str) -> str:
    """Href from the file `source` to `target`, both relative to the STAC root (posix, `./` prefixed)."""
    if "://" in target or target.startswith("/"):
        return target
    return _relative(posixpath.dirname(source), target)


@lru_cache(maxsize=1 << 16)
def _relative(folder: str, target: str) -> str:
    start = [part for part in posixpath.normpath(folder or ".").split("/") if part != "."]
    parts = [part for part in posixpath.normpath(target).split("/") if part != "."]
    if ".." in start:
        raise ValueError(f"a STAC file must sit inside the STAC root, got folder {folder!r}")
    common = 0
    while common < min(len(start), len(parts)) and start[common] == parts[common]:
        common += 1
    href = "/".join([".."] * (len(start) - common) + parts[common:])
    return href if href.startswith("../") else f"./{href}"


def link(rel: str, source: str, target: str, media_type: str, title: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"rel": rel, "href": relative_href(source, target), "type": media_type}
    if title is not None:
        out["title"] = title
    return out


# Small pure helpers -------------------------------------------------------------------------------
def _set(target: dict[str, Any], key: str, value: Any) -> None:
    """Set `key` unless the value is missing (None): STAC has no null for these fields."""
    if value is not None:
        target[key] = value


def _angle(value: float | None, low: float, high: float, wrap: bool = False) -> float | None:
    if value is None:
        return None
    if wrap:
        value = value % 360.0
    return value if low <= value <= high else None


def off_nadir(across: float | None, along: float | None) -> float | None:
    if across is None or along is None:
        return None
    tangent = math.hypot(math.tan(math.radians(across)), math.tan(math.radians(along)))
    return _angle(round(math.degrees(math.atan(tangent)), 6), 0.0, 90.0)


def percent(fraction: float | None) -> float | None:
    if fraction is None:
        return None
    return min(100.0, max(0.0, round(fraction * 100.0, 4)))


def view_fields(scene: SceneRow) -> dict[str, Any]:
    out: dict[str, Any] = {}
    _set(out, "view:off_nadir", off_nadir(scene.across_off_nadir, scene.along_off_nadir))
    _set(out, "view:azimuth", _angle(scene.scene_azimuth, 0.0, 360.0, wrap=True))
    _set(out, "view:sun_azimuth", _angle(scene.sun_azimuth, 0.0, 360.0, wrap=True))
    _set(out, "view:sun_elevation", _angle(scene.sun_elevation, -90.0, 90.0))
    return out


def sat_fields(scene: SceneRow) -> dict[str, Any]:
    out: dict[str, Any] = {}
    state = (scene.orbit_direction or "").lower()
    if state in ("ascending", "descending"):
        out["sat:orbit_state"] = state
    if scene.orbit_number is not None and scene.orbit_number >= 1:
        out["sat:absolute_orbit"] = scene.orbit_number
    return out


def processing_fields(scene: SceneRow) -> dict[str, Any]:
    out: dict[str, Any] = {"processing:version": scene.processor_version}
    _set(out, "processing:datetime", scene.processing_datetime)
    return out


def signed_zero_free(values: Iterable[float]) -> list[float]:
    """The values with -0.0 written as 0.0 (x + 0.0 is +0.0 for both zeros, unchanged otherwise): a
    rotation-free transform read from GDAL can carry -0.0 terms, which JSON then spells `-0.0`."""
    return [float(value) + 0.0 for value in values]


def projected_bbox(transform: Sequence[float], width: int, height: int) -> list[float]:
    a, b, c, d, e, f = transform[:6]
    xs = [c + a * col + b * row for col, row in ((0, 0), (width, 0), (0, height), (width, height))]
    ys = [f + d * col + e * row for col, row in ((0, 0), (width, 0), (0, height), (width, height))]
    return signed_zero_free([min(xs), min(ys), max(xs), max(ys)])


def patch_transform(patch: PatchRecord) -> list[float]:
    a, b, d, e = patch.pixel
    return signed_zero_free([a, b, patch.x_ul, d, e, patch.y_ul])


# Bands and assets ---------------------------------------------------------------------------------
def _micrometres(nanometres: float | None) -> float | None:
    return None if nanometres is None else round(nanometres / 1000.0, 9)


def band_objects(bands: Sequence[Band]) -> list[dict[str, Any]]:
    """STAC 1.1 `bands`: name, eo v2 centre wavelength / FWHM in micrometres, raster v2 scale/offset."""
    out = []
    for band in bands:
        wavelength = "" if band.wavelength_nm is None else f" ({band.wavelength_nm:g} nm)"
        entry: dict[str, Any] = {"name": band.name, "description": f"EnMAP band {band.number}{wavelength}"}
        _set(entry, "eo:center_wavelength", _micrometres(band.wavelength_nm))
        _set(entry, "eo:full_width_half_max", _micrometres(band.fwhm_nm))
        entry.update(fragment("band"))
        out.append(entry)
    return out


def dataset_asset(href: str, bands: Sequence[Band] | None = None) -> dict[str, Any]:
    asset: dict[str, Any] = {"href": href}
    asset.update(_copy(_parsed("dataset_asset")))
    if bands is not None:
        asset["bands"] = band_objects(bands)
    return asset


# Items --------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PatchPaths:
    """STAC-root-relative paths a patch item links to; `item` is where it is written."""

    item: str
    root: str
    parent: str
    collection: str
    scene_item: str
    dataset: str  # the Zarr group: STAC-root-relative, or an absolute URI


def patch_item(patch: PatchRecord, scene: SceneRow, paths: PatchPaths, collection_id: str) -> dict[str, Any]:
    """The STAC item of one patch (id = patch_id, datetime = the scene's start time)."""
    template = _parsed("patch_item")
    size = patch.size
    transform = patch_transform(patch)
    properties: dict[str, Any] = {"datetime": patch.datetime}
    properties.update(_copy(template["properties"]))
    properties.update(
        {
            "proj:code": f"EPSG:{patch.epsg}",
            "proj:shape": [size, size],
            "proj:transform": transform,
            "proj:bbox": projected_bbox(transform, size, size),
        }
    )
    _set(properties, "eo:cloud_cover", percent(patch.fraction("cloud")))
    _set(properties, "eo:snow_cover", percent(patch.fraction("snow")))
    properties.update(view_fields(scene))
    properties.update(sat_fields(scene))
    properties["grid:code"] = patch.location_id
    properties.update(processing_fields(scene))
    properties["processing:version"] = patch.processor_version
    properties.update(
        {
            "spectralearth:row": patch.row,
            "spectralearth:location_id": patch.location_id,
            "spectralearth:n_dates": patch.n_dates,
            "spectralearth:scene_id": patch.scene_id,
            "spectralearth:datatake_id": patch.datatake_id,
            "spectralearth:scene_window": [patch.col_off, patch.row_off, size, size],
            "spectralearth:duplicates": list(patch.duplicates),
            "spectralearth:quality_fractions": {flag: round(value, 6) for flag, value in patch.fractions},
        }
    )
    dataset = relative_href(paths.item, paths.dataset)
    document = {
        "type": "Feature",
        "stac_version": STAC_VERSION,
        "stac_extensions": [],
        "id": patch.patch_id,
        "geometry": patch.geometry,
        "bbox": list(patch.bbox),
        "properties": properties,
        "links": [
            link("root", paths.item, paths.root, JSON),
            link("parent", paths.item, paths.parent, JSON),
            link("collection", paths.item, paths.collection, JSON),
            link("derived_from", paths.item, paths.scene_item, GEOJSON, title=scene.scene_id),
        ],
        "assets": {DATASET_ASSET: dataset_asset(dataset)},
        "collection": collection_id,
    }
    return with_extensions(document, template["stac_extensions"])


@dataclass(frozen=True, slots=True)
class ScenePaths:
    item: str
    root: str
    parent: str
    collection: str


def scene_item(scene: SceneRow, paths: ScenePaths, collection_id: str, n_patches: int) -> dict[str, Any]:
    """The STAC item of one source product (id = scene_id, geometry = its footprint)."""
    template = fragment("scene_item")
    properties: dict[str, Any] = {
        "datetime": scene.start_datetime,
        "start_datetime": scene.start_datetime,
        "end_datetime": scene.end_datetime,
    }
    properties.update(template["properties"])
    properties.update(
        {
            "proj:code": f"EPSG:{scene.epsg}",
            "proj:shape": [scene.height, scene.width],
            "proj:transform": signed_zero_free(scene.transform),
            "proj:bbox": projected_bbox(scene.transform, scene.width, scene.height),
        }
    )
    _set(properties, "eo:cloud_cover", _angle(scene.cloud_cover, 0.0, 100.0))
    _set(properties, "eo:snow_cover", _angle(scene.snow_cover, 0.0, 100.0))
    properties.update(view_fields(scene))
    properties.update(sat_fields(scene))
    properties.update(processing_fields(scene))
    properties.update(
        {
            "spectralearth:datatake_id": scene.datatake_id,
            "spectralearth:tile_id": scene.tile_id,
            "spectralearth:quality_cover": dict(scene.cover),
            "spectralearth:n_patches": n_patches,
        }
    )
    _set(properties, "spectralearth:fingerprint", scene.fingerprint)
    document = {
        "type": "Feature",
        "stac_version": STAC_VERSION,
        "stac_extensions": [],
        "id": scene.scene_id,
        "geometry": scene.geometry,
        "bbox": list(scene.bbox),
        "properties": properties,
        "links": [
            link("root", paths.item, paths.root, JSON),
            link("parent", paths.item, paths.parent, JSON),
            link("collection", paths.item, paths.collection, JSON),
        ],
        "assets": product_assets(scene.files) if scene.files is not None else {},
        "collection": collection_id,
    }
    return with_extensions(document, template["stac_extensions"])


# Source product files ------------------------------------------------------------------------------
_TIFF = "image/tiff; application=geotiff"
_COG = "image/tiff; application=geotiff; profile=cloud-optimized"
_MEDIA_TYPES = {
    "tif": _TIFF,
    "tiff": _TIFF,
    "jp2": "image/jp2",
    "xml": "application/xml",
    "hdr": "text/plain",  # ENVI header: text; the ENVI cube itself has no registered media type
}
_ARCHIVE_TYPES = {"zip": "application/zip", "targz": "application/gzip"}
# Roles from the STAC best practices (data, metadata, overview, visual) and the common quality-layer
# roles (cloud, cloud-shadow, snow-ice, land-water, water-mask, reflectance).
_LAYER_ROLES = {
    "SPECTRAL_IMAGE": ["data", "reflectance"],
    "METADATA": ["metadata"],
    "HISTORY": ["metadata"],
    "QL_QUALITY_CLOUD": ["metadata", "cloud"],
    "QL_QUALITY_CLOUDSHADOW": ["metadata", "cloud-shadow"],
    "QL_QUALITY_SNOW": ["metadata", "snow-ice"],
    "QL_QUALITY_CLASSES": ["metadata", "land-water"],
    "QL_VNIR": ["overview", "visual"],
    "QL_SWIR": ["overview"],
}


def member_href(files: ProductFiles, member: str) -> str | None:
    """Where a reader opens one file of the product: the file itself in a folder; inside a ZIP, the
    `zip://<archive>!<member>` (`zip+s3://...`) URI that rasterio and GDAL open in place. Files of the ZIP
    inside a tar.gz cannot be opened in place (GDAL cannot chain the two): None."""
    container = files.container_uri.rstrip("/")
    if files.packaging == "folder":
        return f"{container}/{member}"
    if files.packaging == "zip":
        if "://" in container:
            scheme, rest = container.split("://", 1)
            return f"zip+{scheme}://{rest}!{member}"
        return f"zip://{container}!{member}"
    return None


def product_assets(files: ProductFiles) -> dict[str, dict[str, Any]]:
    """Assets of a scene item: the source product's archive (when packed) and each of its files, keyed
    by layer (`spectral_image`, `ql_quality_cloud`, `metadata`, ...; `<layer>_header` for an ENVI
    header), with media type, roles and `file:size`. Hrefs are where the inventory found the product
    (absolute: the products are not part of the build)."""
    assets: dict[str, dict[str, Any]] = {}
    if files.packaging in _ARCHIVE_TYPES:
        archive: dict[str, Any] = {
            "href": files.container_uri,
            "type": _ARCHIVE_TYPES[files.packaging],
            "title": "Product archive as delivered",
            "roles": ["data", "archive"],
        }
        if files.inner_zip is not None:
            archive["description"] = f"The product is the ZIP {files.inner_zip} inside this archive."
        assets["archive"] = archive
    for member, size in sorted(files.members):
        name = parse_file_name(posixpath.basename(member))
        href = member_href(files, member)
        if name is None or href is None:
            continue
        extension = name.extension.lower()
        key = name.layer.lower() + ("_header" if name.is_sidecar else "")
        if key in assets:  # two spellings of one layer: keep the first, the inventory checked them
            continue
        asset: dict[str, Any] = {"href": href}
        media_type = _COG if name.is_cog else _MEDIA_TYPES.get(extension.rsplit(".", 1)[-1])
        _set(asset, "type", media_type)
        asset["title"] = posixpath.basename(member)
        asset["roles"] = ["metadata"] if name.is_sidecar else _LAYER_ROLES.get(name.layer, ["metadata"])
        asset["file:size"] = size
        assets[key] = asset
    return assets


# Catalogs and collections -------------------------------------------------------------------------
def catalog(
    catalog_id: str,
    title: str,
    description: str,
    path: str,
    root: str,
    parent: str | None,
    children: Sequence[tuple[str, str]],
    items: Sequence[str] = (),
) -> dict[str, Any]:
    """A catalog file at `path` linking `children` ((path, title) of catalogs) and `items` (paths)."""
    links = [link("root", path, root, JSON)]
    if parent is not None:
        links.append(link("parent", path, parent, JSON))
    links.extend(link("child", path, child, JSON, title=child_title) for child, child_title in children)
    links.extend(link("item", path, item, GEOJSON) for item in items)
    return {
        "type": "Catalog",
        "stac_version": STAC_VERSION,
        "id": catalog_id,
        "title": title,
        "description": description,
        "links": links,
    }


def _range(values: Iterable[float | int | None]) -> dict[str, Any] | None:
    present = [v for v in values if v is not None]
    return {"minimum": min(present), "maximum": max(present)} if present else None


def extent(bboxes: Sequence[BBox], datetimes: Sequence[str]) -> dict[str, Any]:
    if not bboxes or not datetimes:
        return {"spatial": {"bbox": [list(WHOLE_WORLD)]}, "temporal": {"interval": [[None, None]]}}
    return {
        "spatial": {
            "bbox": [
                [
                    min(b[0] for b in bboxes),
                    min(b[1] for b in bboxes),
                    max(b[2] for b in bboxes),
                    max(b[3] for b in bboxes),
                ]
            ]
        },
        "temporal": {"interval": [[min(datetimes), max(datetimes)]]},
    }


def _collection_links(
    path: str, root: str, children: Sequence[tuple[str, str]], settings: CatalogSettings
) -> list[dict[str, Any]]:
    links = [link("root", path, root, JSON), link("parent", path, root, JSON)]
    links.extend(link("child", path, child, JSON, title=title) for child, title in children)
    if settings.license_url:
        links.append({"rel": "license", "href": settings.license_url, "title": settings.license})
    return links


def _years(datetimes: Sequence[str | None]) -> tuple[int | None, int | None]:
    known = [d for d in datetimes if d is not None]
    if not known:
        return None, None
    return int(min(known)[:4]), int(max(known)[:4])


@dataclass(frozen=True, slots=True)
class CollectionPaths:
    collection: str
    root: str
    dataset: str  # the Zarr group: STAC-root-relative, or an absolute URI
    geoparquet: str


def patch_collection(
    summary: PatchSummary,
    bands: Sequence[Band],
    paths: CollectionPaths,
    children: Sequence[tuple[str, str]],
    settings: CatalogSettings,
) -> dict[str, Any]:
    """The patch collection: extent and summaries from `summary`, bands on the Zarr asset definitions."""
    template = fragment("patch_collection")
    attribution = settings.attribution_text(*_years([summary.start, summary.end]))
    summaries: dict[str, Any] = template["summaries"]
    summaries.update(
        {
            "proj:code": sorted(summary.proj_codes),
            "eo:cloud_cover": summary.cloud_cover,
            "eo:snow_cover": summary.snow_cover,
            "view:sun_elevation": summary.sun_elevation,
            "view:off_nadir": summary.off_nadir,
            "sat:orbit_state": sorted(summary.orbit_states),
            "processing:version": sorted(summary.processor_versions),
            "spectralearth:n_dates": summary.n_dates,
        }
    )
    summaries = {k: v for k, v in summaries.items() if v not in (None, [])}
    dataset = relative_href(paths.collection, paths.dataset)
    item_asset = fragment("dataset_asset")
    item_asset["bands"] = band_objects(bands)
    geoparquet = {"href": relative_href(paths.collection, paths.geoparquet)}
    geoparquet.update(fragment("geoparquet_asset"))
    document = {
        "type": "Collection",
        "stac_version": STAC_VERSION,
        "stac_extensions": [],
        "id": settings.collection_id,
        "title": settings.title,
        "description": f"{settings.description}\n\n{attribution}",
        "keywords": list(settings.keywords),
        "license": settings.license,
        "providers": [p.to_stac() for p in settings.providers],
        "extent": {
            "spatial": {"bbox": [list(summary.bbox or WHOLE_WORLD)]},
            "temporal": {"interval": [[summary.start, summary.end]]},
        },
        "summaries": summaries,
        "item_assets": {DATASET_ASSET: item_asset},
        "assets": {DATASET_ASSET: dataset_asset(dataset, bands), GEOPARQUET_ASSET: geoparquet},
        "links": _collection_links(paths.collection, paths.root, children, settings),
        "spectralearth:attribution": attribution,
        "spectralearth:count": summary.count,
    }
    return with_extensions(document, template["stac_extensions"])


@dataclass(frozen=True, slots=True)
class PatchSummary:
    """What the patch collection says about all its items (computed in one pass by `summarise`)."""

    count: int
    bbox: BBox | None  # None (and no start or end) for an empty collection
    start: str | None
    end: str | None
    proj_codes: frozenset[str]
    orbit_states: frozenset[str]
    processor_versions: frozenset[str]
    cloud_cover: dict[str, Any] | None
    snow_cover: dict[str, Any] | None
    sun_elevation: dict[str, Any] | None
    off_nadir: dict[str, Any] | None
    n_dates: dict[str, Any] | None


def summarise(patches: Sequence[PatchRecord], scenes: dict[str, SceneRow]) -> PatchSummary:
    if not patches:  # a build that kept no patch is valid: an empty collection, no extent to speak of
        return PatchSummary(
            count=0,
            bbox=None,
            start=None,
            end=None,
            proj_codes=frozenset(),
            orbit_states=frozenset(),
            processor_versions=frozenset(),
            cloud_cover=None,
            snow_cover=None,
            sun_elevation=None,
            off_nadir=None,
            n_dates=None,
        )
    used = [scenes[p.scene_id] for p in patches]
    views = [view_fields(s) for s in used]
    return PatchSummary(
        count=len(patches),
        bbox=(
            min(p.bbox[0] for p in patches),
            min(p.bbox[1] for p in patches),
            max(p.bbox[2] for p in patches),
            max(p.bbox[3] for p in patches),
        ),
        start=min(p.datetime for p in patches),
        end=max(p.datetime for p in patches),
        proj_codes=frozenset(f"EPSG:{p.epsg}" for p in patches),
        orbit_states=frozenset(state for s in used if (state := sat_fields(s).get("sat:orbit_state"))),
        processor_versions=frozenset(p.processor_version for p in patches),
        cloud_cover=_range(percent(p.fraction("cloud")) for p in patches),
        snow_cover=_range(percent(p.fraction("snow")) for p in patches),
        sun_elevation=_range(v.get("view:sun_elevation") for v in views),
        off_nadir=_range(v.get("view:off_nadir") for v in views),
        n_dates=_range(p.n_dates for p in patches),
    )


def scene_collection(
    scenes: Sequence[SceneRow],
    path: str,
    root: str,
    children: Sequence[tuple[str, str]],
    settings: CatalogSettings,
    geoparquet: str | None = None,
) -> dict[str, Any]:
    """The scene collection at `path`; `geoparquet` (STAC-root-relative) is the stac-geoparquet mirror
    of its items, linked as a `collection-mirror` asset when given."""
    template = fragment("scene_collection")
    starts = [s.start_datetime for s in scenes]
    ends = [s.end_datetime for s in scenes]
    attribution = settings.attribution_text(*_years(starts))
    summaries: dict[str, Any] = template["summaries"]
    summaries.update(
        {
            "proj:code": sorted({f"EPSG:{s.epsg}" for s in scenes}),
            "eo:cloud_cover": _range(s.cloud_cover for s in scenes),
            "view:sun_elevation": _range(view_fields(s).get("view:sun_elevation") for s in scenes),
            "view:off_nadir": _range(view_fields(s).get("view:off_nadir") for s in scenes),
            "sat:orbit_state": sorted({st for s in scenes if (st := sat_fields(s).get("sat:orbit_state"))}),
            "processing:version": sorted({s.processor_version for s in scenes}),
        }
    )
    summaries = {k: v for k, v in summaries.items() if v not in (None, [])}
    document = {
        "type": "Collection",
        "stac_version": STAC_VERSION,
        "stac_extensions": [],
        "id": settings.scene_collection_id,
        "title": template["title"],
        "description": f"{template['description']}\n\n{attribution}",
        "keywords": template["keywords"],
        "license": settings.license,
        "providers": [p.to_stac() for p in settings.providers],
        "extent": extent([s.bbox for s in scenes], [*starts, *ends]),
        "summaries": summaries,
        "links": _collection_links(path, root, children, settings),
        "spectralearth:attribution": attribution,
        "spectralearth:count": len(scenes),
    }
    if geoparquet is not None:
        mirror = {"href": relative_href(path, geoparquet)}
        mirror.update(fragment("geoparquet_asset"))
        mirror["title"] = "Scene items (stac-geoparquet)"
        document["assets"] = {GEOPARQUET_ASSET: mirror}
    return with_extensions(document, template["stac_extensions"])


def root_catalog(settings: CatalogSettings, path: str, children: Sequence[tuple[str, str]]) -> dict[str, Any]:
    template = fragment("root_catalog")
    return catalog(
        settings.catalog_id, template["title"], template["description"], path, path, None, children
    )


def rebase_hrefs(item: dict[str, Any], source: str, target: str) -> dict[str, Any]:
    """A copy of `item` (written at `source`) whose relative hrefs resolve from the file `target`.

    Shallow: only `links` and `assets` are copied; the rest is shared with `item`."""
    source_dir = posixpath.dirname(source)
    out = dict(item)
    out["links"] = [
        {**entry, "href": _rebase(source_dir, target, entry["href"])} for entry in item.get("links", [])
    ]
    out["assets"] = {
        key: {**asset, "href": _rebase(source_dir, target, asset["href"])}
        for key, asset in item.get("assets", {}).items()
    }
    return out


def join_uri(base: str, relative: str) -> str:
    """`relative` (posix, may start with `..`) joined onto the absolute path or URI `base` (a folder)."""
    if "://" in base:
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, relative))}"
    return posixpath.normpath(posixpath.join(base, relative))


def absolute_hrefs(document: dict[str, Any], source: str, stac_root: str) -> dict[str, Any]:
    """A copy of `document` (written at `source`, relative to the STAC root) whose relative hrefs are
    absolute: resolved against `stac_root`, the absolute path or URI of the build's `stac/` folder.

    Shallow: only `links` and `assets` are copied; the rest is shared with `document`."""
    source_dir = posixpath.dirname(source)
    out = dict(document)
    out["links"] = [
        {**entry, "href": _absolute(stac_root, source_dir, entry["href"])}
        for entry in document.get("links", [])
    ]
    out["assets"] = {
        key: {**asset, "href": _absolute(stac_root, source_dir, asset["href"])}
        for key, asset in document.get("assets", {}).items()
    }
    return out


@lru_cache(maxsize=1 << 16)
def _absolute(stac_root: str, source_dir: str, href: str) -> str:
    if "://" in href or href.startswith("/"):
        return href
    return join_uri(stac_root, posixpath.join(source_dir, href))


@lru_cache(maxsize=1 << 16)
def _rebase(source_dir: str, target: str, href: str) -> str:
    # cached: the items of one folder share most of their hrefs (root, parent, collection, dataset)
    if "://" in href or href.startswith("/"):
        return href
    return relative_href(target, posixpath.normpath(posixpath.join(source_dir, href)))
