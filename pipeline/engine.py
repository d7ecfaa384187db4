"""The stage engine: the one driver every per-item stage runs through.

A stage hands the engine its items (scenes, sources, shards), each keyed by the content of everything it
depends on (`WorkItem.key`), and a task function. The engine owns what every stage needs the same way:
- reuse: an item whose checkpoint (`_work/<stage>/<key>.json`) exists, decodes and still holds (the
  stage's `still_valid`) is not done again, so nothing stale is reused (a new key means new work) and a
  killed stage resumes where it stopped;
- checkpoints: each result is saved on the driver as it finishes (`as_completed`), atomically;
- faults: a task retries transient faults itself with backoff (`pipeline.errors.is_transient`); one that
  persists fails the stage (`StageFailed`) after every other item has finished and been saved, and is never
  recorded as a rejection. A product property is a `Rejection` *returned* by the task; an unexpected error
  that is not transient, or a product that kills its worker on every try, becomes a rejection too, since a
  retry would repeat it;
- records: the stage's summary record once its outputs are written.
The Dask wiring (futures, retries, worker resources) stays in `pipeline.scheduler.Scheduler`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import (
    BuildFault,
    InternalError,
    StageFailed,
    TransientError,
    is_code_fault,
    is_transient,
    one_line,
)
from pipeline.storage import BuildStore, canonical_json
from pipeline.storage_settings import clear_gdal_network_cache

WORK_DIR = "_work"


def checkpoint_path(stage: str, key: str) -> str:
    return f"{WORK_DIR}/{stage}/{key}.json"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Backoff between tries of a task that hit a transient fault (seconds): about half a minute in all,
    enough to ride out a restarting object store or a brief network outage."""

    delays: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)

    def __post_init__(self) -> None:
        if any(d < 0 for d in self.delays):
            raise ValueError("retry delays must be >= 0")


DEFAULT_RETRY = RetryPolicy()


@dataclass(frozen=True, slots=True)
class TaskError:
    """A task that raised an error that is not transient (returned, not raised, so it is not retried)."""

    label: str
    reason: str


def with_retries(function: Callable[..., Any], retry: RetryPolicy, payload: Any, *args: Any) -> Any:
    """Run one task: transient faults are retried with backoff and, if they persist, raised as
    `TransientError`; any other error is returned as a `TaskError` (a retry would repeat it)."""
    attempt = 0
    while True:
        try:
            return function(payload, *args)
        except BuildFault:
            raise
        except Exception as exc:
            if is_code_fault(exc):
                raise InternalError(
                    f"{describe(payload)}: internal error, not a fault of the product: "
                    f"{type(exc).__name__}: {one_line(exc)}"
                ) from exc
            if not is_transient(exc):
                return TaskError(describe(payload), f"{type(exc).__name__}: {one_line(exc)}")
            if attempt >= len(retry.delays):
                raise TransientError(
                    f"{describe(payload)}: {type(exc).__name__}: {one_line(exc)} "
                    f"(still failing after {attempt + 1} tries)"
                ) from None
            time.sleep(retry.delays[attempt])
            clear_gdal_network_cache()  # GDAL remembers a failed remote file: forget it before the retry
            attempt += 1


def describe(payload: Any) -> str:
    """A short label of a task's payload for messages: its scene id or URI when it has one."""
    for attribute in ("scene_id", "uri", "label"):
        if hasattr(payload, attribute):
            return str(getattr(payload, attribute))
    if isinstance(payload, tuple) and payload:
        return describe(payload[0])
    if hasattr(payload, "shard"):  # write's ShardJob
        return f"shard {payload.shard}"
    return type(payload).__name__


@dataclass(frozen=True, slots=True)
class WorkItem:
    """One unit of a stage's work. `key` is the content key (same key, same result)."""

    key: str
    label: str
    payload: Any


@dataclass(frozen=True)
class ItemStage:
    """What a per-item stage gives the engine."""

    name: str
    task: Callable[..., Any]  # module-level function(payload, *task_args) -> result
    task_args: tuple[Any, ...]
    encode: Callable[[Any], Any]  # result -> JSON-able
    decode: Callable[[Any], Any]  # JSON-able -> result (raises on a bad checkpoint)
    on_failure: Callable[[WorkItem, str], Any]  # a product that failed unexpectedly -> its Rejection
    still_valid: Callable[[WorkItem, Any], bool] = field(default=lambda item, result: True)


@dataclass
class ItemResults:
    """What the engine did for a stage's items: every result by key, and how many were reused."""

    results: dict[str, Any]
    reused: int
    done: int


def _load_checkpoints(store: BuildStore, stage: ItemStage, items: Sequence[WorkItem]) -> dict[str, Any]:
    """The saved results of these items that decode and still hold; a corrupt one is redone."""
    wanted = {store.path(checkpoint_path(stage.name, item.key)): item for item in items}
    folder = store.path(f"{WORK_DIR}/{stage.name}")
    try:
        present = set(store.fs.find(folder)) if store.fs.exists(folder) else set()
    except FileNotFoundError:
        present = set()
    # Listing may return paths without the protocol; compare by stripped form.
    stripped = {p.rstrip("/") for p in present}
    paths = [p for p in wanted if p in stripped]
    found: dict[str, Any] = {}
    if not paths:
        return found
    contents = store.cat_many(paths)
    for path, raw in contents.items():
        item = wanted[path]
        try:
            result = stage.decode(json.loads(raw))
        except Exception as exc:  # a corrupt checkpoint is redone, never trusted
            print(f"{stage.name}: redoing {item.label}: its checkpoint is unreadable ({one_line(exc)})")
            continue
        if stage.still_valid(item, result):
            found[item.key] = result
        else:
            print(f"{stage.name}: redoing {item.label}: its output is missing or changed")
    return found


def run_items(
    store: BuildStore,
    stage: ItemStage,
    items: Sequence[WorkItem],
    scheduler: Any,
    *,
    force: bool = False,
    label: str = "",
) -> ItemResults:
    """Every item's result: reused from its checkpoint, or computed (one task each) and checkpointed as
    it finishes. Raises StageFailed when transient faults persisted for some items; the others are saved."""
    keys = [item.key for item in items]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{stage.name}: two items share a content key")
    results = {} if force else _load_checkpoints(store, stage, items)
    reused = len(results)
    todo = [item for item in items if item.key not in results]
    failures: list[str] = []

    def settle(item: WorkItem, outcome: Any, error: BaseException | None) -> None:
        if error is not None:
            if isinstance(error, BuildFault | InternalError) or (
                is_transient(error) and type(error).__name__ != "KilledWorker"
            ):
                failures.append(f"{item.label}: {one_line(error)}")
                return
            reason = (
                "worker process died on every try: the product keeps killing workers"
                if type(error).__name__ == "KilledWorker"
                else f"{type(error).__name__}: {one_line(error)}"
            )
            outcome = stage.on_failure(item, reason)
        elif isinstance(outcome, TaskError):
            outcome = stage.on_failure(item, outcome.reason)
        store.write_json(checkpoint_path(stage.name, item.key), stage.encode(outcome))
        results[item.key] = outcome

    task = functools.partial(with_retries, stage.task, scheduler.retry)
    scheduler.run_items(task, todo, stage.task_args, settle, label=label or stage.name)
    if failures:
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise StageFailed(
            f"{stage.name}: {len(failures)} item(s) failed on a fault of the environment, the build or the "
            f"code, not of the product (nothing was rejected; finished items are saved, rerun to resume): "
            f"{failures[0]}{more}"
        )
    return ItemResults(results, reused, len(todo))


def prune_checkpoints(store: BuildStore, stage: str, keep: Iterable[str]) -> None:
    """Remove the checkpoints of items that are no longer part of the stage (other content, other
    configuration), so `_work/` does not grow without bound across incremental builds."""
    folder = store.path(f"{WORK_DIR}/{stage}")
    if not store.fs.exists(folder):
        return
    wanted = {store.path(checkpoint_path(stage, key)).rstrip("/") for key in keep}
    stale = [p for p in store.fs.find(folder) if p.rstrip("/") not in wanted]
    if stale:
        store.fs.rm(stale)


@dataclass(frozen=True, slots=True)
class StageResult:
    """What a stage reports: its counts, and whether it found everything up to date."""

    counts: dict[str, Any]
    skipped: bool


def up_to_date(
    store: BuildStore,
    stage: str,
    config_hash: str,
    input_fingerprint: str,
    outputs_valid: Callable[[], bool],
    force: bool = False,
) -> StageResult | None:
    """The previous result when the stage ran with this configuration on these inputs and its outputs
    still validate; None when it must run (a corrupt or missing output makes it run again)."""
    if force:
        return None
    try:
        previous = store.read_stage_record(stage)
    except Exception as exc:
        if is_transient(exc):
            raise
        print(f"{stage}: its stage record is unreadable ({one_line(exc)}); running it again")
        return None
    if (
        not isinstance(previous, dict)
        or previous.get("config_hash") != config_hash
        or previous.get("input_fingerprint") != input_fingerprint
        or not isinstance(previous.get("counts"), dict)
    ):
        return None
    try:
        valid = outputs_valid()
    except Exception as exc:
        if is_transient(exc):
            raise
        valid = False
    if not valid:
        print(f"{stage}: an output is missing or corrupt; running the stage again")
        return None
    return StageResult(previous["counts"], skipped=True)


def content_key(*parts: Any) -> str:
    """The content key of an item: a stable hash of everything it depends on (canonical JSON)."""
    return hashlib.sha256(canonical_json(list(parts)).encode()).hexdigest()[:24]
