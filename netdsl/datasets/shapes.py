"""`netdsl data shapes OUT`: a synthetic data set written as a user's own data would be.

Three COCO-format sets, each with train and val splits (docs/data.md has the layout):
  OUT/           several coloured shapes per image, overlapping, on textured backgrounds:
                 instances (boxes, masks) and per-pixel semantic label PNGs
  OUT/single/    one shape per image: classification + localization
  OUT/pose/      one stick figure per image with 14 keypoints (person_keypoints_*.json)

Image i of a set is drawn from its own generator seeded by (seed, set, i), so the same
seed gives the same bytes. The set is built in a temporary directory beside OUT and
renamed into place when complete.
"""
from __future__ import annotations

import json
import math
import os
import secrets
import shutil

import numpy as np

from ..errors import NetdslError
from . import draw

GENERATOR = "netdsl data shapes"
LIMITS = {"images": (2, 1_000_000), "size": (32, 1024)}
MIN_VISIBLE = 0.4       # every shape keeps at least this fraction of its area in view


def check_options(images: int, size: int, val_fraction: float) -> tuple[int, int]:
    """(train count, val count), or a NetdslError naming the bad option."""
    for name, v in (("images", images), ("size", size)):
        lo, hi = LIMITS[name]
        if not isinstance(v, int) or not lo <= v <= hi:
            raise NetdslError(f"--{name} must be an integer from {lo} to {hi:,}, got {v}")
    if not (isinstance(val_fraction, (int, float)) and 0 < val_fraction < 1):
        raise NetdslError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    val = min(max(1, round(images * val_fraction)), images - 1)
    return images - val, val


# ---------------------------------------------------------------- one image of each set

def shapes_scene(rng: np.random.Generator, size: int):
    """(image uint8[H, W, 3], label map uint8[H, W], objects): 1 to 4 shapes drawn in
    order, each later one over the earlier ones. An object is (category id, polygon,
    visible mask); the polygon is None when part of the shape is hidden."""
    count = int(rng.integers(1, 5))
    placed: list[tuple[int, list, np.ndarray]] = []
    for _ in range(count):
        for _attempt in range(30):
            cat, poly, full = _random_shape(rng, size, 0.12, 0.24)
            # a new shape may hide part of an earlier one, never most of it
            if all((m & ~full).sum() >= MIN_VISIBLE * m.sum() for _, _, m in _visible(placed)):
                placed.append((cat, poly, full))
                break
    img = draw.background(rng, size, size)
    label = np.zeros((size, size), np.uint8)
    for cat, _, full in placed:
        draw.paint(img, full, draw.shape_colour(rng), rng)
        label[full] = cat
    objects = [(cat, poly if vis.sum() == full.sum() else None, vis)
               for (cat, poly, full), (_, _, vis) in zip(placed, _visible(placed))]
    return draw.finish(img, rng), label, objects


def _visible(placed):
    """(category, polygon, the part of each shape no later shape covers)."""
    out, above = [], None
    for cat, poly, full in reversed(placed):
        out.append((cat, poly, full if above is None else full & ~above))
        above = full if above is None else above | full
    return out[::-1]


def _random_shape(rng, size, rmin, rmax):
    cat = int(rng.integers(len(draw.SHAPES))) + 1
    r = rng.uniform(rmin, rmax) * size
    cx, cy = rng.uniform(r + 1, size - r - 1, 2)
    pts = draw.outline(draw.SHAPES[cat - 1], cx, cy, r, rng.uniform(0, 2 * math.pi))
    poly = [round(float(v), 2) for v in pts.ravel()]
    return cat, poly, draw.polygon_mask(poly, size, size)


def single_scene(rng: np.random.Generator, size: int):
    """One larger shape: (image, [(category, polygon, mask)])."""
    cat, poly, mask = _random_shape(rng, size, 0.15, 0.33)
    img = draw.background(rng, size, size)
    draw.paint(img, mask, draw.shape_colour(rng), rng)
    return draw.finish(img, rng), [(cat, poly, mask)]


def pose_scene(rng: np.random.Generator, size: int):
    """One stick figure: (image, joints [14, 2], figure mask)."""
    joints = draw.pose(rng, size)
    mask = draw.figure(joints, size)
    img = draw.background(rng, size, size)
    draw.paint(img, mask, draw.shape_colour(rng), rng)
    return draw.finish(img, rng), joints, mask


# ---------------------------------------------------------------- COCO records

def annotation(ann_id: int, image_id: int, cat: int, mask: np.ndarray, poly: list | None) -> dict:
    """A COCO instance: polygon when the whole shape shows, uncompressed RLE of the
    visible pixels when part is hidden; bbox and area of the visible pixels."""
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return {"id": ann_id, "image_id": image_id, "category_id": cat,
            "segmentation": [poly] if poly is not None else draw.rle_counts(mask),
            "area": int(mask.sum()), "bbox": [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0],
            "iscrowd": 0}


def _coco_file(description: str, categories: list[dict]) -> dict:
    return {"info": {"description": description, "version": "1", "contributor": GENERATOR},
            "licenses": [], "images": [], "annotations": [], "categories": categories}


SHAPE_CATEGORIES = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(draw.SHAPES)]
PERSON = {"id": 1, "name": "person", "supercategory": "person", "keypoints": list(draw.JOINTS),
          "skeleton": [list(p) for p in draw.SKELETON]}


# ---------------------------------------------------------------- the whole set

SETS = (  # name, subdirectory, annotation file stem, description
    ("shapes", "", "instances", "netdsl synthetic shapes: several per image"),
    ("single", "single", "instances", "netdsl synthetic shapes: one per image"),
    ("pose", "pose", "person_keypoints", "netdsl synthetic stick figures, 14 keypoints"),
)


def generate(out: str, images: int = 300, size: int = 64, seed: int = 0, val_fraction: float = 0.2,
             progress=None) -> dict:
    """Write the data set to `out` (created; a set this command wrote before is
    replaced, anything else there is refused). `images` per set; progress(n) is called
    after every n images. Returns the manifest written to OUT/dataset.json."""
    n_train, n_val, out, tmp = start_set(out, images, size, seed, val_fraction, check_target)
    try:
        manifest = {"generator": GENERATOR, "version": 1, "images": images, "size": size, "seed": seed,
                    "val_fraction": val_fraction, "sets": {}}
        for set_index, (name, sub, stem, description) in enumerate(SETS):
            root = os.path.join(tmp, sub)
            cats = [PERSON] if name == "pose" else SHAPE_CATEGORIES
            files = {}
            for split, first, count in (("train", 0, n_train), ("val", n_train, n_val)):
                coco = _coco_file(description, cats)
                _mkdirs(root, split, labels=name == "shapes")
                for k in range(count):
                    rng = np.random.default_rng([seed, set_index, first + k])
                    _write_example(name, root, split, k + 1, rng, size, coco)
                    if progress:
                        progress(1)
                files[split] = os.path.join(sub, "annotations", f"{stem}_{split}.json")
                _write_json(os.path.join(tmp, files[split]), coco)
            manifest["sets"][name] = {"root": sub or ".", "annotations": files,
                                      "categories": [c["name"] for c in cats]}
        from .preview import write_previews
        write_previews(tmp, manifest)
        _write_json(os.path.join(tmp, "dataset.json"), manifest, indent=1)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _write_example(name, root, split, image_id, rng, size, coco):
    from PIL import Image
    file_name = f"{image_id:06d}.png"
    coco["images"].append({"id": image_id, "file_name": file_name, "width": size, "height": size})
    anns = coco["annotations"]
    if name == "pose":
        img, joints, mask = pose_scene(rng, size)
        a = annotation(len(anns) + 1, image_id, 1, mask, None)
        a["keypoints"] = [v for x, y in joints.tolist() for v in (x, y, 2)]
        a["num_keypoints"] = len(joints)
        anns.append(a)
    else:
        if name == "shapes":
            img, label, objects = shapes_scene(rng, size)
            Image.fromarray(label, "L").save(os.path.join(root, "labels", split, file_name))
        else:
            img, objects = single_scene(rng, size)
        for cat, poly, mask in objects:
            anns.append(annotation(len(anns) + 1, image_id, cat, mask, poly))
    Image.fromarray(img, "RGB").save(os.path.join(root, "images", split, file_name))


def _mkdirs(root, split, labels):
    for d in ("images", "annotations") + (("labels",) if labels else ()):
        os.makedirs(os.path.join(root, d, split) if d != "annotations" else os.path.join(root, d), exist_ok=True)


def _write_json(path, obj, indent=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, separators=None if indent else (",", ":"))
        f.write("\n")


def start_set(out, images: int, size: int, seed: int, val_fraction: float, check) -> tuple[int, int, str, str]:
    """What every generator does before it draws: its options checked, `check(out)` (the
    target is free or its own), and a fresh temporary directory beside `out` to write into
    (moved into place by _move_into_place once complete): (n_train, n_val, out, tmp)."""
    n_train, n_val = check_options(images, size, val_fraction)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise NetdslError(f"--seed must be 0 or more, got {seed}")
    out = os.path.abspath(os.path.expanduser(os.fspath(out)))
    check(out)
    tmp = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        os.makedirs(tmp)
    except OSError as e:
        raise NetdslError(f"cannot create {out}: {e.strerror}") from None
    return n_train, n_val, out, tmp


def check_target(out: str, generator: str = GENERATOR) -> None:
    """A NetdslError unless `out` can be created, is empty, or holds a set `generator` wrote."""
    out = os.path.abspath(os.path.expanduser(os.fspath(out)))
    if not os.path.exists(out):
        parent = os.path.dirname(out)
        while not os.path.exists(parent):       # missing directories above are made (data/shapes)
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise NetdslError(f"cannot create {out}: {parent} is not a directory")
        return
    if not os.path.isdir(out):
        raise NetdslError(f"{out} exists and is not a directory")
    if os.listdir(out) and not _ours(out, generator):
        raise NetdslError(f"{out} is not empty and was not written by `{generator}`",
                          hint="give a new or empty directory; a set this command wrote is replaced")


def _ours(out: str, generator: str) -> bool:
    try:
        with open(os.path.join(out, "dataset.json"), encoding="utf-8") as f:
            return json.load(f).get("generator") == generator
    except (OSError, ValueError, AttributeError):
        return False


def _move_into_place(tmp: str, out: str) -> None:
    """Rename the finished set over `out`; an old set is moved aside first and removed after."""
    old = None
    if os.path.exists(out):
        old = tmp[:-4] + ".old"
        os.replace(out, old)
    os.replace(tmp, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)
