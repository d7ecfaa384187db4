"""The HTML build report: built once on the demo products (plus a few broken ones), then checked as HTML,
for self-containment, pictures, funnel numbers, escaping, purity, the statistics fallback, and rendered
in headless Chromium when one is installed."""

from __future__ import annotations

import base64
import html
import io
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pytest

from pipeline import stages
from pipeline.demo import DEMO_CONFIG
from pipeline.enmap.synth import generate
from pipeline.html_report.data import (
    REPORT_PATH,
    FunnelRow,
    RejectedRow,
    ReportData,
    funnel_rows,
    load_report_data,
    nearest_bands,
)
from pipeline.html_report.figures import MASK_CATEGORIES, mask_categories, stretch_rgb
from pipeline.html_report.page import render_report, write_report
from pipeline.manifest import Manifest
from pipeline.quality import CLOUD, NODATA, NODATA_VALUE, WATER
from pipeline.scheduler import Scheduler
from pipeline.storage import BuildStore
from tests.report_browser import find_chromium, screenshot

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

BROKEN_ZIP = "ENMAP01-____L2A-DT0000009999_20230601T100000Z_001_V010303_20230602T000000Z.ZIP"
BROKEN_TARGZ = "ENMAP01-____L2A-DT0000009998_20230601T100000Z_001_V010303_20230602T000000Z.tar.gz"
ODD_NAME = 'odd <name> & "quotes".ZIP'  # its rejection reason carries markup characters
VOID_TAGS = {"meta", "img", "br", "hr", "link", "input", "source", "wbr", "col", "area", "base"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> BuildStore:
    products = tmp_path_factory.mktemp("products")
    generate(products, DEMO_CONFIG)
    (products / BROKEN_ZIP).write_bytes(b"not a zip")
    (products / BROKEN_TARGZ).write_bytes(b"x")
    (products / ODD_NAME).write_bytes(b"not a zip either")
    manifest = Manifest.from_yaml(REPO / "manifests" / "demo.yaml")
    build = BuildStore(str(tmp_path_factory.mktemp("build")))
    scheduler = Scheduler("synchronous", progress=False)
    for name in stages.through("write"):
        stages.run_stage(name, manifest, build, scheduler, inputs=[str(products)])
    return build


@pytest.fixture(scope="module")
def report(store: BuildStore) -> tuple[Path, str]:
    uri = write_report(store)
    path = Path(uri)
    assert path == Path(store.path(REPORT_PATH))
    return path, path.read_text(encoding="utf-8")


class Page(HTMLParser):
    """Collects what the tests look at, and checks that every element is closed in order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.problems: list[str] = []
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.funnel: dict[tuple[str, str, str | None], tuple[str, list[str]]] = {}
        self.ids: set[str] = set()
        self.text: list[str] = []
        self._row: dict[str, str] | None = None
        self._cells: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        self.tags.append((tag, values))
        if "id" in values:
            self.ids.add(values["id"])
        if tag not in VOID_TAGS:
            self.stack.append(tag)
        if tag == "tr" and "data-stage" in values:
            self._row, self._cells = values, []
        elif tag == "td" and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID_TAGS:
            return
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()
        if tag == "td" and self._cell is not None:
            self._cells.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            key = (self._row["data-stage"], self._row["data-key"], self._row.get("data-reason"))
            self.funnel[key] = (self._row["data-value"], self._cells)
            self._row = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def stage_counts(store: BuildStore, stage: str) -> dict[str, Any]:
    """The counts in the stage's record (the build ran every stage, so each has one)."""
    record = store.read_stage_record(stage)
    assert record is not None, f"no record of {stage}"
    return record["counts"]


def parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    page.close()
    return page


def png_images(page: Page) -> list[tuple[str, bytes]]:
    prefix = "data:image/png;base64,"
    return [
        (attrs.get("alt", ""), base64.b64decode(attrs["src"][len(prefix) :], validate=True))
        for tag, attrs in page.tags
        if tag == "img"
    ]


# The page ---------------------------------------------------------------------------------------------
def test_report_parses_and_has_every_section(report: tuple[Path, str]) -> None:
    path, text = report
    assert path.name == "index.html" and path.parent.name == "report"
    assert text.startswith("<!DOCTYPE html>")
    page = parse(text)
    assert page.problems == [] and page.stack == []
    assert {"overview", "funnel", "map", "distributions", "spectrum", "samples", "rejected"} <= page.ids
    assert len(text.encode()) < 1_500_000, "the demo report should stay small"


def test_report_names_no_external_resource(report: tuple[Path, str]) -> None:
    _, text = report
    assert not re.search(r"https?://", text, re.IGNORECASE)
    assert "@import" not in text.lower()
    for match in re.finditer(r"url\(\s*['\"]?([^'\")]*)", text, re.IGNORECASE):
        assert match.group(1).startswith("data:"), match.group(0)
    for tag, attrs in parse(text).tags:
        for name in ("src", "href", "srcset", "action", "poster", "data"):
            value = attrs.get(name)
            if value is None:
                continue
            assert value.startswith(("data:image/png;base64,", "#")), f"<{tag} {name}={value[:60]!r}>"
            assert tag != "a" or value.startswith("#")
        assert tag not in {"script", "link", "iframe", "object", "embed"}, tag


def test_every_picture_decodes_and_shows_something(report: tuple[Path, str]) -> None:
    images = png_images(parse(report[1]))
    alts = [alt for alt, _ in images]
    assert {"funnel chart", "map of patch locations", "patch distributions"} <= set(alts)
    assert "mean and standard deviation spectrum" in alts
    assert sum(alt.startswith("quicklook of ") for alt in alts) == 8  # the demo keeps 8 patches
    for alt, png in images:
        assert png.startswith(PNG_SIGNATURE), alt
        pixels = matplotlib.image.imread(io.BytesIO(png), format="png")
        assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50, alt
        assert float(pixels[..., :3].std()) > 0.01, f"{alt} is uniform"


def test_funnel_numbers_are_the_stage_records(store: BuildStore, report: tuple[Path, str]) -> None:
    funnel = parse(report[1]).funnel
    checked = 0
    for stage, keys in {
        "inventory": ("products_found", "rejected", "scenes_accepted"),
        "mask": ("rejected",),
        "tile": ("scenes_rejected",),
        "dedup": ("candidates", "kept_candidates", "duplicates", "patches", "locations"),
        "write": ("patches",),
    }.items():
        counts = stage_counts(store, stage)
        for key in keys:
            value, cells = funnel[(stage, key, None)]
            assert int(value) == counts[key] and int(cells[1].replace(",", "")) == counts[key], (stage, key)
            checked += 1
        by_reason = {"inventory": "rejected_by_reason", "dedup": "dropped_by_reason"}.get(stage)
        if by_reason:
            for reason, number in counts[by_reason].items():
                value, cells = funnel[(stage, by_reason, reason)]
                assert int(value) == number and cells[1] == f"{number:,}" and reason in cells[0]
                checked += 1
    dedup = stage_counts(store, "dedup")
    value, cells = funnel[("dedup", "multi_date_locations", None)]
    assert int(value) == dedup["multi_date_locations"] >= 1
    value, cells = funnel[("dedup", "multi_date_share", None)]
    assert float(value) == dedup["multi_date_share"] and cells[1] == f"{dedup['multi_date_share']:.1%}"
    inventory = stage_counts(store, "inventory")
    assert inventory["rejected"] == 3 and len(inventory["rejected_by_reason"]) == 3
    assert checked >= 10 + 3 + 3


def test_rejected_products_are_listed_escaped(store: BuildStore, report: tuple[Path, str]) -> None:
    _, text = report
    rejected = store.read_table("inventory/rejected.parquet").to_pylist()
    assert len(rejected) == 3
    page_text = "".join(parse(text).text)
    for row in rejected:
        assert html.escape(row["reason"]) in text
        assert row["reason"] in page_text
    assert ODD_NAME not in text and "<name>" not in text
    assert "odd &lt;name&gt; &amp; &quot;quotes&quot;.ZIP" in text
    assert 'data-rejected-total="3"' in text


def test_render_is_pure_and_matches_the_written_file(store: BuildStore, report: tuple[Path, str]) -> None:
    data = load_report_data(store)
    assert render_report(data) == render_report(data) == report[1]


def test_spectrum_falls_back_to_a_sample_of_patches(store: BuildStore, tmp_path: Path) -> None:
    copy = tmp_path / "build"
    shutil.copytree(store.path(""), copy)
    (copy / "stats" / "statistics.json").unlink()
    data = load_report_data(BuildStore(str(copy)))
    recorded = load_report_data(store).spectrum
    assert data.spectrum is not None and recorded is not None
    assert "sample of 8 of 8 patches" in data.spectrum.source
    # Every patch is in the sample here, so the fallback equals the build's statistics.
    np.testing.assert_allclose(data.spectrum.wavelength_nm, recorded.wavelength_nm)
    np.testing.assert_allclose(data.spectrum.mean, recorded.mean, rtol=1e-9)
    np.testing.assert_allclose(data.spectrum.std, recorded.std, rtol=1e-6)
    assert "statistics.json is absent" in render_report(data)


# Pure pieces ------------------------------------------------------------------------------------------
def test_render_escapes_every_text_and_survives_an_empty_build() -> None:
    evil = '<script>alert("x")</script> & co $5'  # `$` would start matplotlib mathtext
    data = ReportData(
        build_uri=f"s3://bucket/{evil}",
        records={
            "inventory": {
                "counts": {"products_found": 2, "rejected": 2, "rejected_by_reason": {evil: 2}},
                "completed_at": evil,
                "versions": {"pipeline": evil},
            }
        },
        rejected=(RejectedRow("inventory", evil, f"/data/{evil}.ZIP", evil),),
        rejected_total=2,
    )
    text = render_report(data)
    page = parse(text)
    assert page.problems == [] and page.stack == []
    assert "<script" not in text and html.escape(evil) in text
    assert not any(tag == "script" for tag, _ in page.tags)
    assert page.funnel[("inventory", "rejected_by_reason", evil)][0] == "2"
    assert "Showing 1 of 2" in text
    empty = render_report(ReportData(build_uri="build/empty", records={}))
    assert parse(empty).problems == [] and "<img" not in empty


def test_funnel_rows_cap_the_reasons() -> None:
    reasons = {f"reason {i:02d}": 30 - i for i in range(20)}
    rows = funnel_rows({"inventory": {"products_found": 5, "rejected_by_reason": reasons}}, max_reasons=5)
    assert rows[0] == FunnelRow("EnMAP products found", 5, "inventory", "products_found")
    shown = [row for row in rows if row.key == "rejected_by_reason"]
    assert [row.reason for row in shown] == [f"reason {i:02d}" for i in range(5)]
    (other,) = [row for row in rows if row.key == "rejected_by_reason:other"]
    assert other.value == sum(30 - i for i in range(5, 20)) and other.label.endswith("15 other reasons")


def test_stretch_uses_clear_pixels_and_blacks_out_nodata() -> None:
    rng = np.random.default_rng(0)
    cube = rng.integers(200, 800, size=(3, 16, 16)).astype(np.int16)
    quality = np.zeros((16, 16), np.uint16)
    cube[:, :4] = 9000  # a bright cloud
    quality[:4] = CLOUD
    cube[:, -1, -1] = NODATA_VALUE
    rgb = stretch_rgb(cube, quality)
    assert rgb.shape == (16, 16, 3) and rgb.min() >= 0.0 and rgb.max() <= 1.0
    assert (rgb[:4] == 1.0).all(), "the cloud saturates instead of setting the stretch"
    assert (rgb[-1, -1] == 0.0).all()
    assert 0.3 < float(rgb[4:-1].mean()) < 0.7
    assert stretch_rgb(np.full((3, 4, 4), NODATA_VALUE, np.int16)).max() == 0.0


def test_mask_categories_follow_precedence() -> None:
    names = [name for name, *_ in MASK_CATEGORIES]
    bits = np.array([[0, WATER, CLOUD | WATER, NODATA | CLOUD]], np.uint16)
    assert [names[i] for i in mask_categories(bits)[0]] == ["clear", "water", "cloud", "nodata / background"]
    assert nearest_bands([400.0, 455.0, 548.0, 660.0, 900.0], (650.0, 550.0, 460.0)) == [3, 2, 1]


# In a browser -----------------------------------------------------------------------------------------
def test_report_renders_in_headless_chromium(report: tuple[Path, str], tmp_path: Path) -> None:
    chromium = find_chromium()
    if chromium is None:
        pytest.skip(
            "no Chromium found (/usr/bin/chromium, chromium or chromium-browser); apt-get install chromium"
        )
    png = tmp_path / "report.png"
    result = screenshot(chromium, report[0], png, tmp_path / "profile", size=(1280, 2000), timeout=60)
    assert result.returncode == 0 and png.is_file(), result.stderr[-2000:]
    pixels: Any = matplotlib.image.imread(png)
    assert pixels.shape[:2] == (2000, 1280)
    rgb = np.round(pixels[..., :3] * 255).astype(np.uint8)
    non_white = float((rgb.min(axis=2) < 240).mean())
    colours = len(np.unique(rgb.reshape(-1, 3), axis=0))
    assert 0.05 < non_white < 0.95, f"{non_white:.1%} of the screenshot is not white"
    assert colours > 100, f"only {colours} colours: the charts did not render"
