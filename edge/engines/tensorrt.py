"""TensorRT backend (Jetson: JetPack 5 = TensorRT 8.5, JetPack 6 = TensorRT 10.x), with pycuda.

What it does, and the API facts it relies on:
- Builds a plan from the bundle's ONNX on the device itself (plans are tied to the TensorRT
  version and GPU), FP16 by default; INT8 only with an IInt8EntropyCalibrator2 over the
  bundle's samples, and only if ``int8_gate`` finds its decoded outputs match FP16's.
- Uses only the name-based tensor API, present from 8.5 and the only one left in 10.x:
  ``num_io_tensors``, ``get_tensor_name``, ``get_tensor_mode``, ``set_input_shape``,
  ``set_tensor_address``, ``execute_async_v3``. (TensorRT 8.5.3 C++ IExecutionContext lists
  setInputShape/setTensorAddress/enqueueV3; the 8.x -> 10.x Python migration guide,
  docs.nvidia.com/deeplearning/tensorrt/.../tensorrt-8x-to-10x-python-api-patterns.html,
  says the binding API is gone in 10.x.) ``create_network`` needs the EXPLICIT_BATCH flag
  before 10.0, where it is deprecated and ignored.
- One optimisation profile: batch min 1, opt and max ``max_batch``; the same profile is the
  INT8 calibration profile (calibration runs at its opt shape).
- A persisted timing cache (``IBuilderConfig.create_timing_cache`` / ``set_timing_cache`` /
  ``ITimingCache.serialize``; a cache from another device or version is refused by
  ``set_timing_cache(..., ignore_mismatch=False)`` and a fresh one used).
- CUDA state (context, stream, pinned host and device buffers, the TensorRT runtime, engine
  and execution context) is owned by ONE thread per engine. pycuda contexts are per thread
  (pycuda issue #242, and "invalid device context - no currently active context?" when a
  TensorRT engine is used from a thread that did not make it, jkjung-avt/tensorrt_demos #63),
  so the thread retains the device's primary context (the one the CUDA runtime, hence
  TensorRT, uses), pushes it, does all the work, and pops it on close. No pycuda.autoinit.
  ``infer`` from any other thread is queued to that thread and waits for the answer.
- Plans are cached under a key of model sha256 + TensorRT version + GPU name + compute
  capability + precision + max batch (edge/engines/trt_cache.py), written atomically.
- A shared-backbone bundle (edge/engines/shared.py says what that is) gets one plan for the
  backbone (:class:`TensorRTBackbone`) and one per head (:class:`TensorRTHeadEngine`, whose
  inputs are the backbone tensors it reads; each gets its own profile, batch 1..max_batch).
  The backbone's outputs stay in device memory (:class:`DeviceRows`); a head over every row
  of the batch gets those buffers' addresses as its inputs (no copy), a head over some rows
  first copies each chosen row device to device (``memcpy_dtod_async``, one copy per run of
  consecutive rows) into its own input buffer, on its own stream. Tensor addresses must be
  256-byte aligned (``setTensorAddress``): rows that start elsewhere are copied too. Backbone and heads live on
  different threads but push the same primary context, so device pointers are valid in all;
  the backbone synchronises its stream before ``run`` returns, so the features are complete
  before any head reads them, and a head refuses rows of an earlier backbone run (the buffers
  are reused). Only the images go to the GPU and only the heads' outputs come back. INT8 is
  refused for heads: calibrating them would need the backbone's features as calibration data.

``tensorrt`` and ``pycuda`` are imported inside the inference thread, never at module import;
tests pass a faithful fake of both (tests/edge/fake_tensorrt.py) as ``trt=`` / ``cuda=``.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from edge.atomic import atomic_write_bytes
from edge.configpath import ConfigPath
from edge.detection import Detection
from edge.engines.base import Engine, EngineConfig, compare_detections, register
from edge.engines.trt_cache import (
    PlanKey,
    default_cache_dir,
    plan_path,
    remove_plan,
    timing_cache_path,
    write_plan,
)
from edge.manifest import BackboneEntry, InputSize, ModelEntry, input_hw

if TYPE_CHECKING:
    # TensorRT's real Python API for the type checker: tensorrt-stubs (generated from NVIDIA's 10.13
    # bindings; installed with --no-deps, see pyproject.toml). Never imported at run time.
    import tensorrt_bindings as trt_api

log = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "int8"]


class TensorRTConfig(EngineConfig):
    """TensorRT (`type: tensorrt`, Jetson): plans built on the device from the bundle's ONNX, cached."""

    type: Literal["tensorrt"] = Field(default="tensorrt", title="Backend", description="tensorrt")
    precision: Precision = Field(
        default="fp16", title="Precision",
        description="fp16 (default, the Jetson sweet spot); int8 needs calibration and must pass the "
        "accuracy gate against fp16 (implicit calibration, deprecated since TensorRT 10.1: see "
        "docs/jetson.md); fp32 for debugging",
    )
    max_batch: int = Field(default=4, ge=1, le=64, title="Largest batch (profile max and opt)",
                           description="bursts of 3-10 frames; buffers are sized for this")
    workspace_mb: int = Field(default=1024, ge=16, le=65536, title="Builder workspace (MiB)",
                              description="scratch memory TensorRT may use while choosing kernels")
    cache_dir: ConfigPath | None = Field(
        default=None, title="Plan and timing cache folder",
        description="null: $CAMTRAP_TRT_CACHE or ~/.cache/camtrap/tensorrt (the device config sets "
        "<state_dir>/engines)",
    )
    device: int = Field(default=0, ge=0, title="CUDA device index", description="0 on a Jetson (one GPU)")
    rebuild: bool = Field(default=False, title="Rebuild",
                          description="ignore a cached plan and build it again (e.g. after a JetPack upgrade "
                          "that kept the TensorRT version string)")


ALIGNMENT = 256  # bytes: TensorRT's rule for every tensor address (NvInferRuntime.h, setTensorAddress)


@dataclass
class _Tensor:
    name: str
    is_input: bool
    dtype: np.dtype
    per_image: tuple[int, ...]
    host: Any = None  # pinned numpy array [max_batch, *per_image]
    device: Any = None  # pycuda DeviceAllocation

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.per_image, dtype=np.int64)) * self.dtype.itemsize


@dataclass(frozen=True)
class GraphSpec:
    """What a TensorRT graph is, for building, caching and messages: a whole model or the shared
    backbone (one image input ``[N, 3, S, S]``), or a head (``inputs``: the backbone tensors it reads)."""

    name: str  # thread name and messages
    file: str  # the ONNX path inside the bundle, for messages
    sha256: str  # of the ONNX file: the plan cache key
    imgsz: InputSize  # the manifest's, as the plan cache key has it
    inputs: tuple[str, ...] = ()  # empty: one image input

    @property
    def input_hw(self) -> tuple[int, int]:
        return input_hw(self.imgsz)


class Int8Rejected(ValueError):
    """The INT8 engine's detections differ from FP16's on the bundle's samples."""


class _TrtGraph:
    """One TensorRT plan with its CUDA state, all owned by one thread (see the module doc).

    Built from the cache or the ONNX on that thread, with pinned host and device buffers for
    ``max_batch`` images. Work reaches the thread through :meth:`_call`; a call from the thread
    itself runs at once. Subclasses add what runs there (``_execute`` and the device paths).
    """

    config: TensorRTConfig
    model_path: Path
    _logger: trt_api.ILogger
    _runtime: trt_api.Runtime
    _engine: trt_api.ICudaEngine
    _context: trt_api.IExecutionContext

    def _start(self, spec: GraphSpec, calibration: np.ndarray | None, trt: Any, cuda: Any) -> None:
        self._spec = spec
        self._calibration = calibration if self.config.precision == "int8" else None
        self._modules = (trt, cuda)
        self.plan_path: Path | None = None
        self.built = False  # True when this engine built its plan (a cache miss)
        self.build_seconds = 0.0
        self.trt_version = self.gpu_name = self.compute_capability = ""
        self._io: list[_Tensor] = []
        self._jobs: queue.Queue = queue.Queue()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name=f"tensorrt-{spec.name}", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on this graph's thread and return its answer."""
        if threading.current_thread() is self._thread:
            return fn(*args)
        if not self._thread.is_alive():
            raise RuntimeError(f"{self._spec.name!r}: its TensorRT thread has stopped")
        fut: Future = Future()
        self._jobs.put((fn, args, fut))
        return fut.result()

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join(timeout=60)

    def _describe(self) -> dict[str, Any]:
        return {"precision": self.config.precision, "plan": str(self.plan_path), "built": self.built,
                "build_s": round(self.build_seconds, 1), "tensorrt": self.trt_version,
                "gpu": f"{self.gpu_name} (sm {self.compute_capability})"}

    # --- the graph's thread ----------------------------------------------------------------------
    def _serve(self) -> None:
        try:
            self._setup()
        except BaseException as e:  # reported to the constructor, which re-raises it
            self._error = e
            self._teardown()
            self._ready.set()
            return
        self._ready.set()
        while True:
            job = self._jobs.get()
            if job is None:
                break
            fn, args, fut = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as e:
                fut.set_exception(e)
        self._teardown()

    def _setup(self) -> None:
        trt, cuda = self._modules
        if trt is None:
            import tensorrt

            trt = tensorrt
        if cuda is None:
            import pycuda.driver

            cuda = pycuda.driver
        self._trt, self._cuda = trt, cuda
        cuda.init()
        dev = cuda.Device(self.config.device)
        # The primary context is the one the CUDA runtime (and so TensorRT) uses; retaining it
        # does not make it current, so push it here, in the thread that will use it. Every graph's
        # thread pushes the same primary context, so a head may read the backbone's device buffers.
        self._cuda_ctx = dev.retain_primary_context()
        self._cuda_ctx.push()
        self._ctx_pushed = True
        self.gpu_name = str(dev.name())
        major, minor = dev.compute_capability()
        self.compute_capability = f"{major}.{minor}"
        self.trt_version = str(trt.__version__)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)  # must outlive the engine it deserialises

        spec = self._spec
        cache_dir = Path(self.config.cache_dir) if self.config.cache_dir else default_cache_dir()
        key = PlanKey(
            model_sha256=spec.sha256, trt_version=self.trt_version, gpu_name=self.gpu_name,
            compute_capability=self.compute_capability, precision=self.config.precision,
            max_batch=self.config.max_batch, imgsz=spec.imgsz,
            calibration_sha256=_array_sha256(self._calibration) if self._calibration is not None else None,
        )
        self.plan_path = plan_path(cache_dir, key)
        engine: trt_api.ICudaEngine | None = None
        if self.plan_path.is_file() and not self.config.rebuild:
            engine = self._runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
            if engine is None:
                log.warning("%s: cached plan %s does not load; rebuilding", spec.name, self.plan_path)
        if engine is None:
            t = time.monotonic()
            log.info("%s: building a %s TensorRT plan (minutes on a Jetson)", spec.name, self.config.precision)
            calibrator = None
            if self._calibration is not None:
                calibrator = make_calibrator(trt, cuda, self._calibration, self.config.max_batch,
                                             self.plan_path.with_suffix(".calib"))
            try:
                plan = build_plan(trt, self._logger, self.model_path.read_bytes(), spec, self.config,
                                  timing_cache_path(cache_dir, self.trt_version, self.gpu_name,
                                                    self.compute_capability), calibrator)
            finally:
                if calibrator is not None:
                    calibrator.free()
            write_plan(self.plan_path, plan, key)
            self.built, self.build_seconds = True, time.monotonic() - t
            engine = self._runtime.deserialize_cuda_engine(plan)
            if engine is None:
                raise RuntimeError(f"{spec.name}: TensorRT built a plan it cannot load ({self.plan_path})")
        self._engine = engine
        self._context = engine.create_execution_context()
        self._allocate()

    def _allocate(self) -> None:
        trt, cuda, engine, spec = self._trt, self._cuda, self._engine, self._spec
        tensors = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            tensors.append(_Tensor(name, is_input, dtype, ()))
        inputs = [t for t in tensors if t.is_input]
        wanted = sorted(spec.inputs) if spec.inputs else None
        if (wanted is None and len(inputs) != 1) or (wanted is not None and sorted(t.name for t in inputs) != wanted) \
                or len(tensors) == len(inputs):
            raise ValueError(f"{self.model_path}: expected {'inputs ' + str(wanted) if wanted else 'one input'} "
                             f"and at least one output, got {[t.name for t in tensors]}")
        mb = self.config.max_batch
        for t in inputs:
            per = (3, *spec.input_hw) if not spec.inputs else \
                tuple(int(d) for d in engine.get_tensor_shape(t.name)[:][1:])
            if not self._context.set_input_shape(t.name, (mb, *per)):
                raise ValueError(f"{self.model_path}: input {t.name!r} refuses shape {[mb, *per]}")
        for t in tensors:
            shape = tuple(int(d) for d in self._context.get_tensor_shape(t.name)[:])  # Dims[:] is a tuple
            if shape[0] != mb or any(d < 0 for d in shape):
                raise ValueError(f"{self.model_path}: tensor {t.name!r} has unresolved shape {list(shape)}")
            t.per_image = shape[1:]
            t.host = cuda.pagelocked_empty((mb, *t.per_image), t.dtype)  # async copies need pinned memory
            t.device = cuda.mem_alloc(t.host.nbytes)
        self._io = tensors
        self._inputs = inputs
        self._input = inputs[0]
        self._output = next(t for t in tensors if not t.is_input)
        self._stream = cuda.Stream()

    def _set_shapes(self, n: int) -> None:
        for t in self._inputs:
            if not self._context.set_input_shape(t.name, (n, *t.per_image)):
                raise RuntimeError(f"{self._spec.name}: TensorRT refused shape {[n, *t.per_image]} for {t.name!r}")

    def _enqueue(self, n: int, addresses: Mapping[str, int]) -> None:
        """Every IO tensor's address (``addresses``, else its own buffer), then the run, on the stream."""
        ctx = self._context
        for t in self._io:  # every IO tensor needs an address before execute_async_v3
            if not ctx.set_tensor_address(t.name, int(addresses.get(t.name, int(t.device)))):
                raise RuntimeError(f"{self._spec.name}: TensorRT refused the address of {t.name!r} (see its log)")
        if not ctx.execute_async_v3(self._stream.handle):
            raise RuntimeError(f"{self._spec.name}: TensorRT execute_async_v3 failed (see its log)")
        for t in self._io:
            if t.is_input:
                continue
            shape = tuple(int(d) for d in ctx.get_tensor_shape(t.name)[:])
            if shape != (n, *t.per_image):
                raise RuntimeError(f"{self._spec.name}: output {t.name!r} has shape {list(shape)}, "
                                   f"expected {[n, *t.per_image]}")

    def _execute(self, batch: np.ndarray) -> np.ndarray:
        """Host images in, the first output back on the host (a whole model)."""
        cuda, n, inp = self._cuda, batch.shape[0], self._input
        self._set_shapes(n)
        host_in = inp.host[:n]
        np.copyto(host_in, batch, casting="same_kind" if inp.dtype.kind == "f" else "unsafe")
        cuda.memcpy_htod_async(inp.device, host_in, self._stream)
        self._enqueue(n, {})
        out = self._output.host[:n]
        cuda.memcpy_dtoh_async(out, self._output.device, self._stream)
        self._stream.synchronize()
        return out.astype(np.float32)  # a copy: the host buffer is reused

    def _teardown(self) -> None:
        for t in self._io:
            if t.device is not None:
                t.device.free()
                t.device = None
        self._io = []
        self._free_extra()
        for attr in ("_context", "_engine", "_runtime", "_stream"):  # context before engine before runtime
            if hasattr(self, attr):
                setattr(self, attr, None)
        if getattr(self, "_ctx_pushed", False):
            self._cuda_ctx.pop()
            self._cuda_ctx.detach()
            self._ctx_pushed = False

    def _free_extra(self) -> None:
        """Device memory a subclass holds beyond the IO buffers (freed on the thread, in teardown)."""


@register
class TensorRTEngine(_TrtGraph, Engine):
    """A whole model: images in, its output out."""

    backend = "tensorrt"
    config_class = TensorRTConfig
    requires = ("tensorrt", "pycuda")
    config: TensorRTConfig

    def __init__(self, model_path: str | Path, entry: ModelEntry, config: TensorRTConfig, *,
                 calibration: np.ndarray | None = None, trt: Any = None, cuda: Any = None) -> None:
        Engine.__init__(self, model_path, entry, config)
        if config.precision == "int8":
            if calibration is None or len(calibration) == 0:
                raise ValueError(f"{entry.name}: INT8 needs calibration images (the bundle's samples); "
                                 "refusing to build an uncalibrated INT8 engine - use fp16")
            calibration = np.ascontiguousarray(calibration, dtype=np.float32)
            if calibration.ndim != 4 or tuple(calibration.shape[1:]) != self.input_shape:
                raise ValueError(f"{entry.name}: calibration batch must be [K, {', '.join(map(str, self.input_shape))}]"
                                 f", got {list(calibration.shape)}")
        self._start(self._graph_spec(entry), calibration, trt, cuda)
        try:
            self.warmup()
        except BaseException:
            self.close()  # stop the thread and free its CUDA state
            raise

    @staticmethod
    def _graph_spec(entry: ModelEntry) -> GraphSpec:
        return GraphSpec(entry.name, entry.file, entry.sha256, entry.imgsz, tuple(entry.head_inputs))

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self._call(self._execute, batch)

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        self._stop()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), **self._describe()}


# --- the shared backbone ------------------------------------------------------------------------------


class DeviceRows:
    """Some rows (images) of one backbone output, left in GPU memory for the heads.

    ``rows[idx]`` selects rows (as ``CascadeRunner`` does for the images routed to a model)
    without copying anything: the head copies the chosen slices device to device into its own
    input when it runs. Valid until the backbone's next run (``generation``), which reuses the
    buffer; a head refuses stale rows.
    """

    __slots__ = ("backbone", "dtype", "generation", "name", "per_image", "ptr", "row_bytes", "rows")

    def __init__(self, backbone: TensorRTBackbone, name: str, ptr: int, per_image: tuple[int, ...], dtype: np.dtype,
                 rows: list[int], generation: int) -> None:
        self.backbone, self.name, self.ptr, self.per_image, self.dtype = backbone, name, ptr, per_image, dtype
        self.row_bytes = int(np.prod(per_image, dtype=np.int64)) * dtype.itemsize
        self.rows, self.generation = rows, generation

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.per_image)

    def __getitem__(self, idx: Any) -> DeviceRows:
        picked = self.rows[idx] if isinstance(idx, slice) else [self.rows[int(i)] for i in np.asarray(idx).ravel()]
        return DeviceRows(self.backbone, self.name, self.ptr, self.per_image, self.dtype, picked, self.generation)


def _runs(rows: Sequence[int]) -> list[tuple[int, int, int]]:
    """(destination row, source row, length) of each run of consecutive rows: one copy per run."""
    out: list[tuple[int, int, int]] = []
    for k, r in enumerate(rows):
        if out and out[-1][1] + out[-1][2] == r:
            d, s, n = out[-1]
            out[-1] = (d, s, n + 1)
        else:
            out.append((k, r, 1))
    return out


class TensorRTBackbone(_TrtGraph):
    """The shared frozen layers on TensorRT: images in, the named feature tensors left on the GPU.

    Its output buffers grow to the largest batch seen (``max_batch`` rows at first); a batch
    larger than ``max_batch`` runs in chunks into consecutive rows. Heads hold it (``attach``)
    and the last one to close frees it.
    """

    def __init__(self, path: str | Path, entry: BackboneEntry, config: TensorRTConfig, *,
                 trt: Any = None, cuda: Any = None) -> None:
        self.model_path, self.entry, self.config = Path(path), entry, config
        self.generation = 0
        self._capacity = 0
        self._grown: dict[str, Any] = {}  # output name -> a larger device buffer than the IO one
        self._users = 0
        self._start(GraphSpec("backbone", entry.file, entry.sha256, entry.imgsz), None, trt, cuda)
        missing = set(entry.outputs) - {t.name for t in self._io if not t.is_input}
        if missing:
            self.close()
            raise ValueError(f"{self.model_path}: the backbone graph lacks outputs {sorted(missing)} that the "
                             "manifest names")
        self.run(np.full((1, 3, *entry.input_hw), 114 / 255, np.float32))  # warm-up

    def attach(self) -> None:
        self._users += 1

    def release(self) -> None:
        self._users -= 1
        if self._users <= 0:
            self.close()

    def close(self) -> None:
        self._stop()

    def describe(self) -> dict[str, Any]:
        return {"name": "backbone", "outputs": list(self.entry.outputs), **self._describe()}

    def run(self, batch: np.ndarray) -> dict[str, DeviceRows]:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        h, w = self.entry.input_hw
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, h, w) or len(x) == 0:
            raise ValueError(f"backbone: expected a [N, 3, {h}, {w}] batch, got shape {list(x.shape)}")
        return self._call(self._forward, x)

    def _out(self, t: _Tensor) -> int:
        return int(self._grown.get(t.name, t.device))

    def _forward(self, x: np.ndarray) -> dict[str, DeviceRows]:
        cuda, n, mb, inp = self._cuda, len(x), self.config.max_batch, self._input
        outs = [t for t in self._io if not t.is_input]
        if n > max(mb, self._capacity):  # room for every row of the batch, chunk after chunk
            self._free_extra()
            self._capacity = -(-n // mb) * mb
            self._grown = {t.name: cuda.mem_alloc(self._capacity * t.row_bytes) for t in outs}
        for s in range(0, n, mb):
            c = min(mb, n - s)
            self._set_shapes(c)
            np.copyto(inp.host[:c], x[s:s + c])
            cuda.memcpy_htod_async(inp.device, inp.host[:c], self._stream)
            # a chunk is written where it belongs when that address is aligned, else into the IO buffer
            # and copied there on the device (TensorRT wants 256-byte aligned tensor addresses)
            there = {t.name: self._out(t) + s * t.row_bytes for t in outs}
            direct = {k: a for k, a in there.items() if a % ALIGNMENT == 0}
            self._enqueue(c, direct)
            for t in outs:
                if t.name not in direct:
                    cuda.memcpy_dtod_async(there[t.name], int(t.device), c * t.row_bytes, self._stream)
            self._stream.synchronize()  # the pinned input is refilled by the next chunk
        self.generation += 1
        return {t.name: DeviceRows(self, t.name, self._out(t), t.per_image, t.dtype, list(range(n)), self.generation)
                for t in outs if t.name in self.entry.outputs}

    def _free_extra(self) -> None:
        for buf in self._grown.values():
            buf.free()
        self._grown = {}
        self._capacity = 0


class TensorRTHeadEngine(TensorRTEngine):
    """A model whose bundle file is a head over a :class:`TensorRTBackbone`: ``run_features`` runs
    it on backbone rows still on the GPU (the runner's path); ``infer`` runs backbone then head."""

    def __init__(self, model_path: str | Path, entry: ModelEntry, config: TensorRTConfig,
                 backbone: TensorRTBackbone, *, trt: Any = None, cuda: Any = None) -> None:
        if not entry.head_inputs:
            raise ValueError(f"model {entry.name!r} is a whole model, not a head graph")
        if config.precision == "int8":
            raise ValueError(f"{entry.name}: INT8 is not supported for a head over a shared backbone (its "
                             "calibration would need the backbone's features); use fp16 or a bundle of whole models")
        self.backbone = backbone
        self.zero_copy_runs = 0  # runs that read the backbone's buffers in place
        self.gathered_rows = 0  # rows copied device to device into the head's own input
        backbone.attach()
        self._attached = True
        try:
            super().__init__(model_path, entry, config, trt=trt, cuda=cuda)
        except BaseException:
            self._detach()
            raise

    def _detach(self) -> None:
        if self._attached:
            self._attached = False
            self.backbone.release()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "shared_backbone": str(self.backbone.model_path)}

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self.run_features(self.backbone.run(batch))

    def run_features(self, features: Mapping[str, DeviceRows]) -> np.ndarray:
        """The head alone on backbone rows (a batch, or any subset of its rows), read on the GPU."""
        if self._closed:
            raise RuntimeError(f"engine {self.name!r} ({self.backend}) is closed")
        feats = {k: features[k] for k in self.entry.head_inputs}
        for k, f in feats.items():
            if not isinstance(f, DeviceRows) or f.backbone is not self.backbone:
                raise TypeError(f"{self.name}: input {k!r} is not an output of this head's backbone on the GPU")
        rows = next(iter(feats.values())).rows
        for f in feats.values():
            if f.generation != self.backbone.generation:
                raise RuntimeError(f"{self.name}: stale backbone features (the backbone has run again since)")
            if f.rows != rows:
                raise ValueError(f"{self.name}: inputs select different rows")
        out = self._call(self._from_device, feats, rows)
        self.output_shape = tuple(out.shape[1:])
        return out

    def _from_device(self, feats: dict[str, DeviceRows], rows: list[int]) -> np.ndarray:
        cuda, mb, outp = self._cuda, self.config.max_batch, self._output
        n = len(rows)
        result = np.empty((n, *outp.per_image), np.float32)
        by_name = {t.name: t for t in self._inputs}
        for s in range(0, n, mb):
            chunk = rows[s:s + mb]
            c = len(chunk)
            self._set_shapes(c)
            addresses: dict[str, int] = {}
            runs = _runs(chunk)
            for name, f in feats.items():
                t = by_name[name]
                if f.per_image != t.per_image or f.dtype != t.dtype:
                    raise ValueError(f"{self.name}: input {name!r} is {t.dtype}{list(t.per_image)}, the backbone "
                                     f"gives {f.dtype}{list(f.per_image)}")
                start = f.ptr + chunk[0] * f.row_bytes
                if len(runs) == 1 and start % ALIGNMENT == 0:  # consecutive rows: read them where they lie
                    addresses[name] = start
                    continue
                for dst, src, k in runs:  # a device-side gather of the chosen rows
                    cuda.memcpy_dtod_async(int(t.device) + dst * f.row_bytes, f.ptr + src * f.row_bytes,
                                           k * f.row_bytes, self._stream)
            if addresses:
                self.zero_copy_runs += 1
            else:
                self.gathered_rows += c
            self._enqueue(c, addresses)
            cuda.memcpy_dtoh_async(outp.host[:c], outp.device, self._stream)
            self._stream.synchronize()
            result[s:s + c] = outp.host[:c]
        return result

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        self._detach()


def _array_sha256(a: np.ndarray) -> str:
    h = hashlib.sha256(str(a.shape).encode())
    h.update(np.ascontiguousarray(a, np.float32).tobytes())
    return h.hexdigest()


# --- building ---------------------------------------------------------------------------------------


def build_plan(trt: Any, logger: trt_api.ILogger, onnx_bytes: bytes, entry: GraphSpec, config: TensorRTConfig,
               timing_cache: Path, calibrator: trt_api.IInt8Calibrator | None = None) -> bytes:
    """ONNX bytes -> serialised plan. Runs in the engine's thread (a CUDA context must be current)."""
    major = int(str(trt.__version__).split(".")[0])
    # Explicit batch is mandatory for ONNX before TensorRT 10 and the only mode from 10.0 on.
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    builder: trt_api.Builder = trt.Builder(logger)
    network = builder.create_network(flags)
    parser: trt_api.OnnxParser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ValueError(f"{entry.file}: TensorRT cannot parse the ONNX model: {errors}")
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    if not entry.inputs and len(inputs) != 1:
        raise ValueError(f"{entry.file}: expected one input, the network has {network.num_inputs}")
    if entry.inputs and sorted(t.name for t in inputs) != sorted(entry.inputs):
        raise ValueError(f"{entry.file}: a head over the backbone's {sorted(entry.inputs)} has inputs "
                         f"{sorted(t.name for t in inputs)}")
    cfg = builder.create_builder_config()
    cfg.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_mb << 20)  # TRT >= 8.4
    if config.precision in ("fp16", "int8"):
        cfg.set_flag(trt.BuilderFlag.FP16)  # INT8 layers that cannot be quantised fall back to FP16
    profile = builder.create_optimization_profile()
    for t in inputs:  # the batch is the one free dimension: an image is [3, H, W], a head's input as exported
        dims = [int(d) for d in t.shape[:]]  # Dims[:] is a tuple
        per = [3, *entry.input_hw] if not entry.inputs else dims[1:]
        if any(d < 0 for d in per):
            raise ValueError(f"{entry.file}: input {t.name!r} has free dimensions besides the batch: {dims}")
        lo, hi = trt.Dims([1, *per]), trt.Dims([config.max_batch, *per])
        profile.set_shape(t.name, lo, hi, hi)
    cfg.add_optimization_profile(profile)
    if config.precision == "int8":
        if calibrator is None:
            raise ValueError(f"{entry.name}: INT8 without a calibrator is refused")
        cfg.set_flag(trt.BuilderFlag.INT8)
        cfg.int8_calibrator = calibrator
        cfg.set_calibration_profile(profile)  # dynamic shapes: calibrate at the profile's opt shape

    blob = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = cfg.create_timing_cache(blob)
    if cache is None and blob:
        log.warning("timing cache %s is unreadable; starting a fresh one", timing_cache)
        cache = cfg.create_timing_cache(b"")
    if not cfg.set_timing_cache(cache, False):  # ignore_mismatch=False: never use another GPU's timings
        log.warning("timing cache %s was made elsewhere; starting a fresh one", timing_cache)
        cache = cfg.create_timing_cache(b"")
        cfg.set_timing_cache(cache, False)

    plan = builder.build_serialized_network(network, cfg)
    if plan is None:
        raise RuntimeError(f"{entry.name}: TensorRT could not build a {config.precision} plan (see its log)")
    atomic_write_bytes(timing_cache, bytes(cfg.get_timing_cache().serialize()))
    return bytes(plan)


def make_calibrator(trt: Any, cuda: Any, images: np.ndarray, batch_size: int, cache_file: Path | None) -> Any:
    """An IInt8EntropyCalibrator2 feeding ``images`` (letterboxed like real inputs) in batches.

    TensorRT calibrates at the profile's opt batch, so every batch has ``batch_size`` images;
    the sample set is cycled to fill the last one. The calibration table is cached beside the
    plan (its name carries the calibration data's hash through the plan key).
    """
    base = trt.IInt8EntropyCalibrator2

    class EntropyCalibrator(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)  # pybind11: the TensorRT base must be initialised explicitly
            k = len(images)
            n_batches = max(1, -(-k // batch_size))
            idx = np.arange(n_batches * batch_size) % k
            self._batches = [np.ascontiguousarray(images[idx[i:i + batch_size]], np.float32)
                             for i in range(0, len(idx), batch_size)]
            self._next = 0
            self._device = cuda.mem_alloc(self._batches[0].nbytes)

        def get_batch_size(self) -> int:
            return batch_size

        def get_batch(self, names: list[str], *_: Any) -> list[int] | None:
            if self._next >= len(self._batches):
                return None
            cuda.memcpy_htod(self._device, self._batches[self._next])
            self._next += 1
            return [int(self._device)]

        def read_calibration_cache(self) -> bytes | None:
            if cache_file is not None and cache_file.is_file():
                return cache_file.read_bytes()
            return None

        def write_calibration_cache(self, cache: Any) -> None:
            if cache_file is not None:
                atomic_write_bytes(cache_file, bytes(cache))

        def free(self) -> None:
            if self._device is not None:
                self._device.free()
                self._device = None

    return EntropyCalibrator()


# --- the INT8 accuracy gate ----------------------------------------------------------------------------


@dataclass(frozen=True)
class GateResult:
    passed: bool
    images: int
    problems: list[str] = field(default_factory=list)


def int8_gate(reference: Sequence[Sequence[Detection]], candidate: Sequence[Sequence[Detection]], *,
              min_iou: float = 0.9, score_tol: float = 0.05,
              thresholds: Mapping[str, float] | None = None) -> GateResult:
    """Does INT8 (``candidate``) find what FP16 (``reference``) finds, image by image? (pure)

    Same species, box IoU >= ``min_iou``, score within ``score_tol``, nothing extra. A
    reference with no detection at all cannot judge anything, so it fails the gate too.
    """
    if len(reference) != len(candidate):
        return GateResult(False, len(reference), [f"{len(reference)} reference images, {len(candidate)} INT8"])
    if not any(len(r) for r in reference):
        return GateResult(False, len(reference), ["the FP16 reference found nothing on the samples, "
                                                  "so INT8 accuracy cannot be judged"])
    problems = []
    for i, (r, c) in enumerate(zip(reference, candidate, strict=True)):
        problems += [f"image {i}: {p}" for p in compare_detections(r, c, min_iou=min_iou, score_tol=score_tol,
                                                                    thresholds=thresholds)]
    return GateResult(not problems, len(reference), problems)


def build_gated_int8(model_path: str | Path, entry: ModelEntry, config: TensorRTConfig, *,
                     calibration: np.ndarray, check: np.ndarray,
                     decode: Callable[[np.ndarray], list[list[Detection]]],
                     min_iou: float = 0.9, score_tol: float = 0.05, thresholds: Mapping[str, float] | None = None,
                     trt: Any = None, cuda: Any = None) -> tuple[TensorRTEngine, GateResult]:
    """An INT8 engine that has passed the gate against an FP16 engine of the same model.

    ``check`` is the image batch both engines run; ``decode`` turns a raw output batch into
    detections per image. On failure the INT8 plan is deleted, so it can never be loaded.
    """
    fp16 = config.model_copy(update={"precision": "fp16"})
    with TensorRTEngine(model_path, entry, fp16, trt=trt, cuda=cuda) as ref:
        reference = decode(ref.infer(check))
    eng = TensorRTEngine(model_path, entry, config, calibration=calibration, trt=trt, cuda=cuda)
    try:
        result = int8_gate(reference, decode(eng.infer(check)), min_iou=min_iou, score_tol=score_tol,
                           thresholds=thresholds)
    except BaseException:
        eng.close()
        raise
    if not result.passed:
        eng.close()
        if eng.plan_path is not None:
            remove_plan(eng.plan_path)
            eng.plan_path.with_suffix(".calib").unlink(missing_ok=True)
        shown = "; ".join(result.problems[:3]) + (" ..." if len(result.problems) > 3 else "")
        raise Int8Rejected(f"{entry.name}: INT8 engine failed the accuracy gate against FP16 on "
                           f"{result.images} sample images ({shown}); its plan was discarded - use fp16")
    log.info("%s: INT8 passed the accuracy gate on %d images", entry.name, result.images)
    return eng, result
