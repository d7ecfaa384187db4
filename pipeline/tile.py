"""Stage 3, `tile`: cut each scene on the global grid and decide, per cell, keep or drop (and why).

Every cell wholly inside the raster that touches the footprint is a candidate. It is kept when the
scene has no empty kept band, and each flag's fraction of the cell's pixels is within the manifest's
threshold (nodata and background at 0: no nodata in a kept band, wholly inside the footprint).
Only the masks are read here; no pixels of the cube are copied.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pipeline import tables
from pipeline.engine import (
    ItemStage,
    StageResult,
    WorkItem,
    content_key,
    prune_checkpoints,
    run_items,
    up_to_date,
)
from pipeline.grid import (
    Cell,
    GridSpec,
    OffLatticeError,
    cell_bounds,
    cells_in_raster,
    check_lattice,
    snap_to_lattice,
)
from pipeline.inventory import SceneRecord, read_scenes, rejected_table
from pipeline.manifest import Manifest, QualityPolicy
from pipeline.mask import MASKS_TABLE, MaskSummary, read_mask, summaries_from_table
from pipeline.quality import BACKGROUND, FLAG_NAMES, flag_present
from pipeline.storage import BuildStore, StageRecord, Stopwatch, fingerprint_of
from pipeline.tables import Rejection, read_table_checked

STAGE = "tile"
PATCHES_TABLE = tables.PLAN_PATCHES
REJECTED_TABLE = tables.PLAN_REJECTED


@dataclass(frozen=True, slots=True)
class CellDecision:
    cell: Cell
    col_off: int
    row_off: int
    kept: bool
    reason: str | None
    fractions: tuple[tuple[str, float], ...]
    disqualifying_pixels: int


def decide_cells(
    bits: np.ndarray,
    transform: tuple[float, ...],
    epsg: int,
    spec: GridSpec,
    policy: QualityPolicy,
    empty_kept_bands: tuple[int, ...],
) -> list[CellDecision]:
    """Pure core: the candidate cells of one scene's mask and the keep/drop decision for each."""
    height, width = bits.shape
    limits = policy.limits()
    decisions = []
    for cell, window in cells_in_raster(epsg, transform, width, height, spec):
        rows, cols = window.slices()
        block = bits[rows, cols]
        if bool(np.all(block & BACKGROUND)):
            continue  # does not touch the footprint: not a candidate
        present = {flag: flag_present(block, flag, policy.cirrus_min_level) for flag in FLAG_NAMES}
        fractions = {flag: float(np.count_nonzero(mask)) / block.size for flag, mask in present.items()}
        disqualifying = np.zeros(block.shape, dtype=bool)
        for flag in limits:
            disqualifying |= present[flag]
        reason = None
        if empty_kept_bands:
            listed = ", ".join(map(str, empty_kept_bands[:5])) + (" ..." if len(empty_kept_bands) > 5 else "")
            reason = f"empty kept band: band(s) {listed} hold no data in this scene"
        else:
            # Background first: a cell sticking out of the footprint is also nodata there, and
            # "outside the footprint" is the reason a reader wants.
            for flag in sorted(limits, key=lambda f: f != "background"):
                limit = limits[flag]
                if fractions[flag] > limit:
                    reason = f"{flag}: {fractions[flag]:.2%} of the cell > {limit:.2%}"
                    break
        decisions.append(
            CellDecision(
                cell=cell,
                col_off=window.col_off,
                row_off=window.row_off,
                kept=reason is None,
                reason=reason,
                fractions=tuple(fractions.items()),
                disqualifying_pixels=int(np.count_nonzero(disqualifying)),
            )
        )
    return decisions


def cell_polygon_lonlat(cells: list[Cell], spec: GridSpec) -> list[Any]:
    """Cell outlines in EPSG:4326, edges densified so the lon/lat polygon follows the projected square."""
    from pyproj import Transformer
    from shapely.geometry import Polygon

    if not cells:
        return []
    transformer = Transformer.from_crs(f"EPSG:{cells[0].epsg}", "EPSG:4326", always_xy=True)
    steps = np.linspace(0.0, 1.0, 5)[:-1]
    polygons = []
    for cell in cells:
        xmin, ymin, xmax, ymax = cell_bounds(cell, spec)
        xs = np.concatenate(
            [xmin + (xmax - xmin) * steps, np.full(4, xmax), xmax - (xmax - xmin) * steps, np.full(4, xmin)]
        )
        ys = np.concatenate(
            [np.full(4, ymax), ymax - (ymax - ymin) * steps, np.full(4, ymin), ymin + (ymax - ymin) * steps]
        )
        lon, lat = transformer.transform(xs, ys)
        polygons.append(Polygon(zip(lon, lat, strict=True)))
    return polygons


def plan_scene(
    record: SceneRecord,
    summary: MaskSummary,
    manifest: Manifest,
    build_uri: str,
    storage_options: dict | None = None,
) -> list[dict[str, Any]] | Rejection:
    """The per-scene task: lattice check, candidate cells, decisions, rows of plan/patches.parquet."""
    spec = manifest.grid.spec
    transform = record.transform
    try:
        check_lattice(transform, spec)
    except OffLatticeError as exc:
        if manifest.grid.off_lattice != "nearest":
            return Rejection(record.source_uri, record.scene_id, STAGE, f"off the grid lattice: {exc}")
        transform = snap_to_lattice(transform, spec)
        check_lattice(transform, spec)
    bits = read_mask(BuildStore(build_uri, storage_options or {}), record.scene_id, summary.mask_sha256)
    decisions = decide_cells(bits, transform, record.epsg, spec, manifest.quality, summary.empty_kept_bands)
    polygons = cell_polygon_lonlat([d.cell for d in decisions], spec)
    rows = []
    for decision, polygon in zip(decisions, polygons, strict=True):
        xmin, ymin, xmax, ymax = cell_bounds(decision.cell, spec)
        row: dict[str, Any] = {
            "scene_id": record.scene_id,
            "location_id": decision.cell.location_id,
            "epsg": decision.cell.epsg,
            "i": decision.cell.i,
            "j": decision.cell.j,
            "col_off": decision.col_off,
            "row_off": decision.row_off,
            "size": spec.patch_size,
            "kept": decision.kept,
            "reason": decision.reason,
            "disqualifying_pixels": decision.disqualifying_pixels,
            "x_min": xmin,
            "y_min": ymin,
            "x_max": xmax,
            "y_max": ymax,
            "start_time": record.start_time,
            "datatake_start": record.datatake_start,
            "datatake_id": record.datatake_id,
            "tile_id": record.tile_id,
            "processor_version": record.processor_version,
            "scene_transform": list(transform),
            "mask_sha256": summary.mask_sha256,
            "geometry": polygon,
        }
        row.update({f"{flag}_fraction": value for flag, value in decision.fractions})
        rows.append(row)
    return rows


def patches_frame(rows: list[dict[str, Any]]) -> Any:
    import geopandas

    columns = [
        "scene_id",
        "location_id",
        "epsg",
        "i",
        "j",
        "col_off",
        "row_off",
        "size",
        "kept",
        "reason",
        "disqualifying_pixels",
        "x_min",
        "y_min",
        "x_max",
        "y_max",
        "start_time",
        "datatake_start",
        "datatake_id",
        "tile_id",
        "processor_version",
        "scene_transform",
        "mask_sha256",
        *[f"{flag}_fraction" for flag in FLAG_NAMES],
        "geometry",
    ]
    if not rows:  # every scene dropped or without a candidate: still the plan's columns and types
        return tables.empty_geodataframe(tables.PLAN_SCHEMA, columns)
    ordered = sorted(rows, key=lambda r: (r["scene_id"], r["row_off"], r["col_off"]))
    frame = geopandas.GeoDataFrame(ordered, columns=columns, geometry="geometry", crs="EPSG:4326")
    frame["reason"] = frame["reason"].astype("string")
    return frame


def stage_config_hash(manifest: Manifest) -> str:
    return manifest.stage_hash(STAGE)


def encode_result(result: list[dict[str, Any]] | Rejection) -> dict[str, Any]:
    """A checkpoint of one scene's plan rows (JSON, exact: WKB geometry, ISO times, float repr)."""
    if isinstance(result, Rejection):
        return {"rejection": asdict(result)}
    rows = []
    for row in result:
        out = dict(row)
        out["geometry"] = row["geometry"].wkb_hex
        out["start_time"] = row["start_time"].isoformat()
        out["datatake_start"] = row["datatake_start"].isoformat()
        rows.append(out)
    return {"rows": rows}


def decode_result(data: dict[str, Any]) -> list[dict[str, Any]] | Rejection:
    from datetime import datetime

    import shapely

    if "rejection" in data:
        return Rejection(**data["rejection"])
    rows = []
    for row in data["rows"]:
        out = dict(row)
        out["geometry"] = shapely.from_wkb(bytes.fromhex(row["geometry"]))
        out["start_time"] = datetime.fromisoformat(row["start_time"])
        out["datatake_start"] = datetime.fromisoformat(row["datatake_start"])
        rows.append(out)
    return rows


def _outputs_valid(store: BuildStore) -> bool:
    read_table_checked(store, PATCHES_TABLE)
    read_table_checked(store, REJECTED_TABLE)
    return True


def run_tile(
    manifest: Manifest,
    store: BuildStore,
    scheduler: Any,
    storage_options: dict | None = None,
    force: bool = False,
) -> StageResult:
    """Plan every masked scene; a scene whose product, mask and settings are unchanged keeps its rows."""
    watch = Stopwatch()
    records = {r.scene_id: r for r in read_scenes(store)}
    if not store.exists(MASKS_TABLE):
        raise FileNotFoundError(f"{store.uri_of(MASKS_TABLE)} is missing: run the mask stage first")
    summaries = [
        s for s in summaries_from_table(read_table_checked(store, MASKS_TABLE)) if s.scene_id in records
    ]
    config_hash = stage_config_hash(manifest)
    items = [
        WorkItem(
            content_key(records[s.scene_id].fingerprint, s.mask_sha256, config_hash),
            s.scene_id,
            (records[s.scene_id], s),
        )
        for s in summaries
    ]
    input_fingerprint = fingerprint_of(sorted(item.key for item in items))
    done = up_to_date(store, STAGE, config_hash, input_fingerprint, lambda: _outputs_valid(store), force)
    if done:
        return done
    stage = ItemStage(
        name=STAGE,
        task=_plan_pair,
        task_args=(manifest, store.uri, storage_options),
        encode=encode_result,
        decode=decode_result,
        on_failure=lambda item, reason: Rejection(
            item.payload[0].source_uri, item.payload[0].scene_id, STAGE, reason
        ),
    )
    outcome = run_items(store, stage, items, scheduler, force=force)
    watch.lap("tile")
    results = [outcome.results[item.key] for item in items]
    rows = [row for result in results if not isinstance(result, Rejection) for row in result]
    rejections = [r for r in results if isinstance(r, Rejection)]
    store.write_geodataframe(PATCHES_TABLE, patches_frame(rows))
    store.write_table(REJECTED_TABLE, rejected_table(rejections))
    prune_checkpoints(store, STAGE, [item.key for item in items])
    dropped: dict[str, int] = {}
    for row in rows:
        if not row["kept"]:
            kind = row["reason"].split(":", 1)[0]
            dropped[kind] = dropped.get(kind, 0) + 1
    counts = {
        "scenes": len(summaries),
        "scenes_planned": outcome.done,
        "scenes_rejected": len(rejections),
        "candidates": len(rows),
        "kept": sum(1 for r in rows if r["kept"]),
        "dropped_by_reason": dict(sorted(dropped.items())),
    }
    watch.lap("write")
    store.write_stage_record(StageRecord(STAGE, config_hash, input_fingerprint, counts, watch.timings))
    return StageResult(counts, skipped=False)


def _plan_pair(
    pair: tuple[SceneRecord, MaskSummary], manifest: Manifest, build_uri: str, storage_options: dict | None
) -> list[dict[str, Any]] | Rejection:
    record, summary = pair
    return plan_scene(record, summary, manifest, build_uri, storage_options)
