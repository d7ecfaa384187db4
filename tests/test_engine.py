"""The stage engine tells a product's fault from a fault of the code: a bug fails the stage, naming it,
and rejects nothing; a product's own error is its rejection."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipeline.engine import (
    ItemStage,
    RetryPolicy,
    TaskError,
    WorkItem,
    checkpoint_path,
    run_items,
    with_retries,
)
from pipeline.errors import InternalError, StageFailed
from pipeline.scheduler import Scheduler
from pipeline.storage import BuildStore

NO_WAIT = RetryPolicy(delays=())


@dataclass(frozen=True)
class Scene:
    scene_id: str


def product_task(payload: Scene) -> str:
    if payload.scene_id == "bad-product":
        raise ValueError("the cube holds 223 bands, the metadata 224")
    if payload.scene_id == "bug":
        raise AttributeError("'GridSettings' object has no attribute 'spec'")
    return f"masked {payload.scene_id}"


def stage() -> ItemStage:
    return ItemStage(
        name="demo-stage",
        task=product_task,
        task_args=(),
        encode=lambda result: result,
        decode=lambda raw: raw,
        on_failure=lambda item, reason: f"rejected {item.label}: {reason}",
    )


@pytest.mark.parametrize("error", [AttributeError, NameError, TypeError, ImportError, AssertionError])
def test_a_code_fault_is_raised_not_returned_as_a_rejection(error: type[Exception]) -> None:
    def buggy(payload: Scene) -> str:
        raise error("boom")

    with pytest.raises(
        InternalError, match=rf"scene-1: internal error, not a fault of the product: {error.__name__}"
    ):
        with_retries(buggy, NO_WAIT, Scene("scene-1"))


def test_a_product_error_is_returned_for_its_rejection() -> None:
    assert with_retries(product_task, NO_WAIT, Scene("bad-product")) == TaskError(
        "bad-product", "ValueError: the cube holds 223 bands, the metadata 224"
    )


def test_a_bug_fails_the_stage_and_rejects_nothing(tmp_path: Path) -> None:
    store = BuildStore(str(tmp_path / "build"))
    items = [WorkItem(name, name, Scene(name)) for name in ("good", "bad-product", "bug")]
    scheduler = Scheduler("synchronous", progress=False, retry=NO_WAIT)
    with pytest.raises(StageFailed, match="bug: .*internal error.*AttributeError"):
        run_items(store, stage(), items, scheduler)
    # the finished items are saved; the bug's item has no checkpoint, so a rerun with fixed code does it
    assert store.read_json(checkpoint_path("demo-stage", "good")) == "masked good"
    assert store.read_json(checkpoint_path("demo-stage", "bad-product")).startswith("rejected bad-product")
    assert not store.exists(checkpoint_path("demo-stage", "bug"))


def test_without_the_bug_every_item_finishes(tmp_path: Path) -> None:
    store = BuildStore(str(tmp_path / "build"))
    items = [WorkItem(name, name, Scene(name)) for name in ("good", "bad-product")]
    done: Any = run_items(store, stage(), items, Scheduler("synchronous", progress=False, retry=NO_WAIT))
    assert done.results == {
        "good": "masked good",
        "bad-product": "rejected bad-product: ValueError: the cube holds 223 bands, the metadata 224",
    }
