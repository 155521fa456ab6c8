"""The device wing stays light: no torch, ultralytics, pickle or export/ anywhere in edge/."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import edge

FORBIDDEN = {"torch", "torchvision", "ultralytics", "pickle", "cPickle", "dill", "joblib", "export"}
# numpy itself imports pickle, so at run time only the heavy packages and export/ are checked;
# the rule "never unpickle" is enforced statically (no pickle import, no allow_pickle=True).
FORBIDDEN_LOADED = {"torch", "torchvision", "ultralytics", "export"}
EDGE = Path(edge.__file__).parent


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_no_forbidden_import_statements():
    bad = {str(p.relative_to(EDGE)): sorted(_imports(p) & FORBIDDEN) for p in EDGE.rglob("*.py")}
    assert not {k: v for k, v in bad.items() if v}


def test_no_pickle_loading_through_numpy():
    hits = [str(p) for p in EDGE.rglob("*.py") if "allow_pickle=True" in p.read_text()]
    assert hits == []


def test_importing_every_edge_module_loads_no_heavy_package():
    mods = [m.name for m in pkgutil.walk_packages([str(EDGE)], "edge.")
            if not m.name.startswith("edge.engines.tensorrt")]  # imports tensorrt lazily, still checked above
    code = (
        "import importlib, json, sys\n"
        f"for m in {mods!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(k for k in sys.modules if k.split('.')[0] in "
        f"{sorted(FORBIDDEN_LOADED)!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
    assert len(mods) > 5  # the walk really found the package
