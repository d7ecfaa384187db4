"""Metadata-only archive at SpectralEarth scale: the plan table of ~11,636 scenes, no pixels.

Steps (each run in its own process by bench/run.py, so each reports its own time and ru_maxrss):
  generate  the tables the `tile` stage would write (plan/patches.parquet, with geometry) and the
            `inventory` scenes table, from a seeded model (below);
  dedup     `pipeline.dedup.build_index` on that plan (index patches and locations);
  catalog   `stac.records.parse_*` + `stac.catalog_writer.plan_catalog` +
            `stac.geoparquet.write_items_parquet`
            (stac/items.parquet), and per-item JSON serialisation on a sample (extrapolated);
  query     `stac.search.search` latency (bbox + datetime + cloud; an id lookup) against a naive scan
            (geopandas over every row with exact geometry tests).

The model (seeded, deterministic):
- scene centres on land: uniform in a few lon/lat boxes that approximate the continents, weighted by
  their area (cos latitude), no downloads;
- sites (ground areas) with 1..5 datatakes (revisits, shifted by up to 1 cell per axis), 10 % of the
  datatakes delivered as two overlapping tiles (the second 6 cells along track: one row of cells in both,
  which dedup must collapse);
- each scene covers a 9 x 9 block of grid cells in its UTM zone (centre zone): the outer ring sticks out
  of the rotated footprint (dropped, `background`), the inner 7 x 7 are candidates inside it;
- cloud cover drawn per scene (Beta), spread over its cells by a clustered (Gamma) factor; shadow follows
  the clouds; cirrus, haze, snow, water drawn per cell; a cell is kept with the SpectralEarth manifest's
  thresholds (cloud, shadow, cirrus <= 10 %, background 0).
The constants are tuned so that a full archive gives ~540,000 patches, ~415,000 locations and ~17.5 % of
locations with several dates (SpectralEarth: 538,974 / 415,153 / 17.5 %).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from common import MB, REPO, current_rss_bytes, write_result

from pipeline.quality import FLAG_NAMES

CELL = 3840.0
OFFSET = 15.0
PIXEL = 30.0
BLOCK = 9  # cells per side of a scene's block; the outer ring lies partly outside the footprint
PAD_PX = 20  # raster padding around the block
FLAGS = FLAG_NAMES
LIMITS = {"nodata": 0.0, "background": 0.0, "cloud": 0.10, "cloud_shadow": 0.10, "cirrus": 0.10}
# (west, east, south, north): rough continents, no oceans to speak of
LAND_BOXES = (
    (-125.0, -67.0, 26.0, 49.0),  # USA
    (-135.0, -60.0, 49.0, 68.0),  # Canada
    (-110.0, -85.0, 14.0, 26.0),  # Mexico, Central America
    (-80.0, -38.0, -33.0, 5.0),  # South America
    (-72.0, -58.0, -52.0, -33.0),  # Patagonia
    (-10.0, 30.0, 37.0, 60.0),  # Europe
    (30.0, 60.0, 40.0, 62.0),  # Eastern Europe, Caucasus
    (-17.0, 35.0, 5.0, 32.0),  # Sahara, Sahel
    (10.0, 40.0, -34.0, 5.0),  # Central and Southern Africa
    (35.0, 60.0, 13.0, 32.0),  # Arabia, Middle East
    (60.0, 120.0, 35.0, 55.0),  # Central Asia, China
    (70.0, 88.0, 8.0, 30.0),  # India
    (100.0, 122.0, 20.0, 35.0),  # South China
    (95.0, 140.0, -8.0, 8.0),  # South-East Asia
    (115.0, 152.0, -38.0, -18.0),  # Australia
)
VISITS_P = (0.82, 0.07, 0.05, 0.04, 0.02)  # share of sites with 1, 2, 3, 4, 5 datatakes
TWO_TILES_P = 0.10
MAX_SHIFT = 1  # cells
CLOUD_BETA = (0.3, 18.0)  # mean 2 %: archive scenes chosen for low cloud cover
CLUSTER_SHAPE = 0.5
FIRST = datetime(2022, 6, 1, tzinfo=UTC)
DAYS = 930


def _land_points(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    boxes = np.asarray(LAND_BOXES)
    west, east, south, north = boxes.T
    area = (east - west) * (np.sin(np.radians(north)) - np.sin(np.radians(south)))
    which = rng.choice(len(boxes), size=n, p=area / area.sum())
    lon = rng.uniform(west[which], east[which])
    # uniform on the sphere within the box; not within ~100 km of the equator, where a block of cells
    # shifted by a revisit or a second tile would cross into the other hemisphere's UTM zone
    s0, s1 = np.sin(np.radians(south[which])), np.sin(np.radians(north[which]))
    lat = np.degrees(np.arcsin(rng.uniform(s0, s1)))
    near = np.abs(lat) < 1.0
    lat[near] = np.where(lat[near] < 0, -1.0, 1.0) * rng.uniform(1.0, 2.0, int(near.sum()))
    return lon, lat


def model_scenes(n_scenes: int, seed: int) -> dict[str, np.ndarray]:
    """Per scene: site, datatake, tile, date, block origin (i0, j0), EPSG, cloud cover."""
    rng = np.random.default_rng(seed)
    # enough sites for n_scenes (mean scenes per site ~ E[visits] * (1 + TWO_TILES_P))
    mean_visits = sum((k + 1) * p for k, p in enumerate(VISITS_P))
    n_sites = int(n_scenes / (mean_visits * (1 + TWO_TILES_P)) * 1.1) + 10
    lon, lat = _land_points(rng, n_sites)
    zone = np.clip(np.floor((lon + 180.0) / 6.0).astype(int) + 1, 1, 60)
    epsg = np.where(lat >= 0, 32600, 32700) + zone
    x, y = np.zeros(n_sites), np.zeros(n_sites)
    from pyproj import Transformer

    for code in np.unique(epsg):
        sel = epsg == code
        transformer = Transformer.from_crs("EPSG:4326", f"EPSG:{code}", always_xy=True)
        x[sel], y[sel] = transformer.transform(lon[sel], lat[sel])
    i_anchor = np.floor((x - OFFSET) / CELL).astype(int) - BLOCK // 2
    j_anchor = np.floor((y - OFFSET) / CELL).astype(int) - BLOCK // 2
    visits = rng.choice(len(VISITS_P), size=n_sites, p=VISITS_P) + 1
    rows: dict[str, list[Any]] = {
        k: [] for k in ("site", "datatake", "tile", "day", "i0", "j0", "epsg", "lon")
    }
    datatake = 1000
    for site in range(n_sites):
        days = np.sort(rng.choice(DAYS, size=visits[site], replace=False))
        for visit in range(visits[site]):
            di, dj = (0, 0) if visit == 0 else rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, size=2)
            tiles = 2 if rng.random() < TWO_TILES_P else 1
            datatake += int(rng.integers(1, 40))
            for tile in range(1, tiles + 1):
                rows["site"].append(site)
                rows["datatake"].append(datatake)
                rows["tile"].append(tile)
                rows["day"].append(int(days[visit]))
                rows["i0"].append(int(i_anchor[site] + di))
                rows["j0"].append(int(j_anchor[site] + dj - (tile - 1) * (BLOCK - 3)))
                rows["epsg"].append(int(epsg[site]))
                rows["lon"].append(float(lon[site]))
    out = {k: np.asarray(v)[:n_scenes] for k, v in rows.items()}
    if len(out["site"]) < n_scenes:
        raise RuntimeError("model made too few scenes")
    out["cloud_cover"] = rng.beta(*CLOUD_BETA, size=n_scenes)
    # local time ~10:30, EnMAP descending; tile 2 starts ~4.3 s after tile 1
    hours = 10.5 - out["lon"] / 15.0 + rng.uniform(-0.4, 0.4, size=n_scenes)
    out["seconds"] = np.round(out["day"] * 86400.0 + hours * 3600.0, 3)
    # both tiles of a datatake share the datatake start (tile 1's)
    first: dict[int, float] = {}
    for k in range(n_scenes):
        first.setdefault(int(out["datatake"][k]), out["seconds"][k])
    out["datatake_seconds"] = np.asarray([first[int(d)] for d in out["datatake"]])
    out["seconds"] = out["datatake_seconds"] + (out["tile"] - 1) * 4.3
    return out


def _cell_polygons(epsg: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Cell outlines in EPSG:4326, 4 points per edge (like the tile stage), vectorised per zone."""
    import shapely
    from pyproj import Transformer

    steps = np.linspace(0.0, 1.0, 5)[:-1]
    ones = np.ones(4)
    # unit square walk: top edge, right edge, bottom edge, left edge (x, y in cell units)
    ux = np.concatenate([steps, ones, 1 - steps, 0 * ones])
    uy = np.concatenate([ones, 1 - steps, 0 * ones, steps])
    out = np.empty(len(i), dtype=object)
    for code in np.unique(epsg):
        sel = np.nonzero(epsg == code)[0]
        x = OFFSET + (i[sel, None] + ux[None, :]) * CELL
        y = OFFSET + (j[sel, None] + uy[None, :]) * CELL
        transformer = Transformer.from_crs(f"EPSG:{code}", "EPSG:4326", always_xy=True)
        lon, lat = transformer.transform(x.ravel(), y.ravel())
        coords = np.stack([np.reshape(lon, x.shape), np.reshape(lat, x.shape)], axis=-1)
        coords = np.concatenate([coords, coords[:, :1]], axis=1)
        out[sel] = shapely.polygons(coords)
    return out


def scene_id(datatake: int, tile: int, start: datetime, version: str = "V010303") -> str:
    processed = start + timedelta(days=21)
    return (
        f"ENMAP01-____L2A-DT{datatake:010d}_{start:%Y%m%dT%H%M%S}Z_{tile:03d}_{version}_"
        f"{processed:%Y%m%dT%H%M%S}Z"
    )


@dataclass(frozen=True)
class SceneFacts:
    """Per-scene values both tables carry, derived once from the model: ids, start times (as pandas
    timestamps in microseconds), the raster origin (upper left, padded) and its affine transform."""

    ids: list[str]
    start: Any  # pandas DatetimeIndex
    datatake_start: Any  # pandas DatetimeIndex
    x0: np.ndarray
    y0: np.ndarray
    transforms: list[list[float]]


@dataclass(frozen=True)
class Cells:
    """Every scene's 9 x 9 block of grid cells, flattened: the model row (scene) of each cell, its grid
    indices and whether it lies in the block's outer ring."""

    scene: np.ndarray
    i: np.ndarray
    j: np.ndarray
    ring: np.ndarray


def scene_facts(s: dict[str, np.ndarray]) -> SceneFacts:
    import pandas as pd

    starts = [FIRST + timedelta(seconds=float(v)) for v in s["seconds"]]
    ids = [scene_id(int(d), int(t), st) for d, t, st in zip(s["datatake"], s["tile"], starts, strict=True)]
    x0 = OFFSET + s["i0"] * CELL - PAD_PX * PIXEL
    y0 = OFFSET + (s["j0"] + BLOCK) * CELL + PAD_PX * PIXEL
    dt_start = pd.DatetimeIndex([FIRST + timedelta(seconds=float(v)) for v in s["datatake_seconds"]])
    return SceneFacts(
        ids=ids,
        start=pd.DatetimeIndex(starts).as_unit("us"),
        datatake_start=dt_start.as_unit("us"),
        x0=x0,
        y0=y0,
        transforms=[[PIXEL, 0.0, float(x0[k]), 0.0, -PIXEL, float(y0[k])] for k in range(len(ids))],
    )


def scene_cells(s: dict[str, np.ndarray], n: int) -> Cells:
    grid_a, grid_b = np.meshgrid(np.arange(BLOCK), np.arange(BLOCK), indexing="ij")
    a, b = grid_a.ravel(), grid_b.ravel()
    scene = np.repeat(np.arange(n), len(a))
    return Cells(
        scene=scene,
        i=s["i0"][scene] + np.tile(a, n),
        j=s["j0"][scene] + np.tile(b, n),
        ring=np.tile((a == 0) | (a == BLOCK - 1) | (b == 0) | (b == BLOCK - 1), n),
    )


def cell_fractions(s: dict[str, np.ndarray], cells: Cells, rng: np.random.Generator) -> dict[str, Any]:
    """Each flag's fraction of each cell (the draws in a fixed order: the model is seeded)."""
    total = len(cells.scene)
    fractions: dict[str, Any] = {flag: np.zeros(total) for flag in FLAGS}
    fractions["background"] = np.where(cells.ring, rng.uniform(0.05, 0.9, total), 0.0)
    fractions["nodata"] = fractions["background"].copy()
    cloud = np.minimum(
        1.0, s["cloud_cover"][cells.scene] * rng.gamma(CLUSTER_SHAPE, 1 / CLUSTER_SHAPE, total)
    )
    fractions["cloud"] = np.round(cloud, 4)
    fractions["cloud_shadow"] = np.round(np.minimum(1.0 - cloud, cloud * rng.uniform(0.1, 0.6, total)), 4)
    fractions["cirrus"] = np.round(np.where(rng.random(total) < 0.01, rng.uniform(0, 0.3, total), 0.0), 4)
    fractions["haze"] = np.round(np.where(rng.random(total) < 0.1, rng.uniform(0, 0.5, total), 0.0), 4)
    fractions["snow"] = np.round(np.where(rng.random(total) < 0.04, rng.uniform(0, 1.0, total), 0.0), 4)
    fractions["water"] = np.round(np.where(rng.random(total) < 0.2, rng.uniform(0, 1.0, total), 0.0), 4)
    fractions["unclassified"] = np.round(rng.uniform(0, 0.02, total), 4)
    return fractions


def cell_reasons(fractions: dict[str, Any]) -> np.ndarray:
    """The first limit each cell breaks (background first), None for a kept cell."""
    reason = np.full(len(fractions["background"]), None, dtype=object)
    for flag in sorted(LIMITS, key=lambda f: f != "background"):
        over = (fractions[flag] > LIMITS[flag]) & (reason == None)  # noqa: E711 (elementwise)
        reason[over] = [f"{flag}: {v:.2%} of the cell > {LIMITS[flag]:.2%}" for v in fractions[flag][over]]
    return reason


def plan_frame(
    s: dict[str, np.ndarray], facts: SceneFacts, cells: Cells, fractions: dict[str, Any], reason: np.ndarray
) -> Any:
    """The `tile` stage's plan table: one row per candidate cell, with its polygon in EPSG:4326."""
    import geopandas
    import pandas as pd

    scene, ci, cj = cells.scene, cells.i, cells.j
    total = len(scene)
    kept = reason == None  # noqa: E711
    disqualifying = np.round(
        (fractions["background"] + fractions["cloud"] + fractions["cloud_shadow"] + fractions["cirrus"])
        * PATCH_PIXELS
    ).astype(np.int64)
    epsg = s["epsg"][scene]
    x_min = OFFSET + ci * CELL
    y_min = OFFSET + cj * CELL
    col_off = np.round((x_min - facts.x0[scene]) / PIXEL).astype(np.int64)
    row_off = np.round((facts.y0[scene] - (y_min + CELL)) / PIXEL).astype(np.int64)
    geometry = _cell_polygons(epsg, ci, cj)
    return geopandas.GeoDataFrame(
        {
            "scene_id": np.asarray(facts.ids, dtype=object)[scene],
            "location_id": [f"EPSG{e}-{i:04d}-{j:04d}" for e, i, j in zip(epsg, ci, cj, strict=True)],
            "epsg": epsg.astype(np.int64),
            "i": ci.astype(np.int64),
            "j": cj.astype(np.int64),
            "col_off": col_off,
            "row_off": row_off,
            "size": np.full(total, 128, dtype=np.int64),
            "kept": kept,
            "reason": pd.array(reason, dtype="string"),
            "disqualifying_pixels": disqualifying,
            "x_min": x_min,
            "y_min": y_min,
            "x_max": x_min + CELL,
            "y_max": y_min + CELL,
            "start_time": facts.start[scene],
            "datatake_start": facts.datatake_start[scene],
            "datatake_id": np.asarray([f"{d:010d}" for d in s["datatake"]], dtype=object)[scene],
            "tile_id": s["tile"][scene].astype(np.int64),
            "processor_version": "V010303",
            "scene_transform": [facts.transforms[k] for k in scene],
            **{f"{flag}_fraction": fractions[flag] for flag in FLAGS},
        },
        geometry=geometry,
        crs="EPSG:4326",
    )


def scene_footprints(s: dict[str, np.ndarray]) -> np.ndarray:
    """Each scene's footprint: the inner block (rotation left out), in EPSG:4326."""
    import shapely
    from pyproj import Transformer

    footprints = np.empty(len(s["epsg"]), dtype=object)
    for code in np.unique(s["epsg"]):
        sel = np.nonzero(s["epsg"] == code)[0]
        transformer = Transformer.from_crs(f"EPSG:{code}", "EPSG:4326", always_xy=True)
        xa = OFFSET + (s["i0"][sel] + 0.5) * CELL
        xb = OFFSET + (s["i0"][sel] + BLOCK - 0.5) * CELL
        ya = OFFSET + (s["j0"][sel] + 0.5) * CELL
        yb = OFFSET + (s["j0"][sel] + BLOCK - 0.5) * CELL
        xs = np.stack([xa, xb, xb, xa, xa], axis=1)
        ys = np.stack([yb, yb, ya, ya, yb], axis=1)
        lon, lat = transformer.transform(xs.ravel(), ys.ravel())
        coords = np.stack([np.reshape(lon, xs.shape), np.reshape(lat, xs.shape)], axis=-1)
        footprints[sel] = shapely.polygons(coords)
    return footprints


def scenes_frame(s: dict[str, np.ndarray], facts: SceneFacts, rng: np.random.Generator) -> Any:
    """The `inventory` scenes table (the per-scene covers and angles drawn from `rng`, in column order)."""
    import geopandas
    import pandas as pd

    n = len(facts.ids)
    start_ts = facts.start
    footprints = scene_footprints(s)
    width = BLOCK * 128 + 2 * PAD_PX
    cc = np.round(100 * s["cloud_cover"], 1)
    return geopandas.GeoDataFrame(
        {
            "scene_id": facts.ids,
            "datatake_id": [f"{d:010d}" for d in s["datatake"]],
            "tile_id": s["tile"].astype(np.int64),
            "start_time": start_ts,
            "stop_time": start_ts + pd.Timedelta(seconds=4.5),
            "datatake_start": facts.datatake_start,
            "processor_version": "V010303",
            "processing_time": start_ts + pd.Timedelta(days=21),
            "epsg": s["epsg"].astype(np.int64),
            "transform": facts.transforms,
            "width": np.full(n, width, dtype=np.int64),
            "height": np.full(n, width, dtype=np.int64),
            "band_count": np.full(n, 224, dtype=np.int64),
            "cloud_cover": cc,
            "cloud_shadow": np.round(cc * 0.3, 1),
            "haze_cover": np.round(rng.uniform(0, 5, n), 1),
            "cirrus_cover": np.round(rng.uniform(0, 3, n), 1),
            "snow_cover": np.round(rng.uniform(0, 2, n), 1),
            "water_cover": np.round(rng.uniform(0, 20, n), 1),
            "sun_elevation": np.round(rng.uniform(20, 70, n), 3),
            "sun_azimuth": np.round(rng.uniform(120, 200, n), 3),
            "across_off_nadir": np.round(rng.uniform(-20, 20, n), 3),
            "along_off_nadir": np.round(rng.uniform(-2, 2, n), 3),
            "scene_azimuth": np.round(rng.uniform(10, 15, n), 3),
            "orbit_number": (s["day"] * 15 + 3000).astype(np.int64),
            "orbit_direction": "DESCENDING",
            "fingerprint": [f"{k:064x}" for k in range(n)],
            "footprint": footprints,
        },
        geometry="footprint",
        crs="EPSG:4326",
    )


def build_tables(n_scenes: int, seed: int) -> tuple[Any, Any, dict[str, Any]]:
    """(plan GeoDataFrame, scenes GeoDataFrame, model counts)."""
    s = model_scenes(n_scenes, seed)
    rng = np.random.default_rng(seed + 1)
    facts = scene_facts(s)
    cells = scene_cells(s, n_scenes)
    # one generator for both tables: the cells' fractions are drawn first, then the scenes' covers
    fractions = cell_fractions(s, cells, rng)
    reason = cell_reasons(fractions)
    plan = plan_frame(s, facts, cells, fractions, reason)
    scenes = scenes_frame(s, facts, rng)
    counts = {
        "scenes": n_scenes,
        "sites": int(len(np.unique(s["site"]))),
        "datatakes": int(len(np.unique(s["datatake"]))),
        "candidates": int(len(cells.scene)),
        "kept_candidates": int((reason == None).sum()),  # noqa: E711
    }
    return plan, scenes, counts


PATCH_PIXELS = 128 * 128


# Steps -------------------------------------------------------------------------------------------------
def step_generate(work: Path, scenes: int, seed: int) -> dict[str, Any]:
    times: dict[str, float] = {}
    start = time.perf_counter()
    plan, scene_table, counts = build_tables(scenes, seed)
    times["model_s"] = time.perf_counter() - start
    start = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    plan.to_parquet(work / "plan.parquet")
    scene_table.to_parquet(work / "scenes.parquet")
    times["write_s"] = time.perf_counter() - start
    return {
        "counts": counts,
        "plan_bytes": (work / "plan.parquet").stat().st_size,
        **{k: round(v, 3) for k, v in times.items()},
    }


def step_dedup(work: Path) -> dict[str, Any]:
    import geopandas

    from pipeline.dedup import build_index
    from pipeline.grid import GridSpec

    times: dict[str, float] = {}
    start = time.perf_counter()
    plan = geopandas.read_parquet(work / "plan.parquet")
    times["read_s"] = time.perf_counter() - start
    before = current_rss_bytes()
    start = time.perf_counter()
    patches, _retired, locations, counts = build_index(
        plan, GridSpec(patch_size=128, pixel_size=30.0, offset=15.0)
    )
    times["build_index_s"] = time.perf_counter() - start
    start = time.perf_counter()
    patches.to_parquet(work / "index_patches.parquet")
    locations.to_parquet(work / "index_locations.parquet")
    times["write_s"] = time.perf_counter() - start
    return {
        "counts": {k: counts[k] for k in counts if k != "dropped_by_reason"}
        | {"dropped": counts["dropped_by_reason"]},
        "rss_before_build_index_mb": round(before / MB, 1),
        **{k: round(v, 3) for k, v in times.items()},
    }


def step_catalog(work: Path, json_sample: int) -> dict[str, Any]:
    import geopandas

    from pipeline.enmap.synth import load_band_table
    from pipeline.manifest import Manifest
    from pipeline.storage import BuildStore
    from stac.catalog_writer import catalog_documents, parquet_items, plan_catalog, serialise
    from stac.geoparquet import write_items_parquet
    from stac.records import flags_of, parse_patches, parse_scenes
    from stac.settings import CatalogSettings

    times: dict[str, float] = {}
    start = time.perf_counter()
    index = geopandas.read_parquet(work / "index_patches.parquet")
    scene_table = geopandas.read_parquet(work / "scenes.parquet")
    times["read_s"] = time.perf_counter() - start
    # the SpectralEarth band axis (202 of the 224 V010303 bands), from the manifest's band policy
    table = load_band_table(224)
    policy = Manifest.from_yaml(REPO / "manifests" / "spectralearth.yaml").bands
    kept = policy.kept_bands(tuple(float(w) for w in table.wavelength))
    bands = [(int(b), float(table.wavelength[b - 1]), float(table.fwhm[b - 1])) for b in kept]
    start = time.perf_counter()
    patches = parse_patches(index)
    scenes = parse_scenes(scene_table)
    times["parse_s"] = time.perf_counter() - start
    del index
    start = time.perf_counter()
    plan = plan_catalog(patches, scenes, CatalogSettings(), bands, flags=flags_of(FLAGS_COLUMNS))
    times["plan_catalog_s"] = time.perf_counter() - start
    start = time.perf_counter()
    documents = list(catalog_documents(plan))
    collection = next(doc for path, doc in documents if path == plan.patch_collection)
    catalog_bytes = sum(len(serialise(doc)) for _, doc in documents)
    times["catalog_documents_s"] = time.perf_counter() - start
    store = BuildStore(str(work))
    start = time.perf_counter()
    write_items_parquet(store, "stac/items.parquet", parquet_items(plan), plan.flags, collection=collection)
    times["items_parquet_s"] = time.perf_counter() - start
    # per-item JSON files: serialised for a sample only (the same item builder), extrapolated
    from stac.catalog_writer import patch_item_documents

    sample = min(json_sample, len(plan.patches))
    start = time.perf_counter()
    sample_bytes = 0
    out = work / "item-json-sample"
    out.mkdir(exist_ok=True)
    for k, (_, item) in enumerate(patch_item_documents(plan)):
        if k >= sample:
            break
        data = serialise(item)
        sample_bytes += len(data)
        (out / f"{k % 1000:04d}.json").write_bytes(data)
    sample_s = time.perf_counter() - start
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(work / "stac" / "items.parquet").metadata
    return {
        "items": len(plan.patches),
        "scene_items": len(plan.scenes),
        "catalog_files": len(documents),
        "catalog_json_bytes": catalog_bytes,
        "items_parquet_bytes": (work / "stac" / "items.parquet").stat().st_size,
        "items_parquet_row_groups": meta.num_row_groups,
        "item_json_sample": sample,
        "item_json_sample_s": round(sample_s, 3),
        "item_json_all_est_s": round(sample_s * len(plan.patches) / max(sample, 1), 1),
        "item_json_all_est_bytes": round(sample_bytes * len(plan.patches) / max(sample, 1)),
        **{k: round(v, 3) for k, v in times.items()},
    }


FLAGS_COLUMNS = [f"{flag}_fraction" for flag in FLAGS]


def _median_ms(values: list[float]) -> float:
    return round(1000 * float(np.median(values)), 2)


def step_query(work: Path, repeats: int, seed: int) -> dict[str, Any]:
    import geopandas
    import pandas as pd
    import pyarrow.parquet as pq
    import shapely

    from stac.search import search

    items = work / "stac" / "items.parquet"
    rng = np.random.default_rng(seed)
    small = pq.read_table(items, columns=["id", "bbox"])
    # a query box of ~1 x 1 degree around a random item, so the query hits data
    k = int(rng.integers(small.num_rows))
    box = small.column("bbox")[k].as_py()
    cx, cy = (box["xmin"] + box["xmax"]) / 2, (box["ymin"] + box["ymax"]) / 2
    bbox = (cx - 0.5, cy - 0.5, cx + 0.5, cy + 0.5)
    window = "2023-01-01/2023-12-31"
    max_cloud = 5.0
    wanted = str(small.column("id")[int(rng.integers(small.num_rows))])
    del small
    timings: dict[str, list[float]] = {"bbox_datetime_cloud": [], "id_lookup": [], "id_lookup_items": []}
    first_ms: dict[str, float] = {}
    result = None
    for r in range(repeats):
        start = time.perf_counter()
        result = search(items, bbox=bbox, datetime=window, max_cloud=max_cloud)
        timings["bbox_datetime_cloud"].append(time.perf_counter() - start)
        start = time.perf_counter()
        found = search(items, ids=[wanted])
        timings["id_lookup"].append(time.perf_counter() - start)
        start = time.perf_counter()
        found.items()  # the full row of the hit, as a STAC item
        timings["id_lookup_items"].append(time.perf_counter() - start)
        if r == 0:
            first_ms = {k: round(1000 * v[0], 2) for k, v in timings.items()}
    assert result is not None
    # naive: read every row, exact geometry tests over all of them
    start = time.perf_counter()
    frame = geopandas.read_parquet(items)
    read_s = time.perf_counter() - start
    start = time.perf_counter()
    when = pd.to_datetime(frame["datetime"], utc=True)
    query = shapely.box(*bbox)
    hit = (
        frame.geometry.intersects(query)
        & (when >= pd.Timestamp("2023-01-01", tz="UTC"))
        & (when < pd.Timestamp("2024-01-01", tz="UTC"))
        & (frame["eo:cloud_cover"] <= max_cloud)
    )
    naive_ids = sorted(frame.loc[hit, "id"])
    filter_s = time.perf_counter() - start
    start = time.perf_counter()
    naive_id_hit = frame.loc[frame["id"] == wanted]
    naive_id_s = time.perf_counter() - start
    return {
        "items": len(frame),
        "bbox": bbox,
        "datetime": window,
        "max_cloud": max_cloud,
        "matched": result.matched,
        "naive_matched": len(naive_ids),
        "same_result": sorted(result.ids) == naive_ids and len(naive_id_hit) == 1,
        "median_ms": {k: _median_ms(v) for k, v in timings.items()},
        "first_call_ms": first_ms,
        "repeats": repeats,
        "naive_read_all_s": round(read_s, 3),
        "naive_filter_s": round(filter_s, 3),
        "naive_bbox_query_s": round(read_s + filter_s, 3),
        "naive_id_lookup_s": round(read_s + naive_id_s, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("step", choices=("generate", "dedup", "catalog", "query"))
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--scenes", type=int, default=11636)
    parser.add_argument("--seed", type=int, default=11636)
    parser.add_argument("--json-sample", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args()
    start = time.perf_counter()
    if args.step == "generate":
        result = step_generate(args.work, args.scenes, args.seed)
    elif args.step == "dedup":
        result = step_dedup(args.work)
    elif args.step == "catalog":
        result = step_catalog(args.work, args.json_sample)
    else:
        result = step_query(args.work, args.repeats, args.seed)
    result["step_s"] = round(time.perf_counter() - start, 3)
    write_result(args.result, result)
    print(json.dumps({"step": args.step, "s": result["step_s"]}))


if __name__ == "__main__":
    main()
