"""ONNX Runtime backend: any CPU; the TensorRT or CUDA execution providers where this
onnxruntime build has them (onnxruntime-gpu, e.g. the Jetson wheel of JetPack 6).

Providers are named by short keys (``cpu``, ``cuda``, ``tensorrt``; ONNX Runtime's own names
such as ``CUDAExecutionProvider`` are accepted and mean the same). ``auto``, the default, is
the best this build offers: TensorRT, then CUDA, then CPU. The CPU provider always comes last
as the fallback. Which providers a session really got is read back from the session and
logged, since ONNX Runtime itself falls back when a GPU provider cannot start.

The input name and batch dimension are read from the session, not assumed: a model exported
with a fixed batch still works (chunks are padded to it), a dynamic one takes any chunk.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BeforeValidator, Field

from edge.engines.base import Engine, EngineConfig, register
from edge.manifest import ModelEntry

log = logging.getLogger(__name__)

Provider = Literal["auto", "cpu", "cuda", "tensorrt"]
PROVIDER_NAMES: dict[str, str] = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
"""Short key -> ONNX Runtime's provider name, best first (the order ``auto`` tries them in)."""
_SHORT = {v.lower(): k for k, v in PROVIDER_NAMES.items()}


def _short_names(value: Any) -> Any:
    """``auto`` alone for ``[auto]``; ONNX Runtime's own provider names (any case) for the short keys."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        return [_SHORT.get(v.lower(), v) if isinstance(v, str) else v for v in value]
    return value


class OnnxRuntimeConfig(EngineConfig):
    """ONNX Runtime (`type: onnxruntime`, the default): any CPU, or the GPU through onnxruntime-gpu."""

    type: Literal["onnxruntime"] = Field(default="onnxruntime", title="Backend", description="onnxruntime")
    providers: Annotated[list[Provider], BeforeValidator(_short_names)] = Field(
        default_factory=lambda: list[Provider](["auto"]), min_length=1, title="Execution providers",
        description="in order of preference: auto, cpu, cuda, tensorrt (ONNX Runtime's names, e.g. "
        "CUDAExecutionProvider, mean the same). auto (the default) stands for every provider this "
        "onnxruntime build offers that is not listed before it, best first: tensorrt, cuda, cpu. A "
        "listed provider this build lacks is skipped with a warning; cpu is always the last fallback",
    )
    intra_op_threads: int = Field(
        default=0, ge=0, le=256, title="Threads per operator",
        description="the size of each session's intra-op thread pool, alike for every session of the bundle "
        "(whole models, a shared backbone, heads). 0 lets ONNX Runtime choose: one thread per physical core, "
        "pinned to it. Measured on 2 cores (BENCHMARKS.md, benchmarks/threads.py): a 640 px model alone ran "
        "1.5-1.7x faster with 0 than with 1; the demo's 160 px cascade in a 1,000-frame burst ran about 10% "
        "faster with 1 (small models gain little from threads, and 1 leaves a core to the reader). So: 0 for "
        "models of 640 px or more, 1 for small models on a 2-4 core CPU",
    )
    allow_spinning: bool = Field(
        default=False, title="Spinning thread pools",
        description="let idle pool threads busy-wait for the next operator instead of sleeping (ONNX "
        "Runtime's session.intra_op.allow_spinning and session.inter_op.allow_spinning; its own default is "
        "on). Off by default: a bundle has one pool per session (4+ in a cascade), run one after the other, "
        "and the pools that just finished spun on the cores the next session and the reader thread needed "
        "(the cascade 1.4-2x slower on 2 cores with the reader running, BENCHMARKS.md). On may shave a little "
        "off a lone small model's latency on an otherwise idle CPU. Irrelevant with intra_op_threads 1 (no "
        "pool threads) and for the TensorRT backend",
    )
    fp16: bool = Field(default=True, title="FP16 in the TensorRT provider", description="only for tensorrt")


def choose_providers(config: OnnxRuntimeConfig, available: Sequence[str]) -> tuple[list[str | tuple[str, dict]],
                                                                                   list[str]]:
    """The ``providers=`` argument for an InferenceSession, and the requested providers this build lacks.

    Pure, so the choice can be tested against any provider list (a Jetson's included).
    """
    wanted: list[tuple[str, bool]] = []  # (key, asked by name)
    for asked in config.providers:
        wanted += [(k, False) for k in PROVIDER_NAMES] if asked == "auto" else [(asked, True)]
    chosen: list[str | tuple[str, dict]] = []
    missing: list[str] = []
    done: set[str] = set()
    for key, named in wanted:
        name = PROVIDER_NAMES[key]
        if key in done:
            continue
        done.add(key)
        if name not in available:
            if named:
                missing.append(name)
            continue
        if key == "tensorrt":
            opts: dict[str, Any] = {"trt_fp16_enable": config.fp16}
            if config.cache_dir is not None:  # without a cache every start rebuilds (minutes on a Jetson)
                opts.update(trt_engine_cache_enable=True, trt_timing_cache_enable=True,
                            trt_engine_cache_path=str(Path(config.cache_dir) / "onnxruntime-tensorrt"))
            chosen.append((name, opts))
        else:
            chosen.append(name)
    if PROVIDER_NAMES["cpu"] not in chosen:
        chosen.append(PROVIDER_NAMES["cpu"])
    return chosen, missing


def thread_pool_entries(config: OnnxRuntimeConfig) -> dict[str, str]:
    """The session config entries of the thread-pool policy, alike for every session of a bundle.

    Why spinning is a policy and not a detail: each InferenceSession owns its pools, and a pool's
    threads spin after each run waiting for more work. A cascade runs 4+ sessions one after the
    other, so on a small CPU the pools that just finished spin on the cores the next session and
    the daemon's reader thread need (benchmarks/threads.py measures it). The inter-op pool exists
    only in parallel execution mode; it gets the same setting so the policy holds if that changes.
    ONNX Runtime's process-wide global pools are not used: the Python API can size them
    (``set_global_thread_pool_sizes``) but not stop them spinning, and once set they are the only
    pools any session of the process may use.
    """
    spin = "1" if config.allow_spinning else "0"
    return {"session.intra_op.allow_spinning": spin, "session.inter_op.allow_spinning": spin}


def make_session(path: Path, config: OnnxRuntimeConfig, name: str) -> tuple[Any, list, list[str]]:
    """An InferenceSession of ``path`` with the config's providers and thread-pool policy, and the providers
    asked for and really used (ONNX Runtime falls back on its own when a GPU provider fails).
    Every session of a bundle (whole models, a shared backbone, heads) is made here, alike."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if config.intra_op_threads:
        opts.intra_op_num_threads = config.intra_op_threads
    for key, value in thread_pool_entries(config).items():
        opts.add_session_config_entry(key, value)
    providers, missing = choose_providers(config, ort.get_available_providers())
    for p in missing:
        log.warning("%s: this onnxruntime build lacks %s; skipping it", name, p)
    try:
        session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types
        raise ValueError(f"{path}: ONNX Runtime cannot load model {name!r}: {e}") from None
    used: list[str] = list(session.get_providers())
    asked = [p if isinstance(p, str) else p[0] for p in providers]
    if used != asked:  # a GPU provider that failed to start (missing CUDA/TensorRT libs)
        log.warning("%s: ONNX Runtime uses %s (asked for %s)", name, ", ".join(used), ", ".join(asked))
    else:
        log.info("%s: ONNX Runtime providers %s", name, ", ".join(used))
    return session, providers, used


@register
class OnnxRuntimeEngine(Engine):
    backend = "onnxruntime"
    config_class = OnnxRuntimeConfig
    requires = ("onnxruntime",)
    config: OnnxRuntimeConfig

    def __init__(self, model_path: str | Path, entry: ModelEntry, config: OnnxRuntimeConfig) -> None:
        super().__init__(model_path, entry, config)
        self._session, self.providers, self.used_providers = make_session(self.model_path, config, entry.name)
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

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "providers": self.used_providers}

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
        self._session = None
        super().close()
