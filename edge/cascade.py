"""The two-stage decision (pure): the global model's detections pick the expert(s), the experts'
detections are the answer, and every decision records its route for audit.

Two calls per frame, because the experts run between them::

    route = plan(global_dets, manifest.group_of, list(manifest.experts), policy)
    expert_dets = {g: run_expert(g, image) for g in route.groups}   # engines, not here
    decision = decide(global_dets, expert_dets, route, policy)

Routes (``Route.reason``):

- ``routed``: the global model saw species of groups G at or above ``route_threshold``; the
  experts of G run and their detections are the answer. As in the paper, a routed group's global detections are
  replaced by its expert's answer: if the expert finds nothing, that group contributes nothing
  (``keep_unmatched_global=True`` keeps a global box that no expert box overlaps instead).
  Species above threshold whose group has no expert keep their global detections.
- ``no-expert``: everything the global model saw above threshold lacks an expert; its
  detections are the answer and no expert runs.
- ``background``: nothing at or above ``route_threshold``; every expert runs and the single
  most confident expert wins if its best score reaches ``expert_floor`` (its detections below
  the floor are dropped), else the frame is empty. ``plan`` lists the experts in the order of
  the global model's weak scores for their groups; with ``background_stop`` set the runner
  runs them in that order and stops once one reaches it, handing ``decide`` a route whose
  ``groups`` are the experts that ran (``staged``). With ``background_max_experts`` = N only the
  first N of that order run (the rest are likely to see nothing: the global model saw least of
  their groups).
- ``gated``: as background, but the global model's best score is below ``gate_threshold``, so
  the all-experts pass is skipped and the frame is empty (the compute lever of METHOD.md).

Burst route reuse (``route_reuse``, off by default): a trap's burst is one visit, so once a
frame of an event is routed confidently (``route_hint``: the global model's best and every routed
expert's best at least ``route_reuse``, and nothing seen that lacks an expert), the next frames of
the event may skip the global model and run only those experts (``reuse_route``: a ``routed``
route with ``reused`` set; its ``models_run`` has no "global"). What keeps it honest:

- a reused frame whose experts are not all still confident (``reuse_holds``) runs the whole
  cascade (the animal left, or another took its place);
- at most ``route_reuse_frames`` frames in a row reuse a route, then one runs the whole cascade
  and renews it: a second species that walks into the burst beside the first is found there;
- the memory of routes (``RouteMemory``) is per event and in memory only: a restart or a new
  bundle starts empty, so a reopened event's next frame runs the whole cascade, and a route
  naming an expert the bundle lacks is never reused.

One animal, one box: every answer goes through ``one_box_per_animal`` last, whatever the route.
Boxes that overlap with IoU above ``merge_iou`` (default ``SAME_ANIMAL_IOU``) are one animal,
whichever species or model claimed them: the most confident box stays and the other species
become its ranked alternatives (``Detection.also``). A model's class-aware NMS leaves a look-alike
second box on the same animal (species 4 at 0.84 and species 7 at 0.27 on one fox), so without
this every output downstream (messages, ledger, MegaDetector, Camtrap DP, counts, evaluation)
would count two animals.

The floor for disposal is not decided here: ``Decision.model_best`` keeps every model's best
score so the disposal policy can refuse to delete a frame any model saw an animal in.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from edge.detection import SAME_ANIMAL_IOU, Detection, iou
from edge.manifest import CascadeSettings

Reason = Literal["routed", "background", "gated", "no-expert"]
GLOBAL = "global"


CascadePolicy = CascadeSettings
"""The thresholds ``plan`` and ``decide`` use: the bundle's ``CascadeSettings`` after the device
config's overrides (``edge.config.CascadeSection.apply``). One class, so one set of bounds."""


@dataclass(frozen=True)
class Route:
    """Which experts to run and why (the output of ``plan``)."""

    reason: Reason
    groups: tuple[str, ...]  # experts to run, in order (best global score first; all, for background)
    global_best: float  # best global score on the frame (0 when it saw nothing)
    no_expert: tuple[str, ...] = ()  # species above threshold whose group has no expert
    why: str = ""
    reused: bool = False  # routed on an earlier frame of the event; the global model did not run


@dataclass(frozen=True)
class Decision:
    """The answer for one frame, with its route."""

    detections: tuple[Detection, ...]
    route: Route
    models_run: tuple[str, ...]  # "global" then the experts' group names, in run order
    model_best: dict[str, float] = field(hash=False)  # model -> best score it produced (0 if none)
    why: str = ""

    @property
    def empty(self) -> bool:
        return not self.detections

    @property
    def counts(self) -> dict[str, int]:
        """Animals per species, most numerous first."""
        c: dict[str, int] = defaultdict(int)
        for d in self.detections:
            c[d.species] += 1
        return dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))

    @property
    def top(self) -> tuple[str | None, float]:
        """The most confident species and its score; (None, 0.0) for an empty frame."""
        if not self.detections:
            return None, 0.0
        best = max(self.detections, key=lambda d: d.score)
        return best.species, float(best.score)

    @classmethod
    def from_dict(cls, d: Mapping) -> Decision:
        """Rebuild a frame's decision from ``to_dict()`` (e.g. a result stored in the ledger)."""
        r = d.get("route") or {}
        route = Route(reason=r.get("reason", "routed"), groups=tuple(r.get("groups", ())),
                      global_best=float(r.get("global_best", 0.0)), no_expert=tuple(r.get("no_expert", ())),
                      why=r.get("why", ""), reused=bool(r.get("reused", False)))
        return cls(detections=tuple(Detection.from_dict(x) for x in d.get("detections", ())), route=route,
                   models_run=tuple(r.get("models_run", ())), model_best=dict(r.get("model_best", {})),
                   why=r.get("why", ""))

    def to_dict(self) -> dict:
        sp, score = self.top
        return {
            "empty": self.empty,
            "species": sp,
            "score": round(score, 5),
            "counts": self.counts,
            "detections": [d.to_dict() for d in self.detections],
            "route": {
                "reason": self.route.reason,
                "groups": list(self.route.groups),
                "global_best": round(self.route.global_best, 5),
                "no_expert": list(self.route.no_expert),
                "models_run": list(self.models_run),
                "model_best": {k: round(v, 5) for k, v in self.model_best.items()},
                "why": self.why,
                **({"reused": True} if self.route.reused else {}),
            },
        }


def _group_lookup(group_of: Callable[[str], str | None] | Mapping[str, str]) -> Callable[[str], str | None]:
    if isinstance(group_of, Mapping):
        return group_of.get
    return group_of


def _best(dets: Iterable[Detection]) -> float:
    return max((float(d.score) for d in dets), default=0.0)


def gated(global_best: float, gate: float | None) -> bool:
    """The gate's rule: a background frame whose global best is below the gate skips the
    all-experts pass. One definition, used by ``plan`` and by ``camtrap-export calibrate``."""
    return gate is not None and global_best < gate


def staged(route: Route, ran: Sequence[str], why: str) -> Route:
    """The background route after a staged pass: ``groups`` are the experts that ran, in order."""
    return replace(route, groups=tuple(ran), why=f"{route.why.split(':')[0]}: {why}")


def plan(
    global_dets: Sequence[Detection],
    group_of: Callable[[str], str | None] | Mapping[str, str],
    experts: Sequence[str],
    policy: CascadePolicy | None = None,
) -> Route:
    """Pick the experts to run from the global model's detections.

    ``experts`` are the group names that have an expert model (``list(manifest.experts)``).
    A detection routes when its score is at or above ``route_threshold``.
    """
    policy = policy or CascadePolicy()
    lookup = _group_lookup(group_of)
    best = _best(global_dets)
    strong = [d for d in global_dets if d.score >= policy.route_threshold]
    group_score: dict[str, float] = {}
    no_expert: dict[str, float] = {}
    for d in strong:
        g = lookup(d.species)
        if g is not None and g in experts:
            group_score[g] = max(group_score.get(g, 0.0), float(d.score))
        else:
            no_expert[d.species] = max(no_expert.get(d.species, 0.0), float(d.score))
    lacking = tuple(sorted(no_expert, key=lambda s: (-no_expert[s], s)))
    if group_score:
        groups = tuple(sorted(group_score, key=lambda g: (-group_score[g], g)))
        why = "global saw " + ", ".join(f"{g} ({group_score[g]:.2f})" for g in groups)
        if lacking:
            why += "; kept global answer for " + ", ".join(lacking) + " (no expert)"
        return Route("routed", groups, best, lacking, why)
    if lacking:
        return Route("no-expert", (), best, lacking,
                     "global saw " + ", ".join(lacking) + " with no expert for their group")
    if gated(best, policy.gate_threshold):
        return Route("gated", (), best, (),
                     f"global best {best:.2f} < gate {policy.gate_threshold:.2f}: all-experts pass skipped")
    # the all-experts pass in the order of the global model's weak scores per group, so that a
    # staged pass (``background_stop``) tries the likeliest expert first
    hint: dict[str, float] = {g: 0.0 for g in experts}
    for d in global_dets:
        g = lookup(d.species)
        if g in hint:
            hint[g] = max(hint[g], float(d.score))
    order = tuple(sorted(experts, key=lambda g: (-hint[g], list(experts).index(g))))
    cap = policy.background_max_experts
    if cap is not None and cap < len(order):
        return Route("background", order[:cap], best, (),
                     f"global best {best:.2f} < route {policy.route_threshold:.2f}: the {cap} likeliest of "
                     f"{len(order)} experts run")
    return Route("background", order, best, (),
                 f"global best {best:.2f} < route {policy.route_threshold:.2f}: every expert runs")


def one_box_per_animal(dets: Sequence[Detection], bound: float = SAME_ANIMAL_IOU) -> list[Detection]:
    """Merge boxes that overlap with IoU above ``bound`` into one animal (pure).

    Greedy by descending score, as NMS: a box overlapping a kept, more confident box past the
    bound is folded into the one it overlaps most, and its species (and its own alternatives)
    join that box's ``also`` list unless they are the kept species. No two returned boxes
    overlap past ``bound``. Returned most confident first.
    """
    kept: list[Detection] = []
    extra: list[dict[str, float]] = []
    for d in sorted(dets, key=lambda x: -x.score):
        over = [(iou(d.box, k.box), i) for i, k in enumerate(kept)]
        over = [(v, i) for v, i in over if v > bound]
        if not over:
            kept.append(d)
            extra.append({sp: s for sp, s in d.also})
            continue
        i = max(over)[1]
        for sp, s in ((d.species, float(d.score)), *d.also):
            if sp != kept[i].species:
                extra[i][sp] = max(extra[i].get(sp, 0.0), s)
    return [replace(k, also=tuple(sorted(e.items(), key=lambda kv: (-kv[1], kv[0]))))
            if e or k.also else k for k, e in zip(kept, extra, strict=True)]


def decide(
    global_dets: Sequence[Detection],
    expert_dets: Mapping[str, Sequence[Detection]],
    route: Route,
    policy: CascadePolicy | None = None,
) -> Decision:
    """Combine the experts' outputs (group name -> detections) into the frame's answer.

    Every group in ``route.groups`` must be in ``expert_dets`` (an empty list when the expert saw
    nothing), so a caller that skipped an expert fails loudly instead of deciding "empty".
    """
    policy = policy or CascadePolicy()
    missing = [g for g in route.groups if g not in expert_dets]
    if missing:
        raise ValueError(f"cascade: route {route.reason!r} needs the output of expert(s) {missing}")
    models_run = route.groups if route.reused else (GLOBAL, *route.groups)
    model_best = {**({} if route.reused else {GLOBAL: _best(global_dets)}),
                  **{g: _best(expert_dets[g]) for g in route.groups}}
    strong_global = [d for d in global_dets if d.score >= policy.route_threshold]

    def done(dets: list[Detection], why: str) -> Decision:
        merged = one_box_per_animal(dets, policy.merge_iou)
        if len(merged) < len(dets):
            why += f"; {len(dets) - len(merged)} overlapping box(es) merged into the same animal"
        return Decision(tuple(merged), route, models_run, model_best, why)

    if route.reason == "gated":
        return done([], route.why)
    if route.reason == "no-expert":
        return done([d for d in strong_global if d.species in route.no_expert], route.why)
    if route.reason == "background":
        if not route.groups:
            return done([], "no experts in the bundle: empty")
        winner = max(route.groups, key=lambda g: (model_best[g], -route.groups.index(g)))
        if model_best[winner] < policy.expert_floor:
            return done([], f"every expert below floor {policy.expert_floor:.2f} "
                            f"(best {winner} {model_best[winner]:.2f}): empty")
        dets = [d for d in expert_dets[winner] if d.score >= policy.expert_floor]
        return done(dets, f"background; most confident expert {winner} ({model_best[winner]:.2f}) wins")
    if route.reason != "routed":
        raise ValueError(f"cascade: unknown route reason {route.reason!r}")

    pooled: list[Detection] = [d for g in route.groups for d in expert_dets[g]]
    from_global = [d for d in strong_global if d.species in route.no_expert]
    notes = []
    if policy.keep_unmatched_global:
        unmatched = [d for d in strong_global if d.species not in route.no_expert
                     and all(iou(d.box, e.box) <= policy.merge_iou for e in pooled)]
        if unmatched:
            notes.append(f"kept {len(unmatched)} global box(es) no expert confirmed")
            from_global += unmatched
    pooled += from_global
    empties = [g for g in route.groups if not expert_dets[g]]
    if empties:
        notes.append("expert(s) " + ", ".join(empties) + " saw nothing")
    return done(pooled, "; ".join([route.why, *notes]))


@dataclass(frozen=True)
class RouteHint:
    """What a confidently routed frame tells the later frames of its event (``route_hint``)."""

    groups: tuple[str, ...]  # the experts that answered it
    score: float  # the weakest of the confidences that made it (global best, each expert's best)
    run: int = 0  # frames that reused it since a whole cascade made or renewed it


def route_hint(decision: Decision, policy: CascadePolicy) -> RouteHint | None:
    """The route a frame that ran the whole cascade offers its event, or None when it is not
    confident: routed (not background, gated or no-expert), nothing above the route threshold
    without an expert (skipping the global model would lose it), and the global model's best
    and every routed expert's best at least ``route_reuse``."""
    r = decision.route
    if policy.route_reuse is None or r.reason != "routed" or r.reused or r.no_expert or not r.groups:
        return None
    score = min([r.global_best, *(decision.model_best.get(g, 0.0) for g in r.groups)])
    return RouteHint(r.groups, score) if score >= policy.route_reuse else None


def reuse_route(hint: RouteHint | None, experts: Sequence[str], policy: CascadePolicy) -> Route | None:
    """The route of a frame that reuses its event's ``hint`` (only its experts run), or None when
    it must run the whole cascade: reuse off, no hint, ``route_reuse_frames`` used up, or an
    expert the bundle does not have (a hint from before a bundle swap)."""
    if (policy.route_reuse is None or hint is None or hint.run >= policy.route_reuse_frames
            or any(g not in experts for g in hint.groups)):
        return None
    return Route("routed", hint.groups, 0.0, (),
                 f"event route {', '.join(hint.groups)} ({hint.score:.2f}) reused, frame "
                 f"{hint.run + 1} of at most {policy.route_reuse_frames}: global model skipped", reused=True)


def reuse_holds(route: Route, expert_dets: Mapping[str, Sequence[Detection]], policy: CascadePolicy) -> bool:
    """Whether a reused route's answer stands: every expert it ran is still confident. When not
    (the animal left, or another came), the frame runs the whole cascade."""
    floor = policy.route_reuse if policy.route_reuse is not None else 1.0
    return all(_best(expert_dets.get(g, ())) >= floor for g in route.groups)


class RouteMemory:
    """The confident route of each recent event (pure: the runner feeds it decisions in frame
    order). Bounded: the ``capacity`` most recently used events are kept, so a daemon that never
    says an event closed still holds little; forgetting an event only costs its next frame a
    whole cascade."""

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._hints: dict[Hashable, RouteHint] = {}

    def hint(self, event: Hashable | None) -> RouteHint | None:
        return None if event is None else self._hints.get(event)

    def observe(self, event: Hashable | None, decision: Decision, policy: CascadePolicy) -> None:
        """Record a frame's decision: a reused frame uses one more of its route's run; a frame that
        ran the whole cascade renews the route, or drops it when it is not confident."""
        if event is None:
            return
        prev = self._hints.pop(event, None)
        new = (replace(prev, run=prev.run + 1) if decision.route.reused and prev is not None
               else None if decision.route.reused else route_hint(decision, policy))
        if new is not None:
            self._hints[event] = new  # most recently used last
            while len(self._hints) > self.capacity:
                del self._hints[next(iter(self._hints))]

    def forget(self, event: Hashable) -> None:
        self._hints.pop(event, None)

    def __len__(self) -> int:
        return len(self._hints)


@dataclass(frozen=True)
class EventDecision:
    """One answer for a burst of frames (an event).

    The top species wins a score-weighted vote: each frame adds its best score for each species
    it saw, so a species seen in most frames beats a look-alike seen once, and between species
    seen equally often the more confident wins. The count is the largest number of that species seen in one frame
    (animals move between frames, so summing would overcount).
    """

    frames: int
    species: str | None
    score: float  # the top species' best score in any frame
    count: int
    counts: dict[str, int] = field(hash=False)  # species -> max per-frame count, by vote
    votes: dict[str, float] = field(hash=False)  # species -> summed per-frame best scores
    scores: dict[str, float] = field(hash=False)  # species -> best score in any frame
    best_frame: int  # index of the frame with the top species' best score (-1 when empty)
    route: str  # route reason of the best frame (of the first frame when empty)
    routes: dict[str, int] = field(hash=False)  # route reason -> frames

    @property
    def empty(self) -> bool:
        return self.species is None

    def to_dict(self) -> dict:
        return {
            "frames": self.frames,
            "empty": self.empty,
            "species": self.species,
            "score": round(self.score, 5),
            "count": self.count,
            "counts": self.counts,
            "votes": {k: round(v, 5) for k, v in self.votes.items()},
            "scores": {k: round(v, 5) for k, v in self.scores.items()},
            "best_frame": self.best_frame,
            "route": self.route,
            "routes": self.routes,
        }


def event_decision(decisions: Sequence[Decision]) -> EventDecision:
    """Aggregate the frames of one burst into one answer (see ``EventDecision``)."""
    votes: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    best: dict[str, tuple[float, int]] = {}
    routes: dict[str, int] = defaultdict(int)
    for i, dec in enumerate(decisions):
        routes[dec.route.reason] += 1
        frame_best: dict[str, float] = {}
        for d in dec.detections:
            frame_best[d.species] = max(frame_best.get(d.species, 0.0), float(d.score))
        for sp, s in frame_best.items():
            votes[sp] += s
            if sp not in best or s > best[sp][0]:
                best[sp] = (s, i)
        for sp, n in dec.counts.items():
            counts[sp] = max(counts[sp], n)
    order = sorted(votes, key=lambda s: (-votes[s], -best[s][0], s))
    top = order[0] if order else None
    if top is not None:
        route = decisions[best[top][1]].route.reason
    else:
        route = decisions[0].route.reason if decisions else "gated"
    return EventDecision(
        frames=len(decisions),
        species=top,
        score=best[top][0] if top else 0.0,
        count=counts[top] if top else 0,
        counts={s: counts[s] for s in order},
        votes={s: votes[s] for s in order},
        scores={s: best[s][0] for s in order},
        best_frame=best[top][1] if top else -1,
        route=route,
        routes=dict(routes),
    )
