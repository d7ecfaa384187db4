"""Few, large requests on object storage: against moto's S3 server behind the counting proxy, an object (or
a byte range of it) costs at most ceil(bytes / 8 MiB) GETs and comes back byte for byte; a product's files
or ZIP members cost a few merged ranges; transient faults are retried and persistent ones raise a
TransientError; an object that is not the size expected raises SizeMismatch, never a short result."""

from __future__ import annotations

import math
import tracemalloc
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
import s3fs
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.io import MemoryFile

from pipeline.block_reader import BlockReader
from pipeline.enmap import raw_reader
from pipeline.enmap.product import in_memory_view
from pipeline.enmap.product_errors import ProductError
from pipeline.enmap.scratch import ScratchBudget
from pipeline.enmap.zip_members import member_data_offset
from pipeline.errors import BuildFault, TransientError, is_transient
from pipeline.fetch import (
    MIN_PART_BYTES,
    FetchSettings,
    FileSlice,
    Piece,
    ProductFetcher,
    SizeMismatch,
    fetch,
    fetch_product,
    fetch_product_files,
    fetch_ranges,
    list_zip,
    member_data,
    merge_pieces,
    split_range,
)
from pipeline.storage_settings import StorageError, StorageSettings
from tests.s3_proxy import S3Proxy, moto_server

MiB = 1024 * 1024
BUCKET = "fetch-tests"
SIZES = (1, 100_003, 8 * MiB, 8 * MiB + 1, 37 * MiB + 123)


# Planning the requests (pure) ----------------------------------------------------------------------


@settings(deadline=None)
@given(st.integers(0, 10**12), st.integers(0, 10**11), st.integers(10**7, 10**9))
def test_split_range_covers_the_range_in_few_equal_parts(start: int, length: int, part: int) -> None:
    parts = split_range(start, length, part)
    assert len(parts) == math.ceil(length / part)
    covered = start
    for s, e in parts:
        assert s == covered and 0 < e - s <= part
        covered = e
    assert covered == start + length
    if parts:
        sizes = [e - s for s, e in parts]
        assert max(sizes) - min(sizes) <= 1


pieces_strategy = st.lists(
    st.builds(Piece, st.sampled_from(["s3://b/x", "s3://b/y"]), st.integers(0, 500), st.integers(0, 60)),
    max_size=25,
)


@given(pieces_strategy, st.integers(0, 40))
def test_merged_ranges_hold_every_piece_and_only_close_ones_are_merged(pieces: list[Piece], gap: int) -> None:
    merged = merge_pieces(pieces, gap)
    assert all(r.length > 0 for r in merged)
    for piece in (p for p in pieces if p.length):
        holders = [
            r
            for r in merged
            if r.uri == piece.uri
            and r.start <= piece.start
            and piece.start + piece.length <= r.start + r.length
        ]
        assert len(holders) == 1, piece
    for uri in {p.uri for p in merged}:
        ranges = sorted((r.start, r.start + r.length) for r in merged if r.uri == uri)
        for (_, end), (start, _) in zip(ranges, ranges[1:], strict=False):
            assert start > end + gap  # otherwise they would have been one range
        # Every byte fetched belongs to a piece, or to a gap of at most `gap` bytes between pieces.
        wanted = np.zeros(1000, dtype=bool)
        for p in pieces:
            if p.uri == uri:
                wanted[p.start : p.start + p.length] = True
        for start, end in ranges:
            assert wanted[start] and wanted[end - 1]
            holes = np.flatnonzero(~wanted[start:end])
            if holes.size:
                runs = np.split(holes, np.flatnonzero(np.diff(holes) != 1) + 1)
                assert max(len(r) for r in runs) <= gap


# Against moto through the counting proxy -----------------------------------------------------------


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[str, int]]:
    with moto_server() as address:
        yield address


@pytest.fixture(scope="module")
def objects(upstream: tuple[str, int]) -> dict[str, bytes]:
    """Objects of awkward sizes (random bytes), uploaded once."""
    with pytest.MonkeyPatch.context() as patch:
        _credentials(patch)
        fs = s3fs.S3FileSystem(
            client_kwargs={"endpoint_url": "http://{}:{}".format(*upstream)}, skip_instance_cache=True
        )
        fs.mkdir(BUCKET)
        rng = np.random.default_rng(11)
        stored: dict[str, bytes] = {}
        for size in SIZES:
            data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
            fs.pipe_file(f"{BUCKET}/objects/{size}.bin", data)
            stored[f"s3://{BUCKET}/objects/{size}.bin"] = data
    return stored


def _credentials(patch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing-key",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        patch.setenv(name, value)
    patch.delenv("AWS_PROFILE", raising=False)
    patch.delenv("AWS_ENDPOINT_URL", raising=False)


@pytest.fixture
def proxy(upstream: tuple[str, int], monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Proxy]:
    _credentials(monkeypatch)
    with S3Proxy(*upstream).running() as running:
        yield running


def through(proxy: S3Proxy, attempts: int | None = None) -> s3fs.S3FileSystem:
    config = {"retries": {"max_attempts": attempts, "mode": "standard"}} if attempts else {}
    return s3fs.S3FileSystem(
        client_kwargs={"endpoint_url": proxy.endpoint_url},
        config_kwargs={"connect_timeout": 2, "read_timeout": 20, **config},
        skip_instance_cache=True,
    )


def gets(proxy: S3Proxy, uri: str) -> int:
    return proxy.count("GET", "/" + uri.removeprefix("s3://"))


@pytest.mark.parametrize("part_bytes", [1, 16 * MiB])
def test_whole_objects_in_at_most_one_get_per_8_mib(
    proxy: S3Proxy, objects: dict[str, bytes], part_bytes: int
) -> None:
    fs = through(proxy)
    options = FetchSettings(part_bytes=part_bytes, concurrency=4)
    for uri, data in objects.items():
        proxy.clear_counts()
        got = fetch_ranges(fs, uri, len(data), settings=options)
        assert bytes(got) == data
        assert gets(proxy, uri) == math.ceil(len(data) / max(part_bytes, MIN_PART_BYTES))
        assert gets(proxy, uri) <= math.ceil(len(data) / (8 * MiB))
        assert proxy.count() == gets(proxy, uri)  # no HEAD, no listing: the size was known


def test_a_byte_range_like_a_zip_member(proxy: S3Proxy, objects: dict[str, bytes]) -> None:
    uri = f"s3://{BUCKET}/objects/{37 * MiB + 123}.bin"
    data = objects[uri]
    fs = through(proxy)
    start, length = 3 * MiB + 7, 20 * MiB + 5
    got = fetch_ranges(fs, uri, length, start=start)
    assert bytes(got) == data[start : start + length]
    assert gets(proxy, uri) == 2 <= math.ceil(length / (8 * MiB))
    assert [r.range for r in proxy.requests] == [
        f"bytes={s}-{e - 1}" for s, e in split_range(start, length, 16 * MiB)
    ]
    # Without a size: the rest of the object, after one HEAD.
    proxy.clear_counts()
    assert bytes(fetch_ranges(fs, uri, start=start)) == data[start:]
    assert proxy.count("HEAD") == 1 and gets(proxy, uri) == math.ceil((len(data) - start) / (16 * MiB))


def test_parts_are_fetched_in_parallel(proxy: S3Proxy, objects: dict[str, bytes]) -> None:
    uri = f"s3://{BUCKET}/objects/{37 * MiB + 123}.bin"
    fs = through(proxy)
    fetch_ranges(fs, uri, len(objects[uri]), settings=FetchSettings(part_bytes=8 * MiB, concurrency=4))
    assert gets(proxy, uri) == 5
    assert proxy.peak_connections >= 2  # several requests were in flight at once


def test_past_the_memory_budget_bytes_stream_to_scratch(
    proxy: S3Proxy, objects: dict[str, bytes], tmp_path: Path
) -> None:
    uri = f"s3://{BUCKET}/objects/{37 * MiB + 123}.bin"
    data = objects[uri]
    fs = through(proxy)
    fs.cat_file(uri, start=0, end=1)  # open the connection pool outside the measurement
    proxy.clear_counts()
    tracemalloc.start()
    try:
        result = fetch(
            fs,
            uri,
            len(data),
            memory_budget=16 * MiB,
            scratch_dir=tmp_path,
            settings=FetchSettings(part_bytes=8 * MiB, concurrency=1),
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(result, FileSlice) and result.offset == 0 and result.size == len(data)
    assert Path(result.path).parent == tmp_path
    assert Path(result.path).read_bytes() == data
    # One 8 MiB part (and the HTTP client's copy of it) at a time, not the 37 MiB object.
    assert peak < 3 * 8 * MiB, peak
    assert gets(proxy, uri) == 5
    small = fetch(fs, uri, 1000, start=5, memory_budget=16 * MiB, scratch_dir=tmp_path)
    assert isinstance(small, bytearray) and bytes(small) == data[5:1005]


def test_an_object_shorter_than_expected_is_a_size_mismatch(
    proxy: S3Proxy, objects: dict[str, bytes]
) -> None:
    uri = f"s3://{BUCKET}/objects/100003.bin"
    fs = through(proxy)
    with pytest.raises(SizeMismatch, match="not 100103") as short:
        fetch_ranges(fs, uri, 100_003 + 100)
    with pytest.raises(SizeMismatch, match="fewer than") as beyond:
        fetch_ranges(fs, uri, 10, start=100_003 + 5)
    for caught in (short, beyond):
        # The object changed under the build: the stage fails (rerun inventory); never a rejection of
        # the product (no ProductError) and no fault a retry would heal.
        assert isinstance(caught.value, BuildFault) and not isinstance(caught.value, ProductError)
        assert not is_transient(caught.value) and "rerun inventory" in str(caught.value)
    with pytest.raises(FileNotFoundError):
        fetch_ranges(fs, f"s3://{BUCKET}/objects/missing.bin", 10)


def test_a_fault_that_heals_is_ridden_out(proxy: S3Proxy, objects: dict[str, bytes]) -> None:
    uri = f"s3://{BUCKET}/objects/{8 * MiB + 1}.bin"
    fs = through(proxy, attempts=1)
    fs.cat_file(uri, start=0, end=1)
    proxy.clear_counts()
    proxy.fail_for(1.0)
    got = fetch_ranges(fs, uri, len(objects[uri]), settings=FetchSettings(retries=6, backoff_seconds=0.25))
    assert bytes(got) == objects[uri]
    assert gets(proxy, uri) == 1  # refused attempts never reached the server


def test_a_persistent_fault_raises_a_transient_error(proxy: S3Proxy, objects: dict[str, bytes]) -> None:
    uri = f"s3://{BUCKET}/objects/{8 * MiB + 1}.bin"
    fs = through(proxy, attempts=1)
    proxy.reset()
    with pytest.raises(TransientError, match="failed 3 times") as caught:
        fetch_ranges(fs, uri, len(objects[uri]), settings=FetchSettings(retries=2, backoff_seconds=0.05))
    assert is_transient(caught.value)
    proxy.heal()
    assert bytes(fetch_ranges(fs, uri, 1000)) == objects[uri][:1000]


class FlakyClient:
    """An S3 client (the `get_object` shape of boto3/botocore) over bytes, whose first `failures`
    requests for each range fail with `error`."""

    def __init__(self, data: bytes, failures: int, error: Exception) -> None:
        self.data, self.failures, self.error = data, failures, error
        self.calls: dict[str, int] = {}

    def get_object(self, Bucket: str, Key: str, Range: str) -> dict:  # noqa: N803 - boto3's names
        assert (Bucket, Key) == ("b", "k")
        self.calls[Range] = self.calls.get(Range, 0) + 1
        if self.calls[Range] <= self.failures:
            raise self.error
        start, end = (int(v) for v in Range.removeprefix("bytes=").split("-"))

        class Body:
            def __init__(self, data: bytes) -> None:
                self.data = data

            def read(self) -> bytes:
                return self.data

            def close(self) -> None:
                pass

        return {"Body": Body(self.data[start : end + 1])}


def test_retries_are_for_transient_faults_only(tmp_path: Path) -> None:
    data = bytes(range(256)) * 100_000  # 25.6 MB: two 16 MiB parts
    quick = FetchSettings(retries=2, backoff_seconds=0.0)
    flaky = FlakyClient(data, failures=2, error=ConnectionResetError(104, "Connection reset by peer"))
    assert bytes(fetch_ranges(flaky, "s3://b/k", len(data), settings=quick)) == data
    assert sorted(flaky.calls.values()) == [3, 3]

    flakier = FlakyClient(data, failures=3, error=ConnectionResetError(104, "Connection reset by peer"))
    with pytest.raises(TransientError):
        fetch_ranges(flakier, "s3://b/k", len(data), settings=quick)
    # Streaming to scratch: a failed fetch leaves no half-written file behind.
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    flakier.calls.clear()
    with pytest.raises(TransientError):
        fetch(flakier, "s3://b/k", len(data), memory_budget=MiB, scratch_dir=scratch, settings=quick)
    assert list(scratch.iterdir()) == []
    got = fetch(flaky, "s3://b/k", 3000, start=7, memory_budget=MiB, scratch_dir=scratch)
    assert isinstance(got, bytearray)  # 3000 bytes fit the memory budget
    assert bytes(got) == data[7:3007]

    broken = FlakyClient(data, failures=1, error=ValueError("a property of the request, not the network"))
    with pytest.raises(ValueError, match="property"):
        fetch_ranges(broken, "s3://b/k", len(data), settings=quick)
    assert max(broken.calls.values()) == 1  # not retried


# A product's files and members -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def product_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One synthetic product as a folder and as a ZIP with stored members (ENVI BIL cube, 17 MB)."""
    from pipeline.enmap.synth import SynthConfig, generate

    out = {}
    for packaging in ("folder", "zip"):
        folder = tmp_path_factory.mktemp(f"fetch-{packaging}")
        config = SynthConfig(
            seed=8,
            sites=1,
            revisits=1,
            overlapping_tiles=0,
            reprocessed=0,
            width=203,
            height=190,
            packagings=(packaging,),
            formats=("BIL",),
            zip_compresslevel=0,
        )
        truth = generate(folder, config)
        out[packaging] = folder / truth.products[0].path
    return out


def _upload(proxy: S3Proxy, local: Path) -> str:
    fs = through(proxy)
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    target = f"{BUCKET}/products/{local.name}"
    if local.is_dir():
        fs.put(str(local) + "/", target + "/", recursive=True)
    else:
        fs.put_file(str(local), target)
    proxy.clear_counts()
    return "s3://" + target


def test_every_member_of_a_zip_in_a_few_merged_gets(
    proxy: S3Proxy, product_files: dict[str, Path], tmp_path: Path
) -> None:
    local = product_files["zip"]
    uri = _upload(proxy, local)
    with open(local, "rb") as handle, zipfile.ZipFile(handle) as archive:
        members = {
            info.filename: Piece(uri, member_data_offset(handle, info), info.compress_size)
            for info in archive.infolist()
            if not info.is_dir()
        }
    data = local.read_bytes()
    fs = through(proxy)
    for budget in (None, 4 * MiB):
        proxy.clear_counts()
        fetched = fetch_product_files(fs, members.values(), memory_budget=budget, scratch_dir=tmp_path)
        for name, piece in members.items():
            got = fetched[piece]
            if budget is None:
                assert isinstance(got, memoryview)
                content = bytes(got)
            else:
                assert isinstance(got, FileSlice)
                with open(got.path, "rb") as handle:
                    handle.seek(got.offset)
                    content = handle.read(got.size)
            assert content == data[piece.start : piece.start + piece.length], name
        wanted = sum(p.length for p in members.values())
        assert gets(proxy, uri) <= math.ceil(wanted / (8 * MiB)) + 1
        assert proxy.count() == gets(proxy, uri)

        # The cube read from the fetched member equals GDAL's read of the ZIP on disk.
        cube_member = next(n for n in members if n.endswith("SPECTRAL_IMAGE.BIL"))
        header = bytes(_content(fetched[members[cube_member[:-4] + ".HDR"]]))
        cube = raw_reader.read(fetched[members[cube_member]], header=header, bands=[0, 100, 223])
        with rasterio.open(f"/vsizip/{local}/{cube_member}") as src:
            np.testing.assert_array_equal(cube, src.read([1, 101, 224]))


def _content(value: memoryview | FileSlice) -> bytes:
    if isinstance(value, FileSlice):
        with open(value.path, "rb") as handle:
            handle.seek(value.offset)
            return handle.read(value.size)
    return bytes(value)


def test_every_file_of_a_folder_product_in_one_get_per_file_or_8_mib(
    proxy: S3Proxy, product_files: dict[str, Path]
) -> None:
    local = product_files["folder"]
    uri = _upload(proxy, local)
    files = {p.name: p.read_bytes() for p in local.iterdir()}
    pieces = {name: Piece(f"{uri}/{name}", 0, len(content)) for name, content in files.items()}
    fs = through(proxy)
    fetched = fetch_product_files(fs, pieces.values())
    for name, piece in pieces.items():
        content = fetched[piece]
        assert isinstance(content, memoryview), name  # without a memory budget every file is in memory
        assert bytes(content) == files[name], name
    for name, piece in pieces.items():
        assert gets(proxy, piece.uri) == math.ceil(piece.length / (16 * MiB)), name
    total = sum(len(c) for c in files.values())
    assert proxy.count("GET") <= math.ceil(total / (8 * MiB)) + len(files)


@pytest.mark.parametrize("tail_bytes", [1024 * 1024, 200])
def test_a_remote_zip_listed_and_read_member_by_member_in_few_gets(
    proxy: S3Proxy, product_files: dict[str, Path], tmp_path: Path, tail_bytes: int
) -> None:
    local = product_files["zip"]
    uri = _upload(proxy, local)
    size = local.stat().st_size
    fs = through(proxy)
    members = list_zip(fs, uri, size, tail_bytes=tail_bytes)
    # One GET of the tail holds the central directory; a tail too short for it costs exactly one more.
    assert gets(proxy, uri) == (1 if tail_bytes > 100_000 else 2)
    with zipfile.ZipFile(local) as archive:
        infos = {info.filename: info for info in archive.infolist()}
        assert sorted(m.name for m in members) == sorted(infos)
        contents = {name: archive.read(name) for name in infos}
    # The pieces tile the archive from the first local header to the central directory.
    assert members[0].piece.start == 0
    for before, after in zip(members, members[1:], strict=False):
        assert before.piece.start + before.piece.length == after.piece.start
    proxy.clear_counts()
    for budget in (None, 4 * MiB):
        fetched = fetch_product_files(
            fs, [m.piece for m in members], memory_budget=budget, scratch_dir=tmp_path
        )
        for member in members:
            data = _content(member_data(member, fetched[member.piece]))
            assert member.compress_type == zipfile.ZIP_STORED
            assert data == contents[member.name], member.name
            assert zlib.crc32(data) == member.crc == infos[member.name].CRC
    # Every member of the 17 MB ZIP, twice (memory, then scratch), in the fewest 8 MiB-or-more GETs.
    assert gets(proxy, uri) == 2 * math.ceil(sum(m.piece.length for m in members) / (16 * MiB))
    assert gets(proxy, uri) <= 2 * math.ceil(size / (8 * MiB))


def test_a_corrupt_remote_zip_is_a_product_error(proxy: S3Proxy, tmp_path: Path) -> None:
    fs = through(proxy)
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    fs.pipe_file(f"{BUCKET}/bad.ZIP", b"PK\x03\x04" + bytes(5000))
    with pytest.raises(ProductError, match="corrupt ZIP"):
        list_zip(fs, f"s3://{BUCKET}/bad.ZIP")


# Whole products (the stages' and the benchmark's entry point) ----------------------------------------


@pytest.mark.parametrize("memory_budget", [64 * MiB, MiB])
def test_fetch_product_brings_whole_objects_in_memory_or_scratch(
    proxy: S3Proxy, objects: dict[str, bytes], tmp_path: Path, memory_budget: int
) -> None:
    """A folder product's files (sizes known: no HEAD) or an archive (one HEAD) come back whole, in one
    GET per part; in memory within the budget, else as files named by their basename in scratch."""
    fs_options = {"client_kwargs": {"endpoint_url": proxy.endpoint_url}, "skip_instance_cache": True}
    names = [f"{size}.bin" for size in (100_003, 8 * MiB + 1, 37 * MiB + 123)]
    members = [(name, len(objects[f"s3://{BUCKET}/objects/{name}"])) for name in names]
    proxy.clear_counts()
    got = fetch_product(
        f"s3://{BUCKET}/objects",
        tmp_path / "scratch",
        storage_options=fs_options,
        memory_budget=memory_budget,
        members=members,
        settings=FetchSettings(part_bytes=8 * MiB),
    )
    assert proxy.count("HEAD") == 0
    for name, size in members:
        uri = f"s3://{BUCKET}/objects/{name}"
        copy = got[uri]
        if memory_budget >= sum(s for _, s in members):
            # A GDAL in-memory file (/vsimem/), written in place.
            assert isinstance(copy, MemoryFile) and copy.name.endswith("/" + name)
            assert bytes(in_memory_view(copy)) == objects[uri]
        else:
            assert copy == str(tmp_path / "scratch" / name)
            assert Path(copy).read_bytes() == objects[uri]
        assert gets(proxy, uri) == math.ceil(size / (8 * MiB))
    for copy in got.values():
        if isinstance(copy, MemoryFile):
            copy.close()  # (closing one removes its whole in-memory folder: all at the end)
    # An archive: the whole object, its size from one HEAD.
    proxy.clear_counts()
    uri = f"s3://{BUCKET}/objects/{37 * MiB + 123}.bin"
    (copy,) = fetch_product(
        uri, tmp_path / "archive", storage_options=fs_options, memory_budget=memory_budget
    ).values()
    if isinstance(copy, MemoryFile):
        data = bytes(in_memory_view(copy))
        copy.close()
    else:
        data = Path(copy).read_bytes()
    assert data == objects[uri]
    assert proxy.count("HEAD") <= 1 and gets(proxy, uri) == math.ceil(len(data) / (16 * MiB))


def test_a_product_over_the_scratch_budget_is_refused_before_any_get(
    proxy: S3Proxy, objects: dict[str, bytes], tmp_path: Path
) -> None:
    uri = f"s3://{BUCKET}/objects/{37 * MiB + 123}.bin"
    fetcher = ProductFetcher({"client_kwargs": {"endpoint_url": proxy.endpoint_url}}, memory_budget=MiB)
    proxy.clear_counts()
    with pytest.raises(ProductError, match="scratch budget"):
        fetcher([(uri, len(objects[uri]))], str(tmp_path), ScratchBudget(8 * MiB))
    assert proxy.count("GET") == 0 and not any(tmp_path.iterdir())


@pytest.mark.parametrize("value", [MiB, 8 * MiB - 1, 0, True, "16MiB"])
def test_manifest_fetch_parts_below_8_mib_are_refused(value: object) -> None:
    with pytest.raises(StorageError, match="fetch_part_bytes"):
        StorageSettings.from_dict({"fetch_part_bytes": value}, environ={})
    assert StorageSettings.from_dict({"fetch_part_bytes": 8 * MiB}, environ={}).fetch_part_bytes == 8 * MiB


def test_a_block_reader_reads_any_range_in_aligned_blocks_each_fetched_once(
    proxy: S3Proxy, objects: dict[str, bytes]
) -> None:
    """Seeded random reads through a BlockReader equal the object's slices (the oracle); every GET is
    one aligned block of the part size (the object's last block shorter), and with room for every block
    none is fetched twice; with room for two, no more than two are held and a re-read of an evicted
    block costs a GET again."""
    uri = f"s3://{BUCKET}/objects/{37 * MiB + 123}.bin"
    data = objects[uri]
    part = 8 * MiB
    blocks = math.ceil(len(data) / part)
    rng = np.random.default_rng(12)
    reads = [(int(s), int(n)) for s, n in zip(rng.integers(0, len(data), 40), rng.integers(0, 3 * MiB, 40))]
    reads += [(len(data) - 10, 100), (0, 1), (part - 1, 2), (len(data), 5)]
    proxy.clear_counts()
    reader = BlockReader(through(proxy), FetchSettings(part_bytes=part), max_blocks=blocks)
    reader.add_sizes({uri: len(data)})
    handle = reader.open(uri)
    for start, length in reads:
        assert reader.read(uri, start, start + length) == data[start : start + length]
        handle.seek(start)
        assert handle.read(length) == data[start : start + length]
    requests = [r for r in proxy.requests if r.method == "GET"]
    ranges = [tuple(int(v) for v in (r.range or "").removeprefix("bytes=").split("-")) for r in requests]
    assert len(set(ranges)) == len(ranges) <= blocks
    assert all(a % part == 0 and b + 1 == min(a + part, len(data)) for a, b in ranges), ranges

    proxy.clear_counts()
    small = BlockReader(through(proxy), FetchSettings(part_bytes=part), max_blocks=2)
    small.add_sizes({uri: len(data)})
    for index in (0, 1, 2, 0):
        assert small.read(uri, index * part, index * part + 10) == data[index * part : index * part + 10]
        assert small.blocks_held <= 2
    assert gets(proxy, uri) == 4  # block 0 was evicted by block 2, so it is fetched again
