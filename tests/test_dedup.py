"""dedup's choice of one patch per acquisition, against a brute-force oracle (hypothesis)."""

import random
from collections.abc import Iterable
from datetime import date, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.dedup import Candidate, choose_patches, neighbour_overlaps, neighbour_zones, patch_id
from pipeline.grid import Cell, GridSpec

LOCATIONS = [f"EPSG32632-{i:04d}-{j:04d}" for i in (10, 11) for j in (20, 21)]
DATATAKES = ["0000000101", "0000000102", "0000000203"]
VERSIONS = ["V010302", "V010303", "V010400"]


@st.composite
def candidates(draw: st.DrawFn) -> Candidate:
    location = draw(st.sampled_from(LOCATIONS))
    datatake = draw(st.sampled_from(DATATAKES))
    tile = draw(st.integers(1, 3))
    version = draw(st.sampled_from(VERSIONS))
    # The acquisition date is the datatake's start date, the same for all its tiles and versions.
    day = date(2023, 1, 1) + timedelta(days=int(datatake[-3:]))
    scene = f"S-{datatake}-{tile:03d}-{version}-{draw(st.integers(0, 1))}"
    return Candidate(location, datatake, scene, day, version, draw(st.integers(0, 50)))


def unique_scene_per_location(items: list[Candidate]) -> list[Candidate]:
    # A scene holds a location at most once.
    seen: dict[tuple[str, str], Candidate] = {}
    for c in items:
        seen.setdefault((c.scene_id, c.location_id), c)
    return list(seen.values())


candidate_lists = st.lists(candidates(), max_size=25).map(unique_scene_per_location)


def oracle(items: list[Candidate]) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Brute force: for every (location, datatake) compare every pair by the SPEC's rule."""
    out = {}
    for c in items:
        group = [o for o in items if (o.location_id, o.datatake_id) == (c.location_id, c.datatake_id)]
        wins = all(
            (int(c.processor_version[1:]) > int(o.processor_version[1:]))
            or (
                c.processor_version == o.processor_version and c.disqualifying_pixels < o.disqualifying_pixels
            )
            or (
                c.processor_version == o.processor_version
                and c.disqualifying_pixels == o.disqualifying_pixels
                and c.scene_id <= o.scene_id
            )
            for o in group
        )
        if wins:
            day = min(o.acquisition_date for o in group)
            out[patch_id(c.location_id, day, c.datatake_id)] = (
                c.scene_id,
                tuple(sorted(o.scene_id for o in group if o is not c)),
            )
    return out


@settings(max_examples=300, deadline=None)
@given(candidate_lists)
def test_choice_matches_oracle(items: list[Candidate]) -> None:
    chosen = choose_patches(items)
    assert {p.patch_id: (p.candidate.scene_id, p.duplicates) for p in chosen} == oracle(items)
    # Every candidate is either kept or named as a duplicate, exactly once.
    named = [p.candidate.scene_id for p in chosen] + [d for p in chosen for d in p.duplicates]
    assert len(named) == len(items)


@settings(max_examples=200, deadline=None)
@given(candidate_lists, st.randoms(use_true_random=False))
def test_independent_of_input_order(items: list[Candidate], rnd: random.Random) -> None:
    shuffled = list(items)
    rnd.shuffle(shuffled)
    assert choose_patches(items) == choose_patches(shuffled)


@settings(max_examples=200, deadline=None)
@given(candidate_lists)
def test_idempotent(items: list[Candidate]) -> None:
    once = choose_patches(items)
    twice = choose_patches([p.candidate for p in once])
    assert [p.patch_id for p in twice] == [p.patch_id for p in once]
    assert [p.candidate for p in twice] == [p.candidate for p in once]
    assert all(p.duplicates == () for p in twice)


def test_newest_version_wins_over_fewer_flags() -> None:
    old = Candidate(LOCATIONS[0], "0000000101", "A", date(2023, 5, 1), "V010303", 0)
    new = Candidate(LOCATIONS[0], "0000000101", "B", date(2023, 5, 1), "V010400", 40)
    (patch,) = choose_patches([old, new])
    assert patch.candidate.scene_id == "B" and patch.duplicates == ("A",)
    assert patch.patch_id == "EPSG32632-0010-0020_20230501_DT0000000101"


def test_rows_group_scenes() -> None:
    items = [
        Candidate(LOCATIONS[k], datatake, scene, date(2023, 5, 1), "V010303", 0, row_off=k * 128)
        for scene, datatake in (("B", "0000000102"), ("A", "0000000101"))
        for k in (1, 0)
    ]
    chosen = choose_patches(items)
    assert [p.candidate.scene_id for p in chosen] == ["A", "A", "B", "B"]
    assert [p.candidate.row_off for p in chosen] == [0, 128, 0, 128]


def test_neighbour_zones_wrap() -> None:
    assert neighbour_zones(32632) == (32631, 32633)
    assert neighbour_zones(32601) == (32660, 32602)
    assert neighbour_zones(32760) == (32759, 32701)


def test_neighbour_zone_overlap_found_across_the_zone_edge() -> None:
    from pyproj import Transformer

    spec = GridSpec()
    # A point just west of the 32N/33N edge (12 degrees E), in both zones' grids.
    lon, lat = 11.99, 47.5
    cells = []
    for epsg in (32632, 32633):
        x, y = Transformer.from_crs("EPSG:4326", f"EPSG:{epsg}", always_xy=True).transform(lon, lat)
        i, j = int((x - 15) // 3840), int((y - 15) // 3840)
        cells += [Cell(epsg, i + di, j + dj) for di in (-1, 0, 1) for dj in (-1, 0, 1)]
    ids = [c.location_id for c in cells]
    overlaps = neighbour_overlaps(ids, spec)
    assert overlaps, "cells either side of a zone edge must overlap"
    for location, others in overlaps.items():
        zone = location[:9]
        assert all(other[:9] != zone for other in others)
        for other in others:
            assert location in overlaps[other]
    # Each location overlaps a neighbour-zone cell by more than half at most once (cells of one zone tile).
    assert all(len(others) <= 1 for others in overlaps.values())
    # Far from an edge nothing is reported.
    far = [Cell(32632, 100, 1200).location_id, Cell(32633, 100, 1200).location_id]
    assert neighbour_overlaps(far, spec) == {}


def _overlaps_oracle(location_ids: Iterable[str], spec: GridSpec) -> dict[str, tuple[str, ...]]:
    """One cell at a time: each cell whose centre lies within half a degree of its zone's edge, its
    outline (9 points a side) projected into each neighbouring zone and compared exactly with every cell
    there that its bounds reach."""
    from collections import defaultdict

    import numpy as np
    from pyproj import Transformer
    from shapely.geometry import Polygon

    from pipeline.grid import cell_bounds, cells_for_bounds

    cells = {Cell.parse(lid) for lid in location_ids}
    zones = {c.epsg for c in cells}
    found: defaultdict[str, set[str]] = defaultdict(set)
    t = np.linspace(0.0, 1.0, 9)
    for cell in cells:
        for other in neighbour_zones(cell.epsg):
            if other not in zones:
                continue
            xmin, ymin, xmax, ymax = cell_bounds(cell, spec)
            to_lonlat = Transformer.from_crs(f"EPSG:{cell.epsg}", "EPSG:4326", always_xy=True)
            lon, _ = to_lonlat.transform((xmin + xmax) / 2, (ymin + ymax) / 2)
            west = -180.0 + 6 * (cell.epsg % 100 - 1)
            if min(abs(lon - west), abs(lon - west - 6)) > 0.5:
                continue
            xs = np.concatenate([xmin + (xmax - xmin) * t, [xmax] * 9, xmax - (xmax - xmin) * t, [xmin] * 9])
            ys = np.concatenate([[ymax] * 9, ymax - (ymax - ymin) * t, [ymin] * 9, ymin + (ymax - ymin) * t])
            to_other = Transformer.from_crs(f"EPSG:{cell.epsg}", f"EPSG:{other}", always_xy=True)
            outline = Polygon(zip(*to_other.transform(xs, ys), strict=True))
            for candidate in cells_for_bounds(other, outline.bounds, spec):
                box = Polygon.from_bounds(*cell_bounds(candidate, spec))
                if candidate in cells and outline.intersection(box).area > 0.5 * spec.cell_size**2:
                    # the relation is kept symmetric, as the index lists it on both locations
                    found[cell.location_id].add(candidate.location_id)
                    found[candidate.location_id].add(cell.location_id)
    return {lid: tuple(sorted(ids)) for lid, ids in found.items()}


@settings(max_examples=15, deadline=None)
@given(
    st.sampled_from([(32632, 47.5), (32610, 40.0), (32760, -33.0), (32601, 62.0)]),
    st.lists(st.tuples(st.floats(-0.45, 0.45), st.floats(-0.5, 0.5)), min_size=1, max_size=30),
)
def test_neighbour_overlaps_match_cell_by_cell_oracle(
    zone_and_lat: tuple[int, float], offsets: list[tuple[float, float]]
) -> None:
    from pyproj import Transformer

    spec = GridSpec()
    west, lat0 = zone_and_lat
    east = neighbour_zones(west)[1]
    edge = -180.0 + 6 * (west % 100)
    ids: set[str] = set()
    for dlon, dlat in offsets:
        for epsg in (west, east):
            x, y = Transformer.from_crs("EPSG:4326", f"EPSG:{epsg}", always_xy=True).transform(
                edge + dlon, lat0 + dlat
            )
            i, j = int((x - 15) // 3840), int((y - 15) // 3840)
            ids.update(Cell(epsg, i + di, j).location_id for di in (-1, 0, 1) if 0 <= i + di <= 9999)
    assert neighbour_overlaps(sorted(ids), spec) == _overlaps_oracle(ids, spec)


def _plan(rows: list[tuple[Any, ...]]) -> Any:
    import geopandas
    from shapely.geometry import box

    frame = geopandas.GeoDataFrame(
        [
            {
                "scene_id": scene,
                "location_id": location,
                "epsg": 32632,
                "i": int(location[10:14]),
                "j": int(location[15:19]),
                "col_off": col,
                "row_off": 0,
                "size": 128,
                "kept": kept,
                "reason": None if kept else "cloud: 50.00% of the cell > 10.00%",
                "disqualifying_pixels": flags,
                "x_min": 15.0 + int(location[10:14]) * 3840,
                "y_min": 15.0 + int(location[15:19]) * 3840,
                "x_max": 15.0 + (int(location[10:14]) + 1) * 3840,
                "y_max": 15.0 + (int(location[15:19]) + 1) * 3840,
                "start_time": start,
                "datatake_start": start,
                "datatake_id": datatake,
                "tile_id": 1,
                "processor_version": version,
                "scene_transform": [30.0, 0.0, 15.0, 0.0, -30.0, 3840015.0],
                "cloud_fraction": flags / 16384,
                "snow_fraction": 0.0,
                "geometry": box(
                    10 + int(location[10:14]) / 100, 47, 10.01 + int(location[10:14]) / 100, 47.01
                ),
            }
            for scene, location, datatake, start, version, flags, kept, col in rows
            for k in [int(location[10:14])]
        ],
        geometry="geometry",
        crs="EPSG:4326",
    )
    frame["reason"] = frame["reason"].astype("string")
    return frame


def test_build_index_tables_match_row_by_row_lookup() -> None:
    import pandas as pd

    from pipeline.dedup import build_index

    may, june = pd.Timestamp("2023-05-01T10:00:00Z"), pd.Timestamp("2023-06-02T10:00:00Z")
    rows = []
    for k, location in enumerate(LOCATIONS):
        rows.append(("S1", location, "0000000101", may, "V010303", k, True, 128 * k))
        rows.append(("S2", location, "0000000101", may, "V010400", 99, k != 1, 128 * k))  # reprocessed
        rows.append(("S3", location, "0000000203", june, "V010303", 5, k != 2, 128 * k))
    plan = _plan(rows)
    patches, retired, locations, counts = build_index(plan, GridSpec())
    assert counts["patches"] == len(patches) == 7 and counts["duplicates"] == 3 and len(retired) == 0
    assert list(patches["row"]) == list(range(len(patches)))
    for record in patches.to_dict("records"):
        (source,) = plan[
            (plan["scene_id"] == record["scene_id"]) & (plan["location_id"] == record["location_id"])
        ].to_dict("records")
        for column in ("epsg", "i", "j", "col_off", "start_time", "datatake_id", "processor_version"):
            assert record[column] == source[column]
        assert record["geometry"].equals(source["geometry"])
        assert (record["x_ul"], record["y_ul"]) == (source["x_min"], source["y_max"])
        assert record["cloud_fraction"] == source["cloud_fraction"]
    assert patches.loc[patches["location_id"] == LOCATIONS[0], "scene_id"].tolist() == ["S2", "S3"]
    assert list(locations["location_id"]) == sorted(LOCATIONS)
    for location in locations.to_dict("records"):
        mine = patches[patches["location_id"] == location["location_id"]]
        dates = sorted(set(mine["acquisition_date"]))
        assert location["n_dates"] == len(dates) == int(mine["n_dates"].iloc[0])
        assert location["first_date"] == pd.Timestamp(dates[0]).date()
        assert location["last_date"] == pd.Timestamp(dates[-1]).date()
        assert location["patch_ids"] == sorted(mine["patch_id"])
        assert location["geometry"].equals(mine.geometry.iloc[0])
        assert (location["i"], location["j"]) == (int(mine["i"].iloc[0]), int(mine["j"].iloc[0]))


def test_build_index_without_kept_patches() -> None:
    import pandas as pd

    from pipeline.dedup import build_index

    may = pd.Timestamp("2023-05-01T10:00:00Z")
    plan = _plan([("S1", LOCATIONS[0], "0000000101", may, "V010303", 0, False, 0)])
    patches, _, locations, counts = build_index(plan, GridSpec())
    assert len(patches) == len(locations) == counts["patches"] == counts["locations"] == 0
