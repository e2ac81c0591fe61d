"""`netdsl data shapes-captions OUT`: generated image captioning data in the COCO captions format.

Each image holds one or two coloured shapes; its captions come from a small grammar:

    one shape    "a red circle"
    two shapes   "a red circle left of a blue square"  and  "a blue square right of a red circle"

(relations: left of / right of / above / below; every converse is a second reference).
Two shapes never touch and are separated along the relation's axis: the gap between
their circumscribed circles along that axis is at least GAP pixels and the offset along
the other axis at most half the offset along it, so each caption is true at a glance.
No image holds two shapes of the same colour and kind, so each object word names one
object.

With order="reading" a two-shape image has one caption, the shapes named in reading
order (the left one first, or the upper one when they are stacked), so its relation is
"left of" or "above":

    two shapes   "a red circle left of a blue square"

That is the both-orders set with the converse reference dropped (the same images and
instances): a caption whose first object is decided by the image, where the both-orders
set leaves it to chance (see ORDERS).

Written beside the captions (docs/data.md has the layout): the instances of every shape
(boxes and polygon masks, COCO instances format), and in each caption annotation
`grounding`: [word index, instance annotation id] for the colour and kind words, so an
attention map over a word can be checked against that object's box.

Image i is drawn from its own generator seeded by (seed, SET_INDEX, i): the same seed
gives the same bytes. The set is built in a temporary directory and renamed into place.
"""
from __future__ import annotations

import colorsys
import math
import os
import shutil

import numpy as np

from ..errors import NetdslError
from . import draw
from .shapes import SHAPE_CATEGORIES, _coco_file, _move_into_place, _write_json, annotation, start_set
from .shapes import check_target as _check_target

GENERATOR = "netdsl data shapes-captions"
SET_INDEX = 10          # seeds differ from `netdsl data shapes`'s sets (0, 1, 2)
COLOURS = {"red": 0.0, "yellow": 55.0, "green": 120.0, "blue": 220.0, "purple": 285.0}   # name -> hue, degrees
RELATIONS = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
RADIUS = (0.12, 0.2)    # circumradius as a fraction of the image side
GAP = 2.0               # pixels between two shapes' circles along the relation's axis
TWO = 0.7               # share of images with two shapes
# How a two-shape image's shapes are named. "both" (the default, as COCO has several
# references per image in varied order): both phrasings. "reading": one, the left shape
# first or, stacked, the upper, so the first object named follows from the pixels.
ORDERS = ("both", "reading")


def check_target(out: str) -> None:
    _check_target(out, GENERATOR)


# ---------------------------------------------------------------- one image

def _colour(rng: np.random.Generator, name: str) -> np.ndarray:
    """The named colour with a little jitter in hue, saturation and value."""
    hue = (COLOURS[name] + rng.uniform(-6, 6)) % 360 / 360
    return np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.75, 1.0), rng.uniform(0.8, 1.0)))


def _relation(a, b) -> str | None:
    """How shape a lies relative to shape b ((cx, cy, r) each), or None when the
    placement is not clear enough to caption."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    need = a[2] + b[2] + GAP
    if abs(dx) >= need and abs(dy) <= 0.5 * abs(dx):
        return "left of" if dx < 0 else "right of"
    if abs(dy) >= need and abs(dx) <= 0.5 * abs(dy):
        return "above" if dy < 0 else "below"
    return None


def _place(rng: np.random.Generator, size: int, count: int) -> list[tuple[float, float, float]]:
    """Centres and circumradii of `count` shapes inside the image (two: in a relation
    drawn uniformly, by rejection)."""
    want = rng.choice(list(RELATIONS)) if count == 2 else None
    while True:
        out = []
        for _ in range(count):
            r = rng.uniform(*RADIUS) * size
            cx, cy = rng.uniform(r + 1, size - r - 1, 2)
            out.append((float(cx), float(cy), float(r)))
        if count == 1 or _relation(out[0], out[1]) == want:
            return out


def caption_scene(rng: np.random.Generator, size: int):
    """(image uint8[H, W, 3], objects): objects are (colour name, category id, polygon,
    mask), in the order drawn."""
    count = 2 if rng.random() < TWO else 1
    kinds = []
    while len(kinds) < count:
        k = (str(rng.choice(list(COLOURS))), int(rng.integers(len(draw.SHAPES))) + 1)
        if k not in kinds:
            kinds.append(k)
    img = draw.background(rng, size, size)
    objects = []
    for (colour, cat), (cx, cy, r) in zip(kinds, _place(rng, size, count)):
        pts = draw.outline(draw.SHAPES[cat - 1], cx, cy, r, rng.uniform(0, 2 * math.pi))
        poly = [round(float(v), 2) for v in pts.ravel()]
        mask = draw.polygon_mask(poly, size, size)
        draw.paint(img, mask, _colour(rng, colour), rng)
        objects.append((colour, cat, poly, mask, (cx, cy, r)))
    return draw.finish(img, rng), objects


def captions_of(objects, order: str = "both") -> list[tuple[str, list[tuple[int, int]]]]:
    """[(caption, [(word index, object index)])]: one caption for one shape; for two, the
    two phrasings of the relation (order "both": the first shape drawn named first, then
    the other) or the one naming them in reading order ("reading": left of / above)."""
    def phrase(i):
        colour, cat = objects[i][0], objects[i][1]
        return f"a {colour} {draw.SHAPES[cat - 1]}"
    if len(objects) == 1:
        return [(phrase(0), [(1, 0), (2, 0)])]
    pairs = ((0, 1), (1, 0))
    if order == "reading":
        pairs = [p for p in pairs if _relation(objects[p[0]][4], objects[p[1]][4]) in ("left of", "above")]
    out = []
    for a, b in pairs:
        rel = _relation(objects[a][4], objects[b][4])
        words = len(rel.split())
        out.append((f"{phrase(a)} {rel} {phrase(b)}", [(1, a), (2, a), (4 + words, b), (5 + words, b)]))
    return out


def check_order(order: str) -> None:
    if order not in ORDERS:
        raise NetdslError(f"--order must be one of {', '.join(ORDERS)}, got '{order}'",
                          hint="both: each two-shape image captioned both ways; reading: the left (or upper) "
                               "shape named first")


# ---------------------------------------------------------------- the whole set

def generate(out: str, images: int = 1000, size: int = 64, seed: int = 0, val_fraction: float = 0.2,
             progress=None, order: str = "both") -> dict:
    """Write the data set to `out` (created; a set this command wrote before is
    replaced, anything else there is refused); progress(1) after every image.
    `order`: how two shapes are named (ORDERS). Returns the manifest written to
    OUT/dataset.json."""
    check_order(order)
    n_train, n_val, out, tmp = start_set(out, images, size, seed, val_fraction, check_target)
    try:
        manifest = {"generator": GENERATOR, "version": 1, "images": images, "size": size, "seed": seed,
                    "val_fraction": val_fraction, "annotations": {}, "instances": {},
                    "colours": list(COLOURS), "categories": list(draw.SHAPES),
                    "relations": list(RELATIONS) if order == "both" else ["left of", "above"], "order": order}
        for split, first, count in (("train", 0, n_train), ("val", n_train, n_val)):
            caps = {"info": {"description": "netdsl synthetic shapes with captions", "version": "1",
                             "contributor": GENERATOR}, "licenses": [], "images": [], "annotations": []}
            inst = _coco_file("netdsl synthetic shapes with captions: the shapes' instances", SHAPE_CATEGORIES)
            os.makedirs(os.path.join(tmp, "images", split))
            for k in range(count):
                rng = np.random.default_rng([seed, SET_INDEX, first + k])
                _write_example(tmp, split, k + 1, rng, size, caps, inst, order)
                if progress:
                    progress(1)
            manifest["annotations"][split] = f"annotations/captions_{split}.json"
            manifest["instances"][split] = f"annotations/instances_{split}.json"
            _write_json(os.path.join(tmp, manifest["annotations"][split]), caps)
            _write_json(os.path.join(tmp, manifest["instances"][split]), inst)
        write_preview(tmp, manifest)
        _write_json(os.path.join(tmp, "dataset.json"), manifest, indent=1)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _write_example(root, split, image_id, rng, size, caps, inst, order):
    from PIL import Image
    img, objects = caption_scene(rng, size)
    file_name = f"{image_id:06d}.png"
    record = {"id": image_id, "file_name": file_name, "width": size, "height": size}
    caps["images"].append(record)
    inst["images"].append(dict(record))
    ids = []
    for colour, cat, poly, mask, _ in objects:
        ids.append(len(inst["annotations"]) + 1)
        a = annotation(ids[-1], image_id, cat, mask, poly)
        a["colour"] = colour
        inst["annotations"].append(a)
    for text, grounding in captions_of(objects, order):
        caps["annotations"].append({"id": len(caps["annotations"]) + 1, "image_id": image_id, "caption": text,
                                    "grounding": [[w, ids[o]] for w, o in grounding]})
    Image.fromarray(img, "RGB").save(os.path.join(root, "images", split, file_name))


def write_preview(root: str, manifest: dict, count: int = 8) -> None:
    """root/preview/captions.png: the first training images with their boxes and captions."""
    from PIL import Image, ImageDraw

    from . import cocofile
    from .captions import load_captions_file
    from .preview import grid, overlay
    os.makedirs(os.path.join(root, "preview"), exist_ok=True)
    inst = cocofile.load(os.path.join(root, manifest["instances"]["train"]))
    caps = load_captions_file(os.path.join(root, manifest["annotations"]["train"]))
    scale = max(1, -(-192 // manifest["size"]))
    tiles = []
    for image_id in sorted(inst.imgs)[:count]:
        with Image.open(os.path.join(root, "images", "train", inst.imgs[image_id]["file_name"])) as f:
            img = np.asarray(f.convert("RGB"))
        anns = inst.imgToAnns[image_id]     # boxes only: a tinted mask would change the colour named
        pic = overlay(img, boxes=[(x, y, x + w, y + h) for x, y, w, h in (a["bbox"] for a in anns)],
                      labels=[a["category_id"] for a in anns], names=manifest["categories"], scale=scale)
        lines = [a["caption"] for a in caps.imgToAnns[image_id]]
        tile = Image.new("RGB", (max(pic.size[0], 260), pic.size[1] + 30), (32, 32, 32))     # two lines
        tile.paste(pic, (0, 0))
        d = ImageDraw.Draw(tile)
        for i, line in enumerate(lines):
            d.text((2, pic.size[1] + 1 + 14 * i), line, fill=(240, 240, 240))
        tiles.append(tile)
    grid(tiles, columns=4, legend=manifest["categories"]).save(os.path.join(root, "preview", "captions.png"))
