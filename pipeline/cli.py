"""`spectralearth` command line: parse arguments, call library code, turn typed errors into one line."""

from __future__ import annotations

import os
import re
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from functools import wraps
from pathlib import Path
from typing import Any

import click

from pipeline.benchmark import BenchmarkError, export_benchmark
from pipeline.demo import run_demo
from pipeline.enmap.metadata import MetadataError
from pipeline.enmap.product_errors import ProductError
from pipeline.enmap.synth import SynthConfig, generate
from pipeline.errors import BuildFault, StageFailed, TransientError, one_line, redact
from pipeline.export import SelectionError
from pipeline.labels import LabelSourceError, included_patches, print_labels_summary, run_labels
from pipeline.lock import BuildLock, LockError
from pipeline.manifest import Manifest, ManifestError
from pipeline.query import open_build
from pipeline.query import query as run_query
from pipeline.scheduler import SchedulerError, TaskFailed
from pipeline.splits import make_split
from pipeline.stages import ORDER, BuildContext, StaleStageError
from pipeline.storage_settings import StorageError, refuse_credentials
from pipeline.summaries import print_stage_summary
from pipeline.write import verify_build
from stac.pgstac import PublishError
from stac.pgstac import publish as publish_build
from stac.serve import ServeError
from stac.serve import serve as run_server

EXPECTED_ERRORS = (
    BuildFault,
    StageFailed,
    TransientError,
    StaleStageError,
    SelectionError,
    ManifestError,
    SchedulerError,
    ProductError,
    MetadataError,
    TaskFailed,
    LockError,  # BuildLocked (another run holds the build), LockLost
    StorageError,  # unusable storage settings or a URI carrying credentials
    OSError,  # a file that is missing or unreadable, a full disk: the environment, said in one line
)


DEBUG_ENV = "SPECTRALEARTH_DEBUG"  # "1": an internal error also prints its (redacted) traceback


class PipelineFailure(click.ClickException):
    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"spectralearth: error: {redact(self.format_message())}", err=True)


# user info in a URI given on the command line (scheme://KEY:SECRET@host/...); a secret may hold '/'
_ARGUMENT_USERINFO = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://([^@\s]+)@")


def _argument_secrets(values: Iterable[Any]) -> list[str]:
    """Credentials found in the command's arguments, longest first. Libraries echo parts of a URI
    without its scheme (e.g. botocore's 'Invalid bucket name "KEY:SECRET@bucket"'), which `redact`
    cannot recognise, so the literal texts are masked too."""
    found: set[str] = set()
    for value in values:
        for text in value if isinstance(value, tuple | list) else (value,):
            if isinstance(text, str):
                for match in _ARGUMENT_USERINFO.finditer(text):
                    userinfo = match.group(1)
                    found.update(part for part in (userinfo, *userinfo.split(":")) if len(part) >= 3)
    return sorted(found, key=len, reverse=True)


def _mask(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return redact(text)


def _refuse_credentials(values: Iterable[Any]) -> None:
    """Every URI argument (--build, --input, --export, ...) without credentials: they would reach logs,
    tables and messages. Refused before any work, in one line that does not repeat them."""
    for value in values:
        for text in value if isinstance(value, tuple | list) else (value,):
            if isinstance(text, str):
                refuse_credentials(text)


def _one_line_call(
    function: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], raw: tuple[str, ...] = ()
) -> Any:
    """Run a command; whatever goes wrong ends in one line on stderr and a non-zero exit, never a
    traceback (unless SPECTRALEARTH_DEBUG=1 asks for it), and never a credential. `raw`: the command
    line's words, when the arguments are not parsed yet."""
    arguments = [*args, *kwargs.values(), *raw]
    secrets = _argument_secrets(arguments)
    try:
        _refuse_credentials(arguments)
        return function(*args, **kwargs)
    except click.ClickException as exc:
        message = exc.format_message()
        if _mask(message, secrets) != message:  # a usage error echoing a credential: one masked line
            raise PipelineFailure(_mask(message, secrets)) from None
        raise
    except (click.exceptions.Exit, click.exceptions.Abort):
        raise
    except EXPECTED_ERRORS as exc:
        raise PipelineFailure(_mask(one_line(exc), secrets)) from None
    except Exception as exc:
        if os.environ.get(DEBUG_ENV) == "1":
            text = "".join(traceback.format_exception(exc))
            click.echo(_mask(text, secrets).rstrip("\n"), err=True)
            raise PipelineFailure(
                _mask(f"internal error: {type(exc).__name__}: {one_line(exc)}", secrets)
            ) from None
        raise PipelineFailure(
            _mask(
                f"internal error: {type(exc).__name__}: {one_line(exc)}; "
                f"rerun with {DEBUG_ENV}=1 for the traceback",
                secrets,
            )
        ) from None


def one_line_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Typed errors as one line (see `_one_line_call`); every command is wrapped in it."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return _one_line_call(command, args, kwargs)

    return wrapper


class OneLineGroup(click.Group):
    """The command group: a command that forgot `@one_line_errors` still never shows a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        return _one_line_call(super().invoke, (ctx,), {}, raw=tuple(ctx.args))


def stage_options(command: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--manifest",
            "manifest_path",
            required=True,
            type=click.Path(dir_okay=False),
            help="Build manifest (YAML), e.g. manifests/spectralearth.yaml.",
        ),
        click.option("--build", required=True, help="Build location: a local folder or an s3:// prefix."),
        click.option(
            "--scheduler",
            default="local",
            show_default=True,
            help="local (a dask.distributed cluster of worker processes on this machine), synchronous, "
            "threads, processes, or tcp://host:port of a running dask.distributed scheduler.",
        ),
        click.option(
            "--workers", type=int, default=None, help="Workers on this machine (default: one per core)."
        ),
        click.option("--no-progress", is_flag=True, help="Do not draw progress bars."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _all_inputs(context: Any, inputs: tuple[str, ...]) -> list[str]:
    """The manifest's inputs and the command line's, or a one-line error when there are none."""
    all_inputs = [*context.manifest.inputs, *inputs]
    if not all_inputs:
        raise PipelineFailure("no inputs: give --input or list 'inputs' in the manifest")
    return all_inputs


def _require_products(result: Any, inputs: list[str], store: Any) -> None:
    """Nothing to build from: stop with one line (the reasons are in inventory/rejected.parquet)."""
    if result.counts["scenes_accepted"] == 0:
        raise PipelineFailure(
            f"no product accepted from {', '.join(inputs)} (see {store.uri}/inventory/rejected.parquet)"
        )


@contextmanager
def _locked(store: Any, command: str) -> Iterator[BuildLock]:
    """Hold the build's lock for the whole of a command that writes to it: one run at a time (SPEC)."""
    with BuildLock(store, f"spectralearth {command}") as lock:
        yield lock


def _context(manifest_path: str, build: str, scheduler: str, workers: int | None, no_progress: bool) -> Any:

    return BuildContext.create(Manifest.from_yaml(manifest_path), build, scheduler, workers, not no_progress)


@click.group(cls=OneLineGroup)
@click.version_option(package_name="spectralearth-pipeline")
def main() -> None:
    """Build SpectralEarth-style hyperspectral patch datasets from EnMAP L2A products."""


@main.command()
@stage_options
@click.option(
    "--input",
    "inputs",
    multiple=True,
    help="Folder, .ZIP, .tar.gz, scene-list file or s3:// prefix (repeatable); adds to the manifest's.",
)
@click.option("--force", is_flag=True, help="Redo the stage even when its outputs are up to date.")
@one_line_errors
def inventory(
    manifest_path: str,
    build: str,
    scheduler: str,
    workers: int | None,
    no_progress: bool,
    inputs: tuple[str, ...],
    force: bool,
) -> None:
    """Find, check and filter EnMAP L2A products: inventory/scenes.parquet and rejected.parquet."""

    context = _context(manifest_path, build, scheduler, workers, no_progress)
    all_inputs = _all_inputs(context, inputs)
    with _locked(context.store, "inventory"):
        result = context.run("inventory", inputs=all_inputs, force=force)
    print_stage_summary("inventory", context.store, result)
    _require_products(result, all_inputs, context.store)


def _stage_command(name: str, doc: str) -> Callable[..., Any]:
    """mask, tile, dedup: same options, read the build's earlier tables, write their own."""

    @stage_options
    @click.option("--force", is_flag=True, help="Redo the stage even when its outputs are up to date.")
    @one_line_errors
    def command(
        manifest_path: str, build: str, scheduler: str, workers: int | None, no_progress: bool, force: bool
    ) -> None:

        context = _context(manifest_path, build, scheduler, workers, no_progress)
        with _locked(context.store, name):
            result = context.run(name, force=force)
        print_stage_summary(name, context.store, result)

    command.__doc__ = doc
    return main.command(name=name)(command)


_stage_command("mask", "Per-scene quality masks (mask/<scene_id>.tif) and fractions (mask/masks.parquet).")
_stage_command(
    "tile", "Cut scenes on the global grid: every candidate cell kept or dropped (plan/patches.parquet)."
)
_stage_command("dedup", "One patch per acquisition and the location index (index/patches, index/locations).")
_stage_command("write", "Copy the kept patches into dataset.zarr (Zarr v3, sharded), bit-exact.")
_stage_command(
    "catalog", "STAC catalog of the build (stac/) and its stac-geoparquet mirror (stac/items.parquet)."
)


@main.command(name="report")
@stage_options
@one_line_errors
def report_command(
    manifest_path: str, build: str, scheduler: str, workers: int | None, no_progress: bool
) -> None:
    """One self-contained HTML page about the build: report/index.html (funnel, map, spectra, samples)."""
    context = _context(manifest_path, build, scheduler, workers, no_progress)
    with _locked(context.store, "report"):
        click.echo(f"report: {context.run('report')}")


@main.command()
@click.option("--build", required=True, help="Build location: a local folder or an s3:// prefix.")
@click.option(
    "--name", required=True, help="Split name: writes splits/<name>.parquet and splits/<name>.json."
)
@click.option("--kind", type=click.Choice(["random", "blocked"]), default="blocked", show_default=True)
@click.option("--fractions", default="0.8,0.1,0.1", show_default=True, help="train,validation,test")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--block-cells", type=int, default=8, show_default=True, help="blocked: block side in grid cells."
)
@one_line_errors
def split(build: str, name: str, kind: str, fractions: str, seed: int, block_cells: int) -> None:
    """Make a train/validation/test split of the build's patches, deterministic from --seed."""

    parts = _floats(fractions, 3, "--fractions") or [0.8, 0.1, 0.1]
    store = open_build(build)
    try:
        with _locked(store, "split"):
            summary = make_split(
                store,
                name,
                kind=kind,  # type: ignore[arg-type]
                fractions=(parts[0], parts[1], parts[2]),
                seed=seed,
                block_cells=block_cells,
            )
    except ValueError as exc:
        raise PipelineFailure(one_line(exc)) from None
    counts = ", ".join(f"{k} {v}" for k, v in summary.patches.items())
    click.echo(f"split {name} ({kind}, seed {seed}): {counts} patch(es)")


@main.command(name="run")
@stage_options
@click.option(
    "--input", "inputs", multiple=True, help="Inputs for inventory (repeatable); adds to the manifest's."
)
@click.option("--force", is_flag=True, help="Redo every stage even when its outputs are up to date.")
@one_line_errors
def run_all(
    manifest_path: str,
    build: str,
    scheduler: str,
    workers: int | None,
    no_progress: bool,
    inputs: tuple[str, ...],
    force: bool,
) -> None:
    """All stages in order: inventory, mask, tile, dedup, write, catalog (each skips what is up to date)."""

    context = _context(manifest_path, build, scheduler, workers, no_progress)
    all_inputs = _all_inputs(context, inputs)
    with _locked(context.store, "run") as lock:
        for name in ORDER:
            result = context.run(name, inputs=all_inputs, force=force)
            lock.check()  # a run that lost its build stops before the next stage
            print_stage_summary(name, context.store, result)
            if name == "inventory":
                _require_products(result, all_inputs, context.store)


@main.command()
@click.option("--build", required=True, help="Build location: a local folder or an s3:// prefix.")
@click.option("--repair", is_flag=True, help="Forget bad shards so that the next `write` rewrites them.")
@one_line_errors
def verify(build: str, repair: bool) -> None:
    """Check every shard of dataset.zarr against its recorded SHA-256 checksum."""

    store = open_build(build)
    with _locked(store, "verify --repair") if repair else nullcontext():
        result = verify_build(store, repair=repair)
    click.echo(
        f"verify: {result.shards} shards, {len(result.bad)} bad, {len(result.unrecorded)} without a record"
    )
    for shard in result.bad:
        click.echo(f"  shard {shard}: stored bytes do not match the recorded checksum")
    for shard in result.unrecorded:
        click.echo(f"  shard {shard}: no record (an interrupted write)")
    if (result.bad or result.unrecorded) and not repair:
        raise PipelineFailure(
            "dataset.zarr has bad or unrecorded shards: run `verify --repair`, then `write`"
        )
    if repair and (result.bad or result.unrecorded):
        click.echo("verify: repaired records; run `spectralearth write` to rewrite those shards")


def _floats(text: str | None, count: int, name: str) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise PipelineFailure(f"{name} must be {count} comma-separated numbers, got {text!r}") from None
    if len(values) != count:
        raise PipelineFailure(f"{name} must be {count} comma-separated numbers, got {text!r}")
    return values


def _geojson(text: str | None) -> Any:
    import json

    if text is None:
        return None
    if text.lstrip().startswith("{"):
        source = text
    else:
        try:
            source = Path(text).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
            raise PipelineFailure(f"--intersects: cannot read {text}: {reason}") from None
    try:
        return json.loads(source)
    except json.JSONDecodeError as exc:
        raise PipelineFailure(f"--intersects is not GeoJSON: {exc}") from None


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return "," not in word


def join_bbox_words(args: list[str]) -> list[str]:
    """`--bbox W S E N` (four words, as stac-client takes it) rewritten to `--bbox W,S,E,N`.

    click gives an option a fixed number of values, so the words are joined before it parses them: up
    to four number words right after `--bbox` become one value. A number word is never taken for an
    option (`-72` is a longitude here, not `-7 2`). `--bbox=W,S,E,N` and `--bbox W,S,E,N` pass as they
    are; words after `--` are left alone."""
    out: list[str] = []
    index = 0
    while index < len(args):
        word = args[index]
        out.append(word)
        index += 1
        if word == "--":
            out.extend(args[index:])
            break
        if word == "--bbox":
            numbers: list[str] = []
            while index < len(args) and len(numbers) < 4 and _is_number(args[index]):
                numbers.append(args[index])
                index += 1
            if numbers:
                out.append(",".join(numbers))
    return out


class BboxCommand(click.Command):
    """A command whose `--bbox` takes four numbers as well as the comma form (see join_bbox_words)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, join_bbox_words(args))


@main.command(cls=BboxCommand)
@click.option("--build", required=True, help="Build location: a local folder or an s3:// prefix.")
@click.option(
    "--bbox",
    default=None,
    metavar="W,S,E,N | W S E N",
    help="west, south, east, north in degrees (EPSG:4326), comma-separated or as four numbers "
    "(negative ones too). West > east crosses the antimeridian (STAC API).",
)
@click.option(
    "--intersects",
    default=None,
    help="GeoJSON (a file or inline JSON): a geometry, a Feature (its geometry) or a FeatureCollection "
    "(the union of its features' geometries).",
)
@click.option(
    "--datetime",
    "when",
    default=None,
    help="Instant or closed interval, e.g. 2023-06-01/2023-08-31, '..' open.",
)
@click.option("--max-cloud", type=float, default=None, help="Largest eo:cloud_cover (percent).")
@click.option("--min-dates", type=int, default=None, help="Only locations seen on at least this many dates.")
@click.option("--ids", default=None, help="Comma-separated patch ids.")
@click.option("--limit", type=int, default=None, help="At most this many results (0 to 1000000000).")
@click.option(
    "--split",
    "split_spec",
    default=None,
    help="NAME:PART, e.g. blocked:train: only that part (train, validation, test, buffer) of a split.",
)
@click.option(
    "--labels", "labels_name", default=None, help="NAME: only the patches of that benchmark (labels stage)."
)
@click.option(
    "--format", "output", type=click.Choice(["ids", "geojson", "table"]), default="ids", show_default=True
)
@click.option("--export", "export_to", default=None, help="Write the matching patches here.")
@click.option(
    "--export-format",
    type=click.Choice(["zarr", "geotiff"]),
    default="zarr",
    show_default=True,
    help="zarr: a dataset.zarr of the same layout; geotiff: enmap/<location>/<scene>.tif per patch.",
)
@click.option(
    "--cog",
    is_flag=True,
    default=False,
    help="With --export-format geotiff: write Cloud-Optimized GeoTIFFs (DEFLATE, 128 px tiles).",
)
@one_line_errors
def query(
    build: str,
    bbox: str | None,
    intersects: str | None,
    when: str | None,
    max_cloud: float | None,
    min_dates: int | None,
    ids: str | None,
    limit: int | None,
    split_spec: str | None,
    labels_name: str | None,
    output: str,
    export_to: str | None,
    export_format: str,
    cog: bool,
) -> None:
    """Search the build's patches (STAC semantics); print ids, GeoJSON or a table; optionally export them."""
    import json

    if cog and export_format != "geotiff":
        raise PipelineFailure("--cog applies to GeoTIFF exports: add --export-format geotiff")

    id_list = ids.split(",") if ids else None
    if labels_name:
        benchmark = set(included_patches(open_build(build), labels_name))
        id_list = sorted(benchmark & set(id_list)) if id_list is not None else sorted(benchmark)
    try:
        result = run_query(
            build,
            bbox=_floats(bbox, 4, "--bbox"),
            intersects=_geojson(intersects),
            datetime=when,
            max_cloud=max_cloud,
            min_dates=min_dates,
            ids=id_list,
            limit=limit,
            split=split_spec,
        )
    except ValueError as exc:  # QueryError and the other bad values: one line
        raise PipelineFailure(one_line(exc)) from None
    if output == "ids":
        for patch_id in result.ids:
            click.echo(patch_id)
    elif output == "geojson":
        click.echo(json.dumps(result.to_geojson()))
    else:
        table = result.to_table()
        columns = [
            c
            for c in ("id", "datetime", "eo:cloud_cover", "grid:code", "spectralearth:n_dates")
            if c in table.column_names
        ]
        click.echo(table.select(columns).to_pandas().to_string(index=False) if len(table) else "(no match)")
    click.echo(f"query: {len(result)} patch(es)", err=True)
    if export_to:
        if export_format == "zarr":
            count = result.export_zarr(export_to)
        else:
            count = len(result.export_geotiffs(export_to, cog=cog))
        kind = "geotiff, COG" if cog else export_format
        click.echo(f"query: exported {count} patch(es) to {export_to} ({kind})", err=True)


@main.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write products into.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--sites", type=int, default=2, show_default=True, help="Distinct ground areas.")
@click.option("--revisits", type=int, default=2, show_default=True, help="Dates per site.")
@click.option(
    "--overlapping-tiles",
    type=int,
    default=1,
    show_default=True,
    help="Sites whose first date is a datatake of two overlapping tiles.",
)
@click.option(
    "--reprocessed",
    type=int,
    default=1,
    show_default=True,
    help="Products that also exist in a newer processor version.",
)
@click.option("--size", default="300x280", show_default=True, help="Raster WIDTHxHEIGHT in pixels.")
@click.option(
    "--packaging",
    default="folder,zip,targz,ard",
    show_default=True,
    help="Packagings cycled over products: folder, zip, targz, ard.",
)
@click.option(
    "--format",
    "formats",
    default="GTiff,BSQ,BIL,BIP",
    show_default=True,
    help="Spectral formats cycled over products: GTiff, BSQ, BIL, BIP.",
)
@click.option(
    "--cloud-amount", type=float, default=0.15, show_default=True, help="Mean cloud fraction (0-1)."
)
@one_line_errors
def synth(
    out: str,
    seed: int,
    sites: int,
    revisits: int,
    overlapping_tiles: int,
    reprocessed: int,
    size: str,
    packaging: str,
    formats: str,
    cloud_amount: float,
) -> None:
    """Write realistic synthetic EnMAP L2A products and their truth file (truth.json)."""

    try:
        width, height = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise PipelineFailure(f"--size must be WIDTHxHEIGHT, got {size!r}") from None
    config = SynthConfig(
        seed=seed,
        sites=sites,
        revisits=revisits,
        overlapping_tiles=overlapping_tiles,
        reprocessed=reprocessed,
        width=width,
        height=height,
        packagings=tuple(packaging.split(",")),
        formats=tuple(formats.split(",")),
        cloud_amount=cloud_amount,
    )
    truth = generate(Path(out), config)
    click.echo(f"synth: wrote {len(truth.products)} products to {out} (truth: {Path(out) / 'truth.json'})")


@main.command()
@stage_options
@click.option(
    "--products",
    "products_dir",
    default=None,
    help="Where to write the synthetic products (default: <build>-products).",
)
@one_line_errors
def demo(
    manifest_path: str,
    build: str,
    scheduler: str,
    workers: int | None,
    no_progress: bool,
    products_dir: str | None,
) -> None:
    """Synthesise a handful of products in mixed packaging and run the stages on them."""

    context = _context(manifest_path, build, scheduler, workers, no_progress)
    with _locked(context.store, "demo"):
        ok = run_demo(context, products_dir or f"{build.rstrip('/')}-products")
    if not ok:
        raise PipelineFailure("the demo build does not match what the generator made (see above)")


@main.command()
@click.option("--build", required=True, help="Build location: a local folder or an s3:// prefix.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@one_line_errors
def serve(build: str, host: str, port: int) -> None:
    """A STAC API (search, CQL2 filters, paging) over the build's catalog, until Ctrl-C."""

    try:
        run_server(build, host=host, port=port)
    except ServeError as exc:
        raise PipelineFailure(one_line(exc)) from None


@main.command()
@click.option("--build", required=True, help="Build location: a local folder or an s3:// prefix.")
@click.option(
    "--service",
    default=None,
    help="A pg_service.conf service name; without it the PG* environment variables (PGHOST, PGPORT, "
    "PGDATABASE, PGUSER, PGPASSWORD or ~/.pgpass) say where to connect.",
)
@one_line_errors
def publish(build: str, service: str | None) -> None:
    """Upsert the build's patch collection and items into pgstac (for stac-fastapi-pgstac)."""

    try:
        summary = publish_build(build, service=service)
    except (PublishError, ServeError) as exc:
        raise PipelineFailure(one_line(exc)) from None
    click.echo(
        f"publish: {summary.items} item(s) of {summary.collection_id} and {summary.scene_items} scene "
        f"item(s) upserted into {summary.database}, {summary.removed} removed (no longer in the build)"
    )


@main.command(name="labels")
@stage_options
@click.option(
    "--name", "benchmark", default=None, help="Only this benchmark of the manifest's labels section."
)
@click.option("--force", is_flag=True, help="Re-label even when the labels are up to date.")
@one_line_errors
def labels_command(
    manifest_path: str,
    build: str,
    scheduler: str,
    workers: int | None,
    no_progress: bool,
    benchmark: str | None,
    force: bool,
) -> None:
    """Align the manifest's label maps to the patches: labels/<name> in dataset.zarr and a table."""

    context = _context(manifest_path, build, scheduler, workers, no_progress)
    try:
        with _locked(context.store, "labels"):
            results = run_labels(
                context.manifest, context.store, context.scheduler, context.storage_options, force, benchmark
            )
    except LabelSourceError as exc:
        raise PipelineFailure(one_line(exc)) from None
    for result in results:
        print_labels_summary(result)


@main.command(name="export-benchmark")
@click.option("--build", required=True, help="Build location: a local folder or an s3:// prefix.")
@click.option(
    "--labels", "name", required=True, help="The benchmark (a name of the manifest's labels section)."
)
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="Folder to write the benchmark into."
)
@click.option("--split", type=click.Choice(["random", "blocked"]), default="random", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--block-cells", type=int, default=8, show_default=True, help="blocked: block side in grid cells."
)
@one_line_errors
def export_benchmark_command(
    build: str, name: str, out: str, split: str, seed: int, block_cells: int
) -> None:
    """Write a benchmark as the SpectralEarth authors' loaders read it: enmap/, <name>/, data/splits/."""

    try:
        written = export_benchmark(
            open_build(build), name, out, split=split, seed=seed, block_cells=block_cells
        )
    except BenchmarkError as exc:
        raise PipelineFailure(one_line(exc)) from None
    counts = ", ".join(f"{part} {n}" for part, n in written.splits.items())
    click.echo(f"export-benchmark {name}: {written.patches} patches to {out} ({split} split: {counts})")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
