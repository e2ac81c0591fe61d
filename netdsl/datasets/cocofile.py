"""Reading a COCO annotation file into pycocotools' COCO index, with the file checked first.

pycocotools' `COCO(path)` is json.load followed by createIndex(); on a malformed file it
fails with a KeyError or a TypeError deep inside. `load` does the same two steps, with
the fields netdsl and COCOeval read checked in between, so a bad file is a NetdslError
naming the file, the record and the field.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os

from ..errors import NetdslError

# Larger images are refused: the masks of one would take gigabytes (Pillow, too, refuses
# images past about 179 million pixels as a likely decompression bomb).
MAX_PIXELS = 1 << 28

def read_json(path: str, what: str):
    """The parsed JSON at path; a missing, unreadable or non-JSON file is a NetdslError."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except FileNotFoundError:
        raise NetdslError(f"{what} {path} not found") from None
    except IsADirectoryError:
        raise NetdslError(f"{what} {path} is a directory, not a JSON file") from None
    except UnicodeDecodeError:
        raise NetdslError(f"{what} {path} is not JSON: not UTF-8 text") from None
    except OSError as e:
        raise NetdslError(f"cannot read {what} {path}: {e.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise NetdslError(f"{what} {path} is not JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise NetdslError(f"{what} {path} is not JSON netdsl can read: nested too deeply") from None


def load(path: str, what: str = "COCO annotation file"):
    """pycocotools.coco.COCO of the checked file."""
    from pycocotools.coco import COCO
    d = read_json(path, what)
    check(d, path)
    coco = COCO()
    coco.dataset = d
    with contextlib.redirect_stdout(io.StringIO()):     # createIndex prints progress
        coco.createIndex()
    return coco


def _show(v, limit: int = 60) -> str:
    s = json.dumps(v)
    return s if len(s) <= limit else s[:limit] + "..."


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    """A finite number numpy reads as one (an int past 2**53 would become an object array)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and abs(v) < 2 ** 53


def check(d, path: str) -> None:
    """The fields a reader or COCOeval relies on, in the types the COCO format gives them."""
    def bad(msg, hint=None):
        raise NetdslError(f"{path} is not a COCO annotation file: {msg}", hint=hint)

    if not isinstance(d, dict):
        bad(f"the top level is {type(d).__name__ if d is not None else 'null'}, expected an object",
            hint="a COCO file is an object with 'images', 'annotations' and 'categories' lists")
    for key in ("images", "annotations", "categories"):
        if key not in d:
            bad(f"it has no '{key}' list", hint="a COCO file is an object with 'images', 'annotations' "
                                                "and 'categories' lists")
        if not isinstance(d[key], list):
            bad(f"'{key}' is {type(d[key]).__name__}, expected a list")
    if not d["categories"]:
        bad("'categories' is empty")
    cats = {}
    for i, c in enumerate(d["categories"]):
        where = f"categories[{i}]"
        if not isinstance(c, dict) or not _int(c.get("id")) or not isinstance(c.get("name"), str):
            bad(f"{where} needs an integer 'id' and a string 'name', got {_show(c)}")
        if c["id"] in cats:
            bad(f"{where}: category id {c['id']} appears twice")
        kp = c.get("keypoints")
        if kp is not None and (not isinstance(kp, list) or not all(isinstance(n, str) for n in kp)):
            bad(f"{where} ('{c['name']}'): 'keypoints' must be a list of joint names, got {_show(kp)}")
        sk = c.get("skeleton")
        if sk is not None:
            k = len(kp or [])
            if not isinstance(sk, list) or not all(isinstance(p, list) and len(p) == 2 and all(
                    _int(j) and 1 <= j <= k for j in p) for p in sk):
                bad(f"{where} ('{c['name']}'): 'skeleton' must be pairs of 1-based joint numbers up to {k}, "
                    f"got {_show(sk)}")
        cats[c["id"]] = len(kp or [])
    images = check_images(d["images"], bad)
    seen = set()
    for i, a in enumerate(d["annotations"]):
        _check_annotation(a, f"annotations[{i}]", images, cats, seen, bad)


def check_images(records: list, bad) -> dict:
    """image id -> (height, width) of a file's 'images' list; bad(message) on a bad record
    (shared with the captions files, captions.py)."""
    images = {}
    for i, im in enumerate(records):
        where = f"images[{i}]"
        if not isinstance(im, dict) or not _int(im.get("id")):
            bad(f"{where} needs an integer 'id', got {_show(im)}")
        if im["id"] in images:
            bad(f"{where}: image id {im['id']} appears twice")
        fn = im.get("file_name")
        if not isinstance(fn, str) or not fn or os.path.isabs(fn):
            bad(f"{where} (id {im['id']}): 'file_name' must be a path relative to the image directory, "
                f"got {_show(fn)}")
        for k in ("width", "height"):
            if not _int(im.get(k)) or im[k] < 1:
                bad(f"{where} (id {im['id']}): '{k}' must be a positive integer, got {_show(im.get(k))}")
        if im["width"] * im["height"] > MAX_PIXELS:
            bad(f"{where} (id {im['id']}): {im['width']} x {im['height']} pixels is more than netdsl reads "
                f"({MAX_PIXELS:,})")
        images[im["id"]] = (im["height"], im["width"])
    return images


def _check_annotation(a, where, images, cats, seen, bad):
    if not isinstance(a, dict) or not _int(a.get("id")):
        bad(f"{where} needs an integer 'id', got {_show(a)}")
    where = f"{where} (id {a['id']})"
    if a["id"] in seen:
        bad(f"{where}: annotation id {a['id']} appears twice")
    seen.add(a["id"])
    if not _int(a.get("image_id")) or a["image_id"] not in images:
        bad(f"{where}: image_id {_show(a.get('image_id'))} is not an image of the file")
    if not _int(a.get("category_id")) or a["category_id"] not in cats:
        bad(f"{where}: category_id {_show(a.get('category_id'))} is not a category of the file")
    box = a.get("bbox")
    if not (isinstance(box, list) and len(box) == 4 and all(map(_num, box)) and box[2] >= 0 and box[3] >= 0):
        bad(f"{where}: 'bbox' must be [x, y, width, height] with width, height >= 0, got {_show(box)}")
    if not _num(a.get("area")) or a["area"] < 0:
        bad(f"{where}: 'area' must be a number >= 0, got {_show(a.get('area'))}")
    if a.get("iscrowd", 0) not in (0, 1) or isinstance(a.get("iscrowd"), float):
        bad(f"{where}: 'iscrowd' must be 0 or 1, got {_show(a.get('iscrowd'))}")
    if "segmentation" in a:
        _check_segmentation(a["segmentation"], where, images[a["image_id"]], bad)
    if "keypoints" in a:
        k = cats[a["category_id"]]
        kp = a["keypoints"]
        if not k:
            bad(f"{where} has keypoints but its category {a['category_id']} names none")
        if not (isinstance(kp, list) and len(kp) == 3 * k and all(map(_num, kp))
                and all(v in (0, 1, 2) for v in kp[2::3])):
            bad(f"{where}: 'keypoints' must be {3 * k} numbers, x, y and visibility 0/1/2 for each of the "
                f"category's {k} joints, got {_show(kp)}")


def _check_segmentation(s, where, hw, bad):
    if isinstance(s, list):
        if not s:
            bad(f"{where}: 'segmentation' is an empty list of polygons")
        h, w = hw
        for p in s:
            if not (isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and all(map(_num, p))):
                bad(f"{where}: a polygon of 'segmentation' must be x, y pairs of at least 3 points, got {_show(p)}")
            # pycocotools rasterises the outline at 5x; far-off points would make it huge
            if not all(-w <= x <= 2 * w for x in p[0::2]) or not all(-h <= y <= 2 * h for y in p[1::2]):
                bad(f"{where}: a polygon of 'segmentation' reaches far outside the {w} x {h} image: {_show(p)}")
        return
    if not isinstance(s, dict) or "counts" not in s or "size" not in s:
        bad(f"{where}: 'segmentation' must be a list of polygons or an RLE object with 'size' and 'counts', "
            f"got {_show(s)}")
    if s["size"] != list(hw):
        bad(f"{where}: the RLE's size {_show(s['size'])} is not the image's [height, width] {list(hw)}")
    c = s["counts"]
    if isinstance(c, list):
        if not all(_int(v) and v >= 0 for v in c) or sum(c) != hw[0] * hw[1]:
            bad(f"{where}: the RLE's counts must be non-negative run lengths adding up to "
                f"{hw[0]} x {hw[1]} = {hw[0] * hw[1]} pixels")
    elif not isinstance(c, str) or not c.isascii():
        bad(f"{where}: the RLE's counts must be a list of run lengths or a compressed string")
    else:
        _check_compressed(c, where, hw, bad)


def _check_compressed(counts: str, where, hw, bad):
    if not rle_fits(counts, hw):
        bad(f"{where}: the compressed RLE counts do not describe a {hw[0]} x {hw[1]} mask")


def rle_fits(counts: str, hw) -> bool:
    """Whether a compressed RLE string's runs cover an h x w mask exactly (pycocotools'
    decoder writes past the mask for a longer one)."""
    return _compressed_total(counts) == hw[0] * hw[1]


def _compressed_total(s: str) -> int:
    """Sum of the run lengths in a compressed COCO RLE string (pycocotools' rleFrString)."""
    total, runs, i = 0, [], 0
    while i < len(s):
        x, k, more = 0, 0, True
        while more:
            if i >= len(s):
                return -1
            c = ord(s[i]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            i += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
        if x < 0:
            return -1
        total += x
    return total
