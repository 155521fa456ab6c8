"""One interface for every inference backend, its typed config, and the backend registry.

Each backend lives in its own module (onnxruntime.py, tensorrt.py) with one Engine subclass
and one config class whose ``type`` is a Literal naming the backend, so a config file's
engine section is validated by the backend that will use it (extra keys are errors). A
backend's runtime (onnxruntime, tensorrt, pycuda) is imported only when one of its engines
is built, so the registry itself is cheap to import on any machine.

The contract every engine keeps, whatever runs underneath:
- built from (model file, manifest ModelEntry, config); a warm-up inference runs when it is
  built, so the first real image is not the one that pays for kernel selection;
- ``infer(batch)`` takes NCHW float32 ``[N, 3, H, W]`` ((H, W) = entry.input_hw: a square
  S x S, or a rectangle for a model exported at the camera's aspect) and returns the
  model's first output as float32 ``[N, ...]``, in the layout the manifest names; batches
  larger than ``max_batch`` are split and the results concatenated;
- ``close()`` releases it; an engine is also a context manager.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Union

import numpy as np
from pydantic import BeforeValidator, ConfigDict, Field, ValidationError

from edge.configpath import ConfigPath
from edge.detection import Detection, iou
from edge.manifest import ModelEntry
from edge.numbers import NoBoolNumbers


class EngineConfig(NoBoolNumbers):
    """Settings every backend shares; a backend's config adds its own fields and ``type``."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(title="Backend", description="which backend runs the models")
    max_batch: int = Field(
        default=4, ge=1, le=1024, title="Largest batch per run",
        description="burst frames per inference; bigger batches are split; TensorRT also sizes its "
        "optimisation profile and buffers on it",
    )
    cache_dir: ConfigPath | None = Field(
        default=None, title="Engine cache",
        description="where the backend keeps what it builds from the ONNX (TensorRT plans and timing cache; "
        "the TensorRT provider's engines). The device config defaults it to <state_dir>/engines",
    )
    warmup_runs: int = Field(
        default=1, ge=0, le=100, title="Warm-up inferences",
        description="run when the engine is built so the first real image does not pay for the start-up",
    )


class Engine(ABC):
    """A loaded model that turns image batches into raw output batches."""

    backend: ClassVar[str] = ""
    config_class: ClassVar[type[EngineConfig]] = EngineConfig
    requires: ClassVar[tuple[str, ...]] = ()  # top-level modules the backend imports at build time

    def __init__(self, model_path: str | Path, entry: ModelEntry, config: EngineConfig) -> None:
        self.model_path = Path(model_path)
        self.entry = entry
        self.config = config
        self.output_shape: tuple[int, ...] | None = None  # one image's output, known after a run
        self._closed = False

    # --- what callers see ----------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """One image's input, (3, H, W); the batch dimension is free up to ``max_batch``."""
        return (3, *self.entry.input_hw)

    @property
    def max_batch(self) -> int:
        return self.config.max_batch

    def infer(self, batch: np.ndarray) -> np.ndarray:
        if self._closed:
            raise RuntimeError(f"engine {self.name!r} ({self.backend}) is closed")
        x = np.asarray(batch)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"engine {self.name!r}: expected a [N, {', '.join(map(str, self.input_shape))}] batch, "
                f"got shape {list(x.shape)}"
            )
        x = np.ascontiguousarray(x, dtype=np.float32)
        n = x.shape[0]
        if n == 0:
            if self.output_shape is None:
                raise ValueError(f"engine {self.name!r}: empty batch before any inference")
            return np.empty((0, *self.output_shape), np.float32)
        mb = self.max_batch
        outs = [self._checked_run(x[i:i + mb]) for i in range(0, n, mb)]
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def warmup(self) -> None:
        """Run ``warmup_runs`` inferences on a blank image (also learns the output shape)."""
        x = np.full((1, *self.input_shape), 114 / 255, np.float32)  # the letterbox grey
        for _ in range(self.config.warmup_runs):
            self._checked_run(x)

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> dict[str, Any]:
        """What a status line or the self-test prints about this engine."""
        return {"name": self.name, "backend": self.backend, "max_batch": self.max_batch,
                "input": list(self.input_shape), "output": list(self.output_shape or [])}

    @classmethod
    def is_available(cls) -> bool:
        """Can this backend's runtime be imported here? (checked without importing it)"""
        try:
            return all(importlib.util.find_spec(m) is not None for m in cls.requires)
        except (ImportError, ValueError):
            return False

    # --- what a backend implements ---------------------------------------------------------------
    @abstractmethod
    def _run(self, batch: np.ndarray) -> np.ndarray:
        """One contiguous float32 batch of at most ``max_batch`` images -> the first output."""

    def _checked_run(self, batch: np.ndarray) -> np.ndarray:
        out = np.asarray(self._run(batch), dtype=np.float32)
        if out.ndim < 2 or out.shape[0] != batch.shape[0]:
            raise RuntimeError(f"engine {self.name!r}: output {list(out.shape)} for a batch of {batch.shape[0]}")
        self.output_shape = tuple(out.shape[1:])
        return out


# --- registry ---------------------------------------------------------------------------------

_REGISTRY: dict[str, type[Engine]] = {}


def register(cls: type[Engine]) -> type[Engine]:
    """Class decorator: make a backend available under ``cls.backend``."""
    if not cls.backend:
        raise TypeError(f"{cls.__name__} has no backend key")
    default_type = cls.config_class.model_fields["type"].default
    if default_type != cls.backend:
        raise TypeError(f"{cls.__name__}: config type {default_type!r} differs from backend {cls.backend!r}")
    _REGISTRY[cls.backend] = cls
    return cls


def registered_backends() -> list[str]:
    return sorted(_REGISTRY)


def available_backends() -> list[str]:
    """Registered backends whose runtime is installed on this machine."""
    return [k for k in sorted(_REGISTRY) if _REGISTRY[k].is_available()]


def engine_class(backend: str) -> type[Engine]:
    try:
        return _REGISTRY[backend]
    except KeyError:
        raise ValueError(f"unknown engine backend {backend!r} (known: {', '.join(sorted(_REGISTRY))})") from None


def config_union(default: str) -> Any:
    """The type of a config's ``engine:`` section: every registered backend's config class, told
    apart by its ``type`` (a pydantic discriminated union, as Frigate's detector plugins are), so a
    config file is validated by the class the engine itself is built from. ``type`` may be left
    out for ``default``. Call it after every backend module is imported (edge/engines/__init__.py)."""
    classes = tuple(cls.config_class for cls in _REGISTRY.values())

    def default_type(value: Any) -> Any:
        if isinstance(value, Mapping) and "type" not in value:
            return {"type": default, **value}
        return value

    union = classes[0] if len(classes) == 1 else Union[classes]  # noqa: UP007 - built at run time
    return Annotated[union, Field(discriminator="type"), BeforeValidator(default_type)]


def make_config(backend: str, **cfg: Any) -> EngineConfig:
    """The backend's typed config from keyword settings; one clear line per bad field."""
    cls = engine_class(backend)
    cfg.setdefault("type", backend)
    try:
        return cls.config_class(**cfg)
    except ValidationError as e:
        errs = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()[:3])
        raise ValueError(f"{backend} engine config: {errs}") from None


def create_engine(backend: str, model_path: str | Path, entry: ModelEntry, *,
                  runtime: Mapping[str, Any] | None = None, **cfg: Any) -> Engine:
    """Build one engine. ``cfg`` are config fields; ``runtime`` holds backend-specific objects
    that are not settings (TensorRT: ``calibration`` images, injected ``trt``/``cuda`` modules)."""
    cls = engine_class(backend)
    return cls(model_path, entry, make_config(backend, **cfg), **dict(runtime or {}))


# --- contract check shared by the self-test and the INT8 gate -------------------------------------


def compare_detections(expected: Sequence[Detection], got: Sequence[Detection], *, min_iou: float = 0.9,
                       score_tol: float = 0.02, thresholds: Mapping[str, float] | None = None,
                       ) -> list[str]:
    """Differences between two detection lists of one image; [] means they agree.

    Each expected box (best first) claims the unclaimed box of the same species that overlaps
    it most; it must overlap by ``min_iou`` and score within ``score_tol``. With
    ``thresholds`` (species -> floor), a box within ``score_tol`` of its floor may be missing
    on either side: a tiny numeric difference can legitimately move it across the floor.
    """
    problems: list[str] = []
    left = list(got)

    def near_floor(d: Detection) -> bool:
        return thresholds is not None and d.score < thresholds.get(d.species, 0.0) + score_tol

    def fmt(d: Detection) -> str:
        return f"{d.species} {d.score:.3f} at [{', '.join(f'{v:.0f}' for v in d.box)}]"

    for e in sorted(expected, key=lambda d: -d.score):
        same = [g for g in left if g.species == e.species]
        if not same:
            if not near_floor(e):
                problems.append(f"missing {fmt(e)}")
            continue
        best = max(same, key=lambda g: iou(e.box, g.box))
        overlap = iou(e.box, best.box)
        if overlap < min_iou:
            if not near_floor(e):
                problems.append(f"missing {fmt(e)} (closest {fmt(best)}, IoU {overlap:.2f})")
            continue
        left.remove(best)
        if abs(best.score - e.score) > score_tol:
            problems.append(f"score of {fmt(e)} is {best.score:.3f} (tolerance {score_tol})")
    problems.extend(f"unexpected {fmt(g)}" for g in left if not near_floor(g))
    return problems
