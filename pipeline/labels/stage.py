"""The `labels` stage: label every active row of the dataset, shard by shard, and record it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import zarr
from rasterio.warp import transform_bounds

from pipeline.dataset_arrays import DATASET, quiet_zarr, zarr_store
from pipeline.labels.reading import label_array, read_label_table
from pipeline.labels.sampling import (
    PatchLabels,
    exclusion_reason,
    mode_factor,
    mode_reduce,
    remap_codes,
    sample_points,
    summarise,
)
from pipeline.labels.sources import RasterSource, VectorSource, largest_code, source_version
from pipeline.labels.spec import LABELS_DIR, LabelSpec, spec_named
from pipeline.manifest import Manifest
from pipeline.stages import StaleStageError
from pipeline.storage import BuildStore, StageRecord, Stopwatch, fingerprint_of

# The stage ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rows:
    """Every row of dataset.zarr with what labelling needs (read from the arrays themselves)."""

    patch_id: np.ndarray
    epsg: np.ndarray
    x_ul: np.ndarray
    y_ul: np.ndarray
    active: np.ndarray
    patch_size: int
    pixel_size: float
    patches_per_shard: int

    def fingerprint(self) -> str:
        import hashlib

        digest = hashlib.sha256()
        for values in (self.epsg, self.x_ul, self.y_ul, self.active):
            digest.update(np.ascontiguousarray(values).tobytes())
        digest.update("\n".join(self.patch_id.tolist()).encode())
        digest.update(f"{self.patch_size}/{self.pixel_size}/{self.patches_per_shard}".encode())
        return digest.hexdigest()[:16]


def read_rows(store: BuildStore) -> Rows:
    if not store.exists(f"{DATASET}/zarr.json"):
        raise FileNotFoundError(f"{store.uri_of(DATASET)} is missing: run the write stage first")
    with quiet_zarr():
        group = zarr.open_group(zarr_store(store), mode="r", use_consolidated=False)
        names = set(group.array_keys())

        def column(name: str) -> np.ndarray:
            array = group[name]
            assert isinstance(array, zarr.Array)
            return np.asarray(array[:])

        n = int(group["quality"].shape[0])  # type: ignore[union-attr]
        quality = group["quality"]
        assert isinstance(quality, zarr.Array)
        shards = quality.shards or quality.chunks
        return Rows(
            patch_id=np.array([str(v) for v in column("patch_id").tolist()], dtype=object),
            epsg=column("epsg").astype(np.int64),
            x_ul=column("x_ul").astype(np.float64),
            y_ul=column("y_ul").astype(np.float64),
            active=column("active").astype(bool) if "active" in names else np.ones(n, dtype=bool),
            patch_size=int(quality.shape[-1]),
            pixel_size=float(str(group.attrs.get("pixel_size_m", 30.0))),
            patches_per_shard=int(shards[0]),
        )


def label_dtype(spec: LabelSpec, storage_options: Mapping[str, Any] | None) -> str:
    """uint8 when every class fits in a byte (a remap's classes, an 8-bit raster, a code column whose
    largest value is at most 255), else uint16."""
    if spec.classes:
        return "uint8" if max(v for _, v in spec.classes) <= 255 else "uint16"
    if spec.kind == "vector":
        assert spec.attribute is not None
        largest = largest_code(spec.source, spec.attribute, storage_options)
        return "uint8" if largest <= 255 else "uint16"
    source = RasterSource(spec.source)
    try:
        dtype = np.dtype(source.dataset.dtypes[0])
    finally:
        source.close()
    return "uint8" if dtype.itemsize == 1 and dtype.kind in "ui" else "uint16"


def _create_array(
    store: BuildStore, spec: LabelSpec, rows: Rows, dtype: str, attributes: dict[str, Any]
) -> None:
    with quiet_zarr():
        root = zarr.open_group(zarr_store(store), mode="r+", use_consolidated=False)
        quality = root["quality"]
        assert isinstance(quality, zarr.Array)
        group = root.require_group(LABELS_DIR)
        size = rows.patch_size
        group.create_array(
            spec.name,
            shape=(len(rows.patch_id), size, size),
            chunks=(1, size, size),
            shards=(rows.patches_per_shard, size, size),
            dtype=dtype,
            fill_value=0,
            compressors=quality.compressors,
            dimension_names=("patch", "y", "x"),
            attributes=attributes,
            overwrite=True,
        )


@dataclass(frozen=True, slots=True)
class ShardTask:
    shard: int
    start: int
    stop: int


def label_patch(
    source: Any,
    epsg: int,
    x_ul: float,
    y_ul: float,
    rows: Rows,
    factor: int,
    classes: Sequence[tuple[int, int]],
) -> np.ndarray | None:
    """One patch's labels (size x size int64), or None when the source has nothing under it."""
    xs, ys = sample_points(x_ul, y_ul, rows.pixel_size, rows.patch_size, factor)
    values = source.sample(epsg, xs, ys)
    if values is None:
        return None
    codes = values if isinstance(source, VectorSource) else remap_codes(values, classes)
    return mode_reduce(codes, factor)


def _open_source(spec: LabelSpec, storage_options: Mapping[str, Any] | None) -> Any:
    if spec.kind == "raster":
        return RasterSource(spec.source)
    assert spec.attribute is not None
    return VectorSource(spec.source, spec.attribute, spec.classes, storage_options)


def _patch_bbox_in(
    crs_wkt: str, epsg: int, xs: Sequence[float], ys: Sequence[float], extent: float
) -> tuple[float, float, float, float]:
    """Bounding box in the layer's CRS of patches (upper-left corners, side `extent`), with margin."""
    left, right = min(xs), max(xs) + extent
    top, bottom = max(ys), min(ys) - extent
    box = transform_bounds(f"EPSG:{epsg}", crs_wkt, left, bottom, right, top, densify_pts=21)
    pad = 1e-6 * max(abs(v) for v in box) + 1e-9
    return (box[0] - pad, box[1] - pad, box[2] + pad, box[3] + pad)


def shard_task(
    task: ShardTask,
    spec: LabelSpec,
    rows: Rows,
    build_uri: str,
    factor: int,
    storage_options: dict[str, Any] | None,
) -> list[PatchLabels]:
    """Label the active rows of one shard and write the shard whole (one writer per shard)."""
    store = BuildStore(build_uri, storage_options or {})
    size = rows.patch_size
    source = _open_source(spec, storage_options)
    results: list[PatchLabels] = []
    try:
        block = np.zeros((task.stop - task.start, size, size), dtype=np.int64)
        active = [r for r in range(task.start, task.stop) if rows.active[r]]
        if isinstance(source, VectorSource):
            by_zone: dict[int, list[int]] = {}
            for r in active:
                by_zone.setdefault(int(rows.epsg[r]), []).append(r)
            zones = list(by_zone.items())
        else:
            zones = [(0, active)]
        for epsg_of_zone, members in zones:
            if isinstance(source, VectorSource) and members:
                extent = rows.pixel_size * size
                source.prepare(
                    _patch_bbox_in(
                        source.crs_wkt,
                        epsg_of_zone,
                        rows.x_ul[members].tolist(),
                        rows.y_ul[members].tolist(),
                        extent,
                    )
                )
            for r in members:
                labels = label_patch(
                    source,
                    int(rows.epsg[r]),
                    float(rows.x_ul[r]),
                    float(rows.y_ul[r]),
                    rows,
                    factor,
                    spec.classes,
                )
                if labels is not None:
                    block[r - task.start] = labels
                results.append(summarise(r, str(rows.patch_id[r]), labels, spec.multilabel_min_fraction))
    finally:
        source.close()
    with quiet_zarr():
        group = zarr.open_group(zarr_store(store), mode="r+", use_consolidated=False)
        array = group[spec.array_path]
        assert isinstance(array, zarr.Array)
        array[task.start : task.stop] = block.astype(array.dtype)
    return results


TABLE_SCHEMA = pa.schema(
    [
        ("patch_id", pa.string()),
        ("row", pa.int64()),
        ("epsg", pa.int32()),
        ("x_ul", pa.float64()),
        ("y_ul", pa.float64()),
        ("labelled_fraction", pa.float64()),
        ("class_codes", pa.list_(pa.int32())),
        ("class_pixels", pa.list_(pa.int64())),
        ("present_classes", pa.list_(pa.int32())),
        ("multi_hot", pa.list_(pa.uint8())),
        ("included", pa.bool_()),
        ("reason", pa.string()),
    ]
)


def class_table(spec: LabelSpec, results: Sequence[PatchLabels]) -> list[int]:
    """The benchmark's classes (0 excluded): a remap's classes, else every code seen under the patches."""
    if spec.classes:
        return sorted({v for _, v in spec.classes} - {0})
    return sorted({c for r in results for c in r.class_codes})


def results_table(
    spec: LabelSpec, results: Sequence[PatchLabels], classes: Sequence[int], rows: Rows
) -> pa.Table:
    position = {c: k for k, c in enumerate(classes)}
    ordered = sorted(results, key=lambda r: r.patch_id)
    reasons = [exclusion_reason(r, spec.min_labelled_fraction) for r in ordered]
    multi_hot: list[list[int] | None] = []
    for r in ordered:
        if spec.multilabel:
            vector = [0] * len(classes)
            for c in r.present_classes:
                vector[position[c]] = 1
            multi_hot.append(vector)
        else:
            multi_hot.append(None)
    return pa.table(
        {
            "patch_id": [r.patch_id for r in ordered],
            "row": [r.row for r in ordered],
            "epsg": [int(rows.epsg[r.row]) for r in ordered],
            "x_ul": [float(rows.x_ul[r.row]) for r in ordered],
            "y_ul": [float(rows.y_ul[r.row]) for r in ordered],
            "labelled_fraction": [r.labelled_fraction for r in ordered],
            "class_codes": [list(r.class_codes) for r in ordered],
            "class_pixels": [list(r.class_pixels) for r in ordered],
            "present_classes": [list(r.present_classes) if spec.multilabel else None for r in ordered],
            "multi_hot": multi_hot,
            "included": [reason is None for reason in reasons],
            "reason": reasons,
        },
        schema=TABLE_SCHEMA,
    )


def _set_attributes_and_consolidate(store: BuildStore, spec: LabelSpec, attributes: dict[str, Any]) -> None:
    with quiet_zarr():
        group = zarr.open_group(zarr_store(store), mode="r+", use_consolidated=False)
        array = group[spec.array_path]
        assert isinstance(array, zarr.Array)
        array.attrs.update(attributes)
        zarr.consolidate_metadata(zarr_store(store))


@dataclass(frozen=True, slots=True)
class LabelsResult:
    name: str
    skipped: bool
    counts: dict[str, Any]


def reusable_shards(
    store: BuildStore,
    spec: LabelSpec,
    rows: Rows,
    record: Mapping[str, Any] | None,
    config_hash: str,
    version: Mapping[str, Any],
    dtype: str,
) -> tuple[set[int], list[PatchLabels]]:
    """Shards whose stored labels still stand, and their table rows: same settings, same source bytes,
    same array layout, and every row of the shard holds the same patch on the same grid as when it was
    labelled (an appended row, a retired row or a moved patch makes its shard be labelled again). This
    is what keeps a rerun after `write` grew the dataset from re-labelling everything."""
    if (
        record is None
        or record.get("config_hash") != config_hash
        or (record.get("counts") or {}).get("source_version") != dict(version)
        or not store.exists(spec.table_path)
        or not store.exists(f"{DATASET}/{spec.array_path}/zarr.json")
    ):
        return set(), []
    try:
        array = label_array(store, spec.name)
        table = read_label_table(store, spec.name)
    except (FileNotFoundError, KeyError, ValueError):
        return set(), []
    size, per_shard, n = rows.patch_size, rows.patches_per_shard, len(rows.patch_id)
    if (
        array.dtype != np.dtype(dtype)
        or tuple(array.shape[1:]) != (size, size)
        or (array.shards or array.chunks)[0] != per_shard
        or array.shape[0] > n
        or not {"epsg", "x_ul", "y_ul"} <= set(table.columns)
    ):
        return set(), []
    before = {
        int(r): (str(p), int(e), float(x), float(y))
        for r, p, e, x, y in zip(
            table["row"], table["patch_id"], table["epsg"], table["x_ul"], table["y_ul"], strict=True
        )
    }
    kept: set[int] = set()
    for shard, start in enumerate(range(0, n, per_shard)):
        stop = min(n, start + per_shard)
        if all(
            before.get(r)
            == (str(rows.patch_id[r]), int(rows.epsg[r]), float(rows.x_ul[r]), float(rows.y_ul[r]))
            if rows.active[r]
            else r not in before
            for r in range(start, stop)
        ):
            kept.add(shard)
    reused = [
        PatchLabels(
            int(entry.row),
            str(entry.patch_id),
            float(entry.labelled_fraction),
            tuple(int(c) for c in entry.class_codes),
            tuple(int(p) for p in entry.class_pixels),
            tuple(int(c) for c in entry.present_classes) if entry.present_classes is not None else (),
            entry.reason == "outside the label source",
        )
        for entry in table.itertuples(index=False)
        if int(entry.row) // per_shard in kept
    ]
    return kept, reused


def _grow_array(store: BuildStore, spec: LabelSpec, rows: Rows, attributes: dict[str, Any]) -> None:
    """Keep the stored labels: resize the array to the dataset's rows (new rows read 0)."""
    array = label_array(store, spec.name, writable=True)
    n = len(rows.patch_id)
    if array.shape[0] != n:
        array.resize((n, *array.shape[1:]))
    array.attrs.update(attributes)


def require_dataset(manifest: Manifest, store: BuildStore) -> None:

    record = store.read_stage_record("write")
    if record is None:
        raise StaleStageError("labels needs the write stage first: run `spectralearth write` (or `run`)")
    if record["config_hash"] != manifest.stage_hash("write"):
        raise StaleStageError(
            f"the dataset in {store.uri} was written with other manifest settings than {manifest.source}: "
            "rerun the build first"
        )


def run_labels(
    manifest: Manifest,
    store: BuildStore,
    scheduler: Any,
    storage_options: dict[str, Any] | None = None,
    force: bool = False,
    name: str | None = None,
) -> list[LabelsResult]:
    """Label every benchmark of the manifest (or the one named); each skips when up to date."""
    require_dataset(manifest, store)
    return [
        label_benchmark(spec, store, scheduler, storage_options, force) for spec in spec_named(manifest, name)
    ]


def label_benchmark(
    spec: LabelSpec,
    store: BuildStore,
    scheduler: Any,
    storage_options: dict[str, Any] | None = None,
    force: bool = False,
) -> LabelsResult:
    watch = Stopwatch()
    rows = read_rows(store)
    version = source_version(spec.source, storage_options)
    config_hash = fingerprint_of({"settings": spec.settings()})
    input_fingerprint = fingerprint_of({"source": version, "rows": rows.fingerprint()})
    outputs = (spec.table_path, f"{DATASET}/{spec.array_path}/zarr.json")
    previous = store.up_to_date(spec.stage, config_hash, input_fingerprint, outputs, force)
    if previous is not None:
        return LabelsResult(spec.name, True, previous["counts"])
    probe = _open_source(spec, storage_options)  # a bad source stops here, before anything is written
    resolution = probe.resolution if isinstance(probe, RasterSource) else 0.0  # polygons: none
    probe.close()
    dtype = label_dtype(spec, storage_options)
    factor = mode_factor(resolution, rows.pixel_size) if spec.resampling == "mode" else 1
    base_attributes = {
        "long_name": f"{spec.name} labels (0: no label)",
        "source": version["uri"],
        "source_version": version,
        "settings": spec.settings(),
        "samples_per_pixel_side": factor,
        "pixel_size_m": rows.pixel_size,
        "coordinates": "patch_id location_id scene_id time epsg x_ul y_ul active",
    }
    record = None if force else store.read_stage_record(spec.stage)
    kept, reused = reusable_shards(store, spec, rows, record, config_hash, version, dtype)
    if kept:
        _grow_array(store, spec, rows, base_attributes)
    else:
        _create_array(store, spec, rows, dtype, base_attributes)
    watch.lap("prepare")
    per_shard = rows.patches_per_shard
    n = len(rows.patch_id)
    # A kept array's other shards are rewritten whole (a row may have been retired); a new array's
    # shards without active rows stay the fill.
    tasks = [
        ShardTask(k, start, min(n, start + per_shard))
        for k, start in enumerate(range(0, n, per_shard))
        if k not in kept and (bool(kept) or rows.active[start : min(n, start + per_shard)].any())
    ]
    outcome = scheduler.map(
        shard_task, tasks, spec, rows, store.uri, factor, storage_options, label=f"labels {spec.name}"
    )
    results = reused + [r for shard in outcome for r in shard]
    watch.lap("label")
    classes = class_table(spec, results)
    table = results_table(spec, results, classes, rows)
    store.write_table(spec.table_path, table)
    _set_attributes_and_consolidate(
        store,
        spec,
        base_attributes
        | {
            "flag_values": classes,
            "class_codes": classes,
            "multilabel": spec.multilabel,
            "table": spec.table_path,
        },
    )
    watch.lap("outputs")
    counts = stage_counts(results, table, len(classes), dtype) | {
        "shards_labelled": len(tasks),
        "shards_reused": len(kept),
        "source_version": version,
    }
    store.write_stage_record(StageRecord(spec.stage, config_hash, input_fingerprint, counts, watch.timings))
    return LabelsResult(spec.name, False, counts)


def stage_counts(
    results: Sequence[PatchLabels], table: pa.Table, n_classes: int, dtype: str
) -> dict[str, Any]:
    """What the stage record counts: patches, included, excluded by reason, and the class histogram of
    the included patches (pixels per class)."""
    included = table.column("included").to_pylist()
    reasons: dict[str, int] = {}
    for reason in table.column("reason").to_pylist():
        if reason is not None:
            key = "outside the label source" if reason.startswith("outside") else "labelled fraction too low"
            reasons[key] = reasons.get(key, 0) + 1
    histogram: dict[int, int] = {}
    for r, keep in zip(sorted(results, key=lambda r: r.patch_id), included, strict=True):
        if keep:
            for c, p in zip(r.class_codes, r.class_pixels, strict=True):
                histogram[c] = histogram.get(c, 0) + p
    return {
        "patches": len(results),
        "included": int(sum(included)),
        "excluded": reasons,
        "classes": n_classes,
        "dtype": dtype,
        "histogram": {str(c): histogram[c] for c in sorted(histogram)},
    }


def histogram_lines(counts: Mapping[str, Any], width: int = 40) -> list[str]:
    """The class histogram of a stage record's counts, one line per class with its share of labelled
    pixels of the included patches."""
    histogram = {int(k): int(v) for k, v in (counts.get("histogram") or {}).items()}
    total = sum(histogram.values())
    lines = []
    for code in sorted(histogram):
        share = histogram[code] / total if total else 0.0
        lines.append(f"  class {code:>5d}: {share * 100:5.1f} %  {'#' * round(share * width)}")
    return lines


def print_labels_summary(result: LabelsResult) -> None:
    counts = result.counts
    excluded = counts.get("excluded") or {}
    reasons = ", ".join(f"{n} {why}" for why, n in sorted(excluded.items())) or "none"
    state = " (up to date)" if result.skipped else ""
    print(
        f"labels {result.name}{state}: {counts.get('patches', 0)} patches, {counts.get('included', 0)} "
        f"included (excluded: {reasons}); {counts.get('classes', 0)} classes, {counts.get('dtype')}"
    )
    for line in histogram_lines(counts):
        print(line)
