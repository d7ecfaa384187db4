"""The manifest's `labels:` section: one validated `LabelSpec` per benchmark."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.errors import redact
from pipeline.manifest import Manifest, ManifestError
from pipeline.sections import check_keys
from pipeline.storage import is_remote
from pipeline.storage_settings import StorageError, refuse_credentials

LABELS_DIR = "labels"
STAGE_PREFIX = "labels-"
MAX_CODE = 65535  # uint16
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class LabelSourceError(ValueError):
    """A label source that cannot be used as configured (one line: what and why)."""


# Manifest section ---------------------------------------------------------------------------------


def _fraction(value: Any, key: str, *, allow_zero: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ManifestError(f"'{key}' must be a number in [0, 1], got {value!r}")
    if value > 1 or value < 0 or (not allow_zero and value == 0):
        raise ManifestError(f"'{key}' must be within {'[0' if allow_zero else '(0'}, 1], got {value!r}")
    return float(value)


def _code(value: Any, key: str, high: int | None = None) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < 0
        or (high is not None and value > high)
    ):
        bound = f"0..{high}" if high is not None else ">= 0"
        raise ManifestError(f"'{key}' must be an integer class code {bound}, got {value!r}")
    return value


def _source(source: Any, where: str) -> str:
    if not isinstance(source, str) or not source.strip():
        raise ManifestError(f"'{where}.source' must be a local path or an s3:// URI")
    try:
        refuse_credentials(source)
    except StorageError as exc:
        raise ManifestError(f"'{where}.source': {exc}") from None
    if is_remote(source) and not source.startswith("s3://"):
        raise ManifestError(f"'{where}.source' must be a local path or an s3:// URI, got {redact(source)!r}")
    return source


def _kind_and_attribute(kind: Any, attribute: Any, where: str) -> tuple[str, str | None]:
    if kind not in ("raster", "vector"):
        raise ManifestError(f"'{where}.kind' must be 'raster' or 'vector', got {kind!r}")
    if kind == "vector" and (not isinstance(attribute, str) or not attribute):
        raise ManifestError(f"'{where}.attribute' must name the column holding the class code (vector)")
    if kind == "raster" and attribute is not None:
        raise ManifestError(f"'{where}.attribute' applies to vector sources only; leave it null")
    return str(kind), attribute


def _class_pairs(remap: Any, where: str) -> list[tuple[int, int]]:
    """The `classes` remap as (source code, class) pairs; empty when there is none."""
    if remap is None:
        return []
    if not isinstance(remap, Mapping) or not remap:
        raise ManifestError(f"'{where}.classes' must be a mapping {{source code: class}} or null")
    return [
        (_code(code, f"{where}.classes key"), _code(cls_, f"{where}.classes.{code}", MAX_CODE))
        for code, cls_ in remap.items()
    ]


@dataclass(frozen=True, slots=True)
class LabelSpec:
    """One benchmark of the manifest's `labels:` section."""

    name: str
    source: str
    kind: str = "raster"  # raster | vector
    attribute: str | None = None  # vector: the column holding the class code
    classes: tuple[tuple[int, int], ...] = ()  # remap (source code, class); empty keeps source codes
    resampling: str = "nearest"  # nearest | mode
    min_labelled_fraction: float = 0.5
    multilabel_min_fraction: float | None = None

    KEYS = {
        "source",
        "kind",
        "attribute",
        "classes",
        "resampling",
        "min_labelled_fraction",
        "multilabel_min_fraction",
    }

    @classmethod
    def from_dict(cls, name: Any, raw: Any) -> LabelSpec:
        where = f"labels.{name}"
        if not isinstance(name, str) or _NAME.fullmatch(name) is None:
            raise ManifestError(
                f"'labels' names must be simple identifiers (letters, digits, _ . -), got {name!r}"
            )
        if not isinstance(raw, Mapping):
            raise ManifestError(f"'{where}' must be a mapping with at least 'source'")
        check_keys(raw, cls.KEYS, where)
        source = _source(raw.get("source"), where)
        kind, attribute = _kind_and_attribute(raw.get("kind", "raster"), raw.get("attribute"), where)
        resampling = raw.get("resampling", "nearest")
        if resampling not in ("nearest", "mode"):
            raise ManifestError(f"'{where}.resampling' must be 'nearest' or 'mode', got {resampling!r}")
        pairs = _class_pairs(raw.get("classes"), where)
        multilabel = raw.get("multilabel_min_fraction")
        return cls(
            name=name,
            source=source,
            kind=kind,
            attribute=attribute if kind == "vector" else None,
            classes=tuple(sorted(pairs)),
            resampling=resampling,
            min_labelled_fraction=_fraction(
                raw.get("min_labelled_fraction", 0.5), f"{where}.min_labelled_fraction"
            ),
            multilabel_min_fraction=None
            if multilabel is None
            else _fraction(multilabel, f"{where}.multilabel_min_fraction", allow_zero=False),
        )

    @property
    def multilabel(self) -> bool:
        return self.multilabel_min_fraction is not None

    @property
    def stage(self) -> str:
        return f"{STAGE_PREFIX}{self.name}"

    @property
    def table_path(self) -> str:
        return f"{LABELS_DIR}/{self.name}.parquet"

    @property
    def array_path(self) -> str:
        return f"{LABELS_DIR}/{self.name}"

    def settings(self) -> dict[str, Any]:
        """What the labels depend on besides the source's bytes and the dataset's rows."""
        return {
            "kind": self.kind,
            "attribute": self.attribute,
            "classes": [list(p) for p in self.classes],
            "resampling": self.resampling,
            "min_labelled_fraction": self.min_labelled_fraction,
            "multilabel_min_fraction": self.multilabel_min_fraction,
        }


def parse_labels(raw: Any) -> tuple[LabelSpec, ...]:
    """The manifest's `labels:` section (a mapping of benchmark name to settings; empty when absent)."""
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        raise ManifestError("'labels' must be a mapping of benchmark names to their settings")
    return tuple(LabelSpec.from_dict(name, value) for name, value in raw.items())


def spec_named(manifest: Manifest, name: str | None) -> list[LabelSpec]:
    """The manifest's benchmarks, or the one named (an error naming the known ones otherwise)."""
    specs = list(getattr(manifest, "labels", ()) or ())
    if not specs:
        raise LabelSourceError(f"{manifest.source} has no 'labels' section: nothing to label")
    if name is None:
        return specs
    chosen = [s for s in specs if s.name == name]
    if not chosen:
        raise LabelSourceError(
            f"no benchmark {name!r} in {manifest.source}'s labels (known: {', '.join(s.name for s in specs)})"
        )
    return chosen
