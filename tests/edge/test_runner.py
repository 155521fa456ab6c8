"""edge.runner over a real small bundle: batches, prepared inputs, empty batches."""

from __future__ import annotations

import numpy as np
from make_onnx import IMGSZ, STRIDE, patch_image, write_test_bundle

from edge.bundle import load_bundle
from edge.engines import load_engines
from edge.runner import CascadeRunner


def _runner(tmp_path):
    b = load_bundle(write_test_bundle(tmp_path / "b"))
    return CascadeRunner(b.manifest, load_engines(b, "onnxruntime"))


def test_prepared_batch_equals_direct_classification_and_empty_batches_are_fine(tmp_path):
    r = _runner(tmp_path)
    imgs = [patch_image(IMGSZ, STRIDE, (1, 1), 0, scale=3), np.full((90, 160, 3), 20, np.uint8),
            patch_image(IMGSZ, STRIDE, (2, 2), 1, scale=2)]
    direct = r.classify(imgs)
    prepared = r.classify_prepared(r.prepare(imgs))
    assert [c.decision.to_dict() for c in direct] == [c.decision.to_dict() for c in prepared]
    assert direct[0].decision.top[0] == "Lynx pardinus" and direct[1].decision.empty
    assert direct[2].decision.top[0] == "Felis silvestris"
    # the single-stage answer comes from the same global run, at the global model's thresholds
    assert [c.single_stage for c in direct] == ["Lynx pardinus", None, "Felis silvestris"]
    assert r.classify([]) == [] and r.classify_prepared(r.prepare([])) == []
    # experts see only the frames routed to them; the empty frame goes to every expert
    assert direct[0].decision.models_run[0] == "global" and "felids" in direct[0].decision.models_run
    assert direct[1].decision.route.reason == "background"


def test_background_pass_can_stop_at_the_first_confident_expert(tmp_path):
    """background_stop: the experts run one at a time, the group the global model scored
    highest first, and the pass stops once one is confident; unset, every expert runs."""
    b = load_bundle(write_test_bundle(tmp_path / "b"))
    engines = load_engines(b, "onnxruntime")
    green = patch_image(IMGSZ, STRIDE, (1, 1), 1, scale=2, value=125)  # Felis at ~0.47
    empty = np.full((128, 128, 3), 20, np.uint8)
    policy = b.manifest.cascade.model_copy(update={"route_threshold": 0.6})  # so the Felis frame is background
    every = CascadeRunner(b.manifest, engines, policy).classify([green, empty])
    staged_ = CascadeRunner(b.manifest, engines, policy.model_copy(update={"background_stop": 0.3}))
    staged_ = staged_.classify([green, empty])
    # the paper's rule: every expert, the likeliest group (felids, from the global's weak Felis) first
    assert every[0].decision.route.reason == "background"
    assert every[0].decision.models_run == ("global", "felids", "canids")
    # staged: felids answers Felis above the stop, canids never runs; same answer
    assert staged_[0].decision.models_run == ("global", "felids")
    assert staged_[0].decision.top[0] == every[0].decision.top[0] == "Felis silvestris"
    assert "stopped after 1 of 2 experts" in staged_[0].decision.route.why
    # an empty frame: no expert reaches the stop, so every expert still runs
    assert staged_[1].decision.models_run == every[1].decision.models_run == ("global", "felids", "canids")
    assert staged_[1].decision.empty and "none reached stop" in staged_[1].decision.route.why
