"""Footprint and grid: UTM zone, footprint rectangle, map-to-lon/lat."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pyproj import Transformer

from pipeline.enmap.synth.config import CELL_PX


def utm_epsg(lon: float, lat: float) -> int:
    zone = int(math.floor((lon + 180.0) / 6.0)) % 60 + 1
    return (32600 if lat >= 0 else 32700) + zone


def projection_name(epsg: int) -> str:
    zone = epsg % 100
    return f"UTM_Zone{zone}_{'North' if epsg < 32700 else 'South'}"


def footprint_size_px(width: int, height: int, theta: float, slack_px: float) -> tuple[float, float]:
    """Footprint rectangle (across w, along h) in pixels for a raster; see the module docstring."""
    c, s = math.cos(theta), math.sin(theta)
    margin = max(1.0, 0.01 * min(width, height))
    wp, hp = width - 2 * margin, height - 2 * margin
    det = c * c - s * s
    w_in = (wp * c - hp * s) / det
    h_in = (hp * c - wp * s) / det
    # hold a horizontal pair of cells (256 x 128 px, axis aligned) centred, plus the revisit shifts
    w_req = 2 * (CELL_PX * c + CELL_PX / 2 * s) + 2 * slack_px * (c + s) + 2
    h_req = 2 * (CELL_PX * s + CELL_PX / 2 * c) + 2 * slack_px * (c + s) + 2
    if width < 2 * CELL_PX or height < CELL_PX:  # no pair can fit: just inscribe
        w_req = h_req = 0.0
    w = max(w_in, min(w_req, width * 1.05))
    h = max(h_in, min(h_req, height * 1.05))
    return w, h


@dataclass(frozen=True)
class Footprint:
    """A rectangle rotated clockwise by theta (radians) in map view, centred at (cx, cy) metres."""

    cx: float
    cy: float
    w: float  # across track, metres
    h: float  # along track, metres
    theta: float

    @property
    def across(self) -> tuple[float, float]:  # unit vector upper_left -> upper_right (E, N)
        return math.cos(self.theta), -math.sin(self.theta)

    @property
    def along(self) -> tuple[float, float]:  # unit vector upper_left -> lower_left (flight direction)
        return -math.sin(self.theta), -math.cos(self.theta)

    def corners(self) -> dict[str, tuple[float, float]]:
        (ax, ay), (lx, ly) = self.across, self.along
        hw, hh = self.w / 2, self.h / 2
        return {
            "upper_left": (self.cx - ax * hw - lx * hh, self.cy - ay * hw - ly * hh),
            "lower_left": (self.cx - ax * hw + lx * hh, self.cy - ay * hw + ly * hh),
            "lower_right": (self.cx + ax * hw + lx * hh, self.cy + ay * hw + ly * hh),
            "upper_right": (self.cx + ax * hw - lx * hh, self.cy + ay * hw - ly * hh),
        }

    def ring(self) -> list[tuple[float, float]]:
        c = self.corners()
        return [c["upper_left"], c["lower_left"], c["lower_right"], c["upper_right"], c["upper_left"]]

    def mask(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        dx = xs[None, :] - self.cx
        dy = ys[:, None] - self.cy
        (ax, ay), (lx, ly) = self.across, self.along
        u = dx * ax + dy * ay
        v = dx * lx + dy * ly
        return (np.abs(u) <= self.w / 2) & (np.abs(v) <= self.h / 2)

    def moved(self, dx: float, dy: float) -> Footprint:
        return Footprint(self.cx + dx, self.cy + dy, self.w, self.h, self.theta)


def to_lonlat(epsg: int, pts: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    tr = Transformer.from_crs(epsg, 4326, always_xy=True)
    return [tuple(float(v) for v in tr.transform(x, y)) for x, y in pts]  # type: ignore[misc]
