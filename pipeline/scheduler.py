"""Dask wiring: run one function over many items on the chosen scheduler, with a progress bar.

Stages hand their per-scene (or per-shard) work here; this module holds no stage logic. Every task
first applies the GDAL configuration (cache size, threads, S3 endpoint) in the process it runs in,
so workers of a `dask.distributed` cluster are set up the same way as the driver.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any, TypeVar

import dask
from dask.diagnostics import ProgressBar
from distributed.diagnostics.plugin import WorkerPlugin

from pipeline.engine import DEFAULT_RETRY, RetryPolicy, WorkItem, describe
from pipeline.storage_settings import GDAL_DEFAULTS, apply_gdal_config

T = TypeVar("T")
LOCAL_SCHEDULERS = ("synchronous", "threads", "processes")
DISTRIBUTED_LOCAL = "local"  # a LocalCluster of worker processes sized to the machine (the default)
# Workers that declare this resource (`dask worker --resources "unpack=1"`) run at most one product-reading
# task at a time: one unpacked product per worker, however many threads they have. Our LocalCluster has
# one thread per worker instead (see `_unpack_resources`).
UNPACK_RESOURCE = "unpack"

# What `run_items` calls as each task finishes: (item, result, None) or (item, None, error).
Settle = Callable[[WorkItem, Any, BaseException | None], None]
# A task's outcome: ("ok", result) or ("error", exception).
Outcome = tuple[str, Any]


_LOCAL_CLUSTERS: dict[tuple[int, int], Any] = {}


@atexit.register
def _close_local_clusters() -> None:
    for cluster in _LOCAL_CLUSTERS.values():
        with contextlib.suppress(Exception):
            cluster.close()
    _LOCAL_CLUSTERS.clear()


class SchedulerError(ValueError):
    """A scheduler name or address that cannot be used."""


class TaskFailed(RuntimeError):
    """A task that failed on every try; the message names the item."""


def call_with_config(
    function: Callable[..., T], config: tuple[tuple[str, str], ...], item: Any, *args: Any
) -> T:
    """Run one task: set GDAL's configuration in this process, then call the stage function."""
    apply_gdal_config(dict(config))
    return function(item, *args)


@dataclass(frozen=True, slots=True)
class Scheduler:
    name: str = DISTRIBUTED_LOCAL  # local | synchronous | threads | processes | tcp://host:port
    workers: int | None = None
    progress: bool = True
    gdal_config: tuple[tuple[str, str], ...] = field(default=tuple(sorted(GDAL_DEFAULTS.items())))
    # How often a task may lose its worker before it counts as failed (distributed only).
    allowed_failures: int = 2
    # Backoff of a task that hits a transient fault (pipeline.engine.with_retries).
    retry: RetryPolicy = DEFAULT_RETRY

    def __post_init__(self) -> None:
        if (
            self.name not in LOCAL_SCHEDULERS
            and self.name != DISTRIBUTED_LOCAL
            and not self.name.startswith("tcp://")
        ):
            raise SchedulerError(
                f"unknown scheduler {self.name!r}: use local, synchronous, threads, processes or tcp://host:port"
            )
        if self.workers is not None and self.workers < 1:
            raise SchedulerError(f"--workers must be at least 1, got {self.workers}")

    def with_config(self, config: Mapping[str, str]) -> Scheduler:
        merged = dict(self.gdal_config) | dict(config)
        return Scheduler(
            self.name,
            self.workers,
            self.progress,
            tuple(sorted(merged.items())),
            self.allowed_failures,
            self.retry,
        )

    @property
    def parallelism(self) -> int:
        """How many tasks run at once: the workers asked for, else one per core of this machine (for a
        remote cluster, a lower bound that planners use to keep every worker busy)."""
        return self.workers or (os.cpu_count() or 1)

    @property
    def distributed(self) -> bool:
        return self.name == DISTRIBUTED_LOCAL or self.name.startswith("tcp://")

    @contextlib.contextmanager
    def client(self) -> Iterator[Any]:
        from distributed import Client, LocalCluster

        # worker-saturation 1.0: a worker holds only the task it runs, so when a product kills its worker
        # no innocent queued task is blamed for the death.
        settings = {
            "distributed.scheduler.allowed-failures": self.allowed_failures,
            "distributed.scheduler.worker-saturation": 1.0,
            # The statistical profiler samples every task's stack 100 times a second; our tasks are
            # long numpy/GDAL calls, and the 8-scene bench build's `write` took 18.6 s without it, 19.7 with.
            "distributed.worker.profile.enabled": False,
            # distributed starts workers with MALLOC_TRIM_THRESHOLD_=65536, which also turns off glibc's
            # adaptive mmap threshold: every array over 128 kB is then mapped and page-faulted afresh.
            # Our tasks allocate many such arrays; unset, the 8-scene bench build's `write` took 13.2-13.7 s
            # instead of 17.2-18.0 s (arrays over 32 MB are still returned to the system on free).
            "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
        }
        with dask.config.set(settings):
            if self.name.startswith("tcp://"):
                try:
                    client = Client(self.name, timeout="10s")
                except OSError as exc:
                    raise SchedulerError(f"cannot reach the Dask scheduler at {self.name}: {exc}") from None
                with client:
                    client.register_plugin(GdalSettings(self.gdal_config), name=GdalSettings.name)
                    yield client
                return
            workers = self.parallelism
            key = (workers, self.allowed_failures)
            cluster = _LOCAL_CLUSTERS.get(key)
            if cluster is None or cluster.status.name != "running":
                # One cluster per process and size, reused by every stage of a build: starting worker
                # processes takes seconds. Closed when the process exits.
                cluster = LocalCluster(
                    n_workers=workers,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=":0",  # any free port: never clash with another cluster
                    silence_logs=40,
                )
                _LOCAL_CLUSTERS[key] = cluster
            with Client(cluster) as client:
                client.register_plugin(GdalSettings(self.gdal_config), name=GdalSettings.name)
                yield client

    def run_items(
        self,
        task: Callable[..., Any],
        items: Sequence[WorkItem],
        args: tuple[Any, ...],
        settle: Settle,
        *,
        label: str = "",
    ) -> None:
        """Run `task(item.payload, *args)` for every item, one task each, and call
        `settle(item, result, None)` (or `settle(item, None, error)`) on this process as each one finishes,
        in completion order, so the caller can checkpoint results while the others still run."""
        if not items:
            return
        if label and self.progress:
            print(f"{label}: {len(items)} tasks", flush=True)
        if self.distributed:
            self._run_items_distributed(task, items, args, settle, label)
        elif self.name == "synchronous":
            bar = _progress_bar(len(items), label, self.progress)
            for item in items:
                try:
                    result, error = call_with_config(task, self.gdal_config, item.payload, *args), None
                except Exception as exc:
                    result, error = None, exc
                settle(item, result, error)
                bar.update(1)
            bar.close()
        else:
            executor: Executor = (
                ThreadPoolExecutor(self.parallelism)
                if self.name == "threads"
                else ProcessPoolExecutor(self.parallelism)
            )
            with executor:
                self._settle_futures(
                    {
                        executor.submit(call_with_config, task, self.gdal_config, item.payload, *args): item
                        for item in items
                    },
                    settle,
                    label,
                )

    def _settle_futures(self, pending: dict[Any, WorkItem], settle: Settle, label: str) -> None:
        bar = _progress_bar(len(pending), label, self.progress)
        while pending:
            done, _ = wait_futures(list(pending), return_when=FIRST_COMPLETED)
            for future in done:
                item = pending.pop(future)
                error = future.exception()
                settle(item, None if error else future.result(), error)
                bar.update(1)
        bar.close()

    def _run_items_distributed(
        self,
        task: Callable[..., Any],
        items: Sequence[WorkItem],
        args: tuple[Any, ...],
        settle: Settle,
        label: str,
    ) -> None:
        from distributed import as_completed

        with self.client() as client:
            resources = _unpack_resources(client, label)
            futures = {
                client.submit(
                    call_with_config,
                    task,
                    self.gdal_config,
                    item.payload,
                    *args,
                    key=f"{label or 'task'}-{_key_safe(item.label)}-{k:06d}-{item.key}",
                    pure=False,
                    retries=1,  # after the task's own backoff: once more, maybe on another worker
                    resources=resources,
                ): item
                for k, item in enumerate(items)
            }
            bar = _progress_bar(len(futures), label, self.progress)
            for future in as_completed(list(futures)):
                item = futures[future]
                if future.status == "finished":
                    settle(item, future.result(), None)
                else:
                    error = future.exception() if future.status == "error" else None
                    settle(item, None, error or _Lost(f"task {future.key} was {future.status}"))
                bar.update(1)
            bar.close()

    def map(
        self,
        function: Callable[..., T],
        items: Sequence[Any],
        *args: Any,
        label: str = "",
        on_error: Callable[[Any, BaseException], T] | None = None,
    ) -> list[T]:
        """`[function(item, *args) for item in items]`, one Dask task per item, results in order.

        A task that raises (or, on a cluster, keeps killing its worker) becomes `on_error(item, exc)`
        when given, so one bad product cannot stop a stage; otherwise the stage stops with TaskFailed.
        """
        if not items:
            return []
        if label and self.progress:
            print(f"{label}: {len(items)} tasks", flush=True)
        if self.distributed:
            return self._map_distributed(function, items, args, on_error)
        return self._map_local(function, items, args, on_error)

    def _map_local(
        self,
        function: Callable[..., T],
        items: Sequence[Any],
        args: tuple[Any, ...],
        on_error: Callable[[Any, BaseException], T] | None,
    ) -> list[T]:
        # Ordered key names: local schedulers then run the tasks in item order (scene or shard order),
        # which keeps a resumed build's work predictable.
        tasks = [
            dask.delayed(_guarded, pure=False)(
                function, self.gdal_config, item, *args, dask_key_name=f"task-{k:09d}"
            )
            for k, item in enumerate(items)
        ]
        outcomes = self._compute_local(tasks)
        return [self._settle(item, outcome, on_error) for item, outcome in zip(items, outcomes, strict=True)]

    def _compute_local(self, tasks: list[Any]) -> list[Outcome]:
        with dask.config.set(scheduler=self.name, num_workers=self.parallelism):
            if self.progress:
                with ProgressBar(minimum=1.0, dt=0.5):
                    return list(dask.compute(*tasks))
            return list(dask.compute(*tasks))

    def _wait(self, futures: list[Any]) -> list[Outcome | None]:
        """Wait for the futures; each one's outcome, None for one that ended neither finished nor failed
        (cancelled or lost while workers restarted)."""
        from distributed import progress, wait

        if self.progress:
            progress(futures)
            print(flush=True)
        wait(futures)
        outcomes: list[Outcome | None] = []
        for future in futures:
            if future.status == "finished":
                outcomes.append(("ok", future.result()))
            elif future.status == "error":
                outcomes.append(("error", future.exception()))
            else:
                outcomes.append(None)
        return outcomes

    def _map_distributed(
        self,
        function: Callable[..., T],
        items: Sequence[Any],
        args: tuple[Any, ...],
        on_error: Callable[[Any, BaseException], T] | None,
    ) -> list[T]:
        outcomes: dict[int, Outcome] = {}
        with self.client() as client:
            pending = list(range(len(items)))
            # A future can end neither finished nor failed (cancelled or lost while workers restart);
            # such items are submitted again, a bounded number of times.
            for _ in range(3):
                futures = [
                    client.submit(call_with_config, function, self.gdal_config, items[k], *args, pure=False)
                    for k in pending
                ]
                lost = []
                for k, outcome in zip(pending, self._wait(futures), strict=True):
                    if outcome is None:
                        lost.append(k)
                    else:
                        outcomes[k] = outcome
                pending = lost
                if not pending:
                    break
            for k in pending:
                outcomes[k] = ("error", TaskFailed("task was cancelled or lost three times"))
        return [self._settle(items[k], outcomes[k], on_error) for k in range(len(items))]

    def map_then(
        self,
        first: Callable[..., T],
        first_items: Sequence[Any],
        then: Callable[..., T],
        then_items: Sequence[Any],
        after: Sequence[Sequence[int]],
        *args: Any,
        label: str = "",
    ) -> tuple[list[T], list[T]]:
        """`map(first, first_items, *args)` and `map(then, then_items, *args)`, where `then_items[j]`
        starts as soon as the first tasks `after[j]` are done (not after all of them), in one graph.
        A failure stops the stage (TaskFailed), as `map` does without `on_error`."""
        if len(after) != len(then_items):
            raise ValueError("after needs one entry per then-item")
        if label and self.progress:
            print(f"{label}: {len(first_items)} + {len(then_items)} tasks", flush=True)
        if not then_items:
            return self.map(first, first_items, *args), []
        if self.distributed:
            outcomes = self._map_then_distributed(first, first_items, then, then_items, after, args)
        else:
            outcomes = self._map_then_local(first, first_items, then, then_items, after, args)
        items = [*first_items, *then_items]
        results = [self._settle(item, outcome, None) for item, outcome in zip(items, outcomes, strict=True)]
        return results[: len(first_items)], results[len(first_items) :]

    def _map_then_local(
        self,
        first: Callable[..., Any],
        first_items: Sequence[Any],
        then: Callable[..., Any],
        then_items: Sequence[Any],
        after: Sequence[Sequence[int]],
        args: tuple[Any, ...],
    ) -> list[Outcome]:
        def guarded_after(item: Any, rest: tuple[Any, ...], *needed: Outcome) -> Any:
            failed = [value for kind, value in needed if kind == "error"]
            return ("error", failed[0]) if failed else _guarded(then, self.gdal_config, item, *rest)

        firsts = [
            dask.delayed(_guarded, pure=False)(
                first, self.gdal_config, item, *args, dask_key_name=f"task-{k:09d}"
            )
            for k, item in enumerate(first_items)
        ]
        thens = [
            dask.delayed(guarded_after, pure=False)(
                item, args, *[firsts[k] for k in after[j]], dask_key_name=f"then-{j:09d}"
            )
            for j, item in enumerate(then_items)
        ]
        return self._compute_local([*firsts, *thens])

    def _map_then_distributed(
        self,
        first: Callable[..., Any],
        first_items: Sequence[Any],
        then: Callable[..., Any],
        then_items: Sequence[Any],
        after: Sequence[Sequence[int]],
        args: tuple[Any, ...],
    ) -> list[Outcome]:
        with self.client() as client:
            firsts = [
                client.submit(call_with_config, first, self.gdal_config, item, *args, pure=False)
                for item in first_items
            ]
            thens = [
                client.submit(
                    _call_after,
                    then,
                    self.gdal_config,
                    item,
                    args,
                    *[firsts[k] for k in after[j]],
                    pure=False,
                )
                for j, item in enumerate(then_items)
            ]
            outcomes = self._wait([*firsts, *thens])
        settled = [outcome for outcome in outcomes if outcome is not None]
        if len(settled) < len(outcomes):
            # Cancelled or lost while workers restarted: run the graph once more, in two plain rounds
            # (every task is idempotent; finished ones rewrite the same bytes).
            first_results = self.map(first, first_items, *args)
            then_results = self.map(then, then_items, *args)
            return [("ok", r) for r in [*first_results, *then_results]]
        return settled

    @staticmethod
    def _settle(item: Any, outcome: Outcome, on_error: Callable[[Any, BaseException], Any] | None) -> Any:
        kind, value = outcome
        if kind == "ok":
            return value
        if on_error is not None:
            return on_error(item, value)
        raise TaskFailed(f"task for {describe(item)} failed: {type(value).__name__}: {value}") from value


class GdalSettings(WorkerPlugin):
    """A distributed worker plugin: every worker (a restarted one too) applies the build's GDAL
    configuration (cache size, threads, S3 endpoint) when it starts, before it runs a task."""

    name = "spectralearth-gdal"

    def __init__(self, config: tuple[tuple[str, str], ...]) -> None:
        self.config = config

    def setup(self, worker: Any) -> None:
        apply_gdal_config(dict(self.config))


class _Lost(ConnectionError):
    """A future that ended neither finished nor failed (cancelled, or lost while workers restarted)."""


def _key_safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)[-80:]


def _unpack_resources(client: Any, label: str) -> dict[str, float] | None:
    """`{"unpack": 1}` when every worker declares that resource, so one product-reading task runs per
    worker; None otherwise (an external cluster whose workers declare nothing: we say so and run
    unconstrained rather than wait forever for a resource no worker has)."""
    workers = client.scheduler_info().get("workers", {})
    if workers and all(UNPACK_RESOURCE in (w.get("resources") or {}) for w in workers.values()):
        return {UNPACK_RESOURCE: 1}
    # One thread per worker (our LocalCluster) already runs one task at a time. Tasks with resource
    # restrictions bypass the scheduler's queue (worker-saturation) and are assigned to workers eagerly,
    # so a product that kills its worker would also take the blame away from innocent queued tasks.
    if workers and any(w.get("nthreads", 1) > 1 for w in workers.values()):
        print(
            f"{label}: the cluster's workers declare no '{UNPACK_RESOURCE}' resource; tasks run "
            f'unconstrained (start workers with --resources "{UNPACK_RESOURCE}=1" to hold one unpacked '
            "product per worker)",
            flush=True,
        )
    return None


def _progress_bar(total: int, label: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=label or "tasks", disable=not enabled, mininterval=0.5, leave=False)


def _guarded(
    function: Callable[..., Any], config: tuple[tuple[str, str], ...], item: Any, *args: Any
) -> tuple[str, Any]:
    """A local-scheduler task: its outcome, so one failing item is reported per item, never swallowed."""
    try:
        return ("ok", call_with_config(function, config, item, *args))
    except Exception as exc:
        return ("error", exc)


def _call_after(
    function: Callable[..., T], config: tuple[tuple[str, str], ...], item: Any, args: tuple, *needed: Any
) -> T:
    """A task that runs after `needed` (their results only order it)."""
    return call_with_config(function, config, item, *args)
