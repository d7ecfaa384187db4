"""The command line never shows a traceback or a credential: typed errors and unexpected ones end in one
line on stderr with a non-zero exit; `query` inputs that used to crash are refused (or, for a
FeatureCollection, accepted) the same way by the CLI and by `pipeline.query.query()`; `--bbox` takes four
numbers as well as the comma form."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import shapely
from click.testing import CliRunner, Result
from shapely.geometry import box, mapping, shape

from pipeline import cli
from pipeline.cli import join_bbox_words, main
from pipeline.query import QueryError, query
from pipeline.storage import BuildStore
from stac.catalog_writer import build_catalog
from stac.settings import CatalogSettings
from tests.stac_helpers import make_tables, write_tables

REPO = Path(__file__).resolve().parent.parent
KEY, SECRET = "KEYID7QX", "Wq9/xTopsecretVALUE"  # distinctive: never part of any message of ours
CREDENTIAL_URI = f"s3://{KEY}:{SECRET}@bucket/x"


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """A build with a catalog (45 patch items near 10.7 E, 47.5 N) and one split, `blocked`."""
    root = tmp_path_factory.mktemp("cli-errors")
    store = BuildStore(str(root))
    scenes, patches = make_tables()
    write_tables(store, scenes, patches)
    build_catalog(store, CatalogSettings(), [(1, 418.2, 6.99561)])
    ids = pq.read_table(root / "stac" / "items.parquet", columns=["id"]).column("id").to_pylist()
    parts = ["train", "validation", "test", "buffer"]
    (root / "splits").mkdir()
    pq.write_table(
        pa.table({"patch_id": ids, "split": [parts[k % 4] for k in range(len(ids))]}),
        root / "splits" / "blocked.parquet",
    )
    items = query(str(root)).to_geojson()["features"]
    assert len(items) == 45
    return root, items


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env)


def assert_one_line_error(result: Result, *expected: str) -> str:
    """A non-zero exit, no traceback, and exactly one line on stderr: `spectralearth: error: ...`."""
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spectralearth: error: "), result.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def ids_of(result: Result) -> list[str]:
    assert result.exit_code == 0, result.output
    return result.stdout.split()


# query: inputs that used to give tracebacks --------------------------------------------------------
BAD_QUERIES = [
    (
        {"limit": 99999999999999999999},
        ["--limit", "99999999999999999999"],
        "limit must be an integer from 0 to",
    ),
    ({"limit": -1}, ["--limit", "-1"], "limit must be an integer from 0 to 1000000000"),
    ({"bbox": (float("nan"), 47, 11, 48)}, ["--bbox", "nan,47,11,48"], "bbox west must be a finite number"),
    ({"bbox": (10, 47, float("inf"), 48)}, ["--bbox", "10", "47", "inf", "48"], "bbox east must be a finite"),
    (
        {"bbox": (10, -91, 11, 48)},
        ["--bbox", "10,-91,11,48"],
        "bbox south must be a latitude within [-90, 90]",
    ),
    ({"bbox": (10, 47, 11, 95)}, ["--bbox=10,47,11,95"], "bbox north must be a latitude within [-90, 90]"),
    ({"bbox": (-190, 47, 11, 48)}, ["--bbox", "-190", "47", "11", "48"], "bbox west must be a longitude"),
    ({"bbox": (10, 48, 11, 47)}, ["--bbox", "10,48,11,47"], "bbox south 48 is above north 47"),
    ({"max_cloud": float("nan")}, ["--max-cloud", "nan"], "max_cloud must be a finite number"),
    ({"max_cloud": 150.0}, ["--max-cloud", "150"], "max_cloud must be a percentage within [0, 100]"),
    ({"min_dates": 0}, ["--min-dates", "0"], "min_dates must be an integer from 1 to"),
    ({"datetime": "2023-02-30"}, ["--datetime", "2023-02-30"], "datetime: not an RFC 3339 date or time"),
]


@pytest.mark.parametrize(("kwargs", "argv", "message"), BAD_QUERIES)
def test_bad_query_values_end_in_one_line(
    build: tuple[Path, list[dict[str, Any]]], kwargs: dict[str, Any], argv: list[str], message: str
) -> None:
    root, _ = build
    with pytest.raises(QueryError, match=message.replace("[", r"\[").replace("]", r"\]")) as caught:
        query(str(root), **kwargs)
    assert "\n" not in str(caught.value)
    assert_one_line_error(run("query", "--build", str(root), *argv), message)


GEOJSON_ERRORS = [
    ({"type": "Polygon"}, "intersects: the Polygon has no 'coordinates'"),
    ({"type": "Blob", "coordinates": [1, 2]}, "intersects: unknown type 'Blob' (GeoJSON types: Point,"),
    ({"coordinates": [1, 2]}, "intersects: no 'type'"),
    (
        {"type": "Point", "coordinates": [float("nan"), 47.5]},
        "intersects coordinates longitude must be a finite",
    ),
    (
        {"type": "Polygon", "coordinates": [[[10, 47], [11, float("inf")], [11, 48], [10, 47]]]},
        "intersects coordinates[0][1] latitude must be a finite number",
    ),
    ({"type": "Point", "coordinates": [200, 47]}, "intersects coordinates longitude must be a longitude"),
    ({"type": "Point", "coordinates": [10]}, "a position is [longitude, latitude]"),
    ({"type": "LineString", "coordinates": [[10, 47]]}, "intersects: not a valid LineString"),
    ({"type": "Polygon", "coordinates": 5}, "coordinates must be nested lists of positions"),
    ({"type": "Feature", "properties": {}, "geometry": None}, "the Feature has no geometry"),
    ({"type": "FeatureCollection", "features": []}, "the FeatureCollection has no feature with a geometry"),
    (
        {"type": "FeatureCollection", "features": [{"type": "Point", "coordinates": [10, 47]}]},
        "intersects features[0] is not a Feature",
    ),
    (
        {
            "type": "FeatureCollection",
            "features": [{"type": "Feature", "geometry": {"type": "Point", "coordinates": ["x", 47]}}],
        },
        "intersects features[0] geometry coordinates longitude must be a number",
    ),
    ({"type": "Polygon", "coordinates": []}, "intersects is an empty geometry"),
]


@pytest.mark.parametrize(("document", "message"), GEOJSON_ERRORS)
def test_bad_geojson_ends_in_one_line(
    build: tuple[Path, list[dict[str, Any]]], tmp_path: Path, document: Any, message: str
) -> None:
    root, _ = build
    with pytest.raises(QueryError) as caught:
        query(str(root), intersects=document)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    path = tmp_path / "area.json"
    path.write_text(json.dumps(document))  # NaN and Infinity as Python's json writes (and reads) them
    assert_one_line_error(run("query", "--build", str(root), "--intersects", str(path)), message)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--intersects", "missing.json"], "--intersects: cannot read missing.json"),
        (["--intersects", "{not json"], "--intersects is not GeoJSON"),
        (["--bbox", "10", "47", "11"], "--bbox must be 4 comma-separated numbers"),
        (["--bbox", "10,47,east,48"], "--bbox must be 4 comma-separated numbers"),
        (["--datetime", "2023-02-01/2023-01-01"], "the interval ends before it starts"),
    ],
)
def test_other_bad_query_words_end_in_one_line(
    build: tuple[Path, list[dict[str, Any]]], argv: list[str], message: str
) -> None:
    root, _ = build
    assert_one_line_error(run("query", "--build", str(root), *argv), message)


def test_a_feature_collection_is_the_union_of_its_features(
    build: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    root, items = build
    first, last = shape(items[0]["geometry"]), shape(items[-1]["geometry"])
    # two small areas, each inside one item, far apart: the union finds both (and their neighbours)
    areas = [first.centroid.buffer(0.001), last.centroid.buffer(0.001)]
    collection = {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "properties": {"n": k}, "geometry": mapping(area)}
            for k, area in enumerate(areas)
        ]
        + [{"type": "Feature", "properties": {}, "geometry": None}],  # unlocated features add nothing
    }
    each = [set(query(str(root), intersects=mapping(area)).ids) for area in areas]
    expected = [item["id"] for item in items if shape(item["geometry"]).intersects(shapely.union_all(areas))]
    assert each[0] and each[1] and each[0] != each[1]
    result = query(str(root), intersects=collection)
    assert set(result.ids) == each[0] | each[1] == set(expected)
    # a Feature stands for its geometry
    feature = {"type": "Feature", "properties": {}, "geometry": mapping(areas[0])}
    assert set(query(str(root), intersects=feature).ids) == each[0]
    path = tmp_path / "areas.geojson"
    path.write_text(json.dumps(collection))
    assert ids_of(run("query", "--build", str(root), "--intersects", str(path))) == list(result.ids)


def test_a_self_intersecting_polygon_is_repaired_not_a_crash(
    build: tuple[Path, list[dict[str, Any]]],
) -> None:
    root, items = build
    west, south, east, north = shape(items[0]["geometry"]).bounds
    bowtie = {
        "type": "Polygon",
        "coordinates": [[[west, south], [east, north], [east, south], [west, north], [west, south]]],
    }
    result = query(str(root), intersects=bowtie)
    assert items[0]["id"] in result.ids


# query --split ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("bad", "split must be NAME:PART with PART one of train, validation, test, buffer, got 'bad'"),
        ("blocked", "this build has the splits blocked"),
        (":train", "split must be NAME:PART"),
        ("random:train", "no split named 'random'; this build has the splits blocked"),
        ("blocked:training", "split 'blocked' has no part 'training'; its parts: train, validation, test"),
    ],
)
def test_bad_split_names_what_exists(
    build: tuple[Path, list[dict[str, Any]]], spec: str, message: str
) -> None:
    root, _ = build
    with pytest.raises(QueryError, match=message):
        query(str(root), split=spec)
    assert_one_line_error(run("query", "--build", str(root), "--split", spec), message)


def test_split_of_a_build_without_splits(tmp_path: Path) -> None:
    store = BuildStore(str(tmp_path))
    with pytest.raises(QueryError, match="this build has no split yet"):
        query(store, split="blocked:train")


def test_split_keeps_that_part(build: tuple[Path, list[dict[str, Any]]]) -> None:
    root, _ = build
    table = pq.read_table(root / "splits" / "blocked.parquet").to_pylist()
    train = {row["patch_id"] for row in table if row["split"] == "train"}
    result = query(str(root), split="blocked:train")
    assert set(result.ids) == train and train
    some = sorted(train)[:2] + ["not-in-train"]
    assert set(query(str(root), split="blocked:train", ids=some).ids) == set(some[:2])
    assert set(ids_of(run("query", "--build", str(root), "--split", "blocked:train"))) == train


# --bbox: four numbers or the comma form -----------------------------------------------------------
@pytest.mark.parametrize(
    "numbers",
    [
        ("-5", "40", "20", "50"),  # negative west: all items
        ("10.7", "-10", "10.8", "47.6"),  # negative south: some items
        ("170", "40", "10.75", "50"),  # west > east: across the antimeridian (STAC)
        ("-72.5", "40.5", "-72", "41"),  # the example: no item there
    ],
)
def test_bbox_forms_give_the_same_ids(
    build: tuple[Path, list[dict[str, Any]]], numbers: tuple[str, str, str, str]
) -> None:
    root, items = build
    comma = ",".join(numbers)
    words = run("query", "--build", str(root), "--bbox", *numbers)
    equals = run("query", "--build", str(root), f"--bbox={comma}")
    separate = run("query", "--build", str(root), "--bbox", comma)
    later = run("query", "--bbox", *numbers, "--build", str(root), "--limit", "1000")
    expected = query(str(root), bbox=[float(n) for n in numbers]).ids
    assert ids_of(words) == ids_of(equals) == ids_of(separate) == ids_of(later) == list(expected)
    west, south, east, north = (float(n) for n in numbers)
    area = (
        box(west, south, east, north)
        if west <= east
        else box(west, south, 180, north).union(box(-180, south, east, north))
    )
    assert sorted(expected) == sorted(i["id"] for i in items if shape(i["geometry"]).intersects(area))


def test_bbox_expected_sizes(build: tuple[Path, list[dict[str, Any]]]) -> None:
    root, items = build
    assert len(query(str(root), bbox=(-5, 40, 20, 50))) == len(items)
    assert 0 < len(query(str(root), bbox=(10.7, -10, 10.8, 47.6))) < len(items)


@pytest.mark.parametrize(
    ("argv", "joined"),
    [
        (["--bbox", "-72.5", "40.5", "-72", "41"], ["--bbox", "-72.5,40.5,-72,41"]),
        (["--bbox", "-72.5,40.5,-72,41", "--limit", "3"], ["--bbox", "-72.5,40.5,-72,41", "--limit", "3"]),
        (["--bbox=-72.5,40.5,-72,41"], ["--bbox=-72.5,40.5,-72,41"]),
        (["--bbox", "1", "2", "3", "4", "--ids", "a"], ["--bbox", "1,2,3,4", "--ids", "a"]),
        (["--bbox", "1e1", "-2", "3", "--limit", "4"], ["--bbox", "1e1,-2,3", "--limit", "4"]),
        (["--ids", "a", "--", "--bbox", "1", "2"], ["--ids", "a", "--", "--bbox", "1", "2"]),
    ],
)
def test_join_bbox_words(argv: list[str], joined: list[str]) -> None:
    assert join_bbox_words(argv) == joined


# No traceback, no secret ------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["inventory", "run"])
def test_credentials_in_an_input_are_refused_without_printing_them(tmp_path: Path, command: str) -> None:
    result = run(
        command,
        "--manifest",
        str(REPO / "manifests" / "demo.yaml"),
        "--build",
        str(tmp_path / "build"),
        "--scheduler",
        "synchronous",
        "--input",
        CREDENTIAL_URI,
    )
    line = assert_one_line_error(result, "s3://***@bucket/x: credentials in a URI are refused")
    assert KEY not in result.output and SECRET not in result.output and "Wq9" not in line
    assert not (tmp_path / "build").exists()  # refused before any work


def test_credentials_in_a_real_process_never_reach_the_terminal(tmp_path: Path) -> None:
    env = {**os.environ, "SPECTRALEARTH_DEBUG": "1"}  # even when tracebacks are asked for
    for argv in (
        ["inventory", "--manifest", str(REPO / "manifests" / "demo.yaml"), "--build", str(tmp_path / "b")],
        ["query", "--build", f"s3://{KEY}:{SECRET}@bucket/build"],
    ):
        if argv[0] == "inventory":
            argv += ["--scheduler", "synchronous", "--no-progress", "--input", CREDENTIAL_URI]
        done = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", *argv],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        both = done.stdout + done.stderr
        assert done.returncode != 0
        assert KEY not in both and SECRET not in both and "Traceback" not in both
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("spectralearth: error: s3://***@bucket/"), lines
        assert lines[0].endswith(
            ": credentials in a URI are refused (they would end up in logs and tables); "
            "give them through the AWS environment variables or a named profile"
        )


def test_a_manifest_input_with_credentials_is_one_line(tmp_path: Path) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"name: x\ninputs: ['{CREDENTIAL_URI}']\n")
    result = run("inventory", "--manifest", str(manifest), "--build", str(tmp_path / "b"))
    assert_one_line_error(result, f"{manifest}: 'inputs[0]': s3://***@bucket/x: credentials")
    assert KEY not in result.output and SECRET not in result.output


@pytest.mark.parametrize(
    ("manifest_text", "message"),
    [
        (
            "name: x\nquality:\n  max_fraction:\n    cloud: .nan\n",
            "'quality.max_fraction.cloud' must be a finite",
        ),
        ("name: x\ngrid:\n  patch_size: 7\n", "'grid.patch_size' must be a multiple of 16 from 16 to 1024"),
        ("name: x\nwrite:\n  patches_per_shard: 1000000000\n", "'write.patches_per_shard' 1000000000 makes"),
    ],
)
def test_bad_manifest_numbers_are_one_line(tmp_path: Path, manifest_text: str, message: str) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(manifest_text)
    result = run("inventory", "--manifest", str(manifest), "--build", str(tmp_path / "b"), "--input", "x")
    assert_one_line_error(result, message)


def test_an_unexpected_error_is_one_line_and_redacted(
    build: tuple[Path, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _ = build

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"s3://{KEY}:{SECRET}@bucket/stac/items.parquet\nsecond line")

    monkeypatch.setattr("pipeline.cli.run_query", broken)  # the command calls the query it imported
    result = run("query", "--build", str(root))
    line = assert_one_line_error(result, "internal error: RuntimeError: ", "rerun with SPECTRALEARTH_DEBUG=1")
    assert "s3://***@bucket/stac/items.parquet" in line
    assert KEY not in result.output and SECRET not in result.output and "second line" not in line
    assert result.exit_code == 2

    # SPECTRALEARTH_DEBUG=1: the traceback too, redacted, and still the one-line error last
    debug = run("query", "--build", str(root), env={"SPECTRALEARTH_DEBUG": "1"})
    assert debug.exit_code == 2
    assert "Traceback (most recent call last)" in debug.stderr and "in broken" in debug.stderr
    assert KEY not in debug.output and SECRET not in debug.output
    assert (
        debug.stderr.strip().splitlines()[-1].startswith("spectralearth: error: internal error: RuntimeError")
    )


def test_a_command_without_the_decorator_still_ends_in_one_line() -> None:
    """The group catches what a command forgot to: commands added later are covered too."""
    group = cli.OneLineGroup()

    @group.command()
    def crash() -> None:
        raise ZeroDivisionError("division by zero")

    @group.command()
    def fine() -> None:
        click.echo("ok")

    result = CliRunner().invoke(group, ["crash"])
    assert_one_line_error(result, "internal error: ZeroDivisionError: division by zero; rerun with")
    assert CliRunner().invoke(group, ["fine"]).output == "ok\n"


def test_a_usage_error_does_not_echo_credentials(build: tuple[Path, list[dict[str, Any]]]) -> None:
    """click repeats a bad value in its usage error; credentials in it are masked."""
    root, _ = build
    result = run("query", "--build", str(root), "--limit", f"many {CREDENTIAL_URI}")
    assert result.exit_code == 2 and "is not a valid integer" in result.output
    assert KEY not in result.output and SECRET not in result.output and "Traceback" not in result.output
