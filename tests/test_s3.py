"""A whole build with the products in one S3 bucket and the build in another, against moto's
standalone S3 server started here on 127.0.0.1: the result equals the local build, nothing of the
build is written locally, and credentials appear in no output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from pipeline import stages, tables
from pipeline.manifest import Manifest
from pipeline.stages import BuildContext
from tests.helpers import leftover_scratch, read_array, write_few_products

REPO = Path(__file__).resolve().parent.parent
SECRET = "s3cr3t-never-logged"
pytestmark = pytest.mark.slow


@pytest.fixture
def s3_env(s3_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing-key",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_server,
        "SPECTRALEARTH_SCRATCH": str(tmp_path / "scratch"),
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_server


def upload(local: Path, bucket: str, endpoint: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    fs.mkdir(bucket)
    fs.put(str(local) + "/", f"{bucket}/", recursive=True)


def read_arrays(group: zarr.Group) -> dict[str, np.ndarray]:
    return {name: read_array(group, name) for name in group.array_keys()}


@pytest.fixture(scope="module")
def few_products(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_few_products(tmp_path_factory.mktemp("s3-products"))


def test_build_on_s3_equals_the_local_build(
    s3_env: str,
    few_products: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    products = few_products
    upload(products, "enmap-products", s3_env)
    import s3fs

    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_env}).mkdir("spectralearth-builds")
    monkeypatch.chdir(tmp_path)
    manifest = Manifest.from_yaml(REPO / "manifests" / "demo.yaml")
    remote = BuildContext.create(
        manifest, "s3://spectralearth-builds/demo", scheduler="synchronous", progress=False
    )
    for name in stages.ORDER:
        remote.run(name, inputs=["s3://enmap-products/"])
    local = BuildContext.create(manifest, str(tmp_path / "local"), scheduler="synchronous", progress=False)
    for name in stages.ORDER:
        local.run(name, inputs=[str(products)])

    # The same arrays and the same index, location and shard tables.
    from pipeline.write import zarr_store

    remote_arrays = read_arrays(zarr.open_group(zarr_store(remote.store), mode="r"))
    local_arrays = read_arrays(zarr.open_group(zarr_store(local.store), mode="r"))
    assert remote_arrays.keys() == local_arrays.keys()
    for name in local_arrays:
        assert np.array_equal(remote_arrays[name], local_arrays[name]), name
    for table in (
        tables.INDEX_PATCHES,
        tables.INDEX_LOCATIONS,
        tables.PLAN_PATCHES,
        "write/shards.parquet",
    ):
        assert remote.store.read_table(table).equals(local.store.read_table(table)), table
    remote_scenes = remote.store.read_table(tables.SCENES)
    assert all(
        uri.startswith("s3://enmap-products/") for uri in remote_scenes.column("source_uri").to_pylist()
    )
    assert len(remote_scenes) == len(pq.read_table(tmp_path / "local" / "inventory" / "scenes.parquet"))
    assert remote.store.exists("stac/items.parquet") and remote.store.exists("stac/catalog.json")

    # Queries read the build straight from the bucket.
    from pipeline.query import query

    result = query("s3://spectralearth-builds/demo")
    assert len(result) == remote.store.read_table(tables.INDEX_PATCHES).num_rows > 0
    assert result.to_xarray()["reflectance"].shape[1] == 202

    # Nothing of the build exists locally, scratch was cleaned, and no secret was printed or stored.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local", "scratch"]
    assert leftover_scratch(tmp_path / "scratch") == []
    output = capsys.readouterr()
    assert SECRET not in output.out + output.err
    for key in remote.store.fs.find("spectralearth-builds/demo"):
        if key.endswith((".json", ".html")):
            assert SECRET.encode() not in remote.store.fs.cat_file(key), key
