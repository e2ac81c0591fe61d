"""Detection and segmentation operators: boxes, anchors, RoI features, targets, NMS.

Conventions (those of torchvision, so shapes and semantics can be checked against it):
- a box is (x1, y1, x2, y2) in input-image pixels; a set of boxes is [K, 4], or [N, K, 4]
  per image;
- a RoI is (batch index, x1, y1, x2, y2): RoIs of every image in one [R, 5] tensor, as
  torchvision.ops.roi_pool / roi_align take them;
- labels are i64 class ids with 0 = background and -1 = ignore (losses skip -1);
- `matched` (i64 [R]) is, for each RoI, the index of its ground-truth object in its image,
  or -1 for background RoIs.

Padding (docs/language.md, "Detection"). Proposals, detections and RoIs have a fixed size
so the static planner applies; the rows past an image's real ones are padding, marked so
that they can never be taken for boxes: a padding RoI has image index -1 (and a zero box),
a padding detection label -1 (score 0, zero box), like padded ground truth. An *empty* box
(x2 <= x1 or y2 <= y1; the zero padding box among them) is never a box: it encodes to zero
deltas, has IoU 0, never enters NMS, and to_rois makes it a padding RoI.

Differentiability. Anything that chooses or builds boxes (anchors, encoding, decoding,
IoU, NMS, proposals, target assignment, sampling) is non-differentiable: Faster R-CNN's
"approximate joint training" treats proposals as constants, so `box_decode` has no
gradient either. RoI pooling, RoIAlign and crop_resize are differentiable with respect to
the feature map only (`grad_wrt=(0,)`): the RoI coordinates get no gradient, as in
torchvision.
"""
from __future__ import annotations

from ..ir.dims import fmt_shape, product
from .registry import Attr, Ctx, conv_out, defop, is_float, nonneg, positive

# Anchors, box coding, IoU, proposals and NMS run (kernels/*/boxes.py).
BOXES = dict(kind="detection", differentiable=False)
# Target assignment, sampling and the per-RoI and grid targets run (kernels/*/targets.py).
DET = dict(kind="detection", differentiable=False)


def _fraction(v):
    return None if 0.0 <= v <= 1.0 else "must be in [0, 1]"


def _unit(v):
    return None if 0.0 < v <= 1.0 else "must be in (0, 1]"


def _pos_floats(v):
    return None if v and all(x > 0 for x in v) else "must be a non-empty list of positive numbers"


# ---- input checks shared by the shape rules

def _float(ctx: Ctx, i: int, what: str):
    if not is_float(ctx.inputs[i].dtype):
        ctx.fail(f"{what} must be floating point, got {ctx.inputs[i].dtype}", i)


def _ids(ctx: Ctx, i: int, what: str):
    if ctx.inputs[i].dtype != "i64":
        ctx.fail(f"{what} must be integer ids (i64), got {ctx.inputs[i].dtype}", i)


def _features(ctx: Ctx, i: int = 0):
    v = ctx.inputs[i]
    if v.rank != 4:
        ctx.fail(f"the feature map must be [N, C, H, W], got rank {v.rank}", i)
    _float(ctx, i, "the feature map")
    return v.shape


def _boxes(ctx: Ctx, i: int, what: str = "boxes", batched: bool | None = None):
    """[K, 4] (batched=False), [N, K, 4] (True) or either (None); returns the shape."""
    v = ctx.inputs[i]
    ranks = {False: (2,), True: (3,), None: (2, 3)}[batched]
    want = " or ".join(("[K, 4]", "[N, K, 4]")[r - 2] for r in ranks)
    if v.rank not in ranks or v.shape[-1] != 4:
        ctx.fail(f"{what} must be {want} boxes (x1, y1, x2, y2), got {fmt_shape(v.shape)}", i)
    _float(ctx, i, what)
    return v.shape


def _rois(ctx: Ctx, i: int):
    """[R, 5]: batch index then box. Returns R."""
    v = ctx.inputs[i]
    if v.rank != 2 or v.shape[1] != 5:
        ctx.fail(f"rois must be [R, 5] (batch index, x1, y1, x2, y2), got {fmt_shape(v.shape)}", i,
                 hint="boxes of one image are [K, 4]; RoIs of a batch carry their image index first")
    _float(ctx, i, "rois")
    return v.shape[0]


def _reference(ctx: Ctx, i: int):
    """Anchors [K, 4] or RoIs [R, 5]; returns the count."""
    v = ctx.inputs[i]
    if v.rank != 2 or v.shape[1] not in (4, 5):
        ctx.fail(f"anchors must be [K, 4] (or RoIs [R, 5]), got {fmt_shape(v.shape)}", i)
    _float(ctx, i, "anchors")
    return v.shape[0]


def _gt(ctx: Ctx, ib: int, il: int):
    """Ground truth: boxes [N, G, 4] and labels [N, G]. Returns (N, G)."""
    N, G, _ = _boxes(ctx, ib, "gt_boxes", batched=True)
    lb = ctx.inputs[il]
    _ids(ctx, il, "gt_labels")
    if tuple(lb.shape) != (N, G):
        ctx.fail(f"gt_labels must be [N, G] = {fmt_shape((N, G))} to match gt_boxes", ib, il)
    return N, G


def _matched(ctx: Ctx, i: int, R):
    v = ctx.inputs[i]
    _ids(ctx, i, "matched")
    if tuple(v.shape) != (R,):
        ctx.fail(f"matched must be [R] = {fmt_shape((R,))}, one gt index per RoI", i)


# ---- anchors and default boxes (constants of the architecture)

@defop("anchors", ["feature_map"],
       (Attr("sizes", "floats", (128.0, 256.0, 512.0), check=_pos_floats, doc="box sides in pixels"),
        Attr("ratios", "floats", (0.5, 1.0, 2.0), check=_pos_floats, doc="height / width"),
        Attr("stride", "int", 16, check=positive, doc="pixels per feature-map cell")), **BOXES)
def anchors(ctx: Ctx):
    """Faster R-CNN's anchors: len(sizes) * len(ratios) boxes centred on every cell's corner
    (x, y) * stride, ordered (y, x, anchor) with the anchor fastest, anchor = ratio *
    len(sizes) + size, sides rounded: [H*W*A, 4] (torchvision's AnchorGenerator)."""
    N, C, H, W = _features(ctx)
    return [((H * W * len(ctx.sizes) * len(ctx.ratios), 4), "f32")]


def _ssd_ratios(v):
    ok = isinstance(v, (list, tuple)) and v and all(
        isinstance(r, (list, tuple)) and all(isinstance(x, (int, float)) and x > 0 for x in r) for r in v)
    return None if ok else "must be a list with one list of aspect ratios per feature map"


def _floats_or_none(v):
    return None if all(x > 0 for x in v) else "must be positive numbers (or [] for the default)"


@defop("default_boxes", ["*feature_maps"],
       (Attr("ratios", "any", check=_ssd_ratios, doc="extra aspect ratios per map, e.g. [[2], [2, 3]]"),
        Attr("smin", "float", 0.2, check=_unit), Attr("smax", "float", 0.9, check=_unit),
        Attr("image", "pair", 0, check=nonneg, doc="(H, W): boxes in its pixels; 0 = fractions of the image"),
        Attr("scales", "floats", (), check=_floats_or_none, doc="s_1..s_m+1 instead of smin, smax"),
        Attr("steps", "floats", (), check=_floats_or_none, doc="pixels per cell of each map (needs image)")),
       **BOXES)
def default_boxes(ctx: Ctx):
    """SSD's default boxes over several feature maps. A map with extra ratios r gets
    2 + 2*len(r) boxes per cell (scale s_k and sqrt(s_k s_k+1) at ratio 1, then r and 1/r),
    centred on the cells, as in the SSD paper and torchvision's DefaultBoxGenerator:
    [sum H*W*boxes, 4], ordered (map, y, x, box), in image pixels (or fractions of it)."""
    m = len(ctx.inputs)
    if len(ctx.ratios) != m:
        ctx.fail(f"{m} feature maps but {len(ctx.ratios)} lists of ratios")
    if ctx.scales and len(ctx.scales) != m + 1:
        ctx.fail(f"scales must hold {m + 1} numbers for {m} maps (s_1..s_m and s_m+1), got {len(ctx.scales)}")
    if ctx.steps and (len(ctx.steps) != m or 0 in ctx.image):
        ctx.fail(f"steps must hold one number per map ({m}) and need image=[H, W]")
    total = 0
    for i, r in enumerate(ctx.ratios):
        N, C, H, W = _features(ctx, i)
        total = total + H * W * (2 + 2 * len(r))
    return [((total, 4), "f32")]


# ---- box arithmetic

BOX_WEIGHTS = Attr("weights", "floats", (1.0, 1.0, 1.0, 1.0),
                   check=lambda v: None if len(v) == 4 and all(x > 0 for x in v) else "must be 4 positive numbers",
                   doc="(wx, wy, ww, wh) scale of the deltas: 10,10,5,5 for Fast R-CNN heads and SSD")


def _coder(ctx: Ctx, what: str):
    """[K, 4] or [N, K, 4] against K anchors; or [K, classes, 4] (class-specific deltas of
    K RoIs, decoded against each RoI)."""
    x = ctx.inputs[0]
    if x.rank not in (2, 3) or x.shape[-1] != 4:
        ctx.fail(f"{what} must be [K, 4], [N, K, 4] or [K, classes, 4], got {fmt_shape(x.shape)}", 0)
    _float(ctx, 0, what)
    K = _reference(ctx, 1)
    if x.shape[-2] != K and not (x.rank == 3 and x.shape[0] == K):
        ctx.fail(f"{what} {fmt_shape(x.shape)} do not line up with {K} anchors; there must be one "
                 f"per anchor", 0, 1)
    return [(x.shape, x.dtype)]


@defop("box_encode", ["boxes", "anchors"], (BOX_WEIGHTS,), **BOXES)
def box_encode(ctx: Ctx):
    """Regression targets (dx, dy, dw, dh) of boxes relative to their anchors (or RoIs,
    whose batch column is skipped), torchvision's BoxCoder.encode; an empty box or anchor
    (padding) gets zeros. Builds targets, so it has no gradient."""
    return _coder(ctx, "boxes")


@defop("box_decode", ["deltas", "anchors"], (BOX_WEIGHTS,), **BOXES)
def box_decode(ctx: Ctx):
    """Boxes from predicted deltas and anchors (BoxCoder.decode: dw, dh clamped at
    log(1000/16) before exp). Used for proposals and final detections, which are treated as
    constants (approximate joint training), hence non-differentiable."""
    return _coder(ctx, "deltas")


@defop("iou", ["a", "b"], **BOXES)
def iou(ctx: Ctx):
    """Intersection over union of every pair: [A, 4] x [B, 4] -> [A, B]; with b per image
    [N, B, 4] -> [N, A, B]. 0 where the union is empty (two empty boxes)."""
    A = _boxes(ctx, 0, "a", batched=False)[0]
    bs = _boxes(ctx, 1, "b")
    return [((*bs[:-2], A, bs[-2]), "f32")]


# ---- proposals and non-maximum suppression

def _scores(ctx: Ctx, i: int, N, K, what="scores"):
    """Objectness [N, K] (one logit) or [N, K, 2] (background/object softmax pair)."""
    s = ctx.inputs[i]
    _float(ctx, i, what)
    if not (s.rank == 2 or (s.rank == 3 and s.shape[2] == 2)) or tuple(s.shape[:2]) != (N, K):
        ctx.fail(f"{what} must be [N, K] or [N, K, 2] with N, K = {N}, {K} from the deltas, "
                 f"got {fmt_shape(s.shape)}", i, 1)


@defop("proposals", ["scores", "deltas", "anchors"],
       (Attr("pre_nms", "int", 6000, check=positive, doc="best-scoring anchors kept before NMS"),
        Attr("post_nms", "int", 300, check=positive, doc="proposals kept per image"),
        Attr("iou", "float", 0.7, check=_unit), Attr("min_size", "float", 0.0),
        Attr("image", "pair", 0, check=nonneg, doc="(H, W) to clip to; 0 = no clipping")), **BOXES)
def proposals(ctx: Ctx):
    """The RPN's proposal layer (py-faster-rcnn's order): decode deltas at every anchor,
    clip, drop empty boxes and those with a side under min_size, keep the pre_nms best by
    objectness (the logit, or object minus background), NMS, keep post_nms per image:
    rois [N*post_nms, 5], image n's in rows n*post_nms.., best first; when fewer survive
    the rest are padding (image index -1, zero box)."""
    N, K, _ = _boxes(ctx, 1, "deltas", batched=True)
    Ka = _reference(ctx, 2)
    if Ka != K:
        ctx.fail(f"the RPN predicts deltas for {K} anchors per image but there are {Ka} anchors", 1, 2,
                 hint="the RPN head needs one output group per anchor shape: A = len(sizes) * len(ratios)")
    _scores(ctx, 0, N, K)
    if ctx.post_nms > ctx.pre_nms:
        ctx.fail(f"post_nms={ctx.post_nms} is more than pre_nms={ctx.pre_nms}")
    return [((N * ctx.post_nms, 5), "f32")]


@defop("nms", ["boxes", "scores"],
       (Attr("iou", "float", 0.5, check=_unit), Attr("max_out", "int", 100, check=positive),
        Attr("score_thresh", "float", 0.01, check=_fraction),
        Attr("background", "int", -1, doc="class index never reported (0 for SSD); -1: none")),
       outputs=("boxes", "scores", "labels"), **BOXES)
def nms(ctx: Ctx):
    """Greedy non-maximum suppression per image, and per class when scores are [N, K, C]
    (boxes shared [N, K, 4] or class-specific [N, K, C, 4]): the candidates scoring above
    score_thresh (background and empty boxes never), suppressed within their class at
    IoU > iou, the max_out best by score: boxes [N, M, 4], scores [N, M], labels [N, M]
    (the class; 0 for [N, K] scores). Rows past an image's detections are padding: label -1,
    score 0, zero box."""
    b, s = ctx.inputs
    if b.rank not in (3, 4) or b.shape[-1] != 4:
        ctx.fail(f"boxes must be [N, K, 4] or [N, K, classes, 4], got {fmt_shape(b.shape)}", 0)
    _float(ctx, 0, "boxes")
    _float(ctx, 1, "scores")
    want = tuple(b.shape[:-1]) if b.rank == 4 else None
    if (s.rank not in (2, 3) or tuple(s.shape[:2]) != tuple(b.shape[:2])
            or (want is not None and tuple(s.shape) != want)):
        ctx.fail(f"scores must be [N, K] or [N, K, classes] to match boxes {fmt_shape(b.shape)}, "
                 f"got {fmt_shape(s.shape)}", 0, 1)
    C = s.shape[2] if s.rank == 3 else 1
    if isinstance(C, int) and ctx.background >= 0 and (ctx.background >= C or C == 1):
        ctx.fail(f"background={ctx.background} leaves no class of the scores {fmt_shape(s.shape)} "
                 f"to report", 1, hint="background=-1 reports every class")
    N = b.shape[0]
    M = ctx.max_out
    return [((N, M, 4), "f32"), ((N, M), "f32"), ((N, M), "i64")]


@defop("to_rois", ["boxes"], **BOXES)
def to_rois(ctx: Ctx):
    """Boxes per image [N, K, 4] -> RoIs [N*K, 5], each prefixed with its image index; an
    empty box (a padding detection's) becomes a padding RoI (index -1, zero box)."""
    N, K, _ = _boxes(ctx, 0, "boxes", batched=True)
    return [((N * K, 5), "f32")]


# ---- RoI features

def _roi_out(ctx: Ctx):
    N, C, H, W = _features(ctx)
    R = _rois(ctx, 1)
    return R, C, ctx.out


ROI_SCALE = Attr("scale", "float", 1 / 16, check=_unit, doc="feature-map cells per image pixel")


def _roi_size(default):
    return Attr("out", "pair", default, check=positive, doc="output size (h, w)")


@defop("roi_pool", ["features", "rois"], (_roi_size(7), ROI_SCALE), kind="detection", vjp="kernel", grad_wrt=(0,))
def roi_pool(ctx: Ctx):
    """Fast R-CNN's RoI max pooling (torchvision.ops.roi_pool): each RoI, scaled by `scale`
    and snapped to cells, is split into out x out bins, each max-pooled (0 for a bin off the
    map): [R, C, oh, ow]. The gradient goes to each bin's argmax."""
    R, C, (oh, ow) = _roi_out(ctx)
    return [((R, C, oh, ow), ctx.x().dtype)]


@defop("roi_align", ["features", "rois"],
       (_roi_size(14), ROI_SCALE,
        Attr("sampling", "int", 2, check=positive, doc="bilinear samples per bin along each axis"),
        Attr("aligned", "bool", False, doc="shift by half a pixel (Detectron2's aligned=True)")),
       kind="detection", vjp="kernel", grad_wrt=(0,),
       macs=lambda ctx: product(ctx.outputs[0].shape) * ctx.sampling ** 2 * 4)
def roi_align(ctx: Ctx):
    """Mask R-CNN's RoIAlign (torchvision.ops.roi_align): no snapping; every bin averages
    sampling x sampling bilinear samples (4 multiply-adds each), a sample more than a cell
    off the map counting 0: [R, C, oh, ow]. The gradient spreads over the samples' cells."""
    R, C, (oh, ow) = _roi_out(ctx)
    return [((R, C, oh, ow), ctx.x().dtype)]


@defop("crop_resize", ["image", "boxes"], (Attr("size", "pair", 224, check=positive),),
       kind="detection", vjp="kernel", grad_wrt=(0,),
       macs=lambda ctx: product(ctx.outputs[0].shape) * 4)
def crop_resize(ctx: Ctx):
    """R-CNN's warp: crop each RoI [R, 5] out of the image and resize it bilinearly to
    size x size, ignoring its aspect ratio: [R, C, h, w]. Exactly roi_align(out=size,
    scale=1, sampling=1, aligned=true): one sample at the centre of each output pixel, as
    F.interpolate(bilinear, align_corners=False) resizes an image. No gradient to the boxes."""
    N, C, H, W = _features(ctx)
    R = _rois(ctx, 1)
    return [((R, C, *ctx.size), ctx.x().dtype)]


@defop("extract_patches", ["x"], (Attr("k", "pair", check=positive), Attr("s", "pair", 1, check=positive),
                                  Attr("p", "pair", 0, check=nonneg)),
       kind="layer", vjp="kernel")
def extract_patches(ctx: Ctx):
    """Every k x k window (stride s, zero padding p) as its own image, in (n, y, x) order:
    [N, C, H, W] -> [N*Ho*Wo, C, kh, kw]. The sliding-window baseline runs a patch
    classifier on these, sharing nothing between overlapping windows."""
    N, C, H, W = _features(ctx)
    ho = conv_out(H, ctx.k[0], ctx.s[0], ctx.p[0])
    wo = conv_out(W, ctx.k[1], ctx.s[1], ctx.p[1])
    if ho is None or wo is None:
        ctx.fail(f"a {ctx.k[0]}x{ctx.k[1]} window does not fit the {H}x{W} input", 0)
    ctx.attrs["grid"] = (ho, wo)
    return [((N * ho * wo, C, *ctx.k), ctx.x().dtype)]


@defop("l2norm", ["x"], (Attr("scale", "float", 20.0, doc="initial per-channel scale"),
                         Attr("eps", "float", 1e-10, check=lambda v: None if v > 0 else "must be positive",
                              doc="added to the sum of squares (Caffe SSD's Normalize)")),
       kind="layer", vjp="kernel", inits=("constant",),
       params=lambda ctx: {"weight": ((ctx.x().shape[1],), f"constant({ctx.scale!r})", "scale")})
def l2norm(ctx: Ctx):
    """SSD's L2Norm on conv4_3: normalise each position's channel vector, then scale it by
    a learned per-channel weight (initialised to `scale`):
    y[n, c] = x[n, c] / sqrt(sum_c x[n, c]^2 + eps) * weight[c]. Gradients to x and weight."""
    _features(ctx)
    return [(ctx.x().shape, ctx.x().dtype)]


@defop("select_class", ["x", "labels"], kind="layer", vjp="kernel", grad_wrt=(0,))
def select_class(ctx: Ctx):
    """Per row, the slice of the labelled class: x [R, classes, ...] with labels [R] ->
    [R, ...] (zeros for label -1, ignored). Class-specific box deltas and Mask R-CNN's
    per-class masks are trained only for the ground-truth class of their RoI: the gradient
    goes to that slice, none to the labels."""
    x, lb = ctx.inputs
    _ids(ctx, 1, "labels")
    if x.rank < 2 or tuple(lb.shape) != (x.shape[0],):
        ctx.fail(f"x must be [R, classes, ...] and labels [R]; got {fmt_shape(x.shape)} and "
                 f"{fmt_shape(lb.shape)}", 0, 1, hint="reshape box deltas [R, 4*classes] to [R, classes, 4]")
    return [((x.shape[0], *x.shape[2:]), x.dtype)]


# ---- training targets: assignment and sampling (non-differentiable)

@defop("assign_targets", ["anchors", "gt_boxes", "gt_labels"],
       (Attr("fg_iou", "float", 0.7, check=_unit), Attr("bg_iou", "float", 0.3, check=_fraction),
        Attr("binary", "bool", False, doc="label every foreground 1 (RPN objectness)")),
       outputs=("labels", "boxes"), **DET)
def assign_targets(ctx: Ctx):
    """Match every anchor to its best ground-truth box (torchvision's Matcher with
    allow_low_quality_matches): IoU >= fg_iou -> that object's label (1 if binary), < bg_iou
    -> 0 (background), in between -> -1 (ignored); an anchor that is some gt box's best
    (IoU > 0, ties included) is foreground too; padding gt (label -1) never matches.
    labels [N, K] and the matched gt boxes [N, K, 4] (zeros where no gt is matched).
    RoIs [K, 5] as anchors: those of other images (or padding) are labelled -1 in image n."""
    K = _reference(ctx, 0)
    N, G = _gt(ctx, 1, 2)
    if ctx.bg_iou > ctx.fg_iou:
        ctx.fail(f"bg_iou={ctx.bg_iou} is above fg_iou={ctx.fg_iou}")
    return [((N, K), "i64"), ((N, K, 4), "f32")]


@defop("sample_anchors", ["labels"], (Attr("batch", "int", 256, check=positive),
                                       Attr("fg_fraction", "float", 0.5, check=_fraction)), **DET)
def sample_anchors(ctx: Ctx):
    """Keep a random `batch` anchors per image, at most fg_fraction foreground (label > 0),
    the rest background (label 0) as far as there are; the others become -1 (ignored by the
    losses). torchvision's BalancedPositiveNegativeSampler, seeded like dropout. Same shape
    as labels."""
    _ids(ctx, 0, "labels")
    if ctx.x().rank != 2:
        ctx.fail(f"labels must be [N, K], got {fmt_shape(ctx.x().shape)}", 0)
    return [(ctx.x().shape, "i64")]


@defop("hard_negatives", ["logits", "labels"], (Attr("ratio", "int", 3, check=positive),), **DET)
def hard_negatives(ctx: Ctx):
    """SSD's hard negative mining (torchvision's SSD loss): per image keep the negatives
    (label 0) whose cross-entropy of class 0 is highest, ratio per positive (label > 0);
    the other negatives become -1. logits [N, K, classes], labels [N, K] -> [N, K]."""
    lg, lb = ctx.inputs
    _ids(ctx, 1, "labels")
    if lg.rank != 3 or tuple(lb.shape) != tuple(lg.shape[:2]):
        ctx.fail("logits must be [N, K, classes] and labels [N, K]", 0, 1)
    return [(lb.shape, "i64")]


@defop("sample_rois", ["rois", "gt_boxes", "gt_labels"],
       (Attr("batch", "int", 512, check=positive, doc="RoIs per image"),
        Attr("fg_fraction", "float", 0.25, check=_fraction),
        Attr("fg_iou", "float", 0.5, check=_unit), Attr("bg_iou", "float", 0.5, check=_fraction),
        Attr("bg_lo", "float", 0.0, check=_fraction,
             doc="background needs IoU >= bg_lo too (Fast R-CNN's 0.1; torchvision's 0)")),
       outputs=("rois", "labels", "boxes", "matched"), **DET)
def sample_rois(ctx: Ctx):
    """Fast R-CNN's minibatch (torchvision's select_training_samples): add the gt boxes to
    the image's proposals, match them (IoU >= fg_iou -> that object's class, in [bg_lo,
    bg_iou) -> background, else ignored), then sample `batch` per image with at most
    fg_fraction foreground, seeded like dropout. rois [N*batch, 5] (image n's in rows
    n*batch.., in proposal order, then padding), labels [N*batch], matched gt boxes
    [N*batch, 4] (zeros for background), matched gt index [N*batch] (-1 for background)."""
    _rois(ctx, 0)
    N, G = _gt(ctx, 1, 2)
    if ctx.bg_lo > ctx.bg_iou:
        ctx.fail(f"bg_lo={ctx.bg_lo} is above bg_iou={ctx.bg_iou}: no IoU would be background")
    if ctx.bg_iou > ctx.fg_iou:
        ctx.fail(f"bg_iou={ctx.bg_iou} is above fg_iou={ctx.fg_iou}")
    R = N * ctx.batch
    return [((R, 5), "f32"), ((R,), "i64"), ((R, 4), "f32"), ((R,), "i64")]


@defop("positive", ["labels"], (Attr("min", "int", 1, doc="the smallest label that gives 1.0"),), **DET)
def positive_(ctx: Ctx):
    """1.0 where the label is >= min, else 0.0. min 1 (foreground): the weight that restricts
    box, mask and keypoint losses to positive anchors and RoIs; min 0: every sampled one
    (-1 is ignored), the RPN box loss's divisor."""
    _ids(ctx, 0, "labels")
    return [(ctx.x().shape, "f32")]


@defop("match_gather", ["gt", "rois", "matched"], (Attr("fill", "int", -1),), **DET)
def match_gather(ctx: Ctx):
    """Per RoI, the ground-truth entry of its matched object: gt [N, G, ...] -> [R, ...];
    background RoIs get `fill` (e.g. -1 caption tokens, which the loss ignores)."""
    g = ctx.inputs[0]
    if g.rank < 2:
        ctx.fail(f"gt must be [N, G, ...], got {fmt_shape(g.shape)}", 0)
    R = _rois(ctx, 1)
    _matched(ctx, 2, R)
    return [((R, *g.shape[2:]), g.dtype)]


@defop("mask_targets", ["gt_masks", "rois", "matched"], (Attr("size", "int", 28, check=positive),), **DET)
def mask_targets(ctx: Ctx):
    """Mask R-CNN's mask targets: each RoI's matched gt mask, cropped to the RoI and
    resized to size x size by RoIAlign (scale 1, adaptive sampling, not aligned: torchvision's
    project_masks_on_boxes); zeros for background and padding RoIs:
    gt_masks [N, G, H, W] -> [R, s, s]."""
    m = ctx.inputs[0]
    if m.rank != 4:
        ctx.fail(f"gt_masks must be [N, G, H, W], got {fmt_shape(m.shape)}", 0)
    _float(ctx, 0, "gt_masks")
    R = _rois(ctx, 1)
    _matched(ctx, 2, R)
    return [((R, ctx.size, ctx.size), "f32")]


@defop("keypoint_targets", ["gt_keypoints", "rois", "matched"], (Attr("size", "int", 56, check=positive),), **DET)
def keypoint_targets(ctx: Ctx):
    """Mask R-CNN's keypoint targets (torchvision's keypoints_to_heatmap): each visible
    keypoint (x, y, visibility > 0) of the matched object, as the index y*size + x of its
    cell in the RoI's size x size heatmap; -1 when invisible, outside the RoI or for
    background: gt [N, G, K, 3] -> i64 [R, K], the labels of a softmax over the cells."""
    k = ctx.inputs[0]
    if k.rank != 4 or k.shape[3] != 3:
        ctx.fail(f"gt_keypoints must be [N, G, K, 3] (x, y, visibility), got {fmt_shape(k.shape)}", 0)
    _float(ctx, 0, "gt_keypoints")
    R = _rois(ctx, 1)
    _matched(ctx, 2, R)
    return [((R, k.shape[2]), "i64")]


# ---- YOLO v1

YOLO_ATTRS = (Attr("boxes", "int", 2, check=positive, doc="B, boxes per cell"),
              Attr("classes", "int", 20, check=positive, doc="C"))


def _yolo_grid(ctx: Ctx):
    p = ctx.inputs[0]
    depth = ctx.boxes * 5 + ctx.classes
    if p.rank != 4 or p.shape[1] != p.shape[2] or p.shape[3] != depth:
        ctx.fail(f"predictions must be [N, S, S, B*5 + C] = [N, S, S, {depth}] for B={ctx.boxes}, "
                 f"C={ctx.classes}; got {fmt_shape(p.shape)}", 0)
    _float(ctx, 0, "predictions")
    return p.shape[0], p.shape[1]


YOLO_IMAGE = Attr("image", "pair", 448, check=positive, doc="(H, W) of the input image, in whose pixels boxes are")


@defop("yolo_targets", ["pred", "gt_boxes", "gt_labels"], YOLO_ATTRS + (YOLO_IMAGE,),
       outputs=("target", "obj", "noobj", "cell"), ids=lambda ctx: {2: (ctx.classes + 1, -1)}, **DET)
def yolo_targets(ctx: Ctx):
    """YOLO v1's targets from gt boxes in image pixels with labels 1..C (0 or -1: none).
    The cell holding an object's centre is responsible for it (the first object wins a
    cell), and within it the predictor whose box has the highest IoU with it (hence `pred`;
    if none overlaps, the nearest in (x, y, w, h), as darknet). target is laid out like
    pred: per box (x, y relative to the cell, sqrt w, sqrt h relative to the image, conf =
    that IoU), then one-hot class; zeros elsewhere. obj [N, S, S, B] marks responsible
    predictors, noobj = 1 - obj, cell [N, S, S] the cells that hold an object. The loss
    terms and their lambdas are written in the spec (specs/det/yolo_v1.net)."""
    N, S = _yolo_grid(ctx)
    _gt(ctx, 1, 2)
    return [(ctx.inputs[0].shape, "f32"), ((N, S, S, ctx.boxes), "f32"),
            ((N, S, S, ctx.boxes), "f32"), ((N, S, S), "f32")]


@defop("yolo_decode", ["pred"], YOLO_ATTRS + (YOLO_IMAGE,), outputs=("boxes", "scores"), **DET)
def yolo_decode(ctx: Ctx):
    """Every predictor's box in image pixels (clipped to the image) and its class-specific
    confidences Pr(class) x confidence (each clamped at 0), in (row, column, predictor)
    order: boxes [N, S*S*B, 4], scores [N, S*S*B, 1 + C] with column 0 (background) zero,
    so that nms(background=0) labels classes 1..C like the gt; then nms."""
    N, S = _yolo_grid(ctx)
    K = S * S * ctx.boxes
    return [((N, K, 4), "f32"), ((N, K, 1 + ctx.classes), "f32")]
