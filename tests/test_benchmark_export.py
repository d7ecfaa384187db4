"""`export-benchmark` read back the way the SpectralEarth authors' loaders read it, `PatchDataset(labels=)`
and `query --labels`."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
import zarr
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from pipeline import stages, tables
from pipeline.benchmark import BenchmarkError, export_benchmark, paper_random_split
from pipeline.cli import main
from pipeline.enmap.synth import generate
from pipeline.enmap.synth.labels import regions_of, write_label_sources
from pipeline.labels import included_patches, label_array, read_label_table, run_labels
from pipeline.loader import PatchDataset, PatchSample
from pipeline.manifest import Manifest
from pipeline.scheduler import Scheduler
from pipeline.storage import BuildStore
from tests.helpers import read_array, two_sites_twice, zarr_array

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

SMALL = two_sites_twice(5, packagings=("folder",), formats=("GTiff",))


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("benchmark")
    generate(root / "products", SMALL)
    raw = yaml.safe_load((REPO / "manifests" / "demo.yaml").read_text())
    store = BuildStore(str(root / "build"))
    scheduler = Scheduler("synchronous", progress=False)
    manifest = Manifest.from_dict({k: v for k, v in raw.items() if k != "labels"})
    for name in stages.ORDER:
        stages.run_stage(name, manifest, store, scheduler, inputs=[str(root / "products")])
    index = store.read_geodataframe(tables.INDEX_PATCHES)
    write_label_sources(
        root / "sources", regions_of([list(g.exterior.coords) for g in index.geometry]), seed=4
    )
    raw["labels"] = {
        "cdl": {"source": str(root / "sources" / "crops_aea30.tif"), "resampling": "mode"},
        "corine": {
            "source": str(root / "sources" / "landcover_laea100.tif"),
            "multilabel_min_fraction": 0.05,
            "min_labelled_fraction": 0.2,
        },
    }
    (root / "manifest.yaml").write_text(yaml.safe_dump(raw))
    run_labels(Manifest.from_dict(raw), store, scheduler)
    return {"root": root, "store": store, "index": index, "manifest_path": root / "manifest.yaml"}


class AuthorsLoaderStandIn:
    """The file handling of the authors' `EnMAPCDLNLCDDataset` (AABNassim/spectral_earth,
    src/datasets/enmap_cdl_nlcd.py), without torch: the split file `data/splits/{sensor}_{product}/
    {split}.txt` opened relative to the working directory; image `root/{sensor}/<line>` read whole as
    float (their `torch.from_numpy(src.read()).float()`), mask `root/{product}/<line>` read whole as
    int64 (`.long()`), then mapped through their ordinal map: the chosen classes to 0..K-1 in order, 0
    (background) last, every other code to the background."""

    split_path = "data/splits/{}_{}/{}.txt"

    def __init__(
        self, root: str, product: str, split: str, classes: list[int], sensor: str = "enmap"
    ) -> None:
        assert product in ("cdl", "nlcd") and split in ("train", "val", "test") and 0 in classes
        self.root, self.product, self.sensor = root, product, sensor
        split_file = self.split_path.format(sensor, product, split)
        if not os.path.exists(split_file):
            raise ValueError(f"Split file {split_file} not found.")
        with open(split_file) as handle:
            ids = [line.strip() for line in handle.readlines()]
        self.samples = [(os.path.join(root, sensor, i), os.path.join(root, product, i)) for i in ids]
        ordered = [c for c in classes if c != 0] + [0]
        self.ordinal_map = np.zeros(256, dtype=np.int64) + len(ordered) - 1
        for value, code in enumerate(ordered):
            self.ordinal_map[code] = value

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        image_path, mask_path = self.samples[index]
        with rasterio.open(image_path) as src:
            image = src.read().astype(np.float32)
        with rasterio.open(mask_path) as src:
            mask = src.read().astype(np.int64)
        return {"image": image, "mask": self.ordinal_map[mask], "raw_mask": mask}


@pytest.fixture(scope="module")
def exported(build: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export")
    export_benchmark(build["store"], "cdl", out, split="random", seed=0)
    return out


def test_the_authors_loader_reads_the_export(
    build: dict, exported: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = build["store"]
    monkeypatch.chdir(exported)  # their split paths are relative to the working directory
    classes = [0, *label_array(store, "cdl").attrs["class_codes"]]
    group = zarr.open_group(store.path("dataset.zarr"), mode="r")
    reflectance, labels = zarr_array(group, "reflectance"), label_array(store, "cdl")
    patch_ids = read_array(group, "patch_id").tolist()
    seen = []
    for split in ("train", "val", "test"):
        dataset = AuthorsLoaderStandIn(str(exported), "cdl", split, list(classes))
        for k in range(len(dataset)):
            sample = dataset[k]
            assert sample["image"].shape == (202, 128, 128) and sample["image"].dtype == np.float32
            assert sample["mask"].shape == (1, 128, 128) and sample["mask"].dtype == np.int64
            with rasterio.open(dataset.samples[k][0]) as image:
                patch_id = image.tags()["patch_id"]
                image_grid = (image.crs, image.transform)
            with rasterio.open(dataset.samples[k][1]) as mask:
                assert (mask.crs, mask.transform) == image_grid and mask.count == 1
            row = patch_ids.index(patch_id)
            assert np.array_equal(sample["image"], np.asarray(reflectance[row]).astype(np.float32))
            assert np.array_equal(sample["raw_mask"][0], np.asarray(labels[row]))
            # every labelled pixel maps to a foreground class, no label to the background (last)
            assert ((sample["mask"][0] == len(classes) - 1) == (sample["raw_mask"][0] == 0)).all()
            seen.append(patch_id)
    assert sorted(seen) == included_patches(store, "cdl")


def test_random_split_follows_the_paper(build: dict, exported: Path, tmp_path: Path) -> None:
    n = len(included_patches(build["store"], "cdl"))
    lines = {
        part: (exported / "data" / "splits" / "enmap_cdl" / f"{part}.txt").read_text().splitlines()
        for part in ("train", "val", "test")
    }
    assert [len(lines["train"]), len(lines["val"])] == [int(0.75 * n), int(0.10 * n)]
    assert sum(len(v) for v in lines.values()) == n == len(set().union(*map(set, lines.values())))
    again = tmp_path / "again"
    export_benchmark(build["store"], "cdl", again, seed=0)
    assert (again / "data/splits/enmap_cdl/train.txt").read_text() == "\n".join(lines["train"]) + "\n"


def test_blocked_split_keeps_each_location_in_one_split(build: dict, tmp_path: Path) -> None:
    written = export_benchmark(build["store"], "corine", tmp_path, split="blocked", seed=3)
    split_dir = tmp_path / "data" / "splits" / "enmap_corine"
    where: dict[str, str] = {}
    listed = 0
    for part in ("train", "val", "test"):
        for line in (split_dir / f"{part}.txt").read_text().splitlines():
            location = line.split("/")[0]
            assert where.setdefault(location, part) == part, f"location {location} in two splits"
            listed += 1
    assert listed + written.splits.get("buffer", 0) == written.patches


def test_multilabel_export_has_a_multi_hot_table(build: dict, tmp_path: Path) -> None:
    written = export_benchmark(build["store"], "corine", tmp_path)
    assert written.multi_hot is not None
    table = read_label_table(build["store"], "corine").set_index("patch_id")
    with written.multi_hot.open() as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["path", *[str(c) for c in written.class_codes]]
    assert len(rows) - 1 == written.patches
    for line in rows[1:]:
        with rasterio.open(tmp_path / "enmap" / line[0]) as image:
            patch_id = image.tags()["patch_id"]
        assert [int(v) for v in line[1:]] == list(table.loc[patch_id, "multi_hot"])
        with rasterio.open(tmp_path / "corine" / line[0]) as mask:
            assert mask.dtypes[0] == "uint16"
    single = export_benchmark(build["store"], "cdl", tmp_path / "single")
    assert single.multi_hot is None


def test_patch_dataset_returns_labels(build: dict) -> None:
    store = build["store"]
    dataset = PatchDataset(store, labels="cdl")
    labels = label_array(store, "cdl")
    assert dataset.patch_ids == included_patches(store, "cdl")
    for k in range(len(dataset)):
        sample = dataset[k]
        assert isinstance(sample, PatchSample)
        assert sample.label is not None and np.array_equal(sample.label, np.asarray(labels[sample.row]))
    unlabelled = PatchDataset(store)[0]
    assert isinstance(unlabelled, PatchSample) and unlabelled.label is None
    with pytest.raises(FileNotFoundError, match="labels"):
        PatchDataset(store, patch_ids=dataset.patch_ids[:1], labels="nope")


def test_cli_labels_query_and_export(build: dict, tmp_path: Path) -> None:
    runner = CliRunner()
    store = build["store"]
    args = ["--manifest", str(build["manifest_path"]), "--build", store.uri, "--scheduler", "synchronous"]
    result = runner.invoke(main, ["labels", *args, "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "labels cdl (up to date)" in result.output and "class" in result.output
    result = runner.invoke(main, ["query", "--build", store.uri, "--labels", "cdl"])
    assert result.exit_code == 0, result.output
    printed = [line for line in result.output.splitlines() if line.startswith("EPSG")]
    assert sorted(printed) == included_patches(store, "cdl")
    result = runner.invoke(
        main, ["export-benchmark", "--build", store.uri, "--labels", "cdl", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "data" / "splits" / "enmap_cdl" / "train.txt").exists()
    result = runner.invoke(
        main, ["export-benchmark", "--build", store.uri, "--labels", "nope", "--out", str(tmp_path)]
    )
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "run `spectralearth labels` first" in result.output


def test_export_refuses_bad_arguments(build: dict, tmp_path: Path) -> None:
    with pytest.raises(BenchmarkError):
        export_benchmark(build["store"], "cdl", tmp_path, split="spatial")
    with pytest.raises(BenchmarkError):
        export_benchmark(build["store"], "cdl", tmp_path, seed=-1)


@given(
    st.lists(st.text("0123456789/", min_size=1, max_size=8), unique=True, max_size=60), st.integers(0, 10**6)
)
def test_paper_random_split_partitions_with_the_paper_sizes(paths: list[str], seed: int) -> None:
    parts = paper_random_split(paths, seed)
    assert len(parts["train"]) == int(0.75 * len(paths)) and len(parts["val"]) == int(0.10 * len(paths))
    assert sorted(parts["train"] + parts["val"] + parts["test"]) == sorted(paths)
    assert parts == paper_random_split(list(reversed(paths)), seed)


def test_report_quicklooks_show_the_first_benchmark(build: dict) -> None:
    from pipeline.html_report.data import load_report_data
    from pipeline.html_report.figures import sample_png

    store = build["store"]
    data = load_report_data(store, max_samples=3)
    labels = label_array(store, "cdl")  # "cdl" sorts before "corine"
    rows = dict(zip(build["index"]["patch_id"], build["index"]["row"], strict=True))
    assert data.samples
    for sample in data.samples:
        assert sample.label_name == "cdl"
        assert sample.label is not None
        assert np.array_equal(sample.label, np.asarray(labels[int(rows[sample.patch_id])]))
        assert sample_png(sample)[:8] == b"\x89PNG\r\n\x1a\n"
