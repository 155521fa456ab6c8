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

from edge.cli import number_in
from edge.keys import add_trust_options, describe, trust_from_args

if TYPE_CHECKING:
    from edge.bundle import Bundle
    from edge.cascade import Decision
    from edge.engines import Engine, EngineConfig


@dataclass
class ModelCheck:
    name: str
    images: int
    problems: list[str] = field(default_factory=list)
    mean_ms: float | None = None  # None: not timed (the shared-path checks)
    p95_ms: float | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class CascadeComparison:
    """The cascade over the samples through the shared backbone and through the whole models."""

    frames: int
    problems: list[str] = field(default_factory=list)
    shared_ms: float = 0.0  # per frame
    whole_ms: float = 0.0


@dataclass
class SelftestReport:
    backend: str
    models: list[ModelCheck]
    cascade: CascadeComparison | None = None  # with ``whole``: shared vs whole models

    @property
    def ok(self) -> bool:
        return all(m.ok for m in self.models) and (self.cascade is None or not self.cascade.problems)


def decision_differences(a: Decision, b: Decision, *, min_iou: float = 0.9, score_tol: float = 0.02) -> list[str]:
    """How two decisions on one frame differ (route, models run, animals); [] when they agree."""
    from edge.engines import compare_detections

    out = []
    if a.route.reason != b.route.reason or a.models_run != b.models_run:
        out.append(f"route {a.route.reason} {list(a.models_run)} vs {b.route.reason} {list(b.models_run)}")
    out += compare_detections(a.detections, b.detections, min_iou=min_iou, score_tol=score_tol)
    return out


def selftest(bundle: Bundle, backend: str | EngineConfig = "onnxruntime", *, tolerance: float = 0.02,
             min_iou: float = 0.9, runs: int = 20, engines: Mapping[str, Engine] | None = None,
             runtime: Mapping[str, Any] | None = None, whole: Bundle | None = None, **cfg: Any) -> SelftestReport:
    """Run every model on the bundle's samples and compare with the manifest's expectations.

    ``engines``: already-loaded engines to test (else they are loaded, and closed after).
    A shared-backbone bundle is also run as the daemon runs it: the backbone once over all
    samples, each head on every row and on a scattered subset of rows (the features stay in the
    backend's memory: on TensorRT, gathered on the GPU), each compared with the model's own run.
    ``whole``: the same models as whole graphs (``camtrap-export whole-models``); the cascade's
    decisions over the samples through both must agree frame by frame, and both are timed.
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
        checks += _shared_path_checks(bundle, loaded, images, tolerance=tolerance, min_iou=min_iou)
        cascade = None
        if whole is not None:
            cascade = _compare_with_whole(bundle, loaded, whole, backend, images, runs=runs, runtime=runtime,
                                          tolerance=tolerance, min_iou=min_iou, **cfg)
    finally:
        if own:
            for e in loaded.values():
                e.close()
    return SelftestReport(backend if isinstance(backend, str) else backend.type, checks, cascade)


def _shared_path_checks(bundle: Bundle, engines: Mapping[str, Engine], images: list[np.ndarray], *,
                        tolerance: float, min_iou: float) -> list[ModelCheck]:
    """Each head on backbone features computed once, over all rows and over a scattered subset,
    against the same model's ``infer`` (backbone + head) on the same images."""
    from edge.engines import compare_detections, detect_batch
    from edge.vision import letterbox_batch

    heads = {n: e for n, e in engines.items() if getattr(e, "backbone", None) is not None}
    if not heads or bundle.manifest.backbone is None:
        return []
    x, lbs = letterbox_batch(images, bundle.manifest.backbone.imgsz)
    subset = list(range(len(images)))[::-2]  # last first, every other: a gather, not a slice
    checks = []
    for name, engine in heads.items():
        entry = bundle.model_entry(name)
        check = ModelCheck(f"{name} (shared)", len(images))
        alone = detect_batch(engine.infer(x), entry, lbs)
        feats = engine.backbone.run(x)  # type: ignore[attr-defined]
        every = detect_batch(engine.run_features(feats), entry, lbs)  # type: ignore[attr-defined]
        some = detect_batch(engine.run_features({k: v[subset] for k, v in feats.items()}),  # type: ignore[attr-defined]
                            entry, [lbs[i] for i in subset])
        for label, rows, got in (("all rows", range(len(images)), every), ("rows " + str(subset), subset, some)):
            for i, dets in zip(rows, got, strict=True):
                check.problems += [f"{label}, sample {i}: {p}" for p in compare_detections(
                    alone[i], dets, min_iou=min_iou, score_tol=tolerance)]
        checks.append(check)
    return checks


def _compare_with_whole(bundle: Bundle, engines: Mapping[str, Engine], whole: Bundle,
                        backend: str | EngineConfig, images: list[np.ndarray], *, runs: int,
                        runtime: Mapping[str, Any] | None, tolerance: float, min_iou: float,
                        **cfg: Any) -> CascadeComparison:
    from edge.engines import load_engines
    from edge.runner import CascadeRunner

    if [m.name for m in whole.manifest.models] != [m.name for m in bundle.manifest.models]:
        raise ValueError(f"{whole.source}: its models {[m.name for m in whole.manifest.models]} are not "
                         f"{bundle.source}'s {[m.name for m in bundle.manifest.models]}")
    other = load_engines(whole, backend, runtime=runtime, **cfg)
    try:
        shared_runner = CascadeRunner(bundle.manifest, dict(engines))
        whole_runner = CascadeRunner(whole.manifest, other)
        cmp = CascadeComparison(len(images))
        a, b = shared_runner.classify(images), whole_runner.classify(images)
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            cmp.problems += [f"sample {i}: {p}" for p in decision_differences(
                x.decision, y.decision, min_iou=min_iou, score_tol=tolerance)]
        for runner, attr in ((shared_runner, "shared_ms"), (whole_runner, "whole_ms")):
            t = time.perf_counter()
            for _ in range(max(runs, 1)):
                runner.classify(images)
            setattr(cmp, attr, (time.perf_counter() - t) * 1000.0 / (max(runs, 1) * len(images)))
    finally:
        for e in other.values():
            e.close()
    return cmp


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


def _plan_note(d: Mapping[str, Any]) -> str:
    """' fp16 plan P (built in 3.2 s)' for a TensorRT engine's ``describe()``; '' for other backends."""
    if "plan" not in d:
        return ""
    state = f"built in {d['build_s']:.1f} s" if d["built"] else "cached"
    return f" {d['precision']} plan {d['plan']} ({state})"


def run_compile(args: argparse.Namespace) -> int:
    from edge.engines import load_engines

    engine = _engine(args)
    with tempfile.TemporaryDirectory(prefix="camtrap-bundle-") as tmp:
        bundle = _load(args, tmp)
        print(f"bundle {bundle.version} ({bundle.manifest_sha256[:12]}, {_signed(bundle)}), backend {engine.type}")
        t = time.monotonic()
        engines = load_engines(bundle, engine)
        try:
            backbones = {id(b): b for e in engines.values() if (b := getattr(e, "backbone", None)) is not None}
            for b in backbones.values():
                d = b.describe() if hasattr(b, "describe") else {}
                print(f"  backbone (shared): ok, outputs {list(b.entry.outputs)}{_plan_note(d)}")
            for name, e in engines.items():
                d = e.describe()
                print(f"  {name}: ok, input {d['input']}, output {d['output']}{_plan_note(d)}")
        finally:
            for e in engines.values():
                e.close()
    print(f"compiled {len(engines)} models in {time.monotonic() - t:.1f} s")
    return 0


def run_selftest(args: argparse.Namespace) -> int:
    engine = _engine(args)
    with tempfile.TemporaryDirectory(prefix="camtrap-bundle-") as tmp, \
            tempfile.TemporaryDirectory(prefix="camtrap-whole-") as tmp2:
        bundle = _load(args, tmp)
        whole = None
        if args.whole:
            whole = _load(argparse.Namespace(**{**vars(args), "bundle": args.whole, "extract_to": None}), tmp2)
        report = selftest(bundle, engine, tolerance=args.tolerance, min_iou=args.iou, runs=args.runs, whole=whole)
    print(f"selftest: bundle {bundle.version} ({bundle.manifest_sha256[:12]}, {_signed(bundle)}), "
          f"backend {report.backend}, {len(bundle.manifest.samples)} samples")
    print(f"  {'model':<16} {'images':>6} {'result':>7} {'mean ms':>8} {'p95 ms':>8}")
    for m in report.models:
        ms = "".join(f" {'-' if v is None else f'{v:.1f}':>8}" for v in (m.mean_ms, m.p95_ms))
        print(f"  {m.name:<16} {m.images:>6} {'ok' if m.ok else 'FAIL':>7}{ms}")
        for p in m.problems[:20]:
            print(f"      {p}")
    c = report.cascade
    if c is not None:
        print(f"  cascade on {c.frames} samples, shared backbone vs whole models: "
              f"{'same decisions' if not c.problems else 'DIFFERENT'}; {c.shared_ms:.1f} vs {c.whole_ms:.1f} ms/frame "
              f"({c.shared_ms / c.whole_ms if c.whole_ms else float('nan'):.2f}x)")
        for p in c.problems[:20]:
            print(f"      {p}")
    bad = sum(len(m.problems) for m in report.models) + (len(c.problems) if c else 0)
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
    s.add_argument("--tolerance", type=number_in(0, 1), default=0.02, help="largest score difference accepted")
    s.add_argument("--iou", type=number_in(0, 1), default=0.9, help="smallest box IoU accepted")
    s.add_argument("--runs", type=int, default=20, help="timed single-image runs per model")
    s.add_argument("--whole", help="the same models as whole graphs (`camtrap-export whole-models`): compare the "
                   "shared-backbone cascade's decisions and time with theirs")
    s.set_defaults(func=run_selftest)
