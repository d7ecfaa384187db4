"""`make demo`: synthesise a handful of products, run the stages, and check the build against truth.json.

The expectations are derived from the generator's truth file alone (which cells lie wholly inside each
footprint and their flag fractions, which products show one acquisition, which dates each site has),
never from the pipeline's own tables, so a mismatch is a real disagreement.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.benchmark import demo_benchmarks
from pipeline.enmap.synth import SynthConfig, Truth, generate
from pipeline.manifest import Manifest
from pipeline.query import query
from pipeline.stages import ORDER
from pipeline.storage import BuildStore
from pipeline.summaries import print_stage_summary
from pipeline.tables import INDEX_LOCATIONS, INDEX_PATCHES

# Three sites seen on two dates each, one datatake in two overlapping tiles, one reprocessed product,
# every packaging and format; 420 x 400 px (not a multiple of 128) so each scene holds a few cells.
DEMO_CONFIG = SynthConfig(
    seed=7,
    sites=3,
    revisits=2,
    overlapping_tiles=1,
    reprocessed=1,
    width=420,
    height=400,
    tile_overlap=0.7,
    cloud_amount=0.08,
)


@dataclass(frozen=True, slots=True)
class Expectation:
    products: int
    patch_ids: frozenset[str]
    duplicates: int
    locations: int
    multi_date_locations: int


def expected_from_truth(truth: Truth, manifest: Manifest) -> Expectation:
    """What a correct build of these products must contain, from truth.json and the manifest's rules.

    Truth lists the cells wholly inside each footprint (so with no nodata in kept bands and no
    background) and their flag fractions; a cell is kept when every limited flag is within its limit.
    """
    limits = dict(manifest.quality.limits())
    limits.pop("nodata", None)
    limits.pop("background", None)
    recorded = set(truth.products[0].fractions) if truth.products else set()
    unknown = sorted(set(limits) - recorded)
    if unknown:
        raise ValueError(f"truth.json records no fraction for {', '.join(unknown)}: cannot predict the build")
    if "cirrus" in limits and manifest.quality.cirrus_min_level != 1:
        raise ValueError("truth.json records cirrus from level 1: use cirrus_min_level 1 to compare")
    dates = {entry["datatake"]: entry["date"] for site in truth.revisits.values() for entry in site}
    acquisitions: dict[tuple[str, str], int] = defaultdict(int)
    location_dates: dict[str, set[str]] = defaultdict(set)
    for product in truth.products:
        for cell in product.cells:
            if all(cell["fractions"][flag] <= limit for flag, limit in limits.items()):
                acquisitions[(cell["location_id"], product.datatake)] += 1
                location_dates[cell["location_id"]].add(dates[product.datatake])
    patch_ids = frozenset(
        f"{location}_{dates[datatake].replace('-', '')}_DT{datatake}" for location, datatake in acquisitions
    )
    return Expectation(
        products=len(truth.products),
        patch_ids=patch_ids,
        duplicates=sum(n - 1 for n in acquisitions.values()),
        locations=len(location_dates),
        multi_date_locations=sum(1 for d in location_dates.values() if len(d) > 1),
    )


def observed(store: BuildStore) -> Expectation:
    inventory = store.read_stage_record("inventory") or {}
    patches = store.read_geodataframe(INDEX_PATCHES)
    locations = store.read_geodataframe(INDEX_LOCATIONS)
    return Expectation(
        products=int(inventory.get("counts", {}).get("scenes_accepted", 0)),
        patch_ids=frozenset(patches["patch_id"]),
        duplicates=int(sum(len(d) for d in patches["duplicates"])),
        locations=len(locations),
        multi_date_locations=int((locations["n_dates"] > 1).sum()),
    )


def compare(expected: Expectation, got: Expectation) -> list[tuple[str, Any, Any, bool]]:
    rows = [
        ("products accepted", expected.products, got.products),
        ("patches", len(expected.patch_ids), len(got.patch_ids)),
        ("duplicates", expected.duplicates, got.duplicates),
        ("locations", expected.locations, got.locations),
        ("multi-date locations", expected.multi_date_locations, got.multi_date_locations),
    ]
    out: list[tuple[str, Any, Any, bool]] = [(name, want, have, want == have) for name, want, have in rows]
    out.append(
        (
            "patch ids",
            "as made",
            "same" if expected.patch_ids == got.patch_ids else "differ",
            expected.patch_ids == got.patch_ids,
        )
    )
    return out


def ensure_products(products_dir: Path, config: SynthConfig) -> Truth:
    """Generate the demo products unless the folder already holds these exact ones."""
    truth_path = products_dir / "truth.json"
    if truth_path.exists():
        truth = Truth.from_json(truth_path)
        if truth.config == config.to_dict():
            print(f"synth: reusing {len(truth.products)} products in {products_dir}")
            return truth
    truth = generate(products_dir, config)
    print(f"synth: wrote {len(truth.products)} products to {products_dir}")
    return truth


def print_example_query(store: BuildStore) -> None:
    write = (store.read_stage_record("write") or {}).get("counts", {})
    print(
        f"\ndataset: {store.uri_of('dataset.zarr')}: {write.get('patches', 0)} patches x "
        f"{write.get('bands', 0)} bands, {write.get('dataset_bytes', 0) / 1e6:.1f} MB on disk"
    )
    result = query(store, min_dates=2, max_cloud=10)
    print(f"example query: spectralearth query --build {store.uri} --min-dates 2 --max-cloud 10")
    for patch_id in result.ids:
        print(f"  {patch_id}")
    print(f"  ({len(result)} patches; open them with pipeline.query.query(...).to_xarray())")


def run_demo(context: Any, products_dir: str) -> bool:
    """Run the demo in a BuildContext (pipeline.stages); True when the build matches truth.json."""
    truth = ensure_products(Path(products_dir), DEMO_CONFIG)
    store, manifest = context.store, context.manifest
    for name in ORDER:  # every stage, in build order
        result = context.run(name, inputs=[products_dir])
        print_stage_summary(name, store, result)
    print_example_query(store)
    demo_benchmarks(context, products_dir)  # stage 9: the manifest's benchmarks on synthetic label maps
    checks = compare(expected_from_truth(truth, manifest), observed(store))
    print("\ndemo: build against the generator's truth.json")
    print(f"  {'':24s}{'made':>10s}{'built':>10s}")
    for name, want, have, ok in checks:
        print(f"  {name:24s}{want!s:>10s}{have!s:>10s}  {'ok' if ok else 'MISMATCH'}")
    print(f"\nreport: {context.run('report')}")
    return all(ok for *_, ok in checks)
