"""Region descriptions in Visual Genome's format: the data of dense captioning.

    ds = vg("data/shapes_regions")                     # netdsl data shapes-regions
    ds = vg("/data/vg", size=512, max_len=15, min_count=15)

Files in PATH, as Visual Genome v1.2 ships them (and densecap's preprocessing reads them):
  region_descriptions.json  a list, per image {"id": image id (v1.2; "image_id" also read),
                            "regions": [{"region_id", "image_id", "phrase", "x", "y",
                            "width", "height"}]}; x, y the box's top-left corner in pixels
  image_data.json           a list of {"image_id" (or v1.0's "id"), "width", "height", "url"}
                            (netdsl's own sets add "file_name"); the image file is
                            file_name, else the url's last part, looked up in PATH/images/,
                            PATH/VG_100K/, PATH/VG_100K_2/ and PATH
  densecap_splits.json      {"train": [ids], "val": [ids], "test": [ids]} (Johnson et al.'s
                            split file); without it the last 20% of the described images by
                            id are the held-out split
Images listed in image_data.json but described nowhere are left out.

Fields: `image` f32[N, 3, H, W] in [0, 1] (resized to `size`), `boxes` f32[N, G, 4]
(x1, y1, x2, y2 in the resized pixels), `labels` i64[N, G] (1 for a region: dense
captioning has one class; -1 for padding rows), `captions` i64[N, G, L]: per region
<start> w1 ... wk <end> <pad>..., L = max_len + 2; padding rows all <pad>. feeds.py gives
them to densecap.net's gt_boxes, gt_labels and gt_captions. G: the most regions of any
image, rounded up to a multiple of 8, or `max_regions` (an image's regions past it are
left out of training, in file order, though not out of evaluation). Regions whose box is
empty or whose phrase has no word are skipped (counted in `meta[split]["skipped"]`).

Words, tokenisation and vocabulary are captions.py's (<pad> 0, <start> 1, <end> 2,
<unk> 3, then the training phrases' words seen min_count times, most frequent first).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import NetdslError
from ..runtime.data import Dataset
from . import cocofile
from .captions import encode, tokenize, vocabulary

REGIONS, IMAGES, SPLITS_FILE = "region_descriptions.json", "image_data.json", "densecap_splits.json"
IMAGE_DIRS = ("images", "VG_100K", "VG_100K_2", "")
CAP_STEP = 8
HELD_OUT = 0.2          # the share held out when there is no split file


@dataclass
class RegionsDataset(Dataset):
    """A Dataset of images with described regions. meta[split]: "file", "image_ids"
    (int64 per example), "sizes" (each image's file size H, W), "regions" (per image,
    [(x1, y1, x2, y2) in the file's pixels, phrase], every region), "skipped"."""
    max_len: int = 0
    max_regions: int = 0
    meta: dict = field(default_factory=dict)


def vg(path: str, size=0, max_len: int = 0, min_count: int = 1, max_regions: int = 0,
       train: str = "train", test: str = "val") -> RegionsDataset:
    """Read a Visual Genome-format data set (module docstring). size: an int, an
    [height, width] pair, or 0 for the images' own size when they all share one.
    max_len: words per phrase (longer ones are cut), 0 for the longest."""
    from .coco import _size
    path = os.path.expanduser(os.fspath(path))
    hw = _size(size, "vg") if size != 0 else None
    for name, v, lo in (("max_len", max_len, 0), ("min_count", min_count, 1), ("max_regions", max_regions, 0)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise NetdslError(f"vg: {name} must be an integer of at least {lo}, got {v!r}")
    if not os.path.isdir(path):
        raise NetdslError(f"vg: directory {path} not found" if not os.path.exists(path)
                          else f"vg: {path} is not a directory",
                          hint=f"give the directory holding {REGIONS} and {IMAGES} "
                               "(e.g. netdsl data shapes-regions DIR)")
    images = read_image_data(os.path.join(path, IMAGES))
    described = read_regions(os.path.join(path, REGIONS), images)
    split_ids = read_splits(os.path.join(path, SPLITS_FILE), described, train, test)
    words = {s: {i: [tokenize(p) for _, p in described[i]] for i in ids} for s, ids in split_ids.items()}
    vocab = vocabulary((w for ws in words["train"].values() for w in ws), min_count)
    longest = max((len(w) for ws in words.values() for x in ws.values() for w in x), default=0)
    if longest == 0:
        raise NetdslError(f"{os.path.join(path, REGIONS)} describes no region with words in either split")
    length = (max_len or longest) + 2
    most = max(len(described[i]) for ids in split_ids.values() for i in ids)
    cap = max_regions or max(CAP_STEP, -(-most // CAP_STEP) * CAP_STEP)
    if hw is None:
        shapes = {(images[i]["height"], images[i]["width"]) for ids in split_ids.values() for i in ids}
        if len(shapes) > 1:
            raise NetdslError(f"vg: the images of {path} differ in size ({len(shapes)} sizes), so they need a "
                              "common size", hint="give size=S (or [height, width]) to resize them all")
        hw = shapes.pop()
    ds = RegionsDataset("vg", path, {}, {}, vocab=vocab, max_len=length - 2, max_regions=cap)
    index = {w: i for i, w in enumerate(vocab)}
    _check_memory(sum(map(len, split_ids.values())), hw, cap, length, path)
    for s, ids in split_ids.items():
        arrays, ds.meta[s] = _read_split(path, ids, images, described, words[s], hw, cap, length, index)
        setattr(ds, s, arrays)
    return ds


# ---------------------------------------------------------------- the files

def _bad(path: str, what: str, msg: str, hint: str | None = None):
    raise NetdslError(f"{path} is not a Visual Genome {what} file: {msg}", hint=hint)


def _image_id(d: dict, keys=("image_id", "id")):
    return next((d[k] for k in keys if k in d), None)


def read_image_data(path: str) -> dict[int, dict]:
    """image id -> {"width", "height", "file"} from image_data.json, checked."""
    d = cocofile.read_json(path, "Visual Genome image data file")
    shape = "image_data.json is a list of {\"image_id\", \"width\", \"height\", \"url\"}"
    if not isinstance(d, list):
        _bad(path, "image data", f"the top level is {type(d).__name__ if d is not None else 'null'}, "
                                 "expected a list", shape)
    out = {}
    for k, im in enumerate(d):
        i = _image_id(im) if isinstance(im, dict) else None
        if not cocofile._int(i):
            _bad(path, "image data", f"entry {k} needs an integer 'image_id', got {cocofile._show(im)}", shape)
        if i in out:
            _bad(path, "image data", f"image id {i} appears twice")
        for key in ("width", "height"):
            v = im.get(key)
            if not cocofile._int(v) or not 1 <= v <= 65536:
                _bad(path, "image data", f"image {i}: '{key}' must be a positive integer, got {cocofile._show(v)}")
        name = im.get("file_name") or (im.get("url") or "").rstrip("/").rpartition("/")[2]
        if not isinstance(name, str) or not name:
            _bad(path, "image data", f"image {i} has neither 'file_name' nor a 'url' naming its file")
        out[i] = {"width": im["width"], "height": im["height"], "file": name}
    return out


def read_regions(path: str, images: dict) -> dict[int, list]:
    """image id -> [(x1, y1, x2, y2), phrase] from region_descriptions.json, checked;
    regions with an empty box or no word skipped (their count under key None)."""
    d = cocofile.read_json(path, "Visual Genome region descriptions file")
    shape = "region_descriptions.json is a list of {\"id\": image id, \"regions\": [...]}"
    if not isinstance(d, list):
        _bad(path, "region descriptions", f"the top level is {type(d).__name__ if d is not None else 'null'}, "
                                          "expected a list", shape)
    out: dict = {None: 0}
    for k, entry in enumerate(d):
        i = _image_id(entry, ("id", "image_id")) if isinstance(entry, dict) else None
        if not cocofile._int(i) or not isinstance(entry.get("regions"), list):
            _bad(path, "region descriptions", f"entry {k} needs an integer 'id' and a 'regions' list, got "
                                              f"{cocofile._show(entry)}", shape)
        if i not in images:
            _bad(path, "region descriptions", f"entry {k}: image {i} is not in {IMAGES}")
        rows = out.setdefault(i, [])
        W, H = images[i]["width"], images[i]["height"]
        for j, r in enumerate(entry["regions"]):
            where = f"image {i}, regions[{j}]"
            if not isinstance(r, dict):
                _bad(path, "region descriptions", f"{where} is {cocofile._show(r)}, expected an object")
            if "image_id" in r and r["image_id"] != i:
                _bad(path, "region descriptions", f"{where} says image_id {cocofile._show(r['image_id'])}")
            for key in ("x", "y", "width", "height"):
                if not cocofile._num(r.get(key)):
                    _bad(path, "region descriptions", f"{where}: '{key}' must be a number, got "
                                                      f"{cocofile._show(r.get(key))}")
            if not isinstance(r.get("phrase"), str):
                _bad(path, "region descriptions", f"{where}: 'phrase' must be a string, got "
                                                  f"{cocofile._show(r.get('phrase'))}")
            x1, y1 = max(float(r["x"]), 0.0), max(float(r["y"]), 0.0)     # VG's boxes stray past the image
            x2, y2 = min(float(r["x"]) + float(r["width"]), W), min(float(r["y"]) + float(r["height"]), H)
            if x2 <= x1 or y2 <= y1 or not tokenize(r["phrase"]):
                out[None] += 1
                continue
            rows.append(((x1, y1, x2, y2), r["phrase"]))
    return out


def read_splits(path: str, described: dict, train: str, test: str) -> dict[str, list[int]]:
    """{"train": ids, "test": ids}: the split file's lists named train and test (images
    without a described region dropped), or the last HELD_OUT of the ids held out."""
    ids = sorted(i for i, rows in described.items() if i is not None and rows)
    if not ids:
        raise NetdslError(f"{os.path.join(os.path.dirname(path), REGIONS)} describes no image")
    if not os.path.exists(path):
        k = min(max(1, round(len(ids) * HELD_OUT)), len(ids) - 1) if len(ids) > 1 else 0
        if k == 0:
            raise NetdslError(f"{os.path.dirname(path)}: one described image cannot be split into train and "
                              f"held-out images", hint=f"write {SPLITS_FILE} with the same id in both lists")
        return {"train": ids[:-k], "test": ids[-k:]}
    d = cocofile.read_json(path, "split file")
    out = {}
    for s, name in (("train", train), ("test", test)):
        v = d.get(name) if isinstance(d, dict) else None
        if not isinstance(v, list) or not all(cocofile._int(i) for i in v):
            raise NetdslError(f"{path}: '{name}' must be a list of image ids",
                              hint='a split file is {"train": [ids], "val": [ids], "test": [ids]}')
        out[s] = [i for i in v if described.get(i)]
        if not out[s]:
            raise NetdslError(f"{path}: no image of the '{name}' split has a described region")
    return out


# ---------------------------------------------------------------- arrays

def _read_split(root, ids, images, described, words, hw, cap, length, index):
    from .coco import _read_image
    n, (h, w) = len(ids), hw
    out = {"image": np.empty((n, 3, h, w), np.float32), "boxes": np.zeros((n, cap, 4), np.float32),
           "labels": np.full((n, cap), -1, np.int64), "captions": np.zeros((n, cap, length), np.int64)}
    sizes = np.zeros((n, 2), np.int64)
    for k, i in enumerate(ids):
        info = images[i]
        H, W = info["height"], info["width"]
        sizes[k] = H, W
        scale = np.array([w / W, h / H, w / W, h / H], np.float32)
        out["image"][k] = _read_image(_find_image(root, info["file"], i), {"id": i, **info, "file_name": info["file"]},
                                      os.path.join(root, IMAGES), hw)
        for g, ((box, _), ws) in enumerate(zip(described[i][:cap], words[i])):
            out["boxes"][k, g] = np.asarray(box, np.float32) * scale
            out["labels"][k, g] = 1
            out["captions"][k, g] = encode(ws, index, length)
    meta = {"file": os.path.join(root, REGIONS), "image_ids": np.asarray(ids, np.int64), "sizes": sizes,
            "regions": [list(described[i]) for i in ids], "skipped": described[None]}
    return out, meta


def _find_image(root: str, name: str, image_id: int) -> str:
    tried = [os.path.join(root, d, name) for d in IMAGE_DIRS]
    for p in tried:
        if os.path.isfile(p):
            return p
    raise NetdslError(f"{os.path.join(root, IMAGES)}: image {image_id} is '{name}', found in none of "
                      f"{', '.join(os.path.dirname(p) or '.' for p in tried)}")


def _check_memory(n, hw, cap, length, path):
    from ..runtime.train import machine_memory
    need = n * (12 * hw[0] * hw[1] + cap * (24 + 8 * length))
    if need > machine_memory() // 2:
        raise NetdslError(f"vg: {n} images of {path} at {hw[1]}x{hw[0]} would take {need / 2**30:.1f} GiB, more "
                          "than half of this machine's memory", hint="read them at a smaller size")


# ---------------------------------------------------------------- fitting a spec

def fit_to_spec(g, kwargs: dict) -> dict:
    """vg's arguments with `size` and `max_len` from a spec that fixes them (image
    f32[N, 3, 64, 64]: size [64, 64]; gt_captions i64[N, G, 9]: max_len 7), unless given."""
    out = dict(kwargs)
    image = g.inputs.get("image")
    if not out.get("size") and image is not None and image.rank == 4 and all(isinstance(d, int)
                                                                            for d in image.shape[2:]):
        out["size"] = list(image.shape[2:])
    caps = g.inputs.get("gt_captions")
    if not out.get("max_len") and caps is not None and caps.rank == 3 and isinstance(caps.shape[2], int):
        out["max_len"] = caps.shape[2] - 2
    return out


def fit_data(g, ds: RegionsDataset) -> RegionsDataset:
    """Check the vocabulary against the spec's embedding, and give a decoding graph's
    `tokens` input (densecap.net at training = false) a field: one <start> per region,
    which decoding (runtime/densecap.py) replaces word by word."""
    from .captions import START
    emb = [n for n in g.nodes if n.op == "embedding"]
    if emb and len(ds.vocab) > emb[0].attrs["vocab"]:
        v = len(ds.vocab)
        raise NetdslError(f"the vocabulary of {ds.source} has {v} words (with <pad>, <start>, <end>, <unk>), but "
                          f"network '{g.name}' embeds {emb[0].attrs['vocab']}", emb[0].pos,
                          hint=f"run with --set vocab={v}")
    tok = g.inputs.get("tokens")
    if tok is not None and tok.rank == 3 and isinstance(tok.shape[1], int):
        for s in ("train", "test"):
            ds.split(s)["tokens"] = np.full((ds.size(s), tok.shape[1], 1), START, np.int64)
    return ds
