"""Runs a bundle's models on images: letterbox -> engine -> decode -> cascade.

Keeps the pure decision (edge.cascade) apart from the engines: this module only moves
arrays. Images of a burst go through each model as one batch, and each expert sees only
the images routed to it, so a burst of five costs one global batch plus one batch per
expert actually needed. With a shared backbone (edge/engines/shared.py) the frozen layers run
once per batch and each model runs only its head, on the rows of the features routed to it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from edge.cascade import CascadePolicy, Decision, Route, decide, plan, staged
from edge.detection import Detection
from edge.manifest import Manifest, ModelEntry
from edge.vision import Letterbox, class_thresholds, decode, letterbox_batch

# Decode below every threshold so the gate and the disposal floor can see weak animals;
# thresholds are applied by the cascade, not here.
DECODE_FLOOR = 0.05


class ModelRunner:
    """One model: batches in, detections (decoded at ``floor``) out."""

    def __init__(self, entry: ModelEntry, engine, floor: float = DECODE_FLOOR) -> None:
        self.entry = entry
        self.engine = engine
        self.floor = floor
        self.last_ms = 0.0
        # the decode floors, aligned with the classes once (not per frame)
        self.conf = class_thresholds(entry.classes, {c: min(floor, entry.threshold(c)) for c in entry.classes})

    def detect(self, images: Sequence[np.ndarray]) -> list[list[Detection]]:
        if not images:
            return []
        return self.detect_inputs(*letterbox_batch(list(images), self.entry.imgsz))

    def detect_inputs(self, batch: np.ndarray, lbs: Sequence[Letterbox],
                      features: Mapping[str, np.ndarray] | None = None) -> list[list[Detection]]:
        """Detections on an already letterboxed NCHW batch (see ``CascadeRunner.prepare``), or,
        for a head over a shared backbone, on the backbone's ``features`` of those images."""
        t = time.perf_counter()
        raw = self.engine.run_features(features) if features is not None else self.engine.infer(batch)
        self.last_ms = (time.perf_counter() - t) * 1000.0
        return [decode(raw[i], self.entry.layout, self.entry.classes, lb, conf=self.conf,
                       iou=self.entry.iou_threshold, model=self.entry.name) for i, lb in enumerate(lbs)]


@dataclass
class Prepared:
    """A batch letterboxed once per input size the bundle's models use. Built by
    ``CascadeRunner.prepare`` (cheap to do on a reader thread, so preprocessing overlaps the
    previous batch's inference), consumed by ``classify_prepared``."""

    n: int
    inputs: dict[int, tuple[np.ndarray, list[Letterbox]]]  # imgsz -> (NCHW float32, letterboxes)


@dataclass
class Classified:
    """The cascade's answer for one image, plus what the disposal rule needs."""

    decision: Decision
    max_animal_score: float  # over every model that ran, at the decode floor
    timings_ms: dict[str, float] = field(default_factory=dict)
    single_stage: str | None = None  # the global model's own top species at its thresholds (None = empty)


def _above(dets: list[Detection], entry: ModelEntry) -> list[Detection]:
    return [d for d in dets if d.score >= entry.threshold(d.species)]


class CascadeRunner:
    """The two-stage cascade over a loaded bundle's engines."""

    def __init__(self, manifest: Manifest, engines: dict, policy: CascadePolicy | None = None,
                 floor: float = DECODE_FLOOR) -> None:
        self.manifest = manifest
        self.policy = policy or manifest.cascade
        self.global_runner = ModelRunner(manifest.global_model, engines[manifest.global_model.name], floor)
        self.experts = {g: ModelRunner(e, engines[e.name], floor) for g, e in manifest.experts.items()}
        self.group_of = {s: g for g, members in manifest.groups.items() for s in members}
        # a shared backbone (edge/engines/shared.py): run once per batch, then only the heads
        shared = {id(b): b for e in engines.values() if (b := getattr(e, "backbone", None)) is not None}
        self.backbone = next(iter(shared.values())) if len(shared) == 1 else None

    @property
    def input_sizes(self) -> list[int]:
        """The square input sizes of the bundle's models, ascending."""
        return sorted({self.global_runner.entry.imgsz, *(r.entry.imgsz for r in self.experts.values())})

    @property
    def input_side(self) -> int:
        """The largest model input: images need no more pixels than this on their long side, so the
        reader decodes JPEGs reduced down to it (``read_image(max_side=...)``)."""
        return self.input_sizes[-1]

    def prepare(self, images: Sequence[np.ndarray]) -> Prepared:
        if not images:
            return Prepared(0, {})
        return Prepared(len(images), {s: letterbox_batch(list(images), s) for s in self.input_sizes})

    def classify(self, images: Sequence[np.ndarray]) -> list[Classified]:
        """Classify a batch (e.g. a burst); returns one Classified per image, in order."""
        return self.classify_prepared(self.prepare(images))

    def classify_prepared(self, prep: Prepared) -> list[Classified]:
        """The cascade over a prepared batch: the global model on all, each expert on its share."""
        if prep.n == 0:
            return []
        t = time.perf_counter()
        feats = self.backbone.run(prep.inputs[self.backbone.entry.imgsz][0]) if self.backbone else None
        bb_ms = (time.perf_counter() - t) * 1000.0

        def features(runner: ModelRunner, idx: list[int] | None = None) -> Mapping[str, np.ndarray] | None:
            if feats is None or getattr(runner.engine, "backbone", None) is not self.backbone:
                return None  # a whole model (e.g. an expert whose frozen layers differ)
            return feats if idx is None else {k: v[idx] for k, v in feats.items()}

        glob = self.global_runner
        g_dets = glob.detect_inputs(*prep.inputs[glob.entry.imgsz], features=features(glob))
        g_ms = (glob.last_ms + (bb_ms if features(glob) is not None else 0.0)) / prep.n  # the backbone counts once
        routes: list[Route] = [plan(d, self.group_of, list(self.experts), self.policy) for d in g_dets]
        stop = self.policy.background_stop
        # experts still to run per image; a staged background pass takes them one round at a time
        todo = {i: gs for i, r in enumerate(routes) if (gs := [g for g in r.groups if g in self.experts])}
        one_by_one = {i for i, r in enumerate(routes) if stop is not None and r.reason == "background"}
        e_dets: list[dict[str, list[Detection]]] = [{} for _ in range(prep.n)]
        e_raw_best = [0.0] * prep.n
        e_ms: dict[str, float] = {}
        while todo:
            wanted: dict[str, list[int]] = {g: [] for g in self.experts}  # images each expert sees this round
            for i, gs in todo.items():
                for g in gs[:1] if i in one_by_one else gs:
                    wanted[g].append(i)
            for g, idx in wanted.items():
                if not idx:
                    continue
                runner = self.experts[g]
                x, lbs = prep.inputs[runner.entry.imgsz]
                f = features(runner, idx)
                outs = runner.detect_inputs(x if f is not None else x[idx], [lbs[i] for i in idx], features=f)
                e_ms[runner.entry.name] = runner.last_ms / len(idx)
                for i, dets in zip(idx, outs, strict=True):
                    e_raw_best[i] = max([e_raw_best[i], *(d.score for d in dets)])
                    e_dets[i][g] = _above(dets, runner.entry)
            for i in list(todo):
                if i not in one_by_one:
                    del todo[i]
                    continue
                ran = list(e_dets[i])
                best_g = max(ran, key=lambda g: max((d.score for d in e_dets[i][g]), default=0.0))
                best = max((d.score for d in e_dets[i][best_g]), default=0.0)
                todo[i] = todo[i][1:]
                if best >= stop:  # type: ignore[operator]  # one_by_one only when stop is set
                    routes[i] = staged(routes[i], ran, f"stopped after {len(ran)} of {len(self.experts)} "
                                       f"experts: {best_g} ({best:.2f}) >= stop {stop:.2f}")
                    del todo[i]
                elif not todo[i]:
                    routes[i] = staged(routes[i], ran, f"every expert ran, none reached stop {stop:.2f}")
                    del todo[i]
        results = []
        for i, (gd, route) in enumerate(zip(g_dets, routes, strict=True)):
            decision = decide(gd, e_dets[i], route, self.policy)
            best = max([e_raw_best[i], *(d.score for d in gd)])
            timings = {self.manifest.global_model.name: g_ms}
            timings.update({self.experts[g].entry.name: e_ms[self.experts[g].entry.name]
                            for g in e_dets[i] if self.experts[g].entry.name in e_ms})
            alone = _above(gd, self.global_runner.entry)
            single = max(alone, key=lambda x: x.score).species if alone else None
            results.append(Classified(decision, best, timings, single))
        return results
