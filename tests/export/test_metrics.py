import numpy as np

from export.metrics import BACKGROUND, bootstrap_macro_f1_gain, confusion, macro_f1, per_class


def test_per_class_and_macro_f1_by_hand():
    labels = ["a", "b", BACKGROUND]
    true = ["a", "a", "a", "b", "b", BACKGROUND, BACKGROUND]
    pred = ["a", "a", "b", "b", BACKGROUND, BACKGROUND, "a"]
    m = confusion(true, pred, labels)
    assert m.tolist() == [[2, 1, 0], [0, 1, 1], [1, 0, 1]]
    rows = {r["class"]: r for r in per_class(m, labels)}
    assert rows["a"]["precision"] == 2 / 3 and rows["a"]["recall"] == 2 / 3
    assert rows["b"]["precision"] == 0.5 and rows["b"]["recall"] == 0.5
    assert rows[BACKGROUND]["support"] == 2
    assert np.isclose(macro_f1(m, labels), np.mean([2 / 3, 0.5, 0.5]))


def test_macro_f1_ignores_classes_without_support():
    labels = ["a", "b", "c"]
    m = confusion(["a", "b"], ["a", "b"], labels)
    assert macro_f1(m, labels) == 1.0


def test_bootstrap_gain_interval_contains_point_and_resamples_sequences():
    rng = np.random.default_rng(1)
    labels = ["a", "b", BACKGROUND]
    true = list(rng.choice(labels, 200))
    a = [t if rng.random() < 0.6 else "b" for t in true]
    b = [t if rng.random() < 0.9 else "b" for t in true]
    seqs = [str(i // 4) for i in range(200)]
    r = bootstrap_macro_f1_gain(true, a, b, seqs, labels, n=200)
    assert r["clusters"] == 50
    assert r["ci95"][0] <= r["gain"] <= r["ci95"][1]
    assert r["gain"] > 0 and r["ci95"][0] > 0
