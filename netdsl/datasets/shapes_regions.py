"""`netdsl data shapes-regions OUT`: generated dense captioning data in Visual Genome's format.

Each image holds one to three coloured shapes; each shape is a region described by a
phrase from a small grammar, as Visual Genome's region descriptions describe parts of
a photograph:

    "a small red circle"   "a large blue square near the top"   "a small green star near the bottom"

The size word is told by the circumradius (two ranges that do not meet), the position
by where the centre lies (top band: "near the top", bottom band: "near the bottom",
the middle: no position); shapes are placed away from the bands' borders and never touch,
so each phrase is true at a glance and told by the region alone.

Written (docs/data.md has the layout), as Visual Genome v1.2 names things:
  region_descriptions.json  [{"id": image id, "regions": [{"region_id", "image_id",
                            "phrase", "x", "y", "width", "height"}]}], boxes in integer
                            pixels (x, y the top-left corner), as VG's
  image_data.json           [{"image_id", "width", "height", "url", "coco_id", "flickr_id"}],
                            url the image file relative to OUT (images/ID.png)
  densecap_splits.json      {"train": [ids], "val": [ids], "test": []}: Johnson et al.'s
                            split file's form
  images/ID.png, preview/regions.png, dataset.json (the manifest)

Image i is drawn from its own generator seeded by (seed, SET_INDEX, i): the same seed
gives the same bytes. The set is built in a temporary directory and renamed into place.
"""
from __future__ import annotations

import math
import os
import shutil

import numpy as np

from . import draw
from .shapes import _move_into_place, _write_json, start_set
from .shapes import check_target as _check_target
from .shapes_captions import COLOURS, _colour

GENERATOR = "netdsl data shapes-regions"
SET_INDEX = 20          # seeds differ from the other generators' sets
SIZES = {"small": (0.08, 0.11), "large": (0.17, 0.22)}   # circumradius as a fraction of the side
BANDS = {"top": (0.0, 0.3), "": (0.3, 0.7), "bottom": (0.7, 1.0)}   # centre y as a fraction; "" = middle
MARGIN = 2.0            # pixels between a centre and its band's border
GAP = 2.0               # pixels between two shapes' circumscribed circles
MAX_SHAPES = 3


def check_target(out: str) -> None:
    _check_target(out, GENERATOR)


def phrase(size_word: str, colour: str, kind: str, band: str) -> str:
    return f"a {size_word} {colour} {kind}" + (f" near the {band}" if band else "")


def _place(rng: np.random.Generator, size: int, count: int):
    """[(cx, cy, r, size word, band)] for up to `count` shapes that do not touch (a shape
    that finds no room in 50 tries is left out; the first always fits)."""
    out = []
    for _ in range(count):
        for _ in range(50):
            word = str(rng.choice(list(SIZES)))
            r = rng.uniform(*SIZES[word]) * size
            band = str(rng.choice(list(BANDS)))
            lo, hi = BANDS[band]
            ylo, yhi = max(lo * size + MARGIN, r + 1), min(hi * size - MARGIN, size - r - 1)
            if ylo > yhi:
                continue
            cx, cy = rng.uniform(r + 1, size - r - 1), rng.uniform(ylo, yhi)
            if all(math.hypot(cx - x, cy - y) >= r + q + GAP for x, y, q, _, _ in out):
                out.append((float(cx), float(cy), float(r), word, band))
                break
    return out


def regions_scene(rng: np.random.Generator, size: int):
    """(image uint8[H, W, 3], regions): regions are (phrase, [x, y, width, height]) in
    integer pixels, the tight box of the painted pixels."""
    img = draw.background(rng, size, size)
    regions = []
    for cx, cy, r, word, band in _place(rng, size, int(rng.integers(1, MAX_SHAPES + 1))):
        colour, kind = str(rng.choice(list(COLOURS))), str(rng.choice(draw.SHAPES))
        pts = draw.outline(kind, cx, cy, r, rng.uniform(0, 2 * math.pi))
        mask = draw.polygon_mask([float(v) for v in pts.ravel()], size, size)
        draw.paint(img, mask, _colour(rng, colour), rng)
        ys, xs = np.nonzero(mask)
        box = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
        regions.append((phrase(word, colour, kind, band), box))
    return draw.finish(img, rng), regions


def generate(out: str, images: int = 1000, size: int = 64, seed: int = 0, val_fraction: float = 0.2,
             progress=None) -> dict:
    """Write the data set to `out` (created; a set this command wrote before is
    replaced, anything else there is refused); progress(1) after every image.
    Returns the manifest written to OUT/dataset.json."""
    from PIL import Image
    n_train, n_val, out, tmp = start_set(out, images, size, seed, val_fraction, check_target)
    try:
        os.makedirs(os.path.join(tmp, "images"))
        image_data, described, region_id = [], [], 0
        for i in range(images):
            image_id = i + 1
            img, regions = regions_scene(np.random.default_rng([seed, SET_INDEX, i]), size)
            url = f"images/{image_id}.png"
            Image.fromarray(img, "RGB").save(os.path.join(tmp, url))
            image_data.append({"image_id": image_id, "width": size, "height": size, "url": url,
                               "coco_id": None, "flickr_id": None})
            rows = []
            for text, (x, y, w, h) in regions:
                region_id += 1
                rows.append({"region_id": region_id, "image_id": image_id, "phrase": text,
                             "x": x, "y": y, "width": w, "height": h})
            described.append({"id": image_id, "regions": rows})
            if progress:
                progress(1)
        ids = [d["image_id"] for d in image_data]
        splits = {"train": ids[:n_train], "val": ids[n_train:], "test": []}
        _write_json(os.path.join(tmp, "image_data.json"), image_data)
        _write_json(os.path.join(tmp, "region_descriptions.json"), described)
        _write_json(os.path.join(tmp, "densecap_splits.json"), splits)
        manifest = {"generator": GENERATOR, "version": 1, "images": images, "size": size, "seed": seed,
                    "val_fraction": val_fraction, "regions": region_id, "colours": list(COLOURS),
                    "shapes": list(draw.SHAPES), "sizes": list(SIZES), "positions": [b for b in BANDS if b],
                    "files": ["image_data.json", "region_descriptions.json", "densecap_splits.json"]}
        write_preview(tmp, image_data, described)
        _write_json(os.path.join(tmp, "dataset.json"), manifest, indent=1)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def write_preview(root: str, image_data: list, described: list, count: int = 8) -> None:
    """root/preview/regions.png: the first images with their region boxes and phrases."""
    from PIL import Image, ImageDraw

    from .preview import colour, grid, overlay
    os.makedirs(os.path.join(root, "preview"), exist_ok=True)
    size = image_data[0]["height"]
    scale = max(1, -(-192 // size))
    tiles = []
    for info, d in list(zip(image_data, described))[:count]:
        with Image.open(os.path.join(root, info["url"])) as f:
            img = np.asarray(f.convert("RGB"))
        boxes = [(r["x"], r["y"], r["x"] + r["width"], r["y"] + r["height"]) for r in d["regions"]]
        pic = overlay(img, boxes=boxes, labels=list(range(1, len(boxes) + 1)), scale=scale)
        tile = Image.new("RGB", (max(pic.size[0], 260), pic.size[1] + 14 * MAX_SHAPES + 2), (32, 32, 32))
        tile.paste(pic, (0, 0))
        dr = ImageDraw.Draw(tile)
        for k, r in enumerate(d["regions"]):
            dr.text((2, pic.size[1] + 1 + 14 * k), r["phrase"], fill=colour(k + 1))
        tiles.append(tile)
    grid(tiles, columns=4).save(os.path.join(root, "preview", "regions.png"))
