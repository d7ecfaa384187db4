"""The size limits the codebase keeps (issue 15): no module over 800 lines, no function over 80, in the
packages and the bench. Complexity is ruff's C901 (max 12, pyproject.toml); sizes are checked here
because ruff has no rule for them."""

from __future__ import annotations

import ast
import posixpath
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CHECKED = ("pipeline", "stac", "bench", "tests")
MAX_MODULE_LINES = 800
MAX_FUNCTION_LINES = 80


def python_files() -> list[Path]:
    return sorted(p for folder in CHECKED for p in (REPO / folder).rglob("*.py") if "cache" not in p.parts)


def long_functions(source: str) -> list[tuple[str, int, int]]:
    """(name, first line, length) of every function or method longer than the limit."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                found.append((node.name, node.lineno, length))
    return found


def test_the_checker_finds_a_long_function_and_passes_a_short_one() -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    assert long_functions(f"def long():\n{body}") == [("long", 1, MAX_FUNCTION_LINES + 1)]
    assert long_functions("def short():\n    return 1\n") == []


@pytest.mark.parametrize("path", python_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_module_and_function_sizes(path: Path) -> None:
    source = path.read_text()
    lines = len(source.splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.relative_to(REPO)} has {lines} lines: split it by concern"
    too_long = [f"{name} (line {line}: {n} lines)" for name, line, n in long_functions(source)]
    assert not too_long, f"{path.relative_to(REPO)}: functions over {MAX_FUNCTION_LINES} lines: {too_long}"


def layout_block(readme: str) -> str:
    """The ```text block under the README's `## Layout` heading."""
    section = readme.split("\n## Layout\n", 1)[1]
    return section.split("```text\n", 1)[1].split("\n```", 1)[0]


def named_in_layout(block: str) -> set[str]:
    """Module and package paths listed in the layout block (`x.py`, `x/`): indentation says the parent."""
    names: set[str] = set()
    parents: list[tuple[int, str]] = []  # (indent, folder) of the enclosing folders
    for line in block.splitlines():
        words = line.split()
        if not words or not (words[0].endswith(".py") or words[0].endswith("/")):
            continue  # a description continued on the next line
        indent = len(line) - len(line.lstrip())
        while parents and parents[-1][0] >= indent:
            parents.pop()
        prefix = parents[-1][1] if parents else ""
        for word in words:
            if not (word.endswith(".py") or word.endswith("/")):
                break  # the description starts
            names.add(prefix + word.rstrip("/"))
            if word.endswith("/"):
                parents.append((indent, prefix + word))
    return names


def modules_of(folder: Path) -> set[str]:
    """The modules (x.py, without __init__) and packages of a folder, as paths from the repository."""
    return {
        str(p.relative_to(REPO))
        for p in folder.iterdir()
        if (p.suffix == ".py" and p.name != "__init__.py") or (p.is_dir() and (p / "__init__.py").exists())
    }


@pytest.mark.parametrize("package", ["pipeline", "pipeline/enmap", "stac"])
def test_readme_layout_names_every_module_and_none_that_is_gone(package: str) -> None:
    listed = named_in_layout(layout_block((REPO / "README.md").read_text()))
    present = modules_of(REPO / package)
    listed_here = {name for name in listed if posixpath.dirname(name) == package}
    assert present - listed_here == set(), "modules missing from the README's Layout"
    assert listed_here - present == set(), "the README's Layout names modules that do not exist"


def test_readme_layout_names_the_top_level_folders() -> None:
    listed = named_in_layout(layout_block((REPO / "README.md").read_text()))
    for folder in ("pipeline", "stac", "manifests", "bench", "tests"):
        assert folder in listed and (REPO / folder).is_dir()
