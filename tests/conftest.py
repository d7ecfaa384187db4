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
    deadlock: GDAL holds the GIL while it waits for the server's answer)."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("moto's S3 server did not start") from None
            time.sleep(0.2)
    yield endpoint
    server.terminate()
    server.wait(timeout=10)
