"""One run at a time holds a build: real processes racing for `_lock.json`, in a local folder and under
`s3://` (moto's standalone server on 127.0.0.1). A second run is refused with one line naming the
holder; a holder that was SIGKILLed, or whose lease ran out without renewal, is taken over, by exactly
one of several takers; a run whose lock was taken learns it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline import stages, tables
from pipeline.cli import main
from pipeline.lock import (
    LOCK_NAME,
    BuildLock,
    BuildLocked,
    Holder,
    LockError,
    LockLost,
    _backend_for,
    check_held,
)
from pipeline.storage import BuildStore
from pipeline.write import verify_build

REPO = Path(__file__).resolve().parent.parent
MANIFEST = REPO / "manifests" / "demo.yaml"
BUCKET = "lock-builds"
pytestmark = pytest.mark.slow

# A process that takes the lock and holds it (renewing) until it is killed.
HOLDER = """
import sys, time
from pipeline.lock import BuildLock
from pipeline.storage import BuildStore
build, lease, host = sys.argv[1], float(sys.argv[2]), sys.argv[3]
identity = {"host": host, "machine": host + "/0/elsewhere"} if host else {}
BuildLock(BuildStore(build), "spectralearth run", lease_seconds=lease, **identity).acquire()
print("held", flush=True)
time.sleep(600)
"""

# A process that tries to take the lock at a given instant; the winner holds it a while, so that every
# other contender sees it held.
CONTENDER = """
import sys, time
from pipeline.lock import BuildLock, BuildLocked
from pipeline.storage import BuildStore
build, start_at = sys.argv[1], float(sys.argv[2])
lock = BuildLock(BuildStore(build), "spectralearth contender")
time.sleep(max(0.0, start_at - time.time()))
try:
    lock.acquire()
except BuildLocked as exc:
    print("locked", exc, flush=True)
    sys.exit(3)
print("won", lock.took_over_from.pid if lock.took_over_from else None, flush=True)
time.sleep(3)
lock.release()
"""


def python(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def start_holder(
    build: str, lease: float = 60.0, host: str = "", env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    process = python(HOLDER, build, str(lease), host, env=env)
    assert process.stdout is not None
    line = process.stdout.readline()
    if line.strip() != "held":
        process.kill()
        raise AssertionError(f"the holder did not take the lock: {line!r} {process.communicate()[1]}")
    return process


def kill_9(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)  # reaped: not even a zombie is left
    assert process.returncode == -signal.SIGKILL


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args]


def build_args(build: str, products: Path) -> list[str]:
    return [
        "--manifest",
        str(MANIFEST),
        "--build",
        build,
        "--input",
        str(products),
        "--scheduler",
        "synchronous",
        "--no-progress",
    ]


@pytest.fixture(scope="module")
def products(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two small products (one site seen twice, sizes not multiples of 128): 3 patches kept."""
    from pipeline.enmap.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("lock-products")
    config = SynthConfig(
        seed=7,
        sites=1,
        revisits=2,
        overlapping_tiles=0,
        reprocessed=0,
        width=300,
        height=280,
        packagings=("folder",),
        formats=("GTiff",),
        cloud_amount=0.02,  # clear enough that the demo manifest keeps patches
    )
    generate(out, config)
    (out / "truth.json").unlink()
    return out


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lock-scratch")


@pytest.fixture
def env(scratch: Path, build_uri: str) -> dict[str, str]:
    """The environment of child processes (with moto's endpoint when the build is on S3)."""
    return {**os.environ, "SPECTRALEARTH_SCRATCH": str(scratch)}


@pytest.fixture
def local_env(scratch: Path) -> dict[str, str]:
    return {**os.environ, "SPECTRALEARTH_SCRATCH": str(scratch)}


@pytest.fixture(scope="module")
def s3_vars(s3_server: str) -> Iterator[dict[str, str]]:
    import s3fs

    variables = {
        "AWS_ACCESS_KEY_ID": "testing-key",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_server,
    }
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}).mkdir(BUCKET)
    yield variables
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(params=["local", "s3"])
def build_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh build location: a local folder, or a prefix in moto's bucket."""
    if request.param == "local":
        return str(tmp_path / "build")
    request.getfixturevalue("s3_vars")
    return f"s3://{BUCKET}/{tmp_path.name}"


def lock_exists(build: str) -> bool:
    return BuildStore(build).exists(LOCK_NAME)


# Two `spectralearth run` at once ------------------------------------------------------------------
@pytest.fixture(scope="module")
def raced(
    products: Path, scratch: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, list[tuple[int, int, str, str]]]:
    """Two `spectralearth run` processes on one build started at the same moment."""
    build = str(tmp_path_factory.mktemp("raced") / "build")
    env = {**os.environ, "SPECTRALEARTH_SCRATCH": str(scratch)}
    runs = [
        subprocess.Popen(
            cli("run", *build_args(build, products)),
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=600) for run in runs]
    return build, [(run.pid, run.returncode, out, err) for run, (out, err) in zip(runs, outputs, strict=True)]


def test_two_runs_at_once_one_builds_the_other_is_refused_naming_it(
    raced: tuple[str, list[tuple[int, int, str, str]]],
) -> None:
    build, runs = raced
    assert sorted(code for _, code, _, _ in runs) == [0, 2], [err for *_, err in runs]
    (winner_pid, _, _, _) = next(run for run in runs if run[1] == 0)
    (_, _, _, refused) = next(run for run in runs if run[1] == 2)
    assert "Traceback" not in refused
    lines = [line for line in refused.splitlines() if line.strip()]
    assert len(lines) == 1, refused
    message = lines[0]
    assert message.startswith(f"spectralearth: error: build {build} is in use by `spectralearth run`")
    assert f"pid {winner_pid}," in message
    assert f"host {os.uname().nodename}" in message and " since 20" in message

    # The winner's build is complete and whole, and its lock is gone.
    store = BuildStore(build)
    for name in stages.ORDER:
        record = store.read_stage_record(name)
        assert record is not None, name
    assert store.read_table(tables.INDEX_PATCHES).num_rows > 0
    result = verify_build(store)
    assert result.shards > 0 and result.bad == () and result.unrecorded == ()
    assert not lock_exists(build)


def test_read_only_commands_do_not_lock_and_writing_ones_are_refused(
    raced: tuple[str, list[tuple[int, int, str, str]]],
) -> None:
    build, _ = raced
    store = BuildStore(build)
    runner = CliRunner()
    with BuildLock(store, "spectralearth run") as lock:
        assert not lock.took_over and lock.took_over_from is None
        verified = runner.invoke(main, ["verify", "--build", build])
        assert verified.exit_code == 0, verified.output
        queried = runner.invoke(main, ["query", "--build", build])
        assert queried.exit_code == 0 and queried.stdout.strip(), queried.output
        for args in (
            ["verify", "--build", build, "--repair"],
            ["split", "--build", build, "--name", "held"],
            ["report", "--manifest", str(MANIFEST), "--build", build, "--scheduler", "synchronous"],
        ):
            refused = runner.invoke(main, args)
            assert refused.exit_code == 2, (args, refused.output)
            assert refused.exception is None or isinstance(refused.exception, SystemExit)
            assert f"is in use by `spectralearth run` (host {os.uname().nodename}, pid {os.getpid()}," in (
                refused.stderr
            )
        assert not store.exists("splits/held.json")
    assert not lock_exists(build)


# A SIGKILLed holder ------------------------------------------------------------------------------
def test_lock_of_a_sigkilled_run_is_taken_over_by_the_next_run(
    products: Path, local_env: dict[str, str], tmp_path: Path
) -> None:
    build, env = str(tmp_path / "build"), local_env
    holder = start_holder(build, env=env)
    dead_pid = holder.pid
    refused = subprocess.run(
        cli("inventory", *build_args(build, products)), cwd=REPO, env=env, capture_output=True, text=True
    )
    assert refused.returncode == 2 and f"pid {dead_pid}," in refused.stderr, refused.stderr
    kill_9(holder)
    assert lock_exists(build), "a SIGKILLed holder leaves its lock behind"

    run = subprocess.run(
        cli("run", *build_args(build, products)), cwd=REPO, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    takeover = [line for line in run.stderr.splitlines() if "took over the lock" in line]
    assert len(takeover) == 1, run.stderr
    assert f"pid {dead_pid}," in takeover[0] and f"process {dead_pid} on" in takeover[0]
    assert "is gone" in takeover[0]
    store = BuildStore(build)
    assert all(store.read_stage_record(name) is not None for name in stages.ORDER)
    assert not lock_exists(build)
    assert not [p for p in Path(build).iterdir() if p.name.startswith(LOCK_NAME)], "no stale copies left"


def test_sigkilled_holder_is_taken_over_and_named(build_uri: str, env: dict[str, str]) -> None:
    holder = start_holder(build_uri, env=env)
    store = BuildStore(build_uri)
    with pytest.raises(BuildLocked, match=f"pid {holder.pid},"):
        BuildLock(store, "spectralearth run").acquire()
    kill_9(holder)
    with BuildLock(store, "spectralearth run") as lock:
        assert lock.took_over and lock.took_over_from is not None
        assert lock.took_over_from.pid == holder.pid
        assert lock.took_over_from.command == "spectralearth run"
        recorded = Holder.from_bytes(store.read_bytes(LOCK_NAME))
        assert recorded is not None and recorded.pid == os.getpid()
        assert lock.holder is not None and recorded.run_id == lock.holder.run_id
    assert not lock_exists(build_uri)


def test_a_reused_pid_is_not_the_holder_but_a_live_one_is(tmp_path: Path) -> None:
    """Same machine: a PID alive now but started at another time is a reused PID (taken over); the
    live holder itself is refused even when its lease looks expired."""
    store = BuildStore(str(tmp_path / "build"))
    this = Holder.of_this_process("spectralearth run", lease_seconds=0.001)
    path = tmp_path / "build" / LOCK_NAME
    path.parent.mkdir()
    path.write_bytes(this.to_bytes())
    os.utime(path, (time.time() - 3600, time.time() - 3600))
    with pytest.raises(BuildLocked, match=f"pid {os.getpid()},"):
        BuildLock(store, "spectralearth mask").acquire()

    reused = Holder(**{**this.__dict__, "process_started": this.process_started - 1000.0})
    path.write_bytes(reused.to_bytes())
    with BuildLock(store, "spectralearth mask") as lock:
        assert lock.took_over_from == reused


def test_an_unreadable_lock_is_refused_while_young_and_taken_over_when_old(tmp_path: Path) -> None:
    """A torn lock file (a holder killed between its exclusive create and its write)."""
    store = BuildStore(str(tmp_path / "build"))
    path = tmp_path / "build" / LOCK_NAME
    path.parent.mkdir()
    path.write_bytes(b'{"host": "vm", "pi')
    with pytest.raises(BuildLocked, match=r"locked by an unreadable .*_lock.json written \d+ s ago"):
        BuildLock(store, "spectralearth run").acquire()
    old = time.time() - 2 * 3600
    os.utime(path, (old, old))
    with BuildLock(store, "spectralearth run") as lock:
        assert lock.took_over and lock.took_over_from is None
    assert not path.exists()


def test_a_missing_bucket_is_one_clear_error_not_a_held_lock(s3_vars: dict[str, str]) -> None:
    store = BuildStore("s3://no-such-lock-bucket/build")
    with pytest.raises(
        LockError, match="cannot take the lock s3://no-such-lock-bucket/build/_lock.json"
    ) as info:
        BuildLock(store, "spectralearth run").acquire()
    assert not isinstance(info.value, BuildLocked)
    assert len(str(info.value).splitlines()) == 1


# Leases ------------------------------------------------------------------------------------------
def test_live_lease_from_another_machine_is_refused_and_an_expired_one_taken_over(
    build_uri: str, env: dict[str, str]
) -> None:
    """A holder posing as another machine (its PID means nothing here) is judged by its lease only:
    renewed, it is refused long past one lease; once it stops renewing (SIGKILL), it is taken over
    after its lease and not before."""
    lease = 3.0
    holder = start_holder(build_uri, lease=lease, host="elsewhere", env=env)
    store = BuildStore(build_uri)
    try:
        deadline = time.monotonic() + 2 * lease
        while time.monotonic() < deadline:
            with pytest.raises(BuildLocked, match="host elsewhere"):
                BuildLock(store, "spectralearth run").acquire()
            time.sleep(0.3)
    finally:
        kill_9(holder)
    killed_at = time.monotonic()
    while True:
        try:
            lock = BuildLock(store, "spectralearth run").acquire()
            break
        except BuildLocked:
            assert time.monotonic() - killed_at < lease + 5, "an expired lease is taken over"
            time.sleep(0.2)
    waited = time.monotonic() - killed_at
    try:
        # The last renewal was at most lease/3 before the kill; store clocks count whole seconds.
        assert waited > lease - lease / 3 - 1.0
        assert lock.took_over_from is not None and lock.took_over_from.host == "elsewhere"
    finally:
        lock.release()


def test_a_run_whose_lock_was_taken_learns_it_and_leaves_the_new_lock(build_uri: str) -> None:
    store = BuildStore(build_uri)
    first = BuildLock(store, "spectralearth run", lease_seconds=0.9, host="a", machine="a/0/x")
    second = BuildLock(store, "spectralearth run", host="b", machine="b/0/x")
    with pytest.raises(LockLost, match="taken over by `spectralearth run` \\(host b,"):
        with first:
            # The lock disappears under the first run (an operator, or a taker on another machine
            # that judged it stale) and the second run takes it.
            store.fs.rm(store.path(LOCK_NAME))
            second.acquire()
            deadline = time.monotonic() + 5
            while not first.lost and time.monotonic() < deadline:
                time.sleep(0.1)
            with pytest.raises(LockLost, match="taken over by `spectralearth run` \\(host b,"):
                first.check()
            with pytest.raises(LockLost):
                check_held(store)  # what long loops call, without the lock object at hand
    # Leaving the block raised LockLost and did not remove the second run's lock.
    recorded = Holder.from_bytes(store.read_bytes(LOCK_NAME))
    assert recorded is not None and second.holder is not None and recorded.run_id == second.holder.run_id
    second.release()
    assert not lock_exists(build_uri)


# Takeover races ----------------------------------------------------------------------------------
def test_several_processes_race_for_a_stale_lock_and_exactly_one_wins(
    build_uri: str, env: dict[str, str]
) -> None:
    holder = start_holder(build_uri, env=env)
    kill_9(holder)
    start_at = time.time() + 6.0  # every contender has imported and is waiting by then
    contenders = [python(CONTENDER, build_uri, str(start_at), env=env) for _ in range(4)]
    results = [(c.pid, *c.communicate(timeout=120), c.returncode) for c in contenders]
    winners = [(pid, out) for pid, out, _, code in results if code == 0]
    assert len(winners) == 1, results
    winner_pid, winner_out = winners[0]
    assert winner_out.split() == ["won", str(holder.pid)]
    assert sum("took over the lock" in err for _, _, err, _ in results) == 1, "only the winner took over"
    for _pid, out, err, code in results:
        if code != 0:
            assert code == 3, err
            assert out.startswith("locked ") and f"pid {winner_pid}," in out, out
    assert not lock_exists(build_uri)


def test_two_takers_of_one_stale_lock_interleaved_only_the_first_wins(
    build_uri: str, env: dict[str, str]
) -> None:
    """The step that makes takeover atomic, in the worst interleaving: both takers judged the same
    stale lock before either replaced it."""
    holder = start_holder(build_uri, env=env)
    kill_9(holder)
    store = BuildStore(build_uri)
    backend_a, backend_b = _backend_for(store), _backend_for(store)
    seen_a, seen_b = backend_a.read(), backend_b.read()
    assert seen_a is not None and seen_b is not None and seen_a.token == seen_b.token
    a = Holder.of_this_process("taker a", 60.0)
    b = Holder.of_this_process("taker b", 60.0)
    assert backend_a.take_over(seen_a, a.to_bytes()) is not None
    assert backend_b.take_over(seen_b, b.to_bytes()) is None
    recorded = Holder.from_bytes(store.read_bytes(LOCK_NAME))
    assert recorded is not None and recorded.command == "taker a"
    if not build_uri.startswith("s3://"):
        assert sorted(p.name for p in Path(build_uri).iterdir()) == [LOCK_NAME]


def test_the_lock_names_no_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "s3cr3t-in-argv"
    monkeypatch.setattr(sys, "argv", ["spectralearth", "run", "--input", f"s3://KEY:{secret}@bucket/x"])
    store = BuildStore(str(tmp_path / "build"))
    with BuildLock(store, "spectralearth run"):
        text = (tmp_path / "build" / LOCK_NAME).read_text()
    assert secret not in text and "s3://***@bucket/x" in json.loads(text)["argv"]
