"""ONNX Runtime backend: any CPU; CUDA or TensorRT execution providers where installed and asked.

The input name and batch dimension are read from the session, not assumed: a model exported
with a fixed batch still works (chunks are padded to it), a dynamic one takes any chunk.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from edge.engines.base import Engine, EngineConfig, register
from edge.manifest import ModelEntry

log = logging.getLogger(__name__)

Provider = Literal["cpu", "cuda", "tensorrt"]
_PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


class OnnxRuntimeConfig(EngineConfig):
    type: Literal["onnxruntime"] = "onnxruntime"
    providers: list[Provider] = Field(
        default_factory=lambda: ["cpu"], min_length=1, title="Execution providers, in order of preference",
        description="cpu always works; cuda/tensorrt are used when this onnxruntime build has them, "
        "otherwise skipped with a warning (the CPU provider is always the last fallback)",
    )
    intra_op_threads: int = Field(
        default=0, ge=0, le=256, title="Threads per operator",
        description="0 lets ONNX Runtime choose (one per core); set lower to leave cores to the daemon",
    )
    fp16: bool = Field(default=True, title="FP16 in the TensorRT provider", description="only for tensorrt")
    trt_cache_dir: Path | None = Field(
        default=None, title="TensorRT provider engine cache",
        description="where the tensorrt provider keeps its built engines; None disables its cache",
    )


@register
class OnnxRuntimeEngine(Engine):
    backend = "onnxruntime"
    config_class = OnnxRuntimeConfig
    requires = ("onnxruntime",)
    config: OnnxRuntimeConfig

    def __init__(self, model_path: str | Path, entry: ModelEntry, config: OnnxRuntimeConfig) -> None:
        super().__init__(model_path, entry, config)
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if config.intra_op_threads:
            opts.intra_op_num_threads = config.intra_op_threads
        self.providers = self._providers(ort.get_available_providers())
        try:
            self._session = ort.InferenceSession(str(self.model_path), sess_options=opts,
                                                 providers=self.providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise ValueError(f"{self.model_path}: ONNX Runtime cannot load model {entry.name!r}: {e}") from None
        inp = self._session.get_inputs()[0]
        self.input_name = inp.name
        if inp.name != entry.input_name:
            log.info("%s: input is named %r, the manifest says %r; using the model's", entry.name, inp.name,
                     entry.input_name)
        dims = list(inp.shape)
        if len(dims) != 4 or any(isinstance(d, int) and d != want for d, want in zip(dims[1:], self.input_shape,
                                                                                    strict=True)):
            raise ValueError(f"{self.model_path}: model {entry.name!r} input {dims} does not match the "
                             f"manifest's [N, {', '.join(map(str, self.input_shape))}]")
        self.static_batch = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else None
        self.output_name = self._session.get_outputs()[0].name
        self.warmup()

    def _providers(self, available: list[str]) -> list:
        chosen: list = []
        for p in self.config.providers:
            name = _PROVIDER_NAMES[p]
            if name not in available:
                log.warning("%s: ONNX Runtime here lacks %s; skipping it", self.entry.name, name)
                continue
            if p == "tensorrt":
                opts: dict = {"trt_fp16_enable": self.config.fp16}
                if self.config.trt_cache_dir:
                    opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(self.config.trt_cache_dir),
                                trt_timing_cache_enable=True)
                chosen.append((name, opts))
            elif name not in chosen:
                chosen.append(name)
        if "CPUExecutionProvider" not in chosen:
            chosen.append("CPUExecutionProvider")
        return chosen

    @property
    def max_batch(self) -> int:
        return self.static_batch or self.config.max_batch

    def _run(self, batch: np.ndarray) -> np.ndarray:
        n = batch.shape[0]
        if self.static_batch and n < self.static_batch:  # fixed-batch export: pad, then drop the padding
            pad = np.zeros((self.static_batch - n, *batch.shape[1:]), batch.dtype)
            batch = np.concatenate([batch, pad])
        out = self._session.run([self.output_name], {self.input_name: batch})[0]
        return out[:n]

    def close(self) -> None:
        self._session = None  # type: ignore[assignment]
        super().close()
