"""Self-describing GeoTIFF exports (issue 13 item 5), read back with GDAL through rasterio and with tifffile:
band scale/offset, nodata, per-band descriptions, the spectrum in the ENVI and IMAGERY metadata domains,
all inside the .tif; the COG option; pixels bit-exact to the source products."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import rasterio
import tifffile
import yaml
import zarr
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from rasterio.windows import Window

from pipeline import stages, tables
from pipeline.cli import main
from pipeline.enmap.synth import Truth, generate
from pipeline.export import (
    COG_OPTIONS,
    SpectralBand,
    export_geotiffs,
    tiff_metadata,
    write_geotiff,
)
from pipeline.manifest import Manifest
from pipeline.query import query
from pipeline.scheduler import Scheduler
from pipeline.storage import BuildStore
from tests.helpers import read_array, spectral_gdal_path, two_sites_twice

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

# Two sites seen twice, in a folder and a ZIP, as GeoTIFF and ENVI BSQ; sizes not multiples of 128.
PRODUCTS = two_sites_twice(13, packagings=("folder", "zip"), formats=("GTiff", "BSQ"))
DESCRIPTION = re.compile(r"band (\d+): ([0-9.]+) nm \(FWHM ([0-9.]+) nm\)")


def _rounded_from(shown: str, value: float) -> bool:
    """`shown` is `value` to three decimals (half a unit off at most, plus the doubles' own error)."""
    return abs(float(shown) - value) <= 0.0005 + 1e-9 * max(1.0, abs(value))


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Truth, BuildStore]:
    """`PRODUCTS` built through the catalog."""
    root = tmp_path_factory.mktemp("export-geotiff")
    truth = generate(root / "products", PRODUCTS)
    manifest = Manifest.from_dict(yaml.safe_load((REPO / "manifests" / "demo.yaml").read_text()))
    store = BuildStore(str(root / "build"))
    scheduler = Scheduler("synchronous", progress=False)
    for name in stages.ORDER:
        stages.run_stage(name, manifest, store, scheduler, inputs=[str(root / "products")])
    return root / "products", truth, store


@pytest.fixture(scope="module")
def exports(
    build: tuple[Path, Truth, BuildStore], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, list[Path]]:
    """Every patch exported plain and as COG, each into a folder of its own."""
    _, _, store = build
    ids = list(store.read_geodataframe(tables.INDEX_PATCHES)["patch_id"])
    assert len(ids) >= 2
    root = tmp_path_factory.mktemp("exports")
    return {
        "plain": export_geotiffs(store, ids, root / "plain"),
        "cog": export_geotiffs(store, ids, root / "cog", cog=True),
    }


def _band_axis(store: BuildStore) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    group = zarr.open_group(str(Path(store.root) / "dataset.zarr"), mode="r")
    return read_array(group, "band"), read_array(group, "wavelength"), read_array(group, "fwhm")


def _envi_floats(value: str) -> list[float]:
    assert value.startswith("{") and value.endswith("}"), value
    return [float(v) for v in value[1:-1].split(",")]


def _everything(path: Path) -> dict:
    """All a GDAL reader is told about a file besides pixels, read with GDAL's PAM off: what it reports
    then comes from the .tif alone, never from a sidecar."""
    with rasterio.Env(GDAL_PAM_ENABLED=False), rasterio.open(path) as src:
        return {
            "scales": src.scales,
            "offsets": src.offsets,
            "nodata": src.nodata,
            "nodatavals": src.nodatavals,
            "dtypes": src.dtypes,
            "descriptions": src.descriptions,
            "tags": src.tags(),
            "envi": src.tags(ns="ENVI"),
            "band_envi": [src.tags(k, ns="ENVI") for k in src.indexes],
            "band_imagery": [src.tags(k, ns="IMAGERY") for k in src.indexes],
            "crs": src.crs,
            "transform": src.transform,
        }


@pytest.mark.parametrize("kind", ["plain", "cog"])
def test_exports_describe_scale_nodata_and_spectrum(
    build: tuple[Path, Truth, BuildStore], exports: dict[str, list[Path]], kind: str
) -> None:
    _, _, store = build
    numbers, wavelengths, fwhms = _band_axis(store)
    count = len(numbers)
    for path in exports[kind]:
        got = _everything(path)
        assert got["dtypes"] == ("int16",) * count
        assert got["scales"] == (0.0001,) * count and got["offsets"] == (0.0,) * count
        assert got["nodata"] == -32768 and got["nodatavals"] == (-32768.0,) * count
        for k, description in enumerate(got["descriptions"]):
            match = DESCRIPTION.fullmatch(description)
            assert match, description
            assert int(match[1]) == numbers[k]
            assert _rounded_from(match[2], wavelengths[k]) and _rounded_from(match[3], fwhms[k])
        # The ENVI header convention GDAL's ENVI driver reports: exact values, in nanometres.
        assert _envi_floats(got["envi"]["wavelength"]) == list(wavelengths)
        assert _envi_floats(got["envi"]["fwhm"]) == list(fwhms)
        assert got["envi"]["wavelength_units"] == "Nanometers"
        assert [float(b["wavelength"]) for b in got["band_envi"]] == list(wavelengths)
        assert [float(b["fwhm"]) for b in got["band_envi"]] == list(fwhms)
        # GDAL 3.10's standard band items, in micrometres.
        central = [float(b["CENTRAL_WAVELENGTH_UM"]) for b in got["band_imagery"]]
        assert np.allclose(central, wavelengths / 1000.0, rtol=0, atol=1e-12)
        assert np.allclose(
            [float(b["FWHM_UM"]) for b in got["band_imagery"]], fwhms / 1000.0, rtol=0, atol=1e-12
        )
        assert got["tags"]["scale_factor"] == "0.0001" and got["tags"]["patch_id"]


@pytest.mark.parametrize("kind", ["plain", "cog"])
def test_everything_lives_inside_the_tif(exports: dict[str, list[Path]], kind: str) -> None:
    """No sidecar next to the exports, after writing and after reading with PAM on; GDAL's metadata is in
    the file's own GDAL_METADATA TIFF tag (42112), read here with tifffile, not GDAL."""
    paths = exports[kind]
    folder = paths[0].parents[2]
    with rasterio.open(paths[0]) as src:  # PAM on: reading must not need (or leave) a sidecar either
        assert src.tags(ns="ENVI")
    assert sorted(p for p in folder.rglob("*") if p.is_file()) == sorted(paths)
    with tifffile.TiffFile(paths[0]) as tif:
        gdal_metadata = tif.pages.first.tags[42112].value
    for text in ('domain="ENVI"', 'domain="IMAGERY"', 'role="scale"', 'role="offset"', 'role="description"'):
        assert text in gdal_metadata, text


@pytest.mark.parametrize("kind", ["plain", "cog"])
def test_exported_pixels_equal_the_source_products(
    build: tuple[Path, Truth, BuildStore], exports: dict[str, list[Path]], kind: str
) -> None:
    """Bit-exact: each exported int16 cube equals the kept bands of its source product at the window
    computed from the export's own georeferencing (rasterio on the delivered product, no pipeline code)."""
    products, truth, store = build
    numbers, _, _ = _band_axis(store)
    scratch = Path(store.root).parent / "scratch"
    scratch.mkdir(exist_ok=True)
    for path in exports[kind]:
        with rasterio.open(path) as exported:
            cube = exported.read()
            scene_id = exported.tags()["scene_id"]
            origin = exported.transform.c, exported.transform.f
        product = truth.product(scene_id)
        with rasterio.open(spectral_gdal_path(products, product, scratch)) as src:
            col = (origin[0] - src.transform.c) / src.transform.a
            line = (src.transform.f - origin[1]) / -src.transform.e
            assert col == int(col) and line == int(line)
            source = src.read([int(n) for n in numbers], window=Window(int(col), int(line), 128, 128))
        assert cube.dtype == np.int16 and np.array_equal(cube, source), path


def test_cog_layout_and_same_metadata_as_plain(exports: dict[str, list[Path]]) -> None:
    """The COG driver's layout, checked twice: GDAL's own LAYOUT=COG report, and the file structure read
    with tifffile (tiled 128 x 128, the structural-metadata ghost header GDAL writes, every IFD before the
    first tile, tiles in increasing order); no overview for a patch that fits one tile."""
    for plain, cog in zip(exports["plain"], exports["cog"], strict=True):
        assert plain.relative_to(plain.parents[2]) == cog.relative_to(cog.parents[2])
        with rasterio.open(cog) as src:
            structure = src.tags(ns="IMAGE_STRUCTURE")
            assert structure["LAYOUT"] == "COG" and structure["COMPRESSION"] == "DEFLATE"
            assert src.block_shapes[0] == (128, 128) and src.overviews(1) == []
        with rasterio.open(plain) as src:
            assert "LAYOUT" not in src.tags(ns="IMAGE_STRUCTURE")
        header = cog.read_bytes()[:400]
        assert header[:4] == b"II*\x00" and header[8:38] == b"GDAL_STRUCTURAL_METADATA_SIZE="
        assert b"LAYOUT=IFDS_BEFORE_DATA" in header and b"KNOWN_INCOMPATIBLE_EDITION=NO" in header
        with tifffile.TiffFile(cog) as tif:
            assert len(tif.pages) == 1
            page = tif.pages.first
            assert page.is_tiled and (page.tilewidth, page.tilelength) == (128, 128)
            offsets = list(page.dataoffsets)
            assert offsets == sorted(offsets) and page.offset < offsets[0]
        assert _everything(cog) == _everything(plain)
        with rasterio.open(cog) as a, rasterio.open(plain) as b:
            assert np.array_equal(a.read(), b.read())


def test_cog_of_a_larger_patch_gets_overviews_down_to_one_tile(tmp_path: Path) -> None:
    """Manifests allow patches up to 1024 px: GDAL's AUTO overviews then halve down to one 128 px tile
    (here 256 px: one level), and the metadata domains still come through the COG copy."""
    rng = np.random.default_rng(3)
    cube = rng.integers(-2000, 10000, size=(3, 256, 256), dtype=np.int16)
    cube[:, :5, :7] = -32768
    bands = [SpectralBand(k + 1, 420.0 + 6.5 * k, 6.0 + 0.1 * k) for k in range(3)]
    meta = tiff_metadata(bands, 0.0001, 0.0, -32768, {"patch_id": "p"})
    profile = {
        "dtype": "int16",
        "count": 3,
        "width": 256,
        "height": 256,
        "crs": "EPSG:32632",
        "transform": rasterio.Affine(30.0, 0.0, 500_015.0, 0.0, -30.0, 5_000_015.0),
        "nodata": -32768,
    }
    path = tmp_path / "p.tif"
    write_geotiff(path, cube, profile, meta, cog=True)
    with rasterio.open(path) as src:
        assert src.overviews(1) == [2] and src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert np.array_equal(src.read(), cube)
        assert _envi_floats(src.tags(ns="ENVI")["wavelength"]) == [b.wavelength_nm for b in bands]
        assert src.descriptions[1] == "band 2: 426.5 nm (FWHM 6.1 nm)"
    assert COG_OPTIONS["blocksize"] == 128


@given(
    st.lists(
        st.tuples(
            st.integers(1, 300),
            st.floats(300.0, 2600.0, allow_nan=False),
            st.floats(0.5, 40.0, allow_nan=False),
        ),
        min_size=1,
        max_size=30,
    )
)
def test_metadata_carries_every_wavelength_exactly(spec: list[tuple[int, float, float]]) -> None:
    """Whatever doubles the band axis holds, the ENVI lists and band items read back to the same doubles
    and each description names its band; the metadata is built without I/O."""
    bands = [SpectralBand(n, w, f) for n, w, f in spec]
    meta = tiff_metadata(bands, 0.0001, 0.0, -32768, {})
    assert _envi_floats(meta.dataset_tags["ENVI"]["wavelength"]) == [w for _, w, _ in spec]
    assert _envi_floats(meta.dataset_tags["ENVI"]["fwhm"]) == [f for _, _, f in spec]
    assert [float(t["ENVI"]["wavelength"]) for t in meta.band_tags] == [w for _, w, _ in spec]
    for (n, w, f), description in zip(spec, meta.descriptions, strict=True):
        match = DESCRIPTION.fullmatch(description)
        assert match and int(match[1]) == n
        assert _rounded_from(match[2], w) and _rounded_from(match[3], f)


def test_query_cli_cog_export(build: tuple[Path, Truth, BuildStore], tmp_path: Path) -> None:
    _, _, store = build
    runner = CliRunner()
    out = tmp_path / "cli"
    args = ["query", "--build", store.uri, "--export", str(out), "--export-format", "geotiff", "--cog"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    tifs = sorted(out.rglob("*.tif"))
    assert len(tifs) == len(query(store.uri).ids) and all(p.parts[-3] == "enmap" for p in tifs)
    for path in tifs:
        assert re.fullmatch(r"\d{7}/\d{5}\.tif", path.relative_to(out / "enmap").as_posix())
        with rasterio.open(path) as src:
            assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG" and src.scales[0] == 0.0001
    assert "(geotiff, COG)" in result.output
    wrong = runner.invoke(
        main, ["query", "--build", store.uri, "--export", str(tmp_path / "z.zarr"), "--cog"]
    )
    assert wrong.exit_code != 0 and "Traceback" not in wrong.output
    assert "--cog applies to GeoTIFF exports" in wrong.output and not (tmp_path / "z.zarr").exists()
