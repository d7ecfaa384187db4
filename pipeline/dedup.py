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

from pipeline import tables
from pipeline.engine import StageResult, up_to_date
from pipeline.errors import one_line
from pipeline.grid import LOCATION_ID_MAX_INDEX, Cell, GridSpec, cell_bounds_array, cells_reached_array
from pipeline.storage import StageRecord, Stopwatch
from pipeline.tables import CorruptOutput, read_geodataframe_checked, read_table_checked


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
    half of it (each scene uses the zone of its centre, so one ground area can appear in two zones).

    Array-wise per pair of zones (a zone holds tens of thousands of cells at archive scale): outlines of
    the cells near the zone edge, 9 points per side, projected into the other zone; the other zone's
    cells that their bounds reach are kept when the exact overlap exceeds half a cell."""
    import shapely
    from pyproj import Transformer

    by_zone: dict[int, set[tuple[int, int]]] = defaultdict(set)
    for location_id in set(location_ids):
        cell = Cell.parse(location_id)
        by_zone[cell.epsg].add((cell.i, cell.j))
    keys = {epsg: np.fromiter((i * _KEY + j for i, j in cells), np.int64) for epsg, cells in by_zone.items()}
    found: dict[str, set[str]] = defaultdict(set)
    half = 0.5 * spec.cell_size**2
    t = np.linspace(0.0, 1.0, 9)
    for epsg, zone_cells in by_zone.items():
        zone = epsg % 100
        edges = (-180.0 + 6 * (zone - 1), -180.0 + 6 * zone)
        to_lonlat = Transformer.from_crs(f"EPSG:{epsg}", "EPSG:4326", always_xy=True)
        ij = np.array(sorted(zone_cells), dtype=np.int64).reshape(-1, 2)
        xmin, ymin, xmax, ymax = cell_bounds_array(ij[:, 0], ij[:, 1], spec)
        lon, _ = to_lonlat.transform((xmin + xmax) / 2, (ymin + ymax) / 2)
        near = np.minimum(np.abs(lon - edges[0]), np.abs(lon - edges[1])) <= max_degrees_from_edge
        if not near.any():
            continue
        ij, xmin, ymin, xmax, ymax = ij[near], xmin[near], ymin[near], xmax[near], ymax[near]
        ones = np.ones_like(t)
        xs = np.concatenate(
            [
                xmin[:, None] + (xmax - xmin)[:, None] * t,
                xmax[:, None] * ones,
                xmax[:, None] - (xmax - xmin)[:, None] * t,
                xmin[:, None] * ones,
            ],
            axis=1,
        )
        ys = np.concatenate(
            [
                ymax[:, None] * ones,
                ymax[:, None] - (ymax - ymin)[:, None] * t,
                ymin[:, None] * ones,
                ymin[:, None] + (ymax - ymin)[:, None] * t,
            ],
            axis=1,
        )
        for other in neighbour_zones(epsg):
            if other not in by_zone:
                continue
            to_other = Transformer.from_crs(f"EPSG:{epsg}", f"EPSG:{other}", always_xy=True)
            ox, oy = to_other.transform(xs.ravel(), ys.ravel())
            outlines = shapely.polygons(np.stack([ox, oy], axis=-1).reshape(len(ij), xs.shape[1], 2))
            which, ci, cj = cells_reached_array(shapely.bounds(outlines), spec)
            member = (ci >= 0) & (ci <= LOCATION_ID_MAX_INDEX) & (cj >= 0) & (cj <= LOCATION_ID_MAX_INDEX)
            member[member] = np.isin(ci[member] * _KEY + cj[member], keys[other])
            which, ci, cj = which[member], ci[member], cj[member]
            if not len(which):
                continue
            bxmin, bymin, bxmax, bymax = cell_bounds_array(ci, cj, spec)
            # the ring of Polygon.from_bounds, so that the overlap is computed on the same vertices
            boxes = shapely.polygons(
                np.stack(
                    [np.stack([bxmin, bxmin, bxmax, bxmax], 1), np.stack([bymin, bymax, bymax, bymin], 1)],
                    axis=-1,
                )
            )
            overlap = shapely.area(shapely.intersection(outlines[which], boxes)) > half
            for k, i, j in zip(
                which[overlap].tolist(), ci[overlap].tolist(), cj[overlap].tolist(), strict=True
            ):
                mine = Cell(epsg, *ij[k].tolist()).location_id
                theirs = Cell(other, i, j).location_id
                found[mine].add(theirs)
                found[theirs].add(mine)
    return {lid: tuple(sorted(ids)) for lid, ids in sorted(found.items())}


_KEY = LOCATION_ID_MAX_INDEX + 1  # i * _KEY + j: one integer per cell of a zone


# Stage I/O ---------------------------------------------------------------------------------------

INDEX_PATCHES = tables.INDEX_PATCHES
INDEX_LOCATIONS = tables.INDEX_LOCATIONS
INDEX_RETIRED = tables.INDEX_RETIRED
INDEX_LINEAGE = tables.INDEX_LINEAGE
STAGE = "dedup"


def candidates_from_plan(frame: Any) -> list[Candidate]:
    # As a boolean mask: an untyped empty column would otherwise select columns, not rows.
    kept = frame[frame["kept"].astype(bool).to_numpy()]
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
    fractions = [c for c in plan.columns if c.endswith("_fraction")]
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
        *fractions,
        "geometry",
    ]
    patches = _patches_table(plan, chosen, row_of, columns)
    retired = _retired_table(previous, already_retired, newly_retired, columns)

    overlaps = neighbour_overlaps(sorted(set(patches["location_id"])), spec)
    locations = _locations_table(patches, overlaps)
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


def _outputs_valid(store: Any) -> bool:
    for table in (INDEX_PATCHES, INDEX_LOCATIONS, INDEX_RETIRED):
        read_table_checked(store, table)
    return bool(store.read_json(INDEX_LINEAGE).get("lineage"))


def run_dedup(manifest: Any, store: Any, force: bool = False) -> StageResult:
    watch = Stopwatch()
    plan = read_geodataframe_checked(store, tables.PLAN_PATCHES)
    input_fingerprint = hashlib.sha256(store.read_bytes(tables.PLAN_PATCHES)).hexdigest()[:16]
    config_hash = manifest.stage_hash(STAGE)
    done = up_to_date(store, STAGE, config_hash, input_fingerprint, lambda: _outputs_valid(store), force)
    if done:
        return done
    previous = store.read_stage_record(STAGE)
    # Incremental: an index of the same configuration keeps its rows (new patches are appended);
    # after a configuration change the index starts afresh with a new lineage. An index that does not
    # validate is not trusted: the index starts afresh too.
    incremental = (
        not force and previous is not None and previous.get("config_hash") == config_hash and _readable(store)
    )
    old = read_geodataframe_checked(store, INDEX_PATCHES) if incremental else None
    old_retired = read_geodataframe_checked(store, INDEX_RETIRED) if incremental else None
    patches, retired, locations, counts = build_index(plan, manifest.grid.spec, old, old_retired)
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


def _readable(store: Any) -> bool:
    """The previous index can be extended: its tables and lineage validate."""
    try:
        return _outputs_valid(store)
    except (CorruptOutput, ValueError, KeyError, TypeError) as exc:
        print(f"dedup: the previous index is not usable ({one_line(exc)}); starting it afresh")
        return False


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
        return tables.empty_geodataframe(tables.INDEX_RETIRED_SCHEMA, [*columns, "retired_reason"])
    table = pd.concat(parts, ignore_index=True).drop_duplicates(subset="row", keep="first")
    table = table.drop(columns=[c for c in table.columns if c not in (*columns, "retired_reason")])
    return (
        geopandas.GeoDataFrame(table, geometry="geometry", crs="EPSG:4326")
        .sort_values("row")
        .reset_index(drop=True)
    )


# Table builders of build_index ---------------------------------------------------------------------
# Whole columns are taken from the plan at once: looking up one plan row per patch (pandas `.loc`) and
# grouping one location at a time took minutes at the scale of the full archive.

_PLAN_COLUMNS = (
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
)

_LOCATION_COLUMNS = [
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
]


def _object_array(values: list[Any]) -> np.ndarray:
    # Filled one by one: numpy would turn a list of equal-length lists into a 2-D array.
    out = np.empty(len(values), dtype=object)
    for k, value in enumerate(values):
        out[k] = value
    return out


def _plan_positions(plan: Any, scene_ids: list[str], location_ids: list[str]) -> np.ndarray:
    """Positions in `plan` of the (scene_id, location_id) pairs; each pair must occur exactly once."""
    import pandas as pd

    keys = pd.MultiIndex.from_arrays([plan["scene_id"], plan["location_id"]])
    if not keys.is_unique:
        raise ValueError("plan/patches.parquet holds a (scene_id, location_id) pair twice")
    positions = keys.get_indexer(pd.MultiIndex.from_arrays([scene_ids, location_ids]))
    if (positions < 0).any():
        raise KeyError("a chosen patch is missing from plan/patches.parquet")
    return np.asarray(positions, dtype=np.int64)


def _patches_table(plan: Any, chosen: list[ChosenPatch], row_of: dict[str, int], columns: list[str]) -> Any:
    """The index patches in row order; plan columns keep their dtypes (the plan is written by the
    tile stage from Python rows, so they are the dtypes pandas infers for those rows)."""
    import geopandas

    if not chosen:
        return tables.empty_geodataframe(tables.INDEX_PATCHES_SCHEMA, columns)
    fractions = [c for c in columns if c.endswith("_fraction")]
    positions = _plan_positions(
        plan, [p.candidate.scene_id for p in chosen], [p.candidate.location_id for p in chosen]
    )
    source = plan[[*_PLAN_COLUMNS, *fractions, "x_min", "y_max"]].take(positions).reset_index(drop=True)
    data: dict[str, Any] = {
        "row": np.asarray([row_of[p.patch_id] for p in chosen], dtype=np.int64),
        "patch_id": [p.patch_id for p in chosen],
        "location_id": [p.candidate.location_id for p in chosen],
        "scene_id": [p.candidate.scene_id for p in chosen],
        "duplicates": _object_array([list(p.duplicates) for p in chosen]),
        "acquisition_date": [p.patch_id.split("_")[1] for p in chosen],
    }
    for column in (*_PLAN_COLUMNS, *fractions):
        data[column] = source[column]
    data["x_ul"] = source["x_min"].to_numpy(dtype=np.float64)
    data["y_ul"] = source["y_max"].to_numpy(dtype=np.float64)
    data["geometry"] = plan.geometry.values.take(positions)
    return geopandas.GeoDataFrame(
        {column: data[column] for column in columns}, geometry="geometry", crs="EPSG:4326"
    )


def _locations_table(patches: Any, overlaps: dict[str, tuple[str, ...]]) -> Any:
    """One row per location, sorted by location_id: the cell (from its first patch in row order),
    its distinct acquisition dates and its patch ids (sorted)."""
    import geopandas

    if not len(patches):
        return tables.empty_geodataframe(tables.INDEX_LOCATIONS_SCHEMA, _LOCATION_COLUMNS)
    first = patches.drop_duplicates("location_id", keep="first").sort_values("location_id", kind="stable")
    location_ids = first["location_id"].tolist()
    dates = (
        patches[["location_id", "acquisition_date"]]
        .drop_duplicates()
        .groupby("location_id", sort=True)["acquisition_date"]
    )
    ids = patches[["location_id", "patch_id"]].sort_values(["location_id", "patch_id"], kind="stable")
    ends = np.cumsum(ids.groupby("location_id", sort=True).size().to_numpy())
    patch_ids = ids["patch_id"].tolist()
    starts = np.concatenate([[0], ends[:-1]])

    def day(text: str) -> date:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8]))

    return geopandas.GeoDataFrame(
        {
            "location_id": location_ids,
            "epsg": first["epsg"].to_numpy(dtype=np.int64),
            "i": first["i"].to_numpy(dtype=np.int64),
            "j": first["j"].to_numpy(dtype=np.int64),
            "n_dates": dates.size().to_numpy(dtype=np.int64),
            "first_date": _object_array([day(d) for d in dates.min().tolist()]),
            "last_date": _object_array([day(d) for d in dates.max().tolist()]),
            "patch_ids": _object_array([patch_ids[a:b] for a, b in zip(starts, ends, strict=True)]),
            "neighbour_zone_overlaps": _object_array([list(overlaps.get(lid, ())) for lid in location_ids]),
            "geometry": first.geometry.values,
        },
        geometry="geometry",
        crs="EPSG:4326",
    )
