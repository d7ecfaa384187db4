"""Few, large requests on object storage: a whole build from s3:// products in every packaging (folder
GeoTIFF, ZIP with stored and with deflated members, DLR tar.gz, the ARD COG naming, ENVI BSQ and BIL)
fetches each product in a handful of large ranged GETs per reading stage (inventory, mask), counted at a
proxy in front of moto whichever library made them, and gives the same dataset as the local build of
the same products. The build location is on S3 too: every object of it goes up whole (one PUT each).

`inventory` reads a remote folder or ZIP in place, in aligned blocks of the part size (a ZIP's
directory, METADATA.XML, each raster's header): on products several blocks large it transfers a fraction
of each (`test_inventory_reads_remote_products_in_place_in_a_few_blocks`); only `mask` reads the cubes.
A tar.gz is streamed once by inventory too (gzip is sequential).

The products are small; the manifest's `storage.fetch_part_bytes` is 8 MiB (the smallest allowed), so
each cube (~16 MB) still takes several parts. GDAL never talks to the proxy itself (it reads through
the pipeline's own readers, s3fs underneath, via rasterio's opener, or from fetched copies): GDAL holds
the GIL while it waits for a server, so the build can run in this process, synchronously.
"""

from __future__ import annotations

import math
import os
import posixpath
import struct
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import s3fs
import yaml
import zarr
from fsspec.implementations.local import LocalFileSystem

from pipeline import stages, tables
from pipeline.block_reader import BlockReader
from pipeline.enmap.discovery import discover, folder_products
from pipeline.enmap.product import OpenedProduct
from pipeline.enmap.synth import ProductTruth, SynthConfig, generate
from pipeline.errors import TransientError, is_transient
from pipeline.fetch import FetchSettings
from pipeline.inventory import SceneRecord, inspect_product, inspect_source
from pipeline.manifest import Manifest
from pipeline.stages import BuildContext
from pipeline.storage import join
from pipeline.tables import Rejection
from pipeline.write import zarr_store
from tests import helpers
from tests.helpers import read_array
from tests.s3_proxy import Request, S3Proxy, products_behind_proxy

REPO = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
PART_BYTES = 8 * MiB
# Per product and reading stage, beyond one GET per part: the ZIP/tar.gz is one object (none more); a
# folder product is ~15 files of which all but the cube and QL_PIXELMASK fit one part each.
SMALL_CONSTANT = 16
pytestmark = pytest.mark.slow

# Every packaging and format, deflated and stored ZIPs: two sets of products (distinct seeds and dates,
# so distinct scene ids).
DEFLATED = SynthConfig(
    seed=5,
    sites=2,
    revisits=2,
    overlapping_tiles=0,
    reprocessed=0,
    width=190,
    height=182,
    packagings=("folder", "zip", "targz", "ard"),
    formats=("GTiff", "BIL", "BSQ"),
    zip_compresslevel=1,
)
STORED = SynthConfig(
    seed=6,
    sites=1,
    revisits=2,
    overlapping_tiles=0,
    reprocessed=0,
    width=190,
    height=182,
    packagings=("zip", "targz"),
    formats=("GTiff", "BIL"),
    zip_compresslevel=0,
    first_date="2023-07-11",
)


# The products' root folder and each product's truth with the name of its set (deflated or stored).
Products = tuple[Path, list[tuple[str, ProductTruth]]]
# The proxy in front of moto and an s3fs filesystem on it.
Moto = tuple[S3Proxy, s3fs.S3FileSystem]


@pytest.fixture(scope="module")
def products(tmp_path_factory: pytest.TempPathFactory) -> Products:
    root = tmp_path_factory.mktemp("s3-read-products")
    truths: list[tuple[str, ProductTruth]] = []
    for name, config in (("deflated", DEFLATED), ("stored", STORED)):
        truths += [(name, truth) for truth in generate(root / name, config).products]
        (root / name / "truth.json").unlink()
    return root, truths


@pytest.fixture(scope="module")
def s3(products: Products, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Moto]:
    root, _ = products
    with products_behind_proxy(root, tmp_path_factory.mktemp("scratch")) as (proxy, fs):
        yield proxy, fs


def manifest(folder: Path) -> Manifest:
    raw = yaml.safe_load((REPO / "manifests" / "demo.yaml").read_text())
    raw.setdefault("storage", {})["fetch_part_bytes"] = PART_BYTES
    # Small patches and lenient thresholds, so that these small scenes keep patches.
    raw["grid"]["patch_size"] = 48
    raw["quality"]["max_fraction"] = {"nodata": 0, "background": 0, "cloud": 0.5, "cirrus": 0.5}
    path = folder / "manifest.yaml"
    path.write_text(yaml.safe_dump(raw))
    return Manifest.from_yaml(path)


def product_objects(fs: s3fs.S3FileSystem, set_name: str, path: str) -> dict[str, int]:
    """The S3 objects of one product (its folder's files, or its archive) and their sizes, by the
    path the proxy sees (`/bucket/key`)."""
    key = f"enmap-products/{set_name}/{path}"
    found = fs.find(key, detail=True) if fs.isdir(key) else {key: fs.info(key)}
    return {f"/{name}": int(info["size"]) for name, info in found.items()}


def received_bytes(request: Request, sizes: dict[str, int]) -> int:
    """The bytes a GET asked for: its Range (`bytes=a-b`), else the whole object."""
    if request.range is None:
        return sizes[request.path]
    first, _, last = request.range.removeprefix("bytes=").partition("-")
    return min(int(last), sizes[request.path] - 1) - int(first) + 1


def leftover_scratch() -> list[Path]:
    return helpers.leftover_scratch(Path(os.environ["SPECTRALEARTH_SCRATCH"]))


def read_arrays(group: zarr.Group) -> dict[str, np.ndarray]:
    return {name: read_array(group, name) for name in group.array_keys()}


def assert_same_build_as_local(
    built: Manifest, remote: BuildContext, root: Path, local_path: Path, n_products: int
) -> None:
    """The same dataset as the local build of the same products, bit for bit; the same masks, plans and
    index; the same scenes; nothing rejected."""
    local = BuildContext.create(built, str(local_path), scheduler="synchronous", progress=False)
    for name in stages.ORDER:
        local.run(name, inputs=[str(root)])
    remote_arrays = read_arrays(zarr.open_group(zarr_store(remote.store), mode="r"))
    local_arrays = read_arrays(zarr.open_group(zarr_store(local.store), mode="r"))
    assert remote_arrays.keys() == local_arrays.keys()
    assert remote_arrays["reflectance"].shape[0] > 0
    for name in local_arrays:
        assert np.array_equal(remote_arrays[name], local_arrays[name]), name
    for table in (tables.MASKS, tables.PLAN_PATCHES, tables.INDEX_PATCHES):
        # The same masks (their SHA-256) and plans; fingerprints differ (they cover the objects' ETags).
        got, want = remote.store.read_table(table), local.store.read_table(table)
        drop = [c for c in ("fingerprint", "source_uri") if c in want.column_names]
        assert got.drop_columns(drop).equals(want.drop_columns(drop)), table
    columns = ["scene_id", "epsg", "width", "height"]
    got = remote.store.read_table(tables.SCENES).select(columns).sort_by("scene_id")
    assert got.equals(local.store.read_table(tables.SCENES).select(columns).sort_by("scene_id"))
    assert got.num_rows == n_products
    assert remote.store.read_table(tables.MASK_REJECTED).num_rows == 0


def test_s3_build_fetches_each_product_in_few_large_gets(
    s3: Moto, products: Products, tmp_path: Path
) -> None:
    proxy, fs = s3
    root, truths = products
    built = manifest(tmp_path)
    remote = BuildContext.create(built, "s3://builds/reads", scheduler="synchronous", progress=False)
    gets: dict[str, Counter[str]] = {}
    get_requests: dict[str, list[Request]] = {}
    put_requests = []
    for name in stages.ORDER:
        proxy.clear_counts()
        remote.run(name, inputs=["s3://enmap-products/"])
        requests = proxy.requests
        gets[name] = Counter(r.path for r in requests if r.method == "GET")
        get_requests[name] = [r for r in requests if r.method == "GET"]
        put_requests += [r for r in requests if r.method == "PUT"]

    # Every product is read (inventory, mask) in at most one GET per 8 MiB part of its bytes plus a
    # small constant, and no stage after mask reads a product at all.
    puts = Counter(r.path for r in put_requests)
    packagings = set()
    for set_name, truth in truths:
        objects = product_objects(fs, set_name, truth.path)
        size = sum(objects.values())
        bound = math.ceil(size / PART_BYTES) + SMALL_CONSTANT
        for stage in stages.ORDER:
            count = sum(gets[stage][path] for path in objects)
            if stage == "mask" and truth.packaging == "targz":
                # Inventory kept the delivery's inner ZIP on this machine: mask reads none of it.
                assert count == 0, (stage, truth.scene_id, count)
            elif stage in ("inventory", "mask"):
                assert 1 <= count <= bound, (stage, truth.scene_id, truth.packaging, count, size)
                got = sum(received_bytes(r, objects) for r in get_requests[stage] if r.path in objects)
                print(
                    f"{stage}: {set_name} {truth.packaging} {truth.format}: {size} bytes, {count} GETs, "
                    f"{got} bytes received"
                )
            else:
                assert count == 0, (stage, truth.scene_id, count)
        packagings.add((truth.packaging, truth.format, set_name))
    assert {p for p, _, _ in packagings} == {"folder", "zip", "targz", "ard"}
    assert {f for _, f, _ in packagings} >= {"GTiff", "BIL", "BSQ"}
    assert ("zip", "GTiff", "stored") in packagings or ("zip", "BIL", "stored") in packagings
    # The archives are read whole: a multi-part fetch (several GETs) for each object over one part.
    archive = next(t for s, t in truths if s == "stored" and t.packaging == "zip")
    ((zip_path, zip_size),) = product_objects(fs, "stored", archive.path).items()
    assert zip_size > PART_BYTES
    assert gets["mask"][zip_path] == math.ceil(zip_size / PART_BYTES)

    # The build location's objects go up whole: no object of this small build is written in parts
    # (a multipart upload would show as PUTs with a part number), and each shard, table, cut chunk
    # file and mask is written by exactly one PUT.
    assert [r.path for r in put_requests if "partNumber" in r.query] == []
    written = fs.find("builds/reads")
    data = [k for k in written if k.endswith((".parquet", ".bin", ".tif")) or "/c/" in k]
    assert any("/c/" in k for k in data) and any("/cut/" in k for k in data)
    assert {k: puts[f"/{k}"] for k in data if puts[f"/{k}"] != 1} == {}
    print({k: n for k, n in puts.items() if n > 1})

    assert_same_build_as_local(built, remote, root, tmp_path / "local", len(truths))
    # Scratch is cleaned.
    assert leftover_scratch() == []


# Products over three 8 MiB blocks large (~27 MB cubes, 224 bands), stored ZIP and folders, GeoTIFF and
# ENVI, and a deflated ZIP (larger, since its cube deflates to about half): what inventory reads of them
# in place is a few blocks, not the product.
LARGE = SynthConfig(
    seed=7,
    sites=1,
    revisits=3,
    overlapping_tiles=0,
    reprocessed=0,
    width=250,
    height=238,
    packagings=("folder", "zip"),
    formats=("GTiff", "BIL", "BSQ"),
    zip_compresslevel=0,
    first_date="2023-09-04",
)
LARGE_DEFLATED = SynthConfig(
    seed=10,
    sites=1,
    revisits=1,
    overlapping_tiles=0,
    reprocessed=0,
    width=430,
    height=410,
    packagings=("zip",),
    formats=("GTiff",),
    zip_compresslevel=1,
    first_date="2023-10-09",
)


def test_inventory_reads_remote_products_in_place_in_a_few_blocks(s3: Moto, tmp_path: Path) -> None:
    proxy, fs = s3
    truths = (
        generate(tmp_path / "large", LARGE).products + generate(tmp_path / "large", LARGE_DEFLATED).products
    )
    (tmp_path / "large" / "truth.json").unlink()
    fs.put(str(tmp_path / "large") + "/", "enmap-products-large/", recursive=True)
    built = manifest(tmp_path)
    options = built.storage.fsspec_options()
    packagings = set()
    for truth in truths:
        uri = f"s3://enmap-products-large/{truth.path}"
        (source,), _ = discover([uri], options, built.limits)
        key = f"enmap-products-large/{truth.path}"
        found = fs.find(key, detail=True) if fs.isdir(key) else {key: fs.info(key)}
        objects = {f"/{name}": int(info["size"]) for name, info in found.items()}
        size = sum(objects.values())
        assert size > 3 * PART_BYTES
        proxy.clear_counts()
        (result,) = inspect_source(source, built, options)
        assert not isinstance(result, Rejection), result
        requests = [r for r in proxy.requests if r.method == "GET" and r.path in objects]
        received = [received_bytes(r, objects) for r in requests]
        print(
            f"inventory in place: {truth.packaging} {truth.format}: {size} bytes, "
            f"{len(requests)} GETs, {sum(received)} bytes received"
        )
        # Each GET is one aligned block (the last of an object may be shorter), no block twice, and all
        # of them together well under the product: headers, not cubes.
        assert all(n <= PART_BYTES for n in received), received
        assert len({(r.path, r.range) for r in requests}) == len(requests)
        assert all(
            r.range is not None and int(r.range.removeprefix("bytes=").split("-")[0]) % PART_BYTES == 0
            for r in requests
        )
        # No block that holds nothing but cube data (the cube's body: from its second block, within
        # the cube's bytes) is fetched; there are such blocks to fetch, so a whole read would fail this.
        path, start, end = cube_bytes(tmp_path / "large" / truth.path, key)
        body = {k for k in range(start // PART_BYTES + 1, end // PART_BYTES) if (k + 1) * PART_BYTES <= end}
        fetched = {
            int(r.range.removeprefix("bytes=").split("-")[0]) // PART_BYTES
            for r in requests
            if r.path == path and r.range is not None
        }
        assert body and not fetched & body, (truth.packaging, truth.format, sorted(fetched), sorted(body))
        assert sum(received) < size - len(body) * PART_BYTES + 1
        packagings.add((truth.packaging, truth.format))
    assert packagings == {("folder", "GTiff"), ("zip", "BIL"), ("folder", "BSQ"), ("zip", "GTiff")}
    assert leftover_scratch() == []


def cube_bytes(local: Path, key: str) -> tuple[str, int, int]:
    """The proxy path of the object holding SPECTRAL_IMAGE's data file and where that data lies in it."""
    if local.is_dir():
        (cube,) = [p for p in local.iterdir() if "SPECTRAL_IMAGE" in p.name and p.suffix.upper() != ".HDR"]
        return f"/{key}/{cube.name}", 0, cube.stat().st_size
    with zipfile.ZipFile(local) as archive, open(local, "rb") as raw:
        (info,) = [
            i
            for i in archive.infolist()
            if "SPECTRAL_IMAGE" in i.filename and not i.filename.upper().endswith(".HDR")
        ]
        raw.seek(info.header_offset)
        _, name_length, extra_length = struct.unpack("<4s22xHH", raw.read(30))
        start = info.header_offset + 30 + name_length + extra_length
    return f"/{key}", start, start + info.compress_size


def run_stages(context: BuildContext, names: tuple[str, ...], inputs: list[str]) -> None:
    for name in names:
        context.run(name, inputs=inputs)


def test_products_over_the_memory_budget_stream_to_scratch(
    s3: Moto, products: Products, tmp_path: Path
) -> None:
    """With a memory budget smaller than any product, every product is fetched into scratch (still in
    large GETs) and read from there: the same masks as the local build; scratch is empty after."""
    proxy, _ = s3
    root, truths = products
    raw = yaml.safe_load((REPO / "manifests" / "demo.yaml").read_text())
    raw["storage"] = {"fetch_part_bytes": PART_BYTES}
    raw["grid"]["patch_size"] = 48
    raw["write"]["patches_per_shard"] = 2
    raw["limits"] = {"memory_bytes": 4 * MiB, "xml_bytes": MiB}
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(raw))
    small = Manifest.from_yaml(tmp_path / "small.yaml")
    assert all(size > small.limits.memory_bytes for size in product_sizes(s3[1], truths))
    proxy.clear_counts()
    remote = BuildContext.create(small, str(tmp_path / "remote"), scheduler="synchronous", progress=False)
    run_stages(remote, ("inventory", "mask"), ["s3://enmap-products/"])
    local = BuildContext.create(small, str(tmp_path / "local"), scheduler="synchronous", progress=False)
    run_stages(local, ("inventory", "mask"), [str(root)])
    got, want = remote.store.read_table("mask/masks.parquet"), local.store.read_table("mask/masks.parquet")
    assert got.num_rows == len(truths)
    assert got.drop_columns(["fingerprint"]).equals(want.drop_columns(["fingerprint"]))
    total = sum(product_sizes(s3[1], truths))
    assert proxy.count("GET", "/enmap-products/") <= 2 * (total // PART_BYTES + len(truths) * SMALL_CONSTANT)
    assert leftover_scratch() == []


def product_sizes(fs: s3fs.S3FileSystem, truths: list[tuple[str, ProductTruth]]) -> list[int]:
    return [sum(product_objects(fs, set_name, truth.path).values()) for set_name, truth in truths]


def test_a_fault_while_fetching_is_transient_and_a_truncated_archive_is_rejected(
    s3: Moto, products: Products, tmp_path: Path
) -> None:
    proxy, fs = s3
    root, truths = products
    built = manifest(tmp_path)
    options = built.storage.fsspec_options()
    archive = next(t for s, t in truths if s == "stored" and t.packaging == "zip")
    data = (root / "stored" / archive.path).read_bytes()
    fs.mkdir("enmap-broken")
    fs.pipe(f"enmap-broken/{posixpath.basename(archive.path)}", data[: len(data) // 2])
    (broken,), _ = discover(["s3://enmap-broken/"], options, built.limits)
    (result,) = inspect_source(broken, built, options)
    assert isinstance(result, Rejection)
    assert "corrupt ZIP" in result.reason and "\n" not in result.reason

    (source,), _ = discover([f"s3://enmap-products/stored/{archive.path}"], options, built.limits)
    proxy.refuse()
    try:
        with pytest.raises(Exception) as raised:  # noqa: PT011 - whatever it is, it must be transient
            inspect_source(source, built, options)
    finally:
        proxy.heal()
    assert is_transient(raised.value), raised.value
    assert leftover_scratch() == []
    (healed,) = inspect_source(source, built, options)
    assert healed.scene_id == archive.scene_id and not isinstance(healed, Rejection)


class RastersUnreachable(LocalFileSystem):
    """A store on which every read of the cube fails as a network fault does (the rest reads fine)."""

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        if "SPECTRAL_IMAGE" in path:
            raise ConnectionResetError("connection reset by peer")
        return bytes(super().cat_file(path, start=start, end=end, **kwargs))


def test_a_fault_under_gdal_is_transient_and_a_corrupt_raster_is_one_line(tmp_path: Path) -> None:
    """GDAL reading through a BlockReader sees only "read failed": the storage fault behind it raises
    as transient (never a rejection); bytes that are no raster stay a one-line rejection."""
    config = SynthConfig(
        seed=8,
        sites=1,
        revisits=1,
        overlapping_tiles=0,
        reprocessed=0,
        width=70,
        height=58,
        packagings=("folder",),
        formats=("GTiff",),
    )
    (truth,) = generate(tmp_path / "p", config).products
    built = manifest(tmp_path)
    (source,), _ = discover([str(tmp_path / "p" / truth.path)], {}, built.limits)
    (location,) = folder_products(source)
    location = replace(location, container_uri=f"file://{location.container_uri}")

    def inspect(fs: LocalFileSystem) -> SceneRecord | Rejection:
        reader = BlockReader(fs, FetchSettings(retries=0, backoff_seconds=0))
        reader.add_sizes({join(location.container_uri, m): size for m, size in location.members})
        with reader.serving():
            opened = OpenedProduct(location, {}, limits=built.limits, remote=reader)
            return inspect_product(opened, built, reader)

    assert isinstance(inspect(LocalFileSystem()), SceneRecord)
    with pytest.raises(TransientError) as raised:
        inspect(RastersUnreachable())
    assert is_transient(raised.value) and "connection reset" in str(raised.value)
    cube = next(p for p in (tmp_path / "p" / truth.path).iterdir() if "SPECTRAL_IMAGE" in p.name)
    cube.write_bytes(bytes(np.random.default_rng(8).integers(0, 256, cube.stat().st_size, dtype=np.uint8)))
    rejected = inspect(LocalFileSystem())
    assert isinstance(rejected, Rejection)
    assert rejected.reason.startswith("unreadable raster SPECTRAL_IMAGE") and "\n" not in rejected.reason
