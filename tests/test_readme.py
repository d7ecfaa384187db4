"""Every fenced code block of README.md runs here, or says right before its fence why it does not.

How a block is treated (README's Development section says the same):

- ```python: run with the venv's python in a subprocess;
- ```sh / ```bash: run with `bash -e -o pipefail`, the venv's bin first on PATH (so `spectralearth`,
  `stac-client` and `make` resolve as after `make setup`); `make` runs with `-o .venv/bin/.installed`, so a
  test never reinstalls the repository's venv;
- ```yaml: a manifest section: put into manifests/demo.yaml in place of that section and checked by
  `pipeline.manifest.Manifest` (unknown keys, types, ranges), as `--manifest` would;
- ```text, or a fence right after `<!-- output -->`: printed output or a layout, not run.

Markers are HTML comments on the lines right above a fence (no blank line between):

- `<!-- not-runnable: REASON -->`: not run; the reason is required (a real cluster, credentials, a
  database, or a target that is this suite or the demo every other block runs against);
- `<!-- requires: MODULE -->`: run where MODULE imports (an optional extra), skipped with that reason
  elsewhere;
- `<!-- server: PORT -->`: the block's first command is a server listening on 127.0.0.1:PORT; the test
  starts it in the background on a free port (each `PORT` in the block replaced by it), waits until it
  answers, runs the rest of the block against it, then stops it;
- `<!-- make-vars: NAME=VALUE ... -->`: the block's `make` commands run with these variables appended
  (the last assignment of a variable wins), e.g. small inputs in place of an archive path.

A fence with another language or none, an unknown marker or an empty reason fails
`test_every_block_is_run_or_marked` (naming the line), so a new block must run or say why.

Blocks run in a fresh folder laid out like the repository root (manifests/, Makefile, .venv linked),
where `build/demo` is a copy of one small real build and `build/demo-products` its products: `make demo`
(8 synthetic 420 x 400 px products; labels, benchmark export and report included) run once per module,
plus the `blocked` split the Training section's shell block makes, which its python block reads.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pipeline.manifest import Manifest, ManifestError

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
VENV_BIN = Path(sys.executable).parent  # the venv's bin (not resolved: that would leave the venv)
# What a block's working folder links from the repository (the Makefile's paths are relative to it).
REPOSITORY_FILES = ("Makefile", "pyproject.toml", "manifests", ".venv")
BLOCK_TIMEOUT = 240  # seconds for one block (the make block builds 8 small products)

FENCE = re.compile(r"^(`{3,})\s*([A-Za-z0-9_+-]*)\s*$")
MARKER = re.compile(r"^<!--\s*([a-z-]+)\s*(?::\s*(.*?))?\s*-->$")
RUN_LANGUAGES = {"python": "python", "sh": "shell", "bash": "shell", "yaml": "yaml"}
OUTPUT_LANGUAGES = {"text"}
MARKERS = ("not-runnable", "output", "requires", "server", "make-vars")
MAKE_VARIABLE = re.compile(r"^[A-Z_][A-Z0-9_]*=\S*$")


@dataclass(frozen=True, slots=True)
class Block:
    """One fenced code block: where it opens, its language, its text and the comment lines above it."""

    line: int  # 1-based line of the opening fence
    language: str  # lower case; "" for a plain fence
    code: str
    comments: tuple[str, ...]

    @property
    def first_line(self) -> str:
        return next((text.strip() for text in self.code.splitlines() if text.strip()), "")

    def describe(self) -> str:
        return f"README.md line {self.line} (```{self.language or ''} {self.first_line[:70]!r})"


@dataclass(frozen=True, slots=True)
class Plan:
    """What the test does with a block: `action` is python, shell, yaml, output or not-runnable."""

    block: Block
    action: str
    reason: str = ""  # why it is not run (output, not-runnable)
    requires: str | None = None
    server_port: int | None = None
    make_vars: tuple[str, ...] = ()

    @property
    def runs(self) -> bool:
        return self.action in ("python", "shell", "yaml")


class ReadmeBlockError(ValueError):
    """A block that is neither run nor marked with a reason, or whose markers are malformed."""


def parse_blocks(text: str) -> list[Block]:
    """Every fenced block of a Markdown text, with the HTML comment lines right above its fence."""
    lines = text.splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        fence = opening.group(1)
        end = index + 1
        while end < len(lines) and not (lines[end].startswith(fence) and lines[end].strip("`").strip() == ""):
            end += 1
        if end == len(lines):
            raise ReadmeBlockError(f"README.md line {index + 1}: the fence is never closed")
        above = index - 1
        while above >= 0 and lines[above].strip().startswith("<!--"):
            above -= 1
        comments = tuple(line.strip() for line in lines[above + 1 : index])
        code = "\n".join(lines[index + 1 : end]) + "\n"
        blocks.append(Block(index + 1, opening.group(2).lower(), code, comments))
        index = end + 1
    return blocks


def plan_of(block: Block) -> Plan:
    """How the test treats a block, from its language and markers; raises ReadmeBlockError saying why a
    block can be neither run nor skipped."""
    markers: dict[str, str] = {}
    for comment in block.comments:
        parsed = MARKER.match(comment)
        if parsed is None or parsed.group(1) not in MARKERS:
            raise ReadmeBlockError(
                f"{block.describe()}: unknown marker {comment!r} (known: {', '.join(MARKERS)})"
            )
        markers[parsed.group(1)] = (parsed.group(2) or "").strip()
    if "not-runnable" in markers:
        if not markers["not-runnable"]:
            raise ReadmeBlockError(f"{block.describe()}: <!-- not-runnable: ... --> needs a reason")
        return Plan(block, "not-runnable", reason=markers["not-runnable"])
    if "output" in markers or block.language in OUTPUT_LANGUAGES:
        return Plan(block, "output", reason="output or layout, shown not run")
    action = RUN_LANGUAGES.get(block.language)
    if action is None:
        raise ReadmeBlockError(
            f"{block.describe()}: ```{block.language or '(no language)'} is neither run nor marked: use "
            "python, sh, bash or yaml (run by tests/test_readme.py), text for output, or put "
            "<!-- not-runnable: why --> right above the fence"
        )
    server_port = None
    if "server" in markers:
        if action != "shell" or not markers["server"].isdigit():
            raise ReadmeBlockError(
                f"{block.describe()}: <!-- server: PORT --> takes a port, on a shell block"
            )
        server_port = int(markers["server"])
        if str(server_port) not in block.code:
            raise ReadmeBlockError(f"{block.describe()}: the block never names its server port {server_port}")
    make_vars: tuple[str, ...] = ()
    if "make-vars" in markers:
        make_vars = tuple(markers["make-vars"].split())
        if action != "shell" or not make_vars or not all(MAKE_VARIABLE.match(v) for v in make_vars):
            raise ReadmeBlockError(
                f"{block.describe()}: <!-- make-vars: NAME=VALUE ... --> takes make variables, "
                "on a shell block"
            )
    return Plan(
        block, action, requires=markers.get("requires") or None, server_port=server_port, make_vars=make_vars
    )


def readme_plans() -> tuple[list[Plan], list[str]]:
    """The plan of every README block that has one, and the errors of those that do not."""
    plans: list[Plan] = []
    errors: list[str] = []
    for block in parse_blocks(README.read_text()):
        try:
            plans.append(plan_of(block))
        except ReadmeBlockError as exc:
            errors.append(str(exc))
    return plans, errors


# The fixture build and each block's working folder ----------------------------------------------------
def block_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("SPECTRALEARTH_DEBUG", None)  # a failing block ends in its one line, as users see it
    # Under `make test` (as in CI) the outer make's level and flags would reach the blocks' own `make`,
    # which then prints "Entering directory" lines a user at a shell never sees.
    for name in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS", "MAKEOVERRIDES"):
        env.pop(name, None)
    return env


def link_repository(folder: Path) -> None:
    for name in REPOSITORY_FILES:
        (folder / name).symlink_to(REPO / name)


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def shell(script: str, cwd: Path, timeout: float = BLOCK_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", script],
        cwd=cwd,
        env=block_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def make_prelude(make_vars: tuple[str, ...]) -> str:
    """A `make` that never reinstalls the linked venv, with the block's variables appended."""
    appended = " ".join(make_vars)
    return f'make() {{ command make -o .venv/bin/.installed "$@" {appended}; }}\n'


@pytest.fixture(scope="module")
def readme_root(tmp_path_factory: pytest.TempPathFactory, demo_products: tuple[Path, object]) -> Path:
    """A folder like the repository root after `make demo` and the Training section's blocked split.

    The session's demo products are hard-linked in (make demo reuses products whose truth.json matches
    and only adds files beside them: labels/), so the products are generated once per session."""
    root = tmp_path_factory.mktemp("readme-demo")
    link_repository(root)
    products, _ = demo_products
    shutil.copytree(
        products,
        root / "build" / "demo-products",
        copy_function=os.link,
        ignore=shutil.ignore_patterns("labels"),
    )  # labels/ is make demo's to write: never a shared inode
    steps = make_prelude(("SCHEDULER=synchronous",)) + "make demo\n"
    # the split the Training section's shell block makes, which the python block after it reads
    steps += "spectralearth split --build build/demo --name blocked --kind blocked --seed 0\n"
    done = shell(steps, root, timeout=900)
    assert done.returncode == 0, f"make demo failed:\n{tail(done.stderr)}\n{tail(done.stdout)}"
    assert "synth: reusing" in done.stdout, tail(done.stdout)
    return root


@pytest.fixture
def workspace(readme_root: Path, tmp_path: Path) -> Path:
    """A fresh working folder: the repository's files linked, a copy of the demo build (blocks may write
    into it), the products linked (only read)."""
    link_repository(tmp_path)
    (tmp_path / "build").mkdir()
    shutil.copytree(readme_root / "build" / "demo", tmp_path / "build" / "demo", symlinks=True)
    (tmp_path / "build" / "demo-products").symlink_to(readme_root / "build" / "demo-products")
    return tmp_path


# Running one block -------------------------------------------------------------------------------------
def failure(plan: Plan, done: subprocess.CompletedProcess[str]) -> str:
    return (
        f"{plan.block.describe()} exited {done.returncode}\n"
        f"--- stderr ---\n{tail(done.stderr)}\n--- stdout ---\n{tail(done.stdout)}"
    )


def run_python(plan: Plan, cwd: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", plan.block.code],
        cwd=cwd,
        env=block_env(),
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT,
    )
    # a traceback's `File "<string>", line N` is README line block.line + N
    assert done.returncode == 0, failure(plan, done)


def commands_of(code: str) -> list[str]:
    """The block's commands: backslash continuations joined, blank and comment-only lines dropped."""
    joined = re.sub(r"\\\n", " ", code)
    return [line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True, slots=True)
class Server:
    process: subprocess.Popen[bytes]
    log: Path

    def log_tail(self) -> str:
        return tail(self.log.read_text(errors="replace"))


def wait_until_answering(server: Server, url: str, plan: Plan, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(
                f"{plan.block.describe()}: the server exited {server.process.returncode}\n{server.log_tail()}"
            )
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    pytest.fail(f"{plan.block.describe()}: no answer from {url} within {timeout:.0f} s\n{server.log_tail()}")


@contextmanager
def started_server(command: str, cwd: Path) -> Iterator[Server]:
    """The command running in its own session, its output in a log; stopped (SIGTERM, then SIGKILL)
    on leaving."""
    log = cwd / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["bash", "-c", f"exec {command}"],
            cwd=cwd,
            env=block_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield Server(process, log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)


def run_shell(plan: Plan, cwd: Path) -> None:
    code = plan.block.code
    if plan.server_port is None:
        done = shell(make_prelude(plan.make_vars) + code, cwd)
        assert done.returncode == 0, failure(plan, done)
        return
    port = free_port()
    commands = commands_of(code.replace(str(plan.server_port), str(port)))
    with started_server(commands[0], cwd) as server:
        wait_until_answering(server, f"http://127.0.0.1:{port}/", plan)
        done = shell(make_prelude(plan.make_vars) + "\n".join(commands[1:]) + "\n", cwd)
        assert done.returncode == 0, failure(plan, done) + f"\n--- server ---\n{server.log_tail()}"


def check_yaml(plan: Plan) -> None:
    """A manifest section: it replaces that section of the demo manifest, which must then load."""
    section = yaml.safe_load(plan.block.code)
    assert isinstance(section, dict) and section, f"{plan.block.describe()}: not a YAML mapping"
    raw = yaml.safe_load((REPO / "manifests" / "demo.yaml").read_text())
    raw.update(section)
    try:
        manifest = Manifest.from_dict(raw, source=f"README.md line {plan.block.line}")
    except ManifestError as exc:
        pytest.fail(f"{plan.block.describe()}: the manifest refuses it: {exc}")
    for name in section:
        assert getattr(manifest, name) != getattr(Manifest(name="x"), name), (
            f"{plan.block.describe()}: section {name!r} read as its defaults"
        )


# The tests --------------------------------------------------------------------------------------------
def test_every_block_is_run_or_marked() -> None:
    plans, errors = readme_plans()
    assert not errors, "README blocks neither run nor marked:\n" + "\n".join(errors)
    assert sum(plan.runs for plan in plans) >= 10, [plan.block.describe() for plan in plans]
    for plan in plans:
        assert plan.runs or plan.reason, plan.block.describe()


@pytest.mark.parametrize(
    ("markdown", "message"),
    [
        ("text\n\n```\nls\n```\n", "line 3 (``` 'ls'): ```(no language) is neither run nor marked"),
        ("```console\n$ ls\n```\n", "line 1 (```console '$ ls'): ```console is neither run nor marked"),
        ("<!-- not-runnable: -->\n```sh\nls\n```\n", "line 2 (```sh 'ls'): <!-- not-runnable: ... --> needs"),
        (
            "<!-- not runnable, needs X -->\n```sh\nls\n```\n",
            "unknown marker '<!-- not runnable, needs X -->'",
        ),
        ("<!-- server: 8080 -->\n```sh\nserve --port 9\n```\n", "never names its server port 8080"),
        ("<!-- make-vars: /data -->\n```sh\nmake x\n```\n", "takes make variables"),
        ("```sh\nls\n", "line 1: the fence is never closed"),
    ],
    ids=["plain", "other-language", "empty-reason", "unknown-marker", "server-port", "make-vars", "unclosed"],
)
def test_a_block_neither_run_nor_marked_fails(markdown: str, message: str) -> None:
    with pytest.raises(ReadmeBlockError) as caught:
        for block in parse_blocks(markdown):
            plan_of(block)
    assert message in str(caught.value)


def test_markers_and_languages_decide_what_runs() -> None:
    markdown = (
        "```python\nprint(1)\n```\n"
        "<!-- not-runnable: needs a scheduler -->\n```sh\nrun\n```\n"
        "\n<!-- not-runnable: too far above -->\n\n```bash\nls\n```\n"
        "```text\nout\n```\n"
        "<!-- output -->\n```\nout\n```\n"
        "<!-- requires: torch -->\n<!-- make-vars: A=1 B= -->\n```sh\nmake all\n```\n"
        "<!-- server: 8080 -->\n```sh\nserve --port 8080\ncurl :8080\n```\n"
        "````yaml\n```\n````\n"
    )
    plans = [plan_of(block) for block in parse_blocks(markdown)]
    assert [(p.block.line, p.action, p.reason) for p in plans] == [
        (1, "python", ""),
        (5, "not-runnable", "needs a scheduler"),
        (11, "shell", ""),
        (14, "output", "output or layout, shown not run"),
        (18, "output", "output or layout, shown not run"),
        (23, "shell", ""),
        (27, "shell", ""),
        (31, "yaml", ""),
    ]
    assert plans[5].requires == "torch" and plans[5].make_vars == ("A=1", "B=")
    assert plans[6].server_port == 8080
    assert plans[7].block.code == "```\n"


def test_make_vars_override_the_blocks_own(tmp_path: Path) -> None:
    (tmp_path / "Makefile").write_text("show:\n\t@echo $(INPUT)\n")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    done = shell(make_prelude(("INPUT=small",)) + "make show INPUT=/data/enmap\n", tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "small"


def skip_without_requirement(plan: Plan) -> None:
    if plan.requires and importlib.util.find_spec(plan.requires) is None:
        pytest.skip(f"{plan.block.describe()}: needs {plan.requires} (an optional extra), not installed")


PLANS, _ = readme_plans()


@pytest.mark.parametrize(
    "plan",
    [pytest.param(p, id=f"line{p.block.line}-yaml") for p in PLANS if p.action == "yaml"],
)
def test_readme_yaml_block(plan: Plan) -> None:
    skip_without_requirement(plan)
    check_yaml(plan)


@pytest.mark.slow
@pytest.mark.parametrize(
    "plan",
    [
        pytest.param(p, id=f"line{p.block.line}-{p.block.language}")
        for p in PLANS
        if p.action in ("python", "shell")
    ],
)
def test_readme_block(plan: Plan, workspace: Path) -> None:
    skip_without_requirement(plan)
    if plan.action == "python":
        run_python(plan, workspace)
    else:
        run_shell(plan, workspace)
