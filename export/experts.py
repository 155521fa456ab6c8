"""`camtrap-export experts`: one expert detector per look-alike group, on the global backbone.

Each expert starts from the global model's best.pt with the same frozen layers and trains on a
derived dataset (DIR/<group>/data): its group's species, class indices remapped to 0..m-1 in
the group's order, plus empty frames (all, or at most ``empty_ratio`` x the group's animal
images per split). ``negatives`` adds the other groups' animal images as unlabelled background
(their boxes dropped), which teaches the expert to stay quiet on them - the paper's experts did
not see them; whether it helps is worth measuring. An image holding animals of this group and of
another keeps only this group's boxes either way.

Frozen layers: the global run's ``freeze`` (from run.json or best.pt's train_args); a global
model trained whole (freeze 0, e.g. from a yaml) still gets layers 0-9 frozen in its experts, so
that their backbone is the global one.

The head: the expert's Detect layer has m class outputs; ultralytics rebuilds the class branch
for the new nc and copies the global rows of matching class names (cls_remap), so only the head
differs. After training every frozen tensor (parameters and BatchNorm buffers) of the expert's
best.pt is compared with the global best.pt as saved (float16), bit for bit; the shared-backbone
runtime depends on that. The verdict and a ``backbone_sha256`` of both go to DIR/<group>/expert.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from export.grouping import read_groups
from export.train import (
    DEFAULT_FREEZE_CHECKPOINT,
    DataSpec,
    list_images,
    read_data_yaml,
    read_label_lines,
    train,
)

INHERITED = ("epochs", "imgsz")  # from the global run unless given

# ---------------------------------------------------------------- derived dataset

def _link(src: Path, dst: Path) -> None:
    try:
        os.symlink(src.resolve(), dst)
    except OSError:  # no symlinks (some Windows setups): copy
        shutil.copy2(src, dst)


def build_expert_dataset(spec: DataSpec, species: list[str], out: Path, *, negatives: bool = False,
                         empty_ratio: float | None = None, seed: int = 0) -> dict[str, Any]:
    """Write out/data.yaml, out/images/<split> (links) and out/labels/<split> (remapped); return counts."""
    remap = {spec.names.index(s): i for i, s in enumerate(species)}
    if out.exists():
        shutil.rmtree(out)
    counts: dict[str, Any] = {}
    splits = {}
    for split, sources in spec.splits.items():
        own: list[tuple[Path, list[str]]] = []
        empty: list[tuple[Path, list[str]]] = []
        other: list[tuple[Path, list[str]]] = []
        for img in list_images(sources):
            rows = read_label_lines(img, spec.nc)
            mine = [f"{remap[c]} {rest}" for c, rest in rows if c in remap]
            if mine:
                own.append((img, mine))
            elif not rows:
                empty.append((img, []))
            else:
                other.append((img, []))
        n_empty_all = len(empty)
        if empty_ratio is not None and len(empty) > empty_ratio * len(own):
            keep = int(empty_ratio * len(own))
            empty = sorted(random.Random(f"{seed}:{split}").sample(empty, keep), key=lambda x: str(x[0]))
        chosen = own + empty + (other if negatives else [])
        (out / "images" / split).mkdir(parents=True)
        (out / "labels" / split).mkdir(parents=True)
        used: set[str] = set()
        for img, lines in chosen:
            name, k = img.name, 0
            while name in used:
                k += 1
                name = f"{img.stem}__{k}{img.suffix}"
            used.add(name)
            _link(img, out / "images" / split / name)
            (out / "labels" / split / f"{Path(name).stem}.txt").write_text("".join(x + "\n" for x in lines))
        if not chosen:
            if split == "val":
                raise ValueError(f"{spec.yaml_path}: no validation images for group {', '.join(species)}")
            shutil.rmtree(out / "images" / split)
            shutil.rmtree(out / "labels" / split)
            continue
        counts[split] = {"group_images": len(own), "empty_images": len(empty), "empty_available": n_empty_all,
                         "negative_images": len(other) if negatives else 0,
                         "boxes": sum(len(lines) for _, lines in own)}
        splits[split] = f"images/{split}"
    if counts.get("train", {}).get("group_images", 0) == 0:
        raise ValueError(f"{spec.yaml_path}: no training images of {', '.join(species)}")
    d = {"path": str(out.resolve()), **splits, "names": dict(enumerate(species))}
    (out / "data.yaml").write_text(yaml.safe_dump(d, sort_keys=False, allow_unicode=True))
    return counts


# ---------------------------------------------------------------- frozen-tensor check

def load_state_dict(pt: Path) -> dict[str, Any]:
    """The saved model's state_dict as stored (EMA weights, float16), on the CPU."""
    import torch

    from export.yolo_env import ultralytics

    ultralytics()  # the pickle references ultralytics classes
    ckpt = torch.load(pt, map_location="cpu", weights_only=False)
    model = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, dict) else ckpt
    if model is None:
        raise ValueError(f"{pt}: no model in this checkpoint")
    return model.state_dict()


def frozen_keys(sd: dict[str, Any], freeze: int) -> list[str]:
    """State-dict keys of layers 0..freeze-1, in state_dict order (stable for one architecture)."""
    prefixes = tuple(f"model.{i}." for i in range(freeze))
    return [k for k in sd if k.startswith(prefixes)]


def backbone_sha256(sd: dict[str, Any], keys: list[str]) -> str:
    """sha256 over name, dtype, shape and raw bytes of each frozen tensor, in `keys` order."""
    import torch

    h = hashlib.sha256()
    for k in keys:
        t = sd[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def compare_frozen(global_pt: Path, expert_pt: Path, freeze: int) -> dict[str, Any]:
    """Bit-identity of every frozen tensor (parameters and BN buffers), compared as saved."""
    import torch

    g, e = load_state_dict(global_pt), load_state_dict(expert_pt)
    keys = frozen_keys(g, freeze)
    missing = [k for k in keys if k not in e]
    differ = []
    for k in keys:
        if k in e and not (e[k].shape == g[k].shape and torch.equal(e[k].to(g[k].dtype), g[k])):
            differ.append(k)
    dtypes = sorted({str(g[k].dtype) for k in keys})
    return {
        "freeze": freeze, "tensors": len(keys),
        "identical": (not missing and not differ) if keys else None,
        "differ": differ, "missing": missing, "dtypes": dtypes,
        "global_backbone_sha256": backbone_sha256(g, keys),
        "expert_backbone_sha256": backbone_sha256(e, [k for k in keys if k in e]),
    }


def verdict(group: str, rep: dict[str, Any]) -> str:
    if rep["identical"] is None:
        return f"expert {group}: no frozen layers (freeze 0); its backbone is not shared with the global model"
    if rep["identical"]:
        return (f"expert {group}: OK, layers 0-{rep['freeze'] - 1} ({rep['tensors']} tensors) bit-identical to the "
                f"global model (backbone sha256 {rep['global_backbone_sha256'][:12]})")
    bad = rep["differ"] + rep["missing"]
    return (f"expert {group}: NOT SHARED, {len(bad)} of {rep['tensors']} frozen tensors differ from the global "
            f"model (first: {bad[0]})")


# ---------------------------------------------------------------- the command

def global_run(path: str | os.PathLike) -> tuple[Path, int | None, dict[str, Any] | None]:
    """RUN folder (or a .pt) -> (best.pt, frozen layer count from run.json / train_args, run.json)."""
    p = Path(path)
    if p.is_file() and p.suffix == ".pt":
        best, rj = p, p.parent.parent / "run.json"
    else:
        best, rj = p / "weights" / "best.pt", p / "run.json"
    if not best.is_file():
        raise FileNotFoundError(f"{best}: global model weights not found (train it with `camtrap-export train`)")
    run = json.loads(rj.read_text()) if rj.is_file() else None
    freeze = run.get("freeze") if run else None
    if freeze is None:
        import torch

        from export.yolo_env import ultralytics

        ultralytics()
        ta = torch.load(best, map_location="cpu", weights_only=False).get("train_args") or {}
        freeze = ta.get("freeze") if isinstance(ta.get("freeze"), int) else None
    return best, freeze, run


def shared_freeze(global_freeze: int | None) -> int:
    """Layers an expert (or the fair control) keeps frozen: what the global froze; a global trained
    whole (freeze 0, e.g. from a yaml) still gets layers 0-9 shared."""
    return global_freeze if global_freeze else DEFAULT_FREEZE_CHECKPOINT


def train_experts(data: str | os.PathLike, groups: str | os.PathLike, from_run: str | os.PathLike,
                  out: str | os.PathLike, *, negatives: bool = False, empty_ratio: float | None = None,
                  freeze: int | None = None, only: list[str] | None = None, say: Callable[[str], None] = print,
                  **train_kwargs: Any) -> dict[str, Any]:
    """Train every group's expert into out/<group>; write out/experts.json; return its content.

    train_kwargs go to export.train.train (epochs, imgsz, batch, class_weights, oversample, ...);
    epochs and imgsz left out (or None) are the global run's: the experts share its frozen backbone.
    """
    spec = read_data_yaml(data)
    grp = read_groups(Path(groups), spec.names)
    best, g_freeze, g_run = global_run(from_run)
    for k in INHERITED:
        if train_kwargs.get(k) is None:
            v = ((g_run or {}).get("args") or {}).get(k)
            if v is None:
                raise ValueError(f"{from_run}: no run.json giving the global run's {k}; give --{k}")
            train_kwargs[k] = v
    if freeze is None:
        freeze = shared_freeze(g_freeze)
    ungrouped = [n for n in spec.names if not any(n in s for s in grp.values())]
    if ungrouped:
        say(f"[experts] warning: species in no group (the global model alone will name them): {', '.join(ungrouped)}")
    if only:
        unknown = [g for g in only if g not in grp]
        if unknown:
            raise ValueError(f"{groups}: no group named {', '.join(unknown)}")
    root = Path(out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"global": {"best": str(best.resolve()), "freeze": freeze, "names": spec.names},
                               "groups": grp, "experts": {}}
    for g, species in grp.items():
        if only and g not in only:
            continue
        gdir = root / g
        counts = build_expert_dataset(spec, species, gdir / "data", negatives=negatives, empty_ratio=empty_ratio,
                                      seed=int(train_kwargs.get("seed", 0)))
        say(f"[expert {g}] {', '.join(species)}: " + ", ".join(
            f"{s} {c['group_images']}+{c['empty_images']} empty" + (f"+{c['negative_images']} neg" if negatives else "")
            for s, c in counts.items()))
        run = train(gdir / "data" / "data.yaml", best, gdir / "run", freeze=freeze, prefix=f"[expert {g}]",
                    say=say, **train_kwargs)
        rep = compare_frozen(best, gdir / "run" / "weights" / "best.pt", freeze)
        say(verdict(g, rep))
        record = {
            "group": g, "species": species, "names": dict(enumerate(species)),
            "global_classes": [spec.names.index(s) for s in species],
            "negatives": negatives, "empty_ratio": empty_ratio, "dataset": counts,
            "best": run["weights"]["best"], "metrics": run["metrics"], "frozen": rep,
            "backbone_sha256": rep["expert_backbone_sha256"],
        }
        (gdir / "expert.json").write_text(json.dumps(record, indent=2))
        summary["experts"][g] = {"species": species, "best": record["best"], "identical": rep["identical"],
                                 "backbone_sha256": rep["expert_backbone_sha256"],
                                 "mAP50": run["metrics"]["mAP50"]}
    summary["global"]["backbone_sha256"] = next(
        (json.loads((root / g / "expert.json").read_text())["frozen"]["global_backbone_sha256"]
         for g in summary["experts"]), None)
    (root / "experts.json").write_text(json.dumps(summary, indent=2))
    return summary


def _run(args) -> int:
    s = train_experts(args.data, args.groups, getattr(args, "from"), args.out, negatives=args.negatives,
                      empty_ratio=args.empty_ratio, freeze=args.freeze, only=args.only or None,
                      epochs=args.epochs, imgsz=args.imgsz, batch=args.batch, class_weights=args.class_weights,
                      oversample=args.oversample, target_share=args.target_share, max_repeat=args.max_repeat,
                      seed=args.seed, device=args.device, patience=args.patience, plots=args.plots,
                      optimizer=args.optimizer, lr0=args.lr0, close_mosaic=args.close_mosaic)
    return 1 if any(e["identical"] is False for e in s["experts"].values()) else 0


def add_cli(sub) -> None:
    from export.train import add_train_options

    p = sub.add_parser("experts", help="train one expert per group on the global model's frozen backbone",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="the global model's YOLO data.yaml")
    p.add_argument("--groups", required=True, help="groups.yaml: 'groups: {name: [species, ...]}'")
    p.add_argument("--from", required=True, metavar="RUN", help="global run folder (weights/best.pt, run.json)")
    p.add_argument("--out", required=True, help="experts folder: <group>/run/weights/best.pt, <group>/expert.json")
    p.add_argument("--negatives", action="store_true",
                   help="keep other groups' animal images as unlabelled background")
    p.add_argument("--empty-ratio", type=float, default=None,
                   help="at most this many empty frames per group image (default: all empty frames)")
    p.add_argument("--freeze", type=int, default=None,
                   help="frozen layers 0..N-1 (default: the global run's freeze, or 10 if it froze none)")
    p.add_argument("--only", nargs="*", metavar="GROUP", help="train only these groups")
    add_train_options(p, inherit=True)
    p.set_defaults(func=_run)
