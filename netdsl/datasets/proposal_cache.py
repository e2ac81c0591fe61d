"""A COCO-format data set's region proposals, computed once and cached beside the data.

`netdsl data proposals DIR` runs selective search (proposals.py) on every image of a
split and writes DIR/proposals/selective_search_SPLIT.npz atomically (a temp file
renamed into place), with np.savez and no object arrays, so it loads without pickle:

    format     str             "netdsl proposals"
    version    int64           1
    params     str             JSON: method, strategies (SPACE:TERMS:K), max_boxes, seed,
                               sigma, ann, split, and the scikit-image that made them
    image_ids  int64 [N]       the annotation file's images, in its order
    offsets    int64 [N + 1]   image n's boxes are boxes[offsets[n]:offsets[n + 1]]
    boxes      float32 [B, 4]  x1, y1, x2, y2 in the image file's pixels, best first
    digest     str             sha256 over each image's id, file name and file bytes

    p = load_proposals("data/shapes", "val")     # checked against the data and the request
    p.boxes_of(image_id)                        # float32 [K_i, 4]
    boxes, counts = p.padded(max_boxes=2000)    # [N, K, 4], zero boxes after each image's
The padded form follows the detection contract (docs/language.md): a zero box is empty,
never a box, and `to_rois` makes it a padding RoI.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
from dataclasses import dataclass, field

import numpy as np

from ..errors import NetdslError
from . import proposals as ss

FORMAT = "netdsl proposals"
VERSION = 1
METHOD = "selective_search"
SPLITS = ("train", "val")


def cache_path(root: str, split: str) -> str:
    return os.path.join(os.path.expanduser(os.fspath(root)), "proposals", f"{METHOD}_{split}.npz")


def request(k=None, strategies="fast", max_boxes: int = 2000, seed: int = 0, sigma: float = 0.8) -> dict:
    """The parameters of a run, checked and in the form the file records."""
    strats = ss.strategies_of(strategies, k)
    if not isinstance(max_boxes, int) or isinstance(max_boxes, bool) or max_boxes < 1:
        raise NetdslError(f"--max-boxes must be a positive integer, got {max_boxes!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise NetdslError(f"--seed must be 0 or more, got {seed!r}")
    if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not 0 <= sigma <= 100:
        raise NetdslError(f"selective search: sigma must be a number from 0 to 100, got {sigma!r}")
    return {"method": METHOD, "strategies": [str(s) for s in strats], "max_boxes": max_boxes, "seed": seed,
            "sigma": float(sigma)}


# ---------------------------------------------------------------- a split's images

@dataclass
class Split:
    root: str
    name: str
    ann: str
    ann_file: str
    image_dir: str
    images: list          # the annotation file's image records, in its order
    gt: dict = field(default_factory=dict)    # image id -> float64 [G, 4] non-crowd boxes (x1, y1, x2, y2)


def open_split(root: str, split: str, ann: str = "instances") -> Split:
    """The annotation file ROOT/annotations/ANN_SPLIT.json (checked) and its image directory."""
    from . import cocofile
    from .coco import _image_dir
    root = os.path.expanduser(os.fspath(root))
    if not os.path.isdir(root):
        raise NetdslError(f"{root} is not a directory" if os.path.exists(root) else f"directory {root} not found",
                          hint="give the data set's directory, the one holding annotations/")
    if not split or "/" in split or split.startswith("."):
        raise NetdslError(f"--split must be a split's name such as train or val, got '{split}'")
    ann_file = os.path.join(root, "annotations", f"{ann}_{split}.json")
    if not os.path.exists(ann_file):
        raise NetdslError(f"no annotation file {ann_file}", hint=f"split '{split}' needs it (COCO layout, docs/data.md)")
    c = cocofile.load(ann_file)
    gt = {}
    for a in c.dataset["annotations"]:
        if not a.get("iscrowd", 0):
            x, y, w, h = a["bbox"]
            gt.setdefault(a["image_id"], []).append([x, y, x + w, y + h])
    images = list(c.dataset["images"])
    return Split(root, split, ann, ann_file, _image_dir(root, split, ann_file), images,
                 {i["id"]: np.asarray(gt.get(i["id"], np.zeros((0, 4))), np.float64).reshape(-1, 4) for i in images})


def splits_of(root: str, names=None, ann: str = "instances") -> list[Split]:
    """The named splits, or (none named) those of train and val that have annotation files."""
    if not names:
        names = [s for s in SPLITS if os.path.exists(os.path.join(os.path.expanduser(os.fspath(root)),
                                                                  "annotations", f"{ann}_{s}.json"))]
        if not names:
            return [open_split(root, SPLITS[0], ann)]       # its error names what is missing
    return [open_split(root, s, ann) for s in dict.fromkeys(names)]


def read_image(split: Split, info: dict) -> tuple[np.ndarray, bytes]:
    """(uint8 [H, W, 3], the file's sha256) of one image, checked against its record."""
    from PIL import Image
    file = os.path.join(split.image_dir, info["file_name"])
    try:
        with open(file, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise NetdslError(f"{split.ann_file}: image {info['id']} is '{info['file_name']}', but {file} does not exist") \
            from None
    except OSError as e:
        raise NetdslError(f"cannot read {file}: {e.strerror or e}") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            size, rgb = im.size, np.asarray(im.convert("RGB"))
    except Exception as e:   # noqa: BLE001 - Pillow raises many kinds for a damaged file; all are the file's
        raise NetdslError(f"{file} cannot be read as an image ({type(e).__name__}: {e})",
                          hint=f"it is image {info['id']} of {split.ann_file}") from None
    if size != (info["width"], info["height"]):
        raise NetdslError(f"{file} is {size[0]}x{size[1]} pixels but {split.ann_file} says image {info['id']} is "
                          f"{info['width']}x{info['height']}")
    return rgb, hashlib.sha256(data).digest()


def _digest(records) -> str:
    h = hashlib.sha256()
    for image_id, file_name, file_hash in records:
        h.update(f"{image_id}\0{file_name}\0".encode() + file_hash)
    return h.hexdigest()


# ---------------------------------------------------------------- the cache

@dataclass
class Proposals:
    path: str
    params: dict
    image_ids: np.ndarray     # int64 [N]
    offsets: np.ndarray       # int64 [N + 1]
    boxes: np.ndarray         # float32 [B, 4]

    def __post_init__(self):
        self._row = {int(i): n for n, i in enumerate(self.image_ids.tolist())}

    def boxes_of(self, image_id: int) -> np.ndarray:
        n = self._row.get(int(image_id))
        if n is None:
            raise NetdslError(f"{self.path} holds no proposals for image {image_id}")
        return self.boxes[self.offsets[n]:self.offsets[n + 1]]

    def padded(self, image_ids=None, max_boxes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(float32 [N, K, 4], int64 [N] counts): each image's best boxes first, zero
        (empty) boxes after them; K = max_boxes, default the largest count."""
        ids = self.image_ids if image_ids is None else np.asarray(image_ids, np.int64).reshape(-1)
        rows = [self.boxes_of(i) for i in ids.tolist()]
        k = max((len(r) for r in rows), default=0) if max_boxes is None else int(max_boxes)
        out = np.zeros((len(rows), k, 4), np.float32)
        counts = np.zeros(len(rows), np.int64)
        for n, r in enumerate(rows):
            counts[n] = m = min(len(r), k)
            out[n, :m] = r[:m]
        return out, counts


def make_proposals(split: Split, params: dict, progress=None) -> Proposals:
    """Selective search on every image of the split, written to the cache; progress(1)
    after each image."""
    import skimage
    boxes, records = [], []
    for info in split.images:
        rgb, file_hash = read_image(split, info)
        boxes.append(ss.selective_search(rgb, strategies=params["strategies"], max_boxes=params["max_boxes"],
                                         seed=params["seed"], sigma=params["sigma"]))
        records.append((info["id"], info["file_name"], file_hash))
        if progress:
            progress(1)
    full = dict(params, ann=split.ann, split=split.name, skimage=skimage.__version__)
    p = Proposals(cache_path(split.root, split.name), full, np.array([i["id"] for i in split.images], np.int64),
                  np.concatenate([[0], np.cumsum([len(b) for b in boxes])]).astype(np.int64),
                  np.concatenate(boxes + [np.zeros((0, 4), np.float32)]).astype(np.float32))
    write(p, _digest(records))
    return p


def write(p: Proposals, digest: str) -> None:
    from ..runtime.checkpoint import atomic_write
    arrays = {"format": np.array(FORMAT), "version": np.array(VERSION, np.int64),
              "params": np.array(json.dumps(p.params, sort_keys=True)), "image_ids": p.image_ids,
              "offsets": p.offsets, "boxes": p.boxes, "digest": np.array(digest)}
    try:
        os.makedirs(os.path.dirname(p.path), exist_ok=True)
    except OSError as e:
        raise NetdslError(f"cannot create {os.path.dirname(p.path)}: {e.strerror or e}") from None
    atomic_write(p.path, lambda f: np.savez(f, **arrays))


def load_proposals(root: str, split: str = "val", ann: str = "instances", check_images: bool = True,
                   **expect) -> Proposals:
    """The cached proposals of a split, refused (a NetdslError saying why) when the file is
    damaged, not one this module wrote, made for other images (check_images: the image
    files' bytes too, not only their ids and names) or with other parameters than `expect`
    (request()'s keywords: k, strategies, max_boxes, seed, sigma; a cache with more boxes
    than max_boxes serves fewer: padded() cuts them)."""
    from ..runtime.npyfile import read_npz
    s = open_split(root, split, ann)
    path = cache_path(root, split)
    want = request(**expect) if expect else None
    again = f"run `{command(s.root, split, ann, want)}` to make it"
    if not os.path.exists(path):
        raise NetdslError(f"no proposals for split '{split}': {path} not found", hint=again)
    try:
        a = read_npz(path, "proposals file")
    except NetdslError as e:
        raise NetdslError(e.message, hint=f"make it again: {again[0].lower()}{again[1:]}") from None
    p = _checked(a, path, again)
    if p.params.get("ann") != ann or p.params.get("split") != split:
        raise NetdslError(f"{path} holds the proposals of {p.params.get('ann')}_{p.params.get('split')}, "
                          f"not {ann}_{split}", hint=again)
    if expect:
        given = {"strategies": "k" in expect or "strategies" in expect, "seed": "seed" in expect,
                 "sigma": "sigma" in expect}
        for key in (key for key, asked in given.items() if asked):
            if want[key] != p.params.get(key):
                raise NetdslError(f"{path} was made with {key} {p.params.get(key)}, not {want[key]}", hint=again)
        if "max_boxes" in expect and p.params.get("max_boxes", 0) < want["max_boxes"]:
            raise NetdslError(f"{path} holds at most {p.params.get('max_boxes')} boxes per image, fewer than "
                              f"max_boxes={want['max_boxes']}", hint=again)
    ids = [i["id"] for i in s.images]
    if p.image_ids.tolist() != ids:
        raise NetdslError(f"{path} is stale: it holds the proposals of {len(p.image_ids)} images, not of the "
                          f"{len(ids)} that {s.ann_file} lists now", hint=again)
    for n, info in enumerate(s.images):
        b = p.boxes[p.offsets[n]:p.offsets[n + 1]]
        if len(b) and (b[:, 2].max() > info["width"] or b[:, 3].max() > info["height"]):
            raise NetdslError(f"{path} is stale: image {info['id']}'s boxes reach outside its "
                              f"{info['width']}x{info['height']} pixels", hint=again)
    if check_images and _digest((i["id"], i["file_name"], read_image(s, i)[1]) for i in s.images) != str(a["digest"]):
        raise NetdslError(f"{path} is stale: the images of {s.ann_file} changed since it was made", hint=again)
    return p


def command(root: str, split: str, ann: str = "instances", want: dict | None = None) -> str:
    """The `netdsl data proposals` command line that makes this cache."""
    words = ["netdsl data proposals", root, "--split", split] + (["--ann", ann] if ann != "instances" else [])
    default = request()
    for key, flag in (("strategies", "--strategies"), ("max_boxes", "--max-boxes"), ("seed", "--seed")):
        if want is not None and want[key] != default[key]:
            words += [flag, ",".join(want[key]) if key == "strategies" else str(want[key])]
    return " ".join(shlex.quote(w) if w != words[0] else w for w in words)


def _checked(a: dict, path: str, again: str) -> Proposals:
    """The Proposals of a file's arrays, every field checked."""
    def bad(why):
        raise NetdslError(f"{path} is not a netdsl proposals file or is damaged: {why}",
                          hint=f"make it again: {again[0].lower()}{again[1:]}")

    def text(name):
        v = a.get(name)
        if v is None or v.dtype.kind != "U" or v.shape != ():
            bad(f"'{name}' is missing or not text")
        return str(v)

    if text("format") != FORMAT:
        bad(f"its format is '{text('format')[:40]}'")
    v = a.get("version")
    if v is None or v.shape != () or v.dtype.kind not in "iu" or int(v) != VERSION:
        bad(f"version {v if v is None else v.tolist()}, this netdsl reads version {VERSION}")
    try:
        params = json.loads(text("params"))
    except ValueError:
        bad("'params' is not JSON")
    if not isinstance(params, dict) or params.get("method") != METHOD:
        bad("'params' does not describe a selective search")
    text("digest")
    ids, offsets, boxes = a.get("image_ids"), a.get("offsets"), a.get("boxes")
    if ids is None or ids.dtype != np.int64 or ids.ndim != 1:
        bad("'image_ids' must be int64 [N]")
    if offsets is None or offsets.dtype != np.int64 or offsets.shape != (len(ids) + 1,):
        bad(f"'offsets' must be int64 [{len(ids) + 1}]")
    if boxes is None or boxes.dtype != np.float32 or boxes.ndim != 2 or boxes.shape[1] != 4:
        bad("'boxes' must be float32 [B, 4]")
    if offsets[0] != 0 or offsets[-1] != len(boxes) or (np.diff(offsets) < 0).any():
        bad("'offsets' do not split 'boxes' into images")
    if not np.isfinite(boxes).all() or (boxes[:, :2] < 0).any() or (boxes[:, 2:] <= boxes[:, :2]).any():
        bad("a box is not finite, starts before 0, or is empty")
    return Proposals(path, params, ids, offsets, boxes)


def recall(p: Proposals, split: Split, iou: float = 0.5, top: int | None = None) -> tuple[float, int]:
    """(fraction of the split's ground-truth boxes that some proposal among each image's
    `top` best overlaps by IoU >= iou, number of ground-truth boxes)."""
    hit = total = 0
    for info in split.images:
        g = split.gt[info["id"]]
        b = p.boxes_of(info["id"])[:top]
        total += len(g)
        if len(g) and len(b):
            hit += int((box_iou(g, b.astype(np.float64)).max(1) >= iou).sum())
    return (hit / total if total else float("nan")), total


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[A, B] IoU of x1, y1, x2, y2 boxes (torchvision's box_iou); 0 where both are empty."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), 2)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])    # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
