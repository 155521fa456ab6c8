"""Look-alike groups: confusion (+ soft evidence) -> similarity -> agglomerative clustering.

The paper (METHOD.md) clusters S_ij = C_ij / sum_k C_ik from hard confusion counts. On a modest
model that matrix is sparse: rare species are never confused with anything, most pairs sit at
the same distance 1, and a K-cut returns the rare species as singletons and lumps the rest
(measured: ARI 0). Two things keep it from collapsing here:

1. Soft evidence. Each species also gets the mean class-score vector of its matched detections
   (taken at a low confidence): a look-alike shows up as score mass on its neighbours even when
   it never wins the argmax. Row-normalised hard and soft rows are mixed into one profile P
   (soft weight 0.75: a score vector carries more than its argmax).
2. Singleton-free cuts. Unless asked, neither a given K nor K=auto (largest gap in average-
   linkage merge heights) returns one-species groups: a species left alone - typically a rare
   one with little support - is folded into the group it is on average closest to.

The distance is D = 1 - (P + P^T) / 2 with a zero diagonal (the paper's S made symmetric, on
the richer profile). The alternative ``cosine`` (cosine distance between rows of (P + P^T) / 2,
"confused with the same species") was measured on planted sparse matrices and was not better:
equal on clean soft evidence, 2-10 ARI points worse with noisy soft evidence, about equal on
chain-shaped groups; it stays available as ``--method cosine``.

Background (GT boxes the detector missed) is kept out of S: a miss says how hard a species is to
detect, not what it looks like, and counting it in the denominator would shrink every
off-diagonal of poorly-detected species towards zero - the very collapse above. It is reported
as ``miss_rate`` per species in the groups file instead. ``min_support`` only reports: species
with few validation boxes are listed (their placement is the least certain) - excluding them
from the tree was measured to hurt when common species are also thin.

How sure the groups are: ``export.stability`` resamples the validation evidence (its sequences)
and reports per species how often it lands in its group; unstable species are flagged with
advice, marked on the dendrogram, and K=auto takes the cut the resampled evidence picks most often.
"""

from __future__ import annotations

import argparse
import csv
import logging
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from edge.atomic import atomic_write_text
from export.stability import (
    N_BOOT,
    STABLE_SHARE,
    Stability,
    advice,
    k_votes,
    prefer_stable,
    stability,
    units_from_counts,
)

log = logging.getLogger(__name__)

Metric = Literal["symmetric", "cosine"]
GROUP_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
DEFAULT_METHOD: Metric = "symmetric"
SOFT_WEIGHT = 0.75
_HEADER = """\
# Look-alike groups for the camtrap cascade: one expert model is trained per group.
# Written by `camtrap-export group`. A person may edit this file: move species between groups,
# rename groups, change the number of groups. Rules (checked when read): every species of the
# model appears in exactly one group, no group is empty, group names are unique and made of
# letters, digits, '_', '.', '-'. The `meta` section records how the groups were made.
"""


# ---------------------------------------------------------------------------------- input


def load_confusion_csv(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Read ``true,<species...>[,background]`` rows of integer counts.

    Returns the species (header order) and counts [n, n+1] with background last (zeros when
    the CSV has no background column). Rows may come in any order; every species needs one.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: confusion CSV not found")
    with p.open(newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
    if not rows:
        raise ValueError(f"{p}: empty confusion CSV (want a header 'true,<species...>[,background]')")
    header = [c.strip() for c in rows[0]]
    if not header or header[0].lower() != "true":
        raise ValueError(f"{p}: header must start with 'true', got {header[:1]}")
    cols = header[1:]
    has_bg = bool(cols) and cols[-1].lower() == "background"
    species = cols[:-1] if has_bg else cols
    if len(species) < 2:
        raise ValueError(f"{p}: need at least 2 species columns, got {species}")
    if len(set(species)) != len(species) or any(not s for s in species):
        raise ValueError(f"{p}: species columns must be unique and non-empty: {species}")
    index = {s: i for i, s in enumerate(species)}
    counts = np.zeros((len(species), len(species) + 1), dtype=np.int64)
    seen: set[str] = set()
    for lineno, row in enumerate(rows[1:], start=2):
        cells = [c.strip() for c in row]
        name = cells[0]
        if name not in index:
            raise ValueError(f"{p}:{lineno}: unknown species {name!r} in row (columns: {species})")
        if name in seen:
            raise ValueError(f"{p}:{lineno}: duplicate row for species {name!r}")
        if len(cells) != len(header):
            raise ValueError(f"{p}:{lineno}: row {name!r} has {len(cells)} cells, header has {len(header)}")
        seen.add(name)
        for col, cell in zip(header[1:], cells[1:], strict=True):
            try:
                v = int(cell)
            except ValueError:
                raise ValueError(f"{p}:{lineno}: row {name!r}, column {col!r}: {cell!r} is not an integer") \
                    from None
            if v < 0:
                raise ValueError(f"{p}:{lineno}: row {name!r}, column {col!r}: negative count {v}")
            j = len(species) if (has_bg and col == header[-1]) else index[col]
            counts[index[name], j] = v
    missing = [s for s in species if s not in seen]
    if missing:
        raise ValueError(f"{p}: no row for species {missing}")
    return species, counts


def write_confusion_csv(path: str | Path, species: list[str], counts: np.ndarray) -> None:
    """Write counts [n, n+1] (background last) in the form ``load_confusion_csv`` reads."""
    with Path(path).open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["true", *species, "background"])
        for s, row in zip(species, np.asarray(counts), strict=True):
            w.writerow([s, *(int(v) for v in row)])


# ---------------------------------------------------------------------------------- core


def _row_normalise(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows scaled to sum 1; returns (normalised, has_mass). Zero rows stay zero."""
    m = np.asarray(m, dtype=float)
    tot = m.sum(axis=1, keepdims=True)
    has = tot[:, 0] > 0
    out = np.divide(m, tot, out=np.zeros_like(m), where=tot > 0)
    return out, has


def similarity_profile(counts: np.ndarray, soft: np.ndarray | None = None,
                       soft_weight: float = SOFT_WEIGHT) -> np.ndarray:
    """Per-species profile P [n, n], rows summing to 1 (zero row = no evidence at all).

    ``counts`` is [n, n] or [n, n+1] (background last, ignored: see module doc). ``soft`` is
    [n, n], row i the mean class-score vector of species i's matched detections (zero row = no
    detection). P_i mixes the row-normalised hard row S_i and the row-normalised soft row
    (``soft_weight`` on soft), using whichever exist: soft scores see look-alikes that never win
    the argmax.
    """
    c = np.asarray(counts, dtype=float)
    n = c.shape[0]
    if c.ndim != 2 or c.shape[1] not in (n, n + 1):
        raise ValueError(f"counts must be [n, n] or [n, n+1], got {c.shape}")
    if (c < 0).any():
        raise ValueError("counts must be non-negative")
    hard, has_hard = _row_normalise(c[:, :n])
    if soft is None:
        return hard
    s = np.asarray(soft, dtype=float)
    if s.shape != (n, n):
        raise ValueError(f"soft evidence must be [{n}, {n}], got {s.shape}")
    if not np.isfinite(s).all() or (s < 0).any():
        raise ValueError("soft evidence must be finite and non-negative")
    if not 0.0 <= soft_weight <= 1.0:
        raise ValueError(f"soft_weight must be in [0, 1], got {soft_weight}")
    soft_n, has_soft = _row_normalise(s)
    wh = (1.0 - soft_weight) * has_hard
    ws = soft_weight * has_soft
    w = wh + ws
    num = hard * wh[:, None] + soft_n * ws[:, None]
    return np.divide(num, w[:, None], out=np.zeros_like(num), where=w[:, None] > 0)


def distance_matrix(profile: np.ndarray, metric: Metric = DEFAULT_METHOD) -> np.ndarray:
    """Symmetric distance [n, n] in [0, 1] with zero diagonal.

    ``symmetric``: D = 1 - (P + P^T) / 2 (the paper's S, symmetrised). ``cosine``: cosine
    distance between rows of A = (P + P^T) / 2, i.e. species are close when they are confused
    with the same species (second order; see the module doc for how it compared).
    """
    p = np.asarray(profile, dtype=float)
    a = (p + p.T) / 2.0
    if metric == "symmetric":
        d = 1.0 - a
    elif metric == "cosine":
        norm = np.linalg.norm(a, axis=1)
        denom = np.outer(norm, norm)
        cos = np.divide(a @ a.T, denom, out=np.zeros_like(denom), where=denom > 0)
        d = 1.0 - cos
    else:
        raise ValueError(f"unknown metric {metric!r} (want 'symmetric' or 'cosine')")
    d = np.clip((d + d.T) / 2.0, 0.0, 1.0)
    np.fill_diagonal(d, 0.0)
    return d


def placeable(profile: np.ndarray) -> np.ndarray:
    """[n] bool: species with any off-diagonal affinity (row or column) to another species."""
    a = np.asarray(profile, dtype=float)
    a = a + a.T
    np.fill_diagonal(a, 0.0)
    return a.sum(axis=1) > 0


def _linkage(d: np.ndarray) -> np.ndarray:
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import squareform

    return linkage(squareform(d, checks=False), method="average")


def _cut(z: np.ndarray, k: int) -> np.ndarray:
    from scipy.cluster.hierarchy import fcluster

    return fcluster(z, t=k, criterion="maxclust")


def _attach(labels: np.ndarray, d: np.ndarray, members: np.ndarray, outsiders: np.ndarray) -> np.ndarray:
    """Give every outsider the label of the cluster (among ``members``) at least mean distance."""
    out = labels.copy()
    ids = sorted(set(labels[members].tolist()))
    for i in outsiders:
        means = [d[i, members[labels[members] == c]].mean() for c in ids]
        out[i] = ids[int(np.argmin(means))]  # ties: the first (lowest label) wins, deterministic
    return out


def _groups_without_singletons(z: np.ndarray, d: np.ndarray, idx: np.ndarray, k: int) -> np.ndarray:
    """Labels for idx with exactly k non-singleton clusters, when the tree allows it.

    Cut finer and finer; fold singleton clusters into their nearest non-singleton cluster;
    stop at the first cut that leaves k clusters. Falls back to the plain k-cut.
    """
    m = len(idx)
    sub = d[np.ix_(idx, idx)]
    for kk in range(k, m + 1):
        lab = _cut(z, kk)
        sizes = np.bincount(lab)
        big = np.array([i for i in range(m) if sizes[lab[i]] > 1])
        small = np.array([i for i in range(m) if sizes[lab[i]] == 1])
        if len(big) == 0 or len(set(lab[big].tolist())) != k:
            continue
        return _attach(lab, sub, big, small)
    return _cut(z, k)


def _auto_k(z: np.ndarray, allow_singletons: bool) -> int:
    """K at the largest gap in merge heights (2 <= K <= m-1), skipping cuts with singletons."""
    m = z.shape[0] + 1
    h = z[:, 2]
    best_k, best_gap = None, -1.0
    for k in range(2, m):
        # cutting into k clusters lies between merge m-k-1 (last kept) and merge m-k (first undone)
        gap = float(h[m - k] - h[m - k - 1])
        if not allow_singletons and (np.bincount(_cut(z, k))[1:] == 1).any():
            continue
        if gap > best_gap + 1e-12:
            best_k, best_gap = k, gap
    return best_k if best_k is not None else 2


def _auto_k_supported(d: np.ndarray, core: np.ndarray, support: np.ndarray | None, min_support: int,
                      allow_singletons: bool) -> int:
    """K=auto read off the tree of well-supported species only.

    A species with a handful of validation boxes joins the tree late and at a noisy height, which
    blurs the gap between "within a group" and "between groups"; the species it would leave
    alone are folded in afterwards anyway. "Well supported" is ``min_support`` boxes, or a
    quarter of the median support if that is lower (an absolute floor alone dropped thin
    common species too, and measured worse). Falls back to all species when fewer than 4 remain.
    """
    sel = core
    if support is not None:
        sup = np.asarray(support, dtype=float)[core]
        strong = core[sup >= min(min_support, np.median(sup) / 4)]
        if len(strong) >= 4:
            sel = strong
    return _auto_k(_linkage(d[np.ix_(sel, sel)]), allow_singletons)


def cluster(
    profile: np.ndarray,
    species: list[str],
    k: int | str,
    allow_singletons: bool = False,
    *,
    metric: Metric = DEFAULT_METHOD,
    support: np.ndarray | None = None,
    min_support: int = 20,
) -> dict[str, list[str]]:
    """Average-linkage groups ``{group1: [...], ...}`` from a profile (``similarity_profile``).

    Without ``allow_singletons`` neither a given K nor K=auto returns one-species groups when
    the tree allows otherwise: a species that would stand alone (typically a rare one with
    little support) is folded into the group it is on average closest to. Species that share
    no evidence with any other species (``placeable`` false: never confused either way, no soft
    mass) cannot be placed by data: they stay out of the tree, go to the first group, and the
    caller should flag them.
    """
    p = np.asarray(profile, dtype=float)
    n = len(species)
    if p.shape != (n, n):
        raise ValueError(f"profile must be [{n}, {n}] for {n} species, got {p.shape}")
    if n < 2:
        raise ValueError("need at least 2 species to group")
    if k != "auto" and not 1 <= int(k) <= n:
        raise ValueError(f"k must be between 1 and {n} (the number of species), got {k}")
    d = distance_matrix(p, metric)
    informed = placeable(p)
    core = np.arange(n) if allow_singletons or informed.sum() < 2 else np.flatnonzero(informed)
    rest = np.setdiff1d(np.arange(n), core)
    m = len(core)
    z = _linkage(d[np.ix_(core, core)])
    if k == "auto":
        kk = _auto_k_supported(d, core, support, min_support, allow_singletons) if m >= 3 else 1
    else:
        kk = min(int(k), m)
    if allow_singletons or kk == 1 or kk * 2 > m:
        lab_core = _cut(z, kk)
    else:
        lab_core = _groups_without_singletons(z, d, core, kk)
    labels = np.zeros(n, dtype=int)
    labels[core] = lab_core
    if len(rest):
        labels = _attach(labels, d, core, rest)
    return _name_groups(labels, species)


def _name_groups(labels: np.ndarray, species: list[str]) -> dict[str, list[str]]:
    """group1..K, ordered by each group's first species in class order (stable across runs)."""
    order: list[int] = []
    for lab in labels.tolist():
        if lab not in order:
            order.append(lab)
    return {f"group{g + 1}": [s for s, lab in zip(species, labels.tolist(), strict=True) if lab == c]
            for g, c in enumerate(order)}


def adjusted_rand_index(a: list, b: list) -> float:
    """ARI of two labelings of the same items (1 = identical partitions, ~0 = chance)."""
    from scipy.special import comb

    a_ids = {v: i for i, v in enumerate(dict.fromkeys(a))}
    b_ids = {v: i for i, v in enumerate(dict.fromkeys(b))}
    table = np.zeros((len(a_ids), len(b_ids)), dtype=np.int64)
    for x, y in zip(a, b, strict=True):
        table[a_ids[x], b_ids[y]] += 1
    sum_ij = comb(table, 2).sum()
    sum_a = comb(table.sum(axis=1), 2).sum()
    sum_b = comb(table.sum(axis=0), 2).sum()
    expected = sum_a * sum_b / comb(len(a), 2) if len(a) > 1 else 0.0
    top = (sum_a + sum_b) / 2.0
    return 1.0 if top == expected else float((sum_ij - expected) / (top - expected))


def groups_to_labels(groups: dict[str, list[str]], species: list[str]) -> list[str]:
    where = {s: g for g, members in groups.items() for s in members}
    return [where[s] for s in species]


# ---------------------------------------------------------------------------------- files


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML keeps the last one silently)."""


def _construct_unique(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    keys = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in keys:
            raise ValueError(f"duplicate key {key!r} (line {key_node.start_mark.line + 1})")
        keys.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique)


def write_groups(path: str | Path, groups: dict[str, list[str]], meta: dict) -> None:
    """Write groups.yaml: a header saying it may be edited, ``groups``, then ``meta``."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    body = yaml.safe_dump({"groups": {g: list(m) for g, m in groups.items()}}, sort_keys=False,
                          default_flow_style=None, allow_unicode=True, width=100)
    meta_txt = yaml.safe_dump({"meta": _plain(meta)}, sort_keys=False, allow_unicode=True, width=100)
    atomic_write_text(p, _HEADER + body + "\n" + meta_txt)


def _plain(v):
    """numpy scalars/arrays -> plain YAML-safe Python."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, np.ndarray):
        return _plain(v.tolist())
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return round(float(v), 6)
    if isinstance(v, float):
        return round(v, 6)
    return v


def read_groups(path: str | Path, species: list[str] | None = None) -> dict[str, list[str]]:
    """Load and validate a (possibly hand-edited) groups file.

    Checks: ``groups`` is a mapping of unique, well-formed names to non-empty species lists;
    no species twice. With ``species`` (or, if not given, ``meta.species`` from the file)
    every species must appear exactly once and nothing else may.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: groups file not found")
    try:
        doc = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except (yaml.YAMLError, ValueError) as e:
        raise ValueError(f"{p}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("groups"), dict) or not doc["groups"]:
        raise ValueError(f"{p}: want a mapping 'groups: {{name: [species, ...]}}' with at least one group")
    groups: dict[str, list[str]] = {}
    where: dict[str, str] = {}
    for name, members in doc["groups"].items():
        if not isinstance(name, str) or not GROUP_NAME.match(name):
            raise ValueError(f"{p}: group name {name!r} must be 1-64 letters, digits, '_', '.', '-'")
        if not isinstance(members, list) or not members:
            raise ValueError(f"{p}: group {name!r} is empty (want a non-empty list of species)")
        for s in members:
            if not isinstance(s, str) or not s:
                raise ValueError(f"{p}: group {name!r} has a non-string species entry {s!r}")
            if s in where:
                raise ValueError(f"{p}: species {s!r} is in group {where[s]!r} and again in group {name!r}")
            where[s] = name
        groups[name] = list(members)
    if species is None:
        raw = doc.get("meta")
        meta = raw if isinstance(raw, dict) else {}
        species = meta.get("species") if isinstance(meta.get("species"), list) else None
    if species is not None:
        missing = [s for s in species if s not in where]
        if missing:
            raise ValueError(f"{p}: species {missing} are in no group (every species needs exactly one)")
        unknown = [s for s in where if s not in set(species)]
        if unknown:
            raise ValueError(f"{p}: unknown species {unknown} (the model's classes are {list(species)})")
    return groups


# ---------------------------------------------------------------------------------- plots


def leaf_label(species: str, group: str, stability: dict[str, float] | None = None,
               unstable: list[str] | None = None) -> str:
    """A dendrogram leaf: 'species [group]', its share of resamples in its group, '?' when unstable."""
    return (f"{species} [{group}]" + (f" {stability[species]:.0%}" if stability else "")
            + (" ?" if species in (unstable or ()) else ""))


def write_plots(out_stem: Path, species: list[str], profile: np.ndarray, groups: dict[str, list[str]],
                metric: Metric = DEFAULT_METHOD, stability: dict[str, float] | None = None,
                unstable: list[str] | None = None) -> tuple[Path, Path]:
    """Dendrogram and similarity heatmap PNGs beside the groups file; returns their paths.

    With ``stability`` each leaf shows its share of resamples in its group; ``unstable`` leaves
    are marked "?" and drawn in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.cluster.hierarchy import dendrogram

    d = distance_matrix(profile, metric)
    labels = groups_to_labels(groups, species)
    names = [leaf_label(s, g, stability, unstable) for s, g in zip(species, labels, strict=True)]
    dendro = out_stem.with_name(out_stem.name + "_dendrogram.png")
    heat = out_stem.with_name(out_stem.name + "_similarity.png")
    n = len(species)

    fig, ax = plt.subplots(figsize=(max(6, 0.45 * n + 3), 4.5))
    dendrogram(_linkage(d), labels=names, ax=ax, leaf_rotation=90, color_threshold=0)
    for tick in ax.get_xticklabels():
        if tick.get_text().endswith(" ?"):
            tick.set_color("red")
    ax.set_ylabel(f"average-linkage distance ({metric})")
    ax.set_title("Species dendrogram (all species)" + (
        "; % = resamples in its group, ? = unstable" if stability else ""))
    fig.tight_layout()
    fig.savefig(dendro, dpi=100)
    plt.close(fig)

    order = [species.index(s) for members in groups.values() for s in members]
    sim = 1.0 - d[np.ix_(order, order)]
    fig, ax = plt.subplots(figsize=(max(5, 0.4 * n + 2.5), max(4, 0.4 * n + 1.5)))
    im = ax.imshow(sim, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(n), [species[i] for i in order], rotation=90)
    ax.set_yticks(range(n), [names[i] for i in order])
    ax.set_title("Similarity 1 - D, grouped")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(heat, dpi=100)
    plt.close(fig)
    return dendro, heat


# ---------------------------------------------------------------------------------- command


def run_grouping(
    *,
    out: Path,
    k: int | str,
    confusion_csv: Path | None = None,
    run: Path | None = None,
    data: Path | None = None,
    conf: float = 0.25,
    soft_conf: float = 0.01,
    min_support: int = 20,
    allow_singletons: bool = False,
    metric: Metric = DEFAULT_METHOD,
    imgsz: int | None = None,
    evidence=None,
    n_boot: int = N_BOOT,
) -> dict[str, list[str]]:
    """Group species and write groups.yaml + dendrogram + heatmap (+ confusion CSV from a run).

    Sources: ``confusion_csv`` (hard counts only), ``run`` + ``data`` (a trained model on the
    val split: hard counts at ``conf`` and soft evidence at ``soft_conf``), or a ready
    ``evidence`` (export.evidence.Evidence), which lets callers reuse one computation.
    ``n_boot`` resamples of the evidence measure each species' stability (0: none).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if sum(x is not None for x in (confusion_csv, run, evidence)) != 1:
        raise ValueError("give exactly one of --confusion CSV or --run RUN (with --data)")
    soft = None
    if confusion_csv is not None:
        species, counts = load_confusion_csv(confusion_csv)
        source = {"confusion_csv": str(confusion_csv)}
        conf_used: float | None = None
    else:
        if evidence is None:
            if data is None:
                raise ValueError("--run needs --data DATA_YAML (the prepared dataset with a val split)")
            from export.evidence import compute_evidence

            assert run is not None  # exactly one source was given, checked above
            evidence = compute_evidence(run, data, conf=conf, soft_conf=soft_conf, imgsz=imgsz)
        species, counts, soft = evidence.species, evidence.counts, evidence.soft
        source = {"run": str(evidence.model), "data": str(evidence.data), "images": evidence.images}
        conf_used = evidence.conf
        write_confusion_csv(out.with_name(out.stem + "_confusion.csv"), species, counts)
    support = counts.sum(axis=1)
    profile = similarity_profile(counts, soft)

    def cluster_k(c: np.ndarray, sf: np.ndarray | None, kk: int | str) -> dict[str, list[str]]:
        return cluster(similarity_profile(c, sf), species, kk, allow_singletons, metric=metric,
                       support=c.sum(axis=1), min_support=min_support)

    groups = cluster_k(counts, soft, k)
    k_gap = len(groups)
    units = evidence.units if evidence is not None and evidence.units is not None else units_from_counts(counts)
    stab: Stability | None = None
    votes: dict[int, int] = {}
    if n_boot > 0 and len(units) > 1:
        if k == "auto":  # the cut the resampled evidence picks most often (export.stability)
            votes = k_votes(units, lambda c, sf: cluster_k(c, sf, "auto"), n_boot)
            chosen = prefer_stable(votes, k_gap)
            if chosen != k_gap:
                groups = cluster_k(counts, soft, chosen)
        stab = stability(units, groups, cluster_k, n_boot, species_order=species)
        (log.warning if stab.unstable else log.info)("%s", advice(stab))
    low = [s for s, v in zip(species, support.tolist(), strict=True) if v < min_support]
    if low:
        log.warning("species with validation support below %d (their placement is the least certain; "
                    "check them in %s): %s", min_support, out, ", ".join(low))
    no_evidence = [s for s, ok in zip(species, placeable(profile).tolist(), strict=True) if not ok]
    if no_evidence:
        log.warning("species never confused with any other and without soft evidence: placed in the "
                    "first group by default, edit %s: %s", out, ", ".join(no_evidence))
    miss = np.divide(counts[:, -1], support, out=np.zeros(len(species)), where=support > 0)
    meta: dict[str, Any] = {
        "species": species,
        "k": len(groups),
        "k_requested": k,
        "method": f"{metric} distance, average linkage, "
                  f"{'hard counts + soft class scores' if soft is not None else 'hard counts'}",
        "conf": conf_used,
        "soft_conf": soft_conf if soft is not None else None,
        "min_support": min_support,
        "allow_singletons": allow_singletons,
        "support": dict(zip(species, support.tolist(), strict=True)),
        "miss_rate": dict(zip(species, miss.tolist(), strict=True)),
        "low_support": low,
        "no_evidence": no_evidence,
        "source": source,
    }
    if stab is not None:
        meta["stability"] = {"share_in_group": stab.share, "unstable": stab.unstable, "threshold": STABLE_SHARE,
                             "resamples": stab.n_boot, "units": f"{stab.n_units} {stab.units}",
                             "advice": advice(stab)}
        if votes:
            meta["stability"]["k_largest_gap"] = k_gap
            meta["stability"]["k_votes"] = votes
    write_groups(out, groups, meta)
    write_plots(out.with_suffix(""), species, profile, groups, metric,
                stability=stab.share if stab else None, unstable=stab.unstable if stab else None)
    for g, members in groups.items():
        log.info("%s: %s", g, ", ".join(members))
    return groups


def _k_arg(v: str) -> int | str:
    if v == "auto":
        return v
    try:
        k = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--k must be a positive integer or 'auto', got {v!r}") from None
    if k < 1:
        raise argparse.ArgumentTypeError(f"--k must be >= 1, got {k}")
    return k


def add_cli(sub) -> None:
    from edge.cli import number_in

    p = sub.add_parser("group", help="look-alike groups from a confusion matrix or a trained model",
                       description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", type=Path, help="training run folder (weights/best.pt) or a .pt file")
    src.add_argument("--confusion", type=Path, help="CSV: header true,<species...>[,background]")
    p.add_argument("--data", type=Path, help="data.yaml of the prepared dataset (with --run)")
    p.add_argument("--k", type=_k_arg, default="auto", help="number of groups, or 'auto' (default)")
    p.add_argument("--out", type=Path, required=True, help="groups.yaml to write (PNGs go beside it)")
    p.add_argument("--conf", type=number_in(0, 1), default=0.25, help="deployment confidence for hard counts")
    p.add_argument("--soft-conf", type=number_in(0, 1), default=0.01, help="low confidence for soft evidence")
    p.add_argument("--imgsz", type=int, default=None, help="inference size (default: the model's)")
    p.add_argument("--min-support", type=int, default=20, help="report species with fewer val boxes")
    p.add_argument("--allow-singletons", action="store_true", help="allow one-species groups")
    p.add_argument("--bootstrap", type=int, default=N_BOOT,
                   help="resamples of the validation evidence measuring each species' stability (0 = none)")
    p.add_argument("--method", choices=["symmetric", "cosine"], default=DEFAULT_METHOD,
                   help="distance between species profiles (default symmetric: 1 - (P + P^T) / 2)")
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    if args.run is not None and args.data is None:
        raise ValueError("--run needs --data DATA_YAML")
    groups = run_grouping(out=args.out, k=args.k, confusion_csv=args.confusion, run=args.run, data=args.data,
                          conf=args.conf, soft_conf=args.soft_conf, min_support=args.min_support,
                          allow_singletons=args.allow_singletons, metric=args.method, imgsz=args.imgsz,
                          n_boot=args.bootstrap)
    from edge.manifest import species_label
    from export.taxonomy import dataset_taxonomy

    taxa = dataset_taxonomy(args.data)  # names shown beside the classes when prepare stored them
    for g, members in groups.items():
        print(f"{g}: {', '.join(species_label(s, taxa) for s in members)}")
    st = (yaml.safe_load(Path(args.out).read_text()).get("meta") or {}).get("stability")
    if st:
        print(st["advice"])
    print(f"wrote {args.out}")
    return 0
