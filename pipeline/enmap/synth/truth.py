"""truth.json: what `generate` made (`Truth`, `ProductTruth`) and the records built from the plan."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from affine import Affine

from pipeline.enmap.synth.config import CELL_PX, GRID_OFFSET, PIXEL
from pipeline.enmap.synth.grid import to_lonlat
from pipeline.enmap.synth.metadata import iso_time
from pipeline.enmap.synth.packaging import PackagedProduct
from pipeline.enmap.synth.plan import Plan, Product
from pipeline.enmap.synth.quality_layers import Masks, quality_percent


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


def product_truth(plan: Plan, p: Product, packaged: PackagedProduct) -> ProductTruth:
    """What truth.json says about one written product."""
    m = packaged.written.masks
    fr = m.fractions()
    dt, site = p.datatake, p.datatake.site
    ring = p.footprint.ring()
    x0, y0 = GRID_OFFSET + PIXEL * p.kx, GRID_OFFSET + PIXEL * p.ky
    return ProductTruth(
        scene_id=p.name,
        path=packaged.path,
        member=packaged.member,
        packaging=p.packaging,
        format=p.fmt,
        files=packaged.files,
        datatake=f"{dt.id:010d}",
        tile=p.tile,
        processor_version=p.version,
        processing_time=iso_time(p.processing_time),
        start_time=iso_time(p.start),
        stop_time=iso_time(p.stop),
        date=p.start.strftime("%Y-%m-%d"),
        site=site.index,
        date_index=dt.date_index,
        epsg=site.epsg,
        transform=(PIXEL, 0.0, x0, 0.0, -PIXEL, y0),
        width=plan.config.width,
        height=plan.config.height,
        bands=plan.config.bands,
        footprint_utm=tuple((round(x, 3), round(y, 3)) for x, y in ring),
        footprint_lonlat=tuple((round(lo, 8), round(la, 8)) for lo, la in to_lonlat(site.epsg, ring)),
        valid_fraction=round(float(m.footprint.mean()), 6),
        fractions=fr,
        quality_percent=quality_percent(fr),
        no_data_bands=plan.no_data_bands,
        defective_bands=packaged.written.defective_bands,
        shadow_offset_px=dt.shadow_offset,
        angles={
            "sun_elevation": round(dt.sun_elevation, 6),
            "sun_azimuth": round(dt.sun_azimuth, 6),
            "scene_azimuth": round(site.theta_deg, 6),
            "across_off_nadir": round(dt.across_off_nadir, 6),
            "along_off_nadir": round(dt.along_off_nadir, 6),
        },
        superseded_by=p.superseded_by.name if p.superseded_by else None,
        supersedes=p.supersedes.name if p.supersedes else None,
        partner_tile=p.partner.name if p.partner else None,
        cells=tuple(cells_inside(plan, p, m)),
    )


def truth_of(plan: Plan, records: Sequence[ProductTruth]) -> Truth:
    """The whole truth file: the products' records plus the sites, revisits and duplicate groups."""
    by_datatake: dict[int, list[Product]] = {}
    for p in plan.products:
        by_datatake.setdefault(p.datatake.id, []).append(p)
    return Truth(
        config=plan.config.to_dict(),
        sites=_sites(plan),
        products=tuple(records),
        revisits=_revisits(plan, by_datatake),
        duplicates=_duplicates(plan, by_datatake),
    )


def _sites(plan: Plan) -> tuple[dict[str, Any], ...]:
    return tuple(
        {
            "site": s.index,
            "epsg": s.epsg,
            "lon": round(s.lon, 6),
            "lat": round(s.lat, 6),
            "scene_azimuth": round(s.theta_deg, 6),
        }
        for s in plan.sites
    )


def _revisits(plan: Plan, by_datatake: dict[int, list[Product]]) -> dict[str, tuple[dict[str, Any], ...]]:
    """Per site, one entry per datatake in date order."""
    revisits: dict[str, tuple[dict[str, Any], ...]] = {}
    for site in plan.sites:
        revisits[str(site.index)] = tuple(
            {
                "date": dt.start.strftime("%Y-%m-%d"),
                "datatake": f"{dt.id:010d}",
                "start_time": iso_time(dt.start),
                "scene_ids": sorted(p.name for p in by_datatake[dt.id]),
            }
            for dt in plan.datatakes
            if dt.site is site
        )
    return revisits


def _duplicates(plan: Plan, by_datatake: dict[int, list[Product]]) -> tuple[dict[str, Any], ...]:
    """Groups of products showing one acquisition, and why (two tiles, a reprocessed version)."""
    duplicates = []
    for dt in plan.datatakes:
        group = by_datatake[dt.id]
        if len(group) > 1:
            kinds = []
            if dt.tiles > 1:
                kinds.append("overlapping_tiles")
            if any(p.reprocessed for p in group):
                kinds.append("reprocessed")
            duplicates.append(
                {"datatake": f"{dt.id:010d}", "kinds": kinds, "scene_ids": sorted(p.name for p in group)}
            )
    return tuple(duplicates)
