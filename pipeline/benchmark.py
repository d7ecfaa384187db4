"""`export-benchmark`: write one benchmark of a build in the layout the SpectralEarth authors' loaders read.

The authors' dataset classes (github AABNassim/spectral_earth, `src/datasets/enmap_cdl_nlcd.py` and
siblings) read, under a root folder:

- `enmap/<location 7 digits>/<scene 5 digits>.tif`: the image, B x 128 x 128 int16 (our release
  GeoTIFF export, `pipeline.export.export_geotiffs`);
- `<name>/<same path>`: one band of class codes on the same grid (the source's codes, or the classes
  of the manifest's remap; 0 = no label);
- `data/splits/enmap_<name>/{train,val,test}.txt`: one `<location>/<scene>.tif` per line. Their code
  opens these relative to the working directory, so run it from the export folder (or copy `data/`).

Splits: `random` (default, as the paper: the benchmark's patches sorted by id, shuffled by a seeded
generator, cut into 75 % / 10 % / 15 %, sizes rounded down for train and validation) or `blocked`
(`pipeline.splits.blocked_split` over the patches' locations, same fractions: no location and no
neighbourhood spans two splits; locations in the buffer between splits are left out of every file).
A multi-label benchmark also gets `<name>_multi_hot.csv` (path, then one 0/1 column per class code).
`benchmark-<name>.json` records what was exported and how.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio

from pipeline.dedup import INDEX_LOCATIONS, INDEX_PATCHES
from pipeline.enmap.synth.labels import regions_of, write_label_sources
from pipeline.export import ReleaseNumbers, export_geotiffs, rows_of
from pipeline.labels import (
    label_array,
    label_benchmark,
    print_labels_summary,
    read_label_table,
    require_dataset,
)
from pipeline.splits import BUFFER, blocked_split, cross_zone_contacts
from pipeline.storage import BuildStore

PAPER_FRACTIONS = (0.75, 0.10, 0.15)
SPLIT_FILES = {"train": "train", "validation": "val", "test": "test"}


class BenchmarkError(ValueError):
    """A benchmark that cannot be exported as asked (one line)."""


@dataclass(frozen=True, slots=True)
class BenchmarkExport:
    """What `export_benchmark` wrote."""

    name: str
    out_dir: Path
    patches: int
    splits: dict[str, int]  # train, val, test (and buffer: left out)
    multi_hot: Path | None
    class_codes: tuple[int, ...]


def paper_random_split(paths: Sequence[str], seed: int) -> dict[str, list[str]]:
    """The paper's random split of sorted `paths`: shuffle with a seeded generator, then cut at
    floor(75 %) and floor(10 %); the test split takes the rest."""
    ordered = sorted(paths)
    order = np.random.default_rng(seed).permutation(len(ordered))
    n_train = int(PAPER_FRACTIONS[0] * len(ordered))
    n_val = int(PAPER_FRACTIONS[1] * len(ordered))
    picked = [ordered[k] for k in order.tolist()]
    return {
        "train": sorted(picked[:n_train]),
        "val": sorted(picked[n_train : n_train + n_val]),
        "test": sorted(picked[n_train + n_val :]),
    }


def _blocked(store: BuildStore, location_of: dict[str, str], seed: int, block_cells: int) -> dict[str, str]:
    """patch id -> train / val / test / buffer, from the blocked split of the patches' locations."""
    locations = store.read_geodataframe(INDEX_LOCATIONS)
    wanted = set(location_of.values())
    ids = [str(x) for x in locations["location_id"]]
    links = {
        str(lid): [str(x) for x in (linked if linked is not None else ())]
        for lid, linked in zip(locations["location_id"], locations["neighbour_zone_overlaps"], strict=True)
    }
    contacts = cross_zone_contacts(ids, locations["epsg"].to_numpy(), locations.geometry.to_numpy())
    by_location = blocked_split(
        [lid for lid in ids if lid in wanted], PAPER_FRACTIONS, seed, block_cells, links, contacts
    )
    return {pid: SPLIT_FILES.get(by_location[loc], BUFFER) for pid, loc in location_of.items()}


def _write_mask(path: Path, labels: np.ndarray, epsg: int, x_ul: float, y_ul: float, pixel: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {
        "driver": "GTiff",
        "dtype": str(labels.dtype),
        "count": 1,
        "width": labels.shape[1],
        "height": labels.shape[0],
        "crs": f"EPSG:{epsg}",
        "transform": rasterio.Affine(pixel, 0.0, x_ul, 0.0, -pixel, y_ul),
        "nodata": 0,
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(labels, 1)


def _split_parts(
    store: BuildStore,
    relative: dict[str, str],
    locations: dict[str, str],
    split: str,
    seed: int,
    block_cells: int,
) -> dict[str, list[str]]:
    """The image paths of each split part: the paper's random split, or spatial blocks with a buffer."""
    if split == "random":
        return paper_random_split(list(relative.values()), seed)
    assignment = _blocked(store, locations, seed, block_cells)
    return {
        part: sorted(path for pid, path in relative.items() if assignment[pid] == part)
        for part in ("train", "val", "test", BUFFER)
    }


def _write_multi_hot(path: Path, chosen: Any, relative: dict[str, str], class_codes: tuple[int, ...]) -> None:
    """`<name>_multi_hot.csv`: one row per image path, one column per class of the class table."""
    by_id = chosen.set_index("patch_id")
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", *class_codes])
        for pid, rel in relative.items():
            writer.writerow([rel, *[int(v) for v in by_id.loc[pid, "multi_hot"]]])


def export_benchmark(
    store: BuildStore,
    name: str,
    out_dir: str | Path,
    split: str = "random",
    seed: int = 0,
    block_cells: int = 8,
) -> BenchmarkExport:
    """Write benchmark `name` (made by the labels stage) under `out_dir` in the authors' layout."""
    if split not in ("random", "blocked"):
        raise BenchmarkError(f"--split must be 'random' or 'blocked', got {split!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise BenchmarkError(f"--seed must be a non-negative integer, got {seed!r}")
    table = read_label_table(store, name)
    chosen = table[table["included"]].sort_values("patch_id")
    patch_ids = [str(p) for p in chosen["patch_id"]]
    if not patch_ids:
        raise BenchmarkError(
            f"benchmark {name!r} has no included patch (see {store.uri_of(f'labels/{name}.parquet')})"
        )
    out = Path(out_dir)
    index = store.read_geodataframe(INDEX_PATCHES)
    numbers = ReleaseNumbers.of(index)
    meta = index.set_index("patch_id")
    relative = {
        pid: numbers.relative_path(meta.loc[pid, "location_id"], meta.loc[pid, "scene_id"]).removeprefix(
            "enmap/"
        )
        for pid in patch_ids
    }
    export_geotiffs(store, patch_ids, out)
    array = label_array(store, name)
    pixel = float(str(array.attrs.get("pixel_size_m", 30.0)))
    for pid, row in zip(patch_ids, rows_of(store, patch_ids, index), strict=True):
        entry = meta.loc[pid]
        _write_mask(
            out / name / relative[pid],
            np.asarray(array[row]),
            int(entry["epsg"]),
            float(entry["x_ul"]),
            float(entry["y_ul"]),
            pixel,
        )
    locations = {pid: str(meta.loc[pid, "location_id"]) for pid in patch_ids}
    parts = _split_parts(store, relative, locations, split, seed, block_cells)
    split_dir = out / "data" / "splits" / f"enmap_{name}"
    split_dir.mkdir(parents=True, exist_ok=True)
    for part in ("train", "val", "test"):
        (split_dir / f"{part}.txt").write_text("".join(f"{line}\n" for line in parts[part]))
    class_codes = tuple(int(c) for c in array.attrs.get("class_codes", []))
    multi_hot_path = None
    if bool(array.attrs.get("multilabel", False)):
        multi_hot_path = out / f"{name}_multi_hot.csv"
        _write_multi_hot(multi_hot_path, chosen, relative, class_codes)
    counts = {part: len(lines) for part, lines in parts.items()}
    record: dict[str, Any] = {
        "name": name,
        "build": store.uri,
        "source": array.attrs.get("source"),
        "settings": array.attrs.get("settings"),
        "class_codes": list(class_codes),
        "split": {
            "kind": split,
            "seed": seed,
            "fractions": list(PAPER_FRACTIONS),
            "block_cells": block_cells if split == "blocked" else None,
        },
        "patches": len(patch_ids),
        "split_counts": counts,
        "files": {
            "images": "enmap/<location>/<scene>.tif",
            "labels": f"{name}/<location>/<scene>.tif",
            "splits": f"data/splits/enmap_{name}/{{train,val,test}}.txt",
            "multi_hot": multi_hot_path.name if multi_hot_path else None,
        },
    }
    (out / f"benchmark-{name}.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    return BenchmarkExport(name, out, len(patch_ids), counts, multi_hot_path, class_codes)


SYNTHETIC_SOURCES = ("crops_aea30.tif", "landcover_laea100.tif", "parcels.parquet", "parcels.gpkg")


def demo_benchmarks(context: Any, products_dir: str, seed: int = 0) -> list[BenchmarkExport]:
    """`make demo`'s benchmarks: synthetic label sources over the build's patches (written once under
    `<products>/labels/`), then every benchmark of the manifest whose source file is one of them is
    labelled (its `source` read from there), its class histogram printed, and exported to
    `<build>-benchmark/` (local builds)."""
    from dataclasses import replace

    store, manifest = context.store, context.manifest
    specs = [s for s in manifest.labels if Path(s.source).name in SYNTHETIC_SOURCES]
    if not specs:
        return []
    require_dataset(manifest, store)
    index = store.read_geodataframe(INDEX_PATCHES)
    if not len(index):
        print("benchmarks: the build holds no patch, nothing to label")
        return []
    regions = regions_of([list(g.exterior.coords) for g in index.geometry])
    folder = Path(products_dir) / "labels"
    truth = folder / "truth.json"
    previous = json.loads(truth.read_text()) if truth.exists() else {}
    if previous.get("seed") != seed or previous.get("regions") != [list(r) for r in regions]:
        write_label_sources(folder, regions, seed)  # rewritten only when the patches moved
    exports = []
    for spec in specs:
        local = replace(spec, source=str(folder / Path(spec.source).name))
        result = label_benchmark(local, store, context.scheduler, context.storage_options)
        print()
        print_labels_summary(result)
        if not store.is_local or not result.counts.get("included"):
            continue
        out = Path(f"{store.uri.rstrip('/')}-benchmark")
        written = export_benchmark(store, spec.name, out, seed=seed)
        counts = ", ".join(f"{part} {n}" for part, n in written.splits.items())
        print(f"export-benchmark {spec.name}: {written.patches} patches to {out} ({counts})")
        exports.append(written)
    return exports
