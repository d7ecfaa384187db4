"""inventory on synthetic products in every packaging, and every kind of bad input the SPEC names.

Each bad-input test puts one broken product beside two good ones and checks that the broken one is
rejected with its one-line reason while the good ones go through.
"""

from __future__ import annotations

import io
import shutil
import tarfile
import zipfile
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.engine import StageResult
from pipeline.enmap.names import ProductName
from pipeline.enmap.synth import SynthConfig, Truth, generate
from pipeline.inventory import REJECTED_TABLE, SCENES_TABLE, SceneRecord, records_from_frame, run_inventory
from pipeline.manifest import Manifest
from pipeline.scheduler import Scheduler
from pipeline.storage import BuildStore

REPO = Path(__file__).resolve().parent.parent
SYNC = Scheduler("synchronous", progress=False)


@pytest.fixture(scope="session")
def small_products(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Truth]:
    """Three dates of one site as folders (GeoTIFF): two stay good, the third is the victim."""
    out = tmp_path_factory.mktemp("small-products")
    config = SynthConfig(
        seed=11,
        sites=1,
        revisits=3,
        overlapping_tiles=0,
        reprocessed=0,
        width=200,
        height=190,
        packagings=("folder",),
        formats=("GTiff",),
    )
    return out, generate(out, config)


@pytest.fixture(scope="session")
def mixed_products(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Truth]:
    """Every packaging and format, with overlapping tiles and a reprocessed version."""
    out = tmp_path_factory.mktemp("mixed-products")
    config = SynthConfig(
        seed=5, sites=2, revisits=2, overlapping_tiles=1, reprocessed=1, width=200, height=190
    )
    return out, generate(out, config)


@pytest.fixture
def manifest() -> Manifest:
    return Manifest.from_yaml(REPO / "manifests" / "demo.yaml")


def inventory(
    inputs: list[Path | str], build: Path, manifest: Manifest
) -> tuple[StageResult, list[SceneRecord], list[dict[str, Any]]]:
    store = BuildStore(str(build))
    result = run_inventory(manifest, store, [str(i) for i in inputs], SYNC)
    scenes = records_from_frame(store.read_geodataframe(SCENES_TABLE))
    rejected = store.read_table(REJECTED_TABLE).to_pylist()
    return result, scenes, rejected


def with_victim(small_products: tuple[Path, Truth], tmp_path: Path) -> tuple[Path, list[str], Path]:
    """Copy the two good products and the victim into a fresh input folder."""
    out, truth = small_products
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for product in truth.products:
        shutil.copytree(out / product.path, inputs / product.path)
    good = [p.scene_id for p in truth.products[:2]]
    victim = inputs / truth.products[2].path
    return inputs, good, victim


def test_every_packaging_and_format_is_accepted(
    mixed_products: tuple[Path, Truth], tmp_path: Path, manifest: Manifest
) -> None:
    out, truth = mixed_products
    result, scenes, rejected = inventory([out], tmp_path / "build", manifest)
    assert rejected == []
    assert sorted(s.scene_id for s in scenes) == sorted(p.scene_id for p in truth.products)
    assert {p.packaging for p in truth.products} == {"folder", "zip", "targz", "ard"}
    assert {p.format for p in truth.products} >= {"GTiff", "BSQ", "BIL", "BIP", "COG"}
    by_id = {s.scene_id: s for s in scenes}
    for product in truth.products:
        scene = by_id[product.scene_id]
        assert scene.epsg == product.epsg
        assert scene.transform == tuple(product.transform)
        assert (scene.width, scene.height, scene.band_count) == (product.width, product.height, 224)
        assert (scene.datatake_id, scene.tile_id) == (product.datatake, product.tile)
        assert scene.processor_version == product.processor_version
        assert scene.variant == ("ard" if product.packaging == "ard" else "standard")
        expected_packaging = "folder" if product.packaging == "ard" else product.packaging
        assert scene.packaging == expected_packaging
        assert scene.cloud_cover == product.quality_percent["cloudCover"]
        assert scene.no_data_bands == tuple(product.no_data_bands)
        # On the lattice, like the real products: pixel corners at 15 m + k x 30 m.
        assert scene.transform[2] % 30 == 15 and scene.transform[5] % 30 == 15
    assert result.counts["scenes_accepted"] == len(truth.products)
    assert result.counts["datatakes"] == len({p.datatake for p in truth.products})


def test_scenes_table_is_geoparquet(
    mixed_products: tuple[Path, Truth], tmp_path: Path, manifest: Manifest
) -> None:
    import geopandas

    out, truth = mixed_products
    inventory([out], tmp_path / "build", manifest)
    frame = geopandas.read_parquet(tmp_path / "build" / SCENES_TABLE)
    assert frame.crs.to_epsg() == 4326
    assert frame.geometry.is_valid.all()
    for product in truth.products:
        (row,) = frame[frame["scene_id"] == product.scene_id].itertuples()
        lon, lat = row.footprint.centroid.x, row.footprint.centroid.y
        ring = product.footprint_lonlat
        assert min(p[0] for p in ring) < lon < max(p[0] for p in ring)
        assert min(p[1] for p in ring) < lat < max(p[1] for p in ring)
    assert {"fingerprint", "source_uri", "start_time", "processor_version", "sun_elevation"} <= set(
        frame.columns
    )


def test_rerun_with_nothing_changed_does_no_work(
    mixed_products: tuple[Path, Truth], tmp_path: Path, manifest: Manifest
) -> None:
    out, _ = mixed_products
    first, _, _ = inventory([out], tmp_path / "build", manifest)
    before = (tmp_path / "build" / SCENES_TABLE).stat().st_mtime_ns
    second, _, _ = inventory([out], tmp_path / "build", manifest)
    assert not first.skipped and second.skipped
    assert (tmp_path / "build" / SCENES_TABLE).stat().st_mtime_ns == before


def test_filters_reject_with_reason(small_products: tuple[Path, Truth], tmp_path: Path) -> None:
    out, truth = small_products
    latest = max(p.date for p in truth.products)
    manifest = Manifest.from_dict({"name": "f", "filters": {"end_date": min(p.date for p in truth.products)}})
    _, scenes, rejected = inventory([out], tmp_path / "build", manifest)
    assert len(scenes) == 1
    assert len(rejected) == 2
    assert all(r["reason"].startswith("filtered: acquired") for r in rejected)
    assert any(latest in r["reason"] for r in rejected)


def assert_only_victim_rejected(
    scenes: list[SceneRecord],
    rejected: list[dict[str, Any]],
    good: list[str],
    reason_part: str,
    victim_id: str | None = None,
) -> None:
    assert sorted(s.scene_id for s in scenes) == sorted(good)
    assert len(rejected) == 1, rejected
    (row,) = rejected
    assert reason_part in row["reason"], row["reason"]
    assert "\n" not in row["reason"]
    assert row["stage"] == "inventory"
    if victim_id is not None:
        assert row["scene_id"] == victim_id


def test_truncated_tiff(small_products: tuple[Path, Truth], tmp_path: Path, manifest: Manifest) -> None:
    inputs, good, victim = with_victim(small_products, tmp_path)
    (cube,) = victim.glob("*-SPECTRAL_IMAGE.TIF")
    data = cube.read_bytes()
    cube.write_bytes(data[: len(data) // 2])
    _, scenes, rejected = inventory([inputs], tmp_path / "build", manifest)
    assert_only_victim_rejected(scenes, rejected, good, "unreadable raster SPECTRAL_IMAGE", victim.name)


@pytest.mark.parametrize("fmt", ["GTiff", "ENVI"])
def test_truncated_cube_inside_a_deflated_zip(
    small_products: tuple[Path, Truth],
    mixed_products: tuple[Path, Truth],
    tmp_path: Path,
    manifest: Manifest,
    fmt: str,
) -> None:
    """Inside a ZIP the last pixel is not read (that would inflate the whole member): the member must
    still hold every byte the raster's header places its data in."""
    inputs, good, victim = with_victim(small_products, tmp_path)
    if fmt == "ENVI":
        out, truth = mixed_products
        source = next(p for p in truth.products if p.packaging == "folder" and p.format == "BIP")
        shutil.rmtree(victim)
        victim = inputs / source.path
        shutil.copytree(out / source.path, victim)
    (cube,) = [p for p in victim.glob("*-SPECTRAL_IMAGE.*") if p.suffix.upper() != ".HDR"]
    data = cube.read_bytes()
    cube.write_bytes(data[: len(data) - 5000])
    with zipfile.ZipFile(inputs / f"{victim.name}.ZIP", "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(victim.iterdir()):
            archive.write(path, f"{victim.name}/{path.name}")
    shutil.rmtree(victim)
    _, scenes, rejected = inventory([inputs], tmp_path / "build", manifest)
    assert_only_victim_rejected(scenes, rejected, good, "truncated, its data ends at byte", victim.name)
    assert rejected[0]["reason"].startswith("unreadable raster SPECTRAL_IMAGE")


def test_malformed_xml(small_products: tuple[Path, Truth], tmp_path: Path, manifest: Manifest) -> None:
    inputs, good, victim = with_victim(small_products, tmp_path)
    (xml,) = victim.glob("*-METADATA.XML")
    xml.write_bytes(xml.read_bytes()[:5000])
    _, scenes, rejected = inventory([inputs], tmp_path / "build", manifest)
    assert_only_victim_rejected(scenes, rejected, good, "not well-formed", victim.name)


def test_xml_missing_required_element(
    small_products: tuple[Path, Truth], tmp_path: Path, manifest: Manifest
) -> None:
    inputs, good, victim = with_victim(small_products, tmp_path)
    (xml,) = victim.glob("*-METADATA.XML")
    text = xml.read_text()
    start, end = text.index("<orbitNo>"), text.index("</orbitNo>") + len("</orbitNo>")
    xml.write_text(text[:start] + text[end:])
    _, scenes, rejected = inventory([inputs], tmp_path / "build", manifest)
    assert_only_victim_rejected(
        scenes, rejected, good, "misses required element specific/orbitNo", victim.name
    )


def test_xml_with_external_entity(
    small_products: tuple[Path, Truth], tmp_path: Path, manifest: Manifest
) -> None:
    inputs, good, victim = with_victim(small_products, tmp_path)
    (xml,) = victim.glob("*-METADATA.XML")
    text = xml.read_text()
    body = text.split("?>", 1)[1] if text.startswith("<?xml") else text
    doctype = '<!DOCTYPE level_X [<!ENTITY leak SYSTEM "file:///etc/passwd">]>\n'
    xml.write_text(doctype + body.replace("<orbitDirection>", "<orbitDirection>&leak;", 1))
    _, scenes, rejected = inventory([inputs], tmp_path / "build", manifest)
    assert_only_victim_rejected(scenes, rejected, good, "refused", victim.name)


def test_band_count_disagrees_with_metadata(
    small_products: tuple[Path, Truth], tmp_path: Path, manifest: Manifest
) -> None:
    inputs, good, victim = with_victim(small_products, tmp_path)
    (xml,) = victim.glob("*-METADATA.XML")
    text = xml.read_text()
    characterisation = text.index("<bandCharacterisation>")
    start = text.index('<bandID number="224">', characterisation)
    end = text.index("</bandID>", start) + len("</bandID>")
    xml.write_text(text[:start] + text[end:])
    _, scenes, rejected = inventory([inputs], tmp_path / "build", manifest)
    assert_only_victim_rejected(
        scenes, rejected, good, "SPECTRAL_IMAGE has 224 bands, METADATA.XML describes 223", victim.name
    )


def test_crs_disagrees_with_metadata(
    small_products: tuple[Path, Truth], tmp_path: Path, manifest: Manifest
) -> None:
    inputs, good, victim = with_victim(small_products, tmp_path)
    (xml,) = victim.glob("*-METADATA.XML")
    text = xml.read_text()
    zone = int(text.split("<projection>UTM_Zone", 1)[1].split("_", 1)[0])
    xml.write_text(text.replace(f"UTM_Zone{zone}_North", f"UTM_Zone{zone + 1}_North"))
    _, scenes, rejected = inventory([inputs], tmp_path / "build", manifest)
    assert_only_victim_rejected(
        scenes, rejected, good, f"disagrees with METADATA.XML UTM_Zone{zone + 1}_North"
    )


def test_missing_listed_file(small_products: tuple[Path, Truth], tmp_path: Path, manifest: Manifest) -> None:
    inputs, good, victim = with_victim(small_products, tmp_path)
    (cloud,) = victim.glob("*-QL_QUALITY_CLOUD.TIF")
    cloud.unlink()
    _, scenes, rejected = inventory([inputs], tmp_path / "build", manifest)
    assert_only_victim_rejected(scenes, rejected, good, "missing file listed in METADATA.XML", victim.name)


def test_corrupt_zip(small_products: tuple[Path, Truth], tmp_path: Path, manifest: Manifest) -> None:
    inputs, good, victim = with_victim(small_products, tmp_path)
    shutil.rmtree(victim)
    broken = inputs / f"{victim.name}.ZIP"
    broken.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 40)
    _, scenes, rejected = inventory([inputs], tmp_path / "build", manifest)
    assert_only_victim_rejected(scenes, rejected, good, "corrupt ZIP")
    assert rejected[0]["source_uri"] == str(broken)


def _zip_folder(folder: Path, target: Path, extra: dict[str, bytes] | None = None) -> None:
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED) as archive:
        for path in sorted(folder.iterdir()):
            archive.write(path, f"{folder.name}/{path.name}")
        for name, data in (extra or {}).items():
            archive.writestr(name, data)


def _delivery_with(product_zip: Path, delivery: Path, bad: tarfile.TarInfo, payload: bytes = b"") -> None:
    """A tar.gz delivery holding the product ZIP and, after it, one bad entry (so a streaming reader
    has already read the product when it meets the entry)."""
    with tarfile.open(delivery, "w:gz") as tar:
        tar.add(product_zip, arcname=f"{delivery.name.split('.')[0]}/ENMAP.HSI.L2A/{product_zip.name}")
        tar.addfile(bad, io.BytesIO(payload) if payload else None)


def _escaping_entry(kind: str) -> tuple[tarfile.TarInfo, bytes]:
    if kind == "path":
        info = tarfile.TarInfo("../../escaped.txt")
        info.size = len(b"escaped")
        return info, b"escaped"
    info = tarfile.TarInfo("delivery/ENMAP.HSI.L2A/link")
    info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
    info.linkname = "../../../../etc/passwd" if kind == "symlink" else "../outside.ZIP"
    return info, b""


@pytest.mark.parametrize("kind", ["path", "symlink", "hardlink"])
def test_archive_entry_escaping_the_folder_rejects_the_archive_whole(
    small_products: tuple[Path, Truth], tmp_path: Path, manifest: Manifest, kind: str
) -> None:
    """A tar.gz delivery with an entry that leaves the extraction folder (a path, a symlink or a hard
    link) is not a genuine delivery: the whole archive is rejected with one line, its product too
    (although it was read before the entry), and nothing is written outside."""
    inputs, good, victim = with_victim(small_products, tmp_path)
    product_zip = tmp_path / f"{victim.name}.ZIP"
    _zip_folder(victim, product_zip)
    shutil.rmtree(victim)
    delivery = inputs / "dims_op_oc_oc-en_000000001_1.tar.gz"
    bad, payload = _escaping_entry(kind)
    _delivery_with(product_zip, delivery, bad, payload)
    _, scenes, rejected = inventory([inputs], tmp_path / "build", manifest)
    assert sorted(s.scene_id for s in scenes) == sorted(good)
    (row,) = rejected
    assert row["source_uri"] == str(delivery) and row["scene_id"] is None
    assert row["reason"].startswith("archive rejected whole: entry") and "\n" not in row["reason"]
    assert repr(bad.name) in row["reason"]
    assert not (tmp_path / "escaped.txt").exists() and not (inputs.parent.parent / "escaped.txt").exists()


def test_archive_symlink_inside_its_folder_is_harmless(
    small_products: tuple[Path, Truth], tmp_path: Path, manifest: Manifest
) -> None:
    inputs, good, victim = with_victim(small_products, tmp_path)
    product_zip = tmp_path / f"{victim.name}.ZIP"
    _zip_folder(victim, product_zip)
    shutil.rmtree(victim)
    delivery = inputs / "dims_op_oc_oc-en_000000003_1.tar.gz"
    link = tarfile.TarInfo("dims_op_oc_oc-en_000000003_1/ENMAP.HSI.L2A/latest")
    link.type, link.linkname = tarfile.SYMTYPE, product_zip.name
    _delivery_with(product_zip, delivery, link)
    _, scenes, rejected = inventory([inputs], tmp_path / "build", manifest)
    assert sorted(s.scene_id for s in scenes) == sorted([*good, victim.name]) and rejected == []


def test_zip_entry_escaping_the_folder_rejects_the_zip_whole(
    small_products: tuple[Path, Truth], tmp_path: Path, manifest: Manifest
) -> None:
    inputs, good, victim = with_victim(small_products, tmp_path)
    product_zip = inputs / f"{victim.name}.ZIP"
    _zip_folder(victim, product_zip, extra={"../../evil.sh": b"#!/bin/sh\n"})
    shutil.rmtree(victim)
    _, scenes, rejected = inventory([inputs], tmp_path / "build", manifest)
    assert sorted(s.scene_id for s in scenes) == sorted(good)
    (row,) = rejected
    assert row["source_uri"] == str(product_zip)
    assert row["reason"] == "archive rejected whole: entry '../../evil.sh' escapes its folder"


def test_corrupt_zip_inside_tar(
    small_products: tuple[Path, Truth], tmp_path: Path, manifest: Manifest
) -> None:
    inputs, good, victim = with_victim(small_products, tmp_path)
    shutil.rmtree(victim)
    delivery = inputs / "dims_op_oc_oc-en_000000002_1.tar.gz"
    with tarfile.open(delivery, "w:gz") as tar:
        payload = b"not a zip at all" * 100
        info = tarfile.TarInfo(f"dims_op_oc_oc-en_000000002_1/ENMAP.HSI.L2A/{victim.name}.ZIP")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    _, scenes, rejected = inventory([inputs], tmp_path / "build", manifest)
    assert_only_victim_rejected(scenes, rejected, good, "corrupt ZIP")


def test_empty_input(tmp_path: Path, manifest: Manifest) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result, scenes, rejected = inventory([empty], tmp_path / "build", manifest)
    assert scenes == [] and result.counts["scenes_accepted"] == 0
    assert rejected == [
        {
            "source_uri": str(empty),
            "scene_id": None,
            "stage": "inventory",
            "reason": f"no EnMAP L2A product found under {empty}",
        }
    ]


def test_empty_input_cli_is_one_line_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    runner = CliRunner()
    result = runner.invoke(
        main,
        [
            "inventory",
            "--manifest",
            str(REPO / "manifests" / "demo.yaml"),
            "--build",
            str(tmp_path / "build"),
            "--input",
            str(empty),
            "--scheduler",
            "synchronous",
        ],
    )
    assert result.exit_code == 2
    error_lines = [line for line in result.output.splitlines() if line.startswith("spectralearth: error:")]
    assert len(error_lines) == 1 and "no product accepted" in error_lines[0]


def test_missing_input_path(tmp_path: Path, manifest: Manifest) -> None:
    _, scenes, rejected = inventory([tmp_path / "nowhere"], tmp_path / "build", manifest)
    assert scenes == []
    assert rejected[0]["reason"] == f"input does not exist: {tmp_path / 'nowhere'}"


def test_scene_list_file(small_products: tuple[Path, Truth], tmp_path: Path, manifest: Manifest) -> None:
    out, truth = small_products
    listing = tmp_path / "scenes.txt"
    listing.write_text("# two of three\n" + "\n".join(str(out / p.path) for p in truth.products[:2]) + "\n")
    _, scenes, rejected = inventory([listing], tmp_path / "build", manifest)
    assert sorted(s.scene_id for s in scenes) == sorted(p.scene_id for p in truth.products[:2])
    assert rejected == []


def test_same_product_twice_is_kept_once(
    small_products: tuple[Path, Truth], tmp_path: Path, manifest: Manifest
) -> None:
    out, truth = small_products
    first = truth.products[0]
    copy = tmp_path / "copy"
    shutil.copytree(out / first.path, copy / first.path)
    _, scenes, rejected = inventory([out, copy], tmp_path / "build", manifest)
    assert len(scenes) == len(truth.products)
    (row,) = rejected
    assert row["scene_id"] == first.scene_id and "same product already found" in row["reason"]


def test_unknown_manifest_key_is_one_line_cli_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nfilters:\n  max_clouds: 3\n")
    result = CliRunner().invoke(
        main, ["inventory", "--manifest", str(bad), "--build", str(tmp_path / "b"), "--input", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "unknown key 'filters.max_clouds'" in result.output


# Inputs as delivered ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ard_spellings(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], tuple[Path, Truth]]:
    """One small ARD product per delivered spelling of its rasters and metadata."""
    made = {}
    for raster, metadata in [("TIF", "XML.XML"), ("tiff", "XML.XML"), ("TIF", "xml"), ("tiff", "XML")]:
        out = tmp_path_factory.mktemp(f"ard-{raster}-{metadata}")
        config = SynthConfig(
            seed=17,
            sites=1,
            revisits=1,
            overlapping_tiles=0,
            reprocessed=0,
            width=83,
            height=71,
            packagings=("ard",),
            ard_raster_extension=raster,
            ard_metadata_extension=metadata,
        )
        made[(raster, metadata)] = (out, generate(out, config))
    return made


@pytest.mark.parametrize(
    "spelling", [("TIF", "XML.XML"), ("tiff", "XML.XML"), ("TIF", "xml"), ("tiff", "XML")]
)
@pytest.mark.parametrize("packaging", ["folder", "zip"])
def test_ard_spellings_are_read_like_the_others(
    ard_spellings: dict[tuple[str, str], tuple[Path, Truth]],
    tmp_path: Path,
    manifest: Manifest,
    spelling: tuple[str, str],
    packaging: str,
) -> None:
    """SPEC Input: every raster `-<LAYER>_COG.TIF` or `_COG.tiff`, the metadata `-METADATA.XML`,
    `.xml` or `.XML.XML` (DLR's portal): found, resolved from the listing and accepted."""
    out, truth = ard_spellings[spelling]
    (product,) = truth.products
    raster, metadata = spelling
    files = sorted(p.name for p in (out / product.path).iterdir())
    assert f"{product.scene_id}-SPECTRAL_IMAGE_COG.{raster}" in files
    assert f"{product.scene_id}-METADATA.{metadata}" in files
    inputs = out
    if packaging == "zip":
        inputs = tmp_path / "zipped"
        inputs.mkdir()
        _zip_folder(out / product.path, inputs / f"{product.scene_id}.ZIP")
    result, scenes, rejected = inventory([inputs], tmp_path / "build", manifest)
    assert rejected == []
    (scene,) = scenes
    assert scene.scene_id == product.scene_id and scene.variant == "ard"
    assert scene.packaging == packaging
    assert (scene.width, scene.height, scene.band_count) == (83, 71, 224)


def test_synth_default_ard_spelling_is_unchanged(
    ard_spellings: dict[tuple[str, str], tuple[Path, Truth]],
) -> None:
    """The ARD options default to the spelling the generator always wrote (other tests rely on it)."""
    config = SynthConfig()
    assert (config.ard_raster_extension, config.ard_metadata_extension) == ("tiff", "xml")


# Symlinks in local inputs ------------------------------------------------------------------------------


def test_symlinked_product_folders_inside_the_input_are_followed(
    small_products: tuple[Path, Truth], tmp_path: Path, manifest: Manifest
) -> None:
    """A link to a product folder, a link to a folder of products, and a product whose cube is a link
    to a file elsewhere in the input: every product is found once, nothing is rejected."""
    out, truth = small_products
    root = tmp_path / "root"
    store = root / "store"
    store.mkdir(parents=True)
    for product in truth.products:
        shutil.copytree(out / product.path, store / product.path)
    (root / "by_date").mkdir()
    (root / "by_date" / "first").symlink_to(store / truth.products[0].path, target_is_directory=True)
    (root / "all").symlink_to(store, target_is_directory=True)
    # The third product's files live in a blob folder; its product folder holds links to them.
    third = truth.products[2]
    blobs = root / "blobs"
    shutil.move(store / third.path, blobs)
    linked = root / "linked" / third.path
    linked.mkdir(parents=True)
    for blob in sorted(blobs.iterdir()):
        (linked / blob.name).symlink_to(blob)
    (blobs / "unrelated.txt").write_text("x")
    _, scenes, rejected = inventory([root], tmp_path / "build", manifest)
    assert rejected == [r for r in rejected if "same product already found" in r["reason"]]
    assert sorted(s.scene_id for s in scenes) == sorted(p.scene_id for p in truth.products)
    by_id = {s.scene_id: s for s in scenes}
    assert by_id[third.scene_id].container_uri in (str(linked), str(blobs))


def test_symlink_leaving_the_input_is_reported(
    small_products: tuple[Path, Truth], tmp_path: Path, manifest: Manifest
) -> None:
    out, truth = small_products
    links = tmp_path / "links"
    links.mkdir()
    (links / "product").symlink_to(out / truth.products[0].path, target_is_directory=True)
    (links / "folder-of-products").symlink_to(out, target_is_directory=True)
    _, scenes, rejected = inventory([links], tmp_path / "build", manifest)
    assert scenes == []
    reasons = {r["source_uri"]: r["reason"] for r in rejected}
    for name in ("product", "folder-of-products"):
        reason = reasons[str(links / name)]
        assert reason.startswith("symlink leaves the input:") and "\n" not in reason
        assert f"is outside {links}" in reason


def test_symlink_loops_and_broken_links_do_not_hang(
    small_products: tuple[Path, Truth], tmp_path: Path, manifest: Manifest
) -> None:
    out, truth = small_products
    root = tmp_path / "root"
    shutil.copytree(out / truth.products[0].path, root / truth.products[0].path)
    (root / "loop").symlink_to(root, target_is_directory=True)
    (root / truth.products[0].path / "back").symlink_to(root / truth.products[0].path)
    (root / "self").symlink_to(root / "self")
    (root / "dangling").symlink_to(root / "nowhere")
    _, scenes, rejected = inventory([root], tmp_path / "build", manifest)
    assert [s.scene_id for s in scenes] == [truth.products[0].scene_id]
    reasons = {r["source_uri"]: r["reason"] for r in rejected}
    assert set(reasons) == {str(root / "self"), str(root / "dangling")}
    assert all(reason.startswith("broken symlink:") for reason in reasons.values())


# Metadata against the name -------------------------------------------------------------------------


def _set_element(xml: Path, tag: str, value: str) -> None:
    text = xml.read_text()
    start = text.index(f"<{tag}>") + len(f"<{tag}>")
    end = text.index(f"</{tag}>", start)
    xml.write_text(text[:start] + value + text[end:])


def _set_start_time(xml: Path, value: str) -> None:
    _set_element(xml, "startTime", value)


def _set_times(xml: Path, start: datetime) -> None:
    """startTime `start`, stopTime 10 s later (a small synthetic scene lasts under a second)."""
    _set_element(xml, "startTime", start.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
    _set_element(xml, "stopTime", (start + timedelta(seconds=10)).strftime("%Y-%m-%dT%H:%M:%S.%fZ"))


def test_start_time_disagreeing_with_the_name_is_rejected(
    small_products: tuple[Path, Truth], tmp_path: Path, manifest: Manifest
) -> None:
    inputs, good, victim = with_victim(small_products, tmp_path)
    (xml,) = victim.glob("*-METADATA.XML")
    _set_start_time(xml, "1900-01-01T00:00:00.000000Z")
    _, scenes, rejected = inventory([inputs], tmp_path / "build", manifest)
    assert_only_victim_rejected(
        scenes,
        rejected,
        good,
        "metadata startTime 1900-01-01T00:00:00+00:00 disagrees with the name",
        victim.name,
    )


@pytest.mark.parametrize("offset_s", [0.0, 0.999999])
def test_start_time_within_the_second_the_name_truncates_to(
    small_products: tuple[Path, Truth], tmp_path: Path, manifest: Manifest, offset_s: float
) -> None:
    """The name truncates the start to whole seconds (the real sample: 10:20:20 in the name,
    10:20:20.999936 in METADATA.XML): within 1 s they agree."""
    inputs, good, victim = with_victim(small_products, tmp_path)
    (xml,) = victim.glob("*-METADATA.XML")
    start = ProductName.parse(victim.name).start + timedelta(seconds=offset_s)
    _set_times(xml, start)
    _, scenes, rejected = inventory([inputs], tmp_path / "build", manifest)
    assert rejected == [] and len(scenes) == 3


@pytest.mark.parametrize("offset_s", [-1.5, 2.0, 3600.0])
def test_start_time_more_than_a_second_off_is_rejected(
    small_products: tuple[Path, Truth], tmp_path: Path, manifest: Manifest, offset_s: float
) -> None:
    inputs, good, victim = with_victim(small_products, tmp_path)
    (xml,) = victim.glob("*-METADATA.XML")
    start = ProductName.parse(victim.name).start + timedelta(seconds=offset_s)
    _set_times(xml, start)
    _, scenes, rejected = inventory([inputs], tmp_path / "build", manifest)
    assert_only_victim_rejected(
        scenes, rejected, good, f"metadata startTime {start.isoformat()} disagrees with the name", victim.name
    )


def test_negative_fwhm_rejects_its_product_only(
    small_products: tuple[Path, Truth], tmp_path: Path, manifest: Manifest
) -> None:
    inputs, good, victim = with_victim(small_products, tmp_path)
    (xml,) = victim.glob("*-METADATA.XML")
    text = xml.read_text()
    characterisation = text.index("<bandCharacterisation>")
    start = text.index("<FWHMOfBand>", characterisation) + len("<FWHMOfBand>")
    end = text.index("</FWHMOfBand>", start)
    xml.write_text(text[:start] + "-5.8" + text[end:])
    _, scenes, rejected = inventory([inputs], tmp_path / "build", manifest)
    assert_only_victim_rejected(
        scenes, rejected, good, "bandID[1]/FWHMOfBand is -5.8, not a positive finite number", victim.name
    )


def test_portal_renamed_files_are_matched_to_the_metadata_file_list(
    small_products: tuple[Path, Truth], tmp_path: Path, manifest: Manifest
) -> None:
    """A portal download renames files after the product was made (`-METADATA.XML.XML`, a lower-case
    extension) while METADATA.XML still lists the original names: the files are matched by layer."""
    inputs, good, victim = with_victim(small_products, tmp_path)
    for path in sorted(victim.iterdir()):
        if path.name.endswith(("-METADATA.XML", "-HISTORY.XML")):
            path.rename(path.with_name(path.name + ".XML"))
        elif path.name.endswith("-SPECTRAL_IMAGE.TIF"):
            path.rename(path.with_name(path.name[: -len(".TIF")] + ".tif"))
    assert any(p.name.endswith("-METADATA.XML.XML") for p in victim.iterdir())
    _, scenes, rejected = inventory([inputs], tmp_path / "build", manifest)
    assert rejected == []
    assert sorted(s.scene_id for s in scenes) == sorted([*good, victim.name])
    (scene,) = [s for s in scenes if s.scene_id == victim.name]
    assert scene.variant == "standard", "the rasters, not the metadata's spelling, make the variant"
    assert f"{victim.name}-METADATA.XML.XML" in dict(scene.members)
