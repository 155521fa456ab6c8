"""Remote model updates: a signed command in, a new bundle fetched by content, built and
self-tested while the old model serves, switched in atomically, watched on probation, then
committed or rolled back by itself, with every step on the retained ``update`` topic.

::

    cmd/update (signed, expiring, fresh nonce) -> manifest + signature -> only the missing files
     -> assemble + verify (signature, every sha256, not older than the running version)
     -> build engines (old ones keep serving) -> self-test -> switch (symlink flip + fsync)
     -> probation (N frames / T minutes; errors, crash loop, latency, empty rate)
     -> commit (prune to current + previous)  |  roll back (say why)

The ``Updater`` owns the decisions and the files (edge/updates_store.py, the state file in
edge/updates_state.py); the daemon is its ``Host``: it builds engines, runs the self-test,
swaps what serves between two batches, and publishes the record. So the same code runs under
the daemon and under tests, and the daemon's processing never waits for a download or a build.

Invariants:
- The state file is written before each step acts; ``resume_on_start`` (called before the
  daemon loads a model) turns whatever a crash left into resume, probation or rollback.
- Nothing about the serving model changes before ``switching``; a failure before then leaves the
  box exactly as it was, with the reason on the update topic.
- A version older than (or equal to) the running one is refused, except an explicit ``rollback``
  to a version the store still keeps.
- Commands are obeyed only signed, addressed to this box, unexpired and with a fresh nonce.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from edge.bundle import Bundle, BundleError, one_line, unpack_archive, verify_dir
from edge.manifest import Manifest
from edge.signing import KeySource, SignatureError, verify
from edge.updates_command import Command, CommandError, ReplayStore, parse_command
from edge.updates_config import UpdatesSection
from edge.updates_fetch import FetchError, check_url, fetch_with_retries, join_url, read_small
from edge.updates_probation import Baseline, Counters, judge
from edge.updates_state import StateFile, UpdateRecord, on_start
from edge.updates_store import ModelStore, StoreError

log = logging.getLogger("camtrap.updates")

COMMANDS = ("update", "rollback", "models")
MANIFEST_CAP = 4 << 20
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# how loud each state is in the journal: an update that did not go through is a problem to see
# (a rollback WARNING: the old model serves; a failure ERROR: the update is lost), not routine INFO
# (a refusal has its own WARNING line, with the command's name: see handle and _refuse)
LOG_LEVEL = {"failed": logging.ERROR, "rolling_back": logging.WARNING, "rolled_back": logging.WARNING}
SAVE_EVERY_S = 30.0  # probation counters reach the disk at least this often


class UpdateError(RuntimeError):
    """An update step failed; the message is the reason on the update topic."""


def version_key(v: str) -> tuple[tuple[int, int | str], ...]:
    """Natural order: 2026.11.10 > 2026.11.9, demo-10 > demo-2."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.findall(r"\d+|\D+", v))


def valid_version(v: str) -> bool:
    """A version usable in a URL path and a file name (no '/', no '..')."""
    return bool(_VERSION.match(v)) and ".." not in v


def manifest_path(version: str) -> tuple[str, str]:
    """Where `camtrap-export publish` puts a version's manifest, relative to the base URL."""
    return "manifests", f"{version}.json"


def file_path(sha256: str) -> tuple[str, str]:
    """Where a published file lives, relative to the base URL (content-addressed)."""
    return "files", sha256


def update_line(state_dir: Path) -> str:
    """One line for `camtrap-edge status`: the last update's state, from the state file."""
    try:
        rec = StateFile(Path(state_dir) / "updates" / "state.json").load()
    except ValueError as e:
        return f"model update: {e}"
    if rec is None:
        return "model update: none yet"
    return (f"model update: {rec.state} ({rec.step}) {rec.from_version or '?'} -> {rec.to_version or '?'}, "
            f"{rec.bytes:,} bytes fetched" + (f"; {rec.reason}" if rec.reason else ""))


class Host(Protocol):
    """What the daemon does for the updater (see the module docstring)."""

    def build(self, bundle: Bundle) -> Any: ...  # engines for the bundle; raises on failure
    def selftest(self, bundle: Bundle, built: Any) -> str | None: ...  # a problem, or None
    def swap(self, bundle: Bundle, built: Any | None) -> tuple[Bundle, Any] | None: ...
    # serve ``bundle`` (built None: build it first) between two batches; returns what served before
    def discard(self, built: Any) -> None: ...  # close engines no longer needed
    def baseline(self) -> Baseline: ...
    def publish(self, rec: UpdateRecord) -> None: ...


class Updater:
    def __init__(self, cfg: UpdatesSection, *, device_id: str, state_dir: Path, public_keys: Iterable[KeySource],
                 host: Host, engines_dir: Path | None = None) -> None:
        self.cfg = cfg
        self.device_id = device_id
        self.keys = list(public_keys)
        self.host = host
        self.engines_dir = engines_dir
        self.store = ModelStore(Path(state_dir) / "models")
        self.downloads = self.store.root / "downloads"
        self.state = StateFile(Path(state_dir) / "updates" / "state.json")
        self.replay = ReplayStore(Path(state_dir) / "updates" / "nonces.json")
        self._lock = threading.RLock()
        self._worker: threading.Thread | None = None
        self._rec: UpdateRecord | None = self.state.load()
        self._old: tuple[Bundle, Any] | None = None  # what served before the switch (for a fast rollback)
        self._last_save = 0.0
        self._observed_at: float | None = None  # time.monotonic() of the last observe() in this process

    # -- records ----------------------------------------------------------------------------
    @property
    def record(self) -> UpdateRecord | None:
        return self._rec

    def _save(self, rec: UpdateRecord) -> UpdateRecord:
        with self._lock:
            self._rec = self.state.save(rec)
            self._last_save = time.monotonic()
        log.log(LOG_LEVEL.get(rec.state, logging.INFO), "update %s: %s%s%s", rec.to_version or "?", rec.state,
                f" ({rec.step})" if rec.step else "", f": {rec.reason}" if rec.reason else "")
        try:
            self.host.publish(rec)
        except Exception:  # a full outbox must not stop an update
            log.exception("could not publish the update state")
        return rec

    def _busy(self) -> bool:
        return self._rec is not None and not self._rec.terminal

    # -- start-up ---------------------------------------------------------------------------
    def resume_on_start(self) -> str:
        """Before the daemon loads ``current``: settle what a crash left (see edge/updates_state.py).
        Returns the action taken. A rollback flips ``current`` here, so the daemon loads the old model."""
        cur = self.store.current()
        action, rec = on_start(self._rec, cur.name if cur else None, self.cfg.probation.max_crashes)
        if rec is None or action == "none":
            return "none"
        self._save(rec)
        if action == "rollback":
            self._flip_back(rec, reason=rec.reason or "rolled back", serve=False)
        elif action == "fail":
            self._clear_downloads()
        return action

    def after_start(self) -> None:
        """Once the daemon serves: resume an update that a restart interrupted."""
        rec = self._rec
        if rec is not None and rec.state in ("fetching", "verifying", "building", "selftest", "switching"):
            self._spawn(rec)

    def clean_stop(self) -> None:
        """A clean stop is not a crash: remember it for probation's crash count."""
        with self._lock:
            if self._rec is not None and self._rec.state == "probation":
                self._rec = self.state.save(self._rec.to("probation", self._rec.step, clean_stop=True))

    # -- commands ---------------------------------------------------------------------------
    def handle(self, name: str, payload: bytes, now: float | None = None) -> dict[str, Any]:
        """``cmd/update``, ``cmd/rollback``, ``cmd/models``: the reply body."""
        try:
            cmd = parse_command(payload, name=name, device_id=self.device_id, public_keys=self.keys, now=now)
            self.replay.claim(cmd, now=now)
        except CommandError as e:
            log.warning("refused: %s", e)
            if name != "models" and not self._busy():  # never hide a running update's progress
                self._save(UpdateRecord(id="-", state="refused", reason=str(e), started=time.time(),
                                        updated=time.time(), from_version=self._current_version()))
            return {"ok": False, "state": "refused", "reason": str(e)}
        if name == "models":
            return {"ok": True, **self.models()}
        if not self.cfg.enabled:
            return self._refuse(cmd, "remote updates are disabled in this box's config (updates.enabled)")
        with self._lock:  # decisions and the first record only: never held while a model is swapped
            if self._busy() and not (name == "rollback" and self._rec and self._rec.state == "probation"):
                assert self._rec is not None
                return {"ok": False, "state": "refused", "reason": f"update to {self._rec.to_version} is in progress "
                        f"({self._rec.state}); try again when it has finished"}
            if name == "update":
                return self._update_cmd(cmd)
            rec, target, reply = self._rollback_cmd(cmd)
        if rec is not None:
            self._flip_back(rec, reason=rec.reason or "rollback requested", target=target)
            done = self._rec
            reply = {**reply, "ok": done is not None and done.state == "rolled_back",
                     "state": done.state if done else "failed", "reason": done.reason if done else None}
        return reply

    def _refuse(self, cmd: Command, reason: str, version: str | None = None) -> dict[str, Any]:
        if not self._busy():
            self._save(UpdateRecord(id=cmd.nonce, state="refused", reason=reason, started=time.time(),
                                    updated=time.time(), from_version=self._current_version(), to_version=version))
        log.warning("cmd/%s refused: %s", cmd.name, reason)
        return {"ok": False, "state": "refused", "reason": reason}

    def _current_version(self) -> str | None:
        cur = self.store.current()
        return self.store.manifest_of(cur).bundle_version if cur else None

    def _update_cmd(self, cmd: Command) -> dict[str, Any]:
        version = str(cmd.args.get("version") or "")
        if not valid_version(version):
            return self._refuse(cmd, f"version {version!r}: 1-64 letters, digits, '.', '_', '+', '-'")
        source = cmd.args.get("url") or self.cfg.base_url
        if not source:
            return self._refuse(cmd, "no URL in the command and no updates.base_url in the config", version)
        try:
            check_url(str(source))
        except ValueError as e:
            return self._refuse(cmd, str(e), version)
        cur = self.store.current()
        if cur is None:
            return self._refuse(cmd, f"{self.store.root / 'current'} is not a bundle in the model store; updates "
                                "manage <state_dir>/models/current (leave bundle.path at its default)", version)
        running = self.store.manifest_of(cur).bundle_version
        if version_key(version) <= version_key(running):
            return self._refuse(cmd, f"version {version} is not newer than the running {running}; use cmd/rollback "
                                "to return to a kept version", version)
        rec = self._save(UpdateRecord(id=cmd.nonce, state="fetching", step="manifest", from_version=running,
                                      from_sha=cur.name, to_version=version, source=str(source),
                                      started=time.time(), updated=time.time()))
        self._spawn(rec)
        return {"ok": True, "state": rec.state, "from": running, "to": version}

    def _rollback_cmd(self, cmd: Command) -> tuple[UpdateRecord | None, Path | None, dict[str, Any]]:
        """The rollback's first record (saved) and target, or a refusal; the flip is the caller's."""
        want = cmd.args.get("version")
        cur, prev = self.store.current(), self.store.previous()
        if want:
            kept = self.store.find_version(str(want))
            target = kept.path if kept else None
        else:
            target = prev
        if target is None or target == cur:
            kept_v = ", ".join(k.version for k in self.store.kept()) or "none"
            return None, None, self._refuse(cmd, f"no kept version {want or '(previous)'} to roll back to "
                                            f"(kept: {kept_v})", str(want) if want else None)
        to_version = self.store.manifest_of(target).bundle_version
        reason = f"rollback requested (key {cmd.key_id})"
        if self._rec is not None and self._rec.state == "probation":
            rec = self._rec.to("rolling_back", "rolling back", reason=reason, id=cmd.nonce)  # now this command's
        else:
            rec = UpdateRecord(id=cmd.nonce, state="rolling_back", step="rolling back",
                               from_version=self._current_version(), from_sha=cur.name if cur else None,
                               to_version=to_version, to_sha=target.name, reason=reason, started=time.time(),
                               updated=time.time())
        return self._save(rec), target, {"ok": True, "state": "rolled_back", "to": to_version}

    def models(self) -> dict[str, Any]:
        kept = [{"version": k.version, "sha": k.sha256[:12], "current": k.current, "previous": k.previous}
                for k in self.store.kept()]
        rec = self._rec
        return {"current": self._current_version(), "kept": kept,
                "update": None if rec is None else {"state": rec.state, "to": rec.to_version, "reason": rec.reason}}

    # -- the update pipeline (worker thread) -------------------------------------------------
    def _spawn(self, rec: UpdateRecord) -> None:
        self._worker = threading.Thread(target=self._run, args=(rec,), name="model-update", daemon=True)
        self._worker.start()

    def wait(self, timeout: float | None = None) -> UpdateRecord | None:
        """Until the worker has finished its part (tests, shutdown)."""
        if self._worker is not None:
            self._worker.join(timeout)
        return self._rec

    def _run(self, rec: UpdateRecord) -> None:
        built = None
        try:
            bundle = self._fetch_and_verify(rec)
            rec = self._save(self._rec.to("building", "engines"))  # type: ignore[union-attr]
            try:
                built = self.host.build(bundle)
            except Exception as e:
                raise UpdateError(f"engine build failed: {type(e).__name__}: {e}") from None
            rec = self._save(rec.to("selftest", "samples"))
            problem = self.host.selftest(bundle, built)
            if problem:
                raise UpdateError(f"self-test failed: {problem}")
            self._switch(rec, bundle, built)
            built = None  # it serves now
        except FetchError as e:  # a broken link keeps what came: the next command resumes it
            self._fail(str(e), keep_downloads=e.retry)
        except (UpdateError, BundleError, StoreError, SignatureError, ValueError, OSError) as e:
            self._fail(str(e))
        except Exception as e:  # a bug must still end in a reported, consistent state
            log.exception("update failed")
            self._fail(f"{type(e).__name__}: {e}")
        finally:
            if built is not None:
                self.host.discard(built)

    def _fail(self, reason: str, keep_downloads: bool = False) -> None:
        assert self._rec is not None
        self._save(self._rec.to("failed", self._rec.state, reason=reason))
        if not keep_downloads:
            self._clear_downloads()

    def _clear_downloads(self) -> None:
        shutil.rmtree(self.downloads, ignore_errors=True)

    def _fetch_and_verify(self, rec: UpdateRecord) -> Bundle:
        assert rec.source and rec.to_version
        if rec.source.split("?")[0].endswith(ARCHIVE_SUFFIXES):
            folder = self._fetch_archive(rec)
        else:
            folder = self._fetch_files(rec)
        rec = self._save(self._rec.to("verifying", "bundle"))  # type: ignore[union-attr]
        assert rec.source is not None
        bundle = verify_dir(folder, source=Path(rec.source), public_keys=self.keys, require_signature=True)
        if bundle.version != rec.to_version:
            raise UpdateError(f"the bundle at {rec.source} is version {bundle.version}, not {rec.to_version}")
        self._save(rec.to("verifying", "bundle", to_sha=bundle.manifest_sha256))
        return bundle

    def _fetch_files(self, rec: UpdateRecord) -> Path:
        assert rec.source and rec.to_version
        timeout = self.cfg.timeout_s
        url = join_url(rec.source, *manifest_path(rec.to_version))
        data = read_small(url, max_bytes=MANIFEST_CAP, timeout_s=timeout)
        try:
            sig = read_small(url[: -len(".json")] + ".sig", max_bytes=1024, timeout_s=timeout)
        except FetchError as e:
            raise UpdateError(f"unsigned bundle refused: no signature for {rec.to_version} ({e})") from None
        try:
            key = verify(data, sig, self.keys)
        except SignatureError as e:
            raise UpdateError(f"{url}: {e}") from None
        try:
            manifest = Manifest.from_bytes(data, source=url)
        except ValidationError as e:
            raise UpdateError(f"{url}: not a valid manifest ({one_line(e)})") from None
        if manifest.bundle_version != rec.to_version:
            raise UpdateError(f"{url}: the manifest says version {manifest.bundle_version}, not {rec.to_version}")
        missing = self.store.missing(manifest)
        log.info("update %s: manifest signed by key %s; %d file(s) to fetch", rec.to_version, key, len(missing))
        fetched = rec.bytes
        for i, (rel, sha) in enumerate(missing, 1):
            rec = self._save(self._rec.to("fetching", f"file {i}/{len(missing)} {rel}",  # type: ignore[union-attr]
                                          bytes=fetched))
            budget = self.cfg.max_bytes - fetched
            dest = self.downloads / sha
            got = fetch_with_retries(join_url(rec.source or "", *file_path(sha)), dest, max_bytes=max(budget, 0),
                                     timeout_s=timeout, sha256=sha, attempts=self.cfg.attempts)
            fetched += got.bytes
            self.store.add_file(got.path, sha, rel)
        self._save(self._rec.to("fetching", "done", bytes=fetched))  # type: ignore[union-attr]
        return self.store.assemble(data, sig)

    def _fetch_archive(self, rec: UpdateRecord) -> Path:
        assert rec.source
        dest = self.downloads / "bundle.tar"
        got = fetch_with_retries(rec.source, dest, max_bytes=self.cfg.max_bytes, timeout_s=self.cfg.timeout_s,
                                 attempts=self.cfg.attempts)
        self._save(self._rec.to("fetching", "unpacking", bytes=rec.bytes + got.bytes))  # type: ignore[union-attr]
        folder = unpack_archive(dest, self.downloads / "unpacked")  # refuses links, '..', devices; capped
        verify_dir(folder, source=Path(rec.source), public_keys=self.keys, require_signature=True)
        return self.store.import_bundle(folder)

    def _switch(self, rec: UpdateRecord, bundle: Bundle, built: Any) -> None:
        base = self.host.baseline()
        rec = self._save(rec.to("switching", "symlink", baseline=asdict(base)))
        old = self.store.current()
        self.store.switch(bundle.root)
        try:
            self._old = self.host.swap(bundle, built)
        except Exception as e:
            if old is not None:
                self.store.activate(old)  # the old model never stopped serving; disk says so again
            raise UpdateError(f"switch failed: {type(e).__name__}: {e}") from None
        self._observed_at = time.monotonic()  # this probation's run time starts now
        self._save(rec.to("probation", "on probation", probation={"since": time.time(), "elapsed_s": 0.0},
                            clean_stop=False))
        self._clear_downloads()

    # -- probation (the daemon's processing loop) ---------------------------------------------
    @property
    def on_probation(self) -> bool:
        return self._rec is not None and self._rec.state == "probation"

    def observe(self, *, frames: int = 0, errors: int = 0, empty: int = 0, ms_total: float = 0.0) -> None:
        """Count what the new model did; commit or roll back when the rules say so."""
        with self._lock:
            rec = self._rec
            if rec is None or rec.state != "probation":
                return
            p = dict(rec.probation)
            for k, v in (("frames", frames), ("errors", errors), ("empty", empty), ("ms_total", ms_total)):
                p[k] = p.get(k, 0) + v
            p.setdefault("since", time.time())  # for people reading state.json; never measured against
            # Time on probation is time run, summed from the monotonic clock (kept across restarts in
            # elapsed_s): a wall clock that jumps (NTP's first answer on a box without an RTC, a zone
            # fixed by hand) must neither commit a model early nor hold it on probation for ever.
            now = time.monotonic()
            if "elapsed_s" not in p:  # a probation begun by an earlier release: its age once, then run time
                p["elapsed_s"] = max(0.0, time.time() - float(p["since"]))
            elif self._observed_at is not None:
                p["elapsed_s"] = float(p["elapsed_s"]) + max(0.0, now - self._observed_at)
            self._observed_at = now
            rec = rec.to("probation", rec.step, probation=p)
            self._rec = rec
            counters = Counters(frames=int(p.get("frames", 0)), errors=int(p.get("errors", 0)),
                                empty=int(p.get("empty", 0)), ms_total=float(p.get("ms_total", 0.0)),
                                crashes=int(p.get("crashes", 0)), elapsed_s=float(p["elapsed_s"]))
            b = rec.baseline
            base = Baseline(frames=int(b.get("frames") or 0), empty_rate=b.get("empty_rate"), mean_ms=b.get("mean_ms"))
            verdict = judge(counters, self.cfg.probation, base)
            if verdict.action == "continue":
                if time.monotonic() - self._last_save >= SAVE_EVERY_S:
                    self._save(rec)
                return
            # the verdict's state is saved under the lock: a rollback command now finds it taken
            if verdict.action == "commit":
                rec = self._save(rec.to("committed", "pruning", reason=verdict.reason))
            else:
                rec = self._save(rec.to("rolling_back", "rolling back", reason=verdict.reason))
        if verdict.action == "commit":
            self._prune_after_commit()
        else:
            self._flip_back(rec, reason=verdict.reason)

    def _prune_after_commit(self) -> None:
        old, self._old = self._old, None
        if old is not None:
            self.host.discard(old[1])
        removed = self.store.prune(self.engines_dir)
        if removed:
            log.info("pruned %d old file(s)/bundle(s): %s", len(removed), ", ".join(removed[:8]))

    def _flip_back(self, rec: UpdateRecord, *, reason: str, target: Path | None = None, serve: bool = True) -> None:
        """current := the previous (or a named kept) bundle; the host serves it again (``serve``;
        at start-up the daemon simply loads ``current`` afterwards)."""
        target = target or self.store.previous()
        if target is None:
            self._save(rec.to("failed", "rolling back", reason=f"{reason}; and no previous version is kept"))
            return
        self.store.activate(target)
        if not serve:
            self._save(rec.to("rolled_back", "done", reason=reason))
            return
        old = self._old if self._old is not None and self._old[0].root.resolve() == target.resolve() else None
        self._old = None
        bundle = old[0] if old else verify_dir(target, public_keys=self.keys, require_signature=bool(self.keys))
        try:
            failed = self.host.swap(bundle, old[1] if old else None)
            if failed is not None:
                self.host.discard(failed[1])
        except Exception as e:
            log.exception("swap back failed")
            reason = f"{reason}; the old model is restored on disk and loads at the next start ({e})"
        self._save(rec.to("rolled_back", "done", reason=reason))


__all__ = ["COMMANDS", "Host", "UpdateError", "Updater", "file_path", "manifest_path",
           "valid_version", "version_key"]
