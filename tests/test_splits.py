"""`pipeline.splits`: the pure assignment against brute-force neighbourhood checks (hypothesis), fractions
on large synthetic sets, and make_split / read_split / split_filter on a synthetic build index whose
locations straddle a UTM zone edge (real footprints, real neighbour_zone_overlaps)."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from typing import Any

import geopandas
import numpy as np
import pytest
import shapely
from hypothesis import given, settings
from hypothesis import strategies as st
from pyproj import Transformer
from shapely.geometry import Polygon

from pipeline import tables
from pipeline.dedup import neighbour_overlaps
from pipeline.grid import Cell, GridSpec, cell_bounds, cell_of_point
from pipeline.splits import (
    BUFFER,
    SPLITS,
    block_of,
    blocked_split,
    cross_zone_contacts,
    leaks,
    make_split,
    random_split,
    read_split,
    split_filter,
)
from pipeline.storage import BuildStore

SPEC = GridSpec()
ZONES = (32631, 32632, 32633)
FRACTION_CHOICES = ((0.8, 0.1, 0.1), (0.34, 0.33, 0.33), (0.5, 0.0, 0.5), (0.0, 0.0, 1.0), (0.6, 0.2, 0.2))


def _lid(epsg: int, i: int, j: int) -> str:
    return Cell(epsg, i, j).location_id


def _brute_adjacent(a: str, b: str, links: dict[str, list[str]], contacts: dict[str, list[str]]) -> bool:
    ca, cb = Cell.parse(a), Cell.parse(b)
    if ca.epsg == cb.epsg and abs(ca.i - cb.i) <= 1 and abs(ca.j - cb.j) <= 1:
        return True
    return any(b in m.get(a, ()) or a in m.get(b, ()) for m in (links, contacts))


# The pure assignment ------------------------------------------------------------------------------


@st.composite
def location_sets(draw: st.DrawFn) -> tuple[list[str], dict[str, list[str]], dict[str, list[str]]]:
    cells = draw(
        st.sets(
            st.tuples(st.sampled_from(ZONES), st.integers(0, 18), st.integers(0, 18)), min_size=1, max_size=70
        )
    )
    ids = sorted(_lid(*c) for c in cells)
    pairs = st.tuples(st.sampled_from(ids), st.sampled_from(ids))
    links: dict[str, list[str]] = {}
    for a, b in draw(st.lists(pairs, max_size=12)):
        links.setdefault(a, []).append(b)
    contacts: dict[str, list[str]] = {}
    for a, b in draw(st.lists(pairs, max_size=6)):
        contacts.setdefault(a, []).append(b)
    return ids, links, contacts


@settings(max_examples=250, deadline=None)
@given(
    location_sets(),
    st.integers(1, 6),
    st.integers(0, 2**32),
    st.sampled_from(FRACTION_CHOICES),
)
def test_blocked_split_never_puts_neighbours_in_two_splits(
    sets: tuple[list[str], dict[str, list[str]], dict[str, list[str]]],
    block_cells: int,
    seed: int,
    fractions: tuple[float, float, float],
) -> None:
    ids, links, contacts = sets
    got = blocked_split(ids, fractions, seed, block_cells, links=links, contacts=contacts)
    assert sorted(got) == ids and set(got.values()) <= {*SPLITS, BUFFER}
    for a, b in itertools.combinations(ids, 2):
        if BUFFER in (got[a], got[b]):
            continue
        if _brute_adjacent(a, b, links, contacts):
            assert got[a] == got[b], (a, b)
        if block_of(Cell.parse(a), block_cells) == block_of(Cell.parse(b), block_cells):
            assert got[a] == got[b], (a, b)  # one block, one split
    assert leaks(got, links, contacts) == []
    # A location whose neighbours all sit in its own block is never given up to the buffer.
    for a in ids:
        mine = block_of(Cell.parse(a), block_cells)
        neighbours = [b for b in ids if b != a and _brute_adjacent(a, b, links, contacts)]
        if all(block_of(Cell.parse(b), block_cells) == mine for b in neighbours):
            assert got[a] != BUFFER
    # Only splits with a positive fraction are drawn.
    assert {s for s in got.values() if s != BUFFER} <= {
        s for s, f in zip(SPLITS, fractions, strict=True) if f > 0
    }
    # Deterministic and independent of input order.
    shuffled = random.Random(seed).sample(ids, len(ids))
    assert blocked_split(shuffled, fractions, seed, block_cells, links=links, contacts=contacts) == got


def test_linked_locations_share_a_block_group() -> None:
    a, b = _lid(32632, 100, 5), _lid(32633, 3, 5)
    for seed in range(20):
        got = blocked_split([a, b], (0.34, 0.33, 0.33), seed, 4, links={a: [b]})
        assert got[a] == got[b] != BUFFER


def test_leaks_finds_a_leaking_assignment() -> None:
    a, b, c = _lid(32632, 1, 1), _lid(32632, 2, 2), _lid(32632, 9, 9)
    assert leaks({a: "train", b: "test", c: "validation"}) == [(a, b)]
    assert leaks({a: "train", b: BUFFER, c: "validation"}) == []


def test_bad_parameters() -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        blocked_split([_lid(32632, 1, 1)], (0.8, 0.1, 0.2), 0, 8)
    with pytest.raises(ValueError, match="block_cells"):
        blocked_split([_lid(32632, 1, 1)], (0.8, 0.1, 0.1), 0, 0)
    with pytest.raises(ValueError, match="not a location id"):
        blocked_split(["nowhere"], (0.8, 0.1, 0.1), 0, 8)
    with pytest.raises(ValueError, match="train, validation, test"):
        random_split(["x"], (0.5, 0.5), 0)


# Fractions, seeds, growth --------------------------------------------------------------------------


def _scattered(n: int, seed: int, epsg: int = 32632, side: int = 400) -> list[str]:
    rng = np.random.default_rng(seed)
    flat = rng.choice(side * side, size=n, replace=False)
    return [_lid(epsg, int(k) // side, int(k) % side) for k in flat]


def test_blocked_fractions_on_5000_locations() -> None:
    ids = _scattered(5000, seed=1)
    got = blocked_split(ids, (0.8, 0.1, 0.1), seed=7, block_cells=8)
    kept = [s for s in got.values() if s != BUFFER]
    assert len(kept) > 0.9 * len(ids)  # sparse coverage: a thin buffer
    for name, target in zip(SPLITS, (0.8, 0.1, 0.1), strict=True):
        assert abs(kept.count(name) / len(kept) - target) < 0.03, name
    # By block (the unit that is drawn), before the buffer.
    blocks = {block_of(Cell.parse(x), 8) for x in ids}
    assert len(blocks) > 2000
    assert leaks(got) == []


def test_blocked_split_of_dense_coverage_keeps_most_locations() -> None:
    # 5120 locations in five fully covered 32 x 32 squares: the buffer is the rim between blocks.
    ids = [_lid(32632, 100 * s + i, j) for s in range(5) for i in range(32) for j in range(32)]
    got = blocked_split(ids, (0.8, 0.1, 0.1), seed=3, block_cells=8)
    buffer = sum(s == BUFFER for s in got.values()) / len(ids)
    assert 0 < buffer < 0.25
    assert leaks(got) == []
    assert blocked_split(ids, (1.0, 0.0, 0.0), seed=3, block_cells=8) == dict.fromkeys(ids, "train")


def test_seeds_and_growth() -> None:
    ids = _scattered(5000, seed=2)
    first = blocked_split(ids, (0.8, 0.1, 0.1), seed=0, block_cells=8)
    assert blocked_split(ids, (0.8, 0.1, 0.1), seed=0, block_cells=8) == first
    assert blocked_split(ids, (0.8, 0.1, 0.1), seed=1, block_cells=8) != first
    # New locations in another zone leave every existing location's split as it was.
    grown = blocked_split(
        [*ids, *_scattered(500, seed=3, epsg=32633)], (0.8, 0.1, 0.1), seed=0, block_cells=8
    )
    assert {k: grown[k] for k in ids} == first


def test_random_split_fractions_and_seeds() -> None:
    ids = [f"{_lid(32632, k % 9000, k // 9000)}_20230501_DT{k:010d}" for k in range(20000)]
    got = random_split(ids, (0.8, 0.1, 0.1), seed=0)
    values = list(got.values())
    for name, target in zip(SPLITS, (0.8, 0.1, 0.1), strict=True):
        assert abs(values.count(name) / len(ids) - target) < 0.01
    assert random_split(ids, (0.8, 0.1, 0.1), seed=0) == got
    assert random_split(reversed(ids), (0.8, 0.1, 0.1), seed=0) == got
    other = random_split(ids, (0.8, 0.1, 0.1), seed=1)
    assert other != got and sum(got[k] != other[k] for k in ids) > 0.2 * len(ids)
    assert random_split(ids[:100], (0.8, 0.1, 0.1), seed=0) == {k: got[k] for k in ids[:100]}


# A synthetic build across the 32632 / 32633 zone edge ---------------------------------------------


def _footprint(cell: Cell) -> Polygon:
    xmin, ymin, xmax, ymax = cell_bounds(cell, SPEC)
    t = np.linspace(0.0, 1.0, 9)
    xs = np.concatenate(
        [xmin + (xmax - xmin) * t, np.full(9, xmax), xmax - (xmax - xmin) * t, np.full(9, xmin)]
    )
    ys = np.concatenate(
        [np.full(9, ymax), ymax - (ymax - ymin) * t, np.full(9, ymin), ymin + (ymax - ymin) * t]
    )
    lon, lat = Transformer.from_crs(f"EPSG:{cell.epsg}", "EPSG:4326", always_xy=True).transform(xs, ys)
    return Polygon(zip(lon, lat, strict=True))


def _zone_edge_cells() -> list[Cell]:
    """6 x 6 cells on each side of 12 deg E at 48 deg N (overlapping across the edge), and two far ones."""
    cells = []
    for epsg, lon in ((32632, 11.97), (32633, 12.03)):
        x, y = Transformer.from_crs("EPSG:4326", f"EPSG:{epsg}", always_xy=True).transform(lon, 48.0)
        centre = cell_of_point(epsg, x, y, SPEC)
        cells += [Cell(epsg, centre.i + di, centre.j + dj) for di in range(-3, 3) for dj in range(-3, 3)]
    x, y = Transformer.from_crs("EPSG:4326", "EPSG:32632", always_xy=True).transform(9.0, 48.0)
    far = cell_of_point(32632, x, y, SPEC)
    return [*cells, far, Cell(32632, far.i + 1, far.j)]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> BuildStore:
    built = BuildStore(str(tmp_path_factory.mktemp("build")))
    cells = _zone_edge_cells()
    ids = [c.location_id for c in cells]
    overlaps = neighbour_overlaps(ids, SPEC)
    assert overlaps, "the fixture should straddle the zone edge"
    patches: list[dict[str, Any]] = []
    locations: list[dict[str, Any]] = []
    for k, cell in enumerate(cells):
        dates = ["20230501", "20230611"] if k % 3 == 0 else ["20230501"]
        pids = [f"{cell.location_id}_{d}_DT{1000 + n:010d}" for n, d in enumerate(dates)]
        geometry = _footprint(cell)
        patches += [
            {"row": len(patches) + n, "patch_id": p, "location_id": cell.location_id, "geometry": geometry}
            for n, p in enumerate(pids)
        ]
        locations.append(
            {
                "location_id": cell.location_id,
                "epsg": cell.epsg,
                "i": cell.i,
                "j": cell.j,
                "n_dates": len(dates),
                "patch_ids": pids,
                "neighbour_zone_overlaps": list(overlaps.get(cell.location_id, ())),
                "geometry": geometry,
            }
        )
    built.write_geodataframe(tables.INDEX_PATCHES, geopandas.GeoDataFrame(patches, crs="EPSG:4326"))
    built.write_geodataframe(tables.INDEX_LOCATIONS, geopandas.GeoDataFrame(locations, crs="EPSG:4326"))
    return built


def test_cross_zone_contacts_follow_the_footprints(store: BuildStore) -> None:
    locations = store.read_geodataframe(tables.INDEX_LOCATIONS)
    ids = list(locations["location_id"])
    got = cross_zone_contacts(ids, locations["epsg"].to_numpy(), locations.geometry.to_numpy())
    geoms = dict(zip(ids, locations.geometry, strict=True))
    epsg = dict(zip(ids, locations["epsg"], strict=True))
    for a, b in itertools.permutations(ids, 2):
        touching = epsg[a] != epsg[b] and shapely.distance(geoms[a], geoms[b]) <= 1e-6
        assert (b in got.get(a, set())) == touching, (a, b)
    # Every neighbour_zone_overlaps link is also a contact; some contacts are not links (partial overlap).
    links = {(a, b) for a, bs in zip(ids, locations["neighbour_zone_overlaps"], strict=True) for b in bs}
    contacts = {(a, b) for a, bs in got.items() for b in bs}
    assert links and links < contacts


@pytest.mark.parametrize("seed", range(6))
def test_make_blocked_split_on_a_build(store: BuildStore, seed: int) -> None:
    summary = make_split(
        store, f"blocked-{seed}", kind="blocked", fractions=(0.34, 0.33, 0.33), seed=seed, block_cells=2
    )
    patches = store.read_geodataframe(tables.INDEX_PATCHES)
    locations = store.read_geodataframe(tables.INDEX_LOCATIONS)
    table = store.read_table(f"splits/blocked-{seed}.parquet")
    assert table.column_names == ["patch_id", "location_id", "split"]
    assert sorted(table.column("patch_id").to_pylist()) == sorted(patches["patch_id"])
    by_patch = read_split(store, f"blocked-{seed}")
    assert sum(summary.patches.values()) == len(patches) == len(by_patch)
    # All patches of a location in one split.
    by_location: dict[str, set[str]] = {}
    for row in table.to_pylist():
        by_location.setdefault(row["location_id"], set()).add(row["split"])
    assert all(len(s) == 1 for s in by_location.values())
    split = {k: v.pop() for k, v in by_location.items()}
    # Brute force over the real footprints: touching or overlapping locations (any zone) and grid
    # neighbours share a split unless one is buffer.
    geoms = dict(zip(locations["location_id"], locations.geometry, strict=True))
    for a, b in itertools.combinations(sorted(split), 2):
        ca, cb = Cell.parse(a), Cell.parse(b)
        grid = ca.epsg == cb.epsg and abs(ca.i - cb.i) <= 1 and abs(ca.j - cb.j) <= 1
        if (grid or shapely.distance(geoms[a], geoms[b]) <= 1e-6) and BUFFER not in (split[a], split[b]):
            assert split[a] == split[b], (a, b)
    record = store.read_json(f"splits/blocked-{seed}.json")
    assert record["kind"] == "blocked" and record["seed"] == seed and record["block_cells"] == 2
    assert record["patches"] == summary.patches and len(record["index_sha256"]) == 64


def test_make_split_files_are_stable_and_usable_as_filters(store: BuildStore) -> None:
    summary = make_split(store, "paper", kind="random", seed=11)
    first = store.read_bytes("splits/paper.parquet"), store.read_bytes("splits/paper.json")
    assert make_split(store, "paper", kind="random", seed=11) == summary
    assert (store.read_bytes("splits/paper.parquet"), store.read_bytes("splits/paper.json")) == first
    assert summary.patches[BUFFER] == 0 and summary.block_cells is None
    assignment = read_split(store, "paper")
    parts = {name: split_filter(store, "paper", name) for name in (*SPLITS, BUFFER)}
    assert set().union(*parts.values()) == set(assignment)
    assert sum(len(p) for p in parts.values()) == len(assignment)  # disjoint
    assert {n: len(p) for n, p in parts.items()} == summary.patches
    query_ids = sorted(assignment)[::2]  # as a query would return them
    assert set(query_ids) & parts["train"] == {p for p in query_ids if assignment[p] == "train"}
    record = json.loads(first[1])
    assert record["fractions"] == [0.8, 0.1, 0.1] and record["name"] == "paper"
    make_split(store, "paper-other", kind="random", seed=12)
    other = read_split(store, "paper-other")
    assert other != assignment or len(assignment) < 5


def test_make_split_rejects_bad_input(store: BuildStore, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="split name"):
        make_split(store, "../escape")
    with pytest.raises(ValueError, match="kind"):
        make_split(store, "x", kind="spatial")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="split must be one of"):
        split_filter(store, "paper", "val")
    with pytest.raises(FileNotFoundError, match="make the split 'missing' first"):
        read_split(store, "missing")
    with pytest.raises(FileNotFoundError, match="dedup"):
        make_split(BuildStore(str(tmp_path / "empty")), "x")
