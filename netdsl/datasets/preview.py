"""Pictures of annotations: masks, boxes with their names, skeletons; a grid with a legend.

`netdsl data shapes` draws the ground truth of the first training images of each set
from the annotation files it wrote (read back through pycocotools), so the preview
shows what a reader of those files gets.
"""
from __future__ import annotations

import os

import numpy as np

# distinct colours for classes 1, 2, ... (class 0, background, is never drawn)
PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255))
LEFT, RIGHT, CENTRE = (255, 80, 80), (80, 160, 255), (255, 255, 255)


def colour(index: int) -> tuple[int, int, int]:
    return PALETTE[(index - 1) % len(PALETTE)]


def overlay(img: np.ndarray, *, masks=(), boxes=(), labels=(), names=(), keypoints=None, joint_names=(),
            skeleton=(), scale: int = 1, alpha: float = 0.55):
    """A PIL image: `img` (uint8 [H, W, 3]) enlarged `scale` times, with each mask
    (bool [H, W]) tinted in its label's colour (`alpha` of it), each box (x1, y1, x2, y2 in image
    pixels) outlined and named, and keypoints ([K, 3]: x, y, visibility) joined by the
    1-based `skeleton` pairs, left joints red, right blue, others white."""
    from PIL import Image, ImageDraw
    base = img.astype(np.float32)
    for m, lab in zip(masks, labels):
        base[m] = (1 - alpha) * base[m] + alpha * np.array(colour(lab), np.float32)
    h, w = img.shape[:2]
    im = Image.fromarray(base.astype(np.uint8), "RGB").resize((w * scale, h * scale), Image.NEAREST)
    d = ImageDraw.Draw(im)
    for box, lab in zip(boxes, labels):
        x1, y1, x2, y2 = (float(v) * scale for v in box)
        d.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=colour(lab), width=max(1, scale // 2))
        if names:
            d.text((x1 + 2, y1 + 1), names[lab - 1], fill=colour(lab))
    if keypoints is not None:
        kp = np.asarray(keypoints, np.float64)
        pts = [((x * scale), (y * scale)) for x, y in kp[:, :2]]
        for a, b in skeleton:
            if kp[a - 1, 2] > 0 and kp[b - 1, 2] > 0:
                d.line([pts[a - 1], pts[b - 1]], fill=(255, 255, 0), width=max(1, scale // 2))
        r = max(2, scale)
        for i, (x, y) in enumerate(pts):
            if kp[i, 2] > 0:
                side = joint_names[i].split("_")[0] if i < len(joint_names) else ""
                fill = LEFT if side == "left" else RIGHT if side == "right" else CENTRE
                d.ellipse([x - r, y - r, x + r, y + r], fill=fill, outline=(0, 0, 0))
    return im


def grid(tiles, columns: int = 4, legend=()):
    """Tiles (PIL images of one size) in rows of `columns`, with a strip naming each
    class's colour under them when `legend` (class names, 1-based) is given."""
    from PIL import Image, ImageDraw
    w, h = tiles[0].size
    rows = -(-len(tiles) // columns)
    strip = 18 if legend else 0
    out = Image.new("RGB", (columns * w + (columns - 1) * 2, rows * h + (rows - 1) * 2 + strip), (32, 32, 32))
    for i, t in enumerate(tiles):
        out.paste(t, ((i % columns) * (w + 2), (i // columns) * (h + 2)))
    d = ImageDraw.Draw(out)
    x = 4
    for i, name in enumerate(legend, 1):
        y = out.size[1] - strip + 3
        d.rectangle([x, y, x + 11, y + 11], fill=colour(i))
        d.text((x + 15, y), name, fill=(240, 240, 240))
        x += 15 + int(d.textlength(name)) + 12
    return out


def annotated(coco, image_id: int, image_dir: str, scale: int):
    """The overlay of one image of a pycocotools COCO index and its annotations."""
    from PIL import Image
    info = coco.imgs[image_id]
    with Image.open(os.path.join(image_dir, info["file_name"])) as f:
        img = np.asarray(f.convert("RGB"))
    anns = coco.imgToAnns[image_id]
    cats = sorted(coco.cats)
    label = {c: i + 1 for i, c in enumerate(cats)}
    kp_cat = next((c for c in cats if coco.cats[c].get("keypoints")), None)
    if kp_cat is not None:
        a = next((a for a in anns if "keypoints" in a), None)
        c = coco.cats[kp_cat]
        return overlay(img, keypoints=None if a is None else np.reshape(a["keypoints"], (-1, 3)),
                       joint_names=c["keypoints"], skeleton=c.get("skeleton", ()), scale=scale)
    return overlay(img, masks=[coco.annToMask(a).astype(bool) for a in anns],
                   boxes=[(x, y, x + w, y + h) for x, y, w, h in (a["bbox"] for a in anns)],
                   labels=[label[a["category_id"]] for a in anns],
                   names=[coco.cats[c]["name"] for c in cats], scale=scale)


def write_previews(root: str, manifest: dict, count: int = 8) -> None:
    """root/preview/NAME.png for each set of a `netdsl data shapes` manifest."""
    from . import cocofile
    os.makedirs(os.path.join(root, "preview"), exist_ok=True)
    scale = max(1, -(-160 // manifest["size"]))
    for name, s in manifest["sets"].items():
        coco = cocofile.load(os.path.join(root, s["annotations"]["train"]))
        image_dir = os.path.join(root, s["root"], "images", "train")
        tiles = [annotated(coco, i, image_dir, scale) for i in sorted(coco.imgs)[:count]]
        legend = () if name == "pose" else s["categories"]
        grid(tiles, legend=legend).save(os.path.join(root, "preview", f"{name}.png"))
