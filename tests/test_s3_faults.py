"""S3 unreachable for some seconds during each stage: the build rides it out (transient faults are
retried with backoff, in tasks and in every read and write of the build location) and ends in the same
result as an undisturbed S3 build, with nothing rejected.

moto's server forgets its objects when restarted, so the outage is made by a small proxy in front of it
(tests/s3_proxy.py) that refuses connections for a few seconds; every client (s3fs, GDAL's /vsis3/) goes
through the proxy.
"""

from __future__ import annotations

import functools
import importlib
from pathlib import Path

import pytest
import s3fs

from pipeline import stages
from pipeline.manifest import Manifest
from pipeline.stages import BuildContext
from tests.s3_proxy import S3Proxy, moto_server
from tests.test_faults import assert_same_build

REPO = Path(__file__).resolve().parent.parent
OUTAGE_SECONDS = 3.0
pytestmark = pytest.mark.slow

# Per stage, a function that runs while the stage talks to S3: the outage starts at its first call.
OUTAGE_AT = {
    "inventory": "pipeline.inventory:inspect_source",
    "mask": "pipeline.mask:compute_mask",
    "tile": "pipeline.tile:plan_scene",
    "dedup": "pipeline.dedup:build_index",
    "write": "pipeline.write:write_statistics",
    "catalog": "stac.catalog:build_catalog",
}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    from pipeline.enmap.synth import SynthConfig, generate

    products = tmp_path_factory.mktemp("s3-fault-products")
    config = SynthConfig(
        seed=21,
        sites=1,
        revisits=2,
        overlapping_tiles=1,
        reprocessed=0,
        width=300,
        height=280,
        packagings=("folder", "zip", "targz"),
        formats=("GTiff", "BSQ"),
    )
    generate(products, config)
    (products / "truth.json").unlink()
    with moto_server() as upstream, S3Proxy(*upstream).running() as proxy:
        fs = s3fs.S3FileSystem(
            key="testing-key", secret="testing-secret", client_kwargs={"endpoint_url": proxy.endpoint_url}
        )
        fs.mkdir("enmap-products")
        fs.put(str(products) + "/", "enmap-products/", recursive=True)
        fs.mkdir("builds")
        yield proxy, fs


@pytest.fixture
def s3_env(s3, monkeypatch, tmp_path):
    proxy, _ = s3
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing-key",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": proxy.endpoint_url,
        "SPECTRALEARTH_SCRATCH": str(tmp_path / "scratch"),
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    import fsspec

    fsspec.config.conf.pop("s3", None)
    s3fs.S3FileSystem.clear_instance_cache()
    return s3


def build(name: str) -> BuildContext:
    manifest = Manifest.from_yaml(REPO / "manifests" / "demo.yaml")
    context = BuildContext.create(manifest, f"s3://builds/{name}", scheduler="synchronous", progress=False)
    for stage in stages.ORDER:
        context.run(stage, inputs=["s3://enmap-products/"])
    return context


def download(fs: s3fs.S3FileSystem, name: str, target: Path) -> Path:
    fs.get(f"builds/{name}/", str(target) + "/", recursive=True)
    return target


@pytest.fixture(scope="module")
def reference(s3):
    proxy, fs = s3
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {
            "AWS_ACCESS_KEY_ID": "testing-key",
            "AWS_SECRET_ACCESS_KEY": "testing-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": proxy.endpoint_url,
        }.items():
            patch.setenv(name, value)
        build("reference")
    return "reference"


@pytest.mark.parametrize("stage", list(OUTAGE_AT))
def test_s3_unreachable_during_a_stage_heals_to_the_same_build(
    stage, s3_env, reference, tmp_path, monkeypatch
):
    proxy, fs = s3_env
    module_name, function_name = OUTAGE_AT[stage].split(":")
    module = importlib.import_module(module_name)
    original = getattr(module, function_name)
    started = []

    @functools.wraps(original)
    def with_outage(*args, **kwargs):
        if not started:
            started.append(True)
            proxy.fail_for(OUTAGE_SECONDS)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, function_name, with_outage)
    proxy.clear_counts()
    context = build(f"outage-{stage}")
    assert started, f"the outage was started during {stage}"
    counts = {name: context.store.read_json(f"_stages/{name}.json")["counts"] for name in stages.ORDER}
    assert counts["inventory"]["rejected"] == 0 and counts["mask"]["rejected"] == 0
    assert counts["tile"]["scenes_rejected"] == 0
    got = download(fs, f"outage-{stage}", tmp_path / "got")
    want = download(fs, reference, tmp_path / "want")
    assert_same_build(got, want, roots=(f"s3://builds/outage-{stage}", f"s3://builds/{reference}"))
