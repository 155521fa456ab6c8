"""Inference engines behind one interface (base.py), one module per backend.

Importing this package registers every backend but loads no runtime: onnxruntime is imported
when an ONNX Runtime engine is built, tensorrt and pycuda only inside a TensorRT engine's thread.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

from edge.engines import onnxruntime as _onnxruntime  # noqa: F401  (registers "onnxruntime")
from edge.engines import tensorrt as _tensorrt  # noqa: F401  (registers "tensorrt")
from edge.engines.base import (
    Engine,
    EngineConfig,
    available_backends,
    compare_detections,
    config_union,
    create_engine,
    engine_class,
    make_config,
    register,
    registered_backends,
)
from edge.engines.tensorrt import TensorRTConfig

if TYPE_CHECKING:
    from edge.bundle import Bundle
    from edge.detection import Detection
    from edge.manifest import ModelEntry
    from edge.vision import Letterbox

    EngineSettings: TypeAlias = EngineConfig  # statically: some backend's config
else:
    EngineSettings = config_union(default="onnxruntime")
    """The device config's ``engine:`` section: exactly the config classes the backends are built from."""

__all__ = [
    "Engine", "EngineConfig", "EngineSettings", "available_backends", "compare_detections", "create_engine",
    "detect_batch", "engine_class", "load_engines", "make_config", "read_samples", "register", "registered_backends",
]


def read_samples(bundle: Bundle) -> list[np.ndarray]:
    """The bundle's sample images as BGR arrays, in manifest order."""
    import cv2

    images = []
    for sample, path in zip(bundle.manifest.samples, bundle.sample_paths(), strict=True):
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            raise ValueError(f"{bundle.source}: {sample.file}: unreadable sample image")
        images.append(img)
    return images


def detect_batch(raw: np.ndarray, entry: ModelEntry, letterboxes: list[Letterbox]) -> list[list[Detection]]:
    """A raw output batch -> detections per image at the model's own thresholds.

    This is how a bundle's expected sample outputs are made (export/bundle.py), so the
    self-test and the INT8 gate judge engines the same way.
    """
    from edge.vision import decode

    conf = {c: entry.threshold(c) for c in entry.classes}
    return [decode(raw[i], entry.layout, entry.classes, lb, conf=conf, iou=entry.iou_threshold, model=entry.name)
            for i, lb in enumerate(letterboxes)]


def load_engines(bundle: Bundle, backend: str | EngineConfig = "onnxruntime", *,
                 runtime: Mapping[str, Any] | None = None, only: Sequence[str] | None = None,
                 **cfg: Any) -> dict[str, Engine]:
    """One engine per model of ``bundle``, by model name; all closed again if any fails.

    ``backend`` is a backend's config (the device config's ``engine:`` section) or its name, then
    ``cfg`` are that backend's config fields (e.g. ``precision="int8"``, ``cache_dir=...``).
    ``only``: build just these models (by name), e.g. the global model for a tool that needs no other.
    TensorRT INT8 calibrates on the bundle's samples and must pass the accuracy gate
    against FP16 on them, or loading fails with the gate's findings.

    A shared-backbone bundle (heads over ``manifest.backbone``) gets one backbone for all its
    heads, on ONNX Runtime (edge/engines/shared.py) or TensorRT (``TensorRTBackbone``: the
    features stay on the GPU); each engine of a head has it as ``engine.backbone``.
    """
    if isinstance(backend, EngineConfig):
        if cfg:
            raise TypeError("give the engine settings either as a config or as keywords, not both")
        config = backend
    else:
        config = make_config(backend, **cfg)  # validate once, before anything is built
    int8 = config if isinstance(config, TensorRTConfig) and config.precision == "int8" else None
    if int8 and any(e.head_inputs for e in bundle.manifest.models):
        raise ValueError(f"{bundle.source}: INT8 is not supported for a shared-backbone bundle (the heads' "
                         "calibration would need the backbone's features); use fp16 or a bundle of whole models")
    images = read_samples(bundle) if int8 else []
    if int8 and not images:
        raise ValueError(f"{bundle.source}: INT8 needs the bundle's sample images for calibration; it has none")
    engines: dict[str, Engine] = {}
    backbone: Any = None
    try:
        for entry in bundle.manifest.models:
            if only is not None and entry.name not in only:
                continue
            path = bundle.model_path(entry.name)
            if entry.head_inputs:  # a head over the shared backbone, built once for all heads
                bb = bundle.manifest.backbone
                if bb is None:
                    raise ValueError(f"{bundle.source}: model {entry.name!r} is a head graph but the bundle has "
                                     "no backbone")
                if isinstance(config, TensorRTConfig):
                    from edge.engines.tensorrt import TensorRTBackbone, TensorRTHeadEngine

                    if backbone is None:
                        backbone = TensorRTBackbone(bundle.root / bb.file, bb, config, **dict(runtime or {}))
                    engines[entry.name] = TensorRTHeadEngine(path, entry, config, backbone, **dict(runtime or {}))
                    continue
                from edge.engines.onnxruntime import OnnxRuntimeConfig
                from edge.engines.shared import BackboneGraph, HeadEngine

                if not isinstance(config, OnnxRuntimeConfig):
                    raise ValueError(f"{bundle.source}: model {entry.name!r} is a head over a shared backbone, "
                                     f"which the {config.type} backend cannot run; use onnxruntime or tensorrt")
                if backbone is None:
                    backbone = BackboneGraph(bundle.root / bb.file, bb, config)
                engines[entry.name] = HeadEngine(path, entry, config, backbone)
                continue
            if int8:
                from edge.engines.tensorrt import build_gated_int8
                from edge.vision import letterbox_batch

                x, lbs = letterbox_batch(images, entry.imgsz)
                engines[entry.name], _ = build_gated_int8(
                    path, entry, int8, calibration=x, check=x,
                    decode=functools.partial(detect_batch, entry=entry, letterboxes=lbs),
                    thresholds={c: entry.threshold(c) for c in entry.classes}, **dict(runtime or {}),
                )
            else:
                engines[entry.name] = engine_class(config.type)(path, entry, config, **dict(runtime or {}))
    except BaseException:
        for e in engines.values():
            e.close()
        if backbone is not None and not any(getattr(e, "backbone", None) is backbone for e in engines.values()):
            getattr(backbone, "close", lambda: None)()  # built, but no head holds it yet
        raise
    return engines
