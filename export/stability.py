"""How sure the grouping is: a bootstrap of the validation evidence (pure).

Groups come from thin evidence: a validation split may hold a handful of boxes of a rare
species, and one of them predicted as another species can move it into that species' group.
So the evidence is resampled: its units (sequences when prepare's meta.json names them, else
images; single boxes for a confusion CSV) are drawn with replacement, the profile is rebuilt
and cut into the same number of groups, and each bootstrap group is matched to the original
group it overlaps most (Jaccard). A species' **stability** is the share of resamples in which
it lands in the group matched to its own. Below ``STABLE_SHARE`` it is flagged unstable: its
placement rests on a few boxes. A species with fewer than ``MIN_BOXES`` validation boxes is
flagged too, whatever its share: a bootstrap of one box cannot show how that box might have
gone (its place then comes from other species' confusions with it). The advice is a larger validation split (``prepare
--val-frac``) or a person's judgement (edit groups.yaml).

K=auto prefers the stable cut: the largest-gap rule is run on every resample too, and the K it
picks most often wins (the full evidence's own K on a tie). A cut that one thin species can
move is thus not taken; but a species whose placement wavers does not merge whole groups to
look calm (a coarser cut is always "more stable" per species): it is flagged instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

STABLE_SHARE = 0.8  # a species is stable when it lands in its group in at least this share of resamples
N_BOOT = 200
MIN_BOXES = 5  # fewer validation boxes of a species than this: too few to judge its placement


@dataclass
class Units:
    """The evidence split into resampling units: per unit, its share of the totals."""

    counts: np.ndarray  # [U, n, n+1] hard counts, background last
    soft_sum: np.ndarray  # [U, n, n] summed class-score vectors
    soft_n: np.ndarray  # [U, n] boxes behind soft_sum
    kind: str  # "sequences", "images" or "boxes"

    def __len__(self) -> int:
        return int(self.counts.shape[0])

    def total(self, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(counts [n, n+1], soft mean [n, n] or None) over the units, each taken ``weights`` times."""
        w = np.ones(len(self)) if weights is None else np.asarray(weights, float)
        counts = np.tensordot(w, self.counts, axes=1)
        if not self.soft_n.any():
            return counts, None
        s = np.tensordot(w, self.soft_sum, axes=1)
        n = np.tensordot(w, self.soft_n, axes=1)
        return counts, np.divide(s, n[:, None], out=np.zeros_like(s), where=n[:, None] > 0)


def units_from_counts(counts: np.ndarray) -> Units:
    """A confusion CSV has no images: every box is its own unit."""
    c = np.asarray(counts, dtype=np.int64)
    n = c.shape[0]
    cells = [(i, j) for i in range(n) for j in range(c.shape[1]) for _ in range(int(c[i, j]))]
    out = np.zeros((len(cells), n, c.shape[1]))
    for u, (i, j) in enumerate(cells):
        out[u, i, j] = 1
    return Units(out, np.zeros((len(cells), n, n)), np.zeros((len(cells), n)), "boxes")


def group_units(per_image: Units, keys: Sequence[str]) -> Units:
    """Merge image units that share a key (a sequence id): frames of a burst are not independent."""
    order = list(dict.fromkeys(keys))
    if len(order) == len(keys):
        return Units(per_image.counts, per_image.soft_sum, per_image.soft_n, per_image.kind)
    idx = np.array([order.index(k) for k in keys])
    agg = [np.zeros((len(order), *a.shape[1:])) for a in (per_image.counts, per_image.soft_sum, per_image.soft_n)]
    for a, src in zip(agg, (per_image.counts, per_image.soft_sum, per_image.soft_n), strict=True):
        np.add.at(a, idx, src)
    return Units(agg[0], agg[1], agg[2], kind="sequences")


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 0.0


def lands(original: dict[str, list[str]], resampled: dict[str, list[str]]) -> dict[str, bool]:
    """Per species: is it in the resampled group that best matches (Jaccard) its original group?"""
    orig = {g: set(m) for g, m in original.items()}
    res = [set(m) for m in resampled.values()]
    out = {}
    for members in orig.values():
        best = max(res, key=lambda r: _jaccard(members, r))
        for s in members:
            out[s] = s in best
    return out


Clusterer = Callable[[np.ndarray, np.ndarray | None, int], dict[str, list[str]]]


@dataclass
class Stability:
    k: int
    share: dict[str, float]  # species -> share of resamples landing in its group
    n_boot: int
    units: str
    n_units: int
    unstable: list[str] = field(default_factory=list)
    boxes: dict[str, int] = field(default_factory=dict)  # validation boxes per species

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.share.values()))) if self.share else 0.0


def stability(units: Units, groups: dict[str, list[str]], cluster_k: Clusterer, n_boot: int = N_BOOT,
              seed: int = 0, species_order: Sequence[str] | None = None) -> Stability:
    """Bootstrap ``units``, re-cluster each resample into ``len(groups)`` groups, and score each species.

    ``species_order``: the species in the evidence's row order (to count each one's boxes)."""
    k = len(groups)
    species = [s for m in groups.values() for s in m]
    hits = dict.fromkeys(species, 0)
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        w = np.bincount(rng.integers(0, len(units), len(units)), minlength=len(units))
        counts, soft = units.total(w)
        for s, ok in lands(groups, cluster_k(counts, soft, k)).items():
            hits[s] += ok
    share = {s: hits[s] / n_boot for s in species}
    totals = units.total()[0].sum(axis=1)
    boxes = {s: int(totals[i]) for i, s in enumerate(species_order)} if species_order is not None else {}
    unstable = sorted((s for s in species if share[s] < STABLE_SHARE or boxes.get(s, MIN_BOXES) < MIN_BOXES),
                      key=lambda s: (share[s], s))
    return Stability(k, share, n_boot, units.kind, len(units), unstable, boxes)


def k_votes(units: Units, cluster_auto: Callable[[np.ndarray, np.ndarray | None], dict[str, list[str]]],
            n_boot: int = N_BOOT, seed: int = 0) -> dict[int, int]:
    """How often each K is the largest-gap K over ``n_boot`` resamples of ``units``."""
    votes: dict[int, int] = {}
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        w = np.bincount(rng.integers(0, len(units), len(units)), minlength=len(units))
        k = len(cluster_auto(*units.total(w)))
        votes[k] = votes.get(k, 0) + 1
    return dict(sorted(votes.items()))


def prefer_stable(votes: dict[int, int], gap_k: int) -> int:
    """K=auto: the K the resamples pick most often; the full evidence's ``gap_k`` on a tie."""
    top = max(votes.values(), default=0)
    if votes.get(gap_k, 0) == top:
        return gap_k
    return min(k for k, v in votes.items() if v == top)


def advice(st: Stability, val_frac: float | None = None) -> str:
    """One line saying which species are unstable and what to do about it."""
    if not st.unstable:
        return f"every species lands in its group in at least {STABLE_SHARE:.0%} of {st.n_boot} resamples"
    def why(s: str) -> str:
        thin = st.boxes.get(s, MIN_BOXES) < MIN_BOXES
        n = st.boxes.get(s, 0)
        return f"{s} ({st.share[s]:.0%}" + (f", {n} box{'' if n == 1 else 'es'})" if thin else ")")

    names = ", ".join(why(s) for s in st.unstable)
    frac = f" (now {val_frac})" if val_frac is not None else ""
    return (f"unstable placement (in its group in fewer than {STABLE_SHARE:.0%} of {st.n_boot} resamples of "
            f"{st.n_units} validation {st.units}, or fewer than {MIN_BOXES} validation boxes): {names}. "
            f"The validation evidence for them is thin: prepare with a larger --val-frac{frac}, or move "
            "them in groups.yaml by what a biologist knows")
