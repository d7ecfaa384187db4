"""Stage 9, `labels`: align label maps to the build's patches, for downstream benchmarks.

A benchmark is named in the manifest's `labels:` section (the names below are the interface):

```yaml
labels:
  cdl:
    source: s3://bucket/labels/cdl_2023.tif   # local path or s3:// URI
    kind: raster                # raster | vector
    attribute: null             # vector: the column holding the class code
    classes: null               # optional remap {source code: class}; default keeps the source codes
    resampling: nearest         # nearest | mode
    min_labelled_fraction: 0.5
    multilabel_min_fraction: null   # e.g. 0.05 for a multi-label benchmark (CORINE)
```

Label value 0 means "no label": outside the source, the source's nodata (or its mask), or a source code
that a `classes` remap leaves out. Each active patch is labelled on its own grid (its EPSG, `x_ul`,
`y_ul`, 30 m pixels, 128 x 128):

- sample points: `nearest` takes the centre of every pixel; `mode` takes an n x n lattice of points
  inside every pixel (rasters: n = ceil(2 x 30 m / source resolution), at least 3 and at most 15, so
  each source pixel is hit about twice per axis; polygons: n = 5) and keeps the majority class, ties
  to the smallest code (0, "no label", votes like any class, so a pixel mostly outside the source
  stays unlabelled);
- rasters: the points are transformed into the source CRS one by one with an exact transformer
  (`rasterio.warp.transform`, PROJ per point: no interpolated approximation), and each takes the source
  pixel that contains it (`floor` of its pixel coordinates, as GDAL's nearest neighbour does); only
  the window of the source under a patch is read, so a national map never sits in memory;
- polygons: the layer is read with a bounding-box filter (per task and UTM zone), the points are
  transformed into the layer's CRS, and each takes the polygon that covers it. Where polygons overlap,
  the smallest class code among them wins (0, an unmapped code, only when none has a class): a rule
  that does not depend on the order of the file.

Outputs (`name` is the benchmark's name):
- `dataset.zarr/labels/<name>`: uint8 (uint16 when codes may exceed 255), (patch, y, x) over every
  row of the dataset, retired rows included (they stay 0), fill 0, one patch per inner chunk and the
  shards of `quality`; attributes hold the class table, the source and the settings;
- `labels/<name>.parquet`: one row per active patch: `patch_id`, `row`, `labelled_fraction`, the class
  histogram (`class_codes`, `class_pixels`), for a multi-label benchmark `present_classes` (classes
  covering at least `multilabel_min_fraction` of the patch's labelled pixels) and `multi_hot` (over the
  class table), `included` and, when excluded, `reason`;
- `_stages/labels-<name>.json`: the stage record. A rerun with the same source (size and mtime, or
  S3 ETag), settings and dataset rows is a no-op; a changed source or setting re-labels everything;
  changed rows (appended by `write`, retired, moved) re-label only their shards.
"""

from pipeline.labels.reading import included_patches, label_array, read_label_table
from pipeline.labels.sampling import mode_reduce, remap_codes
from pipeline.labels.spec import LabelSourceError, LabelSpec, parse_labels
from pipeline.labels.stage import (
    LabelsResult,
    label_benchmark,
    print_labels_summary,
    require_dataset,
    run_labels,
)

__all__ = [
    "LabelSourceError",
    "LabelSpec",
    "LabelsResult",
    "included_patches",
    "label_array",
    "label_benchmark",
    "mode_reduce",
    "parse_labels",
    "print_labels_summary",
    "read_label_table",
    "remap_codes",
    "require_dataset",
    "run_labels",
]
