"""`generate`: plan the products, write each one, then truth.json."""

from __future__ import annotations

from pathlib import Path

import rasterio

from pipeline.enmap.synth.config import STAGING, SynthConfig
from pipeline.enmap.synth.packaging import remove_path, removed_afterwards, write_product
from pipeline.enmap.synth.plan import Plan
from pipeline.enmap.synth.truth import ProductTruth, Truth, product_truth, truth_of


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
            records.append(product_truth(plan, p, write_product(plan, p, out)))
    truth = truth_of(plan, records)
    truth.to_json(out / "truth.json")
    return truth
