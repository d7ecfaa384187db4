"""METADATA.XML of an EnMAP L2A product, parsed once into a frozen `SceneMetadata`.

The XML has root `level_X` and no namespace. It is parsed with defusedxml, so a document that declares
an external entity (or an entity bomb) is refused instead of being expanded.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import UTC, datetime

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

# bandStatistics marks a band that holds no data with this mean and a standard deviation of 0.
NO_DATA_BAND_MEAN = -1_000_000.0
FOOTPRINT_CORNERS = ("upper_left", "upper_right", "lower_right", "lower_left")


class MetadataError(ValueError):
    """METADATA.XML that cannot be used; the message is the one-line reason."""


@dataclass(frozen=True, slots=True)
class Band:
    number: int  # 1-based position in the product's spectral image
    wavelength_nm: float
    fwhm_nm: float
    gain: float
    offset: float
    detector: str  # "VNIR", "SWIR", or "" when the product lists the band in neither detector


@dataclass(frozen=True, slots=True)
class BandStatistics:
    number: int
    mean: float
    std: float

    @property
    def has_no_data(self) -> bool:
        return self.mean == NO_DATA_BAND_MEAN and self.std == 0.0


@dataclass(frozen=True, slots=True)
class FootprintPoint:
    frame: str  # upper_left, lower_left, lower_right, upper_right, center
    latitude: float
    longitude: float


@dataclass(frozen=True, slots=True)
class QualityCover:
    """Scene-level quality percentages from `specific/qualityFlag`."""

    cloud: float
    cloud_shadow: float
    haze: float
    cirrus: float
    snow: float
    water: float


@dataclass(frozen=True, slots=True)
class Angles:
    """Scene-centre angles in degrees."""

    sun_elevation: float
    sun_azimuth: float
    across_off_nadir: float
    along_off_nadir: float
    scene_azimuth: float


@dataclass(frozen=True, slots=True)
class SceneMetadata:
    scene_id: str
    schema: str
    processing_level: str
    datatake_id: str
    tile_id: int
    orbit_number: int
    orbit_direction: str
    start_time: datetime
    stop_time: datetime
    datatake_start: datetime  # `specific/datatakeStart`; the same for every tile of the datatake
    bands: tuple[Band, ...]
    band_statistics: tuple[BandStatistics, ...]
    footprint: tuple[FootprintPoint, ...]
    quality: QualityCover
    angles: Angles
    width: int
    height: int
    projection: str
    background_value: float | None
    file_names: tuple[str, ...]

    @classmethod
    def from_xml(cls, data: bytes | str, max_bytes: int | None = None) -> SceneMetadata:
        """Parse METADATA.XML; a document over `max_bytes` is refused unparsed (readers should not
        have read it whole in the first place: see `OpenedProduct.metadata_bytes`)."""
        if max_bytes is not None and len(data) > max_bytes:
            raise MetadataError(
                f"METADATA.XML holds {len(data)} bytes, over the {max_bytes} bytes XML limit; not parsed"
            )
        try:
            root = SafeET.fromstring(data, forbid_dtd=False, forbid_entities=True, forbid_external=True)
        except DefusedXmlException as exc:
            raise MetadataError(f"METADATA.XML refused: {type(exc).__name__} ({exc})") from None
        except ET.ParseError as exc:
            raise MetadataError(f"METADATA.XML is not well-formed XML: {exc}") from None
        if root.tag != "level_X":
            raise MetadataError(f"METADATA.XML root is <{root.tag}>, expected <level_X>")
        return _build(root)

    # Derived values: computed from the fields above, never stored twice.
    @property
    def epsg(self) -> int:
        return epsg_from_projection(self.projection)

    @property
    def band_count(self) -> int:
        return len(self.bands)

    @property
    def wavelengths_nm(self) -> tuple[float, ...]:
        return tuple(b.wavelength_nm for b in self.bands)

    @property
    def no_data_bands(self) -> tuple[int, ...]:
        """1-based numbers of the bands whose statistics say they hold no data."""
        return tuple(s.number for s in self.band_statistics if s.has_no_data)

    @property
    def corners(self) -> tuple[FootprintPoint, ...]:
        """The four footprint corners in ring order (the 5th point repeats the 1st, the 6th is the centre)."""
        by_frame: dict[str, FootprintPoint] = {}
        for point in self.footprint:
            by_frame.setdefault(point.frame, point)
        return tuple(by_frame[f] for f in FOOTPRINT_CORNERS)

    @property
    def centre(self) -> FootprintPoint:
        for point in self.footprint:
            if point.frame == "center":
                return point
        raise MetadataError("footprint has no centre point")  # unreachable: checked at parse time

    def footprint_lonlat(self) -> list[tuple[float, float]]:
        """Closed (lon, lat) ring of the footprint corners, for a shapely Polygon."""
        ring = [(p.longitude, p.latitude) for p in self.corners]
        return ring + ring[:1]


_UTM_RE = re.compile(r"^UTM_Zone(?P<zone>\d{1,2})_(?P<hemisphere>North|South)$")


def epsg_from_projection(projection: str) -> int:
    """`UTM_Zone32_North` -> 32632; `UTM_Zone19_South` -> 32719."""
    match = _UTM_RE.match(projection.strip())
    if match is None:
        raise MetadataError(f"unsupported map projection {projection!r} (expected UTM_Zone<N>_North|South)")
    zone = int(match["zone"])
    if not 1 <= zone <= 60:
        raise MetadataError(f"UTM zone out of range in {projection!r}")
    return (32600 if match["hemisphere"] == "North" else 32700) + zone


def _text(root: ET.Element, path: str) -> str:
    node = root.find(path)
    if node is None or node.text is None or not node.text.strip():
        raise MetadataError(f"METADATA.XML misses required element {path}")
    return node.text.strip()


def _float(root: ET.Element, path: str) -> float:
    text = _text(root, path)
    try:
        return float(text)
    except ValueError:
        raise MetadataError(f"METADATA.XML element {path} is not a number: {text!r}") from None


def _int(root: ET.Element, path: str) -> int:
    text = _text(root, path)
    try:
        return int(text)
    except ValueError:
        raise MetadataError(f"METADATA.XML element {path} is not an integer: {text!r}") from None


def _time(root: ET.Element, path: str) -> datetime:
    text = _text(root, path)
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise MetadataError(f"METADATA.XML element {path} is not an ISO time: {text!r}") from None
    return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _channel_list(root: ET.Element, path: str) -> set[int]:
    node = root.find(path)
    if node is None or not (node.text or "").strip():
        return set()
    try:
        return {int(part) for part in node.text.replace(" ", "").split(",") if part}  # type: ignore[union-attr]
    except ValueError:
        raise MetadataError(f"METADATA.XML element {path} is not a list of band numbers") from None


def _band_value(node: ET.Element, number: int, tag: str, positive: bool = False) -> float:
    """A band's value; finite always (NaN would slip through every comparison downstream), and
    above zero where `positive` (wavelength, FWHM: a negative FWHM used to crash `catalog`)."""
    try:
        value = _float(node, tag)
    except MetadataError:
        raise MetadataError(
            f"METADATA.XML bandCharacterisation/bandID[{number}]/{tag} is missing or not a number"
        ) from None
    if not math.isfinite(value) or (positive and value <= 0):
        kind = "a positive finite number" if positive else "a finite number"
        raise MetadataError(
            f"METADATA.XML bandCharacterisation/bandID[{number}]/{tag} is {value!r}, not {kind}"
        )
    return value


def _bands(root: ET.Element) -> tuple[Band, ...]:
    # Scope to bandCharacterisation: bandStatistics and the RPC block hold other `bandID` elements.
    nodes = root.findall("specific/bandCharacterisation/bandID")
    if not nodes:
        raise MetadataError("METADATA.XML misses required element specific/bandCharacterisation/bandID")
    vnir = _channel_list(root, "specific/vnirProductQuality/expectedChannelsList")
    swir = _channel_list(root, "specific/swirProductQuality/expectedChannelsList")
    bands = []
    for node in nodes:
        number_text = node.get("number")
        if number_text is None or not number_text.isdigit():
            raise MetadataError("METADATA.XML bandCharacterisation/bandID lacks a numeric 'number'")
        number = int(number_text)
        detector = "VNIR" if number in vnir else "SWIR" if number in swir else ""
        bands.append(
            Band(
                number=number,
                wavelength_nm=_band_value(node, number, "wavelengthCenterOfBand", positive=True),
                fwhm_nm=_band_value(node, number, "FWHMOfBand", positive=True),
                gain=_band_value(node, number, "GainOfBand"),
                offset=_band_value(node, number, "OffsetOfBand"),
                detector=detector,
            )
        )
    numbers = [b.number for b in bands]
    if numbers != list(range(1, len(bands) + 1)):
        raise MetadataError("METADATA.XML band numbers are not 1..N in order")
    wavelengths = [b.wavelength_nm for b in bands]
    if any(b <= a for a, b in zip(wavelengths, wavelengths[1:], strict=False)):
        raise MetadataError("METADATA.XML band wavelengths are not strictly ascending")
    return tuple(bands)


def _band_statistics(root: ET.Element) -> tuple[BandStatistics, ...]:
    stats = []
    for node in root.findall("product/bandStatistics/bandID"):
        number = node.get("number")
        if number is None or not number.isdigit():
            raise MetadataError("METADATA.XML bandStatistics/bandID lacks a numeric 'number'")
        stats.append(BandStatistics(int(number), _float(node, "mean"), _float(node, "stdDeviation")))
    return tuple(stats)


def _footprint(root: ET.Element) -> tuple[FootprintPoint, ...]:
    path = "base/spatialCoverage/boundingPolygon/point"
    points = []
    for node in root.findall(path):
        points.append(
            FootprintPoint(_text(node, "frame"), _float(node, "latitude"), _float(node, "longitude"))
        )
    frames = {p.frame for p in points}
    missing = [f for f in (*FOOTPRINT_CORNERS, "center") if f not in frames]
    if missing:
        raise MetadataError(f"METADATA.XML {path} lacks the {', '.join(missing)} point(s)")
    for p in points:
        if not (-90 <= p.latitude <= 90 and -180 <= p.longitude <= 180):
            raise MetadataError(f"METADATA.XML footprint point {p.frame} is outside lat/lon range")
    return tuple(points)


def _optional_float(root: ET.Element, path: str) -> float | None:
    node = root.find(path)
    if node is None or not (node.text or "").strip():
        return None
    try:
        return float(node.text)  # type: ignore[arg-type]
    except ValueError:
        return None


def _build(root: ET.Element) -> SceneMetadata:
    name = _text(root, "metadata/name")
    # The real products write the metadata file's own name here (`<scene>-METADATA.XML`; a portal
    # download may call the file `-METADATA.XML.XML`).
    scene_id = re.sub(r"-METADATA(?:\.xml)+$", "", name, flags=re.IGNORECASE)

    width = _int(root, "specific/widthOfOrthoScene")
    height = _int(root, "specific/heightOfOrthoScene")
    columns = _int(root, "product/image/merge/dimension/columns")
    rows = _int(root, "product/image/merge/dimension/rows")
    if (columns, rows) != (width, height):
        raise MetadataError(
            f"METADATA.XML raster size disagrees: ortho scene {width} x {height}, image {columns} x {rows}"
        )

    quality = QualityCover(
        cloud=_float(root, "specific/qualityFlag/cloudCover"),
        cloud_shadow=_float(root, "specific/qualityFlag/cloudShadow"),
        haze=_float(root, "specific/qualityFlag/hazeCover"),
        cirrus=_float(root, "specific/qualityFlag/cirrusCover"),
        snow=_float(root, "specific/qualityFlag/snowCover"),
        water=_float(root, "specific/qualityFlag/waterCover"),
    )
    angles = Angles(
        sun_elevation=_float(root, "specific/sunElevationAngle/center"),
        sun_azimuth=_float(root, "specific/sunAzimuthAngle/center"),
        across_off_nadir=_float(root, "specific/acrossOffNadirAngle/center"),
        along_off_nadir=_float(root, "specific/alongOffNadirAngle/center"),
        scene_azimuth=_float(root, "specific/sceneAzimuthAngle/center"),
    )
    start = _time(root, "base/temporalCoverage/startTime")
    stop = _time(root, "base/temporalCoverage/stopTime")
    if stop < start:
        raise MetadataError("METADATA.XML stopTime is before startTime")

    projection = _text(root, "product/ortho/projection")
    epsg_from_projection(projection)  # fail at parse time, with the reason, not later

    file_names = tuple(
        (node.text or "").strip() for node in root.findall("product/productFileInformation/file/name")
    )
    datatake = _text(root, "specific/datatakeID")
    if not datatake.isdigit():
        raise MetadataError(f"METADATA.XML datatakeID is not numeric: {datatake!r}")

    return SceneMetadata(
        scene_id=scene_id,
        schema=(root.findtext("metadata/schema/name") or "").strip(),
        processing_level=(root.findtext("metadata/schema/processingLevel") or "").strip(),
        datatake_id=f"{int(datatake):010d}",
        tile_id=_int(root, "specific/tileID"),
        orbit_number=_int(root, "specific/orbitNo"),
        orbit_direction=_text(root, "specific/orbitDirection").upper(),
        start_time=start,
        stop_time=stop,
        # Older products may lack datatakeStart; the tile start is then the best available date.
        datatake_start=_time(root, "specific/datatakeStart")
        if root.find("specific/datatakeStart") is not None
        else start,
        bands=_bands(root),
        band_statistics=_band_statistics(root),
        footprint=_footprint(root),
        quality=quality,
        angles=angles,
        width=width,
        height=height,
        projection=projection,
        background_value=_optional_float(root, "specific/backgroundValue"),
        file_names=tuple(f for f in file_names if f),
    )
