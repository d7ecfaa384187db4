"""METADATA.XML and HISTORY.XML of a product, one function per section."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Sequence
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


def metadata_xml(
    plan: Plan, p: Product, written: WrittenRasters, files: dict[str, int], meta_name: str, meta_size: int
) -> bytes:
    cfg = plan.config
    dt, site = p.datatake, p.datatake.site
    name = p.name
    epsg = site.epsg
    version = p.version.removeprefix("V")
    revision = f"{version[0:2]}.{version[2:4]}.{version[4:6]}"
    wl, fwhm = plan.bands.wavelength, plan.bands.fwhm
    fr = written.masks.fractions()
    qp = quality_percent(fr)
    all_files = dict(files)
    all_files[meta_name] = meta_size
    rng = seeded_rng("metadata", cfg.seed, dt.id, p.tile, p.version)

    ET.register_namespace("xsi", "http://www.w3.org/2001/XMLSchema-instance")
    root = ET.Element(
        "level_X",
        {"{http://www.w3.org/2001/XMLSchema-instance}noNamespaceSchemaLocation": "metadata_Lx_00-06-00.xsd"},
    )
    md = sub(root, "metadata")
    sc = sub(md, "schema")
    sub(sc, "copyright", "(c) DLR EnMAP 2023")
    sub(sc, "versionSchema", "00.06.00")
    sub(sc, "name", "metadata_Lx_00-06-00.xsd")
    sub(sc, "crc", "1EACA5A7")
    sub(sc, "processingLevel", "L2A")
    sub(md, "name", meta_name)
    sub(md, "comment", f"EnMAP Level 2A Product of datatake {dt.id}, tile {p.tile}")
    sub(md, "copyright", "(c) DLR EnMAP 2023")
    sub(
        md,
        "citation",
        f"DLR ({p.processing_time.year}): EnMAP Product {dt.id:09d}_{p.tile:02d}_2A (synthetic)",
    )

    pr = sub(root, "processing")
    sub(pr, "terrainCorrection", "Yes")
    sub(pr, "ozoneValue", "300")
    sub(pr, "season", "summer" if 4 <= p.start.month <= 9 else "winter")
    fmt_name = {"GTiff": "GeoTIFF", "COG": "COG", "BSQ": "BSQ", "BIL": "BIL", "BIP": "BIP"}[p.fmt]
    sub(pr, "productFormat", f"{fmt_name}+Metadata")
    sub(pr, "mapProjection", "UTM_Zone_of_Scene_Center")
    sub(pr, "imageResampling", "Bilinear_Interpolation")
    sub(pr, "DEMDBVersion", "COP-DEM_GLO-30-DGED_2021_1")
    sub(pr, "correctionType", "Combined")
    sub(pr, "cirrusHazeRemoval", "No")
    sub(pr, "bandInterpolation", "No")
    sub(pr, "waterType", "Clear")

    base = sub(root, "base")
    _polygon(sub(base, "spatialCoverage"), epsg, p.footprint, p.start, p.stop)
    tc = sub(base, "temporalCoverage")
    sub(tc, "startTime", iso_time(p.start))
    sub(tc, "stopTime", iso_time(p.stop))
    sub(base, "revision", revision)
    sub(base, "altitudeCoverage", "653216.42")
    sub(base, "sphere", "earth")
    sub(base, "format", "ENMAP_L2A")
    sub(base, "level", "L2A")
    sub(base, "size", int(sum(all_files.values())))
    sub(base, "archivedVersion", revision)

    sp = sub(root, "specific")
    # the datatake's coverage: the union of its tiles
    fps = [p.footprint] + ([p.partner.footprint] if p.partner is not None else [])
    first, last = min(fps, key=lambda f: -f.cy), max(fps, key=lambda f: -f.cy)
    union = Footprint(
        (first.cx + last.cx) / 2,
        (first.cy + last.cy) / 2,
        first.w,
        first.h + math.hypot(last.cx - first.cx, last.cy - first.cy),
        first.theta,
    )
    t_last = max(p.stop, p.partner.stop) if p.partner is not None else p.stop
    _polygon(sub(sp, "spatialCoverageOfDatatake"), epsg, union, dt.start, t_last, precise=False)
    qf = sub(sp, "qualityFlag")
    for tag, value in [
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
        ("numPointsGCP", int(rng.integers(300, 900))),
        ("numPointsICP", int(rng.integers(1000, 3000))),
        ("numPointsAll", 0),
        ("numPointsDiscardedGCP", int(rng.integers(0, 10))),
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
        ("sceneWV", int(rng.integers(800, 3000))),
        ("sceneAOT", int(rng.integers(80, 300))),
        ("sceneAtmParam", 0),
        ("sceneTerrain", 0),
    ]:
        sub(qf, tag, value)
    qf.find("numPointsAll").text = str(  # type: ignore[union-attr]
        int(qf.findtext("numPointsGCP") or 0) + int(qf.findtext("numPointsICP") or 0)
    )
    ist = sub(sp, "instrumentStatus")
    for tag, value in [
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
    ]:
        sub(ist, tag, value)
    pq = sub(sp, "productQuality")
    sr = sub(pq, "screeningResult")
    sub(sr, "status", "OK")
    sub(sr, "failedGroups", "")
    vnir = [int(n) for n, d in zip(plan.bands.number, plan.bands.detector, strict=True) if d == "VNIR"]
    swir = [int(n) for n, d in zip(plan.bands.number, plan.bands.detector, strict=True) if d == "SWIR"]
    for det, numbers in (("vnir", vnir), ("swir", swir)):
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
    dl = sub(sp, "downlink")
    sub(dl, "dtakeNumMissingIsps", 0)
    sub(dl, "dtakeNumErrorIsps", 0)
    aux = sub(sp, "auxDataVersion")
    for tag in (
        "orbitVersion",
        "attitudeVersion",
        "calTabAtmSpecVersion",
        "calTabGeoVersion",
        "calTabRadVersion",
        "calTabLinearityVersion",
        "calTabDeepSpaceVersion",
        "calTabDPMVersion",
        "refTabDarkVersion",
    ):
        sub(aux, tag, "01.00.00")
    idt = sub(sp, "inputDatatake")
    sub(idt, "datatakeAssemblyTime", iso_time(dt.start + timedelta(hours=2)))
    sub(idt, "datatakeRevision", "07.00.32")
    orbit = int((dt.start - _EPOCH_LAUNCH).total_seconds() / 86400 * _ORBITS_PER_DAY) + 1
    for tag, value in [
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
        ("numberOfSWIRBands", len(swir)),
        ("numberOfVNIRBands", len(vnir)),
        ("acquisitionType", "EARTH"),
        ("acquisitionSubtype", "earth"),
        ("productType", "STANDARD_ALL"),
        ("compressionType", "COMPRESSED"),
        ("datatakeStart", iso_time(dt.start)),
        ("datatakeStop", iso_time(t_last)),
        ("backgroundValue", 0),
        ("tileID", f"{p.tile:02d}"),
        ("numberOfTiles", f"{dt.tiles:02d}"),
    ]:
        sub(sp, tag, value)
    sub(sp, "widthOfScene", round(p.footprint.w / PIXEL), unit="pixel")
    sub(sp, "heightOfScene", round(p.footprint.h / PIXEL), unit="pixel")
    for tag, value in [
        ("status", "NOMINAL"),
        ("orbitNo", orbit),
        ("meanGroundElevation", f"{rng.uniform(100, 900):.8f}"),
        ("digitalElevationModelDatabase", "COP-DEM_GLO-30-DGED_2021_1"),
        ("digitalElevationModelDatabaseAccuracy", 4),
        ("referenceDatabase", "S2"),
        ("referenceImageDatabaseAccuracy", 10),
    ]:
        sub(sp, tag, value)
    _angle_block(sp, "sunElevationAngle", dt.sun_elevation, (-0.2, -0.02, 0.19, 0.01))
    _angle_block(sp, "sunAzimuthAngle", dt.sun_azimuth, (-0.13, 0.51, 0.12, -0.51))
    _angle_block(sp, "acrossOffNadirAngle", dt.across_off_nadir, (1.36, -1.27, -1.36, 1.27))
    _angle_block(sp, "alongOffNadirAngle", dt.along_off_nadir, (0.05, 0.05, -0.05, -0.05))
    _angle_block(sp, "sceneAzimuthAngle", site.theta_deg, (0.04, 0.04, -0.04, -0.04))
    for tag, value in [
        ("orbitDirection", "DESCENDING"),
        ("pixelSize", 30),
        ("biomeType", "Temperate Broadleaf and Mixed Forests"),
        ("processible", 1),
        ("orbitType", "determined"),
        ("acquisitionMode", "earth"),
        ("code", "L2A"),
        ("URLToProductType", "enmap.org/product_STANDARD_ALL"),
    ]:
        sub(sp, tag, value)
    x0, y0 = GRID_OFFSET + PIXEL * p.kx, GRID_OFFSET + PIXEL * p.ky
    w_m, h_m = cfg.width * PIXEL, cfg.height * PIXEL
    ortho = Footprint(x0 + w_m / 2, y0 - h_m / 2, w_m, h_m, 0.0)
    _polygon(sub(sp, "spatialCoverageOfOrthoScene"), epsg, ortho, p.start, p.stop, precise=False)
    bc = sub(sp, "bandCharacterisation")
    for n, w, f in zip(plan.bands.number, wl, fwhm, strict=True):
        bid = sub(bc, "bandID", number=str(int(n)))
        sub(bid, "wavelengthCenterOfBand", f"{w:g}")
        sub(bid, "FWHMOfBand", f"{f:g}")
        sub(bid, "GainOfBand", "0.0001")
        sub(bid, "OffsetOfBand", "0")
    sub(sp, "pixelSizeOfOrthoScene", 30)
    sub(sp, "widthOfOrthoScene", cfg.width)
    sub(sp, "heightOfOrthoScene", cfg.height)
    sub(sp, "meanSlope", f"{rng.uniform(1, 15):.2f}")

    prod = sub(root, "product")
    image = sub(prod, "image")
    merge = sub(image, "merge")
    spectral = layer_file(name, "SPECTRAL_IMAGE", p)[0]
    deg = PIXEL * cfg.width / 111_320.0
    sub(merge, "channels", wl.size)
    sub(merge, "name", spectral)
    sub(merge, "size", max(1, round(files[spectral] / 1024)), unit="Kbyte")
    sub(merge, "version", revision)
    sub(merge, "format", "binary")
    dim = sub(merge, "dimension")
    sub(dim, "columns", cfg.width)
    sub(dim, "rows", cfg.height)
    dg = sub(merge, "dimensionGeographic")
    sub(dg, "longitude", f"{deg:.7f}", unit="DEG")
    sub(dg, "latitude", f"{deg:.7f}", unit="DEG")
    for tag, nms in (("qlChannelsSWIR", QL_SWIR_NM), ("qlChannelsVNIR", QL_VNIR_NM)):
        qc = sub(merge, tag)
        for colour, v in zip(("red", "green", "blue"), nms, strict=True):
            sub(qc, colour, f"{v:g}")
    ql = sub(prod, "quicklook")
    for det, nms in (("vnir", QL_VNIR_NM), ("swir", QL_SWIR_NM)):
        d = sub(ql, det)
        sub(d, "channels", 3)
        qc = sub(d, "qlChannels")
        for colour, v in zip(("red", "green", "blue"), nms, strict=True):
            sub(qc, colour, f"{v:g}")
        qname = layer_file(name, f"QL_{det.upper()}", p)[0]
        sub(d, "name", qname)
        sub(d, "size", max(1, round(files[qname] / 1024)), unit="Kbyte")
        sub(d, "version", revision)
        sub(d, "format", "binary")
        dim = sub(d, "dimension")
        sub(dim, "columns", cfg.width)
        sub(dim, "rows", cfg.height)
        dg = sub(d, "dimensionGeographic")
        sub(dg, "longitude", f"{deg:.9f}", unit="DEG")
        sub(dg, "latitude", f"{deg:.9f}", unit="DEG")
    orth = sub(prod, "ortho")
    sub(orth, "projection", projection_name(epsg))
    sub(orth, "resolution", 30)
    sub(orth, "resampling", "bilinear")
    pfi = sub(prod, "productFileInformation")
    for i, fname in enumerate(sorted(all_files), start=1):
        fe = sub(pfi, "file", number=str(i))
        sub(fe, "name", fname)
        sub(fe, "size", max(1, round(all_files[fname] / 1024)), unit="Kbyte")
        sub(fe, "version", revision)
        ext = fname.rsplit(".", 1)[-1].lower()
        sub(fe, "format", "xml" if ext == "xml" else "ascii" if ext == "hdr" else "binary")
    bs = sub(prod, "bandStatistics")
    for n, w, st in zip(plan.bands.number, wl, written.stats, strict=True):
        bid = sub(bs, "bandID", number=str(int(n)))
        sub(bid, "waveLength", f"{w:g}")
        if st is None:
            sub(bid, "mean", str(NO_DATA_BAND_MEAN))
            sub(bid, "stdDeviation", "0")
        else:
            sub(bid, "mean", f"{st[0]:.7g}")
            sub(bid, "stdDeviation", f"{st[1]:.7g}")
    ET.indent(root, space="  ")
    return ET.tostring(root, encoding="utf-8", xml_declaration=False) + b"\n"


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
