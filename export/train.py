"""`camtrap-export train`: the global detector, trained with ultralytics, offline.

Start from an ultralytics checkpoint (.pt: MegaDetector v6, YOLOv5u/v8/v9/v10/11) or from a model
yaml (e.g. export/models/camtrap-tiny.yaml). From a checkpoint the first ``--freeze`` layers (10 by
default, the paper's 0-9; YOLO11 needs 11 for its whole backbone) keep their pretrained values,
BatchNorm statistics included, which is what lets the experts share the global model's backbone.

Imbalance, as the paper did, two switchable levers (both recorded in RUN/run.json):

* Oversampling (``--no-oversample`` to switch off): the training split is written as a list of
  image paths (RUN/train_list.txt) in which images of rare species repeat, so that every species
  appears in at least ``target_share`` x (image count of the most common species), at most
  ``max_repeat`` copies per image. An image repeats as often as its rarest species needs; empty
  frames never repeat. ultralytics' augmentation (mosaic, HSV, flips, scale) varies the copies.
* Class weights (``--no-class-weights``): the classification BCE of class c is multiplied by
  w_c = mean_count / count_c (inverse frequency of box instances in the training list as
  oversampled, so the weights correct only the imbalance oversampling left), clipped to
  [0.5, 10] (an average class is 1), then scaled to mean 1. Classes without training boxes
  count as average. ultralytics' own ``cls_pw`` is left at 0; our trainer sets the same
  ``model.class_weights`` hook that its v8DetectionLoss reads, with the clipping above.

MegaDetector v5 users: MDv5 (.pt) is a classic YOLOv5 pickle that needs the yolov5 repository's
classes to unpickle; ultralytics cannot load it and this tool does not try. Ways in: start from
MegaDetector v6 (ultralytics-native YOLOv9/v10 checkpoints; use ``--freeze`` to cover its
backbone), or from an ultralytics YOLOv5u / YOLOv8 / YOLO11 checkpoint you have locally, or train
a class-agnostic one-class 'animal' detector on MDv5's boxes first and start the species model
from that. Boxes made by MDv5 (its batch JSON) are fine as training labels: see `prepare`.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict, cast

import yaml

from edge.atomic import atomic_write_json
from edge.hashing import sha256_file
from export.datasets import DATASET_HASH_KEY, class_names, dataset_hash

log = logging.getLogger(__name__)

IMG_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".dng", ".mpo", ".pfm", ".heic"}
WEIGHT_CLIP = (0.5, 10.0)
DEFAULT_FREEZE_CHECKPOINT = 10
DEFAULT_EPOCHS, DEFAULT_IMGSZ = 50, 640
CLOSE_MOSAIC_SHARE = 0.1  # mosaic off for the last 10% of epochs (ultralytics' 10 of its default 100)
TINY_YAML = Path(__file__).with_name("models") / "camtrap-tiny.yaml"


# ---------------------------------------------------------------- dataset reading (pure + files)

@dataclass(frozen=True)
class DataSpec:
    """A YOLO data.yaml, its paths resolved (relative `path` = relative to the yaml's folder)."""

    yaml_path: Path
    root: Path
    names: list[str]
    splits: dict[str, list[Path]]  # split -> sources (image folders, .txt lists or image files)

    @property
    def nc(self) -> int:
        return len(self.names)


def read_data_yaml(path: str | os.PathLike) -> DataSpec:
    """Parse a YOLO data.yaml; one clear error for a missing file, key or split folder."""
    p = Path(path)
    if p.is_dir():
        p = p / "data.yaml"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: data.yaml not found (run `camtrap-export prepare` first)")
    try:
        d = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{p}: expected a mapping with train, val and names")
    if "names" not in d:
        raise ValueError(f"{p}: 'names' missing")
    names = class_names(d["names"], p)
    root = Path(d.get("path") or ".")
    root = (root if root.is_absolute() else p.parent / root).resolve()
    splits: dict[str, list[Path]] = {}
    for split in ("train", "val", "test"):
        v = d.get(split)
        if v is None:
            if split in ("train", "val"):
                raise ValueError(f"{p}: '{split}' missing")
            continue
        srcs = []
        for s in v if isinstance(v, list) else [v]:
            sp = Path(str(s))
            sp = sp if sp.is_absolute() else root / sp
            if not sp.exists():
                raise FileNotFoundError(f"{p}: {split} source {sp} does not exist")
            srcs.append(sp)
        splits[split] = srcs
    return DataSpec(yaml_path=p.resolve(), root=root, names=names, splits=splits)


def list_images(sources: Sequence[Path]) -> list[Path]:
    """Image files of a split, in ultralytics' order (sorted); a .txt lists one path a line."""
    out: list[str] = []
    for src in sources:
        if src.is_dir():
            out += [str(f) for f in src.rglob("*") if f.suffix.lower() in IMG_EXTS and f.is_file()]
        elif src.suffix.lower() == ".txt":
            for line in src.read_text(encoding="utf-8-sig").splitlines():
                line = line.strip()
                if not line:
                    continue
                if line.startswith("./"):
                    line = str(src.parent / line[2:])
                out.append(str(Path(line) if Path(line).is_absolute() else src.parent / line))
        elif src.suffix.lower() in IMG_EXTS:
            out.append(str(src))
    return [Path(x) for x in sorted(out)]


def label_path(img: Path) -> Path:
    """ultralytics' rule: the last /images/ becomes /labels/, the extension .txt."""
    s = str(img)
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return Path(sb.join(s.rsplit(sa, 1)).rsplit(".", 1)[0] + ".txt")


def read_label_lines(img: Path, nc: int) -> list[tuple[int, str]]:
    """(class, rest-of-line) per box of an image; no label file = empty frame."""
    lp = label_path(img)
    if not lp.is_file():
        return []
    rows = []
    for n, line in enumerate(lp.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            c = int(float(parts[0]))
        except ValueError:
            raise ValueError(f"{lp}:{n}: class '{parts[0]}' is not an integer") from None
        if not 0 <= c < nc:
            raise ValueError(f"{lp}:{n}: class {c} outside 0..{nc - 1} of data.yaml names")
        rows.append((c, " ".join(parts[1:])))
    return rows


def split_items(spec: DataSpec, split: str) -> list[tuple[Path, list[int]]]:
    """(image, classes of its boxes) for every image of a split."""
    return [(img, [c for c, _ in read_label_lines(img, spec.nc)])
            for img in list_images(spec.splits.get(split, []))]


# ---------------------------------------------------------------- imbalance (pure)

class ClassCounts(TypedDict):
    instances: list[int]  # boxes per class
    images: list[int]  # images per class
    empty_images: int


def class_counts(image_classes: Sequence[Sequence[int]], nc: int,
                 repeats: Sequence[int] | None = None) -> ClassCounts:
    """Box instances and images per class (and empty images), each image counted `repeats` times."""
    inst, imgs, empty = [0] * nc, [0] * nc, 0
    for i, cls in enumerate(image_classes):
        r = 1 if repeats is None else repeats[i]
        if not cls:
            empty += r
        for c in cls:
            inst[c] += r
        for c in set(cls):
            imgs[c] += r
    return ClassCounts(instances=inst, images=imgs, empty_images=empty)


def inverse_frequency_weights(counts: Sequence[int], clip: tuple[float, float] = WEIGHT_CLIP) -> list[float]:
    """w_c = mean_count / count_c, clipped to `clip`, then scaled to mean 1.

    mean_count is over classes with boxes, so an average class starts at 1; the clip keeps a
    class from counting more than clip[1] or less than clip[0] times an average one (the final
    spread max/min is at most clip[1] / clip[0]). Classes without boxes count as average (1).
    """
    present = [n for n in counts if n > 0]
    if not present:
        return [1.0] * len(counts)
    mean_n = sum(present) / len(present)
    w = [min(max(mean_n / n, clip[0]), clip[1]) if n > 0 else 1.0 for n in counts]
    m = sum(w) / len(w)
    return [x / m for x in w]


def oversample_repeats(image_classes: Sequence[Sequence[int]], nc: int, *, target_share: float = 0.5,
                       max_repeat: int = 10) -> list[int]:
    """Copies of each training image so every species reaches target_share x the top species' images.

    Species c (n_c images, top species n_max) gets r_c = ceil(target_share * n_max / n_c), within
    [1, max_repeat]; an image takes the largest r_c of its species; empty frames stay at 1.
    """
    if not 0 < target_share <= 1:
        raise ValueError(f"target_share must be in (0, 1], got {target_share}")
    if max_repeat < 1:
        raise ValueError(f"max_repeat must be >= 1, got {max_repeat}")
    n_img = class_counts(image_classes, nc)["images"]
    assert isinstance(n_img, list)
    top = max(n_img, default=0)
    r_c = [min(max_repeat, max(1, math.ceil(target_share * top / n))) if n else 1 for n in n_img]
    return [max((r_c[c] for c in cls), default=1) for cls in image_classes]


# ---------------------------------------------------------------- run files

def write_train_list(images: Sequence[Path], repeats: Sequence[int], path: Path) -> int:
    """A .txt of absolute image paths, each repeated; returns the number of lines.

    Paths are made absolute without resolving symlinks: an expert's dataset links the global
    images, and ultralytics finds each label beside the path it is given.
    """
    lines = [os.path.abspath(img) for img, r in zip(images, repeats, strict=True) for _ in range(r)]
    path.write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    return len(lines)


def write_run_data_yaml(spec: DataSpec, out: Path, train: Sequence[Path] | None = None) -> Path:
    """An absolute-path data.yaml for ultralytics (its own relative-path rule depends on the cwd)."""
    def src(v: Sequence[Path]) -> str | list[str]:
        return str(v[0]) if len(v) == 1 else [str(x) for x in v]

    d: dict[str, Any] = {"path": str(spec.root), "train": src(train or spec.splits["train"]),
                         "val": src(spec.splits["val"])}
    if "test" in spec.splits:
        d["test"] = src(spec.splits["test"])
    d["names"] = dict(enumerate(spec.names))
    out.write_text(yaml.safe_dump(d, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return out


file_sha256 = sha256_file  # one implementation, in edge.bundle


def is_checkpoint(model: str | os.PathLike) -> bool:
    return not str(model).lower().endswith((".yaml", ".yml"))


def builtin_yaml(name: str) -> Path | None:
    """The file behind an ultralytics model-yaml name such as 'yolov8n.yaml' (shipped, no download)."""
    from export.yolo_env import ultralytics

    ultralytics()
    from ultralytics.utils.checks import check_yaml

    unified = re.sub(r"(\d+)([nslmx])(.+)?$", r"\1\3", Path(name).stem) + Path(name).suffix
    for cand in (name, unified):
        try:
            found = check_yaml(cand, hard=False)
        except Exception:  # its lookup raises for some odd names; treat as not found
            found = None
        if found:
            return Path(found)
    return None


def resolve_model(model: str | os.PathLike) -> Path:
    """A local checkpoint or yaml; a bare yaml name may be ours (camtrap-tiny.yaml) or ultralytics'.

    ultralytics' own yaml names (yolov8n.yaml, yolo11s.yaml) come back as given, since the scale
    letter in the name picks the model size; `model_file` finds the file behind them.
    """
    p = Path(model)
    if p.is_file():
        return p
    packaged = Path(__file__).with_name("models") / p.name
    if p.parent == Path(".") and packaged.is_file():
        return packaged
    if p.parent == Path(".") and p.suffix in (".yaml", ".yml") and builtin_yaml(p.name):
        return p
    raise FileNotFoundError(
        f"{p}: model not found (give a local .pt checkpoint or a model yaml, e.g. {TINY_YAML.name} or "
        "yolov8n.yaml; names like 'yolov8n.pt' would need a download, which this tool never does)")


def model_file(model: Path) -> Path:
    """The file whose bytes define `model` (for hashing)."""
    return model if model.is_file() else builtin_yaml(model.name) or model


# ---------------------------------------------------------------- ultralytics

def load_yolo(model: Path):
    """ultralytics.YOLO for a local .pt / yaml, with an MDv5 hint when the pickle is classic YOLOv5."""
    from export.yolo_env import YOLO

    try:
        m = YOLO(model)
    except (ModuleNotFoundError, TypeError, AttributeError) as e:
        raise ValueError(
            f"{model}: ultralytics cannot load this checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]}). "
            "A classic YOLOv5 pickle such as MegaDetector v5 is not loadable: start from MegaDetector v6, an "
            "ultralytics YOLOv5u/v8/11 checkpoint, or a model yaml (see `camtrap-export train --help`)") from None
    if m.task != "detect":
        raise ValueError(f"{model}: a '{m.task}' model; a detection model is needed")
    return m


def _trainer_class(weights: Sequence[float] | None):
    """DetectionTrainer whose class weights are ours (clipped), not ultralytics' cls_pw formula."""
    import torch
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.utils.torch_utils import unwrap_model

    class CamtrapTrainer(DetectionTrainer):
        def set_class_weights(self):
            if weights is None:
                return
            model = unwrap_model(self.model)
            if len(weights) != model.nc:
                raise ValueError(f"class weights for {len(weights)} classes, model has {model.nc}")
            model.class_weights = torch.tensor(list(weights), dtype=torch.float32, device=self.device)

    return CamtrapTrainer


def _progress_callbacks(epochs: int, prefix: str, say: Callable[[str], None], seconds: list[float]):
    state = {"t0": time.monotonic()}

    def on_train_epoch_start(trainer):
        state["t0"] = time.monotonic()

    def on_fit_epoch_end(trainer):
        m = trainer.metrics or {}
        map50, map5095 = m.get("metrics/mAP50(B)", float("nan")), m.get("metrics/mAP50-95(B)", float("nan"))
        if trainer.epoch + 1 > trainer.epochs:  # ultralytics' final validation of best.pt
            say(f"{prefix} best.pt: mAP50 {map50:.3f} mAP50-95 {map5095:.3f}")
            return
        dt = time.monotonic() - state["t0"]
        seconds.append(round(dt, 2))
        loss = getattr(trainer, "tloss", None)
        if isinstance(loss, dict):
            lstr = " ".join(f"{k.replace('_loss', '')} {float(v):.3f}" for k, v in loss.items())
        else:
            lstr = "loss ?"
        say(f"{prefix} epoch {trainer.epoch + 1}/{trainer.epochs}: {lstr}, "
            f"val mAP50 {map50:.3f} mAP50-95 {map5095:.3f} ({dt:.1f} s)")

    return {"on_train_epoch_start": on_train_epoch_start, "on_fit_epoch_end": on_fit_epoch_end}


def close_mosaic_epochs(epochs: int, close_mosaic: int | None = None) -> int:
    """Final epochs trained without mosaic: ``close_mosaic`` when given, else ``CLOSE_MOSAIC_SHARE`` of
    the run (rounded). ultralytics' fixed 10 would turn mosaic off after 2 epochs of a 12-epoch run."""
    n = round(epochs * CLOSE_MOSAIC_SHARE) if close_mosaic is None else int(close_mosaic)
    if n < 0:
        raise ValueError(f"--close-mosaic must be >= 0, got {n}")
    return min(n, epochs)


def fit(model: Path, data_yaml: Path, out: Path, *, epochs: int, imgsz: int, batch: int, freeze: int,
        class_weights: Sequence[float] | None, seed: int, device: str, patience: int, plots: bool,
        optimizer: str = "auto", lr0: float | None = None, close_mosaic: int = 0,
        prefix: str = "[train]", say: Callable[[str], None] = print) -> dict[str, Any]:
    """One ultralytics training run into `out` (out/weights/best.pt, last.pt); returns metrics."""
    from ultralytics.utils.torch_utils import unwrap_model

    yolo = load_yolo(model)
    seconds: list[float] = []
    for event, cb in _progress_callbacks(epochs, prefix, say, seconds).items():
        yolo.add_callback(event, cb)
    out = out.resolve()
    yolo.train(
        trainer=_trainer_class(class_weights), data=str(data_yaml), epochs=epochs, imgsz=imgsz,
        batch=batch, freeze=freeze, seed=seed, deterministic=True, device=device, patience=patience,
        amp=False, workers=0, project=str(out.parent), name=out.name, exist_ok=True, plots=plots,
        cls_pw=0.0, val=True, optimizer=optimizer, close_mosaic=close_mosaic,
        **({"lr0": lr0} if lr0 is not None else {}),
    )
    tr = yolo.trainer
    if not (out / "weights" / "best.pt").is_file():
        raise RuntimeError(f"{out}: ultralytics finished without writing weights/best.pt")
    m = dict(tr.metrics or {})
    crit = getattr(unwrap_model(tr.model), "criterion", None)  # what the loss really used
    loaded = None
    try:  # what ultralytics really read (labels beside each listed image)
        import numpy as np

        cls = [lb["cls"].reshape(-1) for lb in tr.train_loader.dataset.labels]
        nc = int(cast(int, unwrap_model(tr.model).nc))
        loaded = np.bincount(np.concatenate(cls).astype(int), minlength=nc).tolist() if cls else [0] * nc
    except (AttributeError, KeyError, ValueError):
        pass
    applied = getattr(crit, "class_weights", None)
    return {
        "mAP50": _f(m.get("metrics/mAP50(B)")), "mAP50-95": _f(m.get("metrics/mAP50-95(B)")),
        "precision": _f(m.get("metrics/precision(B)")), "recall": _f(m.get("metrics/recall(B)")),
        "epochs_run": int(tr.epoch) + 1, "best_fitness": _f(tr.best_fitness),
        "epoch_seconds": seconds,
        "loaded_instances": loaded,
        "loss_class_weights": None if applied is None else [round(float(x), 6) for x in applied.reshape(-1)],
    }


def _f(x: Any) -> float | None:
    try:
        return None if x is None else round(float(x), 6)
    except (TypeError, ValueError):
        return None


def versions() -> dict[str, str]:
    import torch

    from export.yolo_env import ultralytics

    return {"ultralytics": ultralytics().__version__, "torch": torch.__version__}


# ---------------------------------------------------------------- the command

def train(data: str | os.PathLike, model: str | os.PathLike, out: str | os.PathLike, *,
          epochs: int = DEFAULT_EPOCHS, imgsz: int = DEFAULT_IMGSZ, batch: int = 16, freeze: int | None = None,
          class_weights: bool = True,
          oversample: bool = True, target_share: float = 0.5, max_repeat: int = 10, seed: int = 0,
          device: str = "cpu", patience: int = 50, plots: bool = True, optimizer: str = "auto",
          lr0: float | None = None, close_mosaic: int | None = None, prefix: str = "[train]",
          say: Callable[[str], None] = print) -> dict[str, Any]:
    """Train a detector on a YOLO dataset; writes out/weights/{best,last}.pt and out/run.json.

    Returns the run.json content. Used for the global model and (via export.experts) the experts.
    """
    spec = read_data_yaml(data)
    model_path = resolve_model(model)
    from_ckpt = is_checkpoint(model_path)
    freeze = (DEFAULT_FREEZE_CHECKPOINT if from_ckpt else 0) if freeze is None else int(freeze)
    if freeze < 0:
        raise ValueError(f"--freeze must be >= 0, got {freeze}")
    if epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {epochs}")
    no_mosaic = close_mosaic_epochs(epochs, close_mosaic)
    run = Path(out).resolve()
    if model_path.is_file() and model_path.resolve().is_relative_to(run / "weights"):
        raise ValueError(f"{model_path}: the start model lies in {run / 'weights'}, which training replaces; "
                         "copy it elsewhere or choose another --out")
    run.mkdir(parents=True, exist_ok=True)
    for stale in ("run.json", "weights"):  # a crashed rerun must not leave the old result looking current
        p = run / stale
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)

    items = split_items(spec, "train")
    if not items:
        raise ValueError(f"{spec.yaml_path}: no training images found in {[str(s) for s in spec.splits['train']]}")
    images, img_cls = [i for i, _ in items], [c for _, c in items]
    before = class_counts(img_cls, spec.nc)
    repeats = oversample_repeats(img_cls, spec.nc, target_share=target_share, max_repeat=max_repeat) \
        if oversample else [1] * len(images)
    after = class_counts(img_cls, spec.nc, repeats)
    train_src: list[Path] | None = None
    if oversample:
        train_src = [run / "train_list.txt"]
        write_train_list(images, repeats, train_src[0])
    data_yaml = write_run_data_yaml(spec, run / "data.yaml", train_src)
    inst_after = after["instances"]
    assert isinstance(inst_after, list)
    weights = inverse_frequency_weights(inst_after) if class_weights else None

    say(f"{prefix} {len(images)} training images ({sum(repeats)} after oversampling), {spec.nc} classes, "
        f"model {model_path.name}, freeze {freeze}, {epochs} epochs at {imgsz} px on {device} "
        f"(mosaic off for the last {no_mosaic})")
    if weights:
        say(f"{prefix} class weights: " + ", ".join(f"{n} {w:.2f}" for n, w in zip(spec.names, weights, strict=True)))
    t0 = time.monotonic()
    metrics = fit(model_path, data_yaml, run, epochs=epochs, imgsz=imgsz, batch=batch, freeze=freeze,
                  class_weights=weights, seed=seed, device=device, patience=patience, plots=plots,
                  optimizer=optimizer, lr0=lr0, close_mosaic=no_mosaic, prefix=prefix, say=say)
    if metrics["loaded_instances"] is not None and metrics["loaded_instances"] != inst_after:
        say(f"{prefix} warning: ultralytics loaded {metrics['loaded_instances']} boxes per class, the labels list "
            f"{inst_after} (labels it rejected as corrupt are in its log above)")
    record = {
        "args": {"data": str(spec.yaml_path),
                 "model": str(model_path.resolve() if model_path.is_file() else model_path), "out": str(run),
                 "epochs": epochs, "imgsz": imgsz, "batch": batch, "freeze": freeze,
                 "class_weights": class_weights, "oversample": oversample, "target_share": target_share,
                 "max_repeat": max_repeat, "seed": seed, "device": device, "patience": patience,
                 "optimizer": optimizer, "lr0": lr0, "close_mosaic": no_mosaic},
        "model_sha256": file_sha256(model_file(model_path)),
        "from_checkpoint": from_ckpt,
        DATASET_HASH_KEY: dataset_hash(spec.yaml_path),
        "names": spec.names,
        "freeze": freeze,
        "frozen_layers": list(range(freeze)),
        "metrics": metrics,
        "class_weights": dict(zip(spec.names, weights, strict=True)) if weights else None,
        "class_weight_rule": f"mean_count/count_c on oversampled box instances, clipped to {list(WEIGHT_CLIP)}, "
                             "scaled to mean 1" if weights else None,
        "oversampling": {
            "enabled": oversample, "target_share": target_share, "max_repeat": max_repeat,
            "train_images": len(images), "train_list_lines": sum(repeats),
            "images_per_class_before": dict(zip(spec.names, before["images"], strict=True)),
            "images_per_class_after": dict(zip(spec.names, after["images"], strict=True)),
            "instances_per_class_before": dict(zip(spec.names, before["instances"], strict=True)),
            "instances_per_class_after": dict(zip(spec.names, after["instances"], strict=True)),
            "empty_images": before["empty_images"],
        },
        "weights": {"best": str(run / "weights" / "best.pt"), "last": str(run / "weights" / "last.pt")},
        "seconds": round(time.monotonic() - t0, 1),
        "versions": versions(),
    }
    atomic_write_json(run / "run.json", record)
    say(f"{prefix} done: mAP50 {metrics['mAP50']} mAP50-95 {metrics['mAP50-95']} -> {run / 'weights' / 'best.pt'}")
    return record


def train_control(run: str | os.PathLike, out: str | os.PathLike, *, data: str | os.PathLike | None = None,
                  epochs: int | None = None, imgsz: int | None = None, freeze: int | None = None,
                  **kwargs: Any) -> dict[str, Any]:
    """The fair control for a cascade: the global model of ``run`` fine-tuned on all species for the
    experts' extra epochs, with the experts' frozen layers, evaluated as a single stage beside it.

    Defaults are what the experts got by default: the run's epochs and image size, its dataset,
    its frozen layers (``export.experts.shared_freeze``). Without it, a cascade's gain over the single
    stage mixes the experts' effect with the extra training they had.
    """
    from export.experts import global_run, shared_freeze

    best, g_freeze, g_run = global_run(run)
    args = (g_run or {}).get("args") or {}
    picked = {"data": data or args.get("data"), "epochs": epochs or args.get("epochs"),
              "imgsz": imgsz or args.get("imgsz")}
    missing = [k for k, v in picked.items() if v is None]
    if missing:
        raise ValueError(f"{run}: no run.json giving the global run's {', '.join(missing)}; "
                         + ", ".join(f"give --{k}" for k in missing))
    rec = train(cast("str | os.PathLike[str]", picked["data"]), best, out, epochs=int(cast(int, picked["epochs"])),
                imgsz=int(cast(int, picked["imgsz"])),
                freeze=shared_freeze(g_freeze) if freeze is None else freeze, **kwargs)
    rec["control_of"] = str(Path(run).resolve())
    atomic_write_json(Path(out).resolve() / "run.json", rec)
    return rec


def add_train_options(p, *, inherit: bool = False) -> None:
    """Options shared by `train` and `experts` (and mirrored by the pipeline config). ``inherit``:
    epochs and image size default to the global run's (an expert shares its frozen backbone)."""
    if inherit:
        p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the global run's)")
        p.add_argument("--imgsz", type=int, default=None, help="training image size, px (default: the global run's)")
    else:
        p.add_argument("--epochs", type=int, default=None,
                       help=f"training epochs (default: {DEFAULT_EPOCHS}; with --control-of, the run's)")
        p.add_argument("--imgsz", type=int, default=None,
                       help=f"training image size, px (default: {DEFAULT_IMGSZ}; with --control-of, the run's)")
    p.add_argument("--batch", type=int, default=16, help="images per batch")
    p.add_argument("--no-class-weights", dest="class_weights", action="store_false",
                   help="no inverse-frequency weighting of the classification loss")
    p.add_argument("--no-oversample", dest="oversample", action="store_false",
                   help="no repetition of rare species' images")
    p.add_argument("--target-share", type=float, default=0.5,
                   help="oversample until each species has this share of the top species' images")
    p.add_argument("--max-repeat", type=int, default=10, help="at most this many copies of one image")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--device", default="cpu", help="cpu, 0, 0,1, mps")
    p.add_argument("--patience", type=int, default=50, help="epochs without improvement before stopping")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="skip ultralytics' plots")
    p.add_argument("--optimizer", default="auto", choices=["auto", "SGD", "Adam", "AdamW", "MuSGD"],
                   help="ultralytics optimizer; 'auto' picks AdamW with a small lr for short runs. The paper "
                   "used SGD, lr0 0.01, momentum 0.9")
    p.add_argument("--lr0", type=float, default=None, help="initial learning rate (with --optimizer other than auto)")
    p.add_argument("--close-mosaic", type=int, default=None,
                   help=f"final epochs without mosaic (default: {CLOSE_MOSAIC_SHARE * 100:.0f}%% of --epochs, rounded)")


def _run(args) -> int:
    opts = dict(batch=args.batch, class_weights=args.class_weights, oversample=args.oversample,
                target_share=args.target_share, max_repeat=args.max_repeat, seed=args.seed, device=args.device,
                patience=args.patience, plots=args.plots, optimizer=args.optimizer, lr0=args.lr0,
                close_mosaic=args.close_mosaic)
    if args.control_of:
        if args.model:
            raise ValueError("--control-of starts from that run's best.pt; leave out --model")
        train_control(args.control_of, args.out, data=args.data, epochs=args.epochs, imgsz=args.imgsz,
                      freeze=args.freeze, prefix="[control]", **opts)
        return 0
    if not args.data or not args.model:
        raise ValueError("train needs --data and --model (or --control-of RUN)")
    train(args.data, args.model, args.out, epochs=args.epochs or DEFAULT_EPOCHS, imgsz=args.imgsz or DEFAULT_IMGSZ,
          freeze=args.freeze, **opts)
    return 0


def add_cli(sub) -> None:
    import argparse

    p = sub.add_parser("train", help="train the global detector (ultralytics, offline)",
                       description=__doc__.split("\n\n")[0], epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="YOLO data.yaml (from `prepare`); with --control-of, default: the run's")
    p.add_argument("--model",
                   help=f"ultralytics .pt checkpoint (MDv6, YOLOv5u/v8/11) or model yaml, e.g. {TINY_YAML.name}")
    p.add_argument("--control-of", metavar="RUN",
                   help="make the fair control of a cascade: fine-tune RUN's best.pt on all species for the "
                   "experts' extra epochs with their frozen layers (default: RUN's epochs, image size, data)")
    p.add_argument("--out", required=True, help="run folder: weights/best.pt, weights/last.pt, run.json")
    p.add_argument("--freeze", type=int, default=None,
                   help=f"freeze layers 0..N-1 (default {DEFAULT_FREEZE_CHECKPOINT} from a checkpoint, 0 from a yaml; "
                   "with --control-of, the experts' frozen layers)")
    add_train_options(p)
    p.set_defaults(func=_run)
