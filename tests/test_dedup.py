"""dedup's choice of one patch per acquisition, against a brute-force oracle (hypothesis)."""

from datetime import date, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.dedup import Candidate, choose_patches, neighbour_overlaps, neighbour_zones, patch_id
from pipeline.grid import Cell, GridSpec

LOCATIONS = [f"EPSG32632-{i:04d}-{j:04d}" for i in (10, 11) for j in (20, 21)]
DATATAKES = ["0000000101", "0000000102", "0000000203"]
VERSIONS = ["V010302", "V010303", "V010400"]


@st.composite
def candidates(draw):
    location = draw(st.sampled_from(LOCATIONS))
    datatake = draw(st.sampled_from(DATATAKES))
    tile = draw(st.integers(1, 3))
    version = draw(st.sampled_from(VERSIONS))
    # The acquisition date is the datatake's start date, the same for all its tiles and versions.
    day = date(2023, 1, 1) + timedelta(days=int(datatake[-3:]))
    scene = f"S-{datatake}-{tile:03d}-{version}-{draw(st.integers(0, 1))}"
    return Candidate(location, datatake, scene, day, version, draw(st.integers(0, 50)))


def unique_scene_per_location(items):
    # A scene holds a location at most once.
    seen = {}
    for c in items:
        seen.setdefault((c.scene_id, c.location_id), c)
    return list(seen.values())


candidate_lists = st.lists(candidates(), max_size=25).map(unique_scene_per_location)


def oracle(items):
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
def test_choice_matches_oracle(items):
    chosen = choose_patches(items)
    assert {p.patch_id: (p.candidate.scene_id, p.duplicates) for p in chosen} == oracle(items)
    # Every candidate is either kept or named as a duplicate, exactly once.
    named = [p.candidate.scene_id for p in chosen] + [d for p in chosen for d in p.duplicates]
    assert len(named) == len(items)


@settings(max_examples=200, deadline=None)
@given(candidate_lists, st.randoms(use_true_random=False))
def test_independent_of_input_order(items, rnd):
    shuffled = list(items)
    rnd.shuffle(shuffled)
    assert choose_patches(items) == choose_patches(shuffled)


@settings(max_examples=200, deadline=None)
@given(candidate_lists)
def test_idempotent(items):
    once = choose_patches(items)
    twice = choose_patches([p.candidate for p in once])
    assert [p.patch_id for p in twice] == [p.patch_id for p in once]
    assert [p.candidate for p in twice] == [p.candidate for p in once]
    assert all(p.duplicates == () for p in twice)


def test_newest_version_wins_over_fewer_flags():
    old = Candidate(LOCATIONS[0], "0000000101", "A", date(2023, 5, 1), "V010303", 0)
    new = Candidate(LOCATIONS[0], "0000000101", "B", date(2023, 5, 1), "V010400", 40)
    (patch,) = choose_patches([old, new])
    assert patch.candidate.scene_id == "B" and patch.duplicates == ("A",)
    assert patch.patch_id == "EPSG32632-0010-0020_20230501_DT0000000101"


def test_rows_group_scenes():
    items = [
        Candidate(LOCATIONS[k], datatake, scene, date(2023, 5, 1), "V010303", 0, row_off=k * 128)
        for scene, datatake in (("B", "0000000102"), ("A", "0000000101"))
        for k in (1, 0)
    ]
    chosen = choose_patches(items)
    assert [p.candidate.scene_id for p in chosen] == ["A", "A", "B", "B"]
    assert [p.candidate.row_off for p in chosen] == [0, 128, 0, 128]


def test_neighbour_zones_wrap():
    assert neighbour_zones(32632) == (32631, 32633)
    assert neighbour_zones(32601) == (32660, 32602)
    assert neighbour_zones(32760) == (32759, 32701)


def test_neighbour_zone_overlap_found_across_the_zone_edge():
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
