"""Fault injection for tests, kept out of the production task path.

- `KillOnTask`: a dask.distributed worker plugin that SIGKILLs its worker process when a task whose key
  holds a text starts executing (once, remembered by a marker file, or every time). The stage engine
  names each task after its item (`mask-<scene_id>-...`), so a test can aim at one product.
- `python -m tests.faults KILL_SPEC -- <spectralearth arguments>`: runs the CLI in this process with one
  library function wrapped so that the process SIGKILLs itself when that function is called with an
  argument whose repr holds a text (once per marker folder). KILL_SPEC is
  `module:function:text:marker_folder`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
import signal
import sys
from pathlib import Path
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin


def _fire_once(marker_dir: str, text: str) -> bool:
    marker = Path(marker_dir) / f"killed-{hashlib.sha256(text.encode()).hexdigest()[:16]}"
    if marker.exists():
        return False
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return True


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class KillOnTask(WorkerPlugin):
    """Kill the worker process that starts a task whose key contains `text`."""

    name = "test-kill-on-task"

    def __init__(self, text: str, marker_dir: str, always: bool = False) -> None:
        self.text = text
        self.marker_dir = marker_dir
        self.always = always

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        if finish != "executing" or self.text not in str(key):
            return
        if self.always or _fire_once(self.marker_dir, self.text):
            _die()


def wrap_to_kill(module_name: str, function_name: str, text: str, marker_dir: str) -> None:
    """Replace `module.function` by a wrapper that kills this process when called with `text` in the
    repr of its arguments (once per marker folder)."""
    module = importlib.import_module(module_name)
    original = getattr(module, function_name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if text in repr(args) + repr(kwargs) and _fire_once(marker_dir, text):
            _die()
        return original(*args, **kwargs)

    setattr(module, function_name, wrapper)


def main(argv: list[str]) -> None:
    spec, separator, *rest = argv
    if separator != "--":
        raise SystemExit("usage: python -m tests.faults module:function:text:marker -- <cli arguments>")
    module_name, function_name, text, marker_dir = spec.split(":", 3)
    wrap_to_kill(module_name, function_name, text, marker_dir)
    from pipeline.cli import main as cli

    sys.argv = ["spectralearth", *rest]
    cli()


if __name__ == "__main__":
    main(sys.argv[1:])
