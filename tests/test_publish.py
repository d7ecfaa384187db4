"""`spectralearth publish`: a build's catalog into pgstac, against a real PostgreSQL with PostGIS.

The tests start a throwaway cluster themselves: `initdb` in a temporary folder (as `nobody` when run as
root, since initdb refuses root), the server on a free port with its unix socket in that folder (and on
127.0.0.1 for stac-fastapi-pgstac, whose settings take a host name), the pgstac schema installed with
`pypgstac migrate`. They skip with a message where the PostgreSQL or PostGIS binaries are missing
(`.ci/run` installs Debian's postgresql and postgresql-15-postgis-3).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import requests

pytest.importorskip("pypgstac", reason="pypgstac is not installed (pip install '.[serve]')")

from pipeline.query import query  # noqa: E402
from pipeline.storage import BuildStore  # noqa: E402
from stac.catalog_writer import build_catalog  # noqa: E402
from stac.settings import CatalogSettings  # noqa: E402
from tests.stac_helpers import default_scenes, make_tables, many_scene_specs, write_tables  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
COLLECTION = CatalogSettings().collection_id
SCENES = CatalogSettings().scene_collection_id


def _bindir() -> Path | None:
    found = shutil.which("pg_config")
    candidates = [Path(found).resolve().parent] if found else []
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    return None


def _postgis_installed(bindir: Path) -> bool:
    share = subprocess.run(
        [str(bindir / "pg_config"), "--sharedir"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return bool(share) and (Path(share) / "extension" / "postgis.control").is_file()


@dataclass(frozen=True)
class Cluster:
    socket_dir: str
    port: int

    def environ(self, tcp: bool = False) -> dict[str, str]:
        """The standard libpq variables (a password is never needed: the cluster trusts local users)."""
        return {
            "PGHOST": "127.0.0.1" if tcp else self.socket_dir,
            "PGPORT": str(self.port),
            "PGUSER": "postgres",
            "PGDATABASE": "postgres",
        }


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    from stac.serve import free_port

    bindir = _bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    if not _postgis_installed(bindir):
        pytest.skip("PostGIS not installed for this PostgreSQL: apt-get install postgresql-15-postgis-3")
    root = Path(tempfile.mkdtemp(prefix="spectralearth-pg-", dir="/tmp"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: the cluster belongs to an unprivileged user
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
        as_user = ["runuser", "-u", "nobody", "--"]
        os.chmod(root, 0o755)
        shutil.chown(root, user="nobody")
    data, log = root / "data", root / "server.log"
    port = free_port()

    def run(*command: str) -> None:
        done = subprocess.run([*as_user, *command], capture_output=True, text=True, check=False)
        assert done.returncode == 0, f"{command[0]} failed: {done.stderr or done.stdout}"

    run(
        str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-locale"
    )
    options = f"-k {root} -p {port} -c listen_addresses=127.0.0.1 -c fsync=off"
    run(str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log), "-w", "start")
    try:
        server = Cluster(str(root), port)
        migrate = subprocess.run(
            [sys.executable, "-m", "pypgstac.pypgstac", "migrate"],
            env={**os.environ, **server.environ()},
            capture_output=True,
            text=True,
            check=False,
        )
        assert migrate.returncode == 0, migrate.stderr
        yield server
    finally:
        subprocess.run(
            [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], check=False
        )
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_env(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> Cluster:
    for name in ("PGSERVICE", "PGSERVICEFILE", "PGPASSWORD", "PGPASSFILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in cluster.environ().items():
        monkeypatch.setenv(name, value)
    return cluster


def _build(root: Path, scenes: int) -> Path:
    """A catalog-only build of the first `scenes` synthetic scenes (revisits, duplicates, two zones)."""
    specs = [*many_scene_specs(4, 5), *default_scenes()][:scenes]
    scene_table, patch_table = make_tables(specs)
    store = BuildStore(str(root))
    write_tables(store, scene_table, patch_table)
    build_catalog(store, CatalogSettings(items_per_catalog=40), [(1, 418.2, 6.99561)])
    return root


def _pgstac_ids(search: dict[str, Any]) -> list[str]:
    from pypgstac.db import PgstacDB

    with PgstacDB(dsn="") as db:
        found = db.query_one("SELECT pgstac.search(%s::jsonb)", [json.dumps({**search, "limit": 10000})])
    collection = json.loads(found) if isinstance(found, str) else found
    return sorted(feature["id"] for feature in collection["features"])


def _count() -> int:
    from pypgstac.db import PgstacDB

    with PgstacDB(dsn="") as db:
        return int(db.query_one("SELECT count(*) FROM pgstac.items WHERE collection = %s", [COLLECTION]))


def test_publish_then_search_equals_query_and_a_grown_build_upserts(pg_env: Cluster, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from pipeline.cli import main

    build = _build(tmp_path / "build", scenes=3)
    runner = CliRunner()
    first = runner.invoke(main, ["publish", "--build", str(build)])
    assert first.exit_code == 0, first.output
    small = query(str(build)).ids
    assert f"publish: {len(small)} item(s) of {COLLECTION} and 3 scene item(s)" in first.output
    assert _count() == len(small)
    assert _pgstac_ids({"collections": [COLLECTION]}) == sorted(small)

    # the build grows (more scenes, the catalog rewritten): a second publish upserts
    _build(build, scenes=7)
    grown = query(str(build)).ids
    assert len(grown) > len(small)
    second = runner.invoke(main, ["publish", "--build", str(build)])
    assert second.exit_code == 0, second.output
    assert _count() == len(grown)
    again = runner.invoke(main, ["publish", "--build", str(build)])  # unchanged: nothing doubles
    assert again.exit_code == 0 and _count() == len(grown)

    patches = pd.read_parquet(build / "stac" / "items.parquet")
    west, south = (
        patches["bbox"].map(lambda b: b["xmin"]).min(),
        patches["bbox"].map(lambda b: b["ymin"]).min(),
    )
    east, north = (
        patches["bbox"].map(lambda b: b["xmax"]).max(),
        patches["bbox"].map(lambda b: b["ymax"]).max(),
    )
    half = [west, south, (west + east) / 2, north]
    window = "2023-01-10T00:00:00Z/2023-01-25T00:00:00Z"
    cloud = float(sorted(patches["eo:cloud_cover"])[len(patches) * 3 // 4])
    picked = sorted(grown[::9])
    cases: list[tuple[dict[str, Any], dict[str, Any]]] = [
        ({"bbox": half}, {"bbox": half}),
        ({"datetime": window}, {"datetime": window}),
        ({"ids": picked}, {"ids": picked}),
        (
            {
                "filter": {"op": "<=", "args": [{"property": "eo:cloud_cover"}, cloud]},
                "filter-lang": "cql2-json",
            },
            {"max_cloud": cloud},
        ),
        (
            {
                "filter": {"op": ">=", "args": [{"property": "spectralearth:n_dates"}, 2]},
                "filter-lang": "cql2-json",
            },
            {"min_dates": 2},
        ),
    ]
    for pgstac_search, query_filters in cases:
        expected = sorted(query(str(build), **query_filters).ids)
        assert 0 < len(expected) < len(grown) or query_filters.get("ids"), query_filters
        assert _pgstac_ids({"collections": [COLLECTION], **pgstac_search}) == expected, query_filters

    # a rebuild that holds fewer patches: publishing removes the items it no longer holds
    shutil.rmtree(build / "stac")
    _build(build, scenes=2)
    fewer = query(str(build)).ids
    shrunk = runner.invoke(main, ["publish", "--build", str(build)])
    assert shrunk.exit_code == 0, shrunk.output
    scenes_gone = 7 - 2  # the scene collection is published (and pruned) the same way
    assert f"{len(grown) - len(set(grown) & set(fewer)) + scenes_gone} removed" in shrunk.output
    assert _pgstac_ids({"collections": [COLLECTION]}) == sorted(fewer)
    scene_ids = pd.read_parquet(build / "stac" / "scenes.parquet")["id"]
    assert _pgstac_ids({"collections": [SCENES]}) == sorted(scene_ids) and len(scene_ids) == 2


def test_stac_fastapi_pgstac_serves_what_was_published(
    pg_env: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("stac_fastapi.pgstac", reason="stac-fastapi-pgstac is not installed")
    from pystac_client import Client

    from stac.pgstac import publish
    from stac.serve import running

    build = _build(tmp_path / "build", scenes=5)
    summary = publish(str(build))
    assert summary.collection_id == COLLECTION and summary.items == len(query(str(build)).ids)
    # stac-fastapi-pgstac reads its connection from the same PG* variables (a TCP host, a password
    # field it requires but a trusting cluster ignores)
    for name, value in pg_env.environ(tcp=True).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PGPASSWORD", "unused")
    from stac_fastapi.pgstac.app import app

    with running(app) as url:
        client = Client.open(url)
        everything = sorted(i.id for i in client.search(collections=[COLLECTION], limit=7).items())
        assert everything == sorted(query(str(build)).ids)
        multi = client.search(
            collections=[COLLECTION],
            filter={"op": ">=", "args": [{"property": "spectralearth:n_dates"}, 2]},
            filter_lang="cql2-json",
        )
        assert sorted(i.id for i in multi.items()) == sorted(query(str(build), min_dates=2).ids)
        item = next(client.search(collections=[COLLECTION], max_items=1).items())
        assert item.assets["dataset"].href == str(build / "dataset.zarr")
        assert item.assets["dataset"].media_type == "application/vnd+zarr"
        # the source scene is published too: its item is linked in the API
        (derived,) = [link for link in item.links if link.rel == "derived_from"]
        assert derived.href == f"{url}/collections/{SCENES}/items/{item.properties['spectralearth:scene_id']}"
        scene = requests.get(derived.href, timeout=30).json()
        assert scene["id"] == item.properties["spectralearth:scene_id"] and scene["collection"] == SCENES
        assert scene["assets"]["archive"]["href"].startswith("/data/")  # where the product lies
        root_link = [link for link in item.links if link.rel == "root"][0]
        assert root_link.href.rstrip("/") == url


def test_publish_errors_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cluster: Cluster
) -> None:
    from click.testing import CliRunner

    from pipeline.cli import main
    from stac.pgstac import PublishError, conninfo

    assert conninfo(None) == "" and conninfo("spectral_db") == "service=spectral_db"
    with pytest.raises(PublishError):
        conninfo("x password=secret")
    build = _build(tmp_path / "build", scenes=2)
    runner = CliRunner()
    for name in ("PGSERVICE", "PGSERVICEFILE", "PGPASSFILE"):
        monkeypatch.delenv(name, raising=False)
    # nothing listens on this port: one line, no traceback, no password in the message
    monkeypatch.setenv("PGHOST", cluster.socket_dir)
    monkeypatch.setenv("PGPORT", "1")
    monkeypatch.setenv("PGUSER", "postgres")
    monkeypatch.setenv("PGPASSWORD", "hunter2-secret")
    failed = runner.invoke(main, ["publish", "--build", str(build)])
    assert failed.exit_code != 0 and "cannot connect to PostgreSQL" in failed.output
    assert "hunter2-secret" not in failed.output and "Traceback" not in failed.output
    assert len(failed.output.strip().splitlines()) == 1
    # a database without the pgstac schema
    monkeypatch.setenv("PGPORT", str(cluster.port))
    monkeypatch.delenv("PGPASSWORD")
    subprocess.run(
        ["psql", "-q", "-c", "CREATE DATABASE plain"], env={**os.environ}, check=True, capture_output=True
    )
    monkeypatch.setenv("PGDATABASE", "plain")
    bare = runner.invoke(main, ["publish", "--build", str(build)])
    assert bare.exit_code != 0 and "pypgstac migrate" in bare.output, bare.output
    missing = runner.invoke(main, ["publish", "--build", str(tmp_path / "nothing")])
    assert missing.exit_code != 0 and "run the catalog stage first" in missing.output


def test_an_empty_build_publishes_an_empty_collection(pg_env: Cluster, tmp_path: Path) -> None:
    """A build that kept nothing is valid: publishing it leaves its collection in pgstac, empty."""
    from stac.pgstac import publish

    build = _build(tmp_path / "build", scenes=3)
    assert publish(str(build)).items > 0 and _count() > 0
    scenes, patches = make_tables([*many_scene_specs(4, 5), *default_scenes()][:3])
    store = BuildStore(str(tmp_path / "empty"))
    write_tables(store, scenes, patches.iloc[0:0])
    build_catalog(store, CatalogSettings(), [(1, 418.2, 6.99561)])
    summary = publish(str(tmp_path / "empty"))
    assert summary.items == 0 and summary.removed > 0 and _count() == 0
    assert _pgstac_ids({"collections": [COLLECTION]}) == []
