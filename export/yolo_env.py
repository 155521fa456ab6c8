"""Make ultralytics work offline, and import it only through here.

ultralytics probes the network on import (a ~20 s DNS check), pip-installs missing extras,
downloads Arial.ttf for every train()/val() plot and downloads yolo11n.pt for its AMP check.
This module sets the switches before the first import and plants a local TTF where
ultralytics looks, so no code path of ours ever reaches for the network.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import ModuleType

_FONT_NAMES = ("Arial.ttf", "Arial.Unicode.ttf")


def _local_ttf() -> Path | None:
    try:
        import matplotlib

        p = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        return p if p.is_file() else None
    except ImportError:  # pragma: no cover - matplotlib is in the train extra
        return None


def prepare_offline(config_dir: str | os.PathLike | None = None) -> Path:
    """Set ultralytics' offline switches and plant fonts; returns the config dir used.

    Must run before ``import ultralytics``; calling it again is harmless.
    """
    os.environ["YOLO_OFFLINE"] = "true"
    os.environ["YOLO_AUTOINSTALL"] = "false"
    os.environ.setdefault("YOLO_VERBOSE", "false")
    cfg = Path(config_dir or os.environ.get("YOLO_CONFIG_DIR") or Path.home() / ".config" / "camtrap-yolo")
    os.environ["YOLO_CONFIG_DIR"] = str(cfg)
    font_dir = cfg / "Ultralytics"
    font_dir.mkdir(parents=True, exist_ok=True)
    ttf = _local_ttf()
    for name in _FONT_NAMES:
        dst = font_dir / name
        if not dst.exists() and ttf is not None:
            shutil.copyfile(ttf, dst)
    return cfg


def ultralytics() -> ModuleType:
    """Import ultralytics with the offline switches set."""
    prepare_offline()
    import ultralytics as ul
    from ultralytics.utils import SETTINGS

    # No hub sync, no telemetry, no tensorboard/wandb/mlflow callbacks that reach out.
    try:
        SETTINGS.update({"sync": False, "hub": False, "wandb": False, "mlflow": False,
                         "clearml": False, "comet": False, "dvc": False, "neptune": False,
                         "raytune": False, "tensorboard": False})
    except Exception:  # settings keys differ across versions; offline flags still hold
        pass
    return ul


def YOLO(model: str | os.PathLike):
    """ultralytics.YOLO from a local file or a model yaml; never a hub name that downloads."""
    p = str(model)
    if not (p.endswith((".yaml", ".yml")) or Path(p).is_file()):
        raise FileNotFoundError(
            f"{p}: not a local checkpoint or model yaml (names like 'yolov8n.pt' would download; "
            "give a path to a file you have, or a yaml such as yolov8n.yaml)"
        )
    return ultralytics().YOLO(p)
