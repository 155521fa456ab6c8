"""Probation of a newly switched-in model (pure): commit it, keep watching, or roll it back and why.

The rules, checked in this order (the first that fires wins):
1. crashes (unclean restarts during probation, counted across restarts) >= max_crashes
2. inference errors >= max_errors
3. after ``min_frames``: mean latency above the bound (``max_latency_ms``, or ``latency_factor``
   times the old model's recent mean when no bound is set)
4. after ``min_frames``: empty-frame rate differs from the old model's recent rate by more than
   ``max_empty_delta`` (a model that suddenly finds nothing, or animals everywhere)
5. ``frames`` frames seen, or ``minutes`` passed: commit.
Without a baseline (the old model had no recent frames) rules 3 (relative) and 4 do not apply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from edge.updates_config import ProbationSection


@dataclass(frozen=True)
class Baseline:
    """The old model's recent behaviour, from the ledger's last results before the switch."""

    frames: int = 0
    empty_rate: float | None = None
    mean_ms: float | None = None


@dataclass(frozen=True)
class Counters:
    frames: int = 0
    errors: int = 0
    empty: int = 0
    ms_total: float = 0.0
    crashes: int = 0
    elapsed_s: float = 0.0

    @property
    def mean_ms(self) -> float | None:
        return self.ms_total / self.frames if self.frames else None

    @property
    def empty_rate(self) -> float | None:
        return self.empty / self.frames if self.frames else None


@dataclass(frozen=True)
class Verdict:
    action: Literal["continue", "commit", "rollback"]
    reason: str = ""


def judge(c: Counters, policy: ProbationSection, base: Baseline) -> Verdict:
    if c.crashes >= policy.max_crashes:
        return Verdict("rollback", f"crash loop: {c.crashes} unclean restarts during probation")
    if c.errors >= policy.max_errors:
        return Verdict("rollback", f"{c.errors} inference errors during probation")
    if c.frames >= policy.min_frames:
        bound = policy.max_latency_ms or (base.mean_ms * policy.latency_factor if base.mean_ms else None)
        if bound is not None and c.mean_ms is not None and c.mean_ms > bound:
            return Verdict("rollback", f"latency {c.mean_ms:.1f} ms per frame is above the {bound:.1f} ms bound")
        if base.empty_rate is not None and c.empty_rate is not None \
                and abs(c.empty_rate - base.empty_rate) > policy.max_empty_delta:
            return Verdict("rollback", f"empty-frame rate {c.empty_rate:.2f} is far from the old model's "
                           f"{base.empty_rate:.2f} (more than {policy.max_empty_delta:.2f} apart)")
    if c.frames >= policy.frames:
        return Verdict("commit", f"{c.frames} frames on probation without a fault")
    if c.elapsed_s >= policy.minutes * 60:
        return Verdict("commit", f"{policy.minutes:g} minutes on probation without a fault ({c.frames} frames)")
    return Verdict("continue")
