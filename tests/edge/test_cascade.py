"""edge.cascade: every route and decision branch with hand-made detections."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from edge.cascade import (
    SAME_ANIMAL_IOU,
    CascadePolicy,
    Decision,
    Route,
    RouteHint,
    RouteMemory,
    decide,
    event_decision,
    one_box_per_animal,
    plan,
    reuse_holds,
    reuse_route,
    route_hint,
)
from edge.detection import Detection, iou
from edge.manifest import CascadeSettings

GROUPS = {"lynx": "medium", "wildcat": "medium", "fox": "medium", "deer": "large", "boar": "large",
          "rabbit": "micro", "heron": "birds"}
EXPERTS = ["medium", "large", "micro"]  # "birds" has no expert


def det(species: str, score: float, box=(10, 10, 50, 50), model: str = "global") -> Detection:
    return Detection(species=species, score=score, box=tuple(map(float, box)), model=model)  # type: ignore[arg-type]


def run(global_dets, expert_dets, policy=None):
    policy = policy or CascadePolicy()
    route = plan(global_dets, GROUPS, EXPERTS, policy)
    return route, decide(global_dets, {g: expert_dets.get(g, []) for g in route.groups}, route, policy)


# --- plan --------------------------------------------------------------------------------------
def test_routed_to_the_group_of_the_species_seen():
    route = plan([det("lynx", 0.7), det("deer", 0.1)], GROUPS, EXPERTS)
    assert route == Route("routed", ("medium",), 0.7, (), route.why)
    assert "medium (0.70)" in route.why


def test_several_groups_run_best_first_and_threshold_is_inclusive():
    route = plan([det("rabbit", 0.25), det("deer", 0.9), det("fox", 0.5)], GROUPS, EXPERTS)
    assert route.reason == "routed" and route.groups == ("large", "medium", "micro")


def test_group_lookup_accepts_a_callable():
    route = plan([det("lynx", 0.7)], lambda s: GROUPS.get(s), EXPERTS)
    assert route.groups == ("medium",)


def test_background_runs_every_expert():
    route = plan([det("lynx", 0.2)], GROUPS, EXPERTS)
    assert route.reason == "background" and route.groups == tuple(EXPERTS)
    assert route.global_best == pytest.approx(0.2)
    assert plan([], GROUPS, EXPERTS).global_best == 0.0


def test_gate_skips_the_all_experts_pass_only_for_background():
    policy = CascadePolicy(gate_threshold=0.1)
    assert plan([det("lynx", 0.05)], GROUPS, EXPERTS, policy).reason == "gated"
    assert plan([], GROUPS, EXPERTS, policy).groups == ()
    assert plan([det("lynx", 0.15)], GROUPS, EXPERTS, policy).reason == "background"
    # a routing detection is never gated, even with a gate above the route threshold
    assert plan([det("lynx", 0.3)], GROUPS, EXPERTS, CascadePolicy(gate_threshold=0.5)).reason == "routed"


def test_species_without_expert():
    route = plan([det("heron", 0.8)], GROUPS, EXPERTS)
    assert route.reason == "no-expert" and route.groups == () and route.no_expert == ("heron",)
    route = plan([det("unknown-species", 0.8)], GROUPS, EXPERTS)
    assert route.reason == "no-expert"
    mixed = plan([det("heron", 0.8), det("deer", 0.6)], GROUPS, EXPERTS)
    assert mixed.reason == "routed" and mixed.groups == ("large",) and mixed.no_expert == ("heron",)


# --- decide ------------------------------------------------------------------------------------
def test_routed_expert_answer_replaces_the_global_one():
    _route, dec = run([det("lynx", 0.6)], {"medium": [det("wildcat", 0.85, model="medium")]})
    assert dec.top == ("wildcat", 0.85) and dec.counts == {"wildcat": 1} and not dec.empty
    assert dec.models_run == ("global", "medium")
    assert dec.model_best == {"global": 0.6, "medium": 0.85}


def test_routed_expert_seeing_nothing_empties_the_group_unless_asked_to_keep_global():
    _route, dec = run([det("lynx", 0.6)], {"medium": []})
    assert dec.empty and "medium saw nothing" in dec.why
    # the global model's score stays on record for the disposal floor
    assert dec.model_best["global"] == 0.6
    keep = CascadePolicy(keep_unmatched_global=True)
    _, dec = run([det("lynx", 0.6)], {"medium": []}, keep)
    assert dec.top == ("lynx", 0.6) and "no expert confirmed" in dec.why
    # a global box the expert did confirm (overlapping) is not duplicated
    _, dec = run([det("lynx", 0.6)], {"medium": [det("wildcat", 0.7, (12, 12, 50, 50))]}, keep)
    assert [d.species for d in dec.detections] == ["wildcat"]


def test_several_groups_merge_with_cross_expert_nms():
    global_dets = [det("deer", 0.7, (0, 0, 100, 100)), det("fox", 0.6, (200, 200, 260, 260))]
    experts = {
        "large": [det("deer", 0.9, (0, 0, 100, 100), "large")],
        # medium also claims the deer's box (a look-alike vote, weaker) and finds the fox
        "medium": [det("fox", 0.8, (200, 200, 260, 260), "medium"), det("wildcat", 0.4, (2, 0, 100, 98), "medium")],
    }
    route, dec = run(global_dets, experts)
    assert route.groups == ("large", "medium")
    assert [(d.species, d.model) for d in dec.detections] == [("deer", "large"), ("fox", "medium")]
    assert dec.counts == {"deer": 1, "fox": 1}
    # a looser merge IoU keeps both claims
    _, dec = run(global_dets, experts, CascadePolicy(merge_iou=0.99))
    assert len(dec.detections) == 3


def test_one_expert_two_species_on_one_animal_is_one_box_with_ranked_alternatives():
    # class-aware NMS leaves a look-alike box on the same animal: one animal, one box
    two = [det("deer", 0.84, (0, 0, 100, 100)), det("boar", 0.27, (5, 5, 100, 100)),
           det("deer", 0.6, (300, 300, 380, 380))]  # a second animal, elsewhere
    _, dec = run([det("deer", 0.5)], {"large": two})
    assert [d.species for d in dec.detections] == ["deer", "deer"] and dec.counts == {"deer": 2}
    assert dec.detections[0].also == (("boar", 0.27),) and dec.detections[1].also == ()
    assert "merged into the same animal" in dec.why
    rebuilt = Decision.from_dict(dec.to_dict())  # the ledger keeps the alternatives
    assert rebuilt.detections[0].also == (("boar", 0.27),)


def test_alternatives_are_ranked_and_folded_from_merged_boxes():
    a = Detection("fox", 0.9, (0, 0, 10, 10))
    b = Detection("lynx", 0.5, (0, 0, 10, 10.5), also=(("wildcat", 0.7),))
    c = Detection("fox", 0.4, (0, 0, 10, 10))  # same species: nothing to add
    d = Detection("wildcat", 0.3, (0.2, 0, 10, 10))
    (one,) = one_box_per_animal([c, b, a, d])
    assert one.species == "fox" and one.also == (("wildcat", 0.7), ("lynx", 0.5))


@pytest.mark.parametrize("seed", range(40))
def test_no_two_output_boxes_overlap_past_the_bound_on_any_route(seed):
    rng = random.Random(seed)
    species = list(GROUPS)

    def rand_dets(n, model):
        out = []
        for _ in range(n):
            x, y = rng.uniform(0, 200), rng.uniform(0, 200)
            w, h = rng.uniform(20, 80), rng.uniform(20, 80)
            jitter = [rng.uniform(-4, 4) for _ in range(4)]
            box = (x + jitter[0], y + jitter[1], x + w + jitter[2], y + h + jitter[3])
            out += [det(rng.choice(species), rng.uniform(0.05, 1), box, model) for _ in range(rng.randint(1, 3))]
        return out

    policy = CascadePolicy(merge_iou=rng.choice([0.3, SAME_ANIMAL_IOU, 0.7]), keep_unmatched_global=rng.random() < .5)
    global_dets = rand_dets(rng.randint(0, 4), "global")
    experts = {g: rand_dets(rng.randint(0, 4), g) for g in EXPERTS}
    _, dec = run(global_dets, experts, policy)
    boxes = [d.box for d in dec.detections]
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            assert iou(boxes[i], boxes[j]) <= policy.merge_iou
    assert sum(dec.counts.values()) == len(dec.detections)


def test_no_expert_keeps_global_detections_and_mixes_with_experts():
    _, dec = run([det("heron", 0.8), det("heron", 0.3, (100, 100, 120, 130)), det("heron", 0.1)], {})
    assert dec.route.reason == "no-expert" and dec.counts == {"heron": 2} and dec.models_run == ("global",)
    _, dec = run([det("heron", 0.8, (200, 0, 250, 50)), det("deer", 0.6)],
                 {"large": [det("deer", 0.9, model="large")]})
    assert sorted(d.species for d in dec.detections) == ["deer", "heron"]


def test_background_most_confident_expert_wins():
    experts = {
        "medium": [det("lynx", 0.55, model="medium")],
        "large": [det("deer", 0.7, model="large"), det("deer", 0.2, (100, 100, 150, 150), "large")],
        "micro": [],
    }
    route, dec = run([det("lynx", 0.1)], experts)
    assert route.reason == "background"
    assert [(d.species, d.score) for d in dec.detections] == [("deer", 0.7)]  # 0.2 < floor 0.3 dropped
    assert dec.models_run == ("global", "medium", "large", "micro")
    assert dec.model_best == {"global": 0.1, "medium": 0.55, "large": 0.7, "micro": 0.0}
    assert "large" in dec.why


def test_background_below_floor_is_empty():
    _, dec = run([], {"medium": [det("lynx", 0.29)], "large": [], "micro": []})
    assert dec.empty and dec.top == (None, 0.0) and "below floor" in dec.why
    _, dec = run([], {"medium": [det("lynx", 0.29)]}, CascadePolicy(expert_floor=0.2))
    assert dec.top == ("lynx", 0.29)


def test_background_tie_goes_to_the_first_expert_in_route_order():
    experts = {"medium": [det("lynx", 0.6)], "large": [det("deer", 0.6)], "micro": []}
    _, dec = run([], experts)
    assert dec.top[0] == "lynx"


def test_gated_frame_is_empty_and_runs_only_global():
    route, dec = run([det("lynx", 0.02)], {}, CascadePolicy(gate_threshold=0.05))
    assert route.reason == "gated" and dec.empty and dec.models_run == ("global",)


def test_decide_refuses_a_missing_expert_output():
    route = plan([det("lynx", 0.7)], GROUPS, EXPERTS)
    with pytest.raises(ValueError, match="medium"):
        decide([det("lynx", 0.7)], {}, route)


def test_background_with_no_experts_at_all():
    route = plan([], GROUPS, [])
    dec = decide([], {}, route)
    assert route.reason == "background" and dec.empty


def test_decision_to_dict_is_an_audit_record():
    _, dec = run([det("deer", 0.6)], {"large": [det("deer", 0.9, model="large")]})
    d = dec.to_dict()
    assert d["species"] == "deer" and d["score"] == 0.9 and d["empty"] is False
    assert d["counts"] == {"deer": 1} and d["detections"][0]["model"] == "large"
    assert d["route"]["reason"] == "routed" and d["route"]["models_run"] == ["global", "large"]
    assert d["route"]["model_best"] == {"global": 0.6, "large": 0.9}
    assert "large (0.60)" in d["route"]["why"]


# --- policy ------------------------------------------------------------------------------------
def test_policy_is_the_manifest_settings_with_their_bounds():
    s = CascadeSettings(route_threshold=0.4, expert_floor=0.5, gate_threshold=0.05)
    assert CascadePolicy is CascadeSettings  # one definition: no copy to drift
    assert (s.route_threshold, s.expert_floor, s.gate_threshold, s.merge_iou) == (0.4, 0.5, 0.05, 0.5)
    for bad in ({"route_threshold": 1.5}, {"gate_threshold": 1.5}, {"gate_threshold": -0.1}, {"merge_iou": 0},
                {"bogus": 1}):
        with pytest.raises(ValidationError):
            CascadeSettings(**bad)


# --- events ------------------------------------------------------------------------------------
def frame(*dets: Detection, reason="routed") -> Decision:
    route = Route(reason, (), 0.0)
    return Decision(tuple(dets), route, ("global",), {"global": 0.0})


def test_event_vote_is_score_weighted_and_count_is_max_per_frame():
    frames = [
        frame(det("lynx", 0.9)),
        frame(det("wildcat", 0.6), det("wildcat", 0.5, (100, 0, 150, 50))),
        frame(det("wildcat", 0.55)),
        frame(reason="background"),
    ]
    ev = event_decision(frames)
    # wildcat: 0.6 + 0.55 = 1.15 beats lynx 0.9 (per frame only the best box of a species votes)
    assert ev.species == "wildcat" and ev.score == 0.6 and ev.count == 2 and ev.best_frame == 1
    assert ev.counts == {"wildcat": 2, "lynx": 1}
    assert ev.votes == pytest.approx({"wildcat": 1.15, "lynx": 0.9})
    assert ev.routes == {"routed": 3, "background": 1} and ev.frames == 4 and not ev.empty
    assert ev.to_dict()["species"] == "wildcat"


def test_event_one_confident_frame_beats_weak_look_alikes():
    ev = event_decision([frame(det("lynx", 0.95)), frame(det("wildcat", 0.3)), frame(det("wildcat", 0.3))])
    assert ev.species == "lynx" and ev.count == 1 and ev.best_frame == 0


def test_event_of_empty_frames_is_empty():
    ev = event_decision([frame(), frame()])
    assert ev.empty and ev.species is None and ev.count == 0 and ev.best_frame == -1
    assert event_decision([]).frames == 0


def test_decision_round_trips_through_its_dict():
    _, d = run([det("lynx", 0.8), det("deer", 0.6)], {"medium": [det("lynx", 0.9, model="medium")],
                                                      "large": [det("deer", 0.7, box=(60, 60, 90, 90))]})
    assert d.route.reason == "routed" and len(d.detections) == 2
    back = Decision.from_dict(d.to_dict())
    assert back.to_dict() == d.to_dict()
    assert back.top == (d.top[0], round(d.top[1], 5))


def test_background_route_lists_the_likeliest_expert_first():
    experts = ["large", "medium", "small"]
    r = plan([det("fox", 0.12), det("deer", 0.08)], GROUPS, experts, CascadePolicy())
    assert r.reason == "background" and r.groups == ("medium", "large", "small")
    assert plan([], GROUPS, experts, CascadePolicy()).groups == tuple(experts)  # nothing seen: bundle order


def test_background_stop_must_not_be_below_the_expert_floor():
    assert CascadeSettings(background_stop=0.5).background_stop == 0.5
    with pytest.raises(ValidationError, match=r"background_stop 0\.2 is below expert_floor 0\.3"):
        CascadeSettings(background_stop=0.2)


def test_background_cap_runs_only_the_likeliest_groups():
    """background_max_experts: the N groups the global model scored highest below the route
    threshold (best score per group), ties in bundle order; unset, every expert."""
    dets = [det("deer", 0.1), det("rabbit", 0.2), det("boar", 0.15)]
    assert plan(dets, GROUPS, EXPERTS).groups == ("micro", "large", "medium")
    capped = plan(dets, GROUPS, EXPERTS, CascadePolicy(background_max_experts=2))
    assert capped.reason == "background" and capped.groups == ("micro", "large")
    assert plan([], GROUPS, EXPERTS, CascadePolicy(background_max_experts=1)).groups == ("medium",)
    assert plan(dets, GROUPS, EXPERTS, CascadePolicy(background_max_experts=9)).groups == ("micro", "large", "medium")
    with pytest.raises(ValidationError):
        CascadeSettings(background_max_experts=0)
    # decide: the most confident of the experts that ran wins
    dec = decide(dets, {"micro": [det("rabbit", 0.8, model="micro")], "large": []}, capped)
    assert dec.top == ("rabbit", 0.8) and dec.models_run == ("global", "micro", "large")


REUSE = CascadePolicy(route_reuse=0.6, route_reuse_frames=2)


def test_route_hint_only_from_a_confident_whole_cascade_route():
    _, confident = run([det("lynx", 0.8)], {"medium": [det("lynx", 0.9, model="medium")]}, REUSE)
    assert route_hint(confident, REUSE) == RouteHint(("medium",), 0.8)
    assert route_hint(confident, CascadePolicy()) is None  # reuse off
    _, weak_expert = run([det("lynx", 0.8)], {"medium": [det("lynx", 0.5, model="medium")]}, REUSE)
    assert route_hint(weak_expert, REUSE) is None
    _, weak_global = run([det("lynx", 0.4)], {"medium": [det("lynx", 0.9, model="medium")]}, REUSE)
    assert route_hint(weak_global, REUSE) is None
    _, with_heron = run([det("lynx", 0.8), det("heron", 0.9, box=(80, 80, 120, 120))],
                        {"medium": [det("lynx", 0.9, model="medium")]}, REUSE)
    assert route_hint(with_heron, REUSE) is None  # skipping the global model would lose the heron
    _, background = run([det("lynx", 0.1)], {"medium": [det("lynx", 0.9, model="medium")]}, REUSE)
    assert background.route.reason == "background" and route_hint(background, REUSE) is None


def test_reuse_route_runs_only_the_hinted_experts_and_no_global():
    route = reuse_route(RouteHint(("medium",), 0.8), EXPERTS, REUSE)
    assert route is not None and route.reused and route.reason == "routed" and route.groups == ("medium",)
    dec = decide((), {"medium": [det("lynx", 0.9, model="medium")]}, route, REUSE)
    assert dec.models_run == ("medium",) and "global" not in dec.model_best and dec.top == ("lynx", 0.9)
    assert reuse_holds(route, {"medium": [det("lynx", 0.9)]}, REUSE)
    assert not reuse_holds(route, {"medium": [det("lynx", 0.5)]}, REUSE)  # no longer confident
    assert not reuse_holds(route, {"medium": []}, REUSE)
    assert reuse_route(RouteHint(("medium",), 0.8, run=2), EXPERTS, REUSE) is None  # run used up
    assert reuse_route(RouteHint(("gone",), 0.8), EXPERTS, REUSE) is None  # an expert the bundle lacks
    assert reuse_route(RouteHint(("medium",), 0.8), EXPERTS, CascadePolicy()) is None  # off
    assert reuse_route(None, EXPERTS, REUSE) is None


def test_route_memory_counts_reuse_renews_and_forgets():
    mem = RouteMemory(capacity=2)
    _, confident = run([det("lynx", 0.8)], {"medium": [det("lynx", 0.9, model="medium")]}, REUSE)
    _, empty = run([], {}, REUSE)
    mem.observe("a", confident, REUSE)
    assert mem.hint("a") == RouteHint(("medium",), 0.8, 0)
    reused = decide((), {"medium": [det("lynx", 0.9)]}, reuse_route(mem.hint("a"), EXPERTS, REUSE), REUSE)
    mem.observe("a", reused, REUSE)
    assert mem.hint("a").run == 1
    mem.observe("a", confident, REUSE)  # a whole cascade renews it
    assert mem.hint("a").run == 0
    mem.observe("a", empty, REUSE)  # a frame without a confident route drops it
    assert mem.hint("a") is None and mem.hint(None) is None
    mem.observe(None, confident, REUSE)
    assert len(mem) == 0
    for ev in ("x", "y", "z"):  # bounded: the least recently used event goes
        mem.observe(ev, confident, REUSE)
    assert mem.hint("x") is None and mem.hint("z") is not None and len(mem) == 2
    mem.forget("z")
    assert mem.hint("z") is None
    mem.observe("q", reused, REUSE)  # a reused frame with no route on record renews nothing
    assert mem.hint("q") is None
