"""Rasterising the synthetic data: shape outlines, textured backgrounds, stick figures.

Shapes are polygons (a circle is a many-sided one) rasterised by pycocotools' own
polygon rasteriser, the one every COCO reader uses to turn a `segmentation` polygon
into a mask, so the polygon written to the annotation file decodes to exactly the
pixels that were painted. Stick figures are drawn with Pillow; their masks are the
pixels drawn, stored as RLE.

Coordinates are continuous, as in COCO: pixel (row i, column j) covers [j, j+1) x [i, i+1).
"""
from __future__ import annotations

import colorsys
import math

import numpy as np

SHAPES = ("circle", "square", "triangle", "star")   # category ids 1.. in this order

# The pose example's 14 joints, in CrowdPose's order (a 14-joint COCO-format data set);
# "left" is the figure's own left, on the image's right for a figure facing the viewer.
JOINTS = ("left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
          "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle", "head", "neck")
# joint pairs drawn as limbs, 1-based as COCO's `skeleton`
SKELETON = ((13, 14), (14, 1), (14, 2), (1, 3), (3, 5), (2, 4), (4, 6), (1, 7), (2, 8), (7, 8),
            (7, 9), (9, 11), (8, 10), (10, 12))


def outline(kind: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """The shape's vertices [V, 2] (x, y): circumradius r about (cx, cy), turned by angle."""
    if kind == "circle":
        n = max(16, int(2 * math.pi * r / 1.5))     # edges short enough to look round
        t = np.arange(n) * (2 * math.pi / n)
        radii = np.full(n, r)
    elif kind == "square":
        t = np.arange(4) * (math.pi / 2) + math.pi / 4 + angle
        radii = np.full(4, r)
    elif kind == "triangle":
        t = np.arange(3) * (2 * math.pi / 3) - math.pi / 2 + angle
        radii = np.full(3, r)
    elif kind == "star":
        t = np.arange(10) * (math.pi / 5) - math.pi / 2 + angle
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
    else:
        raise ValueError(kind)
    return np.stack([cx + radii * np.cos(t), cy + radii * np.sin(t)], 1)


def polygon_mask(poly: list[float], h: int, w: int) -> np.ndarray:
    """bool[h, w]: pycocotools' rasterisation of one flat [x0, y0, x1, y1, ...] polygon."""
    from pycocotools import mask as cmask
    return cmask.decode(cmask.merge(cmask.frPyObjects([poly], h, w))).astype(bool)


def rle_counts(mask: np.ndarray) -> dict:
    """Uncompressed COCO RLE of a bool mask: run lengths in column-major order, the
    first run counting zeros (COCO's own format for crowd regions)."""
    flat = mask.ravel(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """float[h, w, 3] in [0, 1]: a muted low-frequency colour field with faint stripes."""
    from PIL import Image
    g = max(2, min(h, w) // 16)
    grid = rng.random((g, g, 3)) * 0.5 + 0.25
    grey = grid.mean(2, keepdims=True)
    grid = grey + (grid - grey) * 0.5                   # desaturated, so shapes stand out
    field = np.stack([np.asarray(Image.fromarray(grid[:, :, c].astype(np.float32), "F")
                                 .resize((w, h), Image.BILINEAR)) for c in range(3)], 2)
    theta, period = rng.random() * math.pi, rng.uniform(4, 12)
    yy, xx = np.mgrid[0:h, 0:w]
    stripes = np.sin((xx * math.cos(theta) + yy * math.sin(theta)) * (2 * math.pi / period))
    return field + 0.06 * stripes[:, :, None]


def shape_colour(rng: np.random.Generator) -> np.ndarray:
    """A saturated colour of random hue."""
    return np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.65, 1.0), rng.uniform(0.6, 1.0)))


def paint(img: np.ndarray, mask: np.ndarray, colour: np.ndarray, rng: np.random.Generator) -> None:
    """Fill mask with colour, lightly shaded along a random direction."""
    h, w = mask.shape
    yy, xx = np.mgrid[0:h, 0:w]
    a = rng.random() * 2 * math.pi
    shade = 1 + 0.15 * ((xx * math.cos(a) + yy * math.sin(a)) / max(h, w) - 0.5)
    img[mask] = np.clip(colour[None, :] * shade[mask][:, None], 0, 1)


def finish(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sensor noise, then uint8."""
    img = img + rng.normal(0, 0.03, img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


# ---------------------------------------------------------------- stick figures

def pose(rng: np.random.Generator, size: int) -> np.ndarray:
    """[14, 2] joint positions (x, y) of a random standing figure inside a size x size image."""
    j = dict.fromkeys(JOINTS)
    j["neck"] = np.zeros(2)
    head_tilt = rng.uniform(-0.3, 0.3)
    j["head"] = np.array([math.sin(head_tilt), -math.cos(head_tilt)]) * 0.12
    lean = rng.uniform(-0.25, 0.25)
    down = np.array([math.sin(lean), math.cos(lean)])
    across = np.array([down[1], -down[0]])               # the figure's left, image right
    mid_hip = down * 0.33
    for side, s in (("left", 1), ("right", -1)):
        j[f"{side}_shoulder"] = s * across * 0.11 + down * 0.03
        j[f"{side}_hip"] = mid_hip + s * across * 0.07
        # arms anywhere from hanging down to raised; legs spread below the hips
        arm = rng.uniform(-0.2, 2.6)
        fore = arm + rng.uniform(-1.2, 1.2)
        j[f"{side}_elbow"] = j[f"{side}_shoulder"] + 0.16 * _dir(lean + s * arm)
        j[f"{side}_wrist"] = j[f"{side}_elbow"] + 0.15 * _dir(lean + s * fore)
        thigh = rng.uniform(0.0, 0.5)
        shin = thigh + rng.uniform(-0.4, 0.3)
        j[f"{side}_knee"] = j[f"{side}_hip"] + 0.22 * _dir(lean + s * thigh)
        j[f"{side}_ankle"] = j[f"{side}_knee"] + 0.22 * _dir(lean + s * shin)
    pts = np.stack([j[n] for n in JOINTS])
    turn = rng.uniform(-0.25, 0.25)
    c, s_ = math.cos(turn), math.sin(turn)
    pts = pts @ np.array([[c, s_], [-s_, c]])
    # scale to the image, leaving room for the head and the line width
    height = rng.uniform(0.55, 0.85) * size
    pts = pts * height
    lo, hi = pts.min(0), pts.max(0)
    margin = 0.1 * size
    room = np.maximum(size - 2 * margin - (hi - lo), 0)
    offset = margin - lo + rng.random(2) * room
    return np.round(pts + offset, 2)


def _dir(angle: float) -> np.ndarray:
    """Unit vector: angle 0 points down (+y), positive angles swing towards +x."""
    return np.array([math.sin(angle), math.cos(angle)])


def figure(joints: np.ndarray, size: int) -> np.ndarray:
    """bool[size, size] mask of the stick figure through `joints`: a torso, limbs as
    thick lines, a round head, and each joint's own pixel (so every joint lies on the figure)."""
    from PIL import Image, ImageDraw
    width = max(2, round(0.045 * size))
    im = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(im)
    pt = [(x - 0.5, y - 0.5) for x, y in joints.tolist()]   # Pillow puts pixel centres on integers
    at = {n: pt[i] for i, n in enumerate(JOINTS)}
    d.polygon([at[n] for n in ("left_shoulder", "right_shoulder", "right_hip", "left_hip")], fill=255)
    for a, b in SKELETON:
        d.line([pt[a - 1], pt[b - 1]], fill=255, width=width)
    hx, hy = at["head"]
    hr = 0.06 * size
    d.ellipse([hx - hr, hy - hr, hx + hr, hy + hr], fill=255)
    for x, y in joints.tolist():
        d.point((math.floor(x), math.floor(y)), fill=255)
    return np.asarray(im) > 0
