"""P5: the daemon's peak memory, how it grows with the number of experts and with the results held,
whole models against a shared backbone, side by side in one run.

Each configuration runs the real daemon (ONNX Runtime CPU, no broker, disposal ``keep``) in a
fresh process of its own, because peak RSS (``VmHWM``) is a high-water mark per process:

- experts: bundles with 1..6 experts, as whole models and with the shared backbone. They are the
  demo bundle's models: its global model, and experts that are copies of the demo's (each copy
  a file of its own, so each is loaded as the device would load a distinct expert), each on a
  group of the demo's species (the demo's 3 groups, split for more than 3). Signed with a key
  made here. A short burst (``--frames``) goes through each, so the engines' working memory is
  in the peak; answers are not the point (copies answer alike);
- results held: the demo bundle (shared backbone, 3 experts) over bursts that bring the frames
  the ledger holds to each of ``--held`` in turn, in one daemon; the current RSS (``VmRSS``) and
  the peak after each.

Printed: per configuration the RSS once the daemon's modules are imported (before anything is
loaded), after the bundle loaded, and the peak after the burst; per expert added, the slope; whole minus shared.
The machine load is printed beside. Not a test: record the results in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the demo's groups split further for more than 3 experts: (source expert, species of the new group)
SPLITS = {
    1: [("group1", ["fallow_deer", "mouflon", "red_deer"])],
    2: [("group1", ["fallow_deer", "mouflon", "red_deer"]), ("group2", ["feral_cat", "lynx", "wildcat"])],
    3: [("group1", ["fallow_deer", "mouflon", "red_deer"]), ("group2", ["feral_cat", "lynx", "wildcat"]),
        ("group3", ["hare", "rabbit", "wood_mouse"])],
}
SPLITS[4] = [("group1", ["fallow_deer", "mouflon"]), ("group1", ["red_deer"]), *SPLITS[3][1:]]
SPLITS[5] = [*SPLITS[4][:2], ("group2", ["feral_cat", "lynx"]), ("group2", ["wildcat"]), SPLITS[3][2]]
SPLITS[6] = [*SPLITS[5][:4], ("group3", ["hare", "rabbit"]), ("group3", ["wood_mouse"])]


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def rss_now_mb() -> float:
    """Resident memory now (Linux /proc), not the peak."""
    return _status_mb("VmRSS")


def rss_peak_mb() -> float:
    """Peak resident memory of this process. VmHWM, not ``ru_maxrss``: Linux keeps ``ru_maxrss``
    across fork + exec, so a child would start at its parent's peak (this driver's, with onnx loaded)."""
    return _status_mb("VmHWM")


def _with_doc(data: bytes, note: str) -> bytes:
    """The same ONNX graph with other bytes: a later ModelProto.doc_string (field 6) runs nothing."""
    raw = note.encode()
    n, varint = len(raw), b""
    while True:
        byte, n = n & 0x7F, n >> 7
        varint += bytes([byte | (0x80 if n else 0)])
        if not n:
            break
    return data + b"\x32" + varint + raw


def make_bundle(src: Path, out: Path, n_experts: int, key: bytes) -> Path:
    """``src`` (the demo bundle, whole or shared) with ``n_experts`` experts (see SPLITS), signed with ``key``."""
    import hashlib

    from edge.manifest import Manifest
    from edge.signing import sign

    raw = json.loads((src / "manifest.json").read_text())
    by_name = {m["name"]: m for m in raw["models"]}
    glob = next(m for m in raw["models"] if m["role"] == "global")
    out.mkdir(parents=True)
    shutil.copytree(src / "samples", out / "samples")
    files = [glob["file"]] + ([raw["backbone"]["file"]] if raw.get("backbone") else [])
    for rel in files:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, out / rel)
    models, groups = [glob], {}
    for k, (source, species) in enumerate(SPLITS[n_experts]):
        name = f"x{k + 1}"
        m = dict(by_name[source], name=name, group=name)
        rel = str(Path(m["file"]).with_name(f"{name}.onnx"))
        data = _with_doc((src / m["file"]).read_bytes(), f"p5 copy {name}")
        (out / rel).write_bytes(data)
        m.update(file=rel, sha256=hashlib.sha256(data).hexdigest())
        models.append(m)
        groups[name] = species
        for s in raw["samples"]:
            s["expected"][name] = s["expected"][source]
    for s in raw["samples"]:
        s["expected"] = {k: v for k, v in s["expected"].items() if k in {m["name"] for m in models}}
    raw.update(models=models, groups=groups)
    data = Manifest.model_validate(raw).to_bytes()
    (out / "manifest.json").write_bytes(data)
    (out / "manifest.sig").write_bytes(sign(data, key))
    return out


# --- one configuration, in its own process ---------------------------------------------------


def child(bundle: Path, keys: Path, bursts: list[int], batch: int) -> dict:
    """Run the daemon on ``bundle``; after each burst (frames so far = each of ``bursts``) record RSS."""
    import sqlite3

    import yaml

    from edge.config import load_config
    from edge.daemon import Daemon
    from edge.demo import DEMO_FRAMES

    base_now, base_peak = rss_now_mb(), rss_peak_mb()
    work = Path(tempfile.mkdtemp(prefix="p5-"))
    watch, state = work / "watch", work / "state"
    watch.mkdir()
    state.mkdir()
    cfg = {"device": {"id": "p5"}, "watch": {"folders": [str(watch)], "settle_s": 0.3},
           "bundle": {"path": str(bundle), "public_keys_dir": str(keys), "require_signature": True},
           "engine": {"type": "onnxruntime", "max_batch": batch},
           "events": {"gap_s": 3.0, "clock": "mtime"}, "disposal": {"policy": "keep", "audit_rate": 0.0},
           "paths": {"state_dir": str(state)}}
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    src = sorted(DEMO_FRAMES.glob("*.JPG"))
    out: dict = {"base": [base_now, base_peak], "after": []}
    daemon = Daemon(load_config(work / "config.yaml"))
    try:
        daemon.start()
        out["loaded"] = [rss_now_mb(), rss_peak_mb()]
        threading.Thread(target=daemon.run, name="daemon", daemon=True).start()
        done = 0
        for k, total in enumerate(bursts):
            staging = work / f"staging{k}"
            staging.mkdir()
            for i in range(done, total):
                shutil.copyfile(src[i % len(src)], staging / f"{i:06d}.jpg")
            os.rename(staging, watch / f"card{k}")  # the burst arrives at once
            t0 = time.time()
            while True:
                db = sqlite3.connect(daemon.ledger.path, timeout=10)
                try:
                    n = db.execute("SELECT count(*) FROM images WHERE state IN ('done', 'disposed', 'quarantined', "
                                   "'gone')").fetchone()[0]
                finally:
                    db.close()
                if n >= total:
                    break
                if time.time() - t0 > 1800:
                    raise RuntimeError(f"burst not finished after 30 min: {n} of {total} frames")
                time.sleep(0.05)
            done = total
            out["after"].append([total, rss_now_mb(), rss_peak_mb()])
    finally:
        daemon.stop()
        daemon.close()
        shutil.rmtree(work, ignore_errors=True)
    return out


def run_child(bundle: Path, keys: Path, bursts: list[int], batch: int) -> dict:
    cmd = [sys.executable, __file__, "--child", str(bundle), "--keys", str(keys), "--batch", str(batch),
           "--bursts", *map(str, bursts)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"{bundle.name}: the daemon run failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# --- the driver -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6], choices=sorted(SPLITS))
    ap.add_argument("--frames", type=int, default=40, help="burst through each expert-count bundle")
    ap.add_argument("--held", type=int, nargs="+", default=[250, 1000, 3000],
                    help="frames the ledger holds after each burst of the results-held run")
    ap.add_argument("--batch", type=int, default=4, help="engine.max_batch")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--keys", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--bursts", type=int, nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.keys, args.bursts, args.batch)))
        return 0

    from edge.demo import DEMO_BUNDLE
    from edge.signing import generate_keypair
    from export.backbone import join_backbone, share_backbone

    load0 = os.getloadavg()[0]
    t0 = time.time()
    work = Path(tempfile.mkdtemp(prefix="p5-bundles-"))
    try:
        priv, pub = generate_keypair()
        keys = work / "keys"
        keys.mkdir()
        (keys / "p5.pub").write_bytes(pub)
        forms = {}
        if json.loads((DEMO_BUNDLE / "manifest.json").read_text()).get("backbone"):
            join_backbone(DEMO_BUNDLE, work / "demo-whole")
            forms = {"whole": work / "demo-whole", "shared": DEMO_BUNDLE}
        else:
            share_backbone(DEMO_BUNDLE, work / "demo-shared")
            forms = {"whole": DEMO_BUNDLE, "shared": work / "demo-shared"}
        rows: dict[tuple[str, int], dict] = {}
        for k in args.experts:  # whole and shared alternate, so load drifts hit both alike
            for form, src in forms.items():
                b = make_bundle(src, work / f"{form}-{k}", k, priv)
                rows[(form, k)] = run_child(b, keys, [args.frames], args.batch)
        held = {form: run_child(make_bundle(src, work / f"{form}-held", 3, priv), keys, args.held, args.batch)
                for form, src in forms.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"P5: the daemon's RSS (MB), ONNX Runtime CPU, max_batch {args.batch}, a fresh process per row; "
          f"{os.cpu_count()} cores, load {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end; "
          f"{time.time() - t0:.0f} s; {sys.executable}")
    print()
    print(f"Peak RSS by number of experts ({args.frames}-frame burst each):")
    print()
    print("| experts | whole: imported / loaded / peak | shared: imported / loaded / peak | peak whole - shared |")
    print("|---:|---:|---:|---:|")
    for k in args.experts:
        w, s = rows[("whole", k)], rows[("shared", k)]
        print(f"| {k} | {w['base'][1]:.0f} / {w['loaded'][1]:.0f} / {w['after'][-1][2]:.0f} | "
              f"{s['base'][1]:.0f} / {s['loaded'][1]:.0f} / {s['after'][-1][2]:.0f} | "
              f"{w['after'][-1][2] - s['after'][-1][2]:+.0f} |")
    if len(args.experts) > 1:
        lo, hi = min(args.experts), max(args.experts)
        for form in forms:
            a, b = rows[(form, lo)], rows[(form, hi)]
            slope = (b["after"][-1][2] - a["after"][-1][2]) / (hi - lo)
            load = (b["loaded"][1] - b["base"][1] - (a["loaded"][1] - a["base"][1])) / (hi - lo)
            print(f"\n{form}: {slope:+.1f} MB peak per expert added ({lo} -> {hi}); bundle load {load:+.1f} MB "
                  "per expert", end="")
        print()
    print()
    print(f"Results held (demo bundle, 3 experts; bursts to {', '.join(map(str, args.held))} frames in one daemon):")
    print()
    print("| frames held | whole: RSS now / peak | shared: RSS now / peak |")
    print("|---:|---:|---:|")
    print(f"| 0 (loaded) | {held['whole']['loaded'][0]:.0f} / {held['whole']['loaded'][1]:.0f} | "
          f"{held['shared']['loaded'][0]:.0f} / {held['shared']['loaded'][1]:.0f} |")
    for (n, wn, wp), (_, sn, sp) in zip(held["whole"]["after"], held["shared"]["after"], strict=True):
        print(f"| {n} | {wn:.0f} / {wp:.0f} | {sn:.0f} / {sp:.0f} |")
    for form in forms:
        first, last = held[form]["after"][0], held[form]["after"][-1]
        if last[0] > first[0]:
            per_k = 1000 * (last[1] - first[1]) / (last[0] - first[0])
            print(f"\n{form}: {per_k:+.2f} MB of RSS per 1,000 more results held ({first[0]} -> {last[0]})", end="")
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
