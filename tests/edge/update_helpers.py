"""Test helpers for remote updates: bundle variants signed with a test key, a real http server on
loopback (the product's own Range-capable handler) that counts bytes and can cut a transfer,
and a host that builds real ONNX Runtime engines and runs the real self-test."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from make_onnx import _bytes

from edge.manifest import Manifest
from edge.signing import sign
from export.release import RangeRequestHandler

DEMO = Path(__file__).parents[2] / "edge" / "demo" / "bundle"


def demo_file(model: str) -> str:
    """Where the demo bundle keeps ``model``'s graph (a head under models/heads/ in a shared-backbone bundle)."""
    return next(m["file"] for m in json.loads((DEMO / "manifest.json").read_text())["models"] if m["name"] == model)


def wrong_answers(model: str) -> bytes:
    """A graph that loads where the demo's ``model`` does (same inputs: a head over the shared
    backbone) but answers differently: another expert's graph, with its own bytes. Its self-test fails."""
    other = next(m["name"] for m in json.loads((DEMO / "manifest.json").read_text())["models"]
                 if m["role"] == "expert" and m["name"] != model)
    return relabel_onnx((DEMO / demo_file(other)).read_bytes(), f"not {model}")


def relabel_onnx(data: bytes, note: str) -> bytes:
    """Same graph, new bytes: a later ``doc_string`` (ModelProto field 6) overrides nothing that
    runs, so outputs are unchanged but the sha256 differs (a retrained-but-equal expert)."""
    return data + _bytes(6, note)


def variant(src: Path, out: Path, *, version: str, key: bytes | None, replace: dict[str, bytes] | None = None,
            expected_from_engine: bool = False) -> Path:
    """Copy bundle ``src`` to ``out`` with some models' bytes replaced, hashes updated, samples
    hashed, a new version, and (with ``key``) a fresh signature. ``expected_from_engine``:
    recompute the replaced models' expected sample outputs (so their self-test passes)."""
    shutil.copytree(src, out)
    (out / "manifest.sig").unlink(missing_ok=True)
    raw = json.loads((out / "manifest.json").read_text())
    raw["bundle_version"] = version
    for m in raw["models"]:
        if replace and m["name"] in replace:
            (out / m["file"]).chmod(0o644)
            (out / m["file"]).write_bytes(replace[m["name"]])
            m["sha256"] = hashlib.sha256(replace[m["name"]]).hexdigest()
    for s in raw["samples"]:
        s["sha256"] = hashlib.sha256((out / s["file"]).read_bytes()).hexdigest()
    manifest = Manifest.model_validate(raw)
    if expected_from_engine and replace:
        manifest = _recompute(out, manifest, set(replace))
    data = manifest.to_bytes()
    (out / "manifest.json").write_bytes(data)
    if key is not None:
        (out / "manifest.sig").write_bytes(sign(data, key))
    return out


def _recompute(root: Path, manifest: Manifest, names: set[str]) -> Manifest:
    import cv2

    from edge.engines import create_engine, detect_batch
    from edge.vision import letterbox_batch

    raw = manifest.model_dump(mode="json")
    imgs = [cv2.imread(str(root / s["file"])) for s in raw["samples"]]
    for e in manifest.models:
        if e.name in names:
            with create_engine("onnxruntime", root / e.file, e) as eng:
                x, lbs = letterbox_batch(imgs, e.imgsz)
                for s, dets in zip(raw["samples"], detect_batch(eng.infer(x), e, lbs), strict=True):
                    s["expected"][e.name] = [d.to_dict() for d in dets]
    return Manifest.model_validate(raw)


class Server:
    """A real http server on 127.0.0.1 serving ``folder``; ``served`` counts body bytes sent and
    ``cut`` (path suffix -> bytes) breaks the next transfer of that file after so many bytes."""

    def __init__(self, folder: Path) -> None:
        from http.server import ThreadingHTTPServer

        self.folder = folder
        self.served = 0
        self.requests: list[tuple[str, str | None]] = []
        self.cut: dict[str, int] = {}
        self.delay_s = 0.0  # per 64 KiB block: a slow link, so a test can act mid-transfer
        outer = self

        class Handler(RangeRequestHandler):
            def __init__(self, *a: Any, **k: Any) -> None:
                super().__init__(*a, directory=str(folder), **k)

            def copyfile(self, source: Any, outputfile: Any) -> None:
                outer.requests.append((self.path, self.headers.get("Range")))
                limit = next((n for suffix, n in outer.cut.items() if self.path.endswith(suffix)), None)
                counting = _Counting(outputfile, outer, limit)
                try:
                    super().copyfile(source, counting)
                except _Cut:
                    outer.cut = {k: v for k, v in outer.cut.items() if not self.path.endswith(k)}
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Server:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Cut(Exception):
    pass


class _Counting:
    def __init__(self, out: Any, server: Server, limit: int | None) -> None:
        self.out, self.server, self.limit, self.sent = out, server, limit, 0

    def write(self, block: bytes) -> int:
        if self.limit is not None and self.sent + len(block) > self.limit:
            block = block[: self.limit - self.sent]
            self.out.write(block)
            self.server.served += len(block)
            self.out.flush()
            raise _Cut()
        self.sent += len(block)
        self.server.served += len(block)
        if self.server.delay_s:
            time.sleep(self.server.delay_s)
        return self.out.write(block)

    def flush(self) -> None:
        self.out.flush()


class EngineHost:
    """The updater's host with real engines: ONNX Runtime builds, the real self-test, a swap that
    records what serves. ``fail_build``/``before_swap`` inject faults where a test needs them."""

    def __init__(self, serving: Any = None) -> None:
        self.records: list[Any] = []
        self.serving = serving  # (bundle, engines)
        self.swaps: list[str] = []
        self.fail_build: str | None = None
        self.before_swap: Callable[[], None] | None = None
        self.closed: list[Any] = []
        self.old_model = None  # the Baseline the updater is told about (None: the old model saw nothing yet)

    def build(self, bundle: Any) -> Any:
        from edge.engines import load_engines

        if self.fail_build:
            raise RuntimeError(self.fail_build)
        return load_engines(bundle, "onnxruntime")

    def selftest(self, bundle: Any, built: Any) -> str | None:
        from edge.selftest import selftest

        report = selftest(bundle, engines=built, runs=1)
        problems = [f"{m.name}: {p}" for m in report.models for p in m.problems]
        return "; ".join(problems[:3]) if problems else None

    def swap(self, bundle: Any, built: Any) -> Any:
        if self.before_swap:
            self.before_swap()
        if built is None:
            built = self.build(bundle)
        old, self.serving = self.serving, (bundle, built)
        self.swaps.append(bundle.version)
        return old

    def discard(self, built: Any) -> None:
        self.closed.append(built)
        for e in built.values():
            e.close()

    def baseline(self) -> Any:
        from edge.updates_probation import Baseline

        return self.old_model or Baseline()

    def publish(self, rec: Any) -> None:
        self.records.append(rec)

    def states(self) -> list[str]:
        return [r.state for r in self.records]
