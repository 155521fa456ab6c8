"""A shared backbone on ONNX Runtime: the frozen layers run once per batch, each model's head
on the images routed to it.

Experts are fine-tuned from the global model with layers 0..F-1 frozen, so those layers are
byte-identical in every model (``camtrap-export share-backbone`` checks this and splits the
graphs: one ``backbone.onnx`` from the image to the tensors the later layers read, and one
head graph per model from those tensors to its output). Here:

- :class:`BackboneGraph` runs the backbone: a letterboxed NCHW batch in, the named feature
  tensors out;
- :class:`HeadEngine` is an ordinary :class:`~edge.engines.base.Engine` for one model whose
  file is a head: ``infer(images)`` runs backbone then head (so the self-test, classify and
  anything else that only knows engines work unchanged), and ``run_features(features)`` runs
  the head alone on features computed once, which ``edge.runner.CascadeRunner`` does.

Invariants: every head of a bundle holds the same ``BackboneGraph`` object (one session, one
copy of the weights); a head reads only the backbone outputs its manifest entry names; the
answer equals the whole model's (checked by ``share-backbone`` on the bundle's samples before
the bundle is written). TensorRT runs the same bundles with the features left on the GPU
(``TensorRTBackbone`` and ``TensorRTHeadEngine`` in edge/engines/tensorrt.py); the runner
treats both alike: ``backbone.run(batch)`` gives ``{name: rows}``, ``rows[idx]`` selects the
images routed to a head, and ``head.run_features`` takes them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edge.engines.base import Engine
from edge.engines.onnxruntime import OnnxRuntimeConfig, make_session
from edge.manifest import BackboneEntry, ModelEntry

log = logging.getLogger(__name__)


class BackboneGraph:
    """The shared frozen layers: images ``[N, 3, S, S]`` in, ``{name: features}`` out."""

    def __init__(self, path: str | Path, entry: BackboneEntry, config: OnnxRuntimeConfig) -> None:
        self.entry = entry
        self.path = Path(path)
        self._session, _, self.used_providers = make_session(self.path, config, "backbone")
        names = {o.name for o in self._session.get_outputs()}
        missing = set(entry.outputs) - names
        if missing:
            raise ValueError(f"{self.path}: the backbone graph lacks outputs {sorted(missing)} the manifest names")
        inp = self._session.get_inputs()[0]
        self.input_name = inp.name
        if inp.name != entry.input_name:  # as for whole models: the graph's own name is what binds
            log.info("backbone: input is named %r, the manifest says %r; using the graph's", inp.name,
                     entry.input_name)
        dims, want = list(inp.shape), (3, *entry.input_hw)
        if len(dims) != 4 or any(isinstance(d, int) and d != w for d, w in zip(dims[1:], want, strict=True)):
            # before any run: a warm-up at a size the graph cannot take fails in ONNX Runtime, or
            # allocates first (an absurd size: tens of GB)
            raise ValueError(f"{self.path}: the backbone's input {dims} does not match the manifest's "
                             f"[N, {', '.join(map(str, want))}]")
        self.last_ms = 0.0

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        outs = self._session.run(self.entry.outputs, {self.input_name: np.ascontiguousarray(batch, np.float32)})
        return dict(zip(self.entry.outputs, outs, strict=True))


class HeadEngine(Engine):
    """One model whose bundle file is a head graph over a shared :class:`BackboneGraph`."""

    backend = "onnxruntime"
    config_class = OnnxRuntimeConfig
    requires = ("onnxruntime",)
    config: OnnxRuntimeConfig

    def __init__(self, model_path: str | Path, entry: ModelEntry, config: OnnxRuntimeConfig,
                 backbone: BackboneGraph) -> None:
        super().__init__(model_path, entry, config)
        if not entry.head_inputs:
            raise ValueError(f"model {entry.name!r} is a whole model, not a head graph")
        self.backbone = backbone
        self._session, self.providers, self.used_providers = make_session(self.model_path, config, entry.name)
        have = {i.name for i in self._session.get_inputs()}
        if have != set(entry.head_inputs):
            raise ValueError(f"{self.model_path}: head {entry.name!r} takes {sorted(have)}, the manifest says "
                             f"{sorted(entry.head_inputs)}")
        self.output_name = self._session.get_outputs()[0].name
        self.warmup()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "providers": self.used_providers, "shared_backbone": str(self.backbone.path)}

    def run_features(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        """The head alone on backbone features (a batch, or any subset of its rows)."""
        out = self._session.run([self.output_name], {k: features[k] for k in self.entry.head_inputs})[0]
        return np.asarray(out, dtype=np.float32)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self.run_features(self.backbone.run(batch))

    def close(self) -> None:
        self._session = None
        super().close()
