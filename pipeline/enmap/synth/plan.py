"""The plan: sites, datatakes and products (times, grid positions, footprints, atmosphere) from the seed."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np
from pyproj import Transformer

from pipeline.enmap.names import ProductName
from pipeline.enmap.synth.bands import load_band_table
from pipeline.enmap.synth.config import CELL_PX, GRID_OFFSET, LINE_TIME_S, PIXEL, SynthConfig
from pipeline.enmap.synth.fields import RandomField, seeded_rng, upper_quantile
from pipeline.enmap.synth.grid import Footprint, footprint_size_px, utm_epsg


@dataclass
class Site:
    index: int
    lon: float
    lat: float
    epsg: int
    theta_deg: float
    kx: int  # raster origin of date 0 tile 1: x0 = 15 + 30 * kx
    ky: int  # y0 = 15 + 30 * ky
    seed: int
    fields: dict[str, RandomField] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)


@dataclass
class Datatake:
    id: int
    site: Site
    date_index: int
    start: datetime
    shift: tuple[int, int]  # (dcol, drow) of tile 001 against the site's base raster
    tiles: int
    seed: int
    sun_elevation: float = 0.0
    sun_azimuth: float = 0.0
    across_off_nadir: float = 0.0
    along_off_nadir: float = 0.0
    shadow_offset: tuple[int, int] = (0, 0)  # (dcol, drow)
    amounts: dict[str, float] = field(default_factory=dict)
    fields: dict[str, RandomField] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    tile_shift: tuple[int, int] = (0, 0)  # (dcol, drow) of tile 002 against tile 001


@dataclass
class Product:
    datatake: Datatake
    tile: int
    version: str
    processing_time: datetime
    kx: int
    ky: int
    footprint: Footprint
    start: datetime
    stop: datetime
    packaging: str = "folder"
    fmt: str = "GTiff"
    ard_raster_extension: str = "tiff"
    superseded_by: Product | None = None
    supersedes: Product | None = None
    partner: Product | None = None
    order_number: int = 0

    @property
    def name(self) -> str:
        return ProductName.format(self.datatake.id, self.start, self.tile, self.version, self.processing_time)

    @property
    def reprocessed(self) -> bool:
        return self.supersedes is not None


def solar_position(when: datetime, lat: float, lon: float) -> tuple[float, float]:
    """Sun elevation and azimuth (deg, azimuth from north clockwise), NOAA approximation."""
    doy = when.timetuple().tm_yday
    hour = when.hour + when.minute / 60 + when.second / 3600
    g = 2 * math.pi / 365 * (doy - 1 + (hour - 12) / 24)
    eqtime = 229.18 * (
        0.000075
        + 0.001868 * math.cos(g)
        - 0.032077 * math.sin(g)
        - 0.014615 * math.cos(2 * g)
        - 0.040849 * math.sin(2 * g)
    )
    decl = (
        0.006918
        - 0.399912 * math.cos(g)
        + 0.070257 * math.sin(g)
        - 0.006758 * math.cos(2 * g)
        + 0.000907 * math.sin(2 * g)
        - 0.002697 * math.cos(3 * g)
        + 0.00148 * math.sin(3 * g)
    )
    tst = hour * 60 + eqtime + 4 * lon
    ha = math.radians(tst / 4 - 180)
    phi = math.radians(lat)
    cos_zen = math.sin(phi) * math.sin(decl) + math.cos(phi) * math.cos(decl) * math.cos(ha)
    zen = math.acos(max(-1.0, min(1.0, cos_zen)))
    az = math.degrees(math.atan2(math.sin(ha), math.cos(ha) * math.sin(phi) - math.tan(decl) * math.cos(phi)))
    return 90 - math.degrees(zen), (az + 180) % 360


class Plan:
    def __init__(self, config: SynthConfig):
        self.config = config
        self.bands = load_band_table(config.bands)
        self.no_data_bands = tuple(sorted({b for b in config.no_data_bands if 1 <= b <= config.bands}))
        w, h = config.width, config.height
        self.slack = max(2, round(0.03 * min(w, h)))
        self.sites = [self._site(i) for i in range(config.sites)]
        self.datatakes = self._datatakes()
        self.products = self._products()

    # sites ---------------------------------------------------------------------------------------
    def _site(self, index: int) -> Site:
        cfg = self.config
        rng = seeded_rng("site", cfg.seed, index)
        if cfg.site_lonlat:
            lon, lat = cfg.site_lonlat[index]
        else:  # spread over central Europe, sites ~100 km apart
            base = seeded_rng("sites", cfg.seed)
            lon0, lat0 = base.uniform(6.5, 13.0), base.uniform(45.5, 52.5)
            lon = lon0 + 1.4 * (index % 4) + rng.uniform(-0.2, 0.2)
            lat = lat0 - 1.0 * (index // 4) + rng.uniform(-0.2, 0.2)
        epsg = utm_epsg(lon, lat)
        to_utm = Transformer.from_crs(4326, epsg, always_xy=True)
        e, n = to_utm.transform(lon, lat)
        w, h = cfg.width, cfg.height
        # desired grid alignment: a horizontal pair of cells centred in the raster (small rasters),
        # a random alignment for large ones
        if min(w, h) < 640:
            ox, oy = round((w - 2 * CELL_PX) / 2) % CELL_PX, round((h - CELL_PX) / 2) % CELL_PX
        else:
            ox, oy = int(rng.integers(0, CELL_PX)), int(rng.integers(0, CELL_PX))
        kx0 = round((e - 15 - w * PIXEL / 2) / PIXEL)
        ky0 = round((n - 15 + h * PIXEL / 2) / PIXEL)
        kx = kx0 + ((-ox - kx0) % CELL_PX)
        ky = ky0 + ((oy - ky0) % CELL_PX)
        if kx - kx0 > CELL_PX // 2:
            kx -= CELL_PX
        if ky - ky0 > CELL_PX // 2:
            ky -= CELL_PX
        theta = cfg.scene_azimuth + float(rng.uniform(-1.5, 1.5))
        site = Site(index, float(lon), float(lat), epsg, theta, int(kx), int(ky), int(rng.integers(2**62)))
        frng = seeded_rng("ground", cfg.seed, index)
        site.fields = {
            "vegetation": RandomField(frng, 900, 9000),
            "soil": RandomField(frng, 700, 7000),
            "urban": RandomField(frng, 500, 4000),
            "water": RandomField(frng, 1200, 12000),
            "vigour": RandomField(frng, 200, 2000),
            "brightness": RandomField(frng, 300, 3000),
        }
        # the water threshold: the configured share of the first raster's footprint
        xs, ys = self._centres(kx, ky)
        fp = self._base_footprint(site)
        inside = fp.mask(xs, ys)
        wf = site.fields["water"](xs, ys)[inside]
        site.thresholds["water"] = upper_quantile(wf, cfg.water_amount)
        return site

    def _centres(self, kx: int, ky: int) -> tuple[np.ndarray, np.ndarray]:
        x0, y0 = GRID_OFFSET + PIXEL * kx, GRID_OFFSET + PIXEL * ky
        xs = x0 + PIXEL / 2 + PIXEL * np.arange(self.config.width)
        ys = y0 - PIXEL / 2 - PIXEL * np.arange(self.config.height)
        return xs, ys

    def _base_footprint(self, site: Site) -> Footprint:
        w, h = self.config.width, self.config.height
        theta = math.radians(site.theta_deg)
        wp, hp = footprint_size_px(w, h, theta, self.slack)
        x0, y0 = GRID_OFFSET + PIXEL * site.kx, GRID_OFFSET + PIXEL * site.ky
        return Footprint(x0 + w * PIXEL / 2, y0 - h * PIXEL / 2, wp * PIXEL, hp * PIXEL, theta)

    # datatakes -----------------------------------------------------------------------------------
    def _datatakes(self) -> list[Datatake]:
        cfg = self.config
        first = datetime.strptime(cfg.first_date, "%Y-%m-%d").replace(tzinfo=UTC)
        raw: list[tuple[datetime, Site, int, tuple[int, int], int, int]] = []
        for site in self.sites:
            rng = seeded_rng("dates", cfg.seed, site.index)
            day = first + timedelta(days=int(rng.integers(0, 120)))
            for d in range(cfg.revisits):
                if d:
                    day += timedelta(days=int(rng.integers(17, 81)))
                t = day.replace(hour=10, minute=int(rng.integers(5, 55)), second=int(rng.integers(0, 60)))
                t = t.replace(microsecond=int(rng.integers(0, 1_000_000)))
                # descending pass near 10:40-11:40 local solar time: 10:xx UTC at 10 deg E
                t -= timedelta(hours=round((site.lon - 10.0) / 15.0))
                shift = (
                    (0, 0) if d == 0 else tuple(int(v) for v in rng.integers(-self.slack, self.slack + 1, 2))
                )
                tiles = 2 if (d == 0 and site.index < cfg.overlapping_tiles) else 1
                raw.append((t, site, d, shift, tiles, int(rng.integers(2**62))))  # type: ignore[arg-type]
        raw.sort(key=lambda r: (r[0], r[1].index))
        rng = seeded_rng("datatake-ids", cfg.seed)
        next_id = 1000 + int(rng.integers(0, 4000))
        out = []
        for t, site, d, shift, tiles, seed in raw:
            dt = Datatake(next_id, site, d, t, shift, tiles, seed)
            next_id += 1 + int(rng.integers(3, 60))
            self._datatake_physics(dt)
            out.append(dt)
        out.sort(key=lambda dt: (dt.site.index, dt.date_index))
        return out

    def _datatake_physics(self, dt: Datatake) -> None:
        cfg = self.config
        rng = seeded_rng("datatake", cfg.seed, dt.id)
        site = dt.site
        dt.sun_elevation, dt.sun_azimuth = solar_position(dt.start, site.lat, site.lon)
        dt.across_off_nadir = float(rng.uniform(-15, 15))
        dt.along_off_nadir = float(rng.uniform(-1.2, 1.2))
        dist = cfg.cloud_height_m / math.tan(math.radians(max(dt.sun_elevation, 10.0)))
        az = math.radians(dt.sun_azimuth)
        dcol = round(-dist * math.sin(az) / PIXEL)
        drow = round(dist * math.cos(az) / PIXEL)  # shadow moves away from the sun: -N -> +row
        if dcol == 0 and drow == 0:
            drow = -1
        dt.shadow_offset = (int(dcol), int(drow))

        def amount(mean: float, spread: float = 0.7) -> float:
            return 0.0 if mean <= 0 else float(min(0.9, mean * rng.uniform(1 - spread, 1 + spread)))

        dt.amounts = {
            "cloud": amount(cfg.cloud_amount),
            "haze": amount(cfg.haze_amount),
            "cirrus": amount(cfg.cirrus_amount),
            "snow": amount(cfg.snow_amount, 1.0),
            "unclassified": amount(cfg.unclassified_amount, 0.5),
        }
        frng = seeded_rng("atmosphere", cfg.seed, dt.id)
        dt.fields = {
            "cloud": RandomField(frng, 500, 5000),
            "cloud_texture": RandomField(frng, 90, 600),
            "haze": RandomField(frng, 2000, 15000),
            "cirrus": RandomField(frng, 600, 8000),
            "snow": RandomField(frng, 400, 4000),
            "unclassified": RandomField(frng, 120, 600),
        }
        # tile 002: along track by (1 - overlap) of the footprint height, in whole pixels
        theta = math.radians(site.theta_deg)
        _, hp = footprint_size_px(cfg.width, cfg.height, theta, self.slack)
        dist_px = (1 - cfg.tile_overlap) * hp
        dt.tile_shift = (round(-dist_px * math.sin(theta)), round(dist_px * math.cos(theta)))
        # thresholds from tile 001's footprint, shared by both tiles (one acquisition)
        kx, ky = site.kx + dt.shift[0], site.ky - dt.shift[1]
        xs, ys = self._centres(kx, ky)
        fp = self._base_footprint(site).moved(dt.shift[0] * PIXEL, -dt.shift[1] * PIXEL)
        inside = fp.mask(xs, ys)
        for name in ("cloud", "haze", "snow", "unclassified"):
            values = dt.fields[name](xs, ys)[inside]
            dt.thresholds[name] = upper_quantile(values, dt.amounts[name])
        cir = dt.fields["cirrus"](xs, ys)[inside]
        p = dt.amounts["cirrus"]
        dt.thresholds["cirrus1"] = upper_quantile(cir, p)
        dt.thresholds["cirrus2"] = upper_quantile(cir, p * 0.45)
        dt.thresholds["cirrus3"] = upper_quantile(cir, p * 0.15)

    # products ------------------------------------------------------------------------------------
    def _products(self) -> list[Product]:
        products = [p for dt in self.datatakes for p in self._tiles(dt)]
        products += self._reprocessed_versions(products)
        products.sort(key=lambda p: (p.datatake.site.index, p.datatake.date_index, p.tile, p.version))
        self._assign_deliveries(products)
        return products

    def _tiles(self, dt: Datatake) -> list[Product]:
        """Tile 001 of a datatake and, for an overlapping datatake, tile 002 further along track."""
        cfg, site = self.config, dt.site
        prng = seeded_rng("processing", cfg.seed, dt.id)
        processed = (dt.start + timedelta(days=int(prng.integers(1, 40)))).replace(
            hour=int(prng.integers(0, 24)),
            minute=int(prng.integers(0, 60)),
            second=int(prng.integers(0, 60)),
            microsecond=0,
        )
        fp1 = self._base_footprint(site).moved(dt.shift[0] * PIXEL, -dt.shift[1] * PIXEL)
        kx1, ky1 = site.kx + dt.shift[0], site.ky - dt.shift[1]
        stop1 = dt.start + timedelta(seconds=fp1.h / PIXEL * LINE_TIME_S)
        p1 = Product(dt, 1, cfg.processor_version, processed, kx1, ky1, fp1, dt.start, stop1)
        if dt.tiles != 2:
            return [p1]
        dc, dr = dt.tile_shift
        fp2 = fp1.moved(dc * PIXEL, -dr * PIXEL)
        start2 = dt.start + timedelta(seconds=math.hypot(dc, dr) * LINE_TIME_S)
        stop2 = start2 + timedelta(seconds=fp2.h / PIXEL * LINE_TIME_S)
        # the second tile is processed a little after the first, like DLR's consecutive tiles
        processed2 = processed + timedelta(seconds=41)
        p2 = Product(dt, 2, cfg.processor_version, processed2, kx1 + dc, ky1 - dr, fp2, start2, stop2)
        p1.partner, p2.partner = p2, p1
        return [p1, p2]

    def _reprocessed_versions(self, originals: list[Product]) -> list[Product]:
        """Newer versions of the last `reprocessed` acquisitions (the last one first), processed months
        later on the same grid."""
        cfg = self.config
        out = []
        for p in reversed(originals[len(originals) - cfg.reprocessed :] if cfg.reprocessed else []):
            rrng = seeded_rng("reprocessing", cfg.seed, p.datatake.id, p.tile)
            when = datetime(2024, 11, 4, tzinfo=UTC) + timedelta(
                days=int(rrng.integers(0, 120)), seconds=int(rrng.integers(0, 86400))
            )
            when = max(when, p.processing_time + timedelta(days=30))
            q = Product(
                p.datatake, p.tile, cfg.reprocessed_version, when, p.kx, p.ky, p.footprint, p.start, p.stop
            )
            q.supersedes, p.superseded_by = p, q
            out.append(q)
        return out

    def _assign_deliveries(self, products: list[Product]) -> None:
        """Packaging and format cycled over the products in order (ARD always COG, so the formats cycle
        over the others), and the DLR order number of a tar.gz delivery."""
        cfg = self.config
        ard_count = 0
        for i, p in enumerate(products):
            p.packaging = cfg.packagings[i % len(cfg.packagings)]
            if p.packaging == "ard":
                p.fmt = "COG"
                p.ard_raster_extension = cfg.ard_raster_extension
            else:
                p.fmt = cfg.formats[(i - ard_count) % len(cfg.formats)]
            ard_count += p.packaging == "ard"
            p.order_number = 100_000_000 + (cfg.seed * 7919 + i * 104_729 + 12_345) % 900_000_000
