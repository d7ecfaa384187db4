"""METADATA.XML parsing, against the real pre-launch L2A sample and against broken documents."""

from datetime import UTC, datetime
from pathlib import Path

import pytest

from pipeline.enmap.metadata import MetadataError, SceneMetadata, epsg_from_projection
from tests.conftest import REAL_SCENE


@pytest.fixture(scope="module")
def real(real_metadata_bytes: bytes) -> SceneMetadata:
    return SceneMetadata.from_xml(real_metadata_bytes)


def test_real_sample_identity(real: SceneMetadata) -> None:
    assert real.scene_id == REAL_SCENE
    assert real.schema == "metadata_Lx_00-02-00.xsd"
    assert real.processing_level == "L2A"
    assert real.datatake_id == "0000326721"
    assert real.tile_id == 1
    assert real.orbit_number == 13842
    assert real.orbit_direction == "DESCENDING"


def test_real_sample_times(real: SceneMetadata) -> None:
    assert real.start_time == datetime(2017, 6, 26, 10, 20, 20, 999936, tzinfo=UTC)
    assert real.stop_time == datetime(2017, 6, 26, 10, 20, 25, 545157, tzinfo=UTC)
    assert real.datatake_start == datetime(2017, 6, 26, 10, 20, 20, 999936, tzinfo=UTC)


def test_real_sample_bands(real: SceneMetadata) -> None:
    assert real.band_count == 218
    assert [b.number for b in real.bands] == list(range(1, 219))
    assert sum(b.detector == "VNIR" for b in real.bands) == 88
    assert sum(b.detector == "SWIR" for b in real.bands) == 130
    first, last = real.bands[0], real.bands[-1]
    assert (first.wavelength_nm, first.fwhm_nm, first.gain, first.offset) == (423.03, 6.93, 0.0001, 0.0)
    assert last.wavelength_nm == 2438.6 and last.fwhm_nm == 8.95
    # VNIR and SWIR interleave between ~902 and 993 nm; the file is sorted by wavelength.
    assert real.bands[78].detector == "SWIR" and real.bands[79].detector == "VNIR"
    assert list(real.wavelengths_nm) == sorted(real.wavelengths_nm)
    # bandStatistics hold their own bandID elements: they must not leak into the band list.
    assert len(real.band_statistics) == 218
    assert real.no_data_bands == ()


def test_real_sample_grid_and_crs(real: SceneMetadata) -> None:
    assert (real.width, real.height) == (1128, 1212)
    assert real.projection == "UTM_Zone32_North"
    assert real.epsg == 32632
    # backgroundValue says 0, which is wrong for L2A reflectance: recorded, never used as nodata.
    assert real.background_value == 0


def test_real_sample_footprint(real: SceneMetadata) -> None:
    assert len(real.footprint) == 6
    assert [p.frame for p in real.footprint] == [
        "upper_left",
        "lower_left",
        "lower_right",
        "upper_right",
        "upper_left",
        "center",
    ]
    ring = real.footprint_lonlat()
    assert ring[0] == ring[-1] and len(ring) == 5
    assert ring[0] == (10.7960234, 47.7875252)
    assert (real.centre.latitude, real.centre.longitude) == (47.6216059, 10.9392424)


def test_real_sample_quality_and_angles(real: SceneMetadata) -> None:
    q = real.quality
    assert (q.cloud, q.cloud_shadow, q.haze, q.cirrus, q.snow, q.water) == (0, 8, 0, 0, 0, 2)
    a = real.angles
    assert a.sun_elevation == 63.038384 and a.sun_azimuth == 149.106702
    assert a.across_off_nadir == -0.0871606570525 and a.along_off_nadir == -0.11880695872
    assert a.scene_azimuth == 14.2528346203


def test_real_sample_file_list(real: SceneMetadata) -> None:
    suffixes = sorted(name.removeprefix(REAL_SCENE + "-") for name in real.file_names)
    assert suffixes == sorted(
        ["METADATA.XML", "SPECTRAL_IMAGE.TIF", "QL_PIXELMASK.TIF", "QL_SWIR.TIF", "QL_VNIR.TIF"]
        + [
            f"QL_QUALITY_{k}.TIF"
            for k in ("CIRRUS", "CLASSES", "CLOUD", "CLOUDSHADOW", "HAZE", "SNOW", "TESTFLAGS")
        ]
    )


@pytest.mark.parametrize(
    ("projection", "epsg"),
    [("UTM_Zone32_North", 32632), ("UTM_Zone1_North", 32601), ("UTM_Zone19_South", 32719)],
)
def test_epsg_from_projection(projection: str, epsg: int) -> None:
    assert epsg_from_projection(projection) == epsg


@pytest.mark.parametrize("projection", ["UTM_Zone61_North", "Geographic_Lat_Lon", "UTM_Zone32"])
def test_bad_projection(projection: str) -> None:
    with pytest.raises(MetadataError, match="projection|zone"):
        epsg_from_projection(projection)


def test_malformed_xml_is_one_line_reason(real_metadata_bytes: bytes) -> None:
    with pytest.raises(MetadataError, match="not well-formed") as info:
        SceneMetadata.from_xml(real_metadata_bytes[: len(real_metadata_bytes) // 2])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("element", "path"),
    [
        ("<widthOfOrthoScene>1128</widthOfOrthoScene>", "specific/widthOfOrthoScene"),
        ("<projection>UTM_Zone32_North</projection>", "product/ortho/projection"),
        ("<cloudShadow>8</cloudShadow>", "specific/qualityFlag/cloudShadow"),
        ("<startTime>2017-06-26T10:20:20.999936Z</startTime>", "base/temporalCoverage/startTime"),
    ],
)
def test_missing_element_is_named(real_metadata_bytes: bytes, element: str, path: str) -> None:
    broken = real_metadata_bytes.replace(element.encode(), b"", 1)
    assert broken != real_metadata_bytes
    with pytest.raises(MetadataError, match=path):
        SceneMetadata.from_xml(broken)


def test_external_entity_is_refused(real_metadata_bytes: bytes, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("do-not-read")
    header = f'<?xml version="1.0"?>\n<!DOCTYPE level_X [<!ENTITY xxe SYSTEM "file://{secret}">]>\n'.encode()
    body = real_metadata_bytes.replace(b"<orbitDirection>DESCENDING", b"<orbitDirection>&xxe;", 1)
    with pytest.raises(MetadataError, match="refused"):
        SceneMetadata.from_xml(header + body)


def test_entity_expansion_is_refused() -> None:
    bomb = (
        b'<?xml version="1.0"?><!DOCTYPE level_X [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]>'
        b"<level_X>&b;</level_X>"
    )
    with pytest.raises(MetadataError, match="refused"):
        SceneMetadata.from_xml(bomb)


def test_wrong_root() -> None:
    with pytest.raises(MetadataError, match="root"):
        SceneMetadata.from_xml(b"<metadata/>")


def test_size_mismatch_inside_metadata(real_metadata_bytes: bytes) -> None:
    broken = real_metadata_bytes.replace(b"<columns>1128</columns>", b"<columns>1127</columns>")
    with pytest.raises(MetadataError, match="raster size disagrees"):
        SceneMetadata.from_xml(broken)


def _first_band_value(document: bytes, tag: str, value: str) -> bytes:
    """The document with `tag` of band 1 in bandCharacterisation set to `value`."""
    start = document.index(b"<bandCharacterisation>")
    open_tag, close_tag = f"<{tag}>".encode(), f"</{tag}>".encode()
    begin = document.index(open_tag, start) + len(open_tag)
    end = document.index(close_tag, begin)
    return document[:begin] + value.encode() + document[end:]


@pytest.mark.parametrize(
    ("tag", "value"),
    [
        ("FWHMOfBand", "-5.8"),
        ("FWHMOfBand", "0"),
        ("FWHMOfBand", "NaN"),
        ("FWHMOfBand", "inf"),
        ("wavelengthCenterOfBand", "nan"),
        ("wavelengthCenterOfBand", "-420.0"),
        ("GainOfBand", "nan"),
    ],
)
def test_band_values_must_be_finite_and_positive(real_metadata_bytes: bytes, tag: str, value: str) -> None:
    """A negative FWHM in one product used to crash `catalog` for the whole build: it is a property
    of that product, refused at parse time with the band and the value."""
    broken = _first_band_value(real_metadata_bytes, tag, value)
    with pytest.raises(
        MetadataError, match=rf"bandID\[1\]/{tag} is .*not a (positive )?finite number"
    ) as info:
        SceneMetadata.from_xml(broken)
    assert "\n" not in str(info.value)


def test_xml_over_the_limit_is_refused_unparsed(real_metadata_bytes: bytes, real: SceneMetadata) -> None:
    limit = len(real_metadata_bytes) - 1
    with pytest.raises(MetadataError, match=f"holds {len(real_metadata_bytes)} bytes, over the {limit}"):
        SceneMetadata.from_xml(real_metadata_bytes, max_bytes=limit)
    assert SceneMetadata.from_xml(real_metadata_bytes, max_bytes=limit + 1) == real


def test_portal_metadata_name_gives_the_scene_id(real_metadata_bytes: bytes, real: SceneMetadata) -> None:
    """A portal download names the file `-METADATA.XML.XML`; `metadata/name` may say so too."""
    name = f"{real.scene_id}-METADATA.XML".encode()
    doubled = real_metadata_bytes.replace(b">" + name + b"<", b">" + name + b".XML<", 1)
    assert doubled != real_metadata_bytes
    assert SceneMetadata.from_xml(doubled).scene_id == real.scene_id
