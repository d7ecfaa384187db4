"""EnMAP product names: the one place that knows how a product and its files are called.

A product is `ENMAP01-____L2A-DT<datatake>_<start>Z_<tile>_V<version>_<processed>Z` and each of its
files is `<name>-<SUFFIX>.<EXT>` (for example `-SPECTRAL_IMAGE.TIF`, `-QL_QUALITY_CLOUD.TIF`,
`-METADATA.XML`, or `-SPECTRAL_IMAGE_COG.tiff` / `_COG.TIF` and `-METADATA.xml` / `-METADATA.XML.XML` in
the ARD variant), suffix and extension in any case.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

PRODUCT_NAME_PATTERN = (
    r"ENMAP01-____L2A-DT(?P<datatake>\d{10})_(?P<start>\d{8}T\d{6})Z_(?P<tile>\d{3})"
    r"_V(?P<version>\d{6})_(?P<processed>\d{8}T\d{6})Z"
)
_NAME_RE = re.compile(rf"^{PRODUCT_NAME_PATTERN}$")
_SEARCH_RE = re.compile(PRODUCT_NAME_PATTERN)
# `<name>-<SUFFIX>.<EXT>`, suffix and extension in any case (deliveries write `-METADATA.XML`,
# `-METADATA.xml`, `_COG.tiff`, `_COG.TIF`); DLR's portal has been seen to deliver the metadata as
# `-METADATA.XML.XML`, so a doubled `.xml` is one extension.
_FILE_RE = re.compile(
    rf"^(?P<name>{PRODUCT_NAME_PATTERN})-(?P<suffix>[A-Za-z0-9_]+)"
    r"\.(?P<ext>(?i:xml\.xml)|[A-Za-z0-9]+)$"
)

SPECTRAL_IMAGE = "SPECTRAL_IMAGE"
METADATA = "METADATA"
# The ARD variant names its rasters `-<LAYER>_COG.tiff` (`-SPECTRAL_IMAGE_COG.tiff`): the same layers.
ARD_SUFFIX = "_COG"
RASTER_EXTENSIONS = frozenset({"tif", "tiff", "bsq", "bil", "bip", "jp2"})
SIDECAR_EXTENSIONS = frozenset({"hdr", "aux", "ovr"})


class ProductNameError(ValueError):
    """A string that is not an EnMAP L2A product name."""


def _parse_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y%m%dT%H%M%S").replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class ProductName:
    """The fields encoded in an EnMAP L2A product name."""

    scene_id: str
    datatake_id: str
    start: datetime
    tile: int
    processor_version: str
    processing_time: datetime

    @classmethod
    def parse(cls, name: str) -> ProductName:
        match = _NAME_RE.match(name)
        if match is None:
            raise ProductNameError(f"not an EnMAP L2A product name: {name!r}")
        return cls(
            scene_id=name,
            datatake_id=match["datatake"],
            start=_parse_time(match["start"]),
            tile=int(match["tile"]),
            processor_version="V" + match["version"],
            processing_time=_parse_time(match["processed"]),
        )

    @staticmethod
    def format(
        datatake_id: int | str,
        start: datetime,
        tile: int,
        processor_version: str,
        processing_time: datetime,
    ) -> str:
        version = processor_version.removeprefix("V")
        if not re.fullmatch(r"\d{6}", version):
            raise ProductNameError(f"processor version must be V + 6 digits: {processor_version!r}")
        name = (
            f"ENMAP01-____L2A-DT{int(datatake_id):010d}_{start:%Y%m%dT%H%M%S}Z_{tile:03d}"
            f"_V{version}_{processing_time:%Y%m%dT%H%M%S}Z"
        )
        ProductName.parse(name)
        return name


@dataclass(frozen=True, slots=True)
class ProductFileName:
    """One file of a product: its product name, layer suffix and extension."""

    product: str
    suffix: str  # upper case, as the layer names are written
    extension: str  # as written (`TIF`, `tiff`, `xml`, `XML.XML`)

    @property
    def layer(self) -> str:
        """The layer this file holds, the ARD spelling folded in (`X_COG` -> `X`)."""
        return self.suffix.removesuffix(ARD_SUFFIX)

    @property
    def is_cog(self) -> bool:
        return self.suffix.endswith(ARD_SUFFIX)

    @property
    def kind(self) -> str:
        """What role the file plays, whatever its spelling: `raster`, `sidecar` or its lower-case
        extension (`xml`, ...); `-METADATA.XML.XML` is an `xml`."""
        extension = self.extension.lower()
        if extension in RASTER_EXTENSIONS:
            return "raster"
        if extension in SIDECAR_EXTENSIONS:
            return "sidecar"
        return extension.rsplit(".", 1)[-1]

    @property
    def key(self) -> tuple[str, str, str]:
        """(product, layer, kind): equal for two spellings of the same file (`-QL_PIXELMASK.TIF` and
        `-QL_PIXELMASK_COG.tiff`, `-METADATA.XML` and `-METADATA.XML.XML`)."""
        return (self.product, self.layer, self.kind)

    @property
    def is_raster(self) -> bool:
        return self.extension.lower() in RASTER_EXTENSIONS

    @property
    def is_sidecar(self) -> bool:
        return self.extension.lower() in SIDECAR_EXTENSIONS


def parse_file_name(basename: str) -> ProductFileName | None:
    """Split `<name>-<SUFFIX>.<EXT>`; None for a name that is not a product file."""
    match = _FILE_RE.match(basename)
    if match is None:
        return None
    return ProductFileName(match["name"], match["suffix"].upper(), match["ext"])


def find_product_names(text: str) -> list[str]:
    """Every product name inside `text` (an archive member path, a delivery file name)."""
    return [m.group(0) for m in _SEARCH_RE.finditer(text)]
