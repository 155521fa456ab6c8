"""Classification metrics in the paper's Table 3 form, and a bootstrap over sequences (pure).

Two macro F1s: over every label with support (the paper's, background included) and over the
species alone (``species_only``). Background is usually the largest and easiest class, so
averaging it in lifts every model's score and shrinks the differences between them.

The bootstrap resamples whole sequences (bursts), never frames: frames of one burst are not
independent. ``bootstrap_models`` gives, from one set of resamples, each model's macro F1s and
per-species F1 with 95% intervals, and the intervals of the differences between models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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


def macro_f1(m: np.ndarray, labels: Sequence[str], species_only: bool = False) -> float:
    """Mean F1 over labels that have support (a class absent from the test set is not scored);
    ``species_only`` leaves ``background`` out of the mean (it still counts as a prediction)."""
    rows = [r for r in per_class(m, labels) if r["support"] > 0 and not (species_only and r["class"] == BACKGROUND)]
    return float(np.mean([r["f1"] for r in rows])) if rows else 0.0


def _f1_vector(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(F1 per label, support per label) of a [true, predicted] matrix, vectorised."""
    tp = np.diag(m).astype(float)
    sup = m.sum(axis=1).astype(float)
    pred = m.sum(axis=0).astype(float)
    denom = sup + pred
    return np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0), sup


def _macro(f1: np.ndarray, sup: np.ndarray, keep: np.ndarray) -> float:
    sel = (sup > 0) & keep
    return float(f1[sel].mean()) if sel.any() else 0.0


def sequences_per_label(true: Sequence[str], clusters: Sequence[str], labels: Sequence[str]) -> dict[str, int]:
    """How many distinct sequences hold each true label: the real sample size behind a rare species."""
    seen: dict[str, set] = {lab: set() for lab in labels}
    for t, c in zip(true, clusters, strict=True):
        seen[t].add(c)
    return {lab: len(v) for lab, v in seen.items()}


def _ci(values: Sequence[float]) -> list[float]:
    lo, hi = np.percentile(np.asarray(values, float), [2.5, 97.5])
    return [float(lo), float(hi)]


def bootstrap_models(true: Sequence[str], preds: Mapping[str, Sequence[str]], clusters: Sequence[str],
                     labels: Sequence[str], pairs: Sequence[tuple[str, str]] = (), n: int = 1000,
                     seed: int = 0) -> dict:
    """95% intervals from one set of sequence resamples, for every model and every (b, a) pair.

    Returns {"models": {name: {"macro_f1", "macro_f1_species": [lo, hi], "f1": {label: [lo, hi]}}},
    "differences": {"b - a": {"macro_f1": {"point", "ci95"}, "macro_f1_species": {...}}},
    "n_boot", "clusters"}. A label's F1 interval is taken over the resamples that contain it.
    """
    index = {lab: i for i, lab in enumerate(labels)}
    k = len(labels)
    t = np.array([index[x] for x in true], dtype=np.int64)
    p = {name: np.array([index[x] for x in v], dtype=np.int64) for name, v in preds.items()}
    c = np.asarray(clusters)
    ids = np.unique(c)
    members = [np.flatnonzero(c == x) for x in ids]
    species = np.array([lab != BACKGROUND for lab in labels])
    everything = np.ones(k, bool)
    rng = np.random.default_rng(seed)

    def scores(pick: np.ndarray) -> dict[str, tuple[float, float, np.ndarray, np.ndarray]]:
        out = {}
        for name, pr in p.items():
            m = np.bincount(t[pick] * k + pr[pick], minlength=k * k).reshape(k, k)
            f1, sup = _f1_vector(m)
            out[name] = (_macro(f1, sup, everything), _macro(f1, sup, species), f1, sup)
        return out

    point = scores(np.arange(len(t)))
    runs = []
    for _ in range(n):
        runs.append(scores(np.concatenate([members[i] for i in rng.integers(0, len(ids), len(ids))])))
    models = {}
    for name in p:
        per_label = {}
        for j, lab in enumerate(labels):
            vals = [r[name][2][j] for r in runs if r[name][3][j] > 0]
            if vals:
                per_label[lab] = _ci(vals)
        models[name] = {"macro_f1": _ci([r[name][0] for r in runs]),
                        "macro_f1_species": _ci([r[name][1] for r in runs]), "f1": per_label}
    diffs = {}
    for b, a in pairs:
        diffs[f"{b} - {a}"] = {
            key: {"point": point[b][i] - point[a][i], "ci95": _ci([float(r[b][i] - r[a][i]) for r in runs])}
            for i, key in ((0, "macro_f1"), (1, "macro_f1_species"))}
    return {"models": models, "differences": diffs, "n_boot": n, "clusters": len(ids)}


def bootstrap_macro_f1_gain(true: Sequence[str], pred_a: Sequence[str], pred_b: Sequence[str],
                            clusters: Sequence[str], labels: Sequence[str], n: int = 1000,
                            seed: int = 0) -> dict:
    """95% CI of macro F1 (b - a), resampling whole clusters (sequences) with replacement.

    Frames of one burst are not independent, so resampling frames would make the interval
    too narrow; resampling sequences keeps their correlation.
    """
    r = bootstrap_models(true, {"a": pred_a, "b": pred_b}, clusters, labels, [("b", "a")], n=n, seed=seed)
    d = r["differences"]["b - a"]["macro_f1"]
    return {"gain": float(d["point"]), "ci95": d["ci95"], "n_boot": n, "clusters": r["clusters"]}
