"""The EnMAP V010303 band table (package data) the synthetic spectra are sampled at."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from importlib import resources

import numpy as np


@dataclass(frozen=True)
class BandTable:
    number: np.ndarray  # 1-based number in the product
    wavelength: np.ndarray  # nm
    fwhm: np.ndarray  # nm
    detector: tuple[str, ...]


def load_band_table(count: int = 224) -> BandTable:
    """The V010303 band table (package data); for count < 224 an evenly spaced subset, renumbered 1..count."""
    text = resources.files("pipeline").joinpath("enmap/data/v010303_bands.csv").read_text()
    rows = list(csv.DictReader(io.StringIO(text)))
    if count < len(rows):
        idx = np.unique(np.round(np.linspace(0, len(rows) - 1, count)).astype(int))
        rows = [rows[i] for i in idx]
    return BandTable(
        number=np.arange(1, len(rows) + 1),
        wavelength=np.array([float(r["wavelength_nm"]) for r in rows]),
        fwhm=np.array([float(r["fwhm_nm"]) for r in rows]),
        detector=tuple(r["detector"].strip().upper() for r in rows),
    )
