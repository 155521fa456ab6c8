"""Runs a bundle's models on images: letterbox -> engine -> decode -> cascade.

Keeps the pure decision (edge.cascade) apart from the engines: this module only moves
arrays. Images of a burst go through each model as one batch, and each expert sees only
the images routed to it, so a burst of five costs one global batch plus one batch per
expert actually needed. With a shared backbone (edge/engines/shared.py) the frozen layers run
once per batch and each model runs only its head, on the rows of the features routed to it.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from edge.cascade import (
    CascadePolicy,
    Decision,
    Route,
    RouteHint,
    RouteMemory,
    decide,
    plan,
    reuse_holds,
    reuse_route,
    staged,
)
from edge.detection import Detection
from edge.manifest import InputSize, Manifest, ModelEntry, input_hw
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
    inputs: dict[InputSize, tuple[np.ndarray, list[Letterbox]]]  # imgsz -> (NCHW float32, letterboxes)


@dataclass
class Classified:
    """The cascade's answer for one image, plus what the disposal rule needs."""

    decision: Decision
    max_animal_score: float  # over every model that ran, at the decode floor
    timings_ms: dict[str, float] = field(default_factory=dict)
    single_stage: str | None = None  # the global model's own top species at its thresholds (None = empty)


def _above(dets: list[Detection], entry: ModelEntry) -> list[Detection]:
    return [d for d in dets if d.score >= entry.threshold(d.species)]


def _wanted(routes: Mapping[int, Route]) -> dict[str, list[int]]:
    """Expert group -> the rows whose route needs it."""
    wanted: dict[str, list[int]] = defaultdict(list)
    for i, r in routes.items():
        for g in r.groups:
            wanted[g].append(i)
    return wanted


def _best(dets: Sequence[Detection]) -> float:
    return max((float(d.score) for d in dets), default=0.0)


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
        self.routes = RouteMemory()  # burst route reuse: each recent event's confident route

    @property
    def input_sizes(self) -> list[InputSize]:
        """The input sizes of the bundle's models (a square's side or (h, w)), smallest area first."""
        sizes = {self.global_runner.entry.imgsz, *(r.entry.imgsz for r in self.experts.values())}
        return sorted(sizes, key=lambda s: (input_hw(s)[0] * input_hw(s)[1], input_hw(s)))

    @property
    def input_side(self) -> int:
        """The longest side of any model input: images need no more pixels than this on their long
        side, so the reader decodes JPEGs reduced down to it (``read_image(max_side=...)``)."""
        return max(max(input_hw(s)) for s in self.input_sizes)

    def prepare(self, images: Sequence[np.ndarray]) -> Prepared:
        if not images:
            return Prepared(0, {})
        return Prepared(len(images), {s: letterbox_batch(list(images), s) for s in self.input_sizes})

    def classify(self, images: Sequence[np.ndarray]) -> list[Classified]:
        """Classify a batch (e.g. a burst); returns one Classified per image, in order."""
        return self.classify_prepared(self.prepare(images))

    def forget(self, event: Hashable) -> None:
        """An event closed: its route is no longer reused (the memory is bounded anyway)."""
        self.routes.forget(event)

    def classify_prepared(self, prep: Prepared, events: Sequence[Hashable | None] | None = None
                          ) -> list[Classified]:
        """The cascade over a prepared batch: the global model on all, each expert on its share.

        ``events`` (one per image, None = unknown) names each frame's event, in frame order, for
        burst route reuse (``CascadeSettings.route_reuse``; see edge.cascade): a frame whose event
        had a confident route in an earlier batch runs only that route's experts, which ride along
        in the same expert calls as the other frames' routes. Routes are learnt from earlier
        batches only: an event's frames in the batch that sets its route run the whole cascade
        (running them after it, in waves of smaller calls, cost more on a CPU than the skipped
        global runs saved). A reused frame whose experts are no longer confident runs the whole
        cascade (a second, small global call)."""
        if prep.n == 0:
            return []
        evs: list[Hashable | None] = list(events) if events is not None else [None] * prep.n
        if len(evs) != prep.n:
            raise ValueError(f"classify: {len(evs)} events for {prep.n} images")
        t = time.perf_counter()
        feats = self.backbone.run(prep.inputs[self.backbone.entry.imgsz][0]) if self.backbone else None
        run = _Run(self, prep, feats, (time.perf_counter() - t) * 1000.0 / prep.n)
        reused = self._reusable(evs) if self.policy.route_reuse is not None else {}
        out = run.cascade([i for i in range(prep.n) if i not in reused], also=reused)  # one pass for the batch
        if reused:
            out.update(run.reuse(reused))  # their experts ran above
            out.update(run.cascade([i for i in reused if i not in out], keep=True))  # no longer confident
        if self.policy.route_reuse is not None:
            for i in range(prep.n):  # in frame order: each event's route advances frame by frame
                self.routes.observe(evs[i], out[i].decision, self.policy)
        return [out[i] for i in range(prep.n)]

    def _reusable(self, evs: list[Hashable | None]) -> dict[int, Route]:
        """The frames that reuse their event's route from an earlier batch, with it: at most
        ``route_reuse_frames`` in a row; once a frame of an event runs the whole cascade, the
        event's later frames in this batch do too (their route is renewed after the batch)."""
        reused: dict[int, Route] = {}
        hints: dict[Hashable, RouteHint] = {}  # event -> its hint as the batch advances it
        whole: set[Hashable] = set()  # events with a frame running the whole cascade in this batch
        for i, ev in enumerate(evs):
            if ev is None or ev in whole:
                continue
            hint = hints.get(ev) or self.routes.hint(ev)
            route = reuse_route(hint, list(self.experts), self.policy)
            if route is None or hint is None:
                whole.add(ev)
                continue
            reused[i] = route
            hints[ev] = replace(hint, run=hint.run + 1)
        return reused


class _Run:
    """One batch's models: the backbone's features (run once), the global model and the experts on
    the rows each needs, and the expert outputs already computed (a reused route's, kept when its
    frame falls back to the whole cascade)."""

    def __init__(self, owner: CascadeRunner, prep: Prepared, feats, bb_ms: float) -> None:
        self.o, self.prep, self.feats, self.bb_ms = owner, prep, feats, bb_ms
        self.e_dets: list[dict[str, list[Detection]]] = [{} for _ in range(prep.n)]
        self.e_raw_best = [0.0] * prep.n
        self.e_ms: dict[str, float] = {}

    def features(self, runner: ModelRunner, idx: list[int]) -> Mapping[str, np.ndarray] | None:
        if self.feats is None or getattr(runner.engine, "backbone", None) is not self.o.backbone:
            return None  # a whole model (e.g. an expert whose frozen layers differ)
        return self.feats if len(idx) == self.prep.n else {k: v[idx] for k, v in self.feats.items()}

    def detect(self, runner: ModelRunner, idx: list[int]) -> list[list[Detection]]:
        x, lbs = self.prep.inputs[runner.entry.imgsz]
        f = self.features(runner, idx)
        return runner.detect_inputs(x if f is not None or len(idx) == self.prep.n else x[idx],
                                    [lbs[i] for i in idx], features=f)

    def experts(self, wanted: Mapping[str, list[int]]) -> None:
        """Each expert once, on the rows that want it and have not had it yet."""
        for g, idx in wanted.items():
            idx = [i for i in idx if g not in self.e_dets[i]]
            if not idx:
                continue
            runner = self.o.experts[g]
            outs = self.detect(runner, idx)
            self.e_ms[runner.entry.name] = runner.last_ms / len(idx)
            for i, dets in zip(idx, outs, strict=True):
                self.e_raw_best[i] = max([self.e_raw_best[i], *(d.score for d in dets)])
                self.e_dets[i][g] = _above(dets, runner.entry)

    def timings(self, i: int, groups: Sequence[str], extra: Mapping[str, float]) -> dict[str, float]:
        names = [self.o.experts[g].entry.name for g in groups]
        return {**extra, **{n: self.e_ms[n] for n in names if n in self.e_ms}}

    def reuse(self, routes: Mapping[int, Route]) -> dict[int, Classified]:
        """The frames reusing their event's route: only its experts (already run with the batch's
        first expert calls, ``cascade(also=...)``); a frame whose experts are no longer confident
        is left out (it runs the whole cascade next, keeping these outputs)."""
        self.experts(_wanted(routes))  # nothing left to run, unless called alone
        out = {}
        for i, r in routes.items():
            if not reuse_holds(r, self.e_dets[i], self.o.policy):
                continue
            decision = decide((), {g: self.e_dets[i][g] for g in r.groups}, r, self.o.policy)
            extra = {"backbone": self.bb_ms} if self.feats is not None else {}
            out[i] = Classified(decision, self.e_raw_best[i], self.timings(i, r.groups, extra), None)
        return out

    def cascade(self, idx: list[int], keep: bool = False, also: Mapping[int, Route] | None = None
                ) -> dict[int, Classified]:
        """The whole cascade on the rows ``idx``: the global model, then the experts of each route.
        The experts of ``also`` (reused routes of other rows) run in the same first expert calls."""
        extra = _wanted(also or {})
        if not idx:
            self.experts(extra)
            return {}
        o, policy = self.o, self.o.policy
        glob = o.global_runner
        g_dets = dict(zip(idx, self.detect(glob, idx), strict=True))
        g_ms = glob.last_ms / len(idx) + (self.bb_ms if self.features(glob, idx) is not None else 0.0)
        routes = {i: plan(g_dets[i], o.group_of, list(o.experts), policy) for i in idx}
        pre = {i: list(self.e_dets[i]) for i in idx} if keep else {i: [] for i in idx}  # ran before this
        stop = policy.background_stop
        # experts still to run per image; a staged background pass takes them one round at a time
        todo = {i: gs for i in idx if (gs := [g for g in routes[i].groups if g in o.experts])}
        one_by_one = {i for i in idx if stop is not None and routes[i].reason == "background"}
        ran: dict[int, list[str]] = {i: [] for i in idx}
        while todo or extra:
            wanted: dict[str, list[int]] = extra  # images each expert sees this round
            extra = defaultdict(list)
            for i, gs in todo.items():
                for g in gs[:1] if i in one_by_one else gs:
                    wanted[g].append(i)
                    ran[i].append(g)
            self.experts(wanted)
            for i in list(todo):
                if i not in one_by_one:
                    del todo[i]
                    continue
                best_g = max(ran[i], key=lambda g: _best(self.e_dets[i][g]))
                best = _best(self.e_dets[i][best_g])
                todo[i] = todo[i][1:]
                if best >= stop:  # type: ignore[operator]  # one_by_one only when stop is set
                    routes[i] = staged(routes[i], ran[i], f"stopped after {len(ran[i])} of {len(o.experts)} "
                                       f"experts: {best_g} ({best:.2f}) >= stop {stop:.2f}")
                    del todo[i]
                elif not todo[i]:
                    routes[i] = staged(routes[i], ran[i], f"every expert ran, none reached stop {stop:.2f}")
                    del todo[i]
        results = {}
        for i in idx:
            route = routes[i]
            decision = decide(g_dets[i], {g: self.e_dets[i][g] for g in route.groups}, route, policy)
            wasted = [g for g in pre[i] if g not in route.groups]  # a reused route that did not hold
            if wasted:
                decision = replace(decision, models_run=(*decision.models_run, *wasted),
                                   model_best={**decision.model_best,
                                               **{g: _best(self.e_dets[i][g]) for g in wasted}},
                                   why=f"{decision.why}; event route {', '.join(wasted)} reused but not "
                                   "confident: whole cascade")
            elif pre[i]:
                decision = replace(decision, why=f"{decision.why}; event route reused but not confident: "
                                   "whole cascade")
            best = max([self.e_raw_best[i], *(d.score for d in g_dets[i])])
            alone = _above(g_dets[i], glob.entry)
            single = max(alone, key=lambda x: x.score).species if alone else None
            timings = self.timings(i, [*route.groups, *wasted], {o.manifest.global_model.name: g_ms})
            results[i] = Classified(decision, best, timings, single)
        return results
