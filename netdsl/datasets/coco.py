"""Any COCO-format data set as arrays: images, label maps, padded boxes, keypoints.

    ds = coco("data/shapes")                           # annotations/instances_{train,val}.json
    ds = coco("data/shapes/pose", ann="person_keypoints")
    ds = coco("coco", train="train2017", test="val2017", size=256)
    ds = coco("data/shapes", masks=True)               # + a mask per object (Mask R-CNN)
    ds = coco("data/shapes/pose", masks=True, keypoints=True)   # + each person's keypoints

Layout: PATH/annotations/ANN_SPLIT.json, images in PATH/images/SPLIT/ or PATH/SPLIT/
(the `file_name` of each image is relative to that directory); the `test` split of the
returned Dataset is the `val` file. Every image is resized to size x size (by default
the images' own size, when they all share one); boxes and
keypoints are scaled with it, in continuous pixel coordinates (pixel (i, j) covers
[j, j+1) x [i, i+1), COCO's convention), and label maps are resized nearest-neighbour.

Classes are the file's categories in order of id: class c (1-based; 0 is background)
is the c-th smallest category id, so COCO's ids 1..90 with gaps become 1..80. The
single-object `label` is 0-based (c - 1): there is no background class to hold.

Fields, by task (docs/data.md has the table):
  segment   image, label i64[N,H,W] (0 background), boxes f32[N,G,4], labels i64[N,G]
  detect    image, boxes, labels
  localize  image, label i64[N] (0-based class), box f32[N,4]
  pose      image, joints f32[N,K,2], visible f32[N,K], box f32[N,4]
  masks=True (segment, detect): + masks f32[N,G,H,W], each object's own mask (0/1)
  keypoints=True (segment, detect): + keypoints f32[N,G,K,3], each object's x, y, visibility
Boxes are x1, y1, x2, y2. G (the cap) is the largest object count of either split
rounded up to a multiple of 8, or `max_objects`; rows past an image's objects hold
zeros and label -1. Crowd regions (iscrowd 1) are painted into label maps but are not
boxes. Pose takes the largest person of each image; `visible` is 1 for a labelled
joint (COCO visibility 1 or 2) and 0 for an unlabelled one (whose joint is 0, 0).
Per-object masks are resized nearest-neighbour like label maps; per-object keypoints keep
COCO's visibility (0, 1, 2; an unlabelled one is 0, 0, 0, as are objects without
keypoints and padding rows). Mask R-CNN reads both (runtime/train.py asks for them when
the spec declares gt_masks or gt_keypoints): with keypoints=True and no task given, a file
whose category names keypoints (or holding one object an image) is read per object
(segment, or detect) rather than as pose (localize); and when the default `ann` files (instances_*) are absent but person_keypoints_*
are there (`netdsl data shapes`'s pose/), those are read.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import NetdslError
from ..runtime.data import Dataset
from . import cocofile

TASKS = ("segment", "detect", "localize", "pose")
CAP_STEP = 8     # an automatic cap rounds up to this, so a few more objects keep the same program


@dataclass
class CocoDataset(Dataset):
    """A Dataset with what is needed to map predictions back to the COCO files."""
    task: str = ""
    categories: list = field(default_factory=list)       # class c is categories[c - 1]
    category_ids: list = field(default_factory=list)     # its COCO id
    keypoint_names: list = field(default_factory=list)
    skeleton: list = field(default_factory=list)         # 1-based joint pairs, as in the file
    max_objects: int = 0                                  # G; 0 for localize and pose
    meta: dict = field(default_factory=dict)              # split -> {"file", "image_ids", "sizes" (h, w)}

    @property
    def num_classes(self) -> int:
        return len(self.categories) + (self.task in ("segment", "detect"))

    def flip(self, fields: dict, which=None) -> dict:
        """flip_horizontal with this data set's joint names."""
        return flip_horizontal(fields, self.keypoint_names, which)


def coco(path: str, ann: str = "instances", task: str = "", size=0, max_objects: int = 0,
         train: str = "train", test: str = "val", masks: bool = False, keypoints: bool = False) -> CocoDataset:
    """Read PATH/annotations/{ANN}_{train}.json and _{test}.json with their images
    (module docstring). task: one of TASKS, or "" to choose from the train file:
    pose if a category names keypoints, localize if every image holds exactly one
    object, segment if every object has a segmentation, else detect. size: an int, a
    [height, width] pair, or 0 for the images' own size when they all share one.
    masks, keypoints: add per-object masks and keypoints (module docstring)."""
    path = os.path.expanduser(os.fspath(path))
    hw = _size(size) if size != 0 else None
    if task and task not in TASKS:
        raise NetdslError(f"coco: task must be one of {', '.join(TASKS)}, got '{task}'")
    if not isinstance(max_objects, int) or max_objects < 0:
        raise NetdslError(f"coco: max_objects must be 0 (automatic) or a positive integer, got {max_objects!r}")
    if not os.path.isdir(path):
        raise NetdslError(f"coco: directory {path} not found" if not os.path.exists(path)
                          else f"coco: {path} is not a directory", hint="give the directory holding annotations/")
    files = {s: os.path.join(path, "annotations", f"{ann}_{name}.json") for s, name in (("train", train), ("test", test))}
    if ann == "instances" and keypoints and not os.path.exists(files["train"]):
        alt = {s: f.replace(os.sep + "instances_", os.sep + "person_keypoints_") for s, f in files.items()}
        files = alt if all(os.path.exists(f) for f in alt.values()) else files
    cocos = {s: cocofile.load(f) for s, f in files.items()}
    ref = cocos["train"]
    if _categories(cocos["test"]) != _categories(ref):
        raise NetdslError(f"{files['test']}: its categories differ from {files['train']}'s",
                          hint="both splits must list the same categories (ids, names, keypoints)")
    task = task or _default_task(ref, per_object=masks or keypoints)
    cat_ids = sorted(ref.cats)
    kp_cats = [c for c in cat_ids if ref.cats[c].get("keypoints")]
    if task == "pose" and len(kp_cats) != 1:
        raise NetdslError(f"{files['train']}: pose needs exactly one category with keypoints, found {len(kp_cats)}")
    for flag, on in (("masks", masks), ("keypoints", keypoints)):
        if on and task not in ("segment", "detect"):
            raise NetdslError(f"coco: {flag}=True gives one entry per object, which task '{task}' does not have",
                              hint="per-object masks and keypoints come with task 'segment' or 'detect'")
    if keypoints and len(kp_cats) != 1:
        raise NetdslError(f"{files['train']}: per-object keypoints need exactly one category with keypoints, "
                          f"found {len(kp_cats)}", hint="Mask R-CNN's keypoint head reads person_keypoints files; "
                                                        "--set K=0 drops it")
    joints = list(ref.cats[kp_cats[0]]["keypoints"]) if task == "pose" or keypoints else []
    counts = {s: _object_counts(c) for s, c in cocos.items()}
    cap = 0
    if task in ("segment", "detect"):
        most = max(max(c.values(), default=0) for c in counts.values())
        cap = max_objects or max(CAP_STEP, -(-most // CAP_STEP) * CAP_STEP)
        for s, c in counts.items():
            over = next((i for i, n in c.items() if n > cap), None)
            if over is not None:
                raise NetdslError(f"{files[s]}: image {over} holds {c[over]} objects, more than "
                                  f"max_objects={cap}", hint="raise max_objects, or 0 to take the largest count")
    ds = CocoDataset("coco", path, {}, {}, task=task, categories=[ref.cats[c]["name"] for c in cat_ids],
                     category_ids=cat_ids, max_objects=cap,
                     keypoint_names=joints,
                     skeleton=[list(p) for p in ref.cats[kp_cats[0]].get("skeleton", [])] if joints else [])
    classes = {c: i + 1 for i, c in enumerate(cat_ids)}
    hw = hw or _common_size(cocos, files)
    for s, c in cocos.items():
        image_dir = _image_dir(path, train if s == "train" else test, files[s])
        arrays, meta = _read_split(c, files[s], image_dir, hw, task, classes, cap, ds.keypoint_names,
                                   masks, keypoints)
        setattr(ds, s, arrays)
        ds.meta[s] = meta
    return ds


def _size(size, what: str = "coco") -> tuple[int, int]:
    hw = (size, size) if isinstance(size, int) and not isinstance(size, bool) else tuple(size) \
        if isinstance(size, (list, tuple)) else None
    if hw is None or len(hw) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 8192
                                             for v in hw):
        raise NetdslError(f"{what}: size must be an integer from 1 to 8192 or a [height, width] pair, got {size!r}")
    return hw


def _common_size(cocos, files, what: str = "coco") -> tuple[int, int]:
    sizes = {(im["height"], im["width"]): (s, im["id"]) for s, c in cocos.items() for im in c.dataset["images"]}
    if len(sizes) > 1:
        (a, (sa, ia)), (b, (sb, ib)) = list(sizes.items())[:2]
        raise NetdslError(f"{what}: the images differ in size (image {ia} of {files[sa]} is {a[1]}x{a[0]}, image {ib} "
                          f"of {files[sb]} {b[1]}x{b[0]}), so they need a common size",
                          hint="give size=S (or [height, width]) to resize them all")
    return next(iter(sizes), (1, 1))


def _categories(c) -> list:
    return [(i, c.cats[i]["name"], c.cats[i].get("keypoints")) for i in sorted(c.cats)]


def _object_counts(c) -> dict[int, int]:
    return {i: sum(1 for a in c.imgToAnns[i] if not a.get("iscrowd", 0)) for i in c.imgs}


def _default_task(c, per_object: bool = False) -> str:
    if not per_object and any(cat.get("keypoints") for cat in c.cats.values()):
        return "pose"
    if not per_object and c.imgs and all(n == 1 for n in _object_counts(c).values()):
        return "localize"
    if all("segmentation" in a for a in c.anns.values()):
        return "segment"
    return "detect"


def _image_dir(root: str, split: str, ann_file: str) -> str:
    tried = [os.path.join(root, "images", split), os.path.join(root, split)]
    for d in tried:
        if os.path.isdir(d):
            return d
    raise NetdslError(f"{ann_file}: no image directory for it: neither {tried[0]} nor {tried[1]} exists")


def _read_split(c, ann_file, image_dir, hw, task, classes, cap, joint_names, masks=False, keypoints=False):
    """The arrays of one split, and where its images came from."""
    ids = [im["id"] for im in c.dataset["images"]]
    n, (h, w) = len(ids), hw
    if n == 0:
        raise NetdslError(f"{ann_file} lists no images")
    _check_memory(n, hw, task, cap, len(joint_names), ann_file, masks)
    out = {"image": np.empty((n, 3, h, w), np.float32)}
    if task == "segment":
        out["label"] = np.zeros((n, h, w), np.int64)
    if task in ("segment", "detect"):
        out["boxes"] = np.zeros((n, cap, 4), np.float32)
        out["labels"] = np.full((n, cap), -1, np.int64)
    if task == "localize":
        out["label"] = np.zeros(n, np.int64)
    if task in ("localize", "pose"):
        out["box"] = np.zeros((n, 4), np.float32)
    if masks:
        out["masks"] = np.zeros((n, cap, h, w), np.float32)
    if keypoints:
        out["keypoints"] = np.zeros((n, cap, len(joint_names), 3), np.float32)
    if task == "pose":
        out["joints"] = np.zeros((n, len(joint_names), 2), np.float32)
        out["visible"] = np.zeros((n, len(joint_names)), np.float32)
    sizes = np.zeros((n, 2), np.int64)
    for k, image_id in enumerate(ids):
        info = c.imgs[image_id]
        H, W = info["height"], info["width"]
        sizes[k] = H, W
        scale = np.array([w / W, h / H, w / W, h / H], np.float32)
        out["image"][k] = _read_image(os.path.join(image_dir, info["file_name"]), info, ann_file, hw)
        anns = c.imgToAnns[image_id]
        objects = [a for a in anns if not a.get("iscrowd", 0)]
        if task == "segment":
            out["label"][k] = _label_map(c, anns, classes, (H, W), hw, ann_file)
        if task in ("segment", "detect"):
            for g, a in enumerate(objects):
                out["boxes"][k, g] = _xyxy(a["bbox"]) * scale
                out["labels"][k, g] = classes[a["category_id"]]
                if masks:
                    out["masks"][k, g] = _object_mask(c, a, (H, W), hw, ann_file)
                if keypoints and a.get("keypoints"):
                    out["keypoints"][k, g] = _object_keypoints(a, scale, len(joint_names), ann_file)
        elif task == "localize":
            if len(objects) != 1:
                raise NetdslError(f"{ann_file}: image {image_id} ('{info['file_name']}') holds {len(objects)} "
                                  f"objects; single-object data (task 'localize') needs exactly one",
                                  hint="task='detect' reads any number of objects per image")
            out["label"][k] = classes[objects[0]["category_id"]] - 1
            out["box"][k] = _xyxy(objects[0]["bbox"]) * scale
        else:
            people = [a for a in objects if "keypoints" in a]
            if people:
                a = max(people, key=lambda a: a["area"])
                kp = np.asarray(a["keypoints"], np.float32).reshape(-1, 3)
                seen = kp[:, 2] > 0
                out["joints"][k] = np.where(seen[:, None], kp[:, :2] * scale[:2], 0)
                out["visible"][k] = seen
                out["box"][k] = _xyxy(a["bbox"]) * scale
    meta = {"file": ann_file, "image_dir": image_dir, "image_ids": np.asarray(ids, np.int64), "sizes": sizes}
    return out, meta


def _xyxy(b) -> np.ndarray:
    x, y, bw, bh = b
    return np.array([x, y, x + bw, y + bh], np.float32)


def _read_image(file: str, info: dict, ann_file: str, hw) -> np.ndarray:
    """float32 [3, h, w] in [0, 1]: the image, checked against the size the file states, resized."""
    from PIL import Image
    try:
        with Image.open(file) as f:
            f.load()
            size = f.size
            im = f.convert("RGB")
    except FileNotFoundError:
        raise NetdslError(f"{ann_file}: image {info['id']} is '{info['file_name']}', but {file} does not exist") \
            from None
    except Exception as e:   # noqa: BLE001 - Pillow raises many kinds for a damaged file; all are the file's
        raise NetdslError(f"{file} cannot be read as an image ({type(e).__name__}: {e})",
                          hint=f"it is image {info['id']} of {ann_file}") from None
    if size != (info["width"], info["height"]):
        raise NetdslError(f"{file} is {size[0]}x{size[1]} pixels but {ann_file} says image {info['id']} is "
                          f"{info['width']}x{info['height']}", hint="boxes and masks are in the file's pixels")
    h, w = hw
    if (h, w) != (info["height"], info["width"]):
        im = im.resize((w, h), Image.BILINEAR)
    a = np.asarray(im, np.float32).transpose(2, 0, 1)
    return a * np.float32(1 / 255)


def _object_mask(c, a, HW, hw, ann_file) -> np.ndarray:
    """float32 [h, w]: one annotation's mask (1 inside), resized nearest-neighbour."""
    from PIL import Image
    if not a.get("segmentation"):
        raise NetdslError(f"{ann_file}: annotation {a['id']} has no segmentation, which a per-object mask needs",
                          hint="Mask R-CNN trains on instance data with masks (netdsl data shapes writes them)")
    m = c.annToMask(a).astype(np.uint8)
    if tuple(HW) != tuple(hw):
        m = np.asarray(Image.fromarray(m).resize((hw[1], hw[0]), Image.NEAREST))
    return m.astype(np.float32)


def _object_keypoints(a, scale, k: int, ann_file) -> np.ndarray:
    """float32 [K, 3]: x, y scaled with the image, COCO's visibility; unlabelled ones 0, 0, 0."""
    kp = np.asarray(a["keypoints"], np.float32)
    if kp.size != 3 * k:
        raise NetdslError(f"{ann_file}: annotation {a['id']} has {kp.size} keypoint numbers; its category names "
                          f"{k} keypoints (x, y, visibility each: {3 * k})")
    kp = kp.reshape(k, 3).copy()
    kp[:, :2] *= scale[:2]
    kp[kp[:, 2] <= 0] = 0
    return kp


def _label_map(c, anns, classes, HW, hw, ann_file) -> np.ndarray:
    """int64 [h, w]: the label map at the file's size, resized nearest-neighbour."""
    from PIL import Image
    label = paint_label_map(c, anns, classes, HW, ann_file)
    if tuple(HW) != tuple(hw):
        mode_type = np.uint8 if label.max(initial=0) < 256 else np.int32
        label = np.asarray(Image.fromarray(label.astype(mode_type)).resize((hw[1], hw[0]), Image.NEAREST))
    return label.astype(np.int64)


def paint_label_map(c, anns, classes: dict, hw, ann_file: str) -> np.ndarray:
    """int64 [h, w]: each annotation's class (classes[category id]) painted over the
    earlier ones' (crowd regions too), 0 where none is."""
    label = np.zeros(hw, np.int64)
    for a in anns:
        if "segmentation" not in a:
            raise NetdslError(f"{ann_file}: annotation {a['id']} has no segmentation, which a label map needs",
                              hint="task='detect' reads boxes only")
        label[c.annToMask(a).astype(bool)] = classes[a["category_id"]]
    return label


def _check_memory(n, hw, task, cap, k, ann_file, masks=False):
    h, w = hw
    per = 12 * h * w + (8 * h * w if task == "segment" else 0) + 24 * cap + 12 * k * max(cap, 1) + 16
    per += 4 * cap * h * w if masks else 0
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if n * per > total // 2:
        raise NetdslError(f"{ann_file}: {n} images at {h}x{w} would take {n * per / 2**30:.1f} GiB, more than "
                          f"half of this machine's {total / 2**30:.1f} GiB", hint="read them at a smaller size")


# ---------------------------------------------------------------- flips

def mirror_pairs(names) -> np.ndarray:
    """The joint order after a horizontal flip: each name with 'left' and 'right'
    exchanged (left_wrist <-> right_wrist), a name without either staying put."""
    names = list(names)
    where = {n: i for i, n in enumerate(names)}
    swapped = [n.replace("left", "\0").replace("right", "left").replace("\0", "right") for n in names]
    return np.array([where.get(s, i) for i, s in enumerate(swapped)], np.int64)


def flip_horizontal(fields: dict, keypoint_names=(), which=None) -> dict:
    """Mirror examples left to right: a new dict of the fields (first axis the
    examples; `which`, a bool per example, picks the ones to flip, default all). Images
    and label maps are mirrored; boxes x1, x2 become W - x2, W - x1 (padding rows,
    label -1, stay zeros); labelled joints' x becomes W - x, and left and right joints
    exchange places (mirror_pairs), with their visibility. W is the images' width.
    Per-object masks [N, G, H, W] are mirrored like images; per-object keypoints
    [N, G, K, 3] like joints (labelled ones, visibility > 0, move)."""
    if "image" not in fields:
        raise NetdslError("flip_horizontal needs the 'image' field: its width is the mirror's")
    width = np.float32(fields["image"].shape[-1])
    n = len(fields["image"])
    which = np.ones(n, bool) if which is None else np.asarray(which, bool)
    if which.shape != (n,):
        raise NetdslError(f"flip_horizontal: 'which' must hold one flag per example ({n}), got shape {which.shape}")
    per_object = fields["keypoints"].shape[2] if "keypoints" in fields else None
    if (("joints" in fields or "visible" in fields) and len(keypoint_names) != fields.get(
            "joints", fields.get("visible")).shape[1]) or (per_object is not None and len(keypoint_names) != per_object):
        raise NetdslError("flip_horizontal: mirroring joints needs their names (keypoint_names), one per joint, "
                          "to exchange left and right")
    swap = mirror_pairs(keypoint_names)
    out = {}
    for name, a in fields.items():
        a = np.array(a)      # a copy: the caller's arrays stay as they were
        if name in ("image", "masks") or (name == "label" and a.ndim == 3):
            a[which] = a[which][..., ::-1]
        elif name in ("box", "boxes"):
            x1, x2 = a[which, ..., 0].copy(), a[which, ..., 2].copy()
            keep = fields["labels"][which] >= 0 if name == "boxes" and "labels" in fields else True
            a[which, ..., 0] = np.where(keep, width - x2, x1)
            a[which, ..., 2] = np.where(keep, width - x1, x2)
        elif name == "joints":
            seen = fields["visible"][which] > 0 if "visible" in fields else np.ones(a.shape[:2], bool)[which]
            x = a[which, :, 0]
            a[which, :, 0] = np.where(seen, width - x, x)
            a[which] = a[which][:, swap]
        elif name == "keypoints":
            k = a[which]
            k[..., 0] = np.where(k[..., 2] > 0, width - k[..., 0], k[..., 0])
            a[which] = k[:, :, swap]
        elif name == "visible":
            a[which] = a[which][:, swap]
        elif name in ("labels", "label"):
            pass          # class ids: unchanged by a mirror
        else:
            raise NetdslError(f"flip_horizontal: cannot tell how field '{name}' moves with a mirrored image",
                              hint="it knows image, label, labels, box, boxes, masks, joints, keypoints and visible")
        out[name] = a
    return out
