from datetime import UTC, datetime

import pytest

from pipeline.enmap.names import ProductName, ProductNameError, find_product_names, parse_file_name

REAL = "ENMAP01-____L2A-DT0000326721_20170626T102020Z_001_V000204_20200406T201930Z"


def test_parse_real_name() -> None:
    name = ProductName.parse(REAL)
    assert name.datatake_id == "0000326721"
    assert name.start == datetime(2017, 6, 26, 10, 20, 20, tzinfo=UTC)
    assert name.tile == 1
    assert name.processor_version == "V000204"
    assert name.processing_time == datetime(2020, 4, 6, 20, 19, 30, tzinfo=UTC)


def test_format_round_trips() -> None:
    start, processed = datetime(2023, 5, 1, 10, 4, 5, tzinfo=UTC), datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    text = ProductName.format(1049, start, 28, "V010303", processed)
    assert text == "ENMAP01-____L2A-DT0000001049_20230501T100405Z_028_V010303_20240102T030405Z"
    assert ProductName.parse(text).tile == 28


@pytest.mark.parametrize(
    "bad",
    [REAL + ".ZIP", REAL.replace("L2A", "L1B"), REAL.replace("_001_", "_1_"), "", REAL[:-1]],
)
def test_rejects_non_names(bad: str) -> None:
    with pytest.raises(ProductNameError):
        ProductName.parse(bad)


def test_file_names_and_ard_layers() -> None:
    spectral = parse_file_name(f"{REAL}-SPECTRAL_IMAGE.TIF")
    assert spectral and spectral.layer == "SPECTRAL_IMAGE" and spectral.is_raster
    cog = parse_file_name(f"{REAL}-SPECTRAL_IMAGE_COG.tiff")
    assert cog and cog.layer == "SPECTRAL_IMAGE" and cog.extension == "tiff"
    header = parse_file_name(f"{REAL}-SPECTRAL_IMAGE.HDR")
    assert header and header.is_sidecar and not header.is_raster
    metadata = parse_file_name(f"{REAL}-METADATA.xml")
    assert metadata and metadata.layer == "METADATA"
    assert parse_file_name("README.txt") is None
    assert find_product_names(f"dims/ENMAP.HSI.L2A/{REAL}.ZIP") == [REAL]


@pytest.mark.parametrize(
    ("suffix", "layer", "kind"),
    [
        ("-SPECTRAL_IMAGE_COG.TIF", "SPECTRAL_IMAGE", "raster"),
        ("-QL_QUALITY_CLASSES_COG.tiff", "QL_QUALITY_CLASSES", "raster"),
        ("-ql_quality_cloud_cog.Tiff", "QL_QUALITY_CLOUD", "raster"),
        ("-METADATA.XML", "METADATA", "xml"),
        ("-METADATA.xml", "METADATA", "xml"),
        ("-METADATA.XML.XML", "METADATA", "xml"),
        ("-metadata.xml.xml", "METADATA", "xml"),
        ("-SPECTRAL_IMAGE.HDR", "SPECTRAL_IMAGE", "sidecar"),
    ],
)
def test_delivered_spellings_resolve_to_their_layer(suffix: str, layer: str, kind: str) -> None:
    """SPEC Input: COG rasters as `_COG.TIF` or `_COG.tiff`, metadata as `.XML`, `.xml` or `.XML.XML`,
    suffixes and extensions in any case."""
    parsed = parse_file_name(REAL + suffix)
    assert parsed is not None and parsed.product == REAL
    assert (parsed.layer, parsed.kind) == (layer, kind)
    assert parsed.key == (REAL, layer, kind)


@pytest.mark.parametrize("suffix", ["-SPECTRAL_IMAGE.TIF.aux.xml", "-METADATA.XML.bak", "-METADATA", "-.XML"])
def test_other_files_are_not_product_files(suffix: str) -> None:
    assert parse_file_name(REAL + suffix) is None
