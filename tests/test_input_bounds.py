"""Untrusted input costs what the manifest allows and no more, and the environment's faults are not
the product's: bombs (declared or actual) rejected with their sizes, the scratch of killed tasks
cleaned at the next start, and a storage error while listing or reading raised, never a rejection.

Bombs are made cheaply: ZIP headers patched to declare huge sizes, members of zeros that deflate to
almost nothing, and budgets set small in the test manifest.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tarfile
import tracemalloc
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
import psutil
import pytest
import rasterio
import yaml
from rasterio.errors import RasterioIOError

import pipeline.enmap.product as product_module
import pipeline.enmap.zip_members as zip_members
from pipeline.enmap.discovery import ProductSource, discover
from pipeline.enmap.product import OpenedProduct, iter_products, open_product
from pipeline.enmap.product_errors import ProductError, format_size
from pipeline.enmap.scratch import SCRATCH_OWNER, SCRATCH_PREFIX, clean_stale_scratch
from pipeline.enmap.synth import SynthConfig, Truth, generate
from pipeline.errors import TransientError, is_transient
from pipeline.inventory import SceneRecord, inspect_source
from pipeline.manifest import Limits, Manifest
from pipeline.tables import Rejection

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

REPO = Path(__file__).resolve().parent.parent
MiB = 1024**2
GiB = 1024**3


@pytest.fixture(scope="module")
def product(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Truth]:
    """One small GeoTIFF product folder (224 bands, 61 x 53 px)."""
    out = tmp_path_factory.mktemp("bounds-product")
    config = SynthConfig(
        seed=29,
        sites=1,
        revisits=1,
        overlapping_tiles=0,
        reprocessed=0,
        width=61,
        height=53,
        packagings=("folder",),
        formats=("GTiff",),
    )
    return out, generate(out, config)


@pytest.fixture(autouse=True)
def private_scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test its own scratch folder, so what it leaves (or cleans) is its own."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("SPECTRALEARTH_SCRATCH", str(scratch))
    return scratch


def manifest(**limits: int) -> Manifest:
    """The demo manifest with `limits` set as given."""
    raw = yaml.safe_load((REPO / "manifests" / "demo.yaml").read_text())
    return Manifest.from_dict({**raw, "limits": limits})


def copy_product(product: tuple[Path, Truth], target: Path) -> Path:
    out, truth = product
    (p,) = truth.products
    folder = target / p.path
    shutil.copytree(out / p.path, folder)
    return folder


def zip_folder(folder: Path, target: Path, compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(target, "w", compression=compression, compresslevel=1) as archive:
        for path in sorted(folder.iterdir()):
            archive.write(path, f"{folder.name}/{path.name}")
    return target


def declare_size(container: Path, member: str, size: int) -> None:
    """Make the ZIP's local and central headers of `member` declare `size` uncompressed bytes."""
    data = bytearray(container.read_bytes())
    with zipfile.ZipFile(container) as archive:
        info = archive.getinfo(member)
    struct.pack_into("<I", data, info.header_offset + 22, size)  # local header: uncompressed size
    name = member.encode()
    central = data.index(b"PK\x01\x02")
    while True:  # the central directory entry of `member`
        name_length = struct.unpack_from("<H", data, central + 28)[0]
        if bytes(data[central + 46 : central + 46 + name_length]) == name:
            break
        extra, comment = struct.unpack_from("<HH", data, central + 30)
        central += 46 + name_length + extra + comment
    struct.pack_into("<I", data, central + 24, size)
    container.write_bytes(bytes(data))


def only_source(inputs: Path) -> ProductSource:
    sources, rejections = discover([str(inputs)])
    assert rejections == []
    (source,) = sources
    return source


def only_opened(inputs: Path) -> OpenedProduct:
    """The one product under `inputs`, opened (a test that expects it to open)."""
    (opened,) = iter_products(only_source(inputs))
    assert isinstance(opened, OpenedProduct), opened
    return opened


def single_rejection(results: list[SceneRecord | Rejection]) -> Rejection:
    (result,) = results
    assert isinstance(result, Rejection), result
    assert "\n" not in result.reason
    return result


# Bounds ----------------------------------------------------------------------------------------------


def test_metadata_declaring_more_than_the_xml_budget_is_refused_unread(
    product: tuple[Path, Truth], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = copy_product(product, tmp_path / "work")
    (tmp_path / "in").mkdir()
    container = zip_folder(folder, tmp_path / "in" / f"{folder.name}.ZIP")
    member = f"{folder.name}/{folder.name}-METADATA.XML"
    declare_size(container, member, 3 * GiB)

    def no_read(*args: object, **kwargs: object) -> None:
        raise AssertionError("METADATA.XML was read although its header declares more than the budget")

    monkeypatch.setattr(zip_members, "member_data_offset", no_read)
    rejection = single_rejection(inspect_source(only_source(tmp_path / "in"), manifest()))
    assert rejection.reason == f"member {member} inflates to 3.0 GiB, over the 16.0 MiB XML budget"


def test_metadata_inflating_past_its_declared_size_is_cut_off(
    product: tuple[Path, Truth], tmp_path: Path
) -> None:
    """A member that declares a few hundred KiB but inflates to 64 MiB of zeros: inflation stops one
    byte past the declaration, so memory never holds the bomb."""
    folder = copy_product(product, tmp_path / "work")
    (tmp_path / "in").mkdir()
    container = tmp_path / "in" / f"{folder.name}.ZIP"
    member = f"{folder.name}/{folder.name}-METADATA.XML"
    with zipfile.ZipFile(container, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for path in sorted(folder.iterdir()):
            if not path.name.endswith("-METADATA.XML"):
                archive.write(path, f"{folder.name}/{path.name}")
        archive.writestr(member, bytes(64 * MiB))
    with zipfile.ZipFile(container) as archive:
        declared = 2 * archive.getinfo(member).compress_size  # plausible for its compressed size
    declare_size(container, member, declared)
    opened = only_opened(tmp_path / "in")
    tracemalloc.start()
    try:
        with pytest.raises(ProductError, match=f"holds more than {declared} bytes, {declared} declared"):
            opened.metadata_bytes()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * MiB, f"{peak} bytes held while refusing a 64 MiB bomb"


def test_folder_metadata_over_the_xml_budget_is_refused_before_parsing(
    product: tuple[Path, Truth], tmp_path: Path
) -> None:
    folder = copy_product(product, tmp_path / "in")
    (xml,) = folder.glob("*-METADATA.XML")
    text = xml.read_text()
    padding = "<!--" + " " * (2 * MiB) + "-->"
    xml.write_text(text.replace("  <metadata>", padding + "<metadata>", 1))
    size = xml.stat().st_size
    assert size > 2 * MiB
    rejection = single_rejection(inspect_source(only_source(tmp_path / "in"), manifest(xml_bytes=MiB)))
    assert rejection.reason == (f"member {xml.name} holds {format_size(size)}, over the 1.0 MiB XML budget")
    # the same product under a budget that admits it is accepted: only the size decided
    (record,) = inspect_source(only_source(tmp_path / "in"), manifest(xml_bytes=4 * MiB))
    assert isinstance(record, SceneRecord)


def test_members_unpacked_to_scratch_stay_within_the_scratch_budget(
    product: tuple[Path, Truth], tmp_path: Path
) -> None:
    folder = copy_product(product, tmp_path / "work")
    (tmp_path / "in").mkdir()
    zip_folder(folder, tmp_path / "in" / f"{folder.name}.ZIP")
    opened = only_opened(tmp_path / "in")
    cube = next(size for name, size in opened.location.members if name.endswith("-SPECTRAL_IMAGE.TIF"))
    over = Limits(memory_bytes=1, scratch_bytes=cube - 1)
    with pytest.raises(ProductError) as info:
        with open_product(opened.location, unpack=("SPECTRAL_IMAGE",), limits=over):
            pass
    size, budget = format_size(cube), format_size(cube - 1)
    member = f"{folder.name}/{folder.name}-SPECTRAL_IMAGE.TIF"
    assert str(info.value) == f"member {member} unpacks to {size}, over the {budget} scratch budget"
    # a budget of exactly the member's size admits it, into scratch (the memory budget is 1 byte)
    with open_product(opened.location, unpack=("SPECTRAL_IMAGE",), limits=Limits(1, cube)) as inside:
        assert Path(inside.spectral_path).stat().st_size == cube


def test_member_over_the_memory_budget_goes_to_scratch_not_memory(
    product: tuple[Path, Truth], tmp_path: Path
) -> None:
    folder = copy_product(product, tmp_path / "work")
    (tmp_path / "in").mkdir()
    zip_folder(folder, tmp_path / "in" / f"{folder.name}.ZIP")
    opened = only_opened(tmp_path / "in")
    with open_product(opened.location, unpack=("SPECTRAL_IMAGE",), limits=Limits(memory_bytes=MiB)) as inside:
        assert Path(inside.spectral_path).is_file()
    with open_product(
        opened.location, unpack=("SPECTRAL_IMAGE",), limits=Limits(memory_bytes=64 * MiB)
    ) as inside:
        assert inside.spectral_path.startswith("/vsimem/")


def delivery_of(zip_bytes: bytes, name: str, target: Path) -> Path:
    with tarfile.open(target, "w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo(f"dims_op_oc_oc-en_000000001_1/ENMAP.HSI.L2A/{name}.ZIP")
        info.size = len(zip_bytes)
        tar.addfile(info, io.BytesIO(zip_bytes))
    return target


def test_tar_delivery_unpacking_past_the_scratch_budget_is_rejected(
    product: tuple[Path, Truth], tmp_path: Path, private_scratch: Path
) -> None:
    """A 40 MiB 'product ZIP' of zeros in a tar.gz of a few kB: refused before a byte is unpacked."""
    (tmp_path / "in").mkdir()
    (p,) = product[1].products
    delivery = delivery_of(
        bytes(40 * MiB), p.scene_id, tmp_path / "in" / "dims_op_oc_oc-en_000000001_1.tar.gz"
    )
    assert delivery.stat().st_size < MiB
    rejection = single_rejection(
        inspect_source(only_source(tmp_path / "in"), manifest(scratch_bytes=16 * MiB))
    )
    assert rejection.reason == (
        f"member dims_op_oc_oc-en_000000001_1/ENMAP.HSI.L2A/{p.scene_id}.ZIP unpacks to 40.0 MiB, "
        "over the 16.0 MiB scratch budget"
    )
    assert list(private_scratch.iterdir()) == [], "nothing is left in scratch"


def test_tar_entry_declaring_more_than_the_scratch_budget_stops_the_stream(
    product: tuple[Path, Truth], tmp_path: Path
) -> None:
    """Any entry of a delivery (not only the product ZIP) larger than a product may unpack is not
    streamed through: that would inflate it all."""
    (tmp_path / "in").mkdir()
    delivery = tmp_path / "in" / "dims_op_oc_oc-en_000000001_1.tar.gz"
    with tarfile.open(delivery, "w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo("dims_op_oc_oc-en_000000001_1/padding.bin")
        info.size = 40 * MiB
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    rejection = single_rejection(
        inspect_source(only_source(tmp_path / "in"), manifest(scratch_bytes=16 * MiB))
    )
    assert rejection.reason == (
        "entry dims_op_oc_oc-en_000000001_1/padding.bin declares 40.0 MiB, over the 16.0 MiB scratch budget"
    )


def test_open_product_of_a_corrupted_delivery_is_a_product_error(
    product: tuple[Path, Truth], tmp_path: Path
) -> None:
    folder = copy_product(product, tmp_path / "work")
    inner = zip_folder(folder, tmp_path / "work" / f"{folder.name}.ZIP")
    (tmp_path / "in").mkdir()
    delivery = delivery_of(inner.read_bytes(), folder.name, tmp_path / "in" / "d.tar.gz")
    opened = only_opened(tmp_path / "in")
    delivery.write_bytes(delivery.read_bytes()[: delivery.stat().st_size // 2])
    with pytest.raises(ProductError, match="^corrupt archive: "):
        with open_product(opened.location):
            pass


def test_tar_delivery_budget_boundary(product: tuple[Path, Truth], tmp_path: Path) -> None:
    folder = copy_product(product, tmp_path / "work")
    inner = zip_folder(folder, tmp_path / "work" / f"{folder.name}.ZIP")
    (tmp_path / "in").mkdir()
    delivery_of(inner.read_bytes(), folder.name, tmp_path / "in" / "dims_op_oc_oc-en_000000001_1.tar.gz")
    size = inner.stat().st_size
    rejection = single_rejection(
        inspect_source(only_source(tmp_path / "in"), manifest(scratch_bytes=size - 1))
    )
    assert "over the" in rejection.reason and "scratch budget" in rejection.reason
    (record,) = inspect_source(only_source(tmp_path / "in"), manifest(scratch_bytes=size))
    assert isinstance(record, SceneRecord) and record.packaging == "targz"


@pytest.mark.parametrize("packaging", ["folder", "zip"])
def test_cube_with_bytes_appended_is_rejected(
    product: tuple[Path, Truth], tmp_path: Path, packaging: str
) -> None:
    """A cube member with 80 MiB appended beyond what its raster header needs would pass into a
    scratch write of all of it: inventory rejects it, with the sizes."""
    folder = copy_product(product, tmp_path / "work")
    (cube,) = folder.glob("*-SPECTRAL_IMAGE.TIF")
    original = cube.stat().st_size
    with open(cube, "ab") as handle:
        handle.write(bytes(80 * MiB))
    inputs = tmp_path / "in"
    inputs.mkdir()
    if packaging == "zip":
        zip_folder(folder, inputs / f"{folder.name}.ZIP")
    else:
        shutil.move(folder, inputs / folder.name)
    rejection = single_rejection(inspect_source(only_source(inputs), manifest()))
    assert rejection.scene_id == folder.name
    assert rejection.reason.startswith("raster SPECTRAL_IMAGE.TIF holds 81.")
    assert rejection.reason.endswith("appended beyond it") and ": 80." in rejection.reason
    assert original < 2 * MiB


def test_a_few_bytes_after_the_data_are_tolerated(product: tuple[Path, Truth], tmp_path: Path) -> None:
    folder = copy_product(product, tmp_path / "in")
    (cube,) = folder.glob("*-SPECTRAL_IMAGE.TIF")
    with open(cube, "ab") as handle:
        handle.write(bytes(4096))
    (record,) = inspect_source(only_source(tmp_path / "in"), manifest())
    assert isinstance(record, SceneRecord)


# Scratch of killed tasks -----------------------------------------------------------------------------


def dead_pid() -> tuple[int, float]:
    """The pid and start time of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.2)"])
    started = psutil.Process(child.pid).create_time()
    child.wait()
    return child.pid, started


def scratch_folder(base: Path, name: str, owner: dict | None) -> Path:
    folder = base / f"{SCRATCH_PREFIX}{name}"
    folder.mkdir()
    (folder / "product.zip").write_bytes(b"left behind")
    if owner is not None:
        (folder / SCRATCH_OWNER).write_text(json.dumps(owner))
    return folder


def test_stale_scratch_is_removed_live_scratch_kept(tmp_path: Path, private_scratch: Path) -> None:
    host = socket.gethostname()
    pid, started = dead_pid()
    me = psutil.Process(os.getpid())
    dead = scratch_folder(private_scratch, "dead", {"host": host, "pid": pid, "started": started})
    live = scratch_folder(private_scratch, "live", {"host": host, "pid": me.pid, "started": me.create_time()})
    reused = scratch_folder(private_scratch, "reused", {"host": host, "pid": me.pid, "started": 1.0})
    elsewhere = scratch_folder(
        private_scratch, "elsewhere", {"host": host + "-other", "pid": pid, "started": 0}
    )
    fresh_unowned = scratch_folder(private_scratch, "fresh-unowned", None)
    old_unowned = scratch_folder(private_scratch, "old-unowned", None)
    os.utime(old_unowned, (1, 1))
    unrelated = private_scratch / "someone-elses"
    unrelated.mkdir()

    removed = clean_stale_scratch()
    assert sorted(removed) == sorted(str(p) for p in (dead, reused, old_unowned))
    assert not dead.exists() and not reused.exists() and not old_unowned.exists()
    assert live.exists() and elsewhere.exists() and fresh_unowned.exists() and unrelated.exists()


def test_discover_cleans_stale_scratch_first(
    product: tuple[Path, Truth], tmp_path: Path, private_scratch: Path
) -> None:
    pid, started = dead_pid()
    dead = scratch_folder(
        private_scratch, "dead", {"host": socket.gethostname(), "pid": pid, "started": started}
    )
    copy_product(product, tmp_path / "in")
    discover([str(tmp_path / "in")])
    assert not dead.exists()


def test_scratch_of_a_killed_task_is_removed_at_the_next_start(
    product: tuple[Path, Truth], tmp_path: Path, private_scratch: Path
) -> None:
    """A task SIGKILLed while it holds an unpacked tar.gz delivery leaves its scratch folder; the next
    start removes it."""
    folder = copy_product(product, tmp_path / "work")
    inner = zip_folder(folder, tmp_path / "work" / f"{folder.name}.ZIP")
    delivery = delivery_of(inner.read_bytes(), folder.name, tmp_path / "delivery.tar.gz")
    script = (
        "import sys, time\n"
        "from pipeline.enmap.discovery import ProductSource\n"
        "from pipeline.enmap.product import iter_products\n"
        "for item in iter_products(ProductSource('tar', sys.argv[1])):\n"
        "    print(item.local_zip, flush=True)\n"
        "    time.sleep(120)\n"
    )
    task = subprocess.Popen(
        [sys.executable, "-c", script, str(delivery)], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    assert task.stdout is not None  # stdout=PIPE
    try:
        local_zip = Path(task.stdout.readline().strip())
    finally:
        task.kill()
        task.wait()
        task.stdout.close()
    left = local_zip.parent
    assert left.parent == private_scratch and left.name.startswith(SCRATCH_PREFIX)
    assert local_zip.stat().st_size == inner.stat().st_size, "the killed task left its unpacked ZIP"
    assert json.loads((left / SCRATCH_OWNER).read_text())["pid"] == task.pid
    assert clean_stale_scratch() == [str(left)]
    assert not left.exists()


def test_scratch_is_owned_while_open_and_gone_after(
    product: tuple[Path, Truth], tmp_path: Path, private_scratch: Path
) -> None:
    folder = copy_product(product, tmp_path / "work")
    inner = zip_folder(folder, tmp_path / "work" / f"{folder.name}.ZIP")
    (tmp_path / "in").mkdir()
    delivery_of(inner.read_bytes(), folder.name, tmp_path / "in" / "d.tar.gz")
    opened = only_opened(tmp_path / "in")
    with open_product(opened.location) as inside:
        assert inside.local_zip is not None  # a tar.gz delivery's inner ZIP is unpacked
        scratch = Path(inside.local_zip).parent
        owner = json.loads((scratch / SCRATCH_OWNER).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        assert clean_stale_scratch() == [], "a live owner's scratch is kept"
    assert not scratch.exists()


# Faults of the environment raise; properties of the product are rejections -----------------------------


def test_unreadable_raster_raises_instead_of_rejecting(
    product: tuple[Path, Truth], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy_product(product, tmp_path / "in")
    source = only_source(tmp_path / "in")
    real_open = rasterio.open

    def failing_open(path: str, *args: Any, **kwargs: Any) -> Any:
        if str(path).endswith("-QL_QUALITY_CLOUD.TIF"):
            raise RasterioIOError(f"{path}: Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("pipeline.inventory.rasterio.open", failing_open)
    with pytest.raises(TransientError, match="QL_QUALITY_CLOUD.TIF: .*Permission denied") as info:
        inspect_source(source, manifest())
    assert is_transient(info.value)


def test_curl_error_from_gdal_raises(
    product: tuple[Path, Truth], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy_product(product, tmp_path / "in")
    source = only_source(tmp_path / "in")

    def failing_open(path: str, *args: object, **kwargs: object) -> None:
        raise RasterioIOError("CURL error: Failed to connect to 127.0.0.1 port 9: Connection refused")

    monkeypatch.setattr("pipeline.inventory.rasterio.open", failing_open)
    with pytest.raises(TransientError):
        inspect_source(source, manifest())


def test_raster_gdal_cannot_read_is_still_a_rejection(product: tuple[Path, Truth], tmp_path: Path) -> None:
    folder = copy_product(product, tmp_path / "in")
    (cloud,) = folder.glob("*-QL_QUALITY_CLOUD.TIF")
    cloud.write_bytes(b"this is not a TIFF" * 100)
    rejection = single_rejection(inspect_source(only_source(tmp_path / "in"), manifest()))
    assert rejection.reason.startswith("unreadable raster QL_QUALITY_CLOUD.TIF")


def test_permission_denied_on_metadata_raises(
    product: tuple[Path, Truth], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy_product(product, tmp_path / "in")
    source = only_source(tmp_path / "in")
    real_open = fsspec.open

    def failing_open(uri: str, *args: Any, **kwargs: Any) -> Any:
        if str(uri).endswith("-METADATA.XML"):
            raise PermissionError(errno.EACCES, "Permission denied", str(uri))
        return real_open(uri, *args, **kwargs)

    monkeypatch.setattr(product_module.fsspec, "open", failing_open)
    with pytest.raises(PermissionError):
        inspect_source(source, manifest())


def test_chmod_000_metadata_raises(product: tuple[Path, Truth], tmp_path: Path) -> None:
    folder = copy_product(product, tmp_path / "in")
    (xml,) = folder.glob("*-METADATA.XML")
    source = only_source(tmp_path / "in")
    xml.chmod(0)
    try:
        if os.access(xml, os.R_OK):
            pytest.skip("running as a user whom chmod 000 does not stop (root)")
        with pytest.raises(PermissionError):
            inspect_source(source, manifest())
    finally:
        xml.chmod(0o644)


def test_unlistable_input_raises(
    product: tuple[Path, Truth], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy_product(product, tmp_path / "in")
    real_scandir = os.scandir

    def failing_scandir(path: str = ".") -> Iterator[os.DirEntry[str]]:
        if str(path) == str(tmp_path / "in"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", failing_scandir)
    with pytest.raises(PermissionError):
        discover([str(tmp_path / "in")])


def test_connection_refused_opening_a_zip_raises(
    product: tuple[Path, Truth], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = copy_product(product, tmp_path / "work")
    (tmp_path / "in").mkdir()
    zip_folder(folder, tmp_path / "in" / f"{folder.name}.ZIP")
    source = only_source(tmp_path / "in")

    def refused(*args: object, **kwargs: object) -> None:
        raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")

    monkeypatch.setattr(product_module.fsspec, "open", refused)
    with pytest.raises(ConnectionRefusedError):
        inspect_source(source, manifest())


class _ResetAfter(io.RawIOBase):
    """A file whose connection resets after `limit` bytes."""

    def __init__(self, data: bytes, limit: int) -> None:
        self._data, self._limit, self._pos = data, limit, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        if self._pos >= self._limit:
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        view = memoryview(buffer).cast("B")
        chunk = self._data[self._pos : min(self._pos + len(view), self._limit)]
        view[: len(chunk)] = chunk
        self._pos += len(chunk)
        return len(chunk)


def test_connection_reset_while_streaming_a_tar_raises(
    product: tuple[Path, Truth], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = copy_product(product, tmp_path / "work")
    inner = zip_folder(folder, tmp_path / "work" / f"{folder.name}.ZIP")
    (tmp_path / "in").mkdir()
    delivery = delivery_of(inner.read_bytes(), folder.name, tmp_path / "in" / "d.tar.gz")
    source = only_source(tmp_path / "in")
    data = delivery.read_bytes()

    class Opener:
        def __init__(self, *args: object, **kwargs: object) -> None:
            self.handle = io.BufferedReader(_ResetAfter(data, len(data) // 2))

        def __enter__(self) -> io.BufferedReader[_ResetAfter]:
            return self.handle

        def __exit__(self, *exc: object) -> None:
            self.handle.close()

    monkeypatch.setattr(product_module.fsspec, "open", Opener)
    with pytest.raises(ConnectionResetError):
        inspect_source(source, manifest())


def test_truncated_tar_is_still_a_rejection(product: tuple[Path, Truth], tmp_path: Path) -> None:
    folder = copy_product(product, tmp_path / "work")
    inner = zip_folder(folder, tmp_path / "work" / f"{folder.name}.ZIP")
    (tmp_path / "in").mkdir()
    delivery = delivery_of(inner.read_bytes(), folder.name, tmp_path / "in" / "d.tar.gz")
    delivery.write_bytes(delivery.read_bytes()[: delivery.stat().st_size // 2])
    rejection = single_rejection(inspect_source(only_source(tmp_path / "in"), manifest()))
    assert rejection.reason.startswith("corrupt archive:")


def test_corrupt_zip_is_still_a_rejection(product: tuple[Path, Truth], tmp_path: Path) -> None:
    (p,) = product[1].products
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / f"{p.scene_id}.ZIP").write_bytes(b"PK\x03\x04" + bytes(range(256)) * 40)
    rejection = single_rejection(inspect_source(only_source(tmp_path / "in"), manifest()))
    assert rejection.reason.startswith("corrupt ZIP")
