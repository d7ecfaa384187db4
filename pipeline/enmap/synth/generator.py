"""`generate`: plan the products, write each one, then truth.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import rasterio
import rasterio.shutil
import rasterio.windows

from pipeline.enmap.synth.config import GRID_OFFSET, PIXEL, STAGING, SynthConfig
from pipeline.enmap.synth.grid import to_lonlat
from pipeline.enmap.synth.metadata import iso_time
from pipeline.enmap.synth.packaging import remove_path, removed_afterwards, write_product
from pipeline.enmap.synth.plan import Plan, Product
from pipeline.enmap.synth.quality_layers import quality_percent
from pipeline.enmap.synth.rasters import WrittenRasters
from pipeline.enmap.synth.truth import ProductTruth, Truth, cells_inside


def generate(out_dir: str | Path, config: SynthConfig | None = None) -> Truth:
    """Write the synthetic products of `config` under `out_dir` and `out_dir/truth.json`."""
    config = config or SynthConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = Plan(config)
    env = rasterio.Env(GDAL_CACHEMAX=64 * 1024 * 1024, GDAL_PAM_ENABLED="NO", GDAL_NUM_THREADS="1")
    records: list[ProductTruth] = []
    remove_path(out / STAGING)
    with env, removed_afterwards(out / STAGING):
        for p in plan.products:
            res = write_product(plan, p, out)
            written: WrittenRasters = res["written"]
            m = written.masks
            fr = m.fractions()
            site = p.datatake.site
            ring = p.footprint.ring()
            x0, y0 = GRID_OFFSET + PIXEL * p.kx, GRID_OFFSET + PIXEL * p.ky
            records.append(
                ProductTruth(
                    scene_id=p.name,
                    path=res["path"],
                    member=res["member"],
                    packaging=p.packaging,
                    format=p.fmt,
                    files=res["files"],
                    datatake=f"{p.datatake.id:010d}",
                    tile=p.tile,
                    processor_version=p.version,
                    processing_time=iso_time(p.processing_time),
                    start_time=iso_time(p.start),
                    stop_time=iso_time(p.stop),
                    date=p.start.strftime("%Y-%m-%d"),
                    site=site.index,
                    date_index=p.datatake.date_index,
                    epsg=site.epsg,
                    transform=(PIXEL, 0.0, x0, 0.0, -PIXEL, y0),
                    width=config.width,
                    height=config.height,
                    bands=config.bands,
                    footprint_utm=tuple((round(x, 3), round(y, 3)) for x, y in ring),
                    footprint_lonlat=tuple(
                        (round(lo, 8), round(la, 8)) for lo, la in to_lonlat(site.epsg, ring)
                    ),
                    valid_fraction=round(float(m.footprint.mean()), 6),
                    fractions=fr,
                    quality_percent=quality_percent(fr),
                    no_data_bands=plan.no_data_bands,
                    defective_bands=written.defective_bands,
                    shadow_offset_px=p.datatake.shadow_offset,
                    angles={
                        "sun_elevation": round(p.datatake.sun_elevation, 6),
                        "sun_azimuth": round(p.datatake.sun_azimuth, 6),
                        "scene_azimuth": round(site.theta_deg, 6),
                        "across_off_nadir": round(p.datatake.across_off_nadir, 6),
                        "along_off_nadir": round(p.datatake.along_off_nadir, 6),
                    },
                    superseded_by=p.superseded_by.name if p.superseded_by else None,
                    supersedes=p.supersedes.name if p.supersedes else None,
                    partner_tile=p.partner.name if p.partner else None,
                    cells=tuple(cells_inside(plan, p, m)),
                )
            )
    by_dt: dict[int, list[Product]] = {}
    for p in plan.products:
        by_dt.setdefault(p.datatake.id, []).append(p)
    revisits: dict[str, tuple[dict[str, Any], ...]] = {}
    for site in plan.sites:
        entries = []
        for dt in plan.datatakes:
            if dt.site is site:
                entries.append(
                    {
                        "date": dt.start.strftime("%Y-%m-%d"),
                        "datatake": f"{dt.id:010d}",
                        "start_time": iso_time(dt.start),
                        "scene_ids": sorted(p.name for p in by_dt[dt.id]),
                    }
                )
        revisits[str(site.index)] = tuple(entries)
    duplicates = []
    for dt in plan.datatakes:
        group = by_dt[dt.id]
        if len(group) > 1:
            kinds = []
            if dt.tiles > 1:
                kinds.append("overlapping_tiles")
            if any(p.reprocessed for p in group):
                kinds.append("reprocessed")
            duplicates.append(
                {"datatake": f"{dt.id:010d}", "kinds": kinds, "scene_ids": sorted(p.name for p in group)}
            )
    sites = tuple(
        {
            "site": s.index,
            "epsg": s.epsg,
            "lon": round(s.lon, 6),
            "lat": round(s.lat, 6),
            "scene_azimuth": round(s.theta_deg, 6),
        }
        for s in plan.sites
    )
    truth = Truth(
        config=config.to_dict(),
        sites=sites,
        products=tuple(records),
        revisits=revisits,
        duplicates=tuple(duplicates),
    )
    truth.to_json(out / "truth.json")
    return truth
