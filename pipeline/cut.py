"""The encoded candidates of each scene: the `cut/<scene_id>/` build artefacts.

The mask stage (`pipeline.mask`) is the build's only read of the spectral cube. In the same pass every
candidate cell that passes the quality thresholds (`pipeline.tile.decide_cells`, the very decision
`tile` makes later) is cut: its reflectance patch and its quality patch are encoded once into the bytes
of one inner chunk each (`pipeline.zarr_chunks.encode_chunk`, the dataset's codec) and its exact
per-band sums are recorded (`CellSums`). They go to `cut/<scene_id>/<key>.bin` (the payloads,
concatenated) and `cut/<scene_id>/<key>.json` (location_id -> offsets, lengths and checksums of both
chunks, the sums, and the size and SHA-256 of the .bin), bin first and index last, each atomically.
`key` is the scene's item key (`pipeline.mask.scene_key`): the product fingerprint, the band policy,
grid and quality thresholds, and the codec settings (`ChunkCodec.key()`), never the shard size or row
order, so a new dedup result never forces a re-read. `write` assembles shards from these chunks without
opening a product.

This module holds the artefacts' paths and format (`CutIndex`), the spool the .bin is written through,
the `Cutter` that encodes a scene's candidates block by block, and the housekeeping (`read_cut_index`,
`remove_cut`, `prune_cut`). They are build artefacts: removing them costs a re-read of the scene,
never a wrong result.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np

from pipeline.cell_moments import CellSums
from pipeline.errors import is_transient, one_line
from pipeline.grid import GridSpec, cells_in_raster
from pipeline.quality import NODATA_VALUE
from pipeline.storage import BuildStore
from pipeline.zarr_chunks import ChunkCodec, encode_chunk

BLOCK_ROWS = 128  # rows per read: one block of kept bands is ~B x 128 x W int16 (about 65 MB at full size)
CUT = "cut"  # the encoded candidates, per scene (build artefacts: see the module docstring)
CUT_FORMAT = 1


def cut_index_path(scene_id: str, key: str) -> str:
    return f"{CUT}/{scene_id}/{key}.json"


def cut_bin_path(scene_id: str, key: str) -> str:
    return f"{CUT}/{scene_id}/{key}.bin"


@dataclass(frozen=True, slots=True)
class CutPlan:
    """What the reading pass needs to cut a scene: the candidate decision's inputs and the codecs.
    `transform` is the scene's transform on the lattice (None: off the lattice, no cell is cut)."""

    transform: tuple[float, ...] | None
    epsg: int
    spec: GridSpec
    policy: Any  # pipeline.manifest.QualityPolicy
    reflectance: ChunkCodec
    quality: ChunkCodec


@dataclass(frozen=True, slots=True)
class CutCell:
    """Where one encoded candidate sits in its scene's .bin: (offset, length) of each chunk, a short
    SHA-256 of each payload (checked when a shard copies it), and the patch's exact sums."""

    reflectance: tuple[int, int]
    quality: tuple[int, int]
    sha: tuple[str, str]
    sums: CellSums


@dataclass(frozen=True)
class CutIndex:
    """The index of one scene's encoded candidates (`cut/<scene_id>/<key>.json`)."""

    scene_id: str
    key: str
    reflectance_codec: str
    quality_codec: str
    bin_bytes: int
    bin_sha256: str
    cells: dict[str, CutCell] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": CUT_FORMAT,
            "scene_id": self.scene_id,
            "key": self.key,
            "reflectance_codec": self.reflectance_codec,
            "quality_codec": self.quality_codec,
            "bin_bytes": self.bin_bytes,
            "bin_sha256": self.bin_sha256,
            "cells": {
                location: {
                    "reflectance": list(cell.reflectance),
                    "quality": list(cell.quality),
                    "sha": list(cell.sha),
                    "sums": cell.sums.to_json(),
                }
                for location, cell in sorted(self.cells.items())
            },
        }

    @classmethod
    def from_json(cls, data: Any) -> CutIndex:
        """Parse and check an index: every chunk lies inside the .bin it describes (ValueError if not)."""
        if not isinstance(data, dict) or data.get("format") != CUT_FORMAT:
            raise ValueError("not a cut index of this format")
        size = int(data["bin_bytes"])
        cells = {}
        for location, raw in dict(data["cells"]).items():
            spans = [(int(raw[name][0]), int(raw[name][1])) for name in ("reflectance", "quality")]
            if any(offset < 0 or length < 1 or offset + length > size for offset, length in spans):
                raise ValueError(f"cell {location} points outside the .bin")
            sha = (str(raw["sha"][0]), str(raw["sha"][1]))
            cells[str(location)] = CutCell(spans[0], spans[1], sha, CellSums.from_json(raw["sums"]))
        return cls(
            str(data["scene_id"]),
            str(data["key"]),
            str(data["reflectance_codec"]),
            str(data["quality_codec"]),
            size,
            str(data["bin_sha256"]),
            cells,
        )


def chunk_sha(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()[:16]


class Spool:
    """The .bin of one scene's cut, written as the cube is read (memory holds one block, not the
    scene's payloads): straight beside its target on a local build, in a local temporary file for
    object storage; `commit` moves it in place whole (a reader never sees half a .bin)."""

    def __init__(self, store: BuildStore, relative: str, scratch: str | None = None) -> None:
        self.store, self.relative = store, relative
        if store.is_local:
            target = store.path(relative)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            self.path = f"{target}.tmp-{uuid.uuid4().hex}"
        else:
            # In the task's own scratch folder (`scratch`), which the next task on the machine removes
            # if this one is killed.
            handle, self.path = tempfile.mkstemp(prefix="cut-", suffix=".bin", dir=scratch)
            os.close(handle)
        self.handle: BinaryIO = open(self.path, "wb")
        self.digest = hashlib.sha256()
        self.size = 0

    def append(self, payload: bytes) -> tuple[int, int]:
        offset = self.size
        self.handle.write(payload)
        self.digest.update(payload)
        self.size += len(payload)
        return offset, len(payload)

    def commit(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        try:
            if self.store.is_local:
                os.replace(self.path, self.store.path(self.relative))
            else:
                self.store.fs.put_file(self.path, self.store.path(self.relative))
        finally:
            self.discard()

    def discard(self) -> None:
        if not self.handle.closed:
            self.handle.close()
        if os.path.exists(self.path):
            os.remove(self.path)


def block_edges(cell_rows: set[int], height: int, size: int) -> list[int]:
    """Row edges of the blocks a scene is read in (pure): each cell row [r, r + size) is exactly one
    block, whatever its size, so a block always holds whole cells; the rows outside cell rows are read
    in blocks of at most BLOCK_ROWS."""
    cells = {r for r in cell_rows if 0 <= r and r + size <= height}
    ordered = sorted({0, height} | cells | {r + size for r in cells})
    out = [ordered[0]]
    for edge in ordered[1:]:
        if out[-1] not in cells:
            while edge - out[-1] > BLOCK_ROWS:
                out.append(out[-1] + BLOCK_ROWS)
        out.append(edge)
    return out


class Cutter:
    """Cuts the candidate cells of a scene from the blocks the mask pass reads (see the module
    docstring): `take` gets each block of whole rows with its mask bits and kept-band cube."""

    def __init__(self, plan: CutPlan, spool: Spool | None) -> None:
        self.plan, self.spool = plan, spool
        self.cells: dict[str, CutCell] = {}
        self.cell_rows: set[int] = set()

    def block_edges(self, width: int, height: int) -> list[int]:
        """Row edges of the blocks to read: every cell row is one block of exactly `patch_size` rows;
        the rows above, between (none) and below are read in blocks of at most BLOCK_ROWS."""
        plan = self.plan
        rows: set[int] = set()
        if plan.transform is not None:
            rows = {
                w.row_off for _, w in cells_in_raster(plan.epsg, plan.transform, width, height, plan.spec)
            }
        self.cell_rows = rows
        return block_edges(rows, height, plan.spec.patch_size)

    def take(self, row: int, bits: np.ndarray, cube: np.ndarray) -> None:
        """Encode the kept candidates of a block that is one whole cell row (others hold no cell)."""
        from pipeline.tile import decide_cells  # tile builds on mask: imported when used

        size = self.plan.spec.patch_size
        if self.plan.transform is None or row not in self.cell_rows or bits.shape[0] != size:
            return
        a, b, c, d, e, f = self.plan.transform[:6]
        # The block as a raster of its own: its origin moved down `row` pixels, so its cells are
        # exactly this cell row's, with windows relative to the block.
        shifted = (a, b, c + b * row, d, e, f + e * row)
        # Empty kept bands are only known after the whole scene; a scene with one has every cell
        # dropped by tile, and `finish` then drops what was cut.
        decisions = decide_cells(bits, shifted, self.plan.epsg, self.plan.spec, self.plan.policy, ())
        for decision in decisions:
            if not decision.kept:
                continue
            cols = slice(decision.col_off, decision.col_off + size)
            patch = cube[:, :, cols]
            if bool((patch == NODATA_VALUE).any()):
                continue  # never encode nodata (the decision already excludes it: this is a guard)
            reflectance = encode_chunk(self.plan.reflectance, patch)
            quality = encode_chunk(self.plan.quality, bits[:, cols])
            if reflectance is None or quality is None:  # only without write_empty_chunks
                raise ValueError("an all-fill chunk cannot be cut: the arrays store every chunk")
            assert self.spool is not None
            self.cells[decision.cell.location_id] = CutCell(
                self.spool.append(reflectance),
                self.spool.append(quality),
                (chunk_sha(reflectance), chunk_sha(quality)),
                clean_patch_sums(patch),
            )


def clean_patch_sums(patch: np.ndarray) -> CellSums:
    """`CellSums.of_patch` of a (B, y, x) int16 patch without nodata (every cut patch), without its
    int64 copy of the patch: the products are formed in int64 by einsum (as `BandMoments.of_block`
    does), so the sums are exact and the same."""
    values = patch.reshape(patch.shape[0], -1)
    if values.size and bool((values == NODATA_VALUE).any()):
        return CellSums.of_patch(patch)
    return CellSums(
        (values.shape[1],) * values.shape[0],
        tuple(values.sum(axis=1, dtype=np.int64).tolist()),
        tuple(np.einsum("bp,bp->b", values, values, dtype=np.int64, casting="unsafe").tolist()),
        tuple(values.min(axis=1, initial=np.iinfo(np.int16).max).tolist()),
        tuple(values.max(axis=1, initial=np.iinfo(np.int16).min).tolist()),
    )


def remove_cut(store: BuildStore, scene_id: str, keep: str | None = None, spool: str = "") -> None:
    """Remove a scene's cut files, except the .bin and .json of key `keep` (and the file being
    spooled): another key's are stale, and so is what a killed task left half-written."""
    folder = store.path(f"{CUT}/{scene_id}")
    if not store.fs.exists(folder):
        return
    kept = {f"{keep}.bin", f"{keep}.json", os.path.basename(spool)} if keep else set()
    stale = [p for p in store.fs.find(folder) if p.rsplit("/", 1)[-1] not in kept]
    if stale:
        store.fs.rm(stale)


def read_cut_index(store: BuildStore, scene_id: str, key: str) -> CutIndex | None:
    """A scene's cut index, checked (parses, names its scene and key, every chunk inside a .bin of the
    recorded size); None when it is absent or fails a check (the caller has the scene read again)."""
    path = cut_index_path(scene_id, key)
    try:
        index = CutIndex.from_json(json.loads(store.read_bytes(path)))
        size = int(store.fs.size(store.path(cut_bin_path(scene_id, key))))
    except FileNotFoundError:
        return None
    except Exception as exc:
        if is_transient(exc):
            raise
        print(f"mask: the cut of {scene_id} is unreadable ({one_line(exc)}); it will be read again")
        return None
    if index.scene_id != scene_id or index.key != key or size != index.bin_bytes:
        return None
    return index


def prune_cut(store: BuildStore, keys: dict[str, str]) -> None:
    """Remove the cut of scenes no longer inventoried, and cut files of another key."""
    folder = store.path(CUT)
    if not store.fs.exists(folder):
        return
    for path in store.fs.ls(folder, detail=False):
        scene_id = str(path).rstrip("/").rsplit("/", 1)[-1]
        if scene_id in keys:
            remove_cut(store, scene_id, keep=keys[scene_id])
        else:
            store.fs.rm(path, recursive=True)
