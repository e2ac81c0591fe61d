"""Which data fills which input: binding a data set's fields to a spec's inputs.

A data source yields named fields (data.py); a spec declares named, typed inputs.
`bind` pairs them: a field named like an input fills it; a field named "image" or
"label" (the classic sources' fields) fills the spec's only float or only integer
input left. It checks every pairing once, when the data is loaded, so a mismatch is
one error listing the spec's inputs beside what the data provides, and a label
outside the range its consumer accepts (a class id of a cross-entropy, an id of an
embedding: the operator's `ids` rule) names the file, split, index and value.
A sequence source (`by_order`: text) fills inputs it does not name in declaration
order. `synthetic` makes random data for every input from its declared type.
COCO detection data fills a detector's ground-truth inputs (GROUND_TRUTH), and an input
named `proposals` is filled from the data directory's selective search cache.
"""
from __future__ import annotations

import math
import os

import numpy as np

from ..errors import NetdslError
from ..ir.dims import Sym, fmt_shape
from ..ir.graph import Graph, Value
from ..ops import OPS
from ..ops.registry import Ctx
from .data import SPLITS, Dataset

ROLES = {"image": "f", "label": "i"}    # a field of this name may fill the only input of that kind
# the detector specs' ground-truth inputs and the COCO reader's fields that fill them
# (coco.py: padded boxes in the resized image's pixels, labels 1..K with -1 padding; Mask
# R-CNN's per-object masks and keypoints, which train.load_data asks coco() for)
GROUND_TRUTH = {"gt_boxes": "boxes", "gt_labels": "labels", "gt_masks": "masks", "gt_keypoints": "keypoints",
                "gt_captions": "captions"}      # dense captioning's region phrases (datasets/vg.py)
PROPOSALS = "proposals"     # an input of this name reads `netdsl data proposals DIR`'s cache


def describe_inputs(g: Graph) -> str:
    return ", ".join(f"{n} {v.dtype}{fmt_shape(v.shape)}" for n, v in g.inputs.items())


def bind(g: Graph, ds: Dataset) -> dict[str, str]:
    """input name -> field name, for every input of g; converts the fields to the
    inputs' dtypes in place and checks shapes, dtypes and index ranges."""
    if PROPOSALS in g.inputs and PROPOSALS not in ds.train and getattr(ds, "meta", None):
        add_proposals(g, ds)
    pairs = {n: n for n in g.inputs if n in ds.train}
    for name, field in GROUND_TRUTH.items():
        if name in g.inputs and name not in pairs and field in ds.train and field not in pairs.values():
            pairs[name] = field
    left = [n for n in g.inputs if n not in pairs]
    for field, kind in ROLES.items():
        if field in ds.train and field not in pairs.values():
            fits = [n for n in left if g.inputs[n].dtype[0] == kind]
            if len(fits) == 1:
                pairs[fits[0]] = field
                left.remove(fits[0])
    spare = [f for f in ds.train if f not in pairs.values()]
    if ds.by_order and left and len(spare) == len(left) and all(
            (g.inputs[n].dtype[0] == "f") == (ds.train[f].dtype.kind == "f") for n, f in zip(left, spare)):
        pairs.update(zip(left, spare))      # e.g. text's chars and next, to inputs named otherwise
        left = []
    both = f"the spec's inputs: {describe_inputs(g)}; the data provides: {ds.describe()} (per example)"
    if left:
        v = g.inputs[left[0]]
        raise NetdslError(f"the data set '{ds.name}' has nothing for input{'s' if len(left) > 1 else ''} "
                          f"{', '.join(repr(n) for n in left)} of '{g.name}'", v.pos,
                          hint=both + ". Name the data's arrays after the inputs (npz: NAME_train, NAME_test)")
    if ds.streams is not None:
        _fit_sequence_length(g, ds, pairs)
    dims: dict[str, int] = {}
    for name, field in pairs.items():
        for split in SPLITS:
            arrays = ds.split(split)
            arrays[field] = convert(g.inputs[name], name, arrays[field], f"{ds.source}: {split} '{field}'")
            check_shape(g, name, arrays[field], f"{ds.source}: {split} '{field}'", dims, both)
    _check_ids(g, ds, pairs)
    return pairs


def add_proposals(g: Graph, ds: Dataset):
    """Fill the field `proposals` of both splits of a COCO data set from its selective
    search cache (proposal_cache.py), padded with empty boxes to the spec's P (when the
    spec fixes it) or the largest count, and scaled with the images as coco() scales the
    ground truth. No cache: an error with the command that makes it."""
    from ..datasets.proposal_cache import load_proposals
    v = g.inputs[PROPOSALS]
    k = v.shape[1] if v.rank == 3 and isinstance(v.shape[1], int) else None
    cached = {}
    for split in SPLITS:
        meta = ds.meta[split]
        ann, _, name = os.path.basename(meta["file"]).removesuffix(".json").rpartition("_")
        try:
            cached[split] = load_proposals(ds.source, name, ann)
        except NetdslError as e:
            # the command goes in the message: a COCO binding error's hint is replaced (train._bind)
            make = e.hint or f"run `netdsl data proposals {ds.source}` to make it"
            raise NetdslError(f"input '{PROPOSALS}' of '{g.name}' takes the region proposals of {ds.source}: "
                              f"{e.message}; {make}", v.pos, hint=make) from None
    if k is None:
        k = max(int(np.diff(p.offsets).max(initial=0)) for p in cached.values())
    for split, p in cached.items():
        meta, arrays = ds.meta[split], ds.split(split)
        boxes, _ = p.padded(meta["image_ids"], max(k, 1))
        h, w = arrays["image"].shape[2:]
        sizes = meta["sizes"].astype(np.float32)          # each image's file size (H, W)
        scale = np.stack([w / sizes[:, 1], h / sizes[:, 0]] * 2, axis=1)
        arrays[PROPOSALS] = boxes * scale[:, None, :]     # empty boxes stay empty


def _fit_sequence_length(g: Graph, ds: Dataset, pairs: dict):
    """A spec that fixes the length of its sequence inputs (i64[N, 100], or --set T=100)
    gets windows of that length: the spec's T wins over the source's seq."""
    from .text import SPLIT_NAMES, windows
    fixed = {g.inputs[n].shape[1] for n, f in pairs.items()
             if f in ds.shifts and g.inputs[n].rank == 2 and isinstance(g.inputs[n].shape[1], int)}
    if len(fixed) == 1 and (seq := fixed.pop()) != ds.seq:
        ds.seq = seq
        for split in SPLITS:
            ids = ds.streams[split]
            cut = windows(ids, seq, f"{ds.source}: {SPLIT_NAMES[split]}", max(ds.shifts.values()))
            ds.split(split).update({f: cut[s] for f, s in ds.shifts.items()})


def convert(v: Value, name: str, a: np.ndarray, where: str) -> np.ndarray:
    if v.dtype.startswith("f"):
        if a.dtype == np.uint8:          # 8-bit pixels
            return a.astype(np.float32) / np.float32(255)
        if a.dtype.kind not in "fiu":
            raise NetdslError(f"{where} holds {a.dtype} values; input '{name}' is {v.dtype}", v.pos)
        return a.astype(np.float32, copy=False)
    if v.dtype == "bool":
        return a.astype(np.bool_, copy=False)
    if a.dtype.kind not in "iub":
        raise NetdslError(f"{where} holds {a.dtype} values but input '{name}' takes integers ({v.dtype})", v.pos,
                          hint="store labels and ids as integer arrays")
    return a.astype(np.int64 if v.dtype == "i64" else np.int32, copy=False)


def check_shape(g: Graph, name: str, a: np.ndarray, where: str, dims: dict, hint: str | None = None):
    v = g.inputs[name]
    got = tuple(a.shape[1:])
    want = v.shape[1:]
    ok = len(got) == len(want)
    for d, n in zip(want, got) if ok else ():
        if isinstance(d, Sym):
            key = str(d)
            ok = ok and dims.setdefault(key, n) == n
        else:
            ok = ok and d == n
    if not ok:
        raise NetdslError(f"{where} holds examples of shape {list(got)}, but input '{name}' is declared "
                          f"{v.dtype}{fmt_shape(v.shape)}", v.pos,
                          hint=hint or "the first axis is the batch; the rest must match the declaration")
    if not isinstance(v.shape[0], Sym):
        raise NetdslError(f"input '{name}' has a fixed first dimension {v.shape[0]}, but `netdsl run` feeds "
                          f"batches along it", v.pos, hint="declare it as N, e.g. f32[N, ...]")


def index_rules(g: Graph) -> dict[str, list[tuple[int, object, object]]]:
    """input name -> [(count, ignored value, consuming node)] from the operators'
    `ids` rules, for each integer input a node reads directly or through slices
    (seq2seq's tgt[:, 1:]: the whole input is checked, a stricter test)."""
    inputs = {id(v): n for n, v in g.inputs.items()}
    for node in g.nodes:        # in order, so a slice of a slice follows too
        if node.op == "slice" and id(node.inputs[0]) in inputs:
            inputs[id(node.outputs[0])] = inputs[id(node.inputs[0])]
    out: dict[str, list] = {}
    for node in g.nodes:
        rule = OPS[node.op].ids if node.op in OPS else None
        if rule is None:
            continue
        for i, (count, ignore) in rule(Ctx(OPS[node.op], node.inputs, node.attrs, node.pos, node.path)).items():
            name = inputs.get(id(node.inputs[i]))
            if name is not None and isinstance(count, int):
                out.setdefault(name, []).append((count, ignore, node))
    return out


def _check_ids(g: Graph, ds: Dataset, pairs: dict):
    for name, rules in index_rules(g).items():
        field = pairs[name]
        for count, ignore, node in rules:
            if ds.vocab is not None and len(ds.vocab) > count:
                _too_many_characters(g, ds, name, count, node)
            for split in SPLITS:
                a = ds.split(split)[field]
                bad = (a < 0) | (a >= count)
                if ignore is not None:
                    bad &= a != ignore
                if bad.any():
                    at = np.unravel_index(int(np.argmax(bad)), a.shape)
                    where = at[0] if a.ndim == 1 else tuple(int(i) for i in at)
                    allowed = f"[0, {count})" + (f" or {ignore} (ignored)" if ignore is not None else "")
                    raise NetdslError(f"{ds.source}: {split} '{field}' at index {where} is {int(a[at])}, outside "
                                      f"{allowed}: input '{name}' feeds {node.op} ({node.path}), which takes "
                                      f"{count} classes", node.pos,
                                      hint=f"{int(bad.sum())} value(s) of the {split} split are outside the range")


def _too_many_characters(g: Graph, ds: Dataset, name: str, count: int, node):
    """A text with more distinct characters (or captions with more words) than the
    spec's vocabulary: say so, and which network parameter to raise (one whose value
    is that count)."""
    v = len(ds.vocab)
    params = [k for k, x in g.args.items() if isinstance(x, int) and not isinstance(x, bool) and x == count]
    fix = (f"--set {params[0]}={v}" if len(params) == 1 else
           f"a vocabulary of at least {v} ({' or '.join(f'--set {p}={v}' for p in params)})" if params else
           f"a vocabulary of at least {v}")
    what = f"the text {ds.source} has {v} distinct characters" if isinstance(ds.vocab, str) else \
        f"the vocabulary of {ds.source} has {v} words (with <pad>, <start>, <end>, <unk>)"
    raise NetdslError(f"{what}, but input '{name}' feeds {node.op} ({node.path}), which takes {count}", node.pos,
                      hint=f"run with {fix}")


def synthetic(g: Graph, size: int, seed: int) -> Dataset:
    """Random data shaped like every input of the spec: floats in [0, 1), integers that
    are valid ids for the inputs' consumers (class ids below the logits' class count),
    0/1 otherwise. For timing and smoke runs of networks whose data does not ship."""
    if size < 1:
        raise NetdslError(f"synthetic data needs at least 1 example, got {size}")
    from .train import machine_memory
    rng = np.random.default_rng(seed)
    rules = index_rules(g)
    n = size + max(size // 4, 1)
    shapes = {}
    for name, v in g.inputs.items():
        for d in v.shape[1:]:
            if not isinstance(d, int):
                raise NetdslError(f"synthetic data: input '{name}' has the symbolic dimension {d}, and synthetic "
                                  f"data needs a size for it", v.pos, hint=f"fix it with --set {d}=...")
        shapes[name] = [n, *v.shape[1:]]
    total = sum(math.prod(s) * (4 if v.dtype.startswith("f") else 8) for s, v in zip(shapes.values(), g.inputs.values()))
    if total > machine_memory() // 2:
        name = max(shapes, key=lambda k: math.prod(shapes[k]))
        raise NetdslError(f"synthetic data of {n} examples would take {total / 2**30:.1f} GiB, more than half of "
                          f"this machine's {machine_memory() / 2**30:.1f} GiB", g.inputs[name].pos,
                          hint="ask for fewer examples (--data synthetic:SIZE) or a smaller input")
    arrays = {}
    for name, v in g.inputs.items():
        shape = shapes[name]
        if v.dtype.startswith("f"):
            arrays[name] = rng.random(shape, dtype=np.float32)
        elif v.dtype == "bool":
            arrays[name] = rng.random(shape) < 0.5
        else:
            count = min((c for c, _, _ in rules.get(name, [])), default=2)
            arrays[name] = rng.integers(0, count, shape).astype(np.int64 if v.dtype == "i64" else np.int32)
    return Dataset("synthetic", "synthetic data", {k: a[:size] for k, a in arrays.items()},
                   {k: a[size:] for k, a in arrays.items()})
