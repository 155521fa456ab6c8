"""`camtrap-export share-backbone`: store the frozen layers once and give each model only its head.

The experts are fine-tuned from the global model with layers 0..F-1 frozen (``freeze``, 10 in
the paper), so those layers are byte-identical in every model of a bundle, yet each whole
model computes them again: 27-36% of every model's time on the demo bundle. This splits each
model's ONNX graph at the frozen layers' outputs (the tensors of layers < F that later layers
or the graph output read; for YOLOv8 the outputs of layers 4, 6 and 9):

- ``models/backbone.onnx``: the image to those tensors, cut from the global model;
- ``models/heads/<name>.onnx``: those tensors to the model's output, one per model.

A model shares the backbone only when its frozen part is the same: the nodes of its layers < F
(operator, inputs, outputs, attributes) and every weight they read hash to the global's
(:func:`frozen_digest`), and its cut tensors have the same names. Any other model stays a whole
graph in the bundle (the fallback; the device runs it as before). Before anything is written
the split is checked on the bundle's sample images with ONNX Runtime: backbone + head must give
the whole model's raw output (``PARITY_ATOL``). The result is a new bundle folder, signed with
``--sign`` as `camtrap-export bundle` signs. Graph surgery is ``onnx.utils.extract_model``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import re
import shutil
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

BACKBONE_FILE = "models/backbone.onnx"
HEADS_DIR = "models/heads"
PARITY_ATOL = 1e-4  # raw outputs (box pixels and scores) of backbone + head vs the whole model
_LAYER = re.compile(r"^/model\.(\d+)/")


class NoBackbone(ValueError):
    """The bundle has nothing to share: no frozen layers recorded, or a backbone already."""


def layer_of(node_name: str) -> int | None:
    """The ultralytics layer index of an exported node ("/model.9/cv2/conv/Conv" -> 9)."""
    m = _LAYER.match(node_name)
    return int(m.group(1)) if m else None


def cut_tensors(model, frozen: int) -> list[str]:
    """Tensors made by layers < ``frozen`` and read by anything after them, in layer order."""
    made = {o: layer_of(n.name) for n in model.graph.node for o in n.output}
    frozen_made = {t: lay for t, lay in made.items() if lay is not None and lay < frozen}
    if not frozen_made:
        raise NoBackbone(f"no nodes of layers 0..{frozen - 1} found (not an ultralytics export?)")
    wanted = {o.name for o in model.graph.output if o.name in frozen_made}
    for n in model.graph.node:
        lay = layer_of(n.name)
        if lay is None or lay >= frozen:
            wanted |= {i for i in n.input if i in frozen_made}
    return sorted(wanted, key=lambda t: (frozen_made[t], t))


def frozen_digest(model, frozen: int) -> str:
    """sha256 of the frozen part: its nodes (in order, with attributes) and the weights they read."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    h = hashlib.sha256()
    for n in model.graph.node:
        lay = layer_of(n.name)
        if lay is None or lay >= frozen:
            continue
        h.update(f"{n.op_type}|{','.join(n.input)}|{','.join(n.output)}|".encode())
        for a in sorted(n.attribute, key=lambda a: a.name):
            h.update(a.SerializeToString())
        for i in n.input:
            if i in inits:
                arr = numpy_helper.to_array(inits[i])
                h.update(f"{i}:{arr.dtype}:{arr.shape}".encode())
                h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def _extract(src: Path, dst: Path, inputs: list[str], outputs: list[str]) -> None:
    import onnx.utils

    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.utils.extract_model(str(src), str(dst), inputs, outputs, check_model=True)


def _sha(path: Path) -> str:
    from edge.hashing import sha256_file

    return sha256_file(path)


def _parity(whole: Path, backbone: Path, head: Path, x: np.ndarray, cut: list[str]) -> float:
    """max |whole(x) - head(backbone(x))| with ONNX Runtime on CPU."""
    import onnxruntime as ort

    def sess(p: Path):
        return ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])

    w, b, hd = sess(whole), sess(backbone), sess(head)
    ref = w.run(None, {w.get_inputs()[0].name: x})[0]
    feats = dict(zip(cut, b.run(cut, {b.get_inputs()[0].name: x}), strict=True))
    got = hd.run(None, {i.name: feats[i.name] for i in hd.get_inputs()})[0]
    return float(np.abs(ref - got).max())


def _not_in_place(src: Path, out: Path) -> None:
    """Refuse ``out`` naming the source bundle: the swap would replace the signed original with
    its converted (unsigned unless --sign) copy, leaving no bundle of the first form."""
    if out.exists() and out.resolve() == src.resolve():
        raise ValueError(f"{out}: is the source bundle; --out must name a new folder")


def share_backbone(src: Path, out: Path, sign_key: Path | None = None,
                   public_keys: list[Path] | None = None, require_signature: bool = False) -> dict:
    """Write a shared-backbone copy of the bundle folder ``src`` into ``out`` (see module doc)."""
    import onnx

    from edge.atomic import building
    from edge.bundle import load_bundle
    from edge.engines import read_samples
    from edge.manifest import BackboneEntry
    from edge.vision import letterbox_batch

    _not_in_place(src, out)
    bundle = load_bundle(src, public_keys=public_keys or None, require_signature=require_signature)
    man = bundle.manifest
    if man.backbone is not None:
        raise NoBackbone(f"{src}: the bundle already shares a backbone")
    g = man.global_model
    frozen = g.frozen_layers
    if frozen <= 0:
        raise NoBackbone(f"{src}: the global model records no frozen layers (frozen_layers 0): nothing to share")
    g_model = onnx.load(str(bundle.root / g.file))
    cut = cut_tensors(g_model, frozen)
    digest = frozen_digest(g_model, frozen)
    images = read_samples(bundle)
    if not images:
        raise ValueError(f"{src}: the bundle has no sample images to check the split on")
    x, _ = letterbox_batch(images, g.imgsz)
    report: dict = {"frozen_layers": frozen, "cut": cut, "shared": [], "whole": {}, "parity_max_abs": {}}
    with building(out) as tmp:
        _extract(bundle.root / g.file, tmp / BACKBONE_FILE, [g.input_name], cut)
        entries = []
        for m in man.models:
            src_file = bundle.root / m.file
            model = g_model if m is g else onnx.load(str(src_file))
            why = None
            if m.imgsz != g.imgsz:
                why = f"input {m.imgsz} px, the backbone's is {g.imgsz} px"
            elif m.frozen_layers != frozen:
                why = f"{m.frozen_layers} frozen layers, the global model has {frozen}"
            elif frozen_digest(model, frozen) != digest or cut_tensors(model, frozen) != cut:
                why = "its frozen layers differ from the global model's"
            if why is not None:  # fallback: the whole model, as before
                (tmp / m.file).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src_file, tmp / m.file)
                report["whole"][m.name] = why
                log.warning("share-backbone: %s stays a whole model: %s", m.name, why)
                entries.append(m)
                continue
            head_rel = f"{HEADS_DIR}/{m.name}.onnx"
            _extract(src_file, tmp / head_rel, cut, [o.name for o in model.graph.output][:1])
            diff = _parity(src_file, tmp / BACKBONE_FILE, tmp / head_rel, x, cut)
            report["parity_max_abs"][m.name] = diff
            if not diff <= PARITY_ATOL:
                raise ValueError(f"{src}: {m.name}: backbone + head differ from the whole model by {diff:.3g} "
                                 f"(more than {PARITY_ATOL}) on the samples; bundle not written")
            entries.append(m.model_copy(update={"file": head_rel, "sha256": _sha(tmp / head_rel),
                                                "head_inputs": cut}))
            report["shared"].append(m.name)
        backbone = BackboneEntry(file=BACKBONE_FILE, sha256=_sha(tmp / BACKBONE_FILE), imgsz=g.imgsz,
                                 input_name=g.input_name, outputs=cut, frozen_layers=frozen)
        _write_bundle(bundle, tmp, entries, backbone, {"shared_backbone": report}, sign_key)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    before = sum(p.stat().st_size for p in bundle.root.rglob("*") if p.is_file())
    report.update(mb_before=round(before / 1e6, 3), mb_after=round(size / 1e6, 3), signed=sign_key is not None)
    return report


def _write_bundle(bundle, tmp: Path, entries: list, backbone, provenance: dict, sign_key: Path | None) -> None:
    """Into ``tmp``: the samples, then the manifest with ``entries`` as its models and ``backbone``
    (None: whole models), ``provenance`` merged in, signed with ``sign_key`` if given."""
    from edge.manifest import Manifest

    man = bundle.manifest
    for rel in {s.file for s in man.samples}:
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(bundle.root / rel, tmp / rel)
    prov = {k: v for k, v in man.provenance.items() if k not in ("shared_backbone", "whole_models")}
    data = Manifest.model_validate({
        **man.model_dump(), "models": [e.model_dump() for e in entries],
        "backbone": backbone.model_dump() if backbone is not None else None, "provenance": {**prov, **provenance},
    }).to_bytes()
    (tmp / "manifest.json").write_bytes(data)
    if sign_key is not None:
        from edge.signing import sign

        (tmp / "manifest.sig").write_bytes(sign(data, Path(sign_key).read_bytes()))


def _merge(backbone, head):
    """One graph: the backbone's nodes, then the head's, which read the backbone's outputs by name
    (the cut tensors keep their names through the split). ``onnx.compose.merge_models`` refuses
    the constants both halves read, so the graph is put together here and checked."""
    import onnx
    from onnx import helper

    head = _without_shared_constants(head, backbone)
    cut = {i.name for i in head.graph.input}
    seen = {v.name for v in backbone.graph.value_info}
    graph = helper.make_graph(
        [*backbone.graph.node, *head.graph.node], head.graph.name or "model", list(backbone.graph.input),
        list(head.graph.output), [*backbone.graph.initializer, *head.graph.initializer],
        value_info=[*backbone.graph.value_info, *(v for v in head.graph.value_info if v.name not in seen),
                    *(v for v in backbone.graph.output if v.name in cut and v.name not in seen)],
    )
    model = helper.make_model(graph, opset_imports=list(backbone.opset_import), ir_version=backbone.ir_version,
                              producer_name=backbone.producer_name)
    del model.metadata_props[:]
    model.metadata_props.extend(head.metadata_props or backbone.metadata_props)
    onnx.checker.check_model(model)
    return model


def _without_shared_constants(head, backbone):
    """``head`` without the initializers the backbone holds under the same name (small constants such
    as Split sizes that both halves of the original graph read): one copy, the backbone's, serves the
    merged graph. A same-named initializer with other values is renamed in the head instead."""
    from onnx import numpy_helper

    theirs = {t.name: numpy_helper.to_array(t) for t in backbone.graph.initializer}
    keep = []
    for t in head.graph.initializer:
        if t.name not in theirs:
            keep.append(t)
            continue
        mine = numpy_helper.to_array(t)
        if mine.dtype == theirs[t.name].dtype and np.array_equal(mine, theirs[t.name]):
            continue
        new = f"head::{t.name}"
        for n in head.graph.node:
            n.input[:] = [new if i == t.name else i for i in n.input]
        t.name = new
        keep.append(t)
    del head.graph.initializer[:]
    head.graph.initializer.extend(keep)
    return head


def join_backbone(src: Path, out: Path, sign_key: Path | None = None,
                  public_keys: list[Path] | None = None, require_signature: bool = False) -> dict:
    """The inverse of :func:`share_backbone`: a bundle of whole models (backbone + head merged into
    one graph per model, ``onnx.compose.merge_models``), checked on the samples against backbone +
    head (``PARITY_ATOL``). For engines or tools that want whole graphs, and to compare the two forms
    of one bundle (the P2 and P5 benchmarks, ``camtrap-edge selftest --whole``)."""
    import onnx

    from edge.atomic import building
    from edge.bundle import load_bundle
    from edge.engines import read_samples
    from edge.vision import letterbox_batch

    _not_in_place(src, out)
    bundle = load_bundle(src, public_keys=public_keys or None, require_signature=require_signature)
    man = bundle.manifest
    bb = man.backbone
    if bb is None:
        raise ValueError(f"{src}: the bundle has no shared backbone; its models are whole already")
    backbone = onnx.load(str(bundle.root / bb.file))
    x, _ = letterbox_batch(read_samples(bundle), bb.imgsz)
    report: dict = {"joined": [], "parity_max_abs": {}}
    with building(out) as tmp:
        entries = []
        for m in man.models:
            rel = f"models/{m.name}.onnx"
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            if not m.head_inputs:  # a whole model already (the fallback)
                shutil.copy2(bundle.root / m.file, tmp / rel)
                entries.append(m.model_copy(update={"file": rel}))
                continue
            whole = _merge(backbone, onnx.load(str(bundle.root / m.file)))
            onnx.save(whole, str(tmp / rel))
            diff = _parity(tmp / rel, bundle.root / bb.file, bundle.root / m.file, x, list(bb.outputs))
            report["parity_max_abs"][m.name] = diff
            if not diff <= PARITY_ATOL:
                raise ValueError(f"{src}: {m.name}: the merged model differs from backbone + head by {diff:.3g} "
                                 f"(more than {PARITY_ATOL}) on the samples; bundle not written")
            entries.append(m.model_copy(update={"file": rel, "sha256": _sha(tmp / rel), "head_inputs": []}))
            report["joined"].append(m.name)
        _write_bundle(bundle, tmp, entries, None, {"whole_models": report}, sign_key)
    report.update(signed=sign_key is not None)
    return report


def _cmd(args: argparse.Namespace) -> int:
    from edge.keys import trust_from_args

    t = trust_from_args(args)
    r = share_backbone(Path(args.bundle), Path(args.out), Path(args.sign) if args.sign else None,
                       public_keys=t.public_keys, require_signature=t.require_signature)
    whole = "; ".join(f"{k} whole ({v})" for k, v in r["whole"].items())
    print(f"{args.out}: backbone (layers 0-{r['frozen_layers'] - 1}, {len(r['cut'])} tensors) shared by "
          f"{', '.join(r['shared'])}{'; ' + whole if whole else ''}; {r['mb_before']} MB -> {r['mb_after']} MB; "
          f"parity max |diff| {max(r['parity_max_abs'].values(), default=0):.2g}"
          f"{'' if r['signed'] else '; UNSIGNED (give --sign)'}")
    return 0


def _cmd_join(args: argparse.Namespace) -> int:
    from edge.keys import trust_from_args

    t = trust_from_args(args)
    r = join_backbone(Path(args.bundle), Path(args.out), Path(args.sign) if args.sign else None,
                      public_keys=t.public_keys, require_signature=t.require_signature)
    print(f"{args.out}: whole models {', '.join(r['joined'])} (backbone + head merged); parity max |diff| "
          f"{max(r['parity_max_abs'].values(), default=0):.2g}{'' if r['signed'] else '; UNSIGNED (give --sign)'}")
    return 0


def add_cli(sub) -> None:
    from edge.keys import add_trust_options

    p = sub.add_parser("share-backbone", help="split a bundle's models into one shared backbone + one head each")
    p.add_argument("--bundle", required=True, help="bundle folder of whole models (from `camtrap-export bundle "
                   "--whole-models`)")
    p.add_argument("--out", required=True, help="new bundle folder")
    p.add_argument("--sign", help="Ed25519 private key (PEM) to sign the new manifest")
    add_trust_options(p)
    p.set_defaults(func=_cmd)
    j = sub.add_parser("whole-models", help="the inverse of share-backbone: merge backbone + head into one "
                       "graph per model")
    j.add_argument("--bundle", required=True, help="shared-backbone bundle folder")
    j.add_argument("--out", required=True, help="new bundle folder")
    j.add_argument("--sign", help="Ed25519 private key (PEM) to sign the new manifest")
    add_trust_options(j)
    j.set_defaults(func=_cmd_join)
