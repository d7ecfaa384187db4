"""Encoded inner chunks and whole shards of `dataset.zarr`, byte-identical to what zarr-python writes.

The reading pass encodes each kept patch once into the bytes of one inner chunk (`encode_chunk`); the
`write` stage then builds every shard by byte copy (`assemble_shard`), with no decode or re-encode.
Both reproduce zarr-python 3.1 exactly for the arrays `pipeline.dataset_arrays.ensure_arrays` creates:

- inner chunk: the `bytes` codec (little-endian, C order) then Blosc with the array's cname, clevel,
  shuffle, typesize and blocksize (numcodecs' Blosc, the library zarr's own BloscCodec calls);
- shard (Zarr v3 `sharding_indexed`, index at the end): the non-empty chunk payloads concatenated in
  the Morton (Z-) order of their coordinates inside the shard, then the index, an array of
  (offset, nbytes) uint64 pairs of shape chunks_per_shard + (2,) in C order, little-endian, with
  (2**64 - 1, 2**64 - 1) for an absent chunk, followed by the crc32c of the index bytes (4 bytes,
  little-endian), as the index codecs `bytes` + `crc32c` say.

Empty chunks: with `write_empty_chunks` off (zarr's default), zarr stores no chunk whose every element
equals the fill value, and no shard object at all when none of its chunks is stored. `encode_chunk`
returns None for such a chunk and `assemble_shard` returns None for such a shard. `pipeline.write`
opens its arrays with `write_empty_chunks` on (so a shard of clean patches, whose quality is all 0,
still exists on disk), which `WRITE_EMPTY_CHUNKS` mirrors. Rows past the end of the array in its last
shard are never written by zarr: they are absent from the index whatever the setting.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import google_crc32c
import numcodecs
import numcodecs.blosc
import numpy as np
from numcodecs.blosc import compress, decompress

from pipeline.manifest import Manifest
from pipeline.quality import NODATA_VALUE

# As `pipeline.dataset_arrays.ensure_arrays` sets it: every in-bounds chunk is stored, even an all-fill one.
WRITE_EMPTY_CHUNKS = True
ABSENT = 2**64 - 1  # offset and nbytes of an absent chunk in a shard index (sharding codec spec)
INDEX_CHECKSUM_BYTES = 4  # the crc32c index codec appends a uint32
CNAME = "zstd"  # the compressor `pipeline.dataset_arrays.ensure_arrays` configures
SHUFFLES = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}  # Blosc's codes for the v3 names


class CorruptShard(ValueError):
    """A shard object whose index is unreadable, fails its checksum, or points outside the object."""


@dataclass(frozen=True, slots=True)
class ChunkCodec:
    """Everything that decides the bytes of one inner chunk of a sharded Zarr v3 array.

    `dtype` is the stored (little-endian) numpy dtype, `chunk_shape` the inner chunk's shape, the
    Blosc fields are those of the array's `blosc` codec, and `write_empty_chunks` says whether an
    all-fill chunk is stored (see the module docstring).
    """

    dtype: str
    chunk_shape: tuple[int, ...]
    fill_value: int
    cname: str
    clevel: int
    shuffle: str
    typesize: int
    blocksize: int = 0
    write_empty_chunks: bool = WRITE_EMPTY_CHUNKS

    def __post_init__(self) -> None:
        kind = np.dtype(self.dtype)
        if kind.kind not in "iu" or kind.byteorder not in ("<", "|", "="):
            raise ValueError(f"chunk dtype must be a little-endian integer type, got {self.dtype!r}")
        if self.shuffle not in SHUFFLES:
            raise ValueError(f"unknown Blosc shuffle {self.shuffle!r}")
        if not self.chunk_shape or any(n < 1 for n in self.chunk_shape):
            raise ValueError(f"chunk shape must be positive, got {self.chunk_shape}")
        if not np.can_cast(np.min_scalar_type(self.fill_value), kind):
            raise ValueError(f"fill value {self.fill_value} does not fit {self.dtype}")

    @property
    def nbytes(self) -> int:
        """Decoded size of one chunk."""
        return math.prod(self.chunk_shape) * np.dtype(self.dtype).itemsize

    def key(self) -> str:
        """What the bytes of an encoded chunk depend on: these settings and the encoder's build
        (c-blosc and its codecs can change their output between releases, so chunks encoded by
        another build are still readable but no longer the bytes zarr-python would write here).
        Suitable for keying stored encoded candidates."""
        identity = json.dumps(
            {
                "codec": asdict(self),
                "numcodecs": numcodecs.__version__,
                "blosc": numcodecs.blosc.VERSION_STRING,
            },
            sort_keys=True,
        )
        return hashlib.sha256(identity.encode()).hexdigest()[:16]

    @classmethod
    def from_array_metadata(
        cls, metadata: Mapping[str, Any], write_empty_chunks: bool = WRITE_EMPTY_CHUNKS
    ) -> ChunkCodec:
        """The codec of an array's `zarr.json` (a dict), for the layout this module reproduces: one
        `sharding_indexed` codec over `bytes` + `blosc`, index codecs `bytes` (little) + `crc32c`,
        index at the end. Anything else raises ValueError (assembling for it would be wrong)."""
        return _parse_metadata(metadata, write_empty_chunks)[0]


def reflectance_codec(
    manifest: Manifest, band_count: int, write_empty_chunks: bool = WRITE_EMPTY_CHUNKS
) -> ChunkCodec:
    """The inner-chunk codec of `reflectance` as `pipeline.dataset_arrays.ensure_arrays` creates it: one
    (1, B, P, P) int16 patch per chunk, fill -32768, Blosc with the manifest's `write.codec`, bitshuffle."""
    size = manifest.grid.patch_size
    return ChunkCodec(
        dtype="<i2",
        # A chunk dimension is at least 1, even for a build without a band axis (as in write.py).
        chunk_shape=(1, max(1, band_count), size, size),
        fill_value=NODATA_VALUE,
        cname=manifest.write.codec.cname,
        clevel=manifest.write.codec.clevel,
        shuffle="bitshuffle",
        typesize=2,
        blocksize=manifest.write.codec.blocksize,
        write_empty_chunks=write_empty_chunks,
    )


def quality_codec(manifest: Manifest, write_empty_chunks: bool = WRITE_EMPTY_CHUNKS) -> ChunkCodec:
    """The inner-chunk codec of `quality`: one (1, P, P) uint16 mask per chunk, fill 0."""
    size = manifest.grid.patch_size
    return ChunkCodec(
        dtype="<u2",
        chunk_shape=(1, size, size),
        fill_value=0,
        cname=manifest.write.codec.cname,
        clevel=manifest.write.codec.clevel,
        shuffle="bitshuffle",
        typesize=2,
        blocksize=manifest.write.codec.blocksize,
        write_empty_chunks=write_empty_chunks,
    )


def shard_grid(manifest: Manifest, ndim: int) -> tuple[int, ...]:
    """Inner chunks per shard of `reflectance` (ndim 4) or `quality` (ndim 3): patches_per_shard
    along the patch axis, one chunk along every other axis."""
    return (manifest.write.patches_per_shard,) + (1,) * (ndim - 1)


def shard_grid_of(metadata: Mapping[str, Any]) -> tuple[int, ...]:
    """Inner chunks per shard, from an array's `zarr.json` (validated as in `from_array_metadata`)."""
    return _parse_metadata(metadata, WRITE_EMPTY_CHUNKS)[1]


def encode_chunk(codec: ChunkCodec, array: np.ndarray) -> bytes | None:
    """The bytes zarr-python stores for this inner chunk inside a shard, or None when it stores
    none (every element equals the fill value and `codec.write_empty_chunks` is off).

    `array` has the chunk's shape (a patch without the leading length-1 patch axis is accepted too)
    and the codec's integer type in either byte order: a big-endian cube (ENVI) is byte-swapped to
    the stored little-endian order here, values unchanged.
    """
    values = np.asarray(array)
    if values.shape != codec.chunk_shape:
        if (1, *values.shape) != codec.chunk_shape:
            raise ValueError(f"chunk shape {values.shape} is not the array's {codec.chunk_shape}")
    stored = np.dtype(codec.dtype)
    if values.dtype.kind != stored.kind or values.dtype.itemsize != stored.itemsize:
        raise ValueError(f"chunk dtype {values.dtype} is not the array's {stored}")
    if not codec.write_empty_chunks and bool(np.all(values == codec.fill_value)):
        return None
    little = np.ascontiguousarray(values, dtype=stored)
    return bytes(
        compress(
            little,
            codec.cname.encode(),
            codec.clevel,
            SHUFFLES[codec.shuffle],
            codec.blocksize,
            codec.typesize,
        )
    )


def decode_chunk(codec: ChunkCodec, payload: bytes | None) -> np.ndarray:
    """The values of one stored inner chunk (the fill value for an absent one), in `chunk_shape`."""
    if payload is None:
        return np.full(codec.chunk_shape, codec.fill_value, dtype=codec.dtype)
    raw = decompress(payload)
    if len(raw) != codec.nbytes:
        raise CorruptShard(f"chunk decodes to {len(raw)} bytes, expected {codec.nbytes}")
    return np.frombuffer(raw, dtype=codec.dtype).reshape(codec.chunk_shape)


def assemble_shard(
    codec: ChunkCodec, chunks: Sequence[bytes | None], chunks_per_shard: int | tuple[int, ...]
) -> bytes | None:
    """One shard object from its encoded inner chunks, by byte copy, as zarr-python writes it.

    `chunks` lists the inner chunks in C order of their coordinates inside the shard (for the
    dataset's arrays: its rows in order), None for a chunk not stored; a shorter list is the last
    partial shard, its missing trailing chunks absent. `chunks_per_shard` is the shard's grid of
    inner chunks (an int n means n along the first axis, 1 along the others). Returns None when no
    chunk is stored: zarr writes no object for such a shard. `codec` fixes the grid's rank.
    """
    grid = _grid(codec, chunks_per_shard)
    total = math.prod(grid)
    if len(chunks) > total:
        raise ValueError(f"{len(chunks)} chunks do not fit a shard of {total}")
    index = np.full((total, 2), ABSENT, dtype="<u8")
    parts: list[bytes] = []
    offset = 0
    for flat in morton_order(grid):
        payload = chunks[flat] if flat < len(chunks) else None
        if not payload:  # zarr skips a zero-length value like an absent one
            continue
        index[flat] = (offset, len(payload))
        parts.append(payload)
        offset += len(payload)
    if not parts:
        return None
    index_bytes = index.tobytes()
    parts.append(index_bytes)
    parts.append(google_crc32c.value(index_bytes).to_bytes(INDEX_CHECKSUM_BYTES, "little"))
    return b"".join(parts)


def shard_chunks(
    codec: ChunkCodec, shard: bytes | None, chunks_per_shard: int | tuple[int, ...]
) -> list[bytes | None]:
    """The inverse of `assemble_shard`: the stored inner chunks' payloads of one shard object, in C
    order (None for an absent chunk; all None for a missing object), after checking the index's
    crc32c and that every entry lies inside the object. Raises CorruptShard otherwise.

    Lets stored rows be copied into a rewritten shard by byte copy, and a shard be checked without
    decoding it."""
    grid = _grid(codec, chunks_per_shard)
    total = math.prod(grid)
    if shard is None:
        return [None] * total
    index_size = 16 * total
    if len(shard) < index_size + INDEX_CHECKSUM_BYTES:
        raise CorruptShard(f"shard of {len(shard)} bytes is shorter than its index")
    index_bytes = shard[-index_size - INDEX_CHECKSUM_BYTES : -INDEX_CHECKSUM_BYTES]
    checksum = int.from_bytes(shard[-INDEX_CHECKSUM_BYTES:], "little")
    if google_crc32c.value(index_bytes) != checksum:
        raise CorruptShard("shard index fails its crc32c")
    index = np.frombuffer(index_bytes, dtype="<u8").reshape(total, 2)
    payload_end = len(shard) - index_size - INDEX_CHECKSUM_BYTES
    out: list[bytes | None] = []
    for offset, nbytes in index.tolist():
        if (offset, nbytes) == (ABSENT, ABSENT):
            out.append(None)
        elif offset + nbytes > payload_end:
            raise CorruptShard(f"shard index entry ({offset}, {nbytes}) lies outside the chunk bytes")
        else:
            out.append(shard[offset : offset + nbytes])
    return out


@lru_cache(maxsize=32)
def morton_order(grid: tuple[int, ...]) -> tuple[int, ...]:
    """C-order flat indices of a shard's inner chunks in the order zarr-python lays them out: by
    Morton code, whose bits interleave the coordinates' bits from the lowest up, dimension after
    dimension, each dimension taking only the bits its extent needs ((n - 1).bit_length())."""
    bits = [(n - 1).bit_length() for n in grid]

    def code(coords: tuple[int, ...]) -> int:
        value, out_bit = 0, 0
        for bit in range(max(bits, default=0)):
            for dim, coord in enumerate(coords):
                if bit < bits[dim]:
                    value |= ((coord >> bit) & 1) << out_bit
                    out_bit += 1
        return value

    coords = list(np.ndindex(*grid))
    order = sorted(range(len(coords)), key=lambda flat: code(coords[flat]))
    return tuple(order)


def _grid(codec: ChunkCodec, chunks_per_shard: int | tuple[int, ...]) -> tuple[int, ...]:
    ndim = len(codec.chunk_shape)
    grid = (chunks_per_shard,) + (1,) * (ndim - 1) if isinstance(chunks_per_shard, int) else chunks_per_shard
    if len(grid) != ndim or any(n < 1 for n in grid):
        raise ValueError(f"chunks per shard {chunks_per_shard} do not fit chunks of rank {ndim}")
    return tuple(grid)


def _parse_metadata(
    metadata: Mapping[str, Any], write_empty_chunks: bool
) -> tuple[ChunkCodec, tuple[int, ...]]:
    def named(codec: Any) -> tuple[str, dict[str, Any]]:
        return codec.get("name"), codec.get("configuration") or {}

    codecs = metadata.get("codecs") or []
    if len(codecs) != 1 or named(codecs[0])[0] != "sharding_indexed":
        raise ValueError("not a sharded array (one sharding_indexed codec)")
    sharding = named(codecs[0])[1]
    inner = [named(c) for c in sharding.get("codecs", [])]
    if [name for name, _ in inner] != ["bytes", "blosc"] or inner[0][1].get("endian", "little") != "little":
        raise ValueError(f"inner codecs {[name for name, _ in inner]} are not little-endian bytes + blosc")
    index_codecs = [named(c) for c in sharding.get("index_codecs", [])]
    if [name for name, _ in index_codecs] != ["bytes", "crc32c"] or index_codecs[0][1].get(
        "endian", "little"
    ) != "little":
        raise ValueError("shard index codecs are not little-endian bytes + crc32c")
    if sharding.get("index_location", "end") != "end":
        raise ValueError("shard index is not at the end")
    blosc = inner[1][1]
    dtype = np.dtype(metadata["data_type"]).newbyteorder("<").str
    chunk_shape = tuple(int(n) for n in sharding["chunk_shape"])
    shard_shape = tuple(int(n) for n in metadata["chunk_grid"]["configuration"]["chunk_shape"])
    codec = ChunkCodec(
        dtype=dtype,
        chunk_shape=chunk_shape,
        fill_value=int(metadata["fill_value"]),
        cname=blosc["cname"],
        clevel=int(blosc["clevel"]),
        shuffle=blosc["shuffle"],
        typesize=int(blosc.get("typesize", np.dtype(dtype).itemsize)),
        blocksize=int(blosc.get("blocksize", 0)),
        write_empty_chunks=write_empty_chunks,
    )
    return codec, tuple(s // c for s, c in zip(shard_shape, chunk_shape, strict=True))
