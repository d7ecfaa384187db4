"""truth.json: what `generate` made (`Truth`, `ProductTruth`) and the records built from the plan."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from affine import Affine

from pipeline.enmap.synth.config import CELL_PX, GRID_OFFSET, PIXEL
from pipeline.enmap.synth.plan import Plan, Product
from pipeline.enmap.synth.quality_layers import Masks


@dataclass(frozen=True)
class ProductTruth:
    scene_id: str
    path: str
    member: str | None
    packaging: str
    format: str
    files: tuple[str, ...]
    datatake: str
    tile: int
    processor_version: str
    processing_time: str
    start_time: str
    stop_time: str
    date: str
    site: int
    date_index: int
    epsg: int
    transform: tuple[float, ...]
    width: int
    height: int
    bands: int
    footprint_utm: tuple[tuple[float, float], ...]
    footprint_lonlat: tuple[tuple[float, float], ...]
    valid_fraction: float
    fractions: dict[str, float]
    quality_percent: dict[str, int]
    no_data_bands: tuple[int, ...]
    defective_bands: tuple[int, ...]
    shadow_offset_px: tuple[int, int]
    angles: dict[str, float]
    superseded_by: str | None
    supersedes: str | None
    partner_tile: str | None
    cells: tuple[dict[str, Any], ...]

    @property
    def affine(self) -> Affine:
        return Affine(*self.transform)


@dataclass(frozen=True)
class Truth:
    """What `generate` made; JSON-friendly (see the module docstring for the schema)."""

    config: dict[str, Any]
    sites: tuple[dict[str, Any], ...]
    products: tuple[ProductTruth, ...]
    revisits: dict[str, tuple[dict[str, Any], ...]]
    duplicates: tuple[dict[str, Any], ...]
    version: int = 1

    def product(self, scene_id: str) -> ProductTruth:
        for p in self.products:
            if p.scene_id == scene_id:
                return p
        raise KeyError(scene_id)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "spectralearth-synth-truth",
            "version": self.version,
            "config": self.config,
            "sites": list(self.sites),
            "products": [asdict(p) for p in self.products],
            "revisits": {k: list(v) for k, v in self.revisits.items()},
            "duplicates": list(self.duplicates),
        }

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(_jsonable(self.to_dict()), indent=1, sort_keys=False) + "\n"
        if path is not None:
            atomic_write_bytes(Path(path), text.encode())
        return text

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> Truth:
        text = str(path_or_text)
        if isinstance(path_or_text, Path) or not text.lstrip().startswith("{"):
            text = Path(path_or_text).read_text()
        data = json.loads(text)
        if data.get("format") != "spectralearth-synth-truth":
            raise ValueError("not a synthetic-products truth file")
        products = []
        for p in data["products"]:
            kw = dict(p)
            for key in ("files", "transform", "no_data_bands", "defective_bands", "cells"):
                kw[key] = tuple(kw[key])
            kw["shadow_offset_px"] = tuple(kw["shadow_offset_px"])
            kw["footprint_utm"] = tuple(tuple(v) for v in kw["footprint_utm"])
            kw["footprint_lonlat"] = tuple(tuple(v) for v in kw["footprint_lonlat"])
            products.append(ProductTruth(**kw))
        return cls(
            config=data["config"],
            sites=tuple(data["sites"]),
            products=tuple(products),
            revisits={k: tuple(v) for k, v in data["revisits"].items()},
            duplicates=tuple(data["duplicates"]),
            version=data["version"],
        )


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    return obj


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def cells_inside(plan: Plan, p: Product, m: Masks) -> list[dict[str, Any]]:
    cfg = plan.config
    x0, y0 = GRID_OFFSET + PIXEL * p.kx, GRID_OFFSET + PIXEL * p.ky
    size = CELL_PX * PIXEL
    out = []
    i_first = math.ceil((x0 - GRID_OFFSET) / size)
    j_top = math.floor((y0 - GRID_OFFSET) / size) - 1  # the highest cell whose top edge is <= y0
    i = i_first
    while True:
        col = round((GRID_OFFSET + i * size - x0) / PIXEL)
        if col + CELL_PX > cfg.width:
            break
        j = j_top
        while True:
            row = round((y0 - (GRID_OFFSET + (j + 1) * size)) / PIXEL)
            if row + CELL_PX > cfg.height:
                break
            win = (slice(row, row + CELL_PX), slice(col, col + CELL_PX))
            if row >= 0 and col >= 0 and m.footprint[win].all():
                out.append(
                    {
                        "location_id": f"EPSG{p.datatake.site.epsg}-{i:04d}-{j:04d}",
                        "i": i,
                        "j": j,
                        "col": col,
                        "row": row,
                        "fractions": m.fractions(win),
                    }
                )
            j -= 1
        i += 1
    return out
