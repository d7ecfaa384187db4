"""The build report: one self-contained HTML page, `report/index.html`, describing a finished build.

The page holds the funnel (products, rejections, candidate patches, drops by reason, duplicates, kept
patches, locations, multi-date share) as a table and a chart; a lon/lat map of the locations coloured by
their number of dates; histograms of patch cloud fraction and dates per location and the patches per
month; the mean +- standard deviation spectrum; RGB quicklooks of a few patches beside their quality
masks; and the rejected products with their reasons.

Self-contained means nothing is fetched when the page is opened: the CSS is inline, every picture is a
PNG drawn with matplotlib's Agg canvas and embedded as a `data:` URI, and no text links anywhere else.
Every text taken from the build is escaped.

Layout: `data.load_report_data(store)` does all the reading (stage records, parquet tables, a few
patches of `dataset.zarr`, `stats/statistics.json`) into a `ReportData` of plain columns;
`figures` draws the pictures and `page.render_report(data)` builds the page, both pure (same data, same
bytes); `page.write_report(store)` joins the two.
"""

from pipeline.html_report.data import REPORT_PATH, ReportData, load_report_data
from pipeline.html_report.page import render_report, write_report

__all__ = ["REPORT_PATH", "ReportData", "load_report_data", "render_report", "write_report"]
