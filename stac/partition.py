"""Partition a collection's items into a tree of sub-catalogs with at most `limit` links per file.

Items are grouped by a tuple of labels (for patches: UTM zone, then a block of 64 x 64 grid cells; for
scenes: UTM zone, then year). A group holding more than `limit` items is split into `part-NNNN` leaves of
consecutive items, and a node with more than `limit` children gets them wrapped in `group-NNNN`
catalogs, repeatedly, so that no catalog or collection file links more than `limit` items or children
whatever the distribution of the items. Pure: labels in, a frozen tree of item indices out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

BLOCK_CELLS = 64  # a block catalog covers 64 x 64 grid cells (245.76 km a side at 3840 m cells)


@dataclass(frozen=True, slots=True)
class Node:
    """A catalog of the tree: `path` is its folder below the collection's ('' for the collection)."""

    path: str
    label: str
    children: tuple[Node, ...] = ()
    items: tuple[int, ...] = ()

    @property
    def links(self) -> int:
        """How many item or child links this node's file holds."""
        return len(self.children) + len(self.items)

    def walk(self) -> Iterator[Node]:
        """This node and its descendants, depth first, children in order."""
        stack: list[Node] = [self]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(reversed(node.children))

    def leaves(self) -> Iterator[Node]:
        return (node for node in self.walk() if not node.children)

    def count(self) -> int:
        return sum(len(node.items) for node in self.walk())


Thunk = tuple[str, Callable[[str], Node]]


def _label(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def _join(path: str, label: str) -> str:
    return f"{path}/{label}" if path else label


def partition(keys: Sequence[tuple[str, ...]], limit: int) -> Node:
    """The tree for items whose labels are `keys[k]` (all of one length); items keep their order.

    Labels become folder names: they must be non-empty and hold no `/`.
    """
    if limit < 2:
        raise ValueError(f"a catalog must be allowed at least 2 links, got {limit}")
    depth = len(keys[0]) if keys else 0
    for key in keys:
        if len(key) != depth or any(not label or "/" in label for label in key):
            raise ValueError(f"bad partition key {key!r}")

    def cap(thunks: list[Thunk], path: str) -> tuple[Node, ...]:
        while len(thunks) > limit:
            chunks = [thunks[k : k + limit] for k in range(0, len(thunks), limit)]
            thunks = [(f"group-{n:04d}", partial(group, chunk)) for n, chunk in enumerate(chunks)]
        return tuple(make(_join(path, label)) for label, make in thunks)

    def group(chunk: list[Thunk], path: str) -> Node:
        return Node(path, _label(path), children=cap(chunk, path))

    def leaf(part: list[int], path: str) -> Node:
        return Node(path, _label(path), items=tuple(part))

    def build(indices: list[int], level: int, path: str) -> Node:
        if level == depth:
            if len(indices) <= limit:
                return leaf(indices, path)
            parts = [indices[k : k + limit] for k in range(0, len(indices), limit)]
            thunks: list[Thunk] = [(f"part-{n:04d}", partial(leaf, part)) for n, part in enumerate(parts)]
            return Node(path, _label(path), children=cap(thunks, path))
        groups: dict[str, list[int]] = {}
        for index in indices:
            groups.setdefault(keys[index][level], []).append(index)
        thunks = [(name, partial(build, groups[name], level + 1)) for name in sorted(groups)]
        return Node(path, _label(path), children=cap(thunks, path))

    return build(list(range(len(keys))), 0, "")


def patch_key(epsg: int, i: int, j: int) -> tuple[str, str]:
    """(zone, block) labels of a grid cell: `EPSG32632`, `i0128-j1344` (the block's first cell)."""
    return f"EPSG{epsg}", f"i{i // BLOCK_CELLS * BLOCK_CELLS:04d}-j{j // BLOCK_CELLS * BLOCK_CELLS:04d}"


def scene_key(epsg: int, year: int) -> tuple[str, str]:
    return f"EPSG{epsg}", f"{year:04d}"


def max_links(root: Node) -> int:
    return max(node.links for node in root.walk())
