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
