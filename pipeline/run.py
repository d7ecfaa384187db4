"""Dask wiring: run one function over many items on the chosen scheduler, with a progress bar.

Stages hand their per-scene (or per-source) work here; this module holds no stage logic.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import dask
from dask.diagnostics import ProgressBar

T = TypeVar("T")
LOCAL_SCHEDULERS = ("synchronous", "threads", "processes")


class SchedulerError(ValueError):
    """A scheduler name or address that cannot be used."""


@dataclass(frozen=True, slots=True)
class Scheduler:
    name: str = "threads"  # synchronous | threads | processes | tcp://host:port
    workers: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.name not in LOCAL_SCHEDULERS and not self.name.startswith("tcp://"):
            raise SchedulerError(
                f"unknown scheduler {self.name!r}: use synchronous, threads, processes or tcp://host:port"
            )
        if self.workers is not None and self.workers < 1:
            raise SchedulerError(f"--workers must be at least 1, got {self.workers}")

    @contextlib.contextmanager
    def _context(self) -> Iterator[None]:
        if self.name.startswith("tcp://"):
            from distributed import Client

            try:
                client = Client(self.name, timeout="10s")
            except OSError as exc:
                raise SchedulerError(f"cannot reach the Dask scheduler at {self.name}: {exc}") from None
            with client:
                yield
            return
        workers = self.workers or (os.cpu_count() or 1)
        with dask.config.set(scheduler=self.name, num_workers=workers):
            yield

    def map(self, function: Callable[..., T], items: Sequence[Any], *args: Any, label: str = "") -> list[T]:
        """`[function(item, *args) for item in items]`, one Dask task per item, results in order."""
        if not items:
            return []
        tasks = [dask.delayed(function, pure=False)(item, *args) for item in items]
        with self._context():
            if self.progress and not self.name.startswith("tcp://"):
                if label:
                    print(f"{label}: {len(tasks)} tasks", flush=True)
                with ProgressBar(minimum=1.0, dt=0.5):
                    return list(dask.compute(*tasks))
            return list(dask.compute(*tasks))
