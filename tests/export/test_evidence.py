"""Evidence from a detector: the matching rules (pure) and a tiny real model end to end (slow)."""

from __future__ import annotations

from pathlib import Path

import fixtures  # tests/export/fixtures.py (pytest puts this folder on sys.path)
import numpy as np
import pytest

from edge.detection import Detection
from export.evidence import accumulate, gt_boxes


def _det(cls: int, score: float, box, scores=()):
    return Detection(species=str(cls), score=score, box=box, cls=cls, scores=tuple(scores))


def test_accumulate_matching_rules():
    n = 3
    counts, soft_sum = np.zeros((n, n + 1), np.int64), np.zeros((n, n))
    soft_n, fp = np.zeros(n, np.int64), np.zeros(n, np.int64)
    gts = [(0, (0, 0, 10, 10)), (1, (50, 50, 60, 60)), (2, (100, 100, 110, 110))]
    hard = [
        _det(1, 0.4, (0, 0, 10, 9)),  # overlaps GT 0: lower score
        _det(2, 0.7, (1, 0, 10, 10)),  # overlaps GT 0: highest score wins -> counts[0, 2]
        _det(1, 0.9, (52, 52, 62, 62)),  # IoU 0.47 with GT 1: not a match -> GT 1 missed
        _det(0, 0.5, (200, 200, 210, 210)),  # matches nothing -> false positive of class 0
    ]
    soft = [_det(2, 0.7, (1, 0, 10, 10), (0.3, 0.2, 0.7)), _det(0, 0.05, (0, 0, 10, 10), (0.05, 0.01, 0.02)),
            _det(1, 0.02, (100, 100, 110, 111), (0.0, 0.02, 0.01))]
    accumulate(gts, hard, soft, counts, soft_sum, soft_n, fp, iou_match=0.5)
    assert counts.tolist() == [[0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 1]]
    assert fp.tolist() == [1, 1, 0]  # the 0.9 box at IoU 0.47 is a false positive too
    assert soft_n.tolist() == [1, 0, 1]
    assert np.allclose(soft_sum[0], [0.05, 0.01, 0.02])  # best-overlapping candidate, not best score
    assert np.allclose(soft_sum[2], [0.0, 0.02, 0.01])


def test_gt_boxes_reads_yolo_labels(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("1 0.5 0.5 0.2 0.4\n\n")
    assert gt_boxes(p, 100, 50, 2) == [(1, (40.0, 15.0, 60.0, 35.0))]
    assert gt_boxes(tmp_path / "none.txt", 100, 50, 2) == []  # empty frame
    p.write_text("2 0.5 0.5 0.2 0.4\n")
    with pytest.raises(ValueError, match=r"a.txt:1: class 2 outside 0..1"):
        gt_boxes(p, 100, 50, 2)


@pytest.mark.slow
@pytest.mark.train
def test_evidence_from_a_tiny_trained_model(tmp_path):
    import yaml

    from export.grouping import read_groups, run_grouping
    from export.train import train

    data = fixtures.make_dataset(tmp_path / "ds", n_train=24, n_val=12, size=96, seed=1)
    run = tmp_path / "run"
    tiny = Path(__file__).resolve().parents[2] / "export" / "models" / "camtrap-tiny.yaml"
    train(data, tiny, run, epochs=2, imgsz=96, batch=8, plots=False, say=lambda s: None)

    from export.evidence import compute_evidence

    # Two epochs teach this model little: it proposes near whole-frame boxes scoring ~0.003. Low
    # thresholds and a loose IoU make both paths (matched hard counts, soft vectors) run anyway;
    # accuracy is not the point here.
    ev = compute_evidence(run, data, conf=0.002, soft_conf=1e-6, iou_match=0.01)
    names = yaml.safe_load(data.read_text())["names"]
    assert ev.species == [names[i] for i in range(len(names))] and ev.imgsz == 96 and ev.images == 12
    gt_per_species = np.zeros(len(ev.species), np.int64)
    for lab in (tmp_path / "ds" / "labels" / "val").glob("*.txt"):
        for line in lab.read_text().split("\n"):
            if line.strip():
                gt_per_species[int(line.split()[0])] += 1
    assert gt_per_species.sum() > 0
    assert ev.counts.shape == (4, 5) and (ev.counts >= 0).all()
    assert ev.counts.sum(axis=1).tolist() == gt_per_species.tolist()  # every GT box counted once
    assert ev.soft.shape == (4, 4) and (ev.soft >= 0).all() and (ev.soft <= 1).all()
    assert (ev.soft_n <= gt_per_species).all()
    assert np.allclose(ev.soft[ev.soft_n == 0], 0)
    assert ev.soft_n.sum() > 0 and ev.counts[:, :4].sum() > 0  # both paths really ran
    assert np.allclose(ev.soft[ev.soft_n > 0].max(axis=1) > 0, True)

    out = tmp_path / "groups.yaml"
    run_grouping(out=out, k=2, evidence=ev)
    groups = read_groups(out)
    assert sorted(s for m in groups.values() for s in m) == sorted(ev.species)
    assert (tmp_path / "groups_confusion.csv").is_file()
