"""TensorRT's real Python API, read from tensorrt-stubs (generated from NVIDIA's 10.13 bindings).

Two users: the test that keeps tests/edge/fake_tensorrt.py from drifting from TensorRT, and the
type checker, which checks edge/engines/tensorrt.py against the same stubs. The stubs are
installed with ``pip install --no-deps`` (the pin is in pyproject.toml's ``trt-stubs`` extra):
their own dependencies are TensorRT itself, which cannot be installed here.

pybind11-stubgen wrote a few signatures Python cannot parse (a parameter named ``in``, a
default before a required parameter: 5 plugin and layer methods in 10.13, none of which the
backend or the fake uses). ``repaired_source`` keeps each such method by name with a
``(self, *args, **kwargs)`` signature; ``python tests/edge/trt_stubs.py DIR`` writes the
repaired stubs under DIR/tensorrt_bindings/ for mypy (``mypy_path``), since mypy stops at a
syntax error in a stub.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from dataclasses import dataclass
from pathlib import Path

FILES = ("__init__.pyi", "tensorrt.pyi")  # __init__.pyi is the `tensorrt` module; its classes live in tensorrt.pyi


def stubs_dir() -> Path:
    spec = importlib.util.find_spec("tensorrt_bindings")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("TensorRT's type stubs are missing: pip install --no-deps tensorrt-stubs==<pin in "
                                "pyproject.toml's trt-stubs extra> (scripts/test.sh does)")
    return Path(next(iter(spec.submodule_search_locations)))


def repaired_source(path: Path, max_repairs: int = 20) -> str:
    """The stub's text with every unparseable ``def`` line replaced by a generic signature."""
    lines = path.read_text().splitlines()
    for _ in range(max_repairs):
        try:
            ast.parse("\n".join(lines))
            return "\n".join(lines) + "\n"
        except SyntaxError as e:
            i = (e.lineno or 1) - 1
            m = re.match(r"(\s*)def (\w+)\(", lines[i])
            if m is None:
                raise
            lines[i] = f"{m.group(1)}def {m.group(2)}(self, *args, **kwargs):"
    raise ValueError(f"{path}: more than {max_repairs} unparseable lines")


@dataclass
class StubClass:
    bases: list[str]
    members: dict[str, list[ast.FunctionDef] | None]  # name -> overloads (None: an attribute or enum member)


def stub_api() -> tuple[dict[str, StubClass], dict[str, list[ast.FunctionDef] | None]]:
    """Classes, and the module-level names of `tensorrt` (functions with their overloads)."""
    root = stubs_dir()
    classes: dict[str, StubClass] = {}
    module: dict[str, list[ast.FunctionDef] | None] = {}
    for name in reversed(FILES):
        for node in ast.parse(repaired_source(root / name)).body:
            if isinstance(node, ast.ClassDef):
                members: dict[str, list[ast.FunctionDef] | None] = {}
                for item in node.body:
                    if isinstance(item, ast.FunctionDef):
                        members[item.name] = [*(members.get(item.name) or []), item]
                    elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                        members[item.target.id] = None
                    elif isinstance(item, ast.ClassDef):
                        members[item.name] = None
                classes[node.name] = StubClass([ast.unparse(b).split(".")[-1] for b in node.bases], members)
                module[node.name] = None
            elif isinstance(node, ast.FunctionDef):
                module[node.name] = [*(module.get(node.name) or []), node]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                module[node.target.id] = None
    return classes, module


def stub_member(classes: dict[str, StubClass], cls: str, name: str) -> tuple[bool, list[ast.FunctionDef] | None]:
    """(found, overloads) for ``cls.name``, following the stub's base classes."""
    c = classes.get(cls)
    if c is None:
        return False, None
    if name in c.members:
        return True, c.members[name]
    for base in c.bases:
        found, defs = stub_member(classes, base, name)
        if found:
            return True, defs
    return False, None


def stub_params(fn: ast.FunctionDef) -> list[tuple[str, bool]]:
    """(name, has a default) of each parameter after self; ``*args``/``**kw`` as '*'/'**'."""
    a = fn.args
    pos = a.posonlyargs + a.args
    is_method = not any(ast.unparse(d) == "staticmethod" for d in fn.decorator_list)
    if is_method and pos and pos[0].arg in ("self", "cls"):
        pos = pos[1:]
    defaults = [False] * (len(pos) - len(a.defaults)) + [True] * len(a.defaults)
    out = [(p.arg, d) for p, d in zip(pos, defaults, strict=True)]
    out += [(p.arg, d is not None) for p, d in zip(a.kwonlyargs, a.kw_defaults, strict=True)]
    return out + ([("*", True)] if a.vararg else []) + ([("**", True)] if a.kwarg else [])


def write_repaired(out: Path) -> Path:
    """DIR/tensorrt_bindings/{__init__,tensorrt}.pyi, parseable, for mypy's mypy_path."""
    target = out / "tensorrt_bindings"
    target.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        (target / name).write_text(repaired_source(stubs_dir() / name))
    return target


if __name__ == "__main__":  # python tests/edge/trt_stubs.py build/typing
    print(write_repaired(Path(sys.argv[1] if len(sys.argv) > 1 else "build/typing")))
