"""Detection and segmentation: every spec compiles through the CLI and renders; shapes,
losses and parameter counts checked against published numbers, PyTorch modules and the
conv arithmetic; non-differentiable ops flagged; shape errors positioned."""
import io
import json
import math
import re
from contextlib import redirect_stderr, redirect_stdout
from types import SimpleNamespace

import pytest

from helpers import ROOT, SPECS, cli, compile_spec, compile_text
from netdsl.errors import NetdslError
from netdsl.ir.dims import Sym
from netdsl.ops import OPS

DET = SPECS / "det"
SPEC_NAMES = ["sliding_window", "fcn", "cls_loc", "pose", "rcnn", "fast_rcnn", "faster_rcnn",
              "yolo_v1", "ssd300", "mask_rcnn", "densecap"]
WITH_INFERENCE = ["rcnn", "fast_rcnn", "faster_rcnn", "mask_rcnn"]   # `--set training=false`
CASES = [(n, ()) for n in SPEC_NAMES] + [(n, ("--set", "training=false")) for n in WITH_INFERENCE]

# torchvision's published VGG-16 parameter count (1000 classes)
VGG16_PARAMS = 138_357_544
VGG16_FC8 = 4096 * 1000 + 1000


@pytest.fixture(scope="module")
def compiled():
    """`netdsl compile --json` of every spec (and inference variant) through the CLI's
    entry point, in process (one subprocess run is in test_cli_reports_position)."""
    from netdsl.cli import main
    out = {}
    for name, extra in CASES:
        stdout, stderr = io.StringIO(), io.StringIO()
        with redirect_stdout(stdout), redirect_stderr(stderr):
            rc = main(["compile", str(DET / f"{name}.net"), "--json", *extra])
        out[(name, extra)] = SimpleNamespace(returncode=rc, stdout=stdout.getvalue(), stderr=stderr.getvalue())
    return out


@pytest.mark.parametrize("case", CASES, ids=[n + ("-infer" if e else "") for n, e in CASES])
def test_spec_compiles_via_cli(compiled, case):
    r = compiled[case]
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert "N" in report["symbols"]
    assert report["params"] > 0


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_spec_renders(tmp_path, name):
    from netdsl.render import render
    out = tmp_path / f"{name}.dot"
    render(compile_spec(f"det/{name}.net"), out)
    assert "digraph" in out.read_text()


def nodes(g, op):
    return [n for n in g.nodes if n.op == op]


def shape(v):
    return tuple(str(d) for d in v.shape)


N = Sym.var("N")


# ---- Faster R-CNN

def test_faster_rcnn_anchors_at_stride_16():
    g = compile_spec("det/faster_rcnn.net")
    (a,) = nodes(g, "anchors")
    assert a.attrs["stride"] == 16 and len(a.attrs["sizes"]) * len(a.attrs["ratios"]) == 9
    # VGG-16 conv5_3 after four 2x2 pools that round up (Caffe): ceil(size / 16)
    h, w = math.ceil(600 / 16), math.ceil(1000 / 16)
    assert (h, w) == (38, 63)
    assert a.inputs[0].shape[2:] == (h, w)
    assert a.outputs[0].shape == (h * w * 9, 4)
    rpn_cls = [n for n in g.nodes if n.path == "rpn.cls_logits"][0]
    rpn_box = [n for n in g.nodes if n.path == "rpn.bbox_pred"][0]
    assert rpn_cls.outputs[0].shape[1] == 2 * 9 and rpn_box.outputs[0].shape[1] == 4 * 9


def test_faster_rcnn_four_weighted_losses():
    g = compile_spec("det/faster_rcnn.net", rpn_weight=2.0, box_weight=0.5)
    assert [(l.name, l.weight) for l in g.losses] == [
        ("rpn_cls", 1.0), ("rpn_box", 2.0), ("cls", 1.0), ("box", 0.5)]
    (p,) = nodes(g, "roi_pool")
    assert p.outputs[0].shape == (128 * N, 512, 7, 7) and p.attrs["scale"] == 1 / 16


def test_faster_rcnn_params_from_vgg16():
    g = compile_spec("det/faster_rcnn.net")
    rpn = (512 * 512 * 9 + 512) + (512 * 18 + 18) + (512 * 36 + 36)
    heads = (4096 * 21 + 21) + (4096 * 84 + 84)
    assert g.param_count() == VGG16_PARAMS - VGG16_FC8 + rpn + heads


def test_faster_rcnn_inference_decodes_and_suppresses():
    g = compile_spec("det/faster_rcnn.net", training=False)
    assert not g.losses and "gt_boxes" not in g.inputs
    (p,) = nodes(g, "proposals")
    assert p.outputs[0].shape == (300 * N, 5)
    assert g.outputs["boxes"].shape == (N, 100, 4)
    assert nodes(g, "box_decode") and nodes(g, "nms")


# ---- YOLO and SSD

def test_yolo_grid_and_loss_weights():
    g = compile_spec("det/yolo_v1.net")
    assert g.inputs["image"].shape[2:] == (448, 448)
    S, B, C = 7, 2, 20
    # channels last: [N, S, S, B*5 + C]
    assert g.outputs["pred"].shape == (N, S, S, B * 5 + C) == (N, 7, 7, 30)
    assert len(nodes(g, "conv")) == 24 and len(nodes(g, "linear")) == 2
    assert nodes(g, "linear")[-1].outputs[0].shape == (N, S * S * (B * 5 + C))
    weights = {l.name: l.weight for l in g.losses}
    assert weights["coord"] == 5.0 and weights["conf_noobj"] == 0.5
    assert weights["conf_obj"] == weights["cls"] == 1.0
    g2 = compile_spec("det/yolo_v1.net", lambda_coord=3.0, lambda_noobj=0.25)
    assert {l.name: l.weight for l in g2.losses}["coord"] == 3.0
    assert {l.name: l.weight for l in g2.losses}["conf_noobj"] == 0.25


def test_ssd_has_8732_default_boxes():
    g = compile_spec("det/ssd300.net")
    (d,) = nodes(g, "default_boxes")
    assert [v.shape[2] for v in d.inputs] == [38, 19, 10, 5, 3, 1]
    assert [2 + 2 * len(r) for r in d.attrs["ratios"]] == [4, 6, 6, 6, 4, 4]
    assert d.outputs[0].shape == (8732, 4)          # SSD paper: 8732 boxes per class
    assert g.outputs["conf"].shape == (N, 8732, 21) and g.outputs["loc"].shape == (N, 8732, 4)
    assert {l.name for l in g.losses} == {"confidence", "localization"}
    assert nodes(g, "hard_negatives") and nodes(g, "nms")


def test_ssd_matches_torchvision_count():
    # torchvision ssd300_vgg16 (COCO, 91 classes with background): 35,641,826 parameters,
    # 34.86 GFLOPS (multiply-adds) in its model table
    g = compile_spec("det/ssd300.net", classes=90)
    assert g.param_count() == 35_641_826
    macs = sum(n.macs for n in g.nodes).subs({"N": 1})
    assert round(macs / 1e9, 2) == 34.86


# ---- RoI ops, masks and keypoints

def torchvision_roi_shape(input_shape, boxes_shape, output_size):
    """torchvision.ops.roi_pool/roi_align: input [N, C, H, W], boxes Tensor[K, 5] ->
    [K, C, output_size[0], output_size[1]] (an int output_size means a square)."""
    assert len(boxes_shape) == 2 and boxes_shape[1] == 5
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
    return (boxes_shape[0], input_shape[1], oh, ow)


@pytest.mark.parametrize("op", ["roi_pool", "roi_align"])
@pytest.mark.parametrize("out", [7, 14, (7, 5)])
def test_roi_shapes_follow_torchvision(tmp_path, op, out):
    o = list(out) if isinstance(out, tuple) else out
    g = compile_text(tmp_path, f"""
network t() {{
  input f: f32[N, 256, 50, 68]
  input rois: f32[R, 5]
  output y = {op}(f, rois, out={o}, scale=0.0625)
}}""")
    want = torchvision_roi_shape((N, 256, 50, 68), (Sym.var("R"), 5), out)
    assert g.outputs["y"].shape == want


def test_mask_rcnn_heads():
    g = compile_spec("det/mask_rcnn.net")
    R = 512 * N
    aligns = nodes(g, "roi_align")
    assert sorted(a.attrs["out"] for a in aligns) == [(7, 7), (14, 14), (14, 14)]
    assert all(a.inputs[0].shape[1] == 1024 for a in aligns)        # ResNet-50 res4
    (sel,) = [n for n in nodes(g, "select_class") if n.inputs[0].rank == 4]
    assert sel.inputs[0].shape == (R, 81, 28, 28) and sel.outputs[0].shape == (R, 28, 28)
    heat = [n for n in g.nodes if n.path.startswith("keypoint_head")][-1]
    assert heat.outputs[0].shape == (R, 17, 56, 56)
    assert [l.name for l in g.losses] == ["rpn_cls", "rpn_box", "cls", "box", "mask", "keypoint"]
    inf = compile_spec("det/mask_rcnn.net", training=False)
    assert inf.outputs["masks"].shape == (N, 100, 28, 28)
    assert inf.outputs["keypoints"].shape == (N, 100, 17, 56, 56)


def test_mask_rcnn_head_params_match_torch():
    torch = pytest.importorskip("torch")
    nn = torch.nn
    # torchvision's MaskRCNNHeads + MaskRCNNPredictor and KeypointRCNNHeads + Predictor,
    # written out in torch.nn (torchvision itself is not installed)
    mask = nn.Sequential(*[nn.Conv2d(1024 if i == 0 else 256, 256, 3, padding=1) for i in range(4)],
                         nn.ConvTranspose2d(256, 256, 2, 2), nn.Conv2d(256, 81, 1))
    kp = nn.Sequential(*[nn.Conv2d(1024 if i == 0 else 512, 512, 3, padding=1) for i in range(8)],
                       nn.ConvTranspose2d(512, 17, 4, stride=2, padding=1))
    g = compile_spec("det/mask_rcnn.net")

    def ours(prefix):
        return sum(math.prod(p.shape) for k, p in g.params.items() if k.startswith(prefix))
    assert ours("mask_head.") == sum(p.numel() for p in mask.parameters())
    assert ours("keypoint_head.") == sum(p.numel() for p in kp.parameters())
    x = torch.zeros(2, 1024, 14, 14)
    y = nn.functional.interpolate(kp(x), scale_factor=2, mode="bilinear")
    assert tuple(mask(x).shape[1:]) == (81, 28, 28) and tuple(y.shape[1:]) == (17, 56, 56)


# ---- the other specs

def test_fast_rcnn_roi_pool_and_losses():
    g = compile_spec("det/fast_rcnn.net")
    (p,) = nodes(g, "roi_pool")
    assert p.outputs[0].shape == (64 * N, 512, 7, 7)
    assert p.inputs[0].shape[1:] == (512, 38, 63)
    assert [OPS[l.value.producer.op].name for l in g.losses] == ["cross_entropy", "smooth_l1"]


def test_rcnn_warps_every_region():
    g = compile_spec("det/rcnn.net")
    (c,) = nodes(g, "crop_resize")
    assert c.outputs[0].shape == (128 * N, 3, 224, 224)
    assert c.inputs[0] is g.inputs["image"]            # the CNN runs per region, on pixels
    assert nodes(g, "conv")[0].inputs[0] is c.outputs[0]


def test_fcn_uses_all_four_upsamplings():
    g = compile_spec("det/fcn.net")
    ops = [n.op for n in g.nodes]
    for op in ("max_unpool", "bed_of_nails", "upsample", "conv_transpose"):
        assert op in ops
    (un,) = nodes(g, "max_unpool")
    pool = un.inputs[1].producer
    assert pool.op == "maxpool" and pool.attrs["switches"] and un.inputs[1].index == 1
    assert any(n.op == "conv" and n.attrs["s"] == (2, 2) for n in g.nodes)
    assert g.outputs["logits"].shape == (N, 21, 224, 224)


def test_sliding_window_one_crop_per_pixel():
    g = compile_spec("det/sliding_window.net")
    (p,) = nodes(g, "extract_patches")
    assert p.outputs[0].shape == (N * 64 * 64, 3, 33, 33)
    assert g.outputs["logits"].shape == (N, 21, 64, 64)


def test_cls_loc_two_heads_weighted():
    g = compile_spec("det/cls_loc.net", box_weight=0.3)
    assert [(l.name, l.weight) for l in g.losses] == [("cls", 1.0), ("box", 0.3)]
    assert [l.value.producer.op for l in g.losses] == ["cross_entropy", "l2"]
    assert g.param_count() == VGG16_PARAMS + 4096 * 4 + 4


def test_pose_regresses_14_joints():
    g = compile_spec("det/pose.net")
    assert g.outputs["coords"].shape == (N, 14, 2)
    assert g.losses[0].value.producer.op == "l2"
    assert g.param_count() == VGG16_PARAMS - VGG16_FC8 + 4096 * 28 + 28


def test_densecap_scans_lstm_over_regions():
    g = compile_spec("det/densecap.net")
    (s,) = nodes(g, "scan")
    R = 256 * N
    assert s.inputs[0].shape[0] == R                    # regions are the batch of the RNN
    assert [c.name for c in g.carries] == ["lstm.h", "lstm.c"]
    assert g.outputs["caption_logits"].shape[0] == R
    assert "caption" in [l.name for l in g.losses]


# ---- differentiability

NON_DIFF = ["anchors", "default_boxes", "box_encode", "box_decode", "iou", "nms", "proposals",
            "assign_targets", "sample_anchors", "sample_rois", "hard_negatives", "positive",
            "to_rois", "match_gather", "mask_targets", "keypoint_targets", "yolo_targets",
            "yolo_decode"]


def test_non_differentiable_ops_flagged(compiled):
    for op in NON_DIFF:
        assert OPS[op].differentiable is False, op
    for op in ("roi_pool", "roi_align", "crop_resize", "select_class"):
        assert OPS[op].differentiable and OPS[op].grad_wrt == (0,), op   # not w.r.t. the boxes
    rows = json.loads(compiled[("faster_rcnn", ())].stdout)["nodes"]
    flags = {r["op"]: r["differentiable"] for r in rows}
    assert flags["proposals"] is False and flags["sample_rois"] is False
    assert flags["roi_pool"] is True and flags["conv"] is True


# ---- positioned shape errors

def error_of(tmp_path, text, **kw):
    with pytest.raises(NetdslError) as e:
        compile_text(tmp_path, text, **kw)
    assert e.value.pos is not None
    return e.value


def test_roi_features_with_wrong_channels_into_head(tmp_path):
    e = error_of(tmp_path, f"""import "{SPECS}/lib/det.net"
network t() {{
  input image: f32[N, 3, 600, 1000]
  input rois: f32[R, 5]
  features = image -> conv(256, k=3, p=1) -> maxpool(k=16, s=16)
  x = roi_pool(features, rois) -> vgg_fc(name="fc")
  output x
}}""")
    assert "cannot reshape [R, 256, 7, 7]" in e.message and "25088" in e.message
    assert e.notes and e.notes[0].pos.line == 6          # points at the roi_pool


def test_rois_without_batch_index(tmp_path):
    e = error_of(tmp_path, """network t() {
  input f: f32[N, 512, 38, 63]
  input boxes: f32[R, 4]
  output y = roi_align(f, boxes)
}""")
    assert e.pos.line == 4 and "rois must be [R, 5]" in e.message and e.hint


def test_rpn_anchor_count_mismatch(tmp_path):
    text = (DET / "faster_rcnn.net").read_text().replace('"../lib/det.net"', f'"{SPECS}/lib/det.net"')
    text = text.replace('scores, deltas = rpn(features, A, name="rpn")', 'scores, deltas = rpn(features, 12, name="rpn")')
    e = error_of(tmp_path, text)
    assert e.message.startswith("proposals:") and "anchors" in e.message
    assert e.pos.line == next(i for i, l in enumerate(text.splitlines(), 1) if "proposals(scores" in l)


def test_class_deltas_need_one_label_per_roi(tmp_path):
    e = error_of(tmp_path, """network t() {
  input d: f32[R, 21, 4]
  input labels: i64[N, G]
  output y = select_class(d, labels)
}""")
    assert e.pos.line == 4 and "select_class" in e.message and "[R, classes, 4]" in e.hint
    assert len(e.notes) == 2


def test_cli_reports_position(tmp_path):
    p = tmp_path / "bad.net"
    p.write_text("network t() {\n  input f: f32[N, 512, 38, 63]\n  input b: f32[R, 4]\n"
                 "  output y = roi_pool(f, b)\n}\n")
    r = cli("compile", p)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert re.search(r"bad\.net:4:\d+: error: roi_pool: rois must be \[R, 5\]", r.stderr)
