"""METADATA.XML and HISTORY.XML of a product, one function per section."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from pipeline.enmap.synth.config import GRID_OFFSET, NO_DATA_BAND_MEAN, PIXEL, QL_SWIR_NM, QL_VNIR_NM
from pipeline.enmap.synth.fields import seeded_rng
from pipeline.enmap.synth.grid import Footprint, projection_name, to_lonlat
from pipeline.enmap.synth.plan import Plan, Product
from pipeline.enmap.synth.quality_layers import quality_percent
from pipeline.enmap.synth.rasters import WrittenRasters
from pipeline.enmap.synth.writers import layer_file

_EPOCH_LAUNCH = datetime(2022, 4, 1, 18, 0, tzinfo=UTC)
_ORBITS_PER_DAY = 15.2


def sub(parent: ET.Element, tag: str, text: Any = None, **attrib: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrib)
    if text is not None:
        el.text = text if isinstance(text, str) else xml_number(text)
    return el


def xml_number(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | np.integer):
        return str(int(v))
    return f"{float(v):.10g}"


def iso_time(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _polygon(
    parent: ET.Element, epsg: int, fp: Footprint, t0: datetime, t1: datetime, precise: bool = True
) -> None:
    bp = sub(parent, "boundingPolygon")
    corners = fp.corners()
    frames = ["upper_left", "lower_left", "lower_right", "upper_right"]
    pts = [corners[f] for f in frames] + [(fp.cx, fp.cy)]
    ll = to_lonlat(epsg, pts)
    mid = t0 + (t1 - t0) / 2
    times = {"upper_left": t0, "upper_right": t0, "lower_left": t1, "lower_right": t1, "center": mid}
    rows = [(f, ll[i], 7) for i, f in enumerate(frames)]
    rows.append(("upper_left", ll[0], 9 if precise else 7))
    rows.append(("center", ll[4], 7))
    for frame, (lon, lat), nd in rows:
        pt = sub(bp, "point")
        sub(pt, "frame", frame)
        sub(pt, "latitude", f"{lat:.{nd}f}", unit="DEG")
        sub(pt, "longitude", f"{lon:.{nd}f}", unit="DEG")
        sub(pt, "utcTime", iso_time(times[frame]))


def _angle_block(parent: ET.Element, tag: str, centre: float, spread: Sequence[float]) -> None:
    el = sub(parent, tag)
    for frame, d in zip(("upper_left", "upper_right", "lower_right", "lower_left"), spread, strict=True):
        sub(el, frame, f"{centre + d:.6f}", unit="DEG")
    sub(el, "center", f"{centre:.6f}", unit="DEG")


_XSI = "http://www.w3.org/2001/XMLSchema-instance"
_SCHEMA = "metadata_Lx_00-06-00.xsd"
_COPYRIGHT = "(c) DLR EnMAP 2023"
_FORMAT_NAMES = {"GTiff": "GeoTIFF", "COG": "COG", "BSQ": "BSQ", "BIL": "BIL", "BIP": "BIP"}


@dataclass(frozen=True)
class _SceneDraws:
    """The metadata's random values. One generator serves every section, so they are drawn up front in
    the order the sections once drew them: a product's values stay what they were."""

    gcp_points: int
    icp_points: int
    discarded_gcp_points: int
    water_vapour: int
    aerosol_optical_thickness: int
    mean_ground_elevation: float
    mean_slope: float

    @classmethod
    def draw(cls, rng: np.random.Generator) -> _SceneDraws:
        gcp = int(rng.integers(300, 900))
        icp = int(rng.integers(1000, 3000))
        discarded = int(rng.integers(0, 10))
        water_vapour = int(rng.integers(800, 3000))
        aot = int(rng.integers(80, 300))
        elevation = float(rng.uniform(100, 900))
        slope = float(rng.uniform(1, 15))
        return cls(gcp, icp, discarded, water_vapour, aot, elevation, slope)


@dataclass(frozen=True)
class _MetadataFacts:
    """Everything METADATA.XML states about one product, gathered before any element is built."""

    plan: Plan
    product: Product
    meta_name: str
    revision: str  # "01.03.03" for V010303
    quality: dict[str, int]  # qualityFlag percentages from the written QL layers
    files: dict[str, int]  # basename -> size of the files written before the metadata
    all_files: dict[str, int]  # the same plus the metadata file itself
    band_stats: list[tuple[float, float] | None]
    datatake_coverage: Footprint
    datatake_stop: datetime
    vnir_bands: tuple[int, ...]
    swir_bands: tuple[int, ...]
    draws: _SceneDraws


def _datatake_coverage(p: Product) -> Footprint:
    """The datatake's coverage: the union of its tiles, one rectangle along track."""
    fps = [p.footprint] + ([p.partner.footprint] if p.partner is not None else [])
    first, last = min(fps, key=lambda f: -f.cy), max(fps, key=lambda f: -f.cy)
    return Footprint(
        (first.cx + last.cx) / 2,
        (first.cy + last.cy) / 2,
        first.w,
        first.h + math.hypot(last.cx - first.cx, last.cy - first.cy),
        first.theta,
    )


def _facts(
    plan: Plan, p: Product, written: WrittenRasters, files: dict[str, int], meta_name: str, meta_size: int
) -> _MetadataFacts:
    version = p.version.removeprefix("V")
    all_files = dict(files)
    all_files[meta_name] = meta_size
    bands = plan.bands
    numbers = list(zip(bands.number, bands.detector, strict=True))
    rng = seeded_rng("metadata", plan.config.seed, p.datatake.id, p.tile, p.version)
    return _MetadataFacts(
        plan=plan,
        product=p,
        meta_name=meta_name,
        revision=f"{version[0:2]}.{version[2:4]}.{version[4:6]}",
        quality=quality_percent(written.masks.fractions()),
        files=files,
        all_files=all_files,
        band_stats=written.stats,
        datatake_coverage=_datatake_coverage(p),
        datatake_stop=max(p.stop, p.partner.stop) if p.partner is not None else p.stop,
        vnir_bands=tuple(int(n) for n, d in numbers if d == "VNIR"),
        swir_bands=tuple(int(n) for n, d in numbers if d == "SWIR"),
        draws=_SceneDraws.draw(rng),
    )


def metadata_xml(
    plan: Plan, p: Product, written: WrittenRasters, files: dict[str, int], meta_name: str, meta_size: int
) -> bytes:
    """METADATA.XML modelled on the real sample; `meta_size` is its own size as listed in
    productFileInformation (the caller iterates to a fixed point)."""
    facts = _facts(plan, p, written, files, meta_name, meta_size)
    ET.register_namespace("xsi", _XSI)
    root = ET.Element("level_X", {f"{{{_XSI}}}noNamespaceSchemaLocation": _SCHEMA})
    _metadata_section(sub(root, "metadata"), facts)
    _processing_section(sub(root, "processing"), p)
    _base_section(sub(root, "base"), facts)
    _specific_section(sub(root, "specific"), facts)
    _product_section(sub(root, "product"), facts)
    ET.indent(root, space="  ")
    return ET.tostring(root, encoding="utf-8", xml_declaration=False) + b"\n"


def _tags(parent: ET.Element, pairs: Sequence[tuple[str, Any]]) -> None:
    for tag, value in pairs:
        sub(parent, tag, value)


# level_X/metadata --------------------------------------------------------------------------------------
def _metadata_section(md: ET.Element, f: _MetadataFacts) -> None:
    p, dt = f.product, f.product.datatake
    sc = sub(md, "schema")
    sub(sc, "copyright", _COPYRIGHT)
    sub(sc, "versionSchema", "00.06.00")
    sub(sc, "name", _SCHEMA)
    sub(sc, "crc", "1EACA5A7")
    sub(sc, "processingLevel", "L2A")
    sub(md, "name", f.meta_name)
    sub(md, "comment", f"EnMAP Level 2A Product of datatake {dt.id}, tile {p.tile}")
    sub(md, "copyright", _COPYRIGHT)
    sub(
        md,
        "citation",
        f"DLR ({p.processing_time.year}): EnMAP Product {dt.id:09d}_{p.tile:02d}_2A (synthetic)",
    )


# level_X/processing ------------------------------------------------------------------------------------
def _processing_section(pr: ET.Element, p: Product) -> None:
    sub(pr, "terrainCorrection", "Yes")
    sub(pr, "ozoneValue", "300")
    sub(pr, "season", "summer" if 4 <= p.start.month <= 9 else "winter")
    sub(pr, "productFormat", f"{_FORMAT_NAMES[p.fmt]}+Metadata")
    sub(pr, "mapProjection", "UTM_Zone_of_Scene_Center")
    sub(pr, "imageResampling", "Bilinear_Interpolation")
    sub(pr, "DEMDBVersion", "COP-DEM_GLO-30-DGED_2021_1")
    sub(pr, "correctionType", "Combined")
    sub(pr, "cirrusHazeRemoval", "No")
    sub(pr, "bandInterpolation", "No")
    sub(pr, "waterType", "Clear")


# level_X/base ------------------------------------------------------------------------------------------
def _base_section(base: ET.Element, f: _MetadataFacts) -> None:
    p = f.product
    _polygon(sub(base, "spatialCoverage"), p.datatake.site.epsg, p.footprint, p.start, p.stop)
    tc = sub(base, "temporalCoverage")
    sub(tc, "startTime", iso_time(p.start))
    sub(tc, "stopTime", iso_time(p.stop))
    sub(base, "revision", f.revision)
    sub(base, "altitudeCoverage", "653216.42")
    sub(base, "sphere", "earth")
    sub(base, "format", "ENMAP_L2A")
    sub(base, "level", "L2A")
    sub(base, "size", int(sum(f.all_files.values())))
    sub(base, "archivedVersion", f.revision)


# level_X/specific --------------------------------------------------------------------------------------
def _specific_section(sp: ET.Element, f: _MetadataFacts) -> None:
    dt = f.product.datatake
    coverage = sub(sp, "spatialCoverageOfDatatake")
    _polygon(coverage, dt.site.epsg, f.datatake_coverage, dt.start, f.datatake_stop, precise=False)
    _tags(sub(sp, "qualityFlag"), _quality_flags(f))
    _tags(sub(sp, "instrumentStatus"), _INSTRUMENT_STATUS)
    _product_quality(sp, f)
    _downlink_and_aux_versions(sp)
    _input_datatake(sub(sp, "inputDatatake"), f.product)
    _tags(sp, _acquisition(f))
    _scene_geometry(sp, f)
    _ortho_scene(sp, f)


def _quality_flags(f: _MetadataFacts) -> list[tuple[str, Any]]:
    """specific/qualityFlag: the cover percentages as written, fixed values like the real sample's."""
    dt, qp, draws = f.product.datatake, f.quality, f.draws
    return [
        ("spare_1", -999),
        ("spare_2", -999),
        ("spare_3", -999),
        ("sensorLogVNIR", -999),
        ("processorLogVNIR", 0),
        ("overallQualityVNIR", 0),
        ("deadPixelsVNIR", 0),
        ("defectivePixelsVNIR", 0),
        ("generalArtifactsVNIR", 0),
        ("saturationCrosstalkVNIR", 0),
        ("stripingBandingVNIR", 0),
        ("qualityRadiometryVNIR", 0),
        ("smileIndicationVNIR", -999),
        ("sensorLogSWIR", -999),
        ("processorLogSWIR", 0),
        ("deadPixelsSWIR", 0),
        ("defectivePixelsSWIR", 0),
        ("generalArtifactsSWIR", 0),
        ("saturationCrosstalkSWIR", 0),
        ("stripingBandingSWIR", 0),
        ("overallQualitySWIR", 0),
        ("qualityRadiometrySWIR", 0),
        ("smileIndicationSWIR", -999),
        ("overallQuality", 1),
        ("numTilesUsed", dt.tiles),
        ("levelOfRejection", 2),
        ("numPointsGCP", draws.gcp_points),
        ("numPointsICP", draws.icp_points),
        ("numPointsAll", draws.gcp_points + draws.icp_points),
        ("numPointsDiscardedGCP", draws.discarded_gcp_points),
        ("orthoResidual", 10),
        ("orthoResidual_x", 9),
        ("orthoResidual_y", 5),
        ("orthoMean", 0),
        ("orthoMean_x", 0),
        ("orthoMean_y", 0),
        ("orthoRMSE", 12),
        ("orthoRMSE_x", 9),
        ("orthoRMSE_y", 8),
        ("sceneSZA", f"{90 - dt.sun_elevation:.6f}"),
        ("qualityAtmosphere", 1),
        ("orthoTerrain", 0),
        ("sceneSunglint", -999),
        ("cloudCover", qp["cloudCover"]),
        ("hazeCover", qp["hazeCover"]),
        ("cirrusCover", qp["cirrusCover"]),
        ("snowCover", qp["snowCover"]),
        ("waterCover", qp["waterCover"]),
        ("cloudShadow", qp["cloudShadow"]),
        ("noncloudShadow", 0),
        ("sceneWV", draws.water_vapour),
        ("sceneAOT", draws.aerosol_optical_thickness),
        ("sceneAtmParam", 0),
        ("sceneTerrain", 0),
    ]


_INSTRUMENT_STATUS: tuple[tuple[str, str], ...] = (
    ("statusOK", "true"),
    ("statusVNIR", "on"),
    ("statusSWIR", "on"),
    ("configVNIR", "standard"),
    ("configSWIR", "standard"),
    ("statusSCM", "OK"),
    ("statusDiffuserProtectionHatch", "OK"),
    ("statusSunDiffuserHatch", "OK"),
    ("emergencyStatusOfSCM", "0"),
    ("emergencyStatusOfSSM", "0"),
    ("emergencyStatusOfSDH", "0"),
    ("SWIRAOrSWIRBSelected", "SWIRA"),
    ("mcsSequenceType", "1"),
)
_AUX_DATA_VERSIONS = (
    "orbitVersion",
    "attitudeVersion",
    "calTabAtmSpecVersion",
    "calTabGeoVersion",
    "calTabRadVersion",
    "calTabLinearityVersion",
    "calTabDeepSpaceVersion",
    "calTabDPMVersion",
    "refTabDarkVersion",
)


def _product_quality(sp: ET.Element, f: _MetadataFacts) -> None:
    """productQuality and the per-detector blocks listing the bands each detector delivered."""
    sr = sub(sub(sp, "productQuality"), "screeningResult")
    sub(sr, "status", "OK")
    sub(sr, "failedGroups", "")
    for det, numbers in (("vnir", f.vnir_bands), ("swir", f.swir_bands)):
        q = sub(sp, f"{det}ProductQuality")
        sub(q, f"{det}ProductStatus", "OK")
        for when in ("Before", "After"):
            dq = sub(q, f"{det}Dark{when}Quality")
            sub(dq, "available", "yes")
            sub(dq, "screeningResult", "OK")
        sub(q, "numChannelsExpected", len(numbers))
        sub(q, "expectedChannelsList", ",".join(str(n) for n in numbers))
        sub(q, "numChannelsMissing", 0)
        sub(q, "missingChannelsList", "")


def _downlink_and_aux_versions(sp: ET.Element) -> None:
    dl = sub(sp, "downlink")
    sub(dl, "dtakeNumMissingIsps", 0)
    sub(dl, "dtakeNumErrorIsps", 0)
    aux = sub(sp, "auxDataVersion")
    for tag in _AUX_DATA_VERSIONS:
        sub(aux, tag, "01.00.00")


def _input_datatake(idt: ET.Element, p: Product) -> None:
    sub(idt, "datatakeAssemblyTime", iso_time(p.datatake.start + timedelta(hours=2)))
    sub(idt, "datatakeRevision", "07.00.32")


def _acquisition(f: _MetadataFacts) -> list[tuple[str, Any]]:
    """The acquisition and processing tags directly under `specific`: ids, stations, times, tiles."""
    p, dt = f.product, f.product.datatake
    return [
        ("missionPhase", "operational"),
        ("processingCenter", "OP"),
        ("processingNode", "synthetic"),
        ("processingDateTime", iso_time(p.processing_time)),
        ("archivingStation", "DLR"),
        ("archivingDateTime", iso_time(dt.start + timedelta(hours=3))),
        ("receivingStations", "NSG"),
        ("receivingDateTime", iso_time(dt.start + timedelta(hours=1))),
        ("mission", "EnMAP"),
        ("satelliteID", "01"),
        ("sensor", "HSI"),
        ("datatakeID", f"{dt.id:010d}"),
        ("imageID", f"{dt.id * 3 + p.tile:09d}"),
        ("cyclogramType", "EARTH"),
        ("cyclogramVersion", "000"),
        ("MCSequenceId", "001"),
        ("macrocommandVersion", "000"),
        ("numberOfSWIRBands", len(f.swir_bands)),
        ("numberOfVNIRBands", len(f.vnir_bands)),
        ("acquisitionType", "EARTH"),
        ("acquisitionSubtype", "earth"),
        ("productType", "STANDARD_ALL"),
        ("compressionType", "COMPRESSED"),
        ("datatakeStart", iso_time(dt.start)),
        ("datatakeStop", iso_time(f.datatake_stop)),
        ("backgroundValue", 0),
        ("tileID", f"{p.tile:02d}"),
        ("numberOfTiles", f"{dt.tiles:02d}"),
    ]


def _scene_geometry(sp: ET.Element, f: _MetadataFacts) -> None:
    """Scene size, orbit, elevation and the sun and viewing angles (centre and corners)."""
    p, dt = f.product, f.product.datatake
    sub(sp, "widthOfScene", round(p.footprint.w / PIXEL), unit="pixel")
    sub(sp, "heightOfScene", round(p.footprint.h / PIXEL), unit="pixel")
    orbit = int((dt.start - _EPOCH_LAUNCH).total_seconds() / 86400 * _ORBITS_PER_DAY) + 1
    _tags(
        sp,
        [
            ("status", "NOMINAL"),
            ("orbitNo", orbit),
            ("meanGroundElevation", f"{f.draws.mean_ground_elevation:.8f}"),
            ("digitalElevationModelDatabase", "COP-DEM_GLO-30-DGED_2021_1"),
            ("digitalElevationModelDatabaseAccuracy", 4),
            ("referenceDatabase", "S2"),
            ("referenceImageDatabaseAccuracy", 10),
        ],
    )
    _angle_block(sp, "sunElevationAngle", dt.sun_elevation, (-0.2, -0.02, 0.19, 0.01))
    _angle_block(sp, "sunAzimuthAngle", dt.sun_azimuth, (-0.13, 0.51, 0.12, -0.51))
    _angle_block(sp, "acrossOffNadirAngle", dt.across_off_nadir, (1.36, -1.27, -1.36, 1.27))
    _angle_block(sp, "alongOffNadirAngle", dt.along_off_nadir, (0.05, 0.05, -0.05, -0.05))
    _angle_block(sp, "sceneAzimuthAngle", dt.site.theta_deg, (0.04, 0.04, -0.04, -0.04))
    _tags(
        sp,
        [
            ("orbitDirection", "DESCENDING"),
            ("pixelSize", 30),
            ("biomeType", "Temperate Broadleaf and Mixed Forests"),
            ("processible", 1),
            ("orbitType", "determined"),
            ("acquisitionMode", "earth"),
            ("code", "L2A"),
            ("URLToProductType", "enmap.org/product_STANDARD_ALL"),
        ],
    )


def _ortho_scene(sp: ET.Element, f: _MetadataFacts) -> None:
    """The orthorectified raster: its outline, the band table and its size."""
    p, cfg, bands = f.product, f.plan.config, f.plan.bands
    x0, y0 = GRID_OFFSET + PIXEL * p.kx, GRID_OFFSET + PIXEL * p.ky
    w_m, h_m = cfg.width * PIXEL, cfg.height * PIXEL
    ortho = Footprint(x0 + w_m / 2, y0 - h_m / 2, w_m, h_m, 0.0)
    coverage = sub(sp, "spatialCoverageOfOrthoScene")
    _polygon(coverage, p.datatake.site.epsg, ortho, p.start, p.stop, precise=False)
    bc = sub(sp, "bandCharacterisation")
    for n, w, fwhm in zip(bands.number, bands.wavelength, bands.fwhm, strict=True):
        bid = sub(bc, "bandID", number=str(int(n)))
        sub(bid, "wavelengthCenterOfBand", f"{w:g}")
        sub(bid, "FWHMOfBand", f"{fwhm:g}")
        sub(bid, "GainOfBand", "0.0001")
        sub(bid, "OffsetOfBand", "0")
    sub(sp, "pixelSizeOfOrthoScene", 30)
    sub(sp, "widthOfOrthoScene", cfg.width)
    sub(sp, "heightOfOrthoScene", cfg.height)
    sub(sp, "meanSlope", f"{f.draws.mean_slope:.2f}")


# level_X/product ---------------------------------------------------------------------------------------
def _product_section(prod: ET.Element, f: _MetadataFacts) -> None:
    _image_merge(sub(sub(prod, "image"), "merge"), f)
    _quicklooks(sub(prod, "quicklook"), f)
    orth = sub(prod, "ortho")
    sub(orth, "projection", projection_name(f.product.datatake.site.epsg))
    sub(orth, "resolution", 30)
    sub(orth, "resampling", "bilinear")
    _file_information(sub(prod, "productFileInformation"), f)
    _band_statistics(sub(prod, "bandStatistics"), f)


def _degrees_across(f: _MetadataFacts) -> float:
    """The raster's width in degrees, as the real sample states it (both axes the same number)."""
    return PIXEL * f.plan.config.width / 111_320.0


def _dimensions(parent: ET.Element, f: _MetadataFacts, degrees: str) -> None:
    dim = sub(parent, "dimension")
    sub(dim, "columns", f.plan.config.width)
    sub(dim, "rows", f.plan.config.height)
    dg = sub(parent, "dimensionGeographic")
    sub(dg, "longitude", degrees, unit="DEG")
    sub(dg, "latitude", degrees, unit="DEG")


def _rgb_channels(parent: ET.Element, wavelengths_nm: Sequence[float]) -> None:
    for colour, v in zip(("red", "green", "blue"), wavelengths_nm, strict=True):
        sub(parent, colour, f"{v:g}")


def _image_merge(merge: ET.Element, f: _MetadataFacts) -> None:
    spectral = layer_file(f.product.name, "SPECTRAL_IMAGE", f.product)[0]
    sub(merge, "channels", f.plan.bands.wavelength.size)
    sub(merge, "name", spectral)
    sub(merge, "size", max(1, round(f.files[spectral] / 1024)), unit="Kbyte")
    sub(merge, "version", f.revision)
    sub(merge, "format", "binary")
    _dimensions(merge, f, f"{_degrees_across(f):.7f}")
    for tag, nms in (("qlChannelsSWIR", QL_SWIR_NM), ("qlChannelsVNIR", QL_VNIR_NM)):
        _rgb_channels(sub(merge, tag), nms)


def _quicklooks(ql: ET.Element, f: _MetadataFacts) -> None:
    for det, nms in (("vnir", QL_VNIR_NM), ("swir", QL_SWIR_NM)):
        d = sub(ql, det)
        sub(d, "channels", 3)
        _rgb_channels(sub(d, "qlChannels"), nms)
        qname = layer_file(f.product.name, f"QL_{det.upper()}", f.product)[0]
        sub(d, "name", qname)
        sub(d, "size", max(1, round(f.files[qname] / 1024)), unit="Kbyte")
        sub(d, "version", f.revision)
        sub(d, "format", "binary")
        _dimensions(d, f, f"{_degrees_across(f):.9f}")


def _file_information(pfi: ET.Element, f: _MetadataFacts) -> None:
    """Every file of the product, the metadata itself included, by name."""
    for i, fname in enumerate(sorted(f.all_files), start=1):
        fe = sub(pfi, "file", number=str(i))
        sub(fe, "name", fname)
        sub(fe, "size", max(1, round(f.all_files[fname] / 1024)), unit="Kbyte")
        sub(fe, "version", f.revision)
        ext = fname.rsplit(".", 1)[-1].lower()
        sub(fe, "format", "xml" if ext == "xml" else "ascii" if ext == "hdr" else "binary")


def _band_statistics(bs: ET.Element, f: _MetadataFacts) -> None:
    """Mean and std of reflectance per band over the footprint; a no-data band has the sentinel mean."""
    bands = f.plan.bands
    for n, w, st in zip(bands.number, bands.wavelength, f.band_stats, strict=True):
        bid = sub(bs, "bandID", number=str(int(n)))
        sub(bid, "waveLength", f"{w:g}")
        if st is None:
            sub(bid, "mean", str(NO_DATA_BAND_MEAN))
            sub(bid, "stdDeviation", "0")
        else:
            sub(bid, "mean", f"{st[0]:.7g}")
            sub(bid, "stdDeviation", f"{st[1]:.7g}")


def history_xml(p: Product) -> bytes:
    root = ET.Element("history")
    sub(root, "productName", p.name)
    steps = [
        ("L0", p.datatake.start + timedelta(hours=2)),
        ("L1B", p.processing_time - timedelta(minutes=50)),
        ("L1C", p.processing_time - timedelta(minutes=25)),
        ("L2A", p.processing_time),
    ]
    for i, (level, when) in enumerate(steps, start=1):
        e = sub(root, "processingStep", number=str(i))
        sub(e, "level", level)
        sub(e, "processor", "EnMAP PGS (synthetic, pipeline.enmap.synth)")
        sub(e, "processorVersion", p.version)
        sub(e, "dateTime", iso_time(when))
    if p.supersedes is not None:
        sub(root, "comment", f"reprocessing of {p.supersedes.name}")
    ET.indent(root, space="  ")
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="utf-8") + b"\n"
