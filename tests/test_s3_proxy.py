"""The test proxy in front of moto: requests reach the server, every request is counted (also on keep-alive
connections, checked against GDAL's own network statistics), and its faults look to clients like the
network faults they stand for: `pipeline.errors.is_transient` says so, and `heal` restores service."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
import s3fs
from affine import Affine
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import is_transient
from tests.s3_proxy import Request, RequestParser, S3Proxy, moto_server

BUCKET = "proxy-tests"


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[str, int]]:
    with moto_server() as address:
        yield address


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing-key",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def proxy(upstream: tuple[str, int], aws_env: None) -> Iterator[S3Proxy]:
    with S3Proxy(*upstream).running() as running:
        yield running
    assert not [t for t in threading.enumerate() if t.name.startswith("s3-proxy")]


def filesystem(proxy: S3Proxy, attempts: int | None = None) -> s3fs.S3FileSystem:
    """s3fs through the proxy; `attempts=1` turns botocore's own retries off (a fault then surfaces)."""
    config = {"retries": {"max_attempts": attempts, "mode": "standard"}} if attempts else {}
    return s3fs.S3FileSystem(
        client_kwargs={"endpoint_url": proxy.endpoint_url},
        config_kwargs={"connect_timeout": 2, "read_timeout": 5, **config},
        skip_instance_cache=True,
        use_listings_cache=False,
    )


@pytest.fixture
def stored(proxy: S3Proxy) -> tuple[str, bytes]:
    """An object of 3 MB (random bytes) in the bucket."""
    fs = filesystem(proxy)
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    data = np.random.default_rng(3).integers(0, 256, 3_000_017, dtype=np.uint8).tobytes()
    fs.pipe_file(f"{BUCKET}/objects/blob.bin", data)
    proxy.clear_counts()
    return f"{BUCKET}/objects/blob.bin", data


# Parsing the request stream ----------------------------------------------------------------------


def _stream() -> tuple[bytes, list[Request]]:
    body = b"x" * 700
    chunks = b"5\r\nhello\r\n1a;ext=1\r\n" + b"y" * 26 + b"\r\n0\r\nx-amz-checksum: abc\r\n\r\n"
    stream = (
        b"GET /b/k%20ey?x=1 HTTP/1.1\r\nHost: h\r\nRange: bytes=0-99\r\n\r\n"
        + b"PUT /b/obj HTTP/1.1\r\nContent-Length: 700\r\n\r\n"
        + body
        + b"PUT /b/chunked HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunks
        + b"HEAD /b/k HTTP/1.1\r\ncontent-length: 0\r\n\r\n"
        # A body that holds what looks like a request line is still body.
        + b"POST /b?delete HTTP/1.1\r\nContent-Length: 30\r\n\r\nGET /not/a/request HTTP/1.1\r\n\r\n"
    )
    expected = [
        Request("GET", "/b/k ey", "x=1", "bytes=0-99"),
        Request("PUT", "/b/obj", "", None),
        Request("PUT", "/b/chunked", "", None),
        Request("HEAD", "/b/k", "", None),
        Request("POST", "/b", "delete", None),
    ]
    return stream, expected


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2000), max_size=12))
def test_parser_counts_requests_whatever_the_packet_boundaries(cuts: list[int]) -> None:
    stream, expected = _stream()
    parser = RequestParser()
    seen: list[Request] = []
    edges = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    for start, end in zip(edges, edges[1:], strict=False):
        seen.extend(parser.feed(stream[start:end]))
    assert seen == expected


# Through the proxy -------------------------------------------------------------------------------


def test_s3fs_requests_reach_moto_and_are_counted(proxy: S3Proxy, stored: tuple[str, bytes]) -> None:
    key, data = stored
    fs = filesystem(proxy)
    ranges = [(0, 1000), (5, 6), (2_000_000, 3_000_017), (1_048_576, 2_097_152)]
    for start, end in ranges:
        assert fs.cat_file(key, start=start, end=end) == data[start:end]
    gets = [r for r in proxy.requests if r.method == "GET"]
    # One GET per ranged read, on one keep-alive connection pool, each with its range.
    assert len(gets) == proxy.count("GET", "/" + key) == len(ranges)
    assert [r.range for r in gets] == [f"bytes={s}-{e - 1}" for s, e in ranges]
    assert proxy.count() == len(proxy.requests)
    fs.pipe_file(f"{BUCKET}/objects/second.bin", b"abc" * 1000)
    assert proxy.count("PUT", f"/{BUCKET}/objects/second.bin") == 1
    assert proxy.count("GET", f"/{BUCKET}/objects/") == len(ranges)


# GDAL reads in a child process: GDAL holds the GIL while it waits for an answer, and the proxy's
# threads live in this process, so a read from here would wait on itself.
_GDAL_READ = """
import ctypes, glob, json, sys
from pathlib import Path
import numpy as np
import rasterio

folder = Path(rasterio.__file__).resolve().parent.parent / "rasterio.libs"
found = glob.glob(str(folder / "libgdal*.so*"))
if not found:
    print(json.dumps(None))
    sys.exit(0)
lib = ctypes.CDLL(found[0])
lib.VSINetworkStatsGetAsSerializedJSON.restype = ctypes.c_void_p
lib.VSINetworkStatsGetAsSerializedJSON.argtypes = [ctypes.c_void_p]
lib.VSIFree.argtypes = [ctypes.c_void_p]
endpoint, path, expected = sys.argv[1], sys.argv[2], sys.argv[3]
with rasterio.Env(
    AWS_S3_ENDPOINT=endpoint,
    AWS_HTTPS="NO",
    AWS_VIRTUAL_HOSTING="FALSE",
    CPL_VSIL_NETWORK_STATS_ENABLED="YES",
    CPL_VSIL_CURL_CHUNK_SIZE=str(64 * 1024),  # small chunks: several requests to count
    VSI_CACHE="FALSE",
):
    lib.VSINetworkStatsReset()
    with rasterio.open(path) as src:
        same = bool(np.array_equal(src.read(), np.load(expected)))
    pointer = lib.VSINetworkStatsGetAsSerializedJSON(None)
    stats = json.loads(ctypes.string_at(pointer).decode())
    lib.VSIFree(pointer)
print(json.dumps({"same": same, "stats": stats}))
"""


def test_gdal_reads_are_counted_as_gdal_counts_them(proxy: S3Proxy, tmp_path: Path) -> None:
    """GDAL's own per-file request counts (CPL_VSIL_NETWORK_STATS_ENABLED, read from rasterio's libgdal)
    are an oracle for the proxy's counts that does not go through the proxy."""
    cube = np.random.default_rng(4).integers(0, 10_000, (3, 300, 310), dtype=np.int16)
    local = tmp_path / "cube.tif"
    profile = {"crs": "EPSG:32632", "transform": Affine(30.0, 0.0, 628785.0, 0.0, -30.0, 5294265.0)}
    with rasterio.open(
        local, "w", driver="GTiff", width=310, height=300, count=3, dtype="int16", **profile
    ) as d:
        d.write(cube)
    np.save(tmp_path / "cube.npy", cube)
    fs = filesystem(proxy)
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    fs.put_file(str(local), f"{BUCKET}/gdal/cube.tif")
    proxy.clear_counts()
    path = f"/vsis3/{BUCKET}/gdal/cube.tif"
    completed = subprocess.run(
        [sys.executable, "-c", _GDAL_READ, proxy.endpoint, path, str(tmp_path / "cube.npy")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    if result is None:
        pytest.skip("rasterio's bundled libgdal not found (a system GDAL build?)")
    assert result["same"]
    stats = result["stats"]
    gdal_total = stats["methods"]["GET"]["count"]
    gdal_file = stats["handlers"]["vsis3"]["files"][path]["methods"]["GET"]["count"]
    assert gdal_file >= 2
    assert proxy.count("GET", f"/{BUCKET}/gdal/cube.tif") == gdal_file
    assert proxy.count("GET") == gdal_total
    assert proxy.count() == sum(m["count"] for m in stats["methods"].values())


# Faults ------------------------------------------------------------------------------------------


def _failure(fs: s3fs.S3FileSystem, key: str) -> BaseException:
    with pytest.raises(Exception) as caught:
        fs.cat_file(key, start=0, end=100)
    return caught.value


def test_refuse_fails_transiently_and_heal_restores(proxy: S3Proxy, stored: tuple[str, bytes]) -> None:
    key, data = stored
    fs = filesystem(proxy, attempts=1)
    assert fs.cat_file(key, start=0, end=100) == data[:100]  # a pooled keep-alive connection now exists
    proxy.refuse()
    error = _failure(fs, key)
    assert is_transient(error), repr(error)
    before = proxy.count()
    assert _failure(filesystem(proxy, attempts=1), key) is not None
    assert proxy.count() == before  # nothing reached the server
    proxy.heal()
    assert fs.cat_file(key, start=100, end=200) == data[100:200]
    assert proxy.count("GET", "/" + key) == 2


def test_reset_fails_transiently_and_heal_restores(proxy: S3Proxy, stored: tuple[str, bytes]) -> None:
    key, data = stored
    fs = filesystem(proxy, attempts=1)
    assert fs.cat_file(key, start=0, end=100) == data[:100]
    proxy.reset()
    error = _failure(fs, key)
    assert is_transient(error), repr(error)
    assert is_transient(_failure(filesystem(proxy, attempts=1), key))
    proxy.heal()
    assert fs.cat_file(key) == data


def test_gdal_sees_a_refused_server_as_transient(proxy: S3Proxy, stored: tuple[str, bytes]) -> None:
    key, _ = stored
    proxy.refuse()
    # The pipeline's GDAL settings (applied process-wide by earlier builds in this session) allow only
    # EnMAP file extensions over /vsis3/: without this, GDAL would not even connect for a .bin.
    with rasterio.Env(
        AWS_S3_ENDPOINT=proxy.endpoint,
        AWS_HTTPS="NO",
        AWS_VIRTUAL_HOSTING="FALSE",
        GDAL_HTTP_MAX_RETRY="0",
        CPL_VSIL_CURL_ALLOWED_EXTENSIONS=".bin",
    ):
        with pytest.raises(rasterio.errors.RasterioIOError) as caught:
            rasterio.open(f"/vsis3/{key}")
    assert is_transient(caught.value), str(caught.value)


def test_fail_for_heals_by_itself_and_retries_get_through(proxy: S3Proxy, stored: tuple[str, bytes]) -> None:
    key, data = stored
    fs = filesystem(proxy)  # botocore's and s3fs's default retries, with backoff
    started = time.monotonic()
    proxy.fail_for(1.5)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()
    assert fs.cat_file(key, start=0, end=1000) == data[:1000]
    # It could only succeed once the proxy had healed by itself.
    assert 1.5 <= time.monotonic() - started < 30
    assert filesystem(proxy, attempts=1).cat_file(key, start=5, end=10) == data[5:10]


def test_stop_joins_every_thread_even_while_failing(upstream: tuple[str, int], aws_env: None) -> None:
    proxy = S3Proxy(*upstream).start()
    fs = filesystem(proxy)
    fs.ls("/")
    # An open client connection, served by its own thread (moto may close its keep-alive ones).
    held = socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
    deadline = time.monotonic() + 5
    while not any(t.name == "s3-proxy-conn" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "no thread serves the open connection"
        time.sleep(0.01)
    proxy.fail_for(60)
    assert any(t.name == "s3-proxy-heal" for t in threading.enumerate())
    started = time.monotonic()
    proxy.stop()
    assert time.monotonic() - started < 5
    assert not [t.name for t in threading.enumerate() if t.name.startswith("s3-proxy")]
    held.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()
