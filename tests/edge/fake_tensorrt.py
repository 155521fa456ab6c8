"""A faithful fake of the `tensorrt` and `pycuda.driver` calls the TensorRT backend makes.

TensorRT cannot run on these machines, so the backend's logic is tested against this. The
fake's "engine" runs the same ONNX model through ONNX Runtime, so its outputs can be compared
with the ONNX Runtime engine's; FP16 rounds inputs and outputs to half precision, INT8
quantises the input with the scale its calibrator measured (a bad calibration gives bad
outputs, as on a real GPU).

What it enforces, because these are the mistakes that bite people on a real Jetson:
- CUDA calls need a current context in the calling thread (pycuda: "invalid device context -
  no currently active context?"); ``cuda.init()`` must come first; no pycuda.autoinit exists.
- Streams, execution contexts and engines are used only from the thread that made them
  (stricter than CUDA, which merely misbehaves: it enforces the one-owner-thread design).
- ``memcpy_*_async`` needs page-locked host memory (``pagelocked_empty``), C-contiguous, and
  no more bytes than the device allocation holds; async copies and ``execute_async_v3``
  happen at ``stream.synchronize()``, so results read before it are stale.
- ``execute_async_v3`` fails (returns False, logs an error) unless every IO tensor has an
  address and every input a shape; ``set_input_shape`` refuses shapes outside the profile.
- Version-dependent API: 8.5 still has the binding API and needs EXPLICIT_BATCH; 10.x has
  no binding API (``get_binding_shape``, ``execute_async_v2``, ``build_engine``,
  ``max_workspace_size`` ... are absent) and explicit batch is implicit.
- Plans and timing caches carry the TensorRT version and GPU; a plan from elsewhere does not
  deserialise (None), a foreign timing cache is refused by ``set_timing_cache``.
- Graphs may have several inputs and outputs (a head over a shared backbone, the backbone's
  feature tensors): each input needs a profile and a shape; output shapes are known once every
  input's is set. ``memcpy_dtod(_async)`` copies between device buffers (any pointer inside an
  allocation), and ``gpu.copied`` counts the bytes of each kind of copy, so a test can see that
  features never went through host memory. A tensor address must be 256-byte aligned
  (``setTensorAddress`` in NvInferRuntime.h), so an offset into a buffer is not always one.
- The calibrator subclass must call the base ``__init__`` (pybind11 raises otherwise), and
  calibration batches must match the calibration profile's opt shape.

Use: ``gpu = FakeGPU("10.3.0")``, then pass ``trt=gpu.trt, cuda=gpu.cuda`` to the backend, or
``gpu.install(monkeypatch)`` to make ``import tensorrt`` / ``import pycuda.driver`` find it.
``gpu.builds`` records each build (flags, profile, timing-cache hits) for assertions.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
import json
import threading
import types
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

PLAN_MAGIC = b"FAKETRT-PLAN\n"
TIMING_MAGIC = b"FAKETRT-TIMING\n"
CALIB_MAGIC = b"FAKETRT-CALIB\n"


class ContractError(RuntimeError):
    """The code under test broke a rule the real stack would punish (crash, garbage, hang)."""


@dataclass
class BuildRecord:
    precision: str
    flags: set[str]
    profile: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
    workspace: int | None
    timing_hits: int
    timing_misses: int
    calibration_batches: int
    calibration_from_cache: bool
    thread: str


@dataclass
class _Cuda:
    """Process-wide fake driver state."""

    gpu_name: str
    cc: tuple[int, int]
    initialized: bool = False
    tls: threading.local = field(default_factory=threading.local)
    allocations: dict[int, object] = field(default_factory=dict)
    streams: dict[int, object] = field(default_factory=dict)
    next_address: int = 0x7F00_0000_0000  # a bump allocator: allocations never overlap, as on a GPU
    handles: itertools.count = field(default_factory=lambda: itertools.count(0x5000))
    copied: dict[str, int] = field(default_factory=lambda: {"htod": 0, "dtoh": 0, "dtod": 0})  # bytes, by kind

    def stack(self) -> list:
        if not hasattr(self.tls, "stack"):
            self.tls.stack = []
        return self.tls.stack

    def require(self, what: str) -> None:
        if not self.initialized:
            raise LogicError(f"{what} failed: initialization error (cuda.init() not called)")
        if not self.stack():
            raise LogicError(f"{what} failed: invalid device context - no currently active context?")

    def memory(self, addr: int, nbytes: int, what: str) -> tuple[object, int]:
        for alloc in self.allocations.values():
            start = alloc.addr  # type: ignore[attr-defined]
            if start <= addr < start + alloc.nbytes:  # type: ignore[attr-defined]
                if addr + nbytes > start + alloc.nbytes:  # type: ignore[attr-defined]
                    raise LogicError(f"{what}: an illegal memory access was encountered "
                                     f"({nbytes} bytes at +{addr - start} in a {alloc.nbytes}-byte buffer)")
                return alloc, addr - start
        raise LogicError(f"{what}: an illegal memory access was encountered (no allocation at {addr:#x})")


class LogicError(RuntimeError):
    """pycuda._driver.LogicError"""


def _owner_check(owner: threading.Thread, what: str) -> None:
    if threading.current_thread() is not owner:
        raise ContractError(f"{what} used from thread {threading.current_thread().name!r}, "
                            f"but it belongs to {owner.name!r}")


# ---------------------------------------------------------------------------------------------
# pycuda.driver
# ---------------------------------------------------------------------------------------------


class PinnedArray(np.ndarray):
    """What pagelocked_empty returns; views and slices stay pinned."""


def _make_cuda(st: _Cuda) -> types.ModuleType:
    cuda = types.ModuleType("pycuda.driver")
    cuda.LogicError = LogicError  # type: ignore[attr-defined]
    cuda.Error = RuntimeError  # type: ignore[attr-defined]

    def init(flags: int = 0) -> None:
        st.initialized = True

    class Context:
        def __init__(self, device: Device) -> None:
            self.device = device
            self.detached = False

        def push(self) -> None:
            if self.detached:
                raise LogicError("cuCtxPushCurrent failed: context is destroyed")
            st.stack().append(self)

        @staticmethod
        def pop() -> None:
            if not st.stack():
                raise LogicError("cuCtxPopCurrent failed: invalid device context")
            st.stack().pop()

        def detach(self) -> None:
            self.detached = True

        @staticmethod
        def get_current():
            return st.stack()[-1] if st.stack() else None

        @staticmethod
        def synchronize() -> None:
            st.require("cuCtxSynchronize")
            for s in list(st.streams.values()):
                s.synchronize()  # type: ignore[attr-defined]

    class Device:
        def __init__(self, ordinal: int) -> None:
            if not st.initialized:
                raise LogicError("cuDeviceGet failed: initialization error (cuda.init() not called)")
            if ordinal != 0:
                raise LogicError("cuDeviceGet failed: invalid device ordinal")
            self.ordinal = ordinal

        @staticmethod
        def count() -> int:
            return 1

        def name(self) -> str:
            return st.gpu_name

        def compute_capability(self) -> tuple[int, int]:
            return st.cc

        def retain_primary_context(self) -> Context:
            return Context(self)  # not made current: the caller pushes it

        def make_context(self, flags: int = 0) -> Context:
            ctx = Context(self)
            ctx.push()
            return ctx

    class DeviceAllocation:
        def __init__(self, nbytes: int) -> None:
            self.nbytes = int(nbytes)
            self.buf = bytearray(self.nbytes)
            self.addr = st.next_address
            st.next_address += -(-self.nbytes // 0x10_0000) * 0x10_0000 + 0x10_0000  # 1 MiB aligned, a gap after
            self.freed = False
            st.allocations[self.addr] = self

        def __int__(self) -> int:
            return self.addr

        def free(self) -> None:
            st.require("cuMemFree")
            if not self.freed:
                self.freed = True
                st.allocations.pop(self.addr, None)

    def mem_alloc(nbytes: int) -> DeviceAllocation:
        st.require("cuMemAlloc")
        if nbytes <= 0:
            raise LogicError("cuMemAlloc failed: invalid argument")
        return DeviceAllocation(nbytes)

    def pagelocked_empty(shape, dtype, order: str = "C", mem_flags: int = 0) -> PinnedArray:
        st.require("cuMemHostAlloc")
        return np.empty(shape, dtype, order=order).view(PinnedArray)

    def pagelocked_zeros(shape, dtype, order: str = "C", mem_flags: int = 0) -> PinnedArray:
        a = pagelocked_empty(shape, dtype, order, mem_flags)
        a[...] = 0
        return a

    def _device(dest, nbytes: int, what: str) -> tuple[DeviceAllocation, int]:
        addr = int(dest)
        alloc, off = st.memory(addr, nbytes, what)
        return alloc, off  # type: ignore[return-value]

    def _host_src(src: np.ndarray, what: str, pinned: bool) -> None:
        if not isinstance(src, np.ndarray) or not src.flags.c_contiguous:
            raise ContractError(f"{what}: host buffer must be a C-contiguous numpy array")
        if pinned and not isinstance(src, PinnedArray):
            raise ContractError(f"{what}: host memory is pageable; async copies need pagelocked_empty() buffers "
                                "(a pageable copy is silently synchronous or corrupts under load)")

    class Stream:
        def __init__(self, flags: int = 0) -> None:
            st.require("cuStreamCreate")
            self.owner = threading.current_thread()
            self.handle = next(st.handles)
            self.ops: list = []
            st.streams[self.handle] = self

        def enqueue(self, op, what: str) -> None:
            _owner_check(self.owner, f"stream ({what})")
            st.require(what)
            self.ops.append(op)

        def synchronize(self) -> None:
            _owner_check(self.owner, "stream.synchronize")
            st.require("cuStreamSynchronize")
            ops, self.ops = self.ops, []
            for op in ops:
                op()

        def is_done(self) -> bool:
            return not self.ops

    def memcpy_htod(dest, src) -> None:
        st.require("cuMemcpyHtoD")
        src = np.asarray(src)
        _host_src(src, "memcpy_htod", pinned=False)
        alloc, off = _device(dest, src.nbytes, "memcpy_htod")
        alloc.buf[off:off + src.nbytes] = src.tobytes()
        st.copied["htod"] += src.nbytes

    def memcpy_dtoh(dest, src) -> None:
        st.require("cuMemcpyDtoH")
        _host_src(dest, "memcpy_dtoh", pinned=False)
        alloc, off = _device(src, dest.nbytes, "memcpy_dtoh")
        dest.reshape(-1).view(np.uint8)[:] = np.frombuffer(alloc.buf, np.uint8, dest.nbytes, off)
        st.copied["dtoh"] += dest.nbytes

    def _stream_of(stream) -> Stream:
        if stream is None:
            raise ContractError("async copy without a stream: the legacy default stream serialises everything")
        return stream

    def memcpy_htod_async(dest, src, stream=None) -> None:
        st.require("cuMemcpyHtoDAsync")
        _host_src(src, "memcpy_htod_async", pinned=True)
        alloc, off = _device(dest, src.nbytes, "memcpy_htod_async")

        def op() -> None:  # reads the host buffer when the stream runs, as the GPU would
            alloc.buf[off:off + src.nbytes] = src.tobytes()
            st.copied["htod"] += src.nbytes

        _stream_of(stream).enqueue(op, "cuMemcpyHtoDAsync")

    def memcpy_dtoh_async(dest, src, stream=None) -> None:
        st.require("cuMemcpyDtoHAsync")
        _host_src(dest, "memcpy_dtoh_async", pinned=True)
        alloc, off = _device(src, dest.nbytes, "memcpy_dtoh_async")

        def op() -> None:
            dest.reshape(-1).view(np.uint8)[:] = np.frombuffer(alloc.buf, np.uint8, dest.nbytes, off)
            st.copied["dtoh"] += dest.nbytes

        _stream_of(stream).enqueue(op, "cuMemcpyDtoHAsync")

    def _dtod(dest, src, size: int, what: str):
        d_alloc, d_off = _device(dest, size, what)
        s_alloc, s_off = _device(src, size, what)

        def op() -> None:  # device to device: no host memory involved
            d_alloc.buf[d_off:d_off + size] = bytes(s_alloc.buf[s_off:s_off + size])
            st.copied["dtod"] += size

        return op

    def memcpy_dtod(dest, src, size) -> None:
        st.require("cuMemcpyDtoD")
        _dtod(dest, src, int(size), "memcpy_dtod")()

    def memcpy_dtod_async(dest, src, size, stream=None) -> None:
        st.require("cuMemcpyDtoDAsync")
        _stream_of(stream).enqueue(_dtod(dest, src, int(size), "memcpy_dtod_async"), "cuMemcpyDtoDAsync")

    for name, obj in list(locals().items()):
        if not name.startswith("_") and name not in ("st", "cuda"):
            setattr(cuda, name, obj)
    return cuda


# ---------------------------------------------------------------------------------------------
# tensorrt
# ---------------------------------------------------------------------------------------------


class Dims(tuple):
    """trt.Dims: a sequence of ints; -1 marks a dynamic dimension."""


def _make_trt(gpu: FakeGPU) -> types.ModuleType:
    st = gpu.state
    version = gpu.trt_version
    major = int(version.split(".")[0])
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version  # type: ignore[attr-defined]

    class ILogger:
        class Severity(enum.IntEnum):
            INTERNAL_ERROR = 0
            ERROR = 1
            WARNING = 2
            INFO = 3
            VERBOSE = 4

        INTERNAL_ERROR = Severity.INTERNAL_ERROR
        ERROR = Severity.ERROR
        WARNING = Severity.WARNING
        INFO = Severity.INFO
        VERBOSE = Severity.VERBOSE

        def __init__(self) -> None:
            pass

    class Logger(ILogger):
        def __init__(self, min_severity=ILogger.WARNING) -> None:
            self.min_severity = min_severity
            self.messages: list[tuple[int, str]] = []

        def log(self, severity, msg: str) -> None:
            if severity <= self.min_severity:
                self.messages.append((int(severity), msg))
            if severity <= ILogger.ERROR:
                gpu.errors.append(msg)

    names = ["FLOAT", "HALF", "INT8", "INT32", "BOOL", "UINT8"] + (["FP8", "BF16", "INT64", "INT4"] if major >= 10
                                                                    else [])
    DataType = enum.Enum("DataType", names)
    np_of = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "BOOL": np.bool_,
             "UINT8": np.uint8, "INT64": np.int64}

    def nptype(trt_type) -> type:
        return np_of[trt_type.name]

    def volume(iterable) -> int:
        return int(np.prod(list(iterable)))

    TensorIOMode = enum.Enum("TensorIOMode", ["NONE", "INPUT", "OUTPUT"])
    flag_names = ["EXPLICIT_BATCH"] + (["STRONGLY_TYPED"] if major >= 10 else ["EXPLICIT_PRECISION"])
    NetworkDefinitionCreationFlag = enum.IntEnum(
        "NetworkDefinitionCreationFlag", {n: i for i, n in enumerate(flag_names)})
    BuilderFlag = enum.IntEnum("BuilderFlag", {n: i for i, n in enumerate(
        ["FP16", "INT8", "DEBUG", "GPU_FALLBACK", "REFIT", "DISABLE_TIMING_CACHE", "TF32", "SPARSE_WEIGHTS",
         "OBEY_PRECISION_CONSTRAINTS"])})
    MemoryPoolType = enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0, "DLA_MANAGED_SRAM": 1,
                                                     "DLA_LOCAL_DRAM": 2, "DLA_GLOBAL_DRAM": 3})
    CalibrationAlgoType = enum.IntEnum("CalibrationAlgoType", {
        "LEGACY_CALIBRATION": 0, "ENTROPY_CALIBRATION": 1, "ENTROPY_CALIBRATION_2": 2, "MINMAX_CALIBRATION": 3})

    class IHostMemory(bytes):
        @property
        def nbytes(self) -> int:
            return len(self)

    class IInt8Calibrator:
        def __init__(self) -> None:
            self._trt_base_initialised = True

        def get_algorithm(self):
            return CalibrationAlgoType.ENTROPY_CALIBRATION_2

    class IInt8EntropyCalibrator2(IInt8Calibrator):
        pass

    class ITensor:
        def __init__(self, name: str, shape: Dims, dtype) -> None:
            self.name, self.shape, self.dtype = name, shape, dtype

    class INetworkDefinition:
        def __init__(self, flags: int) -> None:
            self.flags = flags
            self.explicit_batch = major >= 10 or bool(flags & (1 << int(NetworkDefinitionCreationFlag.EXPLICIT_BATCH)))
            self.onnx: bytes | None = None
            self.inputs: list[ITensor] = []
            self.outputs: list[ITensor] = []

        @property
        def num_inputs(self) -> int:
            return len(self.inputs)

        @property
        def num_outputs(self) -> int:
            return len(self.outputs)

        def get_input(self, index: int) -> ITensor:
            return self.inputs[index]

        def get_output(self, index: int) -> ITensor:
            return self.outputs[index]

    def _dims(shape) -> Dims:
        return Dims(d if isinstance(d, int) and d > 0 else -1 for d in shape)

    class OnnxParser:
        def __init__(self, network: INetworkDefinition, logger: Logger) -> None:
            self.network, self.logger = network, logger
            self.errors: list[str] = []

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, index: int) -> str:
            return self.errors[index]

        def parse(self, model: bytes, path: str | None = None) -> bool:
            if not self.network.explicit_batch:
                self.errors.append("ModelImporter: the ONNX parser only supports networks with an explicit "
                                   "batch dimension (create_network needs EXPLICIT_BATCH)")
                return False
            try:
                sess = ort.InferenceSession(bytes(model), providers=["CPUExecutionProvider"])
            except Exception as e:
                self.errors.append(f"ModelImporter: {e}")
                return False
            self.network.onnx = bytes(model)
            self.network.inputs = [ITensor(i.name, _dims(i.shape), DataType.FLOAT) for i in sess.get_inputs()]
            self.network.outputs = [ITensor(o.name, _dims(o.shape), DataType.FLOAT) for o in sess.get_outputs()]
            return True

    class IOptimizationProfile:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple[Dims, Dims, Dims]] = {}

        def set_shape(self, input: str, min, opt, max) -> None:
            lo, mid, hi = Dims(min), Dims(opt), Dims(max)
            if not (len(lo) == len(mid) == len(hi)) or any(
                    not (a <= b <= c) for a, b, c in zip(lo, mid, hi, strict=True)):
                raise ValueError(f"set_shape({input}): need min <= opt <= max, got {lo} {mid} {hi}")
            self.shapes[input] = (lo, mid, hi)

        def get_shape(self, input: str):
            return list(self.shapes[input])

        def __bool__(self) -> bool:
            return bool(self.shapes)

    class ITimingCache:
        def __init__(self, header: dict, entries: set[str]) -> None:
            self.header, self.entries = header, set(entries)

        def serialize(self) -> IHostMemory:
            return IHostMemory(TIMING_MAGIC + json.dumps({**self.header, "entries": sorted(self.entries)}).encode())

        def combine(self, input_cache: ITimingCache, ignore_mismatch: bool) -> bool:
            if input_cache.header != self.header and not ignore_mismatch:
                return False
            self.entries |= input_cache.entries
            return True

        def reset(self) -> bool:
            self.entries.clear()
            return True

    here = {"trt": version, "gpu": st.gpu_name, "cc": list(st.cc)}

    class IBuilderConfig:
        def __init__(self) -> None:
            self.flags: set[str] = set()
            self.pools: dict[int, int] = {}
            self.profiles: list[IOptimizationProfile] = []
            self.calibration_profile: IOptimizationProfile | None = None
            self._calibrator = None
            self.timing_cache: ITimingCache | None = None

        def set_flag(self, flag) -> None:
            self.flags.add(BuilderFlag(flag).name)

        def clear_flag(self, flag) -> None:
            self.flags.discard(BuilderFlag(flag).name)

        def get_flag(self, flag) -> bool:
            return BuilderFlag(flag).name in self.flags

        def set_memory_pool_limit(self, pool, pool_size: int) -> None:
            self.pools[int(MemoryPoolType(pool))] = int(pool_size)

        def get_memory_pool_limit(self, pool) -> int:
            return self.pools.get(int(MemoryPoolType(pool)), 1 << 40)

        @property
        def int8_calibrator(self):
            return self._calibrator

        @int8_calibrator.setter
        def int8_calibrator(self, calib) -> None:
            if calib is not None and not isinstance(calib, IInt8Calibrator):
                raise TypeError("int8_calibrator: incompatible type (expected a tensorrt.IInt8Calibrator)")
            self._calibrator = calib

        def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
            if not profile:
                return -1
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def set_calibration_profile(self, profile: IOptimizationProfile) -> bool:
            if not profile:
                return False
            self.calibration_profile = profile
            return True

        def get_calibration_profile(self):
            return self.calibration_profile

        def create_timing_cache(self, serialized_timing_cache) -> ITimingCache | None:
            blob = bytes(serialized_timing_cache)
            if not blob:
                return ITimingCache(dict(here), set())
            if not blob.startswith(TIMING_MAGIC):
                gpu.errors.append("createTimingCache: invalid serialized timing cache")
                return None
            data = json.loads(blob[len(TIMING_MAGIC):])
            entries = set(data.pop("entries"))
            return ITimingCache(data, entries)

        def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
            if cache.header != here and not ignore_mismatch:
                gpu.errors.append("setTimingCache: timing cache header mismatch (another device or version)")
                return False
            self.timing_cache = cache
            return True

        def get_timing_cache(self) -> ITimingCache | None:
            return self.timing_cache

    if major < 10:  # deprecated in 8.x, removed in 10
        IBuilderConfig.max_workspace_size = 1 << 30  # type: ignore[attr-defined]

    class Builder:
        def __init__(self, logger: Logger) -> None:
            self.logger = logger
            self.platform_has_fast_fp16 = True
            self.platform_has_fast_int8 = True

        def create_network(self, flags: int = 0) -> INetworkDefinition:
            return INetworkDefinition(flags)

        def create_builder_config(self) -> IBuilderConfig:
            return IBuilderConfig()

        def create_optimization_profile(self) -> IOptimizationProfile:
            return IOptimizationProfile()

        def _fail(self, msg: str) -> None:
            self.logger.log(ILogger.ERROR, msg)
            return None

        def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig):
            st.require("buildSerializedNetwork (cudaMalloc)")
            if network.onnx is None:
                return self._fail("network is empty (was the ONNX model parsed?)")
            if not network.explicit_batch:
                return self._fail("implicit batch networks are not supported by the ONNX parser")
            if not config.profiles:
                return self._fail("Network has dynamic or shape inputs, but no optimization profile has been defined.")
            inp = network.inputs[0]
            prof = config.profiles[0]
            for t in network.inputs:
                if t.name not in prof.shapes:
                    return self._fail(f"optimization profile is missing values for input {t.name}")
                a_lo, _, a_hi = prof.shapes[t.name]
                if len(a_lo) != len(t.shape):
                    return self._fail(f"profile {a_lo}..{a_hi} has the wrong rank for input {t.name} {t.shape}")
                for d, a, c in zip(t.shape, a_lo, a_hi, strict=True):
                    if d != -1 and not (a == d == c):
                        return self._fail(f"profile {a_lo}..{a_hi} conflicts with the static input shape {t.shape}")
            lo, opt, hi = prof.shapes[inp.name]
            precision = "int8" if "INT8" in config.flags else "fp16" if "FP16" in config.flags else "fp32"
            scale, batches, from_cache = None, 0, False
            if precision == "int8":
                got = self._calibrate(network, config)
                if got is None:
                    return None
                scale, batches, from_cache = got
            onnx_sha = hashlib.sha256(network.onnx).hexdigest()
            tactics = {f"{onnx_sha[:16]}:{precision}:{hi}:layer{k}" for k in range(4)}
            cache = config.timing_cache or ITimingCache(dict(here), set())
            hits = len(tactics & cache.entries)
            cache.entries |= tactics
            config.timing_cache = cache
            gpu.builds.append(BuildRecord(
                precision=precision, flags=set(config.flags), profile=(tuple(lo), tuple(opt), tuple(hi)),
                workspace=config.pools.get(int(MemoryPoolType.WORKSPACE)), timing_hits=hits,
                timing_misses=len(tactics) - hits, calibration_batches=batches,
                calibration_from_cache=from_cache, thread=threading.current_thread().name))
            profiles = {t.name: [list(x) for x in prof.shapes[t.name]] for t in network.inputs}
            meta = {**here, "precision": precision, "input": inp.name, "profiles": profiles,
                    "int8_scale": scale, "outputs": [o.name for o in network.outputs]}
            return IHostMemory(PLAN_MAGIC + json.dumps(meta).encode() + b"\n" + network.onnx)

        def _calibrate(self, network: INetworkDefinition, config: IBuilderConfig):
            calib = config.int8_calibrator
            if calib is None:
                self._fail("Calibration failure occurred with no scaling factors detected (INT8 without a "
                           "calibrator or Q/DQ nodes)")
                return None
            if not getattr(calib, "_trt_base_initialised", False):
                raise TypeError("tensorrt.IInt8EntropyCalibrator2.__init__() must be called when overriding __init__")
            cached = calib.read_calibration_cache()
            if cached:
                blob = bytes(cached)
                if blob.startswith(CALIB_MAGIC):
                    return float(json.loads(blob[len(CALIB_MAGIC):])["scale"]), 0, True
            prof = config.calibration_profile or config.profiles[0]
            inp = network.inputs[0]
            opt = prof.shapes[inp.name][1]
            bs = calib.get_batch_size()
            if bs != opt[0]:
                self._fail(f"calibration batch size {bs} differs from the calibration profile's opt batch {opt[0]}")
                return None
            nbytes = int(np.prod(opt)) * 4
            amax, n = 0.0, 0
            while True:
                ptrs = calib.get_batch([inp.name])
                if not ptrs:
                    break
                if len(ptrs) != 1:
                    raise ContractError(f"get_batch returned {len(ptrs)} pointers for 1 input")
                alloc, off = st.memory(int(ptrs[0]), nbytes, "calibration get_batch")
                x = np.frombuffer(alloc.buf, np.float32, nbytes // 4, off)  # type: ignore[attr-defined]
                amax = max(amax, float(np.abs(x).max()))
                n += 1
            if n == 0:
                self._fail("Calibration failure: the calibrator gave no batches")
                return None
            scale = max(amax, 1e-8) / 127.0
            calib.write_calibration_cache(CALIB_MAGIC + json.dumps({"scale": scale}).encode())
            return scale, n, False

    if major < 10:
        def build_engine(self, network, config):  # 8.x only
            raise ContractError("build_engine is deprecated in 8.x and removed in 10.x; use build_serialized_network")

        Builder.build_engine = build_engine  # type: ignore[attr-defined]
        Builder.max_batch_size = 1  # type: ignore[attr-defined]

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, serialized_engine) -> ICudaEngine | None:
            st.require("deserializeCudaEngine")
            blob = bytes(serialized_engine)
            if not blob.startswith(PLAN_MAGIC):
                self.logger.log(ILogger.ERROR,
                                "1: [runtime.cpp] Error Code 1: Serialization (magic tag does not match)")
                return None
            head, _, onnx = blob[len(PLAN_MAGIC):].partition(b"\n")
            try:
                meta = json.loads(head)
                ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
            except Exception as e:
                self.logger.log(ILogger.ERROR, f"1: [runtime.cpp] Error Code 1: Serialization (corrupt plan: {e})")
                return None
            if meta["trt"] != version:
                self.logger.log(ILogger.ERROR, "The engine plan file is not compatible with this version of TensorRT, "
                                f"expecting library version {version} got {meta['trt']}")
                return None
            if (meta["gpu"], meta["cc"]) != (st.gpu_name, list(st.cc)):
                self.logger.log(ILogger.ERROR, "The engine plan file is generated on an incompatible device")
                return None
            gpu.deserialized += 1
            return ICudaEngine(meta, onnx)

    class ICudaEngine:
        def __init__(self, meta: dict, onnx: bytes) -> None:
            self.owner = threading.current_thread()
            self.meta = meta
            self.session = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
            self.profiles = {k: [Dims(s) for s in v] for k, v in meta["profiles"].items()}
            self.tensors: dict[str, tuple] = {}
            for i in self.session.get_inputs():
                self.tensors[i.name] = (TensorIOMode.INPUT, _dims(i.shape))
            for o in self.session.get_outputs():
                self.tensors[o.name] = (TensorIOMode.OUTPUT, _dims(o.shape))
            self.input_names = [i.name for i in self.session.get_inputs()]
            self.output_names = [o.name for o in self.session.get_outputs()]
            self.input_name = self.input_names[0]
            self._shapes: dict[tuple, dict[str, tuple[int, ...]]] = {}
            self.precision = meta["precision"]
            self.int8_scale = meta["int8_scale"]

        def _check(self, what: str) -> None:
            _owner_check(self.owner, f"ICudaEngine.{what}")

        @property
        def num_io_tensors(self) -> int:
            return len(self.tensors)

        def get_tensor_name(self, index: int) -> str:
            return list(self.tensors)[index]

        def get_tensor_mode(self, name: str):
            return self.tensors.get(name, (TensorIOMode.NONE,))[0]

        def get_tensor_shape(self, name: str) -> Dims:
            return self.tensors[name][1]

        def get_tensor_dtype(self, name: str):
            return DataType.FLOAT

        def get_tensor_profile_shape(self, name: str, profile_index: int):
            if name not in self.profiles or profile_index != 0:
                raise ValueError("no such profile or input")
            return list(self.profiles[name])

        def create_execution_context(self) -> IExecutionContext:
            self._check("create_execution_context")
            st.require("createExecutionContext")
            return IExecutionContext(self)

        def _output_shapes(self, inputs: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
            """What TensorRT's shape inference knows once the input shapes are set: every output's shape
            (learnt here by running the graph once on zeros of those shapes, then remembered)."""
            key = tuple(sorted(inputs.items()))
            if key not in self._shapes:
                outs = self.session.run(None, {k: np.zeros(v, np.float32) for k, v in inputs.items()})
                self._shapes[key] = {n: tuple(o.shape) for n, o in zip(self.output_names, outs, strict=True)}
            return self._shapes[key]

        def _run(self, xs: dict[str, np.ndarray]) -> list[np.ndarray]:
            """What the GPU computes: the same ONNX graph, at this engine's precision."""
            feed = {}
            for name, x in xs.items():
                if self.precision == "int8":
                    s = self.int8_scale
                    x = np.clip(np.round(x / s), -127, 127).astype(np.float32) * np.float32(s)
                if self.precision in ("fp16", "int8"):
                    x = x.astype(np.float16).astype(np.float32)
                feed[name] = x
            ys = [y.astype(np.float32) for y in self.session.run(None, feed)]
            if self.precision in ("fp16", "int8"):
                ys = [y.astype(np.float16).astype(np.float32) for y in ys]
            return ys

    if major < 10:  # the binding API, gone in 10.x
        def num_bindings(self):
            return len(self.tensors)

        def get_binding_name(self, i):
            return list(self.tensors)[i]

        def binding_is_input(self, i):
            return list(self.tensors.values())[i][0] == TensorIOMode.INPUT

        def get_binding_shape(self, i):
            return list(self.tensors.values())[i][1]

        ICudaEngine.num_bindings = property(num_bindings)  # type: ignore[attr-defined]
        ICudaEngine.get_binding_name = get_binding_name  # type: ignore[attr-defined]
        ICudaEngine.binding_is_input = binding_is_input  # type: ignore[attr-defined]
        ICudaEngine.get_binding_shape = get_binding_shape  # type: ignore[attr-defined]
        ICudaEngine.max_batch_size = 1  # type: ignore[attr-defined]

    class IExecutionContext:
        def __init__(self, engine: ICudaEngine) -> None:
            self.engine = engine
            self.owner = threading.current_thread()
            self.shapes: dict[str, Dims] = {}
            self.addresses: dict[str, int] = {}

        def _err(self, msg: str) -> bool:
            gpu.errors.append(msg)
            return False

        def set_input_shape(self, name: str, shape) -> bool:
            _owner_check(self.owner, "IExecutionContext.set_input_shape")
            mode, dims = self.engine.tensors.get(name, (TensorIOMode.NONE, None))
            if mode != TensorIOMode.INPUT:
                return self._err(f"setInputShape: {name} is not an input tensor")
            shape = Dims(int(d) for d in shape)
            lo, _, hi = self.engine.profiles[name]
            if len(shape) != len(dims) or any(not (a <= s <= c) for s, a, c in zip(shape, lo, hi, strict=False)):
                return self._err(f"setInputShape: {list(shape)} is outside the profile {list(lo)}..{list(hi)}")
            self.shapes[name] = shape
            return True

        def get_tensor_shape(self, name: str) -> Dims:
            _owner_check(self.owner, "IExecutionContext.get_tensor_shape")
            mode, dims = self.engine.tensors[name]
            if mode == TensorIOMode.INPUT:
                return self.shapes.get(name, dims)
            if any(n not in self.shapes for n in self.engine.input_names):
                return Dims((-1, *dims[1:]))  # unknown until every input has its shape
            return Dims(self.engine._output_shapes(dict(self.shapes))[name])

        def set_tensor_address(self, name: str, memory: int) -> bool:
            _owner_check(self.owner, "IExecutionContext.set_tensor_address")
            if name not in self.engine.tensors:
                return self._err(f"setTensorAddress: no tensor named {name}")
            if not isinstance(memory, int):
                raise TypeError("set_tensor_address: memory must be an int device pointer")
            if memory % 256:  # NvInferRuntime.h, setTensorAddress: "at least 256-byte alignment"
                return self._err(f"setTensorAddress: the address of {name} ({memory:#x}) is not 256-byte aligned")
            self.addresses[name] = memory
            return True

        def execute_async_v3(self, stream_handle: int) -> bool:
            _owner_check(self.owner, "IExecutionContext.execute_async_v3")
            st.require("enqueueV3")
            for name, (mode, _) in self.engine.tensors.items():
                if name not in self.addresses:
                    return self._err(f"enqueueV3: Neither address or allocator is set for "
                                     f"{'input' if mode == TensorIOMode.INPUT else 'output'} tensor {name}. "
                                     "Call setInputTensorAddress, setTensorAddress or setOutputAllocator before "
                                     "enqueue/execute.")
                if mode == TensorIOMode.INPUT and name not in self.shapes:
                    return self._err(f"enqueueV3: input tensor {name} has no shape (call set_input_shape)")
            stream = st.streams.get(stream_handle)
            if stream is None:
                return self._err(f"enqueueV3: invalid stream handle {stream_handle}")
            reads = []  # (name, shape, allocation, offset) of every input, checked now as TensorRT does
            for name in self.engine.input_names:
                shape = self.shapes[name]
                nbytes = int(np.prod(shape)) * 4
                alloc, off = st.memory(self.addresses[name], nbytes, f"enqueueV3 input {name}")
                reads.append((name, shape, alloc, off, nbytes))
            out_shapes = self.engine._output_shapes({n: tuple(self.shapes[n]) for n in self.engine.input_names})
            writes = [(n, self.addresses[n]) for n in self.engine.output_names]

            def op() -> None:
                xs = {name: np.frombuffer(alloc.buf, np.float32, nbytes // 4, off).reshape(shape).copy()  # type: ignore
                      for name, shape, alloc, off, nbytes in reads}
                for (name, addr), y in zip(writes, self.engine._run(xs), strict=True):
                    assert y.shape == out_shapes[name]
                    alloc, off = st.memory(addr, y.nbytes, f"enqueueV3 output {name}")
                    alloc.buf[off:off + y.nbytes] = y.tobytes()  # type: ignore[attr-defined]
                gpu.executions += 1

            stream.enqueue(op, "enqueueV3")  # type: ignore[attr-defined]
            return True

    if major < 10:
        def execute_async_v2(self, bindings, stream_handle):
            raise ContractError("execute_async_v2 (binding API) is gone in TensorRT 10; use execute_async_v3")

        IExecutionContext.execute_async_v2 = execute_async_v2  # type: ignore[attr-defined]
        IExecutionContext.set_binding_shape = execute_async_v2  # type: ignore[attr-defined]

    exported = dict(
        ILogger=ILogger, Logger=Logger, DataType=DataType, nptype=nptype, volume=volume, TensorIOMode=TensorIOMode,
        NetworkDefinitionCreationFlag=NetworkDefinitionCreationFlag, BuilderFlag=BuilderFlag,
        MemoryPoolType=MemoryPoolType, CalibrationAlgoType=CalibrationAlgoType, IHostMemory=IHostMemory,
        IInt8Calibrator=IInt8Calibrator, IInt8EntropyCalibrator2=IInt8EntropyCalibrator2, ITensor=ITensor,
        INetworkDefinition=INetworkDefinition, OnnxParser=OnnxParser, IOptimizationProfile=IOptimizationProfile,
        ITimingCache=ITimingCache, IBuilderConfig=IBuilderConfig, Builder=Builder, Runtime=Runtime,
        ICudaEngine=ICudaEngine, IExecutionContext=IExecutionContext, Dims=Dims,
    )
    for k, v in exported.items():
        setattr(trt, k, v)
    return trt


class FakeGPU:
    """One fake Jetson: a `tensorrt` module of the given version and a `pycuda.driver` for its GPU."""

    def __init__(self, trt_version: str = "10.3.0", gpu_name: str = "Orin", cc: tuple[int, int] = (8, 7)) -> None:
        self.trt_version = trt_version
        self.state = _Cuda(gpu_name, cc)
        self.builds: list[BuildRecord] = []
        self.errors: list[str] = []
        self.executions = 0
        self.deserialized = 0
        self.cuda = _make_cuda(self.state)
        self.trt = _make_trt(self)
        self.pycuda = types.ModuleType("pycuda")
        self.pycuda.driver = self.cuda  # type: ignore[attr-defined]
        self.pycuda.__path__ = []  # type: ignore[attr-defined]  # a package, so "pycuda.driver" imports

    def install(self, monkeypatch) -> None:
        """Make ``import tensorrt`` and ``import pycuda.driver`` return this fake (for CLI tests)."""
        monkeypatch.setitem(__import__("sys").modules, "tensorrt", self.trt)
        monkeypatch.setitem(__import__("sys").modules, "pycuda", self.pycuda)
        monkeypatch.setitem(__import__("sys").modules, "pycuda.driver", self.cuda)

    @property
    def copied(self) -> dict[str, int]:
        """Bytes copied so far, by kind: host to device, device to host, device to device."""
        return self.state.copied

    def live_allocations(self) -> int:
        return len(self.state.allocations)
