"""Train / validation / test splits of a build, deterministic from a seed.

A split is written into the build as `splits/<name>.parquet` (columns `patch_id`, `location_id`,
`split`; one row per patch of `index/patches.parquet`, sorted by patch id) and `splits/<name>.json` (the
parameters, the counts and a fingerprint of the index it was made from). Every patch is in exactly one of
"train", "validation", "test" or (blocked splits only) "buffer".

Both kinds draw from a seeded hash, `u = blake2b(seed, key) / 2**64`, cut at the cumulative fractions. So a
split depends only on (seed, fractions, key), not on the order or the size of the build: when new scenes
are added, existing keys keep their split. Fractions are matched in expectation, not exactly.

- `random`: key = patch id; one draw per patch (what the SpectralEarth paper did). Dates of one location
  and neighbouring locations fall into different splits: this split leaks on purpose, for comparison.
- `blocked`: no location, and no neighbourhood of locations, spans two splits:
  1. each location goes to its block, (epsg, i // block_cells, j // block_cells) of its grid cell;
  2. blocks holding locations linked by `neighbour_zone_overlaps` (the same ground seen in two UTM zones)
     are merged (union-find) into one block group;
  3. each group draws its split, keyed by its smallest block;
  4. buffer: two locations are neighbours when they are grid neighbours in one zone (|di| <= 1 and
     |dj| <= 1, corners included), linked by `neighbour_zone_overlaps`, or in different zones with
     footprints that touch or overlap (from the geometry of `index/locations.parquet`). A location whose
     neighbour drew a later split in the order (train, validation, test) becomes "buffer": train gives up
     its border to validation and test, validation to test, test keeps its border.
  Guarantees (checked after every blocked split, and property-tested): all patches of a location share
  its split; any two neighbouring locations are in the same split or at least one is "buffer"; all
  non-buffer locations of one block group share a split. Fractions hold by block-group count before
  the buffer; the buffer costs roughly a one-cell rim where blocks of different splits meet (about 10 %
  of a densely covered area with 8-cell blocks, less with larger blocks or sparse coverage).

Use a split with a query: `ids = set(search(...).ids) & split_filter(store, "blocked", "train")`.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import __version__, tables
from pipeline.dedup import INDEX_LOCATIONS, INDEX_PATCHES
from pipeline.grid import Cell
from pipeline.storage import BuildStore

SPLITS = ("train", "validation", "test")
BUFFER = "buffer"
SPLITS_DIR = tables.SPLITS_DIR
# Footprints (EPSG:4326) closer than this are touching, across zones: ~0.1 m.
CONTACT_DEGREES = 1e-6
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")

Kind = Literal["random", "blocked"]
Block = tuple[int, int, int]

SPLIT_SCHEMA = pa.schema([("patch_id", pa.string()), ("location_id", pa.string()), ("split", pa.string())])


# Pure core ----------------------------------------------------------------------------------------


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(f) for f in fractions)
    if len(values) != 3:
        raise ValueError(f"fractions are (train, validation, test), got {len(values)} values")
    if any(not np.isfinite(f) or f < 0 for f in values) or abs(sum(values) - 1.0) > 1e-9:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {values}")
    return values[0], values[1], values[2]


def unit_hash(seed: int, key: str) -> float:
    """A uniform number in [0, 1) from (seed, key): stable across runs, platforms and Python versions."""
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def split_of(u: float, fractions: Sequence[float]) -> str:
    """The split whose slice of [0, 1) holds u (cumulative fractions, train first)."""
    edge = 0.0
    for name, fraction in zip(SPLITS, fractions, strict=True):
        edge += fraction
        if u < edge and fraction > 0:
            return name
    return next(name for name, f in zip(SPLITS[::-1], fractions[::-1], strict=True) if f > 0)


def random_split(patch_ids: Iterable[str], fractions: Sequence[float], seed: int) -> dict[str, str]:
    """patch id -> split, one seeded draw per patch."""
    fractions = check_fractions(fractions)
    return {pid: split_of(unit_hash(seed, pid), fractions) for pid in patch_ids}


def block_of(cell: Cell, block_cells: int) -> Block:
    return (cell.epsg, cell.i // block_cells, cell.j // block_cells)


def _block_key(block: Block) -> str:
    return f"EPSG{block[0]}-{block[1]}-{block[2]}"


def block_groups(
    cells: Mapping[str, Cell], links: Mapping[str, Iterable[str]], block_cells: int
) -> dict[str, Block]:
    """location id -> the smallest block of its block group (blocks merged through `links`)."""
    parent: dict[Block, Block] = {}

    def find(block: Block) -> Block:
        root = block
        while parent.setdefault(root, root) != root:
            root = parent[root]
        while parent[block] != root:  # path compression
            parent[block], block = root, parent[block]
        return root

    for location, cell in cells.items():
        mine = find(block_of(cell, block_cells))
        for other in links.get(location, ()):
            if other in cells:
                theirs = find(block_of(cells[other], block_cells))
                if theirs != mine:
                    low, high = sorted((mine, theirs))
                    parent[high] = low
                    mine = low
    return {location: find(block_of(cell, block_cells)) for location, cell in cells.items()}


def neighbours(
    cells: Mapping[str, Cell], links: Mapping[str, Iterable[str]], contacts: Mapping[str, Iterable[str]]
) -> dict[str, set[str]]:
    """Each location's neighbours among `cells`: grid neighbours in its zone (corners included), linked
    locations and cross-zone contacts (both made symmetric)."""
    by_cell = {(c.epsg, c.i, c.j): location for location, c in cells.items()}
    found: dict[str, set[str]] = {location: set() for location in cells}
    for location, c in cells.items():
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                other = by_cell.get((c.epsg, c.i + di, c.j + dj))
                if other is not None and other != location:
                    found[location].add(other)
        for mapping in (links, contacts):
            for other in mapping.get(location, ()):
                if other in cells and other != location:
                    found[location].add(other)
                    found[other].add(location)
    return found


def blocked_split(
    location_ids: Iterable[str],
    fractions: Sequence[float],
    seed: int,
    block_cells: int,
    links: Mapping[str, Iterable[str]] | None = None,
    contacts: Mapping[str, Iterable[str]] | None = None,
) -> dict[str, str]:
    """location id -> split or "buffer" (see the module docstring). `links`: neighbour_zone_overlaps
    (merged into one block group); `contacts`: further neighbours (buffered, not merged)."""
    fractions = check_fractions(fractions)
    if isinstance(block_cells, bool) or not isinstance(block_cells, int) or block_cells < 1:
        raise ValueError(f"block_cells must be a positive integer, got {block_cells!r}")
    links = links or {}
    contacts = contacts or {}
    cells = {location: Cell.parse(location) for location in sorted(set(location_ids))}
    groups = block_groups(cells, links, block_cells)
    draws = {group: split_of(unit_hash(seed, _block_key(group)), fractions) for group in set(groups.values())}
    drawn = {location: draws[groups[location]] for location in cells}
    rank = {name: k for k, name in enumerate(SPLITS)}
    adjacent = neighbours(cells, links, contacts)
    return {
        location: BUFFER if any(rank[drawn[o]] > rank[split] for o in adjacent[location]) else split
        for location, split in drawn.items()
    }


def leaks(
    assignment: Mapping[str, str],
    links: Mapping[str, Iterable[str]] | None = None,
    contacts: Mapping[str, Iterable[str]] | None = None,
) -> list[tuple[str, str]]:
    """Neighbouring location pairs in two different non-buffer splits (empty for a sound split)."""
    cells = {location: Cell.parse(location) for location in assignment}
    adjacent = neighbours(cells, links or {}, contacts or {})
    return sorted(
        (a, b)
        for a, others in adjacent.items()
        for b in others
        if a < b and BUFFER not in (assignment[a], assignment[b]) and assignment[a] != assignment[b]
    )


def cross_zone_contacts(
    location_ids: Sequence[str],
    epsg: Sequence[int],
    geometries: Any,
    distance_degrees: float = CONTACT_DEGREES,
) -> dict[str, set[str]]:
    """Pairs of locations in different UTM zones whose EPSG:4326 footprints touch or overlap."""
    import shapely

    geoms = np.asarray(geometries, dtype=object)
    if not len(geoms):
        return {}
    codes = np.asarray(epsg)
    tree = shapely.STRtree(geoms)
    left, right = tree.query(geoms, predicate="dwithin", distance=distance_degrees)
    across = codes[left] != codes[right]
    found: dict[str, set[str]] = {}
    for a, b in zip(left[across].tolist(), right[across].tolist(), strict=True):
        found.setdefault(location_ids[a], set()).add(location_ids[b])
    return found


# Build I/O ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SplitSummary:
    """What `make_split` wrote: counts per split (train, validation, test, buffer)."""

    name: str
    kind: str
    seed: int
    fractions: tuple[float, float, float]
    block_cells: int | None
    patches: dict[str, int]
    locations: dict[str, int]
    block_groups: int | None = None  # blocked: number of block groups drawn
    largest_block_group: int | None = None  # blocked: locations in the largest group

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "seed": self.seed,
            "fractions": list(self.fractions),
            "block_cells": self.block_cells,
            "patches": self.patches,
            "locations": self.locations,
            "block_groups": self.block_groups,
            "largest_block_group": self.largest_block_group,
        }


def split_paths(name: str) -> tuple[str, str]:
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        raise ValueError(f"split name must match {_NAME.pattern} (letters, digits, _ . -), got {name!r}")
    return f"{SPLITS_DIR}/{name}.parquet", f"{SPLITS_DIR}/{name}.json"


def _read_columns(store: BuildStore, relative: str, columns: list[str], hint: str) -> pa.Table:
    if not store.exists(relative):
        raise FileNotFoundError(f"{store.uri_of(relative)} is missing: {hint}")
    return pq.read_table(io.BytesIO(store.read_bytes(relative)), columns=columns)


def _counts(values: Iterable[str]) -> dict[str, int]:
    listed = list(values)
    return {name: listed.count(name) for name in (*SPLITS, BUFFER)}


def _blocked_by_patch(
    store: BuildStore,
    patch_ids: Sequence[str],
    location_of: dict[str, str],
    fractions: tuple[float, float, float],
    seed: int,
    block_cells: int,
) -> tuple[dict[str, str], int, int]:
    """The blocked split of each patch (its location's), the number of block groups and the largest
    group's size in locations."""
    locations = store.read_geodataframe(INDEX_LOCATIONS)
    ids = [str(x) for x in locations["location_id"]]
    links = {
        str(lid): [str(x) for x in (linked if linked is not None else ())]
        for lid, linked in zip(locations["location_id"], locations["neighbour_zone_overlaps"], strict=True)
    }
    contacts = cross_zone_contacts(ids, locations["epsg"].to_numpy(), locations.geometry.to_numpy())
    by_location = blocked_split(ids, fractions, seed, block_cells, links=links, contacts=contacts)
    found = leaks(by_location, links, contacts)
    if found:  # cannot happen by construction; a loud stop rather than a leaking split
        raise AssertionError(f"blocked split leaks between neighbours, e.g. {found[0]}")
    missing = sorted(set(location_of.values()) - set(by_location))
    if missing:
        raise ValueError(f"{INDEX_PATCHES} has locations missing from {INDEX_LOCATIONS}, e.g. {missing[0]}")
    groups = block_groups({lid: Cell.parse(lid) for lid in ids}, links, block_cells)
    sizes: dict[Block, int] = {}
    for group in groups.values():
        sizes[group] = sizes.get(group, 0) + 1
    return (
        {pid: by_location[location_of[pid]] for pid in patch_ids},
        len(sizes),
        max(sizes.values(), default=0),
    )


def make_split(
    store: BuildStore,
    name: str,
    kind: Kind = "random",
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    block_cells: int = 8,
) -> SplitSummary:
    """Make and write the split `name` of the build's patches (see the module docstring)."""
    parquet_path, json_path = split_paths(name)
    fractions = check_fractions(fractions)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    index_bytes = store.read_bytes(INDEX_PATCHES) if store.exists(INDEX_PATCHES) else None
    patches = _read_columns(
        store, INDEX_PATCHES, ["patch_id", "location_id"], "run the dedup stage first"
    ).to_pydict()
    patch_ids, location_of = (
        patches["patch_id"],
        dict(zip(patches["patch_id"], patches["location_id"], strict=True)),
    )
    groups_count = largest = None
    if kind == "random":
        by_patch = random_split(patch_ids, fractions, seed)
        block_cells_used = None
    elif kind == "blocked":
        by_patch, groups_count, largest = _blocked_by_patch(
            store, patch_ids, location_of, fractions, seed, block_cells
        )
        block_cells_used = block_cells
    else:
        raise ValueError(f"kind must be 'random' or 'blocked', got {kind!r}")
    ordered = sorted(patch_ids)
    table = pa.table(
        {
            "patch_id": ordered,
            "location_id": [location_of[p] for p in ordered],
            "split": [by_patch[p] for p in ordered],
        },
        schema=SPLIT_SCHEMA,
    )
    location_split = {location_of[p]: by_patch[p] for p in ordered}
    summary = SplitSummary(
        name=name,
        kind=kind,
        seed=seed,
        fractions=fractions,
        block_cells=block_cells_used,
        patches=_counts(by_patch.values()),
        locations=_counts(location_split.values()) if kind == "blocked" else {},
        block_groups=groups_count,
        largest_block_group=largest,
    )
    store.write_table(parquet_path, table)
    record = summary.to_json()
    record["index_sha256"] = hashlib.sha256(index_bytes or b"").hexdigest()
    record["pipeline_version"] = __version__
    store.write_json(json_path, record)
    return summary


def read_split(store: BuildStore, name: str) -> dict[str, str]:
    """patch id -> split ("train", "validation", "test" or "buffer")."""
    parquet_path, _ = split_paths(name)
    table = _read_columns(
        store, parquet_path, ["patch_id", "split"], f"make the split {name!r} first"
    ).to_pydict()
    return dict(zip(table["patch_id"], table["split"], strict=True))


def split_filter(store: BuildStore, name: str, split: str) -> set[str]:
    """The patch ids of one split: intersect with a query's ids (`set(result.ids) & ...`)."""
    if split not in (*SPLITS, BUFFER):
        raise ValueError(f"split must be one of {', '.join((*SPLITS, BUFFER))}, got {split!r}")
    return {pid for pid, s in read_split(store, name).items() if s == split}
