"""The update's state file: written (atomically, fsync'd) before each step acts, so that a restart
knows exactly where an update stood and whether to resume it, carry on with probation, or roll
it back. The retained ``update`` MQTT topic mirrors this record.

States and steps::

    fetching -> verifying -> building -> selftest -> switching -> probation -> committed
        |           |            |           |           |            \\-> rolling_back -> rolled_back
        +-----------+------------+-----------+-----------+--> failed (the old model never stopped)
    refused: a command turned away before anything started (bad signature, downgrade, ...)

What a restart does (``on_start``, pure), given where ``current`` points:
- before ``switching``: ``current`` is still the old bundle, so the box starts on the old model
  and the update resumes (fetched files are kept, a half-fetched one resumes) -- at most
  ``MAX_RESUMES`` times, then it is failed with the step it kept dying in.
- ``switching``: if ``current`` already names the new bundle, probation starts; else the
  update resumes (all files are held, so this costs a re-check, not a download).
- ``probation``: a start that follows an unclean stop counts as a crash; enough of them roll
  back before the new model is loaded again (a crash loop must not need the daemon to run).
- ``rolling_back``: the flip back is redone (idempotent).
"""

from __future__ import annotations

import builtins
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from edge.atomic import atomic_write_bytes

State = Literal["fetching", "verifying", "building", "selftest", "switching", "probation", "rolling_back",
                "committed", "rolled_back", "failed", "refused"]
BEFORE_SWITCH = ("fetching", "verifying", "building", "selftest")
TERMINAL = ("committed", "rolled_back", "failed", "refused")
MAX_RESUMES = 3


@dataclass(frozen=True)
class UpdateRecord:
    """One update (or rollback, or refused command), as on disk and on the ``update`` topic."""

    id: str  # the command's nonce
    state: State
    step: str = ""
    from_version: str | None = None
    from_sha: str | None = None
    to_version: str | None = None
    to_sha: str | None = None
    source: str | None = None  # base URL or archive URL
    bytes: int = 0
    reason: str | None = None
    started: float = 0.0
    updated: float = 0.0
    resumes: int = 0
    clean_stop: bool = False
    probation: dict[str, float] = field(default_factory=dict)  # Counters fields, persisted
    baseline: dict[str, float | None] = field(default_factory=dict)  # Baseline fields

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def to(self, state: State, step: str = "", **changes: object) -> UpdateRecord:
        return replace(self, state=state, step=step, updated=time.time(), **changes)  # type: ignore[arg-type]

    def topic_payload(self) -> builtins.bytes:  # builtins: this class has a field named bytes
        """The retained ``update`` message: compact, the fields a fleet table needs."""
        body = {"v": 1, "id": self.id[:12], "state": self.state, "step": self.step, "from": self.from_version,
                "to": self.to_version, "bytes": self.bytes, "reason": self.reason, "t": int(self.updated)}
        return json.dumps(body, separators=(",", ":")).encode()


class StateFile:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self) -> UpdateRecord | None:
        """The last record, or None. A file that cannot be read is reported, not guessed at."""
        if not self.path.exists():
            return None
        try:
            raw = json.loads(self.path.read_text())
            return UpdateRecord(**raw)
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f"{self.path}: update state unreadable ({e}); remove it to forget the update") from None

    def save(self, rec: UpdateRecord) -> UpdateRecord:
        atomic_write_bytes(self.path, json.dumps(asdict(rec), sort_keys=True, indent=1).encode())
        return rec


Action = Literal["none", "resume", "probation", "rollback", "fail"]


def on_start(rec: UpdateRecord | None, current_sha: str | None, max_crashes: int) -> tuple[Action, UpdateRecord | None]:
    """What a starting daemon does about ``rec`` (see the module docstring); returns the action and
    the record to write before doing it."""
    if rec is None or rec.terminal:
        return "none", rec
    if rec.state == "rolling_back":
        return "rollback", rec
    if rec.state == "probation" or (rec.state == "switching" and current_sha == rec.to_sha):
        crashes = int(rec.probation.get("crashes", 0)) + (0 if rec.clean_stop or rec.state == "switching" else 1)
        rec = rec.to("probation", "on probation", clean_stop=False, probation={**rec.probation, "crashes": crashes})
        if crashes >= max_crashes:
            return "rollback", rec.to("rolling_back", "rolling back",
                                      reason=f"crash loop: {crashes} unclean restarts during probation")
        return "probation", rec
    if rec.resumes >= MAX_RESUMES:
        return "fail", rec.to("failed", rec.step, reason=f"interrupted {rec.resumes + 1} times at step "
                              f"{rec.state!r}; the old model stays")
    return "resume", rec.to(rec.state, rec.step, resumes=rec.resumes + 1)
