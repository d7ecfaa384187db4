"""Stage 4, `dedup`: one patch per acquisition of a location, and the multitemporal location index.

A location is a grid cell. The same cell seen by one datatake in two overlapping tiles, or in a
reprocessed product, is one acquisition: the newest processor version wins, then the fewest
disqualifying-flag pixels, then the smallest `scene_id`; the others are recorded as its duplicates.
`choose_patches` is pure and independent of input order; the stage I/O is `run_dedup`.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date
from typing import Any

import numpy as np

from pipeline.grid import Cell, GridSpec, cell_bounds, cells_for_bounds


@dataclass(frozen=True, slots=True, order=True)
class Candidate:
    """A kept cell of one scene, as far as dedup needs to know it."""

    location_id: str
    datatake_id: str
    scene_id: str
    acquisition_date: date
    processor_version: str  # "V010303"
    disqualifying_pixels: int
    row_off: int = 0
    col_off: int = 0


@dataclass(frozen=True, slots=True)
class ChosenPatch:
    patch_id: str
    candidate: Candidate
    duplicates: tuple[str, ...]  # scene_ids of the other candidates of this acquisition, sorted


def version_number(processor_version: str) -> int:
    return int(processor_version.lstrip("Vv"))


def preference(candidate: Candidate) -> tuple[int, int, str]:
    """Sort key: the best candidate of an acquisition sorts first."""
    return (-version_number(candidate.processor_version), candidate.disqualifying_pixels, candidate.scene_id)


def patch_id(location_id: str, acquisition_date: date, datatake_id: str) -> str:
    return f"{location_id}_{acquisition_date:%Y%m%d}_DT{int(datatake_id):010d}"


def choose_patches(candidates: Iterable[Candidate]) -> list[ChosenPatch]:
    """Group candidates into acquisitions (location, datatake) and keep the preferred one of each.

    The acquisition date in the id is the datatake's start date (`specific/datatakeStart`), shared by
    all its tiles and versions, so the id does not depend on which tile or version wins even when a
    datatake straddles midnight UTC.
    """
    groups: dict[tuple[str, str], list[Candidate]] = defaultdict(list)
    for candidate in candidates:
        groups[(candidate.location_id, candidate.datatake_id)].append(candidate)
    chosen = []
    for (location_id, datatake_id), group in groups.items():
        ordered = sorted(group, key=preference)
        best = ordered[0]
        day = min(c.acquisition_date for c in group)
        chosen.append(
            ChosenPatch(
                patch_id=patch_id(location_id, day, datatake_id),
                candidate=best,
                duplicates=tuple(sorted(c.scene_id for c in ordered[1:])),
            )
        )
    return order_rows(chosen)


def order_rows(chosen: list[ChosenPatch]) -> list[ChosenPatch]:
    """Zarr row order: by scene, then top to bottom and left to right in it, so a shard of
    consecutive rows needs as few scenes as possible and reads them in raster order."""
    return sorted(
        chosen, key=lambda p: (p.candidate.scene_id, p.candidate.row_off, p.candidate.col_off, p.patch_id)
    )


# Neighbouring UTM zones --------------------------------------------------------------------------


def neighbour_zones(epsg: int) -> tuple[int, int]:
    base, zone = divmod(epsg, 100)
    return (base * 100 + (zone - 2) % 60 + 1, base * 100 + zone % 60 + 1)


def neighbour_overlaps(
    location_ids: Iterable[str], spec: GridSpec, max_degrees_from_edge: float = 0.5
) -> dict[str, tuple[str, ...]]:
    """For each location, the locations of the build in a neighbouring UTM zone that cover more than
    half of it (each scene uses the zone of its centre, so one ground area can appear in two zones)."""
    from pyproj import Transformer
    from shapely.geometry import Polygon

    cells = [Cell.parse(lid) for lid in location_ids]
    by_zone: dict[int, set[Cell]] = defaultdict(set)
    for cell in cells:
        by_zone[cell.epsg].add(cell)
    found: dict[str, set[str]] = defaultdict(set)
    half = 0.5 * spec.cell_size**2
    for epsg, zone_cells in by_zone.items():
        zone = epsg % 100
        edges = (-180.0 + 6 * (zone - 1), -180.0 + 6 * zone)
        to_lonlat = Transformer.from_crs(f"EPSG:{epsg}", "EPSG:4326", always_xy=True)
        ordered = sorted(zone_cells)
        centres = np.array(
            [[(b[0] + b[2]) / 2, (b[1] + b[3]) / 2] for b in (cell_bounds(c, spec) for c in ordered)]
        )
        lon, _ = to_lonlat.transform(centres[:, 0], centres[:, 1])
        near_edge = np.minimum(np.abs(lon - edges[0]), np.abs(lon - edges[1])) <= max_degrees_from_edge
        for other in neighbour_zones(epsg):
            if other not in by_zone:
                continue
            to_other = Transformer.from_crs(f"EPSG:{epsg}", f"EPSG:{other}", always_xy=True)
            for cell, near in zip(ordered, near_edge.tolist(), strict=True):
                if not near:
                    continue
                xmin, ymin, xmax, ymax = cell_bounds(cell, spec)
                t = np.linspace(0.0, 1.0, 9)
                xs = np.concatenate(
                    [xmin + (xmax - xmin) * t, np.full(9, xmax), xmax - (xmax - xmin) * t, np.full(9, xmin)]
                )
                ys = np.concatenate(
                    [np.full(9, ymax), ymax - (ymax - ymin) * t, np.full(9, ymin), ymin + (ymax - ymin) * t]
                )
                ox, oy = to_other.transform(xs, ys)
                outline = Polygon(zip(ox, oy, strict=True))
                for candidate in cells_for_bounds(other, outline.bounds, spec):
                    if candidate not in by_zone[other]:
                        continue
                    box = Polygon.from_bounds(*cell_bounds(candidate, spec))
                    if outline.intersection(box).area > half:
                        found[cell.location_id].add(candidate.location_id)
                        found[candidate.location_id].add(cell.location_id)
    return {lid: tuple(sorted(ids)) for lid, ids in found.items()}


# Stage I/O ---------------------------------------------------------------------------------------

INDEX_PATCHES = "index/patches.parquet"
INDEX_LOCATIONS = "index/locations.parquet"
INDEX_RETIRED = "index/retired.parquet"
INDEX_LINEAGE = "index/lineage.json"
STAGE = "dedup"


def candidates_from_plan(frame: Any) -> list[Candidate]:
    kept = frame[frame["kept"]]
    out = []
    for row in kept[
        [
            "location_id",
            "datatake_id",
            "scene_id",
            "datatake_start",
            "processor_version",
            "disqualifying_pixels",
            "row_off",
            "col_off",
        ]
    ].itertuples(index=False):
        out.append(
            Candidate(
                location_id=row.location_id,
                datatake_id=row.datatake_id,
                scene_id=row.scene_id,
                acquisition_date=row.datatake_start.date(),
                processor_version=row.processor_version,
                disqualifying_pixels=int(row.disqualifying_pixels),
                row_off=int(row.row_off),
                col_off=int(row.col_off),
            )
        )
    return out


def assign_rows(
    chosen: list[ChosenPatch], previous: dict[str, tuple[int, str]], retired_rows: set[int]
) -> tuple[dict[str, int], dict[int, str]]:
    """Zarr rows for the chosen patches, stable across incremental builds (pure).

    `previous` maps the patch ids of the last index to (row, scene_id). A patch from the same scene
    keeps its row, so its shard need not be rewritten; a new patch, or one now taken from another
    scene (a newer processor version), gets a new row after every row used so far. Returns
    (patch_id -> row, newly retired row -> reason).
    """
    rows: dict[str, int] = {}
    next_row = max([r for r, _ in previous.values()] + list(retired_rows), default=-1) + 1
    chosen_scene = {p.patch_id: p.candidate.scene_id for p in chosen}
    for patch in chosen:
        old = previous.get(patch.patch_id)
        if old is not None and old[1] == patch.candidate.scene_id:
            rows[patch.patch_id] = old[0]
        else:
            rows[patch.patch_id] = next_row
            next_row += 1
    retired = {}
    for patch_id, (row, scene_id) in previous.items():
        if rows.get(patch_id) == row:
            continue
        now = chosen_scene.get(patch_id)
        retired[row] = f"superseded by {now}" if now else "no longer kept"
    return rows, retired


def build_index(
    plan: Any, spec: GridSpec, previous: Any = None, previous_retired: Any = None
) -> tuple[Any, Any, Any, dict[str, Any]]:
    """Pure over tables: (index patches, retired rows, locations, counts) from plan/patches.parquet.

    With `previous` (the last index of the same configuration), rows are assigned so that existing
    patches keep theirs and new ones are appended; rows that no longer hold an index patch are
    listed as retired (their pixels stay in the Zarr arrays, hidden from index, catalog and queries).
    """
    import geopandas
    import pandas as pd

    chosen = choose_patches(candidates_from_plan(plan))
    old_rows: dict[str, tuple[int, str]] = {}
    if previous is not None:
        old_rows = {
            p: (int(r), s)
            for p, r, s in zip(previous["patch_id"], previous["row"], previous["scene_id"], strict=True)
        }
    already_retired = previous_retired if previous_retired is not None and len(previous_retired) else None
    retired_set = set(already_retired["row"].astype(int)) if already_retired is not None else set()
    row_of, newly_retired = assign_rows(chosen, old_rows, retired_set)
    chosen = sorted(chosen, key=lambda p: row_of[p.patch_id])
    by_key = plan.set_index(["scene_id", "location_id"])
    rows = []
    for patch in chosen:
        source = by_key.loc[(patch.candidate.scene_id, patch.candidate.location_id)]
        record = {
            "row": row_of[patch.patch_id],
            "patch_id": patch.patch_id,
            "location_id": patch.candidate.location_id,
            "scene_id": patch.candidate.scene_id,
            "duplicates": list(patch.duplicates),
            "acquisition_date": patch.patch_id.split("_")[1],
        }
        for column in (
            "epsg",
            "i",
            "j",
            "col_off",
            "row_off",
            "size",
            "start_time",
            "datatake_id",
            "tile_id",
            "processor_version",
            "disqualifying_pixels",
            "scene_transform",
            "geometry",
            *[c for c in plan.columns if c.endswith("_fraction")],
        ):
            record[column] = source[column]
        record["x_ul"] = float(source["x_min"])
        record["y_ul"] = float(source["y_max"])
        rows.append(record)
    columns = [
        "row",
        "patch_id",
        "location_id",
        "scene_id",
        "duplicates",
        "acquisition_date",
        "epsg",
        "i",
        "j",
        "col_off",
        "row_off",
        "size",
        "x_ul",
        "y_ul",
        "start_time",
        "datatake_id",
        "tile_id",
        "processor_version",
        "disqualifying_pixels",
        "scene_transform",
        *[c for c in plan.columns if c.endswith("_fraction")],
        "geometry",
    ]
    patches = geopandas.GeoDataFrame(rows, columns=columns, geometry="geometry", crs="EPSG:4326")
    retired = _retired_table(previous, already_retired, newly_retired, columns)

    overlaps = neighbour_overlaps(sorted(set(patches["location_id"])), spec)
    location_rows = []
    for location_id, group in patches.groupby("location_id", sort=True):
        dates = sorted(set(group["acquisition_date"]))
        location_rows.append(
            {
                "location_id": location_id,
                "epsg": int(group["epsg"].iloc[0]),
                "i": int(group["i"].iloc[0]),
                "j": int(group["j"].iloc[0]),
                "n_dates": len(dates),
                "first_date": pd.Timestamp(dates[0]).date(),
                "last_date": pd.Timestamp(dates[-1]).date(),
                "patch_ids": sorted(group["patch_id"]),
                "neighbour_zone_overlaps": list(overlaps.get(location_id, ())),
                "geometry": group.geometry.iloc[0],
            }
        )
    locations = geopandas.GeoDataFrame(
        location_rows,
        columns=[
            "location_id",
            "epsg",
            "i",
            "j",
            "n_dates",
            "first_date",
            "last_date",
            "patch_ids",
            "neighbour_zone_overlaps",
            "geometry",
        ],
        geometry="geometry",
        crs="EPSG:4326",
    )
    n_dates = dict(zip(locations["location_id"], locations["n_dates"], strict=True))
    patches["n_dates"] = patches["location_id"].map(n_dates).astype("int64")

    dropped: dict[str, int] = {}
    for reason in plan.loc[~plan["kept"], "reason"]:
        kind = str(reason).split(":", 1)[0]
        dropped[kind] = dropped.get(kind, 0) + 1
    multi = int((locations["n_dates"] > 1).sum()) if len(locations) else 0
    counts = {
        "scenes": int(plan["scene_id"].nunique()),
        "candidates": len(plan),
        "kept_candidates": int(plan["kept"].sum()),
        "dropped_by_reason": dict(sorted(dropped.items())),
        "duplicates": sum(len(p.duplicates) for p in chosen),
        "patches": len(patches),
        "rows": int(max([*patches["row"], *retired["row"]], default=-1)) + 1,
        "retired_rows": len(retired),
        "locations": len(locations),
        "multi_date_locations": multi,
        "multi_date_share": round(multi / len(locations), 4) if len(locations) else 0.0,
        "neighbour_zone_pairs": sum(len(v) for v in overlaps.values()) // 2,
    }
    return patches, retired, locations, counts


def run_dedup(manifest: Any, store: Any, force: bool = False) -> Any:
    from pipeline.mask import StageResult
    from pipeline.storage import StageRecord, Stopwatch
    from pipeline.tile import PATCHES_TABLE, grid_spec

    watch = Stopwatch()
    if not store.exists(PATCHES_TABLE):
        raise FileNotFoundError(f"{store.uri_of(PATCHES_TABLE)} is missing: run the tile stage first")
    raw = store.read_bytes(PATCHES_TABLE)
    input_fingerprint = hashlib.sha256(raw).hexdigest()[:16]
    config_hash = manifest.stage_hash(STAGE)
    done = store.up_to_date(STAGE, config_hash, input_fingerprint, (INDEX_PATCHES, INDEX_LOCATIONS), force)
    if done:
        return StageResult(done["counts"], skipped=True)
    previous = store.read_stage_record(STAGE)
    plan = store.read_geodataframe(PATCHES_TABLE)
    # Incremental: an index of the same configuration keeps its rows (new patches are appended);
    # after a configuration change the index starts afresh with a new lineage.
    incremental = (
        previous is not None
        and previous["config_hash"] == config_hash
        and store.exists(INDEX_PATCHES)
        and store.exists(INDEX_LINEAGE)
    )
    old = store.read_geodataframe(INDEX_PATCHES) if incremental else None
    old_retired = (
        store.read_geodataframe(INDEX_RETIRED) if incremental and store.exists(INDEX_RETIRED) else None
    )
    patches, retired, locations, counts = build_index(plan, grid_spec(manifest.grid), old, old_retired)
    watch.lap("dedup")
    lineage = (
        store.read_json(INDEX_LINEAGE)["lineage"]
        if incremental
        else hashlib.sha256(f"{config_hash}:{input_fingerprint}".encode()).hexdigest()[:16]
    )
    # Retired rows first: a run killed between the two files then still knows every row.
    store.write_geodataframe(INDEX_RETIRED, retired)
    store.write_geodataframe(INDEX_PATCHES, patches)
    store.write_geodataframe(INDEX_LOCATIONS, locations)
    store.write_json(INDEX_LINEAGE, {"lineage": lineage, "rows": counts["rows"]})
    watch.lap("write")
    store.write_stage_record(StageRecord(STAGE, config_hash, input_fingerprint, counts, watch.timings))
    return StageResult(counts, skipped=False)


def _retired_table(
    previous: Any, already_retired: Any, newly_retired: dict[int, str], columns: list[str]
) -> Any:
    """Rows of the Zarr arrays that hold no index patch any more, with what they still hold and why."""
    import geopandas
    import pandas as pd

    parts = []
    if already_retired is not None:
        parts.append(already_retired)
    if newly_retired and previous is not None:
        leaving = previous[previous["row"].isin(list(newly_retired))].copy()
        leaving["retired_reason"] = leaving["row"].map(newly_retired)
        parts.append(leaving)
    if not parts:
        return geopandas.GeoDataFrame(
            columns=[*columns, "retired_reason"], geometry="geometry", crs="EPSG:4326"
        )
    table = pd.concat(parts, ignore_index=True).drop_duplicates(subset="row", keep="first")
    table = table.drop(columns=[c for c in table.columns if c not in (*columns, "retired_reason")])
    return (
        geopandas.GeoDataFrame(table, geometry="geometry", crs="EPSG:4326")
        .sort_values("row")
        .reset_index(drop=True)
    )
