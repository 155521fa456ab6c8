"""The daemon as the updater's host (edge/updates.py ``Host``): build engines in the background,
self-test them, swap what serves between two batches, and publish the update record.

Why between batches: the processing loop is the only thread that runs the cascade, so a swap
it performs itself can never split a batch between two models; frames keep their place in the
ledger and each gets exactly one result, from the old model or the new one (the result's
``model`` and ``bundle`` fields say which). A swap asked from another thread (the update worker)
is queued for the loop and waited for; one asked from the loop itself (a rollback decided on
an inference error) runs at once.

Also here: adopting the bundle an installer copied to ``<state_dir>/models/current`` (a plain
folder) into the content-addressed store, so the first update has a ``previous`` to return to.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edge.updates_probation import Baseline
from edge.updates_state import UpdateRecord
from edge.updates_store import CURRENT, ModelStore

if TYPE_CHECKING:
    from edge.bundle import Bundle
    from edge.daemon import Daemon

log = logging.getLogger("camtrap.updates")

ADOPTING = ".adopting"
SWAP_WAIT_S = 600.0  # the loop finishes the batch in hand first; a TensorRT batch is far shorter
RECENT = 200  # frames of the serving model remembered for probation's baseline


def adopt_installed(store: ModelStore) -> None:
    """``models/current`` as a plain folder (copied there by an installer) becomes a bundle in the
    store with ``current`` a symlink to it. Crash-safe: the folder is renamed aside first and
    only removed once the symlink is in place; a start that finds it aside redoes the adoption."""
    cur = store.root / CURRENT
    aside = store.root / ADOPTING
    if cur.is_dir() and not cur.is_symlink():
        if aside.exists():
            shutil.rmtree(aside)
        target = store.import_bundle(cur)
        os.rename(cur, aside)
        store.activate(target)
    elif not cur.exists() and not cur.is_symlink() and (aside / "manifest.json").is_file():
        store.activate(store.import_bundle(aside))
    if aside.exists() and store.current() is not None:
        shutil.rmtree(aside, ignore_errors=True)


class DaemonHost:
    """See the module docstring. ``serving`` is (bundle, engines) of the model in use."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self.serving: tuple[Bundle, Any] | None = None
        self.recent: deque[tuple[bool, float]] = deque(maxlen=RECENT)  # (empty, ms) per frame
        self._requests: queue.SimpleQueue[tuple[Callable[[], Any], threading.Event, list]] = queue.SimpleQueue()
        self.loop_thread: threading.Thread | None = None

    # -- Host --------------------------------------------------------------------------------
    def build(self, bundle: Bundle) -> Any:
        from edge.engines import load_engines

        self.d.notifier.status(f"building engines for model {bundle.version} (the current model keeps serving)")
        return load_engines(bundle, self.d.cfg.engine)

    def selftest(self, bundle: Bundle, built: Any) -> str | None:
        from edge.selftest import selftest

        report = selftest(bundle, self.d.cfg.engine.type, engines=built, runs=3)
        problems = [f"{m.name}: {p}" for m in report.models for p in m.problems]
        if problems:
            return "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "")
        return None

    def swap(self, bundle: Bundle, built: Any | None) -> tuple[Bundle, Any] | None:
        if built is None:
            built = self.build(bundle)
        if threading.current_thread() is self.loop_thread or self.loop_thread is None:
            return self._swap_now(bundle, built)
        done = threading.Event()
        out: list[Any] = []
        self._requests.put((lambda: self._swap_now(bundle, built), done, out))
        if not done.wait(SWAP_WAIT_S):
            raise TimeoutError("the processing loop did not take the new model within "
                               f"{SWAP_WAIT_S:.0f} s")
        if isinstance(out[0], BaseException):
            raise out[0]
        return out[0]

    def discard(self, built: Any) -> None:
        for e in (built or {}).values():
            try:
                e.close()
            except Exception:
                log.exception("closing an engine")

    def baseline(self) -> Baseline:
        frames = list(self.recent)
        if not frames:
            return Baseline()
        return Baseline(frames=len(frames), empty_rate=sum(e for e, _ in frames) / len(frames),
                        mean_ms=sum(ms for _, ms in frames) / len(frames))

    def publish(self, rec: UpdateRecord) -> None:
        self.d.publish_update(rec.topic_payload())

    # -- the processing loop -----------------------------------------------------------------
    def run_pending(self) -> None:
        """Called by the processing loop between batches: perform queued swaps."""
        while True:
            try:
                fn, done, out = self._requests.get_nowait()
            except queue.Empty:
                return
            try:
                out.append(fn())
            except BaseException as e:
                out.append(e)
            done.set()

    def _swap_now(self, bundle: Bundle, built: Any) -> tuple[Bundle, Any] | None:
        old = self.serving
        self.d.use_model(bundle, built)
        self.serving = (bundle, built)
        self.recent.clear()
        return old

    def frame_done(self, empty: bool, ms: float) -> None:
        self.recent.append((empty, ms))
