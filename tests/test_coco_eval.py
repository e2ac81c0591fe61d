"""COCO reader (padded tensors, resizing, flips, bad files) and evaluation (COCOeval's
figures when called directly; mIoU against an independent confusion matrix; PCK)."""
import contextlib
import io
import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as cmask
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from sklearn.metrics import confusion_matrix

from netdsl.datasets import draw, results
from netdsl.datasets.coco import coco, flip_horizontal, mirror_pairs
from netdsl.datasets.evaluate import box_iou, evaluate, pck
from netdsl.datasets.shapes import generate
from netdsl.errors import NetdslError

SIZE = 48


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("coco") / "set"
    generate(str(out), images=32, size=SIZE, seed=5, val_fraction=0.25)
    return out


def quiet_coco(path):
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


# ---------------------------------------------------------------- reading

def test_segment_fields_are_padded_boxes_and_label_maps(data):
    ds = coco(str(data))
    assert ds.task == "segment" and ds.max_objects == 8 and ds.num_classes == 5
    assert ds.categories == list(draw.SHAPES)
    for split, name in (("train", "train"), ("test", "val")):
        f = ds.split(split)
        c = quiet_coco(data / "annotations" / f"instances_{name}.json")
        assert f["image"].dtype == np.float32 and f["image"].shape == (len(c.imgs), 3, SIZE, SIZE)
        assert f["boxes"].shape == (len(c.imgs), 8, 4) and f["labels"].dtype == np.int64
        for k, image_id in enumerate(ds.meta[split]["image_ids"]):
            info = c.imgs[int(image_id)]
            png = np.asarray(Image.open(data / "labels" / name / info["file_name"]))
            np.testing.assert_array_equal(f["label"][k], png)
            pixels = np.asarray(Image.open(data / "images" / name / info["file_name"]))
            np.testing.assert_allclose(f["image"][k], pixels.transpose(2, 0, 1) / 255, atol=1e-6)
            anns = c.imgToAnns[int(image_id)]
            n = len(anns)
            np.testing.assert_array_equal(f["labels"][k, :n], [a["category_id"] for a in anns])
            assert (f["labels"][k, n:] == -1).all() and (f["boxes"][k, n:] == 0).all()
            want = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
            np.testing.assert_allclose(f["boxes"][k, :n], np.reshape(want, (n, 4)))


def test_resizing_scales_boxes_and_resamples_label_maps(data):
    full, half = coco(str(data)), coco(str(data), size=24, max_objects=5)
    assert half.max_objects == 5 and half.train["boxes"].shape[1:] == (5, 4)
    np.testing.assert_allclose(half.train["boxes"], full.train["boxes"][:, :5] / 2, rtol=1e-6)
    for k in range(3):
        want = Image.fromarray(full.train["label"][k].astype(np.uint8)).resize((24, 24), Image.NEAREST)
        np.testing.assert_array_equal(half.train["label"][k], np.asarray(want))
    wide = coco(str(data), size=[24, 96])                   # height, width
    assert wide.train["image"].shape[2:] == (24, 96)
    np.testing.assert_allclose(wide.train["boxes"][..., 0::2], full.train["boxes"][..., 0::2] * 2, rtol=1e-6)
    np.testing.assert_allclose(wide.train["boxes"][..., 1::2], full.train["boxes"][..., 1::2] / 2, rtol=1e-6)
    with pytest.raises(NetdslError, match=r"holds \d objects, more than max_objects=1"):
        coco(str(data), max_objects=1)


def test_single_object_and_pose_fields(data):
    single = coco(str(data / "single"))
    assert single.task == "localize" and single.num_classes == 4
    c = quiet_coco(data / "single" / "annotations" / "instances_train.json")
    for k, image_id in enumerate(single.meta["train"]["image_ids"]):
        (a,) = c.imgToAnns[int(image_id)]
        assert single.train["label"][k] == a["category_id"] - 1
        x, y, w, h = a["bbox"]
        np.testing.assert_allclose(single.train["box"][k], [x, y, x + w, y + h])
    pose = coco(str(data / "pose"), ann="person_keypoints", size=96)
    assert pose.task == "pose" and pose.keypoint_names == list(draw.JOINTS)
    c = quiet_coco(data / "pose" / "annotations" / "person_keypoints_val.json")
    for k, image_id in enumerate(pose.meta["test"]["image_ids"]):
        (a,) = c.imgToAnns[int(image_id)]
        kp = np.reshape(a["keypoints"], (14, 3))
        np.testing.assert_allclose(pose.test["joints"][k], kp[:, :2] * 2, rtol=1e-6)
        assert (pose.test["visible"][k] == 1).all()


def write_coco(root, images, annotations, categories, split="train"):
    """A hand-made COCO data set: images given as uint8 arrays."""
    os.makedirs(root / "images" / split, exist_ok=True)
    os.makedirs(root / "annotations", exist_ok=True)
    infos = []
    for i, img in enumerate(images, 1):
        Image.fromarray(img).save(root / "images" / split / f"{i}.png")
        infos.append({"id": i, "file_name": f"{i}.png", "height": img.shape[0], "width": img.shape[1]})
    doc = {"images": infos, "annotations": annotations, "categories": categories}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))
    return root / "annotations" / f"instances_{split}.json"


def ann(i, image, cat, box, **kw):
    x, y, w, h = box
    return {"id": i, "image_id": image, "category_id": cat, "bbox": box, "area": w * h, "iscrowd": 0,
            "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]], **kw}


def test_a_users_coco_file(tmp_path):
    """Gapped category ids, crowd regions, a non-square image, an image without objects."""
    imgs = [np.full((30, 40, 3), 90, np.uint8), np.full((20, 20, 3), 200, np.uint8)]
    cats = [{"id": 3, "name": "cat"}, {"id": 17, "name": "dog"}]
    anns = [ann(1, 1, 17, [0, 0, 10, 10]), ann(2, 1, 3, [20, 10, 20, 20]),
            ann(3, 1, 3, [5, 0, 10, 5], iscrowd=1)]
    for split in ("train", "val"):
        write_coco(tmp_path, imgs, anns, cats, split)
    ds = coco(str(tmp_path), size=20)
    assert ds.categories == ["cat", "dog"] and ds.category_ids == [3, 17] and ds.task == "segment"
    f = ds.train
    assert ds.max_objects == 8
    np.testing.assert_array_equal(f["labels"][0, :3], [2, 1, -1])   # the crowd region is no box
    np.testing.assert_allclose(f["boxes"][0, :2], [[0, 0, 5, 20 / 3], [10, 20 / 3, 20, 20]], rtol=1e-6)
    assert (f["labels"][1] == -1).all() and (f["label"][1] == 0).all()
    # the label map, painted at 30x40 in the file's order then resized nearest: dog top left, cat
    # lower right, the crowd of cats over part of the dog
    want = np.zeros((30, 40), np.uint8)
    want[0:10, 0:10], want[10:30, 20:40], want[0:5, 5:15] = 2, 1, 1
    np.testing.assert_array_equal(f["label"][0], np.asarray(Image.fromarray(want).resize((20, 20), Image.NEAREST)))
    np.testing.assert_allclose(f["image"][0], 90 / 255, atol=1e-6)


def test_keypoints_with_unlabelled_joints_and_several_people(tmp_path):
    names = ["nose", "left_eye", "right_eye"]
    cats = [{"id": 1, "name": "person", "keypoints": names, "skeleton": [[1, 2], [1, 3]]}]
    small = ann(1, 1, 1, [0, 0, 5, 5], keypoints=[1, 1, 2, 2, 2, 2, 3, 3, 2], num_keypoints=3)
    big = ann(2, 1, 1, [10, 10, 20, 20], keypoints=[15, 16, 2, 0, 0, 0, 12, 12, 1], num_keypoints=2)
    for split in ("train", "val"):
        write_coco(tmp_path, [np.zeros((40, 40, 3), np.uint8)], [small, big], cats, split)
    ds = coco(str(tmp_path), size=20)
    assert ds.task == "pose"
    np.testing.assert_allclose(ds.train["joints"][0], [[7.5, 8], [0, 0], [6, 6]])   # the larger person
    np.testing.assert_array_equal(ds.train["visible"][0], [1, 0, 1])
    np.testing.assert_allclose(ds.train["box"][0], [5, 5, 15, 15])


# ---------------------------------------------------------------- flips

def test_mirror_pairs():
    np.testing.assert_array_equal(mirror_pairs(["nose", "left_eye", "right_eye", "left_ear"]), [0, 2, 1, 3])
    assert [draw.JOINTS[i] for i in mirror_pairs(draw.JOINTS)][:2] == ["right_shoulder", "left_shoulder"]


def instance_masks(data, split_file, ds, split):
    c = quiet_coco(data / "annotations" / split_file)
    return [[c.annToMask(a).astype(bool) for a in c.imgToAnns[int(i)]] for i in ds.meta[split]["image_ids"]]


def test_flip_moves_boxes_and_masks_with_the_image(data):
    ds = coco(str(data))
    f = ds.train
    which = np.arange(len(f["image"])) % 2 == 0
    g = ds.flip(f, which)
    masks = instance_masks(data, "instances_train.json", ds, "train")
    for k in range(len(f["image"])):
        if not which[k]:
            for name in f:
                np.testing.assert_array_equal(g[name][k], f[name][k])
            continue
        np.testing.assert_array_equal(g["image"][k], f["image"][k][:, :, ::-1])
        np.testing.assert_array_equal(g["label"][k], f["label"][k][:, ::-1])
        for gi, m in enumerate(masks[k]):
            ys, xs = np.nonzero(m[:, ::-1])          # the mirrored object's own pixels
            np.testing.assert_allclose(g["boxes"][k, gi], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            assert (g["label"][k][m[:, ::-1]] == f["labels"][k, gi]).all()
        assert (g["boxes"][k, len(masks[k]):] == 0).all()
    back = ds.flip(g, which)
    for name in f:
        np.testing.assert_array_equal(back[name], f[name])
    assert f["image"] is not g["image"] and not np.shares_memory(f["boxes"], g["boxes"])


def test_flip_swaps_left_and_right_joints(data):
    pose = coco(str(data / "pose"), ann="person_keypoints")
    f = pose.train
    g = flip_horizontal(f, pose.keypoint_names)
    li, ri = draw.JOINTS.index("left_wrist"), draw.JOINTS.index("right_wrist")
    np.testing.assert_allclose(g["joints"][:, li, 0], SIZE - f["joints"][:, ri, 0])
    np.testing.assert_allclose(g["joints"][:, li, 1], f["joints"][:, ri, 1])
    c = quiet_coco(data / "pose" / "annotations" / "person_keypoints_train.json")
    for k, image_id in enumerate(pose.meta["train"]["image_ids"]):
        fig = c.annToMask(c.imgToAnns[int(image_id)][0]).astype(bool)[:, ::-1]
        x, y = g["joints"][k].T
        rows = np.floor(y).astype(int)
        # each mirrored joint lies on the mirrored figure: in the pixel holding it, or on that
        # pixel's right edge (a joint on a pixel's left edge mirrors onto the right edge)
        assert (fig[rows, np.floor(x).astype(int)] | fig[rows, np.ceil(x).astype(int) - 1]).all()
        # a figure facing the viewer has its left joints to the right of its right ones, mirrored or not
        ls, rs = draw.JOINTS.index("left_shoulder"), draw.JOINTS.index("right_shoulder")
        assert g["joints"][k, ls, 0] > g["joints"][k, rs, 0] and f["joints"][k, ls, 0] > f["joints"][k, rs, 0]
    np.testing.assert_allclose(g["box"][:, [0, 2]], SIZE - f["box"][:, [2, 0]])
    hidden = dict(f, visible=f["visible"].copy())
    hidden["visible"][:, li] = 0
    hidden["joints"] = f["joints"].copy()
    hidden["joints"][:, li] = 0
    h = flip_horizontal(hidden, pose.keypoint_names)
    assert (h["joints"][:, ri] == 0).all() and (h["visible"][:, ri] == 0).all()
    with pytest.raises(NetdslError, match="needs their names"):
        flip_horizontal(f)
    with pytest.raises(NetdslError, match="cannot tell how field 'depth'"):
        flip_horizontal({"image": f["image"], "depth": f["image"]})


# ---------------------------------------------------------------- bad files

def corrupt(root, what):
    p = root / "annotations" / "instances_train.json"
    d = json.loads(p.read_text())
    if what == "not json":
        p.write_text("{images: [")
        return p, "is not JSON"
    if what == "list":
        p.write_text("[1, 2]")
        return p, "top level is list"
    if what == "no images":
        del d["images"]
        msg = "has no 'images' list"
    elif what == "duplicate category":
        d["categories"].append(dict(d["categories"][0]))
        msg = "category id 1 appears twice"
    elif what == "unknown category":
        d["annotations"][0]["category_id"] = 99
        msg = r"annotations\[0\] \(id 1\): category_id 99 is not a category"
    elif what == "bad bbox":
        d["annotations"][0]["bbox"] = [1, 2, -3, 4]
        msg = "'bbox' must be"
    elif what == "bad rle":
        d["annotations"][0]["segmentation"] = {"size": [SIZE, SIZE], "counts": [5, 5]}
        msg = "run lengths adding up to"
    elif what == "list image_id":
        d["annotations"][0]["image_id"] = [1]
        msg = r"image_id \[1\] is not an image of the file"
    elif what == "far polygon":
        # pycocotools would rasterise this outline at 5x its span: gigabytes, or a crash
        d["annotations"][0]["segmentation"] = [[0, 0, 1e12, 0, 0, 5]]
        msg = "reaches far outside the 48 x 48 image"
    elif what == "missing image":
        os.remove(root / "images" / "train" / d["images"][0]["file_name"])
        msg = "does not exist"
    elif what == "corrupt image":
        (root / "images" / "train" / d["images"][0]["file_name"]).write_bytes(b"\x89PNG\r\n\x1a\nnot really")
        msg = "cannot be read as an image"
    elif what == "wrong size":
        Image.new("RGB", (50, SIZE)).save(root / "images" / "train" / d["images"][0]["file_name"])
        msg = f"is 50x{SIZE} pixels but .* says image 1 is {SIZE}x{SIZE}"
    p.write_text(json.dumps(d))
    return p, msg


@pytest.mark.parametrize("what", ["not json", "list", "no images", "duplicate category", "unknown category",
                                  "bad bbox", "bad rle", "list image_id", "far polygon", "missing image",
                                  "corrupt image", "wrong size"])
def test_bad_files_name_the_file_and_the_fault(tmp_path, what):
    generate(str(tmp_path / "d"), images=4, size=SIZE, seed=0, val_fraction=0.5)
    path, msg = corrupt(tmp_path / "d", what)
    with pytest.raises(NetdslError, match=msg) as e:
        coco(str(tmp_path / "d"))
    assert str(path) in str(e.value) or "images/train" in str(e.value) + str(e.value.hint)


def test_missing_things(tmp_path):
    with pytest.raises(NetdslError, match="directory .* not found"):
        coco(str(tmp_path / "nowhere"))
    (tmp_path / "annotations").mkdir()
    with pytest.raises(NetdslError, match="instances_train.json not found"):
        coco(str(tmp_path))
    with pytest.raises(NetdslError, match="task must be one of"):
        coco(str(tmp_path), task="classify")
    with pytest.raises(NetdslError, match="size must be"):
        coco(str(tmp_path), size=-3)
    with pytest.raises(NetdslError, match="size must be"):
        coco(str(tmp_path), size="big")


# ---------------------------------------------------------------- evaluation

def cocoeval_directly(gt_path, res_path, kind, sigmas=None):
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        E = COCOeval(gt, gt.loadRes(str(res_path)), kind)
        if sigmas is not None:
            E.params.kpt_oks_sigmas = sigmas
        E.evaluate()
        E.accumulate()
        E.summarize()
    return E.stats


def noisy_detections(gt_path, rng):
    """Ground-truth boxes and masks jittered, some dropped, false positives added."""
    gt = quiet_coco(gt_path)
    out = []
    for a in gt.dataset["annotations"]:
        if rng.random() < 0.15:
            continue
        x, y, w, h = np.array(a["bbox"], float) + rng.normal(0, 1.5, 4)
        m = gt.annToMask(a)
        m = np.roll(m, rng.integers(-2, 3, 2), (0, 1))
        rle = cmask.encode(np.asfortranarray(m))
        out.append({"image_id": a["image_id"], "category_id": a["category_id"] if rng.random() < 0.9 else 1,
                    "bbox": [float(x), float(y), float(max(w, 1)), float(max(h, 1))],
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                    "score": float(rng.random())})
    for image_id in list(gt.imgs)[:5]:
        m = np.zeros((SIZE, SIZE), np.uint8, order="F")
        m[5:15, 5:15] = 1
        rle = cmask.encode(m)
        out.append({"image_id": image_id, "category_id": 2, "bbox": [5.0, 5.0, 10.0, 10.0],
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}, "score": 0.3})
    return out


@pytest.mark.parametrize("kind", ["bbox", "segm"])
def test_coco_ap_equals_cocoeval_called_directly(data, tmp_path, kind):
    gt_path = data / "annotations" / "instances_val.json"
    res_path = tmp_path / "results.json"
    results.write(str(res_path), noisy_detections(gt_path, np.random.default_rng(1)))
    figures, table = evaluate(str(gt_path), str(res_path), kind)
    stats = cocoeval_directly(gt_path, res_path, kind)
    assert list(figures.values()) == list(stats)
    assert 0.05 < figures["AP"] < 0.95 and figures["APm"] == -1     # imperfect; every object small
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in table


def test_keypoint_ap_and_pck(data, tmp_path):
    gt_path = data / "pose" / "annotations" / "person_keypoints_val.json"
    gt = quiet_coco(gt_path)
    rng = np.random.default_rng(2)
    preds, truth, boxes = [], [], []
    for image_id in sorted(gt.imgs):
        (a,) = gt.imgToAnns[image_id]
        kp = np.reshape(a["keypoints"], (14, 3)).astype(float)
        noisy = kp[:, :2] + rng.normal(0, 2.5, (14, 2))
        preds.append(noisy)
        truth.append(kp[:, :2])
        x, y, w, h = a["bbox"]
        boxes.append([x, y, x + w, y + h])
    res = [{"image_id": i, "category_id": 1, "score": 0.9,
            "keypoints": [float(v) for x, y in p for v in (x, y, 1)]} for i, p in zip(sorted(gt.imgs), preds)]
    res_path = tmp_path / "kp.json"
    results.write(str(res_path), res)
    figures, table = evaluate(str(gt_path), str(res_path), "keypoints")
    crowdpose = np.array([.79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89, .79, .79]) / 10
    stats = cocoeval_directly(gt_path, res_path, "keypoints", crowdpose)
    assert [figures[k] for k in ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")] \
        == list(stats)
    # PCK@0.2 by hand: a joint within 0.2 * the larger side of its person's box
    p, t, b = np.array(preds), np.array(truth), np.array(boxes)
    size = np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])
    want = (np.sqrt(((p - t) ** 2).sum(2)) <= 0.2 * size[:, None]).mean()
    assert figures["PCK@0.2"] == pytest.approx(want) and 0.3 < want < 1
    assert "PCK@0.2" in table and "Average Precision" in table
    assert pck(p, t, np.ones(t.shape[:2]), b, alpha=0.2) == pytest.approx(want)


def test_miou_equals_an_independent_confusion_matrix(data, tmp_path):
    ds = coco(str(data))
    rng = np.random.default_rng(3)
    truth = ds.test["label"]
    pred = truth.copy()
    noise = rng.random(pred.shape) < 0.1
    pred[noise] = rng.integers(0, 5, int(noise.sum()))
    pred[:, :, :6] = np.roll(pred[:, :, :6], 3, axis=1)
    res_path = tmp_path / "sem.json"
    results.write(str(res_path), results.label_map_results(ds, "test", pred))
    figures, table = evaluate(str(data / "annotations" / "instances_val.json"), str(res_path), "semantic")
    cm = confusion_matrix(truth.ravel(), pred.ravel(), labels=range(5))
    iou = np.diag(cm) / (cm.sum(0) + cm.sum(1) - np.diag(cm))
    assert figures["miou"] == pytest.approx(iou.mean())
    assert figures["pixel_accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    assert figures["iou/star"] == pytest.approx(iou[4])
    assert 0.5 < figures["miou"] < 0.95 and "mean IoU" in table


def test_results_of_resized_arrays_are_in_the_files_pixels(data, tmp_path):
    """The reader's boxes at another size, written back: COCOeval finds them perfect."""
    ds = coco(str(data), size=[40, 64])
    t = ds.test
    res_path = tmp_path / "boxes.json"
    results.write(str(res_path), results.box_results(ds, "test", t["boxes"], t["labels"], np.ones(t["labels"].shape)))
    figures, _ = evaluate(str(data / "annotations" / "instances_val.json"), str(res_path), "bbox")
    assert figures["AP"] == pytest.approx(1.0)
    single = coco(str(data / "single"), size=32)
    res = results.box_results(single, "test", single.test["box"], single.test["label"], np.ones(len(single.test["box"])))
    gt = quiet_coco(data / "single" / "annotations" / "instances_val.json")
    for r in res:
        (a,) = gt.imgToAnns[r["image_id"]]
        assert r["category_id"] == a["category_id"]
        np.testing.assert_allclose(r["bbox"], a["bbox"], atol=0.01)
    assert box_iou(single.test["box"], single.test["box"] + [0, 0, 0, 0]).min() == 1.0


@pytest.mark.parametrize("content, msg", [
    ("{}", "expected a list of predictions"),
    ("[]", "holds no predictions"),
    ('[{"image_id": 999, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1}]', "image_id 999 is not an image"),
    ('[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1], "score": 1}]', "'bbox' must be"),
    ('[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}]', "'score' must be a number"),
    ("not json", "is not JSON"),
    # an integer past 2**53 would reach COCOeval as a numpy object array
    ('[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 100000000000000000000], "score": 1}]', "'bbox' must be"),
])
def test_bad_results_files(data, tmp_path, content, msg):
    p = tmp_path / "r.json"
    p.write_text(content)
    with pytest.raises(NetdslError, match=msg) as e:
        evaluate(str(data / "annotations" / "instances_val.json"), str(p), "bbox")
    assert str(p) in str(e.value)
    with pytest.raises(NetdslError, match="kind must be one of"):
        evaluate(str(data / "annotations" / "instances_val.json"), str(p), "boxes")


def test_the_data_source_entry_takes_the_readers_options(data):
    import inspect
    from netdsl.datasets import load_coco
    params = lambda f: [(p.name, p.default) for p in inspect.signature(f).parameters.values()]  # noqa: E731
    assert params(load_coco) == params(coco)
    ds = load_coco(str(data / "single"), size=32)
    assert ds.describe() == "image f32 (3, 32, 32), label i64 (), box f32 (4,)"
