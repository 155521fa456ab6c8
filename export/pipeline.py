"""`camtrap-export pipeline CONFIG`: prepare -> train -> group -> experts (+ control), resumable.

The config (YAML, checked field by field) names a workdir and one section per step. Each
finished step records a fingerprint in WORKDIR/state.json: the sha256 of its config section, of
the content hashes of its inputs (input files, the dataset hash, best.pt, groups.yaml) and of the
fingerprint of the step it depends on (``DEPENDS``). A step whose fingerprint matches and whose
outputs exist is skipped ("skip train: up to date"); a changed input reruns that step and,
through the chained fingerprints, every step that depends on it. A crashed step has no record
and simply runs again.

The control step (on by default; ``control: {enabled: false}`` turns it off) trains the fair
control: the global model fine-tuned on all species for the experts' extra epochs with their
frozen layers (``export.train.train_control``). It depends on train only, so an edited grouping
does not retrain it. `camtrap-export evaluate --control WORKDIR/control` scores it beside the
cascade.

Workdir layout: data/ (prepared YOLO dataset), train/ (global run), group/groups.yaml (+ plots),
experts/<group>/ (expert runs), control/ (the control run), state.json. A person may edit group/groups.yaml: the experts
step sees the new content and reruns; to keep an edited grouping across reruns of the group
step, point ``group.groups`` at your own file instead.

Example::

    workdir: work
    prepare: {coco: scenes/coco.json, test_locations: [L6]}   # or instead: data: my/data.yaml
    train: {model: camtrap-tiny.yaml, epochs: 40, imgsz: 160}
    group: {k: auto, conf: 0.25}
    experts: {epochs: 10, negatives: false}   # image size (and, unless given, epochs): the global run's
    control: {enabled: true}                  # epochs: the experts'
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edge.atomic import atomic_write_json
from edge.hashing import sha256_file

STEPS = ("prepare", "train", "group", "experts", "control")
DEPENDS = {"prepare": None, "train": "prepare", "group": "train", "experts": "group", "control": "train"}
STATE_VERSION = 1


# ---------------------------------------------------------------- config

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PrepareConfig(_Strict):
    """Keyword arguments of export.datasets.prepare (exactly one of coco / yolo / labels_csv)."""

    coco: Path | None = None
    yolo: Path | None = None
    labels_csv: Path | None = None
    md_json: Path | None = None
    images: Path | None = None
    md_threshold: float = Field(0.2, ge=0, le=1)
    test_locations: list[str] | None = None
    val_locations: list[str] | None = None
    val_frac: float = Field(0.15, ge=0, lt=1)
    test_frac: float = Field(0.15, ge=0, lt=1)
    seed: int = 0
    resplit: bool = False
    link: Literal["hardlink", "symlink", "copy"] = "hardlink"
    taxonomy: Path | None = None  # taxonomy CSV (docs/taxonomy.md)

    @model_validator(mode="after")
    def _one_source(self):
        n = sum(x is not None for x in (self.coco, self.yolo, self.labels_csv))
        if n != 1:
            raise ValueError("give exactly one of coco, yolo, labels_csv")
        return self


class TrainOptions(_Strict):
    """What training the global model and the experts share (epochs and imgsz: each its own)."""

    batch: int = Field(16, ge=1)
    class_weights: bool = True
    oversample: bool = True
    target_share: float = Field(0.5, gt=0, le=1)
    max_repeat: int = Field(10, ge=1)
    seed: int = 0
    device: str = "cpu"
    patience: int = Field(50, ge=0)
    plots: bool = True
    optimizer: str = "auto"
    lr0: float | None = Field(None, gt=0)
    close_mosaic: int | None = Field(None, ge=0)


class TrainConfig(TrainOptions):
    epochs: int = Field(50, ge=1)
    imgsz: int = Field(640, ge=32)
    model: str = "camtrap-tiny.yaml"
    freeze: int | None = Field(None, ge=0)


class GroupConfig(_Strict):
    k: int | Literal["auto"] = "auto"
    conf: float = Field(0.25, gt=0, lt=1)
    min_support: int = Field(20, ge=0)
    allow_singletons: bool = False
    bootstrap: int = Field(200, ge=0)  # resamples measuring each species' stability (export.stability)
    groups: Path | None = None  # a person's groups file: used as is instead of clustering (k, conf unused)


class ExpertsConfig(TrainOptions):
    epochs: int | None = Field(None, ge=1)  # None: the global run's
    imgsz: int | None = Field(None, ge=32)  # None: the global run's (shared frozen backbone)
    negatives: bool = False
    empty_ratio: float | None = Field(None, ge=0)
    freeze: int | None = Field(None, ge=0)


class ControlConfig(_Strict):
    """The fair control (see the module doc); epochs default to the experts' (themselves the global run's)."""

    enabled: bool = True
    epochs: int | None = Field(None, ge=1)


class PipelineConfig(_Strict):
    workdir: Path
    data: Path | None = None  # an existing YOLO data.yaml instead of a prepare section
    prepare: PrepareConfig | None = None
    train: TrainConfig = TrainConfig()
    group: GroupConfig = GroupConfig()
    experts: ExpertsConfig = ExpertsConfig()
    control: ControlConfig = ControlConfig()

    @model_validator(mode="after")
    def _one_dataset(self):
        if (self.data is None) == (self.prepare is None):
            raise ValueError("give either 'data' (a YOLO data.yaml) or a 'prepare' section, not both or neither")
        return self


def _resolve(p: Path | None, base: Path) -> Path | None:
    return None if p is None else (p if p.is_absolute() else base / p)


def load_config(path: str | os.PathLike) -> PipelineConfig:
    """Read and check the config; relative paths are relative to the config file's folder."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: pipeline config not found")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{p}: expected a mapping with workdir, prepare|data, train, group, experts")
    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as e:
        errs = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or '(top)'}: {err['msg']}" for err in e.errors())
        raise ValueError(f"{p}: {errs}") from None
    base = p.resolve().parent
    cfg.workdir = _resolve(cfg.workdir, base)  # type: ignore[assignment]
    cfg.data = _resolve(cfg.data, base)
    if cfg.prepare is not None:
        for f in ("coco", "yolo", "labels_csv", "md_json", "images"):
            setattr(cfg.prepare, f, _resolve(getattr(cfg.prepare, f), base))
    cfg.group.groups = _resolve(cfg.group.groups, base)
    m = Path(cfg.train.model)
    if not m.is_absolute() and (base / m).exists():
        cfg.train.model = str(base / m)
    return cfg


# ---------------------------------------------------------------- fingerprints (pure + files)

def sha256_tree(root: Path, exclude: Path | None = None) -> str:
    """Names and sizes of the image files under a folder (cheap; catches adds, removes, edits).

    Only image files count, so a config or notes beside the images change nothing; `exclude`
    (the workdir, when it lives inside the image folder) is not walked.
    """
    from export.train import IMG_EXTS

    h = hashlib.sha256()
    skip = exclude.resolve() if exclude is not None else None
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        dirnames[:] = sorted(x for x in dirnames if skip is None or (d / x).resolve() != skip)
        for name in sorted(filenames):
            if Path(name).suffix.lower() in IMG_EXTS:
                f = d / name
                h.update(f"{f.relative_to(root).as_posix()}\0{f.stat().st_size}\n".encode())
    return h.hexdigest()


def input_hash(path: Path | None, exclude: Path | None = None) -> str | None:
    if path is None:
        return None
    if not path.exists():
        raise FileNotFoundError(f"{path}: input not found")
    return sha256_tree(path, exclude) if path.is_dir() else sha256_file(path)


def fingerprint(step: str, config: dict[str, Any], inputs: dict[str, Any]) -> str:
    """sha256 of the step name, its config and its inputs' hashes (canonical JSON)."""
    doc = {"step": step, "config": config, "inputs": inputs}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def read_state(workdir: Path) -> dict[str, Any]:
    f = workdir / "state.json"
    if not f.is_file():
        return {"version": STATE_VERSION, "steps": {}}
    try:
        st = json.loads(f.read_text())
    except json.JSONDecodeError:
        return {"version": STATE_VERSION, "steps": {}}  # a torn state file: everything reruns
    return st if st.get("version") == STATE_VERSION else {"version": STATE_VERSION, "steps": {}}


def write_state(workdir: Path, state: dict[str, Any]) -> None:
    atomic_write_json(workdir / "state.json", state)


# ---------------------------------------------------------------- the steps

class Pipeline:
    """The four steps over one workdir; `run` decides which are out of date and runs them in order."""

    def __init__(self, cfg: PipelineConfig, say: Callable[[str], None] = print):
        self.cfg, self.say = cfg, say
        self.wd = Path(cfg.workdir)
        self.data_yaml = self.wd / "data" / "data.yaml" if cfg.prepare is not None else Path(cfg.data)  # type: ignore[arg-type]
        self.run_dir = self.wd / "train"
        self.groups_yaml = self.wd / "group" / "groups.yaml"
        self.experts_dir = self.wd / "experts"
        self.control_dir = self.wd / "control"
        self.not_shared: list[str] = []  # experts whose frozen layers differ from the global model's

    # inputs of each step: computed just before it would run, after the previous step finished
    def _inputs(self, step: str, prev_fp: str | None) -> dict[str, Any]:
        from export.datasets import dataset_hash

        c = self.cfg
        if step == "prepare":
            p = c.prepare
            assert p is not None
            ins: dict[str, Any] = {k: input_hash(getattr(p, k))
                                   for k in ("coco", "yolo", "labels_csv", "md_json", "taxonomy")}
            if p.yolo is not None:
                ins["yolo_dataset"] = dataset_hash(p.yolo)
            else:  # prepare's default image root is the JSON's / CSV's folder
                src = p.coco or p.labels_csv
                assert src is not None
                ins["images"] = input_hash(p.images or src.parent, exclude=self.wd)
            return ins
        if not self.data_yaml.is_file():
            raise FileNotFoundError(f"{self.data_yaml}: data.yaml not found")
        ins = {"prev": prev_fp, "dataset": dataset_hash(self.data_yaml)}
        if step == "train":
            from export.train import model_file, resolve_model

            ins["model"] = sha256_file(model_file(resolve_model(c.train.model)))
            return ins
        ins["best"] = sha256_file(self.run_dir / "weights" / "best.pt")
        if step == "control":
            return ins
        if step == "group":
            ins["groups_file"] = input_hash(c.group.groups)
            return ins
        ins["groups"] = sha256_file(self.groups_yaml)
        return ins

    def _outputs(self, step: str) -> list[Path]:
        return {
            "prepare": [self.data_yaml],
            "train": [self.run_dir / "weights" / "best.pt", self.run_dir / "run.json"],
            "group": [self.groups_yaml],
            "experts": [self.experts_dir / "experts.json"],
            "control": [self.control_dir / "weights" / "best.pt", self.control_dir / "run.json"],
        }[step]

    def _config(self, step: str) -> dict[str, Any]:
        if step == "control":  # what the control trains with: the train section, the experts' epochs
            d = {**self.cfg.train.model_dump(mode="json"), "epochs": self._control_epochs()}
        else:
            d = getattr(self.cfg, step).model_dump(mode="json")
        if step in ("train", "experts", "group", "control"):
            d.pop("plots", None)  # plots do not change the models
        return d

    def _control_epochs(self) -> int:
        return self.cfg.control.epochs or self.cfg.experts.epochs or self.cfg.train.epochs

    @staticmethod
    def _ancestors(step: str) -> list[str]:
        out, s = [], DEPENDS[step]
        while s is not None:
            out.append(s)
            s = DEPENDS[s]
        return out

    @staticmethod
    def _descendants(step: str) -> list[str]:
        return [s for s in STEPS if step in Pipeline._ancestors(s)]

    def run_prepare(self) -> None:
        from export.datasets import prepare

        p = self.cfg.prepare
        assert p is not None
        report = prepare(self.wd / "data", overwrite=True, **p.model_dump())
        self.say(f"[prepare] {report.get('out', self.wd / 'data')}: split by {report.get('split_by')}")

    def run_train(self) -> None:
        from export.train import train

        t = self.cfg.train.model_dump()
        train(self.data_yaml, t.pop("model"), self.run_dir, say=self.say, **t)

    def run_group(self) -> None:
        from export.train import read_data_yaml

        g = self.cfg.group
        self.groups_yaml.parent.mkdir(parents=True, exist_ok=True)
        if g.groups is not None:
            from export.grouping import read_groups

            groups = read_groups(g.groups, read_data_yaml(self.data_yaml).names)
            shutil.copyfile(g.groups, self.groups_yaml)
            self.say(f"[group] using {g.groups}: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in groups.items()))
            return
        from export.grouping import run_grouping

        groups = run_grouping(out=self.groups_yaml, k=g.k, run=self.run_dir, data=self.data_yaml, conf=g.conf,
                              min_support=g.min_support, allow_singletons=g.allow_singletons,
                              imgsz=self.cfg.train.imgsz, n_boot=g.bootstrap)
        self.say("[group] " + "; ".join(f"{k}: {', '.join(v)}" for k, v in groups.items()))

    def run_experts(self) -> None:
        from export.experts import train_experts

        shutil.rmtree(self.experts_dir, ignore_errors=True)  # no stale experts of renamed groups
        e = self.cfg.experts.model_dump()
        s = train_experts(self.data_yaml, self.groups_yaml, self.run_dir, self.experts_dir,
                          negatives=e.pop("negatives"), empty_ratio=e.pop("empty_ratio"), freeze=e.pop("freeze"),
                          say=self.say, **e)
        self.not_shared = [g for g, x in s["experts"].items() if x["identical"] is False]

    def run_control(self) -> None:
        from export.train import train_control

        t = self.cfg.train.model_dump()
        t.pop("model")
        t.pop("epochs")
        t.pop("imgsz")
        train_control(self.run_dir, self.control_dir, data=self.data_yaml, epochs=self._control_epochs(),
                      imgsz=self.cfg.train.imgsz, prefix="[control]", say=self.say, **t)

    def run(self, rerun: str | None = None) -> dict[str, Any]:
        """Run what is out of date; `rerun` forces that step (and so every step depending on it)."""
        if rerun is not None and rerun not in STEPS:
            raise ValueError(f"--rerun: unknown step '{rerun}' (steps: {', '.join(STEPS)})")
        self.wd.mkdir(parents=True, exist_ok=True)
        self.not_shared = []
        state = read_state(self.wd)
        steps = [s for s in STEPS if (s != "prepare" or self.cfg.prepare is not None)
                 and (s != "control" or self.cfg.control.enabled)]
        fps: dict[str | None, str | None] = {None: None}
        ran: list[str] = []
        for step in steps:
            dep = DEPENDS[step] if DEPENDS[step] in steps else None
            fp = fingerprint(step, self._config(step), self._inputs(step, fps[dep]))
            rec = state["steps"].get(step)
            fresh = rec is not None and rec.get("fingerprint") == fp and all(p.exists() for p in self._outputs(step))
            upstream = [s for s in ran if s in self._ancestors(step)]
            if fresh and rerun != step and not upstream:
                self.say(f"skip {step}: up to date")
            else:
                why = ("forced" if rerun == step else f"{upstream[-1]} reran" if upstream else "never run"
                       if rec is None else "inputs or config changed" if rec.get("fingerprint") != fp
                       else "outputs missing")
                self.say(f"run {step}: {why}")
                for later in [step, *self._descendants(step)]:  # a crash must not leave them looking current
                    state["steps"].pop(later, None)
                write_state(self.wd, state)
                t0 = time.monotonic()
                getattr(self, f"run_{step}")()
                missing = [str(p) for p in self._outputs(step) if not p.exists()]
                if missing:
                    raise RuntimeError(f"{step}: finished without writing {', '.join(missing)}")
                state["steps"][step] = {"fingerprint": fp, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                        "seconds": round(time.monotonic() - t0, 1),
                                        "outputs": [str(p) for p in self._outputs(step)]}
                write_state(self.wd, state)
                ran.append(step)
            fps[step] = fp
        return {"ran": ran, "state": state, "not_shared": self.not_shared}


def run_pipeline(config: str | os.PathLike, *, rerun: str | None = None,
                 say: Callable[[str], None] = print) -> dict[str, Any]:
    return Pipeline(load_config(config), say=say).run(rerun=rerun)


def _run(args) -> int:
    res = run_pipeline(args.config, rerun=args.rerun)
    if res["not_shared"]:
        print(f"pipeline: experts {', '.join(res['not_shared'])} do not share the global backbone (see expert.json)")
        return 1
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("pipeline", help="prepare -> train -> group -> experts (+ the fair control), skipping what "
                       "is up to date",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="pipeline YAML (workdir, prepare|data, train, group, experts, control)")
    p.add_argument("--rerun", choices=STEPS, default=None,
                   help="run this step (and the steps depending on it) even if up to date")
    p.set_defaults(func=_run)
