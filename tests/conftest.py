"""Shared fixtures. Tests that need ../shared (real EnMAP samples, STAC schemas) skip without it."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
SAMPLES = SHARED / "enmap-samples"
REAL_SCENE = "ENMAP01-____L2A-DT0000326721_20170626T102020Z_001_V000204_20200406T201930Z"


@pytest.fixture(scope="session")
def samples() -> Path:
    if not SAMPLES.is_dir():
        pytest.skip(f"real EnMAP samples not found at {SAMPLES} (they sit beside the clone in CI)")
    return SAMPLES


@pytest.fixture(scope="session")
def real_metadata_bytes(samples: Path) -> bytes:
    return (samples / f"{REAL_SCENE}-METADATA.XML").read_bytes()


@pytest.fixture(scope="session")
def demo_products(tmp_path_factory):
    """The demo's synthetic products (every packaging and format), generated once per test session."""
    from pipeline.demo import DEMO_CONFIG
    from pipeline.enmap.synth import generate

    out = tmp_path_factory.mktemp("demo-products")
    return out, generate(out, DEMO_CONFIG)


@pytest.fixture(scope="module")
def s3_server():
    """moto's standalone S3 server in its own process on 127.0.0.1 (a thread in this process would
    deadlock: GDAL holds the GIL while it waits for the server's answer): its endpoint URL."""
    from tests.s3_proxy import moto_server

    with moto_server() as (host, port):
        yield f"http://{host}:{port}"
