"""Pure scoring for the cascade benchmark: per-image records in, numbers that explain the result out.

A record is one test image: ``truth`` (species or background) and one prediction per method
(``single``, ``cascade``, ``control``, ...), plus the cascade's ``route`` and ``runs`` (model
runs). Beyond macro F1 the functions here say *why* a method wins or loses: which errors the
single model makes (inside its look-alike group, across groups, missed animals, false alarms),
which of them the cascade could fix at all (an expert only sees what the global model routed
to it), and which it fixed or broke.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

from export.metrics import BACKGROUND, bootstrap_macro_f1_gain, confusion, macro_f1, per_class


def score(records: Sequence[Mapping], key: str, labels: Sequence[str]) -> dict:
    """Macro F1, per-class rows and the confusion matrix of method ``key``."""
    m = confusion([r["truth"] for r in records], [r[key] for r in records], labels)
    return {"macro_f1": macro_f1(m, labels), "per_class": per_class(m, labels), "confusion": m.tolist()}


def group_f1(per_class_rows: Sequence[Mapping], groups: Mapping[str, Sequence[str]]) -> dict[str, float | None]:
    """Mean F1 of a group's species that have test support (None if none has)."""
    f1 = {r["class"]: r["f1"] for r in per_class_rows if r["support"] > 0}
    out: dict[str, float | None] = {}
    for g, members in groups.items():
        vals = [f1[s] for s in members if s in f1]
        out[g] = float(np.mean(vals)) if vals else None
    return out


def error_profile(records: Sequence[Mapping], key: str, group_of: Mapping[str, str]) -> dict[str, int]:
    """Outcome counts of method ``key``: animal frames by outcome, empty frames by outcome.

    ``same_group``: an animal named as a look-alike of its own group (what experts can fix);
    ``other_group``: named as a species of another group; ``missed``: called background.
    """
    c: Counter = Counter()
    for r in records:
        t, p = r["truth"], r[key]
        if t == BACKGROUND:
            c["empty_frames"] += 1
            c["false_alarm" if p != BACKGROUND else "empty_correct"] += 1
            continue
        c["animal_frames"] += 1
        if p == t:
            c["correct"] += 1
        elif p == BACKGROUND:
            c["missed"] += 1
        elif group_of.get(p) == group_of.get(t):
            c["same_group"] += 1
        else:
            c["other_group"] += 1
    keys = ("animal_frames", "correct", "same_group", "other_group", "missed", "empty_frames", "empty_correct",
            "false_alarm")
    return {k: int(c[k]) for k in keys}


def miss_recovery(records: Sequence[Mapping], base: str = "single", cascade: str = "cascade") -> dict[str, int]:
    """Animal frames the global model missed, and what the all-experts pass made of them."""
    missed = [r for r in records if r["truth"] != BACKGROUND and r[base] == BACKGROUND]
    return {
        "animal_frames": sum(r["truth"] != BACKGROUND for r in records),
        "global_missed": len(missed),
        "recovered_any": sum(r[cascade] != BACKGROUND for r in missed),
        "recovered_correct": sum(r[cascade] == r["truth"] for r in missed),
        "empty_frames": sum(r["truth"] == BACKGROUND for r in records),
        "false_alarms_added": sum(r["truth"] == BACKGROUND and r[base] == BACKGROUND and r[cascade] != BACKGROUND
                                  for r in records),
    }


def fixes(records: Sequence[Mapping], base: str, other: str) -> dict[str, int]:
    """Frames ``other`` got right that ``base`` got wrong (fixed), and the reverse (broken)."""
    fixed = sum(r[base] != r["truth"] and r[other] == r["truth"] for r in records)
    broken = sum(r[base] == r["truth"] and r[other] != r["truth"] for r in records)
    return {"fixed": int(fixed), "broken": int(broken), "net": int(fixed - broken)}


def routing(records: Sequence[Mapping], group_of: Mapping[str, str], base: str = "single") -> dict[str, int]:
    """How often the global model sent an animal frame to the right expert (the cascade's ceiling)."""
    animal = [r for r in records if r["truth"] != BACKGROUND]
    right = [r for r in animal if r[base] != BACKGROUND and group_of.get(r[base]) == group_of.get(r["truth"])]
    return {"animal_frames": len(animal), "right_group": len(right),
            "right_group_wrong_species": sum(r[base] != r["truth"] for r in right)}


def cost(records: Sequence[Mapping]) -> dict:
    """Model runs per image (all, animal frames, empty frames) and route counts."""
    runs = [r["runs"] for r in records]
    empty = [r["runs"] for r in records if r["truth"] == BACKGROUND]
    animal = [r["runs"] for r in records if r["truth"] != BACKGROUND]
    return {"runs_per_image": float(np.mean(runs)) if runs else 0.0,
            "runs_per_empty_image": float(np.mean(empty)) if empty else 0.0,
            "runs_per_animal_image": float(np.mean(animal)) if animal else 0.0,
            "routes": dict(Counter(r["route"] for r in records))}


def gains(records: Sequence[Mapping], labels: Sequence[str], pairs: Sequence[tuple[str, str]],
          n_boot: int, seed: int = 0) -> dict[str, dict]:
    """Bootstrap CI of macro F1 (b - a) for each (a, b), resampling whole test sequences."""
    truth = [r["truth"] for r in records]
    seqs = [r["seq"] for r in records]
    out = {}
    for a, b in pairs:
        out[f"{b}-{a}"] = bootstrap_macro_f1_gain(truth, [r[a] for r in records], [r[b] for r in records], seqs,
                                                  labels, n=n_boot, seed=seed)
    return out


def summarise(records: Sequence[Mapping], labels: Sequence[str], groups: Mapping[str, Sequence[str]],
              methods: Sequence[str], n_boot: int) -> dict:
    """Everything the report shows, for one seed or for all seeds pooled."""
    group_of = {s: g for g, ss in groups.items() for s in ss}
    out: dict = {"images": len(records), "sequences": len({r["seq"] for r in records}), "methods": {}}
    for k in methods:
        s = score(records, k, labels)
        s["group_f1"] = group_f1(s["per_class"], groups)
        s["errors"] = error_profile(records, k, group_of)
        out["methods"][k] = s
    out["cost"] = cost(records)
    out["miss_recovery"] = miss_recovery(records)
    out["routing"] = routing(records, group_of)
    out["fixes"] = {f"{b}_vs_{a}": fixes(records, a, b) for a, b in (("single", "cascade"), ("control", "cascade"))}
    pairs = [("single", "cascade"), ("control", "cascade"), ("single", "control")]
    out["gains"] = gains(records, labels, pairs, n_boot) if n_boot > 0 and out["sequences"] > 1 else {}
    return out
