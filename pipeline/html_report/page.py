"""The report page: one self-contained HTML document built from `ReportData` by small pure functions,
with the pictures embedded as `data:` URIs; `write_report` joins reading, rendering and writing."""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pipeline.html_report.data import (
    MAX_REJECTED_ROWS,
    MAX_SAMPLES,
    REPORT_PATH,
    STAGE_ORDER,
    FunnelRow,
    RejectedRow,
    ReportData,
    SamplePatch,
    format_value,
    funnel_rows,
    load_report_data,
)
from pipeline.html_report.figures import (
    MASK_CATEGORIES,
    distributions_png,
    funnel_png,
    map_png,
    sample_png,
    spectrum_png,
)
from pipeline.storage import BuildStore


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def img_tag(png: bytes, alt: str, css_class: str = "chart") -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="{esc(css_class)}" alt="{esc(alt)}" src="data:image/png;base64,{data}">'


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;
color:#222;background:#fff;line-height:1.4}
header{background:#1f3b5a;color:#fff;padding:16px 28px}header h1{margin:0 0 4px;font-size:22px}
header p{margin:0;opacity:.85;font-size:13px;word-break:break-all}
nav{padding:8px 28px;background:#eef2f6;font-size:13px}nav a{margin-right:14px;color:#1f3b5a}
main{padding:8px 28px 40px;max-width:1200px}section{margin-top:22px}
h2{font-size:18px;border-bottom:1px solid #ccd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #dde;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f3f5f8}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.level-1 td:first-child{padding-left:26px;color:#8a4b00}
tr.level-2 td:first-child{padding-left:46px;color:#8a4b00}
img.chart{max-width:100%;height:auto;display:block;margin:6px 0}
.samples{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;border:1px solid #dde;padding:6px;background:#fafbfc}
figcaption{font-size:12px;max-width:340px;overflow-wrap:anywhere}
.swatch{display:inline-block;width:12px;height:12px;border:1px solid #888;vertical-align:middle;
margin:0 4px 0 10px}
.note{color:#555;font-size:13px}td.reason{max-width:520px;word-break:break-word}
td.source{max-width:360px;word-break:break-all;color:#555;font-size:12px}
"""


def funnel_table_html(rows: Sequence[FunnelRow]) -> str:
    lines = ['<table class="funnel"><thead><tr><th>step</th><th>count</th></tr></thead><tbody>']
    for row in rows:
        attributes = f'class="level-{row.level}" data-stage="{esc(row.stage)}" data-key="{esc(row.key)}"'
        if row.reason is not None:
            attributes += f' data-reason="{esc(row.reason)}"'
        attributes += f' data-value="{esc(row.value)}"'
        lines.append(
            f"<tr {attributes}><td>{esc(row.label)}</td>"
            f'<td class="num">{esc(format_value(row.value, row.percent))}</td></tr>'
        )
    lines.append("</tbody></table>")
    return "\n".join(lines)


def stages_table_html(records: Mapping[str, Mapping[str, Any]]) -> str:
    lines = [
        "<table><thead><tr><th>stage</th><th>completed</th><th>time (s)</th><th>config hash</th>"
        "<th>pipeline</th></tr></thead><tbody>"
    ]
    ordered = [s for s in STAGE_ORDER if s in records] + sorted(set(records) - set(STAGE_ORDER))
    for stage in ordered:
        record = records[stage]
        timings = record.get("timings") or {}
        seconds = sum(float(v) for v in timings.values() if isinstance(v, int | float))
        lines.append(
            f"<tr><td>{esc(stage)}</td><td>{esc(record.get('completed_at', ''))}</td>"
            f'<td class="num">{seconds:.1f}</td><td>{esc(str(record.get("config_hash", ""))[:12])}</td>'
            f"<td>{esc((record.get('versions') or {}).get('pipeline', ''))}</td></tr>"
        )
    lines.append("</tbody></table>")
    return "\n".join(lines)


def dataset_summary_html(counts: Mapping[str, Mapping[str, Any]]) -> str:
    write = counts.get("write", {})
    if not write:
        return '<p class="note">dataset.zarr: the write stage has no record.</p>'
    size = float(write.get("dataset_bytes", 0)) / 1e6
    return (
        f'<p class="note">dataset.zarr: {esc(format_value(write.get("patches", 0)))} patches \u00d7 '
        f"{esc(format_value(write.get('bands', 0)))} bands \u00d7 128 \u00d7 128 px in "
        f"{esc(format_value(write.get('shards', 0)))} shards, {size:,.1f} MB on disk.</p>"
    )


def rejected_table_html(rows: Sequence[RejectedRow], total: int) -> str:
    if total == 0:
        return '<p class="note">No product was rejected.</p>'
    lines = [
        f'<p class="note" data-rejected-total="{total}">Showing {len(rows):,} of {total:,} rejected '
        "product(s).</p>",
        '<table class="rejected"><thead><tr><th>stage</th><th>scene</th><th>reason</th><th>source</th>'
        "</tr></thead><tbody>",
    ]
    for row in rows:
        scene = row.scene_id or "\u2014"
        lines.append(
            f"<tr><td>{esc(row.stage)}</td><td>{esc(scene)}</td>"
            f'<td class="reason">{esc(row.reason)}</td><td class="source">{esc(row.source_uri)}</td></tr>'
        )
    lines.append("</tbody></table>")
    return "\n".join(lines)


def mask_legend_html() -> str:
    items = "".join(
        f'<span class="swatch" style="background:{colour}"></span>{esc(name)}'
        for name, _, colour in MASK_CATEGORIES
    )
    return f'<p class="note">Quality mask colours (highest precedence last): {items}</p>'


def samples_html(samples: Sequence[SamplePatch]) -> str:
    if not samples:
        return '<p class="note">No patch to show (dataset.zarr is missing or empty).</p>'
    figures = []
    for sample in samples:
        details = f"{sample.date} \u00b7 cloud {sample.cloud_fraction:.1%}"
        figures.append(
            f"<figure>{img_tag(sample_png(sample), f'quicklook of {sample.patch_id}', 'sample')}"
            f"<figcaption>{esc(sample.patch_id)}<br>{esc(details)}</figcaption></figure>"
        )
    return mask_legend_html() + '<div class="samples">' + "".join(figures) + "</div>"


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>\n{body}\n</section>'


def render_report(data: ReportData) -> str:
    """The whole page. Pure: the same data gives the same text."""
    counts = data.counts
    rows = funnel_rows(counts)
    funnel = funnel_table_html(rows)
    if rows:
        funnel += img_tag(funnel_png(rows), "funnel chart")
    else:
        funnel = '<p class="note">No stage record found (_stages/*.json).</p>'

    if len(data.locations.lon):
        where = img_tag(map_png(data.locations, data.footprints), "map of patch locations")
        where += (
            '<p class="note">Locations (grid cells) in longitude/latitude, coloured by their number of '
            "dates; grey outlines are the accepted scenes' footprints.</p>"
        )
        distributions = img_tag(distributions_png(data.patches, data.locations), "patch distributions")
    else:
        where = distributions = '<p class="note">No location index (index/locations.parquet).</p>'

    if data.spectrum is not None and np.isfinite(data.spectrum.mean).any():
        spectrum = img_tag(spectrum_png(data.spectrum), "mean and standard deviation spectrum")
        spectrum += f'<p class="note">Per band over valid pixels, from {esc(data.spectrum.source)}.</p>'
    else:
        spectrum = '<p class="note">No band statistics (stats/statistics.json or dataset.zarr).</p>'

    sections = [
        _section("overview", "Build", stages_table_html(data.records) + dataset_summary_html(counts)),
        _section("funnel", "Funnel", funnel),
        _section("map", "Where", where),
        _section("distributions", "Cloud, dates and time coverage", distributions),
        _section("spectrum", "Spectrum", spectrum),
        _section("samples", "Sample patches", samples_html(data.samples)),
        _section("rejected", "Rejected products", rejected_table_html(data.rejected, data.rejected_total)),
    ]
    nav = "".join(
        f'<a href="#{anchor}">{esc(title)}</a>'
        for anchor, title in (
            ("overview", "Build"),
            ("funnel", "Funnel"),
            ("map", "Map"),
            ("distributions", "Distributions"),
            ("spectrum", "Spectrum"),
            ("samples", "Samples"),
            ("rejected", "Rejected"),
        )
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>SpectralEarth build report \u2014 {esc(data.build_uri)}</title>"
        f"<style>{CSS}</style></head>\n<body>\n"
        f"<header><h1>SpectralEarth build report</h1><p>{esc(data.build_uri)}</p></header>\n"
        f"<nav>{nav}</nav>\n<main>\n" + "\n".join(sections) + "\n</main>\n</body></html>\n"
    )


def write_report(
    store: BuildStore, max_samples: int = MAX_SAMPLES, max_rejected: int = MAX_REJECTED_ROWS
) -> str:
    """Write `report/index.html` into the build and return its URI."""
    page = render_report(load_report_data(store, max_samples, max_rejected))
    store.write_bytes(REPORT_PATH, page.encode("utf-8"))
    return store.uri_of(REPORT_PATH)
