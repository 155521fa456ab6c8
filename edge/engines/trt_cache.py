"""Where built TensorRT plans and timing caches live, and what makes a plan reusable (pure + files).

A serialised plan is only valid for the TensorRT version and the GPU that built it, and it
bakes in the precision and the batch profile. So the cache key holds all of them, plus the
model's sha256 (and, for INT8, the calibration data's hash): change any of them and a new
plan is built rather than a stale one loaded. (Keying on the TensorRT version alone, as some
projects do, silently reuses a plan across precisions or GPUs.) The timing cache, which
records measured kernel timings, is shared by every model built on one TensorRT + GPU pair
and makes rebuilds much faster. Writes are atomic (temp file, fsync, rename), so a power cut
mid-write never leaves a truncated plan that looks valid.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from edge.atomic import atomic_write_bytes

ENV_CACHE_DIR = "CAMTRAP_TRT_CACHE"


@dataclass(frozen=True)
class PlanKey:
    model_sha256: str
    trt_version: str
    gpu_name: str
    compute_capability: str  # "8.7"
    precision: str  # fp32 | fp16 | int8
    max_batch: int
    imgsz: int | tuple[int, int]  # the manifest's input size: a square's side or (h, w)
    calibration_sha256: str | None = None  # INT8 only: the calibration images' hash

    def digest(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def filename(self) -> str:
        """Readable and unique: <model sha 12>-<precision>-b<max batch>-<key digest 16>.plan"""
        return f"{self.model_sha256[:12]}-{self.precision}-b{self.max_batch}-{self.digest()[:16]}.plan"


def default_cache_dir() -> Path:
    """$CAMTRAP_TRT_CACHE, else $XDG_CACHE_HOME/camtrap/tensorrt, else ~/.cache/camtrap/tensorrt."""
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "camtrap" / "tensorrt"


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", s).strip("-").lower() or "gpu"


def plan_path(cache_dir: Path, key: PlanKey) -> Path:
    return Path(cache_dir) / key.filename()


def timing_cache_path(cache_dir: Path, trt_version: str, gpu_name: str, compute_capability: str) -> Path:
    """One timing cache per TensorRT version and GPU: timings measured elsewhere are not valid here."""
    return Path(cache_dir) / f"timing-trt{_slug(trt_version)}-{_slug(gpu_name)}-sm{compute_capability}.cache"


def write_plan(path: Path, plan: bytes, key: PlanKey) -> None:
    """The plan, then a small JSON beside it saying what it was built from (for people)."""
    atomic_write_bytes(path, plan)
    atomic_write_bytes(path.with_suffix(".json"), json.dumps(asdict(key), indent=1, sort_keys=True).encode())


def remove_plan(path: Path) -> None:
    Path(path).unlink(missing_ok=True)
    Path(path).with_suffix(".json").unlink(missing_ok=True)
