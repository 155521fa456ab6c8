"""`camtrap-edge compile` and `camtrap-edge selftest`: build a bundle's engines, then prove them.

The self-test is what a user runs on a Jetson to trust the TensorRT path: the bundle's
sample images go through the chosen backend and the device's own decoder, and each model's
detections must match the ones the workstation recorded in the manifest (same species, box
IoU >= 0.9, score within the tolerance). It also times each model. Exit status: 0 when all
match, 1 on any mismatch, 2 on bad input (an unreadable or unverifiable bundle).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge.keys import add_trust_options, describe, trust_from_args

if TYPE_CHECKING:
    from edge.bundle import Bundle
    from edge.engines import Engine, EngineConfig


@dataclass
class ModelCheck:
    name: str
    images: int
    problems: list[str] = field(default_factory=list)
    mean_ms: float = 0.0
    p95_ms: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class SelftestReport:
    backend: str
    models: list[ModelCheck]

    @property
    def ok(self) -> bool:
        return all(m.ok for m in self.models)


def selftest(bundle: Bundle, backend: str | EngineConfig = "onnxruntime", *, tolerance: float = 0.02,
             min_iou: float = 0.9, runs: int = 20, engines: Mapping[str, Engine] | None = None,
             runtime: Mapping[str, Any] | None = None, **cfg: Any) -> SelftestReport:
    """Run every model on the bundle's samples and compare with the manifest's expectations.

    ``engines``: already-loaded engines to test (else they are loaded, and closed after).
    """
    from edge.detection import Detection
    from edge.engines import compare_detections, detect_batch, load_engines, read_samples
    from edge.vision import letterbox_batch

    samples = bundle.manifest.samples
    if not samples:
        raise ValueError(f"{bundle.source}: the bundle has no sample images to test against")
    images = read_samples(bundle)
    own = engines is None
    loaded = dict(engines) if engines is not None else load_engines(bundle, backend, runtime=runtime, **cfg)
    checks = []
    try:
        for entry in bundle.manifest.models:
            engine = loaded[entry.name]
            idx = [i for i, s in enumerate(samples) if entry.name in s.expected]
            check = ModelCheck(entry.name, len(idx))
            checks.append(check)
            if not idx:
                check.problems.append("the manifest records no expected outputs for this model")
                continue
            x, lbs = letterbox_batch([images[i] for i in idx], entry.imgsz)
            got = detect_batch(engine.infer(x), entry, lbs)
            floors = {c: entry.threshold(c) for c in entry.classes}
            for i, dets in zip(idx, got, strict=True):
                expected = [Detection.from_dict(d) for d in samples[i].expected[entry.name]]
                check.problems += [f"{samples[i].file}: {p}" for p in compare_detections(
                    expected, dets, min_iou=min_iou, score_tol=tolerance, thresholds=floors)]
            times = []
            for _ in range(max(runs, 1)):
                t = time.perf_counter()
                engine.infer(x[:1])
                times.append((time.perf_counter() - t) * 1000.0)
            check.mean_ms, check.p95_ms = float(np.mean(times)), float(np.percentile(times, 95))
    finally:
        if own:
            for e in loaded.values():
                e.close()
    return SelftestReport(backend if isinstance(backend, str) else backend.type, checks)


# --- CLI -----------------------------------------------------------------------------------------


def _engine(args: argparse.Namespace) -> EngineConfig:
    """The engine settings: the device config's ``engine:`` section (--config: exactly what the daemon
    will build, so its plans are the ones compiled here), or the backend and flags given."""
    from edge.engines import make_config

    flags = {"--backend": args.backend, "--precision": args.precision, "--cache": args.cache,
             "--max-batch": args.max_batch}
    if args.config:
        from edge.config import load_config

        given = [k for k, v in flags.items() if v]
        if given:
            raise ValueError(f"{args.config}: --config takes the engine settings from its engine: section; "
                             f"drop {', '.join(given)} or set them there")
        cfg = load_config(args.config)
        if args.bundle is None:
            args.bundle = str(cfg.bundle.path)
        return cfg.engine
    if args.bundle is None:
        raise ValueError("give --bundle BUNDLE, or --config CONFIG for the device's own bundle and engine settings")
    backend = args.backend or args.default_backend
    settings: dict[str, Any] = {}
    if args.max_batch:
        settings["max_batch"] = args.max_batch
    if backend == "tensorrt":
        if args.precision:
            settings["precision"] = args.precision
        if args.cache:
            settings["cache_dir"] = Path(args.cache)
    elif args.precision or args.cache:
        raise ValueError(f"--precision and --cache apply to the tensorrt backend, not {backend}")
    return make_config(backend, **settings)


def _load(args: argparse.Namespace, tmp: str) -> Bundle:
    from edge.bundle import load_bundle

    if getattr(args, "config", None):  # the device config's keys folder and signature rule, as the daemon
        from edge.config import load_config

        b = load_config(args.config).bundle
        t = trust_from_args(args, [b.public_keys_dir] if b.public_keys_dir else [], b.require_signature)
    else:
        t = trust_from_args(args)
    return load_bundle(args.bundle, public_keys=t.public_keys, require_signature=t.require_signature,
                       extract_to=args.extract_to or tmp)


def _signed(bundle: Bundle) -> str:
    return describe(bundle.key_id)


def run_compile(args: argparse.Namespace) -> int:
    from edge.engines import load_engines

    engine = _engine(args)
    with tempfile.TemporaryDirectory(prefix="camtrap-bundle-") as tmp:
        bundle = _load(args, tmp)
        print(f"bundle {bundle.version} ({bundle.manifest_sha256[:12]}, {_signed(bundle)}), backend {engine.type}")
        t = time.monotonic()
        engines = load_engines(bundle, engine)
        try:
            for name, e in engines.items():
                d = e.describe()
                how = ""
                if "plan" in d:
                    state = f"built in {d['build_s']:.1f} s" if d["built"] else "cached"
                    how = f" {d['precision']} plan {d['plan']} ({state})"
                print(f"  {name}: ok, input {d['input']}, output {d['output']}{how}")
        finally:
            for e in engines.values():
                e.close()
    print(f"compiled {len(engines)} models in {time.monotonic() - t:.1f} s")
    return 0


def run_selftest(args: argparse.Namespace) -> int:
    engine = _engine(args)
    with tempfile.TemporaryDirectory(prefix="camtrap-bundle-") as tmp:
        bundle = _load(args, tmp)
        report = selftest(bundle, engine, tolerance=args.tolerance, min_iou=args.iou, runs=args.runs)
    print(f"selftest: bundle {bundle.version} ({bundle.manifest_sha256[:12]}, {_signed(bundle)}), "
          f"backend {report.backend}, {len(bundle.manifest.samples)} samples")
    print(f"  {'model':<16} {'images':>6} {'result':>7} {'mean ms':>8} {'p95 ms':>8}")
    for m in report.models:
        print(f"  {m.name:<16} {m.images:>6} {'ok' if m.ok else 'FAIL':>7} {m.mean_ms:>8.1f} {m.p95_ms:>8.1f}")
        for p in m.problems[:20]:
            print(f"      {p}")
    bad = sum(len(m.problems) for m in report.models)
    print("selftest: ok" if report.ok else f"selftest: FAILED ({bad} mismatches)")
    return 0 if report.ok else 1


def _common(p: argparse.ArgumentParser, backend: str) -> None:
    p.add_argument("--bundle", help="bundle folder or .tar/.tar.gz (with --config: default its bundle.path)")
    p.add_argument("--config", help="device config: build and test with its engine: section, exactly as the "
                   "daemon will (same settings, so the same cached TensorRT plans)")
    p.add_argument("--backend", choices=["onnxruntime", "tensorrt"], help=f"default {backend}")
    p.set_defaults(default_backend=backend)
    p.add_argument("--precision", choices=["fp16", "fp32", "int8"],
                   help="TensorRT precision (default fp16; int8 calibrates on the samples and must pass the "
                   "accuracy gate against fp16)")
    p.add_argument("--cache", help="TensorRT plan cache folder (default ~/.cache/camtrap/tensorrt)")
    p.add_argument("--max-batch", type=int, help="largest batch per inference")
    add_trust_options(p)
    p.add_argument("--extract-to", help="where to unpack an archive bundle (default: a temporary folder)")


def add_cli(sub: Any) -> None:
    c = sub.add_parser("compile", help="build the bundle's engines on this device (TensorRT plans, cached)")
    _common(c, "tensorrt")
    c.set_defaults(func=run_compile)
    s = sub.add_parser("selftest", help="run the bundle's samples and compare with the expected outputs")
    _common(s, "onnxruntime")
    s.add_argument("--tolerance", type=float, default=0.02, help="largest score difference accepted")
    s.add_argument("--iou", type=float, default=0.9, help="smallest box IoU accepted")
    s.add_argument("--runs", type=int, default=20, help="timed single-image runs per model")
    s.set_defaults(func=run_selftest)
