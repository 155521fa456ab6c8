"""Classification metrics in the paper's Table 3 form, and a bootstrap over sequences (pure)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BACKGROUND = "background"


def confusion(true: Sequence[str], pred: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """Counts [true, predicted] over ``labels`` (labels must cover every value)."""
    index = {lab: i for i, lab in enumerate(labels)}
    m = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for t, p in zip(true, pred, strict=True):
        m[index[t], index[p]] += 1
    return m


def per_class(m: np.ndarray, labels: Sequence[str]) -> list[dict]:
    """Precision, recall, F1 and support per label from a [true, predicted] matrix."""
    rows = []
    for i, lab in enumerate(labels):
        tp = float(m[i, i])
        fp = float(m[:, i].sum() - tp)
        fn = float(m[i, :].sum() - tp)
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        rows.append({"class": lab, "precision": p, "recall": r, "f1": f1, "support": int(m[i, :].sum())})
    return rows


def macro_f1(m: np.ndarray, labels: Sequence[str]) -> float:
    """Mean F1 over labels that have support (a class absent from the test set is not scored)."""
    rows = [r for r in per_class(m, labels) if r["support"] > 0]
    return float(np.mean([r["f1"] for r in rows])) if rows else 0.0


def bootstrap_macro_f1_gain(true: Sequence[str], pred_a: Sequence[str], pred_b: Sequence[str],
                            clusters: Sequence[str], labels: Sequence[str], n: int = 1000,
                            seed: int = 0) -> dict:
    """95% CI of macro F1 (b - a), resampling whole clusters (sequences) with replacement.

    Frames of one burst are not independent, so resampling frames would make the interval
    too narrow; resampling sequences keeps their correlation.
    """
    rng = np.random.default_rng(seed)
    t, a, b, c = (np.asarray(x) for x in (true, pred_a, pred_b, clusters))
    ids = np.unique(c)
    members = {k: np.flatnonzero(c == k) for k in ids}
    gains = []
    for _ in range(n):
        pick = np.concatenate([members[k] for k in rng.choice(ids, size=len(ids), replace=True)])
        gains.append(macro_f1(confusion(t[pick], b[pick], labels), labels)
                     - macro_f1(confusion(t[pick], a[pick], labels), labels))
    lo, hi = np.percentile(gains, [2.5, 97.5])
    point = macro_f1(confusion(t, b, labels), labels) - macro_f1(confusion(t, a, labels), labels)
    return {"gain": float(point), "ci95": [float(lo), float(hi)], "n_boot": n, "clusters": len(ids)}
