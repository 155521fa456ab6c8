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
