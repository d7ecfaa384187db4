"""Helpers for the STAC tests: synthetic build tables, the band axis, and an offline STAC validator.

The tables imitate `inventory/scenes.parquet` and `index/patches.parquet` closely enough for the catalog
(same columns and types) without running the pipeline: scenes in two UTM zones, a datatake seen in two
overlapping tiles (duplicates), locations seen on two dates.
"""

from __future__ import annotations

import csv
import json
import socket
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from pipeline import tables
from pipeline.quality import FLAG_NAMES
from stac.schema import packaged_schemas

REPO = Path(__file__).resolve().parent.parent
SCHEMAS = REPO.parent / "shared" / "stac-schemas"
BANDS_CSV = REPO / "pipeline" / "enmap" / "data" / "v010303_bands.csv"
FLAGS = FLAG_NAMES
CELL = 3840.0


def spectralearth_bands() -> list[tuple[int, float, float]]:
    """The SpectralEarth band axis: 202 of the 224 V010303 bands."""
    from pipeline.manifest import BandPolicy

    with BANDS_CSV.open() as handle:
        rows = list(csv.DictReader(handle))
    wavelengths = tuple(float(r["wavelength_nm"]) for r in rows)
    fwhm = {int(r["band"]): float(r["fwhm_nm"]) for r in rows}
    kept = BandPolicy(expected_count=224, drop_bands=((127, 141), (161, 167))).kept_bands(wavelengths)
    return [(n, wavelengths[n - 1], fwhm[n]) for n in kept]


# Synthetic tables ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class SceneSpec:
    epsg: int
    datatake: int
    tile: int
    start: datetime
    cells: tuple[tuple[int, int], ...]  # (i, j) of its kept patches
    version: str = "V010303"
    direction: str = "DESCENDING"


def _cells(i0: int, i1: int, j0: int, j1: int) -> tuple[tuple[int, int], ...]:
    return tuple((i, j) for i in range(i0, i1 + 1) for j in range(j0, j1 + 1))


def default_scenes() -> list[SceneSpec]:
    t = datetime(2023, 5, 1, 10, 20, 30, 123456, tzinfo=UTC)
    return [
        # zone 32N: a datatake in two overlapping tiles (cells in both are duplicates), a later revisit
        SceneSpec(32632, 1049, 1, t, _cells(164, 167, 1370, 1373)),
        SceneSpec(32632, 1049, 2, t + timedelta(seconds=8), _cells(164, 167, 1373, 1374)),
        SceneSpec(32632, 1100, 1, datetime(2023, 6, 15, 10, 5, 0, tzinfo=UTC), _cells(166, 169, 1371, 1373)),
        # zone 33N, ascending, two dates over part of the area
        SceneSpec(
            32633,
            2001,
            3,
            datetime(2024, 2, 10, 9, 0, 0, tzinfo=UTC),
            _cells(45, 47, 1375, 1377),
            "V010302",
            "ASCENDING",
        ),
        SceneSpec(32633, 2050, 1, datetime(2024, 3, 1, 9, 30, 0, tzinfo=UTC), _cells(46, 47, 1376, 1377)),
    ]


def _scene_id(spec: SceneSpec) -> str:
    processed = spec.start + timedelta(days=30)
    return (
        f"ENMAP01-____L2A-DT{spec.datatake:010d}_{spec.start:%Y%m%dT%H%M%S}Z_{spec.tile:03d}_"
        f"{spec.version}_{processed:%Y%m%dT%H%M%S}Z"
    )


def _lonlat_polygon(epsg: int, xmin: float, ymin: float, xmax: float, ymax: float) -> Any:
    from pyproj import Transformer
    from shapely.geometry import Polygon

    transformer = Transformer.from_crs(f"EPSG:{epsg}", "EPSG:4326", always_xy=True)
    xs = [xmin, xmax, xmax, xmin]
    ys = [ymax, ymax, ymin, ymin]
    lon, lat = transformer.transform(xs, ys)
    return Polygon(zip(lon, lat, strict=True))


def make_tables(specs: list[SceneSpec] | None = None, seed: int = 7) -> tuple[Any, Any]:
    """(scenes, patches) GeoDataFrames shaped like the pipeline's tables."""
    import geopandas
    import numpy as np

    specs = default_scenes() if specs is None else specs
    rng = np.random.default_rng(seed)
    scene_rows = []
    candidates: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for spec in specs:  # the draws from rng keep their order: the scene, then its cells
        scene_rows.append(_scene_row(spec, rng))
        _add_cell_candidates(spec, rng, candidates)
    patch_rows = _index_rows(candidates)
    scenes = geopandas.GeoDataFrame(scene_rows, geometry="footprint", crs="EPSG:4326")
    patches = geopandas.GeoDataFrame(
        sorted(patch_rows, key=lambda r: r["row"]), geometry="geometry", crs="EPSG:4326"
    )
    return scenes, patches


def _scene_geometry(spec: SceneSpec) -> tuple[float, float, int, int]:
    """x0, y0 (upper-left corner), width and height of a scene padded around its cells."""
    imin = min(i for i, _ in spec.cells)
    imax = max(i for i, _ in spec.cells)
    jmin = min(j for _, j in spec.cells)
    jmax = max(j for _, j in spec.cells)
    x0 = 15 + imin * CELL - 33 * 30
    y0 = 15 + (jmax + 1) * CELL + 91 * 30
    width = int((imax - imin + 1) * CELL / 30) + 66
    height = int((jmax - jmin + 1) * CELL / 30) + 182
    return x0, y0, width, height


def _scene_row(spec: SceneSpec, rng: Any) -> dict[str, Any]:
    """A scenes.parquet row (draws two numbers from `rng`)."""
    scene_id = _scene_id(spec)
    x0, y0, width, height = _scene_geometry(spec)
    footprint = _lonlat_polygon(spec.epsg, x0 + 500, y0 - height * 30 + 500, x0 + width * 30 - 500, y0 - 500)
    return {
        "scene_id": scene_id,
        "datatake_id": f"{spec.datatake:010d}",
        "tile_id": spec.tile,
        "start_time": spec.start,
        "stop_time": spec.start + timedelta(seconds=4, microseconds=250000),
        "datatake_start": spec.start,
        "processor_version": spec.version,
        "processing_time": spec.start + timedelta(days=30),
        "epsg": spec.epsg,
        "transform": [30.0, 0.0, x0, 0.0, -30.0, y0],
        "width": width,
        "height": height,
        "band_count": 224,
        "wavelengths_nm": [400.0 + k for k in range(3)],
        "fwhm_nm": [7.0, 7.0, 7.0],
        "no_data_bands": [],
        "cloud_cover": float(rng.integers(0, 40)),
        "cloud_shadow": float(rng.integers(0, 10)),
        "haze_cover": 1.0,
        "cirrus_cover": 0.0,
        "snow_cover": 0.0 if spec.epsg == 32632 else 12.0,
        "water_cover": 3.0,
        "sun_elevation": 55.5,
        "sun_azimuth": 160.25,
        "across_off_nadir": -3.5 if spec.tile == 1 else 2.0,
        "along_off_nadir": 0.25,
        "scene_azimuth": 101.5,
        "orbit_number": 1000 + spec.datatake,
        "orbit_direction": spec.direction,
        "source_uri": f"/data/{scene_id}.ZIP",
        "packaging": "zip",
        "variant": "standard",
        "container_uri": f"/data/{scene_id}.ZIP",
        "inner_zip": None,
        "members": "[]",
        "fingerprint": f"{spec.datatake:064x}",
        "metadata_schema": "level_X",
        "footprint": footprint,
    }


def _add_cell_candidates(
    spec: SceneSpec, rng: Any, candidates: dict[tuple[str, str], list[dict[str, Any]]]
) -> None:
    """A candidate row per cell of the scene, added to `candidates` by (location, datatake)."""
    scene_id = _scene_id(spec)
    x0, y0, _, _ = _scene_geometry(spec)
    for i, j in spec.cells:
        location_id = f"EPSG{spec.epsg}-{i:04d}-{j:04d}"
        xmin, ymax = 15 + i * CELL, 15 + (j + 1) * CELL
        cloud = float(rng.choice([0.0, 0.0, rng.random() * 0.3]))
        fractions = {flag: 0.0 for flag in FLAGS}
        fractions.update(
            cloud=cloud,
            snow=float(rng.random() * 0.05) if spec.epsg == 32633 else 0.0,
            water=float(rng.random() * 0.2),
        )
        candidates.setdefault((location_id, f"{spec.datatake:010d}"), []).append(
            {
                "location_id": location_id,
                "scene_id": scene_id,
                "acquisition_date": f"{spec.start:%Y%m%d}",
                "epsg": spec.epsg,
                "i": i,
                "j": j,
                "col_off": int((xmin - x0) / 30),
                "row_off": int((y0 - ymax) / 30),
                "size": 128,
                "x_ul": xmin,
                "y_ul": ymax,
                "start_time": spec.start,
                "datatake_id": f"{spec.datatake:010d}",
                "tile_id": spec.tile,
                "processor_version": spec.version,
                "disqualifying_pixels": 0,
                "scene_transform": [30.0, 0.0, x0, 0.0, -30.0, y0],
                **{f"{flag}_fraction": value for flag, value in fractions.items()},
                "geometry": _lonlat_polygon(spec.epsg, xmin, ymax - CELL, xmin + CELL, ymax),
            }
        )


def _index_rows(candidates: dict[tuple[str, str], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """index/patches.parquet rows: one per (location, datatake), with duplicates, row and n_dates."""
    patch_rows = []
    for (location_id, datatake), group in sorted(candidates.items()):
        group = sorted(group, key=lambda r: r["scene_id"])
        chosen = dict(group[0])
        chosen["duplicates"] = [r["scene_id"] for r in group[1:]]
        chosen["patch_id"] = f"{location_id}_{chosen['acquisition_date']}_DT{datatake}"
        patch_rows.append(chosen)
    dates: dict[str, set[str]] = {}
    for row in patch_rows:
        dates.setdefault(row["location_id"], set()).add(row["acquisition_date"])
    for number, row in enumerate(
        sorted(patch_rows, key=lambda r: (r["scene_id"], r["row_off"], r["col_off"]))
    ):
        row["row"] = number
        row["n_dates"] = len(dates[row["location_id"]])
    return patch_rows


def write_tables(store: Any, scenes: Any, patches: Any) -> None:
    store.write_geodataframe(tables.SCENES, scenes)
    store.write_geodataframe(tables.INDEX_PATCHES, patches)


def many_scene_specs(n_scenes: int, cells_side: int) -> list[SceneSpec]:
    """Scenes on a diagonal with `cells_side`^2 patches each, half of them revisited."""
    specs = []
    for k in range(n_scenes):
        epsg = 32632 if k % 2 == 0 else 32633
        i0 = 100 + (k // 2) * (cells_side - 2)
        j0 = 1300 + (k // 4) * 3
        start = datetime(2023, 1, 1, 10, tzinfo=UTC) + timedelta(days=7 * k)
        specs.append(
            SceneSpec(epsg, 3000 + k, 1, start, _cells(i0, i0 + cells_side - 1, j0, j0 + cells_side - 1))
        )
    return specs


# Offline validation --------------------------------------------------------------------------------
class NetworkBlocked(AssertionError):
    pass


def block_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any outbound connection (urllib, requests, raw sockets) an error."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise NetworkBlocked(f"network access attempted in a test: {args[:2]!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def extension_schemas(root: Path) -> dict[str, dict[str, Any]]:
    """`https://stac-extensions.github.io/<ext>/<version>/schema.json` -> the local mirror's content."""
    out = {}
    for path in sorted(root.glob("*/v*/schema.json")):
        uri = f"https://stac-extensions.github.io/{path.parent.parent.name}/{path.parent.name}/schema.json"
        out[uri] = json.loads(path.read_text())
    return out


def offline_validator(root: Path) -> Any:
    """pystac's JSON-schema validator with every schema pre-loaded; a schema not pre-loaded is an error
    (it would be fetched over the network otherwise). Compiled validators are cached per schema."""
    import jsonschema
    from pystac.validation import JsonSchemaSTACValidator
    from pystac.validation.stac_validator import GetSchemaError
    from referencing import Registry, Resource

    class OfflineValidator(JsonSchemaSTACValidator):
        def __init__(self) -> None:
            super().__init__()
            self.schema_cache.update(extension_schemas(root))
            self.schema_cache.update(packaged_schemas())  # the spectralearth:* schema the package ships
            self._registry = Registry().with_resources(
                [(uri, Resource.from_contents(schema)) for uri, schema in self.schema_cache.items()]
            )
            self._compiled: dict[str, Any] = {}

        def _get_schema(self, schema_uri: str) -> dict[str, Any]:
            if schema_uri not in self.schema_cache:
                raise GetSchemaError(
                    schema_uri, NetworkBlocked(f"schema not available offline: {schema_uri}")
                )
            return self.schema_cache[schema_uri]

        @property
        def registry(self) -> Any:
            return self._registry

        def _validate_from_uri(
            self, stac_dict: dict[str, Any], stac_object_type: Any, schema_uri: str, href: Any = None
        ) -> None:  # noqa: E501
            from pystac.errors import STACValidationError

            validator = self._compiled.get(schema_uri)
            if validator is None:
                schema = self._get_schema(schema_uri)
                cls = jsonschema.validators.validator_for(schema)
                cls.check_schema(schema)
                validator = self._compiled[schema_uri] = cls(schema, registry=self._registry)
            errors = list(validator.iter_errors(stac_dict))
            if errors:
                best = jsonschema.exceptions.best_match(errors) or errors[0]
                raise STACValidationError(
                    f"{stac_dict.get('id')} fails {schema_uri}: {best.message} at {list(best.absolute_path)}",
                    source=errors,
                )

    return OfflineValidator()


def validate(validator: Any, document: dict[str, Any]) -> list[str]:
    """Validate a STAC dict against core and every listed extension; returns the schema URIs used."""
    from pystac.validation import validate_dict

    return [uri for uri in validate_dict(document, validator=validator) if uri]


def json_files(folder: Path) -> Iterator[Path]:
    return iter(sorted(folder.rglob("*.json")))
