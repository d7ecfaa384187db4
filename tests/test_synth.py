"""The synthetic EnMAP L2A generator: structure (names, packaging, formats, METADATA.XML), determinism,
and consistency of the pixels with the QL layers, the metadata and truth.json."""

from __future__ import annotations

import csv
import hashlib
import io
import tarfile
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import rasterio

from pipeline.enmap.metadata import SceneMetadata
from pipeline.enmap.names import ProductName, parse_file_name
from pipeline.enmap.synth import (
    NODATA,
    ProductTruth,
    SynthConfig,
    Truth,
    generate,
    load_band_table,
)

LAYERS_QL_BINARY = ("QL_QUALITY_CLOUD", "QL_QUALITY_CLOUDSHADOW", "QL_QUALITY_HAZE", "QL_QUALITY_SNOW")
ALL_LAYERS = {
    "SPECTRAL_IMAGE",
    "QL_PIXELMASK",
    "QL_QUALITY_CLASSES",
    "QL_QUALITY_CLOUD",
    "QL_QUALITY_CLOUDSHADOW",
    "QL_QUALITY_HAZE",
    "QL_QUALITY_SNOW",
    "QL_QUALITY_CIRRUS",
    "QL_QUALITY_TESTFLAGS",
    "QL_VNIR",
    "QL_SWIR",
}


# ------------------------------------------------------------------------------------------ helpers


@dataclass
class Opened:
    truth: ProductTruth
    files: list[str]  # basenames in the product
    metadata: bytes
    rasters: dict[str, str]  # layer -> path GDAL opens


def open_product(out: Path, p: ProductTruth, scratch: Path) -> Opened:
    """Find a product's files whatever its packaging, the way a reader would."""
    if p.packaging in ("folder", "ard"):
        folder = out / p.path
        files = sorted(f.name for f in folder.iterdir())
        prefix = f"{folder}/"
        meta = next(folder / f for f in files if "-METADATA." in f).read_bytes()
    else:
        if p.packaging == "zip":
            zpath = out / p.path
        else:
            assert p.path.endswith(".tar.gz") and p.member is not None
            zpath = scratch / f"{p.scene_id}.ZIP"
            if not zpath.exists():
                with tarfile.open(out / p.path) as tar:
                    member = tar.getmember(p.member)
                    assert member.isfile()
                    src = tar.extractfile(member)
                    assert src is not None
                    zpath.write_bytes(src.read())
        with zipfile.ZipFile(zpath) as zf:
            names = zf.namelist()
            assert all(n.startswith(f"{p.scene_id}/") for n in names)
            files = sorted(n.split("/", 1)[1] for n in names if not n.endswith("/"))
            meta = zf.read(f"{p.scene_id}/" + next(f for f in files if "-METADATA." in f))
        prefix = f"/vsizip/{zpath}/{p.scene_id}/"
    rasters = {}
    for f in files:
        parsed = parse_file_name(f)
        assert parsed is not None and parsed.product == p.scene_id, f
        if parsed.is_raster:
            rasters[parsed.layer] = prefix + f
    return Opened(p, files, meta, rasters)


def read(path: str, band: int | None = None) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(band) if band else src.read()


def hash_tree(root: Path) -> dict[str, str]:
    return {
        str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(root.rglob("*"))
        if f.is_file()
    }


def csv_bands() -> list[dict[str, str]]:
    text = resources.files("pipeline").joinpath("enmap/data/v010303_bands.csv").read_text()
    return list(csv.DictReader(io.StringIO(text)))


def common_window(a: ProductTruth, b: ProductTruth) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """Windows of a and b that cover the same ground (both on the same 30 m lattice)."""
    dc = round((b.transform[2] - a.transform[2]) / 30)
    dr = round((a.transform[5] - b.transform[5]) / 30)
    r0, r1 = max(0, dr), min(a.height, b.height + dr)
    c0, c1 = max(0, dc), min(a.width, b.width + dc)
    return (slice(r0, r1), slice(c0, c1)), (slice(r0 - dr, r1 - dr), slice(c0 - dc, c1 - dc))


# ----------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Truth, Path]:
    """Default geometry (300 x 280), all packagings and formats, a reduced band set for speed."""
    out = tmp_path_factory.mktemp("synth")
    truth = generate(out, SynthConfig(seed=11, bands=60, no_data_bands=(36, 44)))
    return out, truth, tmp_path_factory.mktemp("scratch")


@pytest.fixture(scope="module")
def full_bands(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Truth, Path]:
    """All 224 bands, small rasters, every packaging and format."""
    out = tmp_path_factory.mktemp("synth224")
    truth = generate(out, SynthConfig(seed=5, width=150, height=140, reprocessed=2))
    return out, truth, tmp_path_factory.mktemp("scratch224")


@pytest.fixture(scope="module")
def opened(build: tuple[Path, Truth, Path]) -> dict[str, Opened]:
    out, truth, scratch = build
    return {p.scene_id: open_product(out, p, scratch) for p in truth.products}


# ----------------------------------------------------------------------------------------------- tests


def test_deterministic(tmp_path: Path) -> None:
    cfg = SynthConfig(seed=2, width=140, height=130, bands=24)
    generate(tmp_path / "a", cfg)
    generate(tmp_path / "b", cfg)
    ha, hb = hash_tree(tmp_path / "a"), hash_tree(tmp_path / "b")
    assert ha == hb
    assert any(k.endswith(".tar.gz") for k in ha) and any(k.endswith(".ZIP") for k in ha)
    generate(tmp_path / "c", SynthConfig(seed=3, width=140, height=130, bands=24))
    hc = hash_tree(tmp_path / "c")
    assert set(ha.values()).isdisjoint(hc.values())


def test_products_cover_every_packaging_and_format(build: tuple[Path, Truth, Path]) -> None:
    out, truth, _ = build
    assert {p.packaging for p in truth.products} == {"folder", "zip", "targz", "ard"}
    assert {p.format for p in truth.products} == {"GTiff", "BSQ", "BIL", "BIP", "COG"}
    assert all((p.format == "COG") == (p.packaging == "ard") for p in truth.products)
    for p in truth.products:
        name = ProductName.parse(p.scene_id)
        assert (name.datatake_id, name.tile, name.processor_version) == (
            p.datatake,
            p.tile,
            p.processor_version,
        )
        assert 10 <= name.start.hour <= 10  # 10:xx UTC
        assert (out / p.path).exists()
        if p.packaging == "targz":
            assert p.path.startswith("dims_op_oc_oc-en_") and p.path.endswith("_1.tar.gz")
            assert p.member == f"{p.path[:-7]}/ENMAP.HSI.L2A/{p.scene_id}.ZIP"
        elif p.packaging == "zip":
            assert p.path == f"{p.scene_id}.ZIP"
        else:
            assert p.path == p.scene_id
    # nothing but the products and truth.json in the output
    expected = {p.path for p in truth.products} | {"truth.json"}
    assert {f.name for f in out.iterdir()} == expected


def test_metadata_parses_with_full_band_table(full_bands: tuple[Path, Truth, Path]) -> None:
    out, truth, scratch = full_bands
    table = csv_bands()
    assert len(table) == 224
    seen = set()
    for p in truth.products:
        o = open_product(out, p, scratch)
        md = SceneMetadata.from_xml(o.metadata)
        seen.add((p.packaging, p.format))
        assert md.scene_id == p.scene_id
        assert md.schema == "metadata_Lx_00-06-00.xsd" and md.processing_level == "L2A"
        assert md.band_count == 224
        assert [b.number for b in md.bands] == list(range(1, 225))
        assert [b.wavelength_nm for b in md.bands] == [float(r["wavelength_nm"]) for r in table]
        assert [b.fwhm_nm for b in md.bands] == [float(r["fwhm_nm"]) for r in table]
        assert [b.detector for b in md.bands] == [r["detector"] for r in table]
        assert all(b.gain == 0.0001 and b.offset == 0 for b in md.bands)
        assert (md.datatake_id, md.tile_id) == (p.datatake, p.tile)
        assert md.orbit_direction == "DESCENDING"
        assert md.projection.startswith("UTM_Zone") and md.epsg == p.epsg
        assert md.no_data_bands == p.no_data_bands == (131, 132, 165)
        assert set(md.file_names) == set(o.files) and len(md.file_names) == len(o.files)
        with rasterio.open(o.rasters["SPECTRAL_IMAGE"]) as src:
            assert src.crs.to_epsg() == md.epsg
            assert (src.width, src.height, src.count) == (md.width, md.height, md.band_count)
            assert src.nodata == NODATA
            assert src.dtypes[0] == "int16"
            nodata_band = src.read(131)
            assert (nodata_band == NODATA).all()
    assert {pk for pk, _ in seen} == {"folder", "zip", "targz", "ard"}
    assert {f for _, f in seen} >= {"GTiff", "BSQ", "BIL", "BIP", "COG"}


def test_metadata_against_truth(build: tuple[Path, Truth, Path], opened: dict[str, Opened]) -> None:
    _, truth, _ = build
    for p in truth.products:
        md = SceneMetadata.from_xml(opened[p.scene_id].metadata)
        # quality percentages: the truth fractions rounded half up
        q = md.quality
        got = {
            "cloudCover": q.cloud,
            "cloudShadow": q.cloud_shadow,
            "hazeCover": q.haze,
            "snowCover": q.snow,
            "cirrusCover": q.cirrus,
            "waterCover": q.water,
        }
        assert got == p.quality_percent
        fr = p.fractions
        for key, name in [
            ("cloudCover", "cloud"),
            ("cloudShadow", "cloud_shadow"),
            ("hazeCover", "haze"),
            ("snowCover", "snow"),
            ("cirrusCover", "cirrus"),
            ("waterCover", "water"),
        ]:
            assert abs(got[key] - 100 * fr[name]) <= 0.5 + 1e-6
        assert md.start_time.isoformat().replace("+00:00", "Z") == p.start_time
        assert md.stop_time > md.start_time
        assert md.angles.scene_azimuth == pytest.approx(p.angles["scene_azimuth"], abs=1e-5)
        assert 10 <= md.angles.scene_azimuth <= 15
        assert md.angles.sun_azimuth == pytest.approx(p.angles["sun_azimuth"], abs=1e-5)
        assert md.background_value == 0
        assert md.no_data_bands == (36, 44)
        stats = {s.number: s for s in md.band_statistics}
        assert len(stats) == 60 and stats[36].has_no_data and not stats[1].has_no_data
        assert 0 < stats[1].mean < 1 and stats[1].std > 0
        # footprint: 4 corners + precise repeat + centre, agreeing with truth
        frames = [pt.frame for pt in md.footprint]
        assert frames == ["upper_left", "lower_left", "lower_right", "upper_right", "upper_left", "center"]
        ring = md.footprint_lonlat()
        want = [p.footprint_lonlat[i] for i in (0, 3, 2, 1, 0)]  # truth ring is UL, LL, LR, UR, UL
        assert np.allclose(ring, want, atol=1e-6)
        root = ET.fromstring(opened[p.scene_id].metadata)
        assert root.findtext("metadata/schema/versionSchema") == "00.06.00"
        assert root.findtext("specific/tileID") == f"{p.tile:02d}"
        assert len(root.findall("base/spatialCoverage/boundingPolygon/point")) == 6
        sun_elevation = root.find("specific/sunElevationAngle/upper_left")
        assert sun_elevation is not None and sun_elevation.get("unit") == "DEG"
        assert root.findtext("metadata/name") in opened[p.scene_id].files


@pytest.mark.shared
def test_metadata_has_the_element_paths_of_the_real_sample(
    opened: dict[str, Opened], real_metadata_bytes: bytes
) -> None:
    real = ET.fromstring(real_metadata_bytes)
    ours = ET.fromstring(next(iter(opened.values())).metadata)

    def paths(root: ET.Element) -> set[str]:
        out: set[str] = set()

        def walk(el: ET.Element, prefix: str) -> None:
            for child in el:
                path = f"{prefix}/{child.tag}" if prefix else child.tag
                out.add(path)
                walk(child, path)

        walk(root, "")
        return out

    # Not written (documented): sensor state vectors, RPCs, frame times, matching, screening details.
    skipped = (
        "product/calibration",
        "product/navigation",
        "product/time",
        "product/matching",
        "specific/productQuality/screeningResult",
    )
    missing = {p for p in paths(real) - paths(ours) if not p.startswith(skipped)}
    assert not missing


def test_rasters_open_with_the_right_structure(
    build: tuple[Path, Truth, Path], opened: dict[str, Opened]
) -> None:
    _, truth, _ = build
    for p in truth.products:
        o = opened[p.scene_id]
        assert set(o.rasters) == ALL_LAYERS
        for layer, path in o.rasters.items():
            with rasterio.open(path) as src:
                assert (src.width, src.height) == (p.width, p.height)
                assert src.crs.to_epsg() == p.epsg
                t = src.transform
                assert (t.a, t.e) == (30.0, -30.0) and t.b == 0 and t.d == 0
                assert t.c % 30 == 15 and t.f % 30 == 15
                assert tuple(t)[:6] == pytest.approx(p.transform)
                count = {"SPECTRAL_IMAGE": p.bands, "QL_PIXELMASK": p.bands, "QL_VNIR": 3, "QL_SWIR": 3}
                assert src.count == count.get(layer, 1)
                assert src.dtypes[0] == ("int16" if layer == "SPECTRAL_IMAGE" else "uint8")
                assert src.nodata == (NODATA if layer == "SPECTRAL_IMAGE" else None)
                if p.format == "COG":
                    assert src.driver == "GTiff" and path.endswith(f"-{layer}_COG.tiff")
                    assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
                elif p.format == "GTiff":
                    assert src.driver == "GTiff" and path.endswith(f"-{layer}.TIF")
                    assert src.interleaving.name == "band" or src.count == 1
                else:
                    assert src.driver == "ENVI"
                    want = p.format if layer == "SPECTRAL_IMAGE" else "BSQ"
                    assert path.endswith(f"-{layer}.{want}")
                    assert src.interleaving.name == {"BSQ": "band", "BIL": "line", "BIP": "pixel"}[want]
                    assert any(f.endswith(f"-{layer}.HDR") for f in o.files)
        assert any(f.endswith("-HISTORY.XML") or f.endswith("-HISTORY.xml") for f in o.files)
        meta = [f for f in o.files if "-METADATA." in f]
        assert meta == [f"{p.scene_id}-METADATA.{'xml' if p.packaging == 'ard' else 'XML'}"]


def test_pixels_consistent_with_quality_layers(
    build: tuple[Path, Truth, Path], opened: dict[str, Opened]
) -> None:
    _, truth, _ = build
    wl = load_band_table(60).wavelength
    vis = [int(np.argmin(np.abs(wl - w))) for w in (480, 550, 650)]
    nir = int(np.argmin(np.abs(wl - 860)))
    for p in truth.products:
        r = opened[p.scene_id].rasters
        img = read(r["SPECTRAL_IMAGE"])
        classes = read(r["QL_QUALITY_CLASSES"], 1)
        cloud = read(r["QL_QUALITY_CLOUD"], 1)
        shadow = read(r["QL_QUALITY_CLOUDSHADOW"], 1)
        haze = read(r["QL_QUALITY_HAZE"], 1)
        snow = read(r["QL_QUALITY_SNOW"], 1)
        cirrus = read(r["QL_QUALITY_CIRRUS"], 1)
        flags = read(r["QL_QUALITY_TESTFLAGS"], 1)
        outside = classes == 3
        inside = ~outside
        # the footprint: nodata exactly outside it, in every band; QL layers 0 there
        assert (img[:, outside] == NODATA).all()
        kept = [b for b in range(img.shape[0]) if b + 1 not in p.no_data_bands]
        assert (img[kept][:, inside] != NODATA).all()
        assert (img[[b - 1 for b in p.no_data_bands]] == NODATA).all()
        for m in (cloud, shadow, haze, snow, cirrus, flags):
            assert (m[outside] == 0).all()
        for m in (cloud, shadow, haze, snow):
            assert set(np.unique(m)) <= {0, 1}
        assert set(np.unique(cirrus)) <= {0, 1, 2, 3}
        assert set(np.unique(classes)) <= {0, 1, 2, 3} and {1, 2, 3} <= set(np.unique(classes))
        assert 0 < (classes == 0).sum() < 0.1 * inside.sum()
        assert ((flags >> 2) & 1 == cloud).all() and ((flags >> 5) & 1 == snow).all()
        assert inside.mean() == pytest.approx(p.valid_fraction, abs=1e-6)
        assert 0.6 < inside.mean() < 0.9
        # the footprint is rotated: its left edge moves by many pixels from top to bottom
        rows = np.flatnonzero(inside.any(axis=1))
        first_col = [int(np.flatnonzero(inside[r])[0]) for r in (rows[0], rows[-1])]
        assert abs(first_col[0] - first_col[1]) > 20
        # fractions in truth are the QL layers' shares of the footprint
        n = inside.sum()
        assert (cloud == 1).sum() / n == pytest.approx(p.fractions["cloud"], abs=1e-6)
        assert (shadow == 1).sum() / n == pytest.approx(p.fractions["cloud_shadow"], abs=1e-6)
        assert (classes == 2).sum() / n == pytest.approx(p.fractions["water"], abs=1e-6)
        assert (cirrus > 0).sum() / n == pytest.approx(p.fractions["cirrus"], abs=1e-6)
        # clouds are bright and flat in the visible, far brighter than clear land
        clear_land = (classes == 1) & (cloud == 0) & (shadow == 0) & (haze == 0) & (snow == 0) & (cirrus == 0)
        assert cloud.sum() > 50 and clear_land.sum() > 1000
        cloud_vis = img[vis][:, cloud == 1].mean(axis=1)
        land_vis = img[vis][:, clear_land].mean(axis=1)
        assert (cloud_vis > 4500).all() and (cloud_vis > 3 * land_vis).all()
        assert cloud_vis.max() / cloud_vis.min() < 1.15
        # water is dark in the NIR
        water = (classes == 2) & (cloud == 0) & (shadow == 0) & (haze == 0) & (cirrus == 0)
        assert water.sum() > 100
        assert img[nir][water].mean() < 200 < 2000 < img[nir][clear_land].mean()
        # shadows darken the ground and are the cloud mask displaced by the documented offset
        assert 0 < shadow.sum() and not (shadow == cloud).all() and not (shadow & cloud).any()
        land_shadow = (classes == 1) & (shadow == 1) & (snow == 0)
        assert img[nir][land_shadow].mean() < 0.5 * img[nir][clear_land].mean()
        dcol, drow = p.shadow_offset_px
        assert (dcol, drow) != (0, 0)
        moved = np.zeros_like(cloud)
        h, w = cloud.shape
        moved[max(0, drow) : h + min(0, drow), max(0, dcol) : w + min(0, dcol)] = cloud[
            max(0, -drow) : h - max(0, drow), max(0, -dcol) : w - max(0, dcol)
        ]
        assert (moved[shadow == 1] == 1).mean() > 0.7
        # snow: bright in the VNIR, dark beyond 1500 nm
        if snow.sum() > 20:
            swir = int(np.argmin(np.abs(wl - 1650)))
            s = (snow == 1) & (shadow == 0)
            assert img[vis[1]][s].mean() > 7000 and img[swir][s].mean() < 1500


def test_pixel_mask(build: tuple[Path, Truth, Path], opened: dict[str, Opened]) -> None:
    _, truth, _ = build
    for p in truth.products[:2]:
        r = opened[p.scene_id].rasters
        pm = read(r["QL_PIXELMASK"])
        outside = read(r["QL_QUALITY_CLASSES"], 1) == 3
        assert (pm[:, outside] == 255).all()
        assert set(np.unique(pm[:, ~outside])) == {0, 1}
        defective = [b + 1 for b in range(pm.shape[0]) if (pm[b] == 1).any()]
        assert defective == list(p.defective_bands) and len(defective) == 4


def test_cells_inside_footprint(build: tuple[Path, Truth, Path], opened: dict[str, Opened]) -> None:
    """At the default size every tile-001 product holds at least two whole 128 px grid cells of valid data."""
    _, truth, _ = build
    for p in truth.products:
        if p.tile == 1:
            assert len(p.cells) >= 2
        if not p.cells:
            continue
        img = read(opened[p.scene_id].rasters["SPECTRAL_IMAGE"], 1)
        for cell in p.cells:
            x = p.transform[2] + 30 * cell["col"]
            y = p.transform[5] - 30 * cell["row"]
            assert x == 15 + cell["i"] * 3840 and y == 15 + (cell["j"] + 1) * 3840
            assert cell["location_id"] == f"EPSG{p.epsg}-{cell['i']:04d}-{cell['j']:04d}"
            window = img[cell["row"] : cell["row"] + 128, cell["col"] : cell["col"] + 128]
            assert window.shape == (128, 128) and (window != NODATA).all()


def test_revisits_share_the_ground(build: tuple[Path, Truth, Path], opened: dict[str, Opened]) -> None:
    _, truth, _ = build
    checked = 0
    for site, dates in truth.revisits.items():
        assert len(dates) == 2 and dates[0]["date"] != dates[1]["date"]
        a, b = (next(truth.product(s) for s in d["scene_ids"] if truth.product(s).tile == 1) for d in dates)
        assert (a.epsg, a.site) == (b.epsg, b.site) == (a.epsg, int(site))
        assert a.transform != b.transform  # shifted footprint, same lattice
        wa, wb = common_window(a, b)

        def clear(p: ProductTruth, win: tuple[slice, slice]) -> np.ndarray:
            r = opened[p.scene_id].rasters
            ok = np.isin(read(r["QL_QUALITY_CLASSES"], 1)[win], (1, 2))
            for layer in (*LAYERS_QL_BINARY, "QL_QUALITY_CIRRUS"):
                ok &= read(r[layer], 1)[win] == 0
            return ok

        both = clear(a, wa) & clear(b, wb)
        assert both.sum() > 5000
        kept = [i for i in range(a.bands) if i + 1 not in a.no_data_bands]
        ia = read(opened[a.scene_id].rasters["SPECTRAL_IMAGE"])[kept][:, wa[0], wa[1]][:, both].astype(float)
        ib = read(opened[b.scene_id].rasters["SPECTRAL_IMAGE"])[kept][:, wb[0], wb[1]][:, both].astype(float)
        assert np.median(np.abs(ia - ib)) < 60  # noise only: ~0.2-0.5 % reflectance
        assert np.corrcoef(ia.mean(axis=0), ib.mean(axis=0))[0, 1] > 0.98
        # the same ground class on both dates
        ca = read(opened[a.scene_id].rasters["QL_QUALITY_CLASSES"], 1)[wa]
        cb = read(opened[b.scene_id].rasters["QL_QUALITY_CLASSES"], 1)[wb]
        water_a, water_b = (ca == 2) & (cb != 3), (cb == 2) & (ca != 3)
        assert (water_a == water_b).all()
        checked += 1
    assert checked == 2


def test_overlapping_tiles_identical_in_overlap(
    build: tuple[Path, Truth, Path], opened: dict[str, Opened]
) -> None:
    _, truth, _ = build
    pairs = [p for p in truth.products if p.partner_tile and p.tile == 1]
    assert len(pairs) == 1
    a = pairs[0]
    b = truth.product(a.partner_tile)  # type: ignore[arg-type]
    assert (b.tile, b.datatake, b.partner_tile) == (2, a.datatake, a.scene_id)
    assert b.start_time > a.start_time
    wa, wb = common_window(a, b)
    assert wa[0].start > 0  # tile 002 lies further along track (south)
    ra, rb = opened[a.scene_id].rasters, opened[b.scene_id].rasters
    va = read(ra["QL_QUALITY_CLASSES"], 1)[wa] != 3
    vb = read(rb["QL_QUALITY_CLASSES"], 1)[wb] != 3
    both = va & vb
    assert 0.25 < both.sum() / va.sum()
    ia = read(ra["SPECTRAL_IMAGE"])[:, wa[0], wa[1]]
    ib = read(rb["SPECTRAL_IMAGE"])[:, wb[0], wb[1]]
    assert (ia[:, both] == ib[:, both]).all()
    for layer in ("QL_QUALITY_CLOUD", "QL_QUALITY_CLOUDSHADOW", "QL_QUALITY_CIRRUS", "QL_QUALITY_CLASSES"):
        assert (read(ra[layer], 1)[wa][both] == read(rb[layer], 1)[wb][both]).all()


def test_reprocessed_versions(build: tuple[Path, Truth, Path], opened: dict[str, Opened]) -> None:
    _, truth, _ = build
    old = [p for p in truth.products if p.superseded_by]
    assert len(old) == 1
    new = truth.product(old[0].superseded_by)  # type: ignore[arg-type]
    o = old[0]
    assert new.supersedes == o.scene_id
    assert (new.datatake, new.tile, new.start_time, new.transform) == (
        o.datatake,
        o.tile,
        o.start_time,
        o.transform,
    )
    assert (o.processor_version, new.processor_version) == ("V010303", "V010400")
    assert new.processing_time > o.processing_time
    a = read(opened[o.scene_id].rasters["SPECTRAL_IMAGE"]).astype(int)
    b = read(opened[new.scene_id].rasters["SPECTRAL_IMAGE"]).astype(int)
    assert ((a == NODATA) == (b == NODATA)).all()
    diff = np.abs(a - b)
    assert 0 < diff.max() < 100 and np.median(diff) < 10
    assert (
        read(opened[o.scene_id].rasters["QL_QUALITY_CLOUD"])
        == read(opened[new.scene_id].rasters["QL_QUALITY_CLOUD"])
    ).all()


def test_truth_file(build: tuple[Path, Truth, Path]) -> None:
    out, truth, scratch = build
    again = Truth.from_json(out / "truth.json")
    assert again == truth
    cfg = SynthConfig.from_dict(truth.config)
    assert cfg.seed == 11 and cfg.bands == 60
    assert len(truth.products) == 2 * 2 + 1 + 1
    assert set(truth.revisits) == {"0", "1"}
    kinds = sorted(tuple(d["kinds"]) for d in truth.duplicates)
    assert kinds == [("overlapping_tiles",), ("reprocessed",)]
    for group in truth.duplicates:
        dts = {truth.product(s).datatake for s in group["scene_ids"]}
        assert dts == {group["datatake"]}
    datatakes = [d["datatake"] for dates in truth.revisits.values() for d in dates]
    assert len(datatakes) == len(set(datatakes)) == 4
    assert len({p.datatake for p in truth.products}) == 4
    for p in truth.products:
        assert len(p.footprint_utm) == len(p.footprint_lonlat) == 5
        assert p.footprint_utm[0] == p.footprint_utm[-1]
        assert set(p.files) == set(open_product(out, p, scratch).files)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="packagings"):
        SynthConfig(packagings=("floppy",))
    with pytest.raises(ValueError, match="formats"):
        SynthConfig(formats=("JPEG",))
    with pytest.raises(ValueError):
        SynthConfig(revisits=0)
    with pytest.raises(ValueError):
        SynthConfig(overlapping_tiles=3, sites=2)
    with pytest.raises(ValueError, match="unknown"):
        SynthConfig.from_dict({"colour": 1})
