"""One-screen summaries printed at the end of each stage."""

from __future__ import annotations

from typing import Any


def print_inventory_summary(store: Any, result: Any) -> None:
    counts = result.counts
    state = "up to date, nothing redone" if result.skipped else "done"
    print(f"inventory: {state} -> {store.uri_of('inventory/scenes.parquet')}")
    print(f"  products found     {counts['products_found']}")
    print(
        f"  scenes accepted    {counts['scenes_accepted']}  "
        f"(datatakes {counts['datatakes']}, EPSG {', '.join(map(str, counts['epsg_codes'])) or '-'}, "
        f"versions {', '.join(counts['processor_versions']) or '-'})"
    )
    packagings = ", ".join(f"{k} {v}" for k, v in counts["packagings"].items())
    print(f"  packagings         {packagings or '-'}")
    print(f"  rejected           {counts['rejected']}")
    for reason, number in counts["rejected_by_reason"].items():
        print(f"    {number:4d}  {reason}")


def print_stage_summary(name: str, store: Any, result: Any) -> None:
    if name == "inventory":
        print_inventory_summary(store, result)
        return
    counts = result.counts
    state = "up to date, nothing redone" if result.skipped else "done"
    print(f"{name}: {state}")
    if name == "mask":
        print(f"  scenes masked      {counts['masked']} of {counts['scenes']} (reused {counts['reused']})")
        print(f"  kept bands         {counts['kept_bands']}")
        print(f"  empty kept bands   {counts['scenes_with_empty_kept_bands']} scene(s)")
        print(f"  rejected           {counts['rejected']}")
    elif name == "tile":
        print(f"  scenes             {counts['scenes']} ({counts['scenes_rejected']} rejected)")
        print(f"  candidate patches  {counts['candidates']}")
        print(f"  kept               {counts['kept']}")
        for reason, number in counts["dropped_by_reason"].items():
            print(f"    dropped {number:5d}  {reason}")
    elif name == "dedup":
        print_funnel(counts)
    elif name == "catalog":
        print(f"  catalog            {store.uri_of('stac/catalog.json')}")
        print(f"  items              {counts['patch_items']} patches, {counts['scene_items']} scenes")
        largest = counts["largest_catalog_bytes"] / 1e3
        print(f"  sub-catalogs       {counts['catalogs']} (largest {largest:.1f} kB)")
        print(f"  geoparquet         {store.uri_of('stac/items.parquet')}")
    elif name == "write":
        print(f"  dataset            {store.uri_of('dataset.zarr')}")
        print(f"  patches x bands    {counts['patches']} x {counts['bands']}")
        print(
            f"  shards             {counts['shards']} ({counts['shards_written']} written: "
            f"{counts.get('rows_from_cut', 0)} rows from cut/, "
            f"{counts.get('rows_copied', 0)} copied from stored shards)"
        )
        print(f"  size on disk       {counts['dataset_bytes'] / 1e6:.1f} MB")


def print_funnel(counts: dict[str, Any]) -> None:
    print(f"  scenes             {counts['scenes']}")
    print(f"  candidate patches  {counts['candidates']}")
    print(f"  kept candidates    {counts['kept_candidates']}")
    for reason, number in counts["dropped_by_reason"].items():
        print(f"    dropped {number:5d}  {reason}")
    print(f"  duplicates         {counts['duplicates']}")
    print(f"  patches            {counts['patches']}")
    print(f"  locations          {counts['locations']}")
    print(
        f"  multi-date         {counts['multi_date_locations']} "
        f"({counts['multi_date_share']:.1%} of locations; SpectralEarth: 17.5 %)"
    )
