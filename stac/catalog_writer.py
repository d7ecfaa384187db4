"""Writes a build's STAC catalog: its tables in, a self-contained STAC 1.1 catalog under `<build>/stac/`
out (the `catalog` stage, `pipeline.catalog`, calls `build_catalog`; the documents come from the pure
builders in `stac.builders`).

Layout (every href of the JSON tree relative, so the build folder can be moved, copied to S3 or served
as is; the two parquet files hold absolute hrefs, see `stac.geoparquet`)::

    stac/catalog.json                                   root catalog: two child collections
    stac/items.parquet                                  patch items, stac-geoparquet (collection-mirror)
    stac/scenes.parquet                                 scene items, stac-geoparquet (collection-mirror)
    stac/<collection_id>/collection.json                patch collection (bands, Zarr + parquet assets)
    stac/<collection_id>/EPSG32632/catalog.json         one catalog per UTM zone
    stac/<collection_id>/EPSG32632/i0128-j1344/catalog.json     per block of 64 x 64 grid cells
    stac/<collection_id>/EPSG32632/i0128-j1344/<patch_id>.json  the items of the block
    stac/<scene_collection_id>/collection.json          scene collection
    stac/<scene_collection_id>/EPSG32632/2023/<scene_id>.json   per zone, per year

A block (or year) with more than `items_per_catalog` items is split into `part-NNNN` sub-catalogs, and a
catalog with more than `items_per_catalog` children gets `group-NNNN` levels (see `stac.partition`), so
no JSON file links more than that many items or children. Same tables in, byte-identical files out: no
`created`/`updated` timestamps are written, keys keep a fixed order, lists are sorted. Files of an
earlier run that this run did not write (a different partition) are removed at the end.

`plan_catalog` and `documents` are pure; `build_catalog` reads the tables and writes the files.
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pipeline import tables
from stac import builders
from stac.geoparquet import write_inferred_items_parquet, write_items_parquet
from stac.partition import BLOCK_CELLS, Node, max_links, partition, patch_key, scene_key
from stac.records import Band, PatchRecord, SceneRow, flags_of, parse_bands, parse_patches, parse_scenes
from stac.settings import CatalogSettings

STAC_DIR = tables.STAC_DIR
ROOT = "catalog.json"
ITEMS_PARQUET = "items.parquet"
SCENES_PARQUET = "scenes.parquet"  # the scene items, stac-geoparquet (the scene collection's mirror)
PATCHES_TABLE = tables.INDEX_PATCHES
SCENES_TABLE = tables.SCENES


@dataclass(frozen=True, slots=True)
class CatalogSummary:
    """What `build_catalog` wrote (counts for the stage record)."""

    root: str  # URI of stac/catalog.json
    items_parquet: str  # URI of stac/items.parquet
    patch_items: int
    scene_items: int
    catalogs: int  # catalog and collection files, the root included
    max_links: int  # the most item/child links in one catalog or collection file
    largest_catalog_bytes: int
    files_removed: int  # stale files of an earlier run

    def to_json(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "items_parquet": self.items_parquet,
            "patch_items": self.patch_items,
            "scene_items": self.scene_items,
            "catalogs": self.catalogs,
            "max_links": self.max_links,
            "largest_catalog_bytes": self.largest_catalog_bytes,
            "files_removed": self.files_removed,
        }


@dataclass(frozen=True, slots=True)
class CatalogPlan:
    """Everything the catalog is made of, before any JSON is built (pure; paths relative to stac/)."""

    settings: CatalogSettings
    bands: tuple[Band, ...]
    dataset: str
    patches: tuple[PatchRecord, ...]  # in (location_id, datetime, patch_id) order
    scenes: tuple[SceneRow, ...]  # in (start, scene_id) order
    patch_tree: Node
    scene_tree: Node
    flags: tuple[str, ...]

    # Paths ------------------------------------------------------------------------------------------
    @property
    def patch_collection(self) -> str:
        return f"{self.settings.collection_id}/collection.json"

    @property
    def scene_collection(self) -> str:
        return f"{self.settings.scene_collection_id}/collection.json"

    def node_file(self, collection_id: str, node: Node) -> str:
        if not node.path:
            return f"{collection_id}/collection.json"
        return f"{collection_id}/{node.path}/catalog.json"

    def item_file(self, collection_id: str, leaf: Node, item_id: str) -> str:
        folder = f"{collection_id}/{leaf.path}" if leaf.path else collection_id
        return f"{folder}/{item_id}.json"

    def scene_files(self) -> dict[str, str]:
        out = {}
        for leaf in self.scene_tree.leaves():
            for index in leaf.items:
                scene_id = self.scenes[index].scene_id
                out[scene_id] = self.item_file(self.settings.scene_collection_id, leaf, scene_id)
        return out


def plan_catalog(
    patches: Sequence[PatchRecord],
    scenes: Sequence[SceneRow],
    settings: CatalogSettings,
    bands: Sequence[Band | tuple[int, float, float]],
    dataset_href: str = "../dataset.zarr",
    flags: Sequence[str] | None = None,
) -> CatalogPlan:
    """Order the records and partition both collections (`dataset_href` is relative to `stac/`)."""
    ordered = tuple(sorted(patches, key=lambda p: (p.location_id, p.datetime, p.patch_id)))
    scene_order = tuple(sorted(scenes, key=lambda s: (s.start_datetime, s.scene_id)))
    known = {s.scene_id for s in scene_order}
    missing = sorted({p.scene_id for p in ordered} - known)
    if missing:
        raise ValueError(f"patches come from scenes missing in {SCENES_TABLE}: {', '.join(missing[:3])}")
    parsed_bands = parse_bands(bands)
    if ordered and not parsed_bands:
        raise ValueError("the band axis must hold at least one band when there are patches")
    limit = settings.items_per_catalog
    return CatalogPlan(
        settings=settings,
        bands=parsed_bands,
        dataset=dataset_href,
        patches=ordered,
        scenes=scene_order,
        patch_tree=partition([patch_key(p.epsg, p.i, p.j) for p in ordered], limit),
        scene_tree=partition([scene_key(s.epsg, s.year) for s in scene_order], limit),
        flags=tuple(flags if flags is not None else sorted({f for p in ordered for f, _ in p.fractions})),
    )


def _zone_title(label: str) -> str:
    if label.startswith("EPSG") and label[4:].isdigit():
        code = int(label[4:])
        if 32601 <= code <= 32660:
            return f"EPSG:{code} (UTM zone {code - 32600}N)"
        if 32701 <= code <= 32760:
            return f"EPSG:{code} (UTM zone {code - 32700}S)"
        return f"EPSG:{code}"
    return label


def _block_title(label: str) -> str:
    if label.startswith("i") and "-j" in label:
        i, j = label[1:].split("-j", 1)
        if i.isdigit() and j.isdigit():
            last = BLOCK_CELLS - 1
            return f"cells i {int(i)}-{int(i) + last}, j {int(j)}-{int(j) + last}"
    return label


def _title(path: str) -> str:
    labels = path.split("/")
    pretty = [_zone_title(labels[0]), *(_block_title(label) for label in labels[1:])]
    return ", ".join(pretty)


def _tree_documents(
    plan: CatalogPlan, collection_id: str, tree: Node, ids: Sequence[str], noun: str
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The sub-catalogs of one collection (the collection file itself is built by the caller)."""
    for node in tree.walk():
        if not node.path:
            continue
        path = plan.node_file(collection_id, node)
        parent_path = node.path.rsplit("/", 1)[0] if "/" in node.path else ""
        parent = plan.node_file(collection_id, Node(parent_path, ""))
        children = [(plan.node_file(collection_id, child), _title(child.path)) for child in node.children]
        items = [plan.item_file(collection_id, node, ids[index]) for index in node.items]
        title = _title(node.path)
        yield (
            path,
            builders.catalog(
                f"{collection_id}-{node.path.replace('/', '-')}",
                title,
                f"{node.count()} {noun} of {collection_id}: {title}.",
                path,
                ROOT,
                parent,
                children,
                items,
            ),
        )


def catalog_documents(plan: CatalogPlan) -> Iterator[tuple[str, dict[str, Any]]]:
    """Root, collections and sub-catalogs, as (path relative to stac/, dict)."""
    settings = plan.settings
    scenes_by_id = {s.scene_id: s for s in plan.scenes}
    summary = builders.summarise(plan.patches, scenes_by_id)
    yield (
        ROOT,
        builders.root_catalog(
            settings,
            ROOT,
            [(plan.patch_collection, settings.title), (plan.scene_collection, "EnMAP L2A scenes")],
        ),
    )
    yield (
        plan.patch_collection,
        builders.patch_collection(
            summary,
            plan.bands,
            builders.CollectionPaths(plan.patch_collection, ROOT, plan.dataset, ITEMS_PARQUET),
            [(plan.node_file(settings.collection_id, c), _title(c.path)) for c in plan.patch_tree.children],
            settings,
        ),
    )
    yield from _tree_documents(
        plan, settings.collection_id, plan.patch_tree, [p.patch_id for p in plan.patches], "patch items"
    )
    yield (
        plan.scene_collection,
        builders.scene_collection(
            plan.scenes,
            plan.scene_collection,
            ROOT,
            [
                (plan.node_file(settings.scene_collection_id, c), _title(c.path))
                for c in plan.scene_tree.children
            ],
            settings,
            geoparquet=SCENES_PARQUET if plan.scenes else None,
        ),
    )
    yield from _tree_documents(
        plan, settings.scene_collection_id, plan.scene_tree, [s.scene_id for s in plan.scenes], "scene items"
    )


def patch_item_documents(plan: CatalogPlan) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every patch item, in catalog order (zone, block, location, time)."""
    settings = plan.settings
    scenes_by_id = {s.scene_id: s for s in plan.scenes}
    scene_files = plan.scene_files()
    for leaf in plan.patch_tree.leaves():
        parent = plan.node_file(settings.collection_id, leaf)
        for index in leaf.items:
            patch = plan.patches[index]
            path = plan.item_file(settings.collection_id, leaf, patch.patch_id)
            paths = builders.PatchPaths(
                item=path,
                root=ROOT,
                parent=parent,
                collection=plan.patch_collection,
                scene_item=scene_files[patch.scene_id],
                dataset=plan.dataset,
            )
            yield (
                path,
                builders.patch_item(patch, scenes_by_id[patch.scene_id], paths, settings.collection_id),
            )


def scene_item_documents(plan: CatalogPlan) -> Iterator[tuple[str, dict[str, Any]]]:
    settings = plan.settings
    counts: dict[str, int] = {}
    for patch in plan.patches:
        counts[patch.scene_id] = counts.get(patch.scene_id, 0) + 1
    for leaf in plan.scene_tree.leaves():
        parent = plan.node_file(settings.scene_collection_id, leaf)
        for index in leaf.items:
            scene = plan.scenes[index]
            path = plan.item_file(settings.scene_collection_id, leaf, scene.scene_id)
            paths = builders.ScenePaths(item=path, root=ROOT, parent=parent, collection=plan.scene_collection)
            yield (
                path,
                builders.scene_item(
                    scene, paths, settings.scene_collection_id, counts.get(scene.scene_id, 0)
                ),
            )


def documents(plan: CatalogPlan) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every JSON file of the catalog as (path relative to stac/, dict)."""
    yield from catalog_documents(plan)
    yield from scene_item_documents(plan)
    yield from patch_item_documents(plan)


def parquet_items(plan: CatalogPlan, stac_root: str | None = None) -> Iterator[dict[str, Any]]:
    """The patch items as `stac/items.parquet` holds them, in catalog order: hrefs absolute against
    `stac_root` (the absolute path or URI of the build's `stac/` folder), or, without one, relative to
    the parquet file."""
    for path, item in patch_item_documents(plan):
        if stac_root is None:
            yield builders.rebase_hrefs(item, path, ITEMS_PARQUET)
        else:
            yield builders.absolute_hrefs(item, path, stac_root)


def stac_root_of(store: Any) -> str:
    """The absolute path (local build) or URI of the build's `stac/` folder: the base of the absolute
    hrefs in `items.parquet` (a JSON file keeps relative ones, so the tree stays movable)."""
    return str(store.path(STAC_DIR) if store.is_local else store.uri_of(STAC_DIR)).rstrip("/")


def serialise(document: dict[str, Any]) -> bytes:
    """The bytes of a STAC JSON file: keys in build order, UTF-8, no NaN. Catalogs and collections are
    indented for people; items are written on one line (CPython's C encoder, several times faster than
    the indenting one: it matters for half a million items)."""
    indent = None if document.get("type") == "Feature" else 2
    return (json.dumps(document, indent=indent, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


class _Writer:
    """Writes STAC files from a thread pool, a bounded number in flight; remembers what it wrote and
    the largest catalog/collection file."""

    def __init__(self, store: Any, workers: int) -> None:
        self.store = store
        self.workers = max(1, workers)
        self.written: set[str] = set()
        self.largest = 0
        self._pending: deque[Future[None]] = deque()
        self._pool = ThreadPoolExecutor(max_workers=self.workers)

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def write(self, relative: str, document: dict[str, Any]) -> None:
        full = f"{STAC_DIR}/{relative}"
        self.written.add(full)
        if document.get("type") in ("Catalog", "Collection"):
            data = serialise(document)
            self.largest = max(self.largest, len(data))
            self._pending.append(self._pool.submit(self.store.write_bytes, full, data))
        else:
            self._pending.append(self._pool.submit(self._serialise_and_write, full, document))
        while len(self._pending) > 64 * self.workers:
            self._pending.popleft().result()

    def _serialise_and_write(self, full: str, document: dict[str, Any]) -> None:
        self.store.write_bytes(full, serialise(document))


def _remove_stale(store: Any, keep: set[str]) -> int:
    base = store.path(STAC_DIR).rstrip("/")
    if not store.fs.exists(base):
        return 0
    stale = []
    for found in store.fs.find(base):
        relative = f"{STAC_DIR}/{found[len(base) + 1 :]}" if found.startswith(base + "/") else None
        if relative is not None and relative not in keep and ".tmp-" not in relative:
            stale.append(found)
    for path in sorted(stale):
        store.fs.rm_file(path)
    if stale and store.is_local:  # object stores have no folders; local ones keep empty ones
        for folder, _, _ in sorted(os.walk(base), key=lambda entry: -len(entry[0])):
            if folder != base and not os.listdir(folder):
                os.rmdir(folder)
    return len(stale)


def build_catalog(
    store: Any,
    settings: CatalogSettings,
    bands: Sequence[Band | tuple[int, float, float]],
    dataset_href: str = "../dataset.zarr",
    *,
    workers: int = 8,
) -> CatalogSummary:
    """Read `index/patches.parquet` and `inventory/scenes.parquet` from `store` (a `BuildStore`) and
    write the catalog under `stac/`. `bands` is the build's band axis as (number, wavelength nm, FWHM nm);
    `dataset_href` points at the Zarr group, relative to `stac/` (or an absolute URI)."""
    patches_frame = store.read_geodataframe(PATCHES_TABLE)
    plan = plan_catalog(
        parse_patches(patches_frame),
        parse_scenes(store.read_geodataframe(SCENES_TABLE)),
        settings,
        bands,
        dataset_href,
        flags=flags_of(patches_frame.columns),
    )
    return write_catalog(store, plan, workers=workers)


def write_catalog(store: Any, plan: CatalogPlan, *, workers: int = 8) -> CatalogSummary:
    """Write every file of `plan` under `stac/` of `store`, then remove files of an earlier run that
    this one did not write."""
    collections = {path: doc for path, doc in catalog_documents(plan) if doc["type"] == "Collection"}
    collection = collections[plan.patch_collection]
    stac_root = stac_root_of(store)
    scene_rows: list[dict[str, Any]] = []
    with _Writer(store, workers) as writer:
        for relative, document in catalog_documents(plan):
            writer.write(relative, document)
        for relative, document in scene_item_documents(plan):
            writer.write(relative, document)
            scene_rows.append(builders.absolute_hrefs(document, relative, stac_root))

        def patch_items_for_parquet() -> Iterator[dict[str, Any]]:
            # one pass over the patch items: each is written as JSON (relative hrefs) and handed on to
            # the parquet (absolute hrefs: rows are read without the tree, by DuckDB, servers, xpystac)
            for relative, item in patch_item_documents(plan):
                writer.write(relative, item)
                yield builders.absolute_hrefs(item, relative, stac_root)

        write_items_parquet(
            store,
            f"{STAC_DIR}/{ITEMS_PARQUET}",
            patch_items_for_parquet(),
            plan.flags,
            collection=builders.absolute_hrefs(collection, plan.patch_collection, stac_root),
        )
    written = writer.written | {f"{STAC_DIR}/{ITEMS_PARQUET}"}
    if scene_rows:  # a few thousand scenes at archive scale: their column types are inferred
        write_inferred_items_parquet(
            store,
            f"{STAC_DIR}/{SCENES_PARQUET}",
            scene_rows,
            builders.absolute_hrefs(collections[plan.scene_collection], plan.scene_collection, stac_root),
        )
        written.add(f"{STAC_DIR}/{SCENES_PARQUET}")
    largest = writer.largest
    removed = _remove_stale(store, written)
    catalogs = sum(1 for _ in plan.patch_tree.walk()) + sum(1 for _ in plan.scene_tree.walk()) + 1
    return CatalogSummary(
        root=store.uri_of(f"{STAC_DIR}/{ROOT}"),
        items_parquet=store.uri_of(f"{STAC_DIR}/{ITEMS_PARQUET}"),
        patch_items=len(plan.patches),
        scene_items=len(plan.scenes),
        catalogs=catalogs,
        max_links=max(max_links(plan.patch_tree), max_links(plan.scene_tree)),
        largest_catalog_bytes=largest,
        files_removed=removed,
    )
