"""Codec choice for `dataset.zarr` (issue 12, item 7): Blosc encode and decode MB/s, single-threaded,
and compression ratio, on realistic spectra.

    .venv/bin/python bench/codec_bench.py            # ~9 full-size 202 x 128 x 128 patches
    .venv/bin/python bench/codec_bench.py --quick    # a smaller product (smoke test)

Named codec_bench, not codecs: bench/run.py imports its siblings by bare name, and `import codecs`
gives the standard library's module (already loaded at start-up) instead.

Patches: every 128 x 128 window without nodata in the kept bands (SpectralEarth policy, 202 of 224) of
one synthetic L2A product from `pipeline.enmap.synth` (vegetation, soil, water, urban, snow, cloud and
haze spectra with noise), generated once into bench/cache/ like the other cases' products. Each patch is
encoded exactly as the pipeline stores it, through `pipeline.zarr_chunks.encode_chunk` (little-endian
bytes, Blosc with typesize 2 and bitshuffle), and decoded with `decode_chunk`. MB are MiB of raw int16;
a time is the CPU time of this one thread (Blosc runs single-threaded here), best of `repeats` passes
over all patches; wall-clock figures are in the dict too (`*_wall`), lower on a busy machine.
`measure` returns a dict, so bench/run.py can include it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numcodecs.blosc
import numpy as np
import rasterio
from common import BENCH, MB
from products import ensure_products, spectral_path

from pipeline.enmap.synth import SynthConfig, load_band_table
from pipeline.manifest import Manifest
from pipeline.quality import NODATA_VALUE
from pipeline.zarr_chunks import ChunkCodec, decode_chunk, encode_chunk, reflectance_codec

PATCH = 128
KIB = 1024
# (label, Blosc cname, clevel, blocksize; 0 = Blosc's automatic choice): the choices issue 12 names
# (Blosc's automatic block: 32 KiB at zstd level 1, 128 KiB at 3, 256 KiB at 5), zstd-3 between them,
# and zstd with larger blocks set explicitly: bitshuffle and zstd both work block by block, so larger
# blocks compress better and decode faster, and within one patch-sized chunk they cost nothing (Blosc
# splits a chunk into blocks for its own threads, which zarr turns off).
CHOICES = (
    ("zstd-5", "zstd", 5, 0),
    ("zstd-3", "zstd", 3, 0),
    ("zstd-1", "zstd", 1, 0),
    ("lz4", "lz4", 5, 0),
    ("zstd-5/1m", "zstd", 5, 1024 * KIB),
    ("zstd-3/1m", "zstd", 3, 1024 * KIB),
    ("zstd-1/256k", "zstd", 1, 256 * KIB),
    ("zstd-1/1m", "zstd", 1, 1024 * KIB),
)


def product_config(quick: bool) -> SynthConfig:
    """One folder GeoTIFF product; full band table, so the kept axis is SpectralEarth's 202 bands."""
    size = 300 if quick else 560
    return SynthConfig(
        seed=12,
        sites=1,
        revisits=1,
        overlapping_tiles=0,
        reprocessed=0,
        width=size,
        height=size - 20,
        packagings=("folder",),
        formats=("GTiff",),
    )


def realistic_patches(cache: Path, quick: bool) -> tuple[np.ndarray, str]:
    """(n, 202, 128, 128) int16 patches: nodata-free windows of one synthetic product."""
    products = ensure_products(cache, product_config(quick))
    product = products.products[0]
    manifest = Manifest.from_yaml(BENCH.parent / "manifests" / "spectralearth.yaml")
    with rasterio.open(spectral_path(products.folder, product)) as source:
        wavelengths = tuple(float(w) for w in load_band_table(product.bands).wavelength)
        kept = list(manifest.bands.kept_bands(wavelengths))
        cube = source.read(kept)
    # Non-overlapping nodata-free windows, scanned at a 16 px step (the footprint is a rotated
    # rectangle, so windows on a fixed 128 px lattice would often clip its corners).
    nodata = (cube == NODATA_VALUE).any(axis=0)
    taken = np.zeros_like(nodata)
    clean = []
    for y in range(0, cube.shape[1] - PATCH + 1, 16):
        for x in range(0, cube.shape[2] - PATCH + 1, 16):
            window = (slice(y, y + PATCH), slice(x, x + PATCH))
            if not nodata[window].any() and not taken[window].any():
                taken[window] = True
                clean.append(cube[:, y : y + PATCH, x : x + PATCH])
    if not clean:
        raise SystemExit("the synthetic product has no nodata-free 128 x 128 window; use a larger size")
    return np.stack(clean), f"{product.scene_id} ({cube.shape[2]} x {cube.shape[1]} px, {len(kept)} bands)"


def _best_seconds(action: Any, repeats: int) -> tuple[float, float]:
    """Best CPU seconds and best wall seconds of `repeats` runs. Everything runs on this one thread,
    so CPU time is the work itself, and it holds up on a busy machine where wall time does not."""
    cpu = wall = float("inf")
    for _ in range(repeats):
        start_cpu, start_wall = time.thread_time(), time.perf_counter()
        action()
        cpu = min(cpu, time.thread_time() - start_cpu)
        wall = min(wall, time.perf_counter() - start_wall)
    return cpu, wall


def measure(patches: np.ndarray, repeats: int = 3) -> dict[str, Any]:
    """Encode and decode MB/s (one thread) and compression ratio of each choice over `patches`."""
    use_threads, numcodecs.blosc.use_threads = numcodecs.blosc.use_threads, False
    nthreads = numcodecs.blosc.set_nthreads(1)  # returns the previous count
    try:
        base = reflectance_codec(Manifest.from_dict({"name": "bench"}), patches.shape[1])
        raw = patches.nbytes
        results: dict[str, Any] = {}
        for label, cname, clevel, blocksize in CHOICES:
            codec: ChunkCodec = replace(
                base, cname=cname, clevel=clevel, blocksize=blocksize, chunk_shape=(1, *patches.shape[1:])
            )
            encoded = [encode_chunk(codec, p) for p in patches]
            stored = sum(len(e) for e in encoded if e is not None)
            for payload, patch in zip(encoded, patches, strict=True):  # lossless, or the figures mean nothing
                if not np.array_equal(decode_chunk(codec, payload)[0], patch):
                    raise AssertionError(f"{label}: a patch does not decode to itself")
            encode, encode_wall = _best_seconds(
                lambda c=codec: [encode_chunk(c, p) for p in patches], repeats
            )
            decode, decode_wall = _best_seconds(
                lambda c=codec, e=encoded: [decode_chunk(c, b) for b in e], repeats
            )
            results[label] = {
                "cname": cname,
                "clevel": clevel,
                "blocksize": blocksize,
                "shuffle": codec.shuffle,
                "encode_mb_s": round(raw / MB / encode, 1),  # by CPU time of this thread
                "decode_mb_s": round(raw / MB / decode, 1),
                "encode_mb_s_wall": round(raw / MB / encode_wall, 1),
                "decode_mb_s_wall": round(raw / MB / decode_wall, 1),
                "ratio": round(raw / stored, 3),
                "stored_mb": round(stored / MB, 2),
                "encode_ms_per_patch": round(1000 * encode / len(patches), 2),
                "decode_ms_per_patch": round(1000 * decode / len(patches), 2),
            }
    finally:
        numcodecs.blosc.use_threads = use_threads
        numcodecs.blosc.set_nthreads(nthreads)
    return {
        "patches": len(patches),
        "patch_shape": list(patches.shape[1:]),
        "raw_mb": round(raw / MB, 2),
        "threads": 1,
        "repeats": repeats,
        "codecs": results,
    }


def format_table(result: dict[str, Any]) -> str:
    header = ("codec", "encode MB/s", "decode MB/s", "ratio", "encode ms/patch", "decode ms/patch")
    rows = [
        (
            f"{label} + bitshuffle",
            f"{r['encode_mb_s']:.1f}",
            f"{r['decode_mb_s']:.1f}",
            f"{r['ratio']:.3f}",
            f"{r['encode_ms_per_patch']:.1f}",
            f"{r['decode_ms_per_patch']:.1f}",
        )
        for label, r in result["codecs"].items()
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a smaller product (fewer patches)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=BENCH / "cache")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    patches, source = realistic_patches(args.cache, args.quick)
    result = measure(patches, args.repeats) | {"source": source}
    print(f"{result['patches']} patches of {' x '.join(map(str, result['patch_shape']))} int16 from {source}")
    print(f"{result['raw_mb']} MiB raw, one thread, MB/s by its CPU time, best of {args.repeats}\n")
    print(format_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
