"""Structural operators (reshape, concat, split, slice...), softmax, embedding and losses."""
from __future__ import annotations

from ..ir.dims import Sym, fmt_shape, is_dim, product
from .registry import Attr, Ctx, defop, is_float, nonneg, positive


def _axis(ctx: Ctx, axis: int, rank: int, i: int = 0) -> int:
    a = axis + rank if axis < 0 else axis
    if not 0 <= a < rank:
        ctx.fail(f"axis {axis} is out of range for a tensor of rank {rank}", i)
    return a


@defop("flatten", ["x"], (Attr("start", "int", 1),), kind="structural", vjp=lambda b, n, g: _reshape_back(b, n, g))
def flatten(ctx: Ctx):
    """Merge every axis from `start` on into one: [N, C, H, W] -> [N, C*H*W]."""
    x = ctx.x()
    a = _axis(ctx, ctx.start, x.rank)
    return [((*x.shape[:a], product(x.shape[a:])), x.dtype)]


@defop("reshape", ["x"], (Attr("shape", "dims"),), kind="structural", vjp=lambda b, n, g: _reshape_back(b, n, g))
def reshape(ctx: Ctx):
    """Reshape; one entry may be -1 and is then inferred."""
    x = ctx.x()
    shape = list(ctx.shape)
    total = product(x.shape)
    holes = [i for i, d in enumerate(shape) if d == -1]
    if len(holes) > 1:
        ctx.fail("only one entry of the new shape may be -1")
    if holes:
        known = product(d for d in shape if d != -1)
        inferred = total // known
        if inferred * known != total:
            ctx.fail(f"cannot reshape {fmt_shape(x.shape)} ({total} elements) to {fmt_shape(shape)}", 0)
        shape[holes[0]] = inferred
    elif product(shape) != total:
        ctx.fail(f"cannot reshape {fmt_shape(x.shape)} ({total} elements) "
                 f"to {fmt_shape(shape)} ({product(shape)} elements)", 0)
    return [(tuple(shape), x.dtype)]


@defop("transpose", ["x"], (Attr("perm", "ints"),), kind="structural",
       vjp=lambda b, n, g: ([b.one("transpose", [g[0]], {"perm": tuple(sorted(range(len(n.attrs["perm"])), key=lambda i: n.attrs["perm"][i]))}, n)], {}))
def transpose(ctx: Ctx):
    """Permute axes: perm[i] is the input axis that becomes output axis i."""
    x = ctx.x()
    if sorted(ctx.perm) != list(range(x.rank)):
        ctx.fail(f"perm {list(ctx.perm)} is not a permutation of the {x.rank} axes", 0)
    return [(tuple(x.shape[p] for p in ctx.perm), x.dtype)]


@defop("coords", ["x"], kind="structural", differentiable=False)
def coords(ctx: Ctx):
    """CoordConv's coordinate channels (Liu et al. 2018) for a feature map x [N, C, H, W]:
    [N, 2, H, W], channel 0 each cell's centre x and channel 1 its centre y, scaled to
    [-1, 1]. Concatenated to features, they tell later layers (and an attention's
    weighted sum) where a location is. No gradient: they do not depend on x's values."""
    x = ctx.x()
    if x.rank != 4:
        ctx.fail(f"coords needs a feature map [N, C, H, W], got rank {x.rank}", 0)
    if not is_float(x.dtype):
        ctx.fail(f"coords needs a floating-point feature map, got {x.dtype}", 0)
    return [((x.shape[0], 2, x.shape[2], x.shape[3]), x.dtype)]


@defop("concat", ["*xs"], (Attr("axis", "int", 1),), kind="structural", vjp=lambda b, n, g: _concat_vjp(b, n, g))
def concat(ctx: Ctx):
    """Join tensors along an axis (inception's branch merge; [h; x] in an LSTM)."""
    first = ctx.inputs[0]
    a = _axis(ctx, ctx.axis, first.rank)
    total = 0
    for i, v in enumerate(ctx.inputs):
        if v.rank != first.rank:
            ctx.fail(f"input {i + 1} has rank {v.rank} but input 1 has rank {first.rank}", 0, i)
        if v.dtype != first.dtype:
            ctx.fail(f"input {i + 1} is {v.dtype} but input 1 is {first.dtype}", 0, i)
        for j, (d1, d2) in enumerate(zip(first.shape, v.shape)):
            if j != a and d1 != d2:
                ctx.fail(f"inputs disagree on axis {j} ({d1} vs {d2}); only axis {a} may differ", 0, i)
        total = total + v.shape[a]
    return [((*first.shape[:a], total, *first.shape[a + 1:]), first.dtype)]


@defop("split", ["x"], (Attr("parts", "ints", check=positive), Attr("axis", "int", 1)),
       kind="structural", outputs=("*parts",), vjp=lambda b, n, g: _split_vjp(b, n, g))
def split(ctx: Ctx):
    """Split into n equal parts (parts=n) or parts of given sizes (parts=[a, b, ...])."""
    x = ctx.x()
    a = _axis(ctx, ctx.axis, x.rank)
    size = x.shape[a]
    if len(ctx.parts) == 1:
        n = ctx.parts[0]
        each = size // n
        if each * n != size:
            ctx.fail(f"axis {a} of size {size} does not split into {n} equal parts", 0)
        sizes = [each] * n
    else:
        sizes = list(ctx.parts)
        if sum(sizes) != size:
            ctx.fail(f"part sizes {sizes} add up to {sum(sizes)}, but axis {a} has size {size}", 0)
    return [((*x.shape[:a], s, *x.shape[a + 1:]), x.dtype) for s in sizes]


@defop("slice", ["x"], (Attr("index", "any"),), kind="structural",
       vjp=lambda b, n, g: ([b.one("slice_grad", [g[0]], {"index": n.attrs["index"], "shape": n.inputs[0].shape}, n)], {}))
def slice_(ctx: Ctx):
    """x[i], x[a:b], x[:, -1]...: each entry an integer (drops the axis) or a (start, stop) range."""
    x = ctx.x()
    if len(ctx.index) > x.rank:
        ctx.fail(f"{len(ctx.index)} indices for a tensor of rank {x.rank}", 0)
    out = []
    for ax, ix in enumerate(ctx.index):
        size = x.shape[ax]
        if isinstance(ix, tuple):
            start, stop = ix
            start = 0 if start is None else start
            stop = size if stop is None else stop
            if isinstance(size, int):
                start = start + size if isinstance(start, int) and start < 0 else start
                stop = stop + size if isinstance(stop, int) and stop < 0 else stop
                if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop <= size):
                    ctx.fail(f"range {ix[0]}:{ix[1]} is empty or out of bounds for axis {ax} of size {size}", 0)
            elif isinstance(start, int) and start < 0 or isinstance(stop, int) and stop < 0:
                stop = size + stop if isinstance(stop, int) and stop < 0 else stop
                start = size + start if isinstance(start, int) and start < 0 else start
            out.append(stop - start)
        else:
            if isinstance(size, int) and not -size <= ix < size:
                ctx.fail(f"index {ix} is out of bounds for axis {ax} of size {size}", 0)
    out += list(x.shape[len(ctx.index):])
    return [(tuple(out), x.dtype)]


@defop("softmax", ["x"], (Attr("axis", "int", -1),), kind="layer", vjp="kernel")
def softmax(ctx: Ctx):
    """Softmax along an axis."""
    _axis(ctx, ctx.axis, ctx.x().rank)
    return [(ctx.x().shape, ctx.x().dtype)]


@defop("log_softmax", ["x"], (Attr("axis", "int", -1),), kind="layer", vjp="kernel")
def log_softmax(ctx: Ctx):
    """Log of the softmax, computed stably."""
    _axis(ctx, ctx.axis, ctx.x().rank)
    return [(ctx.x().shape, ctx.x().dtype)]


def reduced_axes(axis, rank: int) -> tuple[int, ...]:
    """The axes a sum/mean node reduces, as sorted non-negative ints (`axis` is its
    attribute: a tuple of ints, or one int as in graphs made before lists were taken)."""
    axes = axis if isinstance(axis, (tuple, list)) else (axis,)
    return tuple(sorted(a % rank for a in axes))


def _reduce(ctx: Ctx):
    x = ctx.x()
    if not ctx.axis:
        ctx.fail("needs at least one axis", 0, hint=f"{ctx.op.name}(x, [2, 3]) reduces axes 2 and 3")
    axes = [_axis(ctx, a, x.rank) for a in ctx.axis]
    twice = sorted({a for a in axes if axes.count(a) > 1})
    if twice:
        ctx.fail(f"axis {twice[0]} is given twice in {list(ctx.axis)}", 0)
    if ctx.keepdim:
        return [(tuple(1 if i in axes else d for i, d in enumerate(x.shape)), x.dtype)]
    return [(tuple(d for i, d in enumerate(x.shape) if i not in axes), x.dtype)]


_REDUCE_ATTRS = (Attr("axis", "ints", (-1,), doc="an axis or a list of axes"),
                 Attr("keepdim", "bool", False, doc="keep each reduced axis with size 1"))


@defop("sum", ["x"], _REDUCE_ATTRS, kind="layer", vjp="kernel")
def sum_(ctx: Ctx):
    """Sum over an axis or a list of axes (removed, or kept with size 1 by keepdim=true)."""
    return _reduce(ctx)


@defop("mean", ["x"], _REDUCE_ATTRS, kind="layer", vjp="kernel")
def mean(ctx: Ctx):
    """Mean over an axis or a list of axes (removed, or kept with size 1 by keepdim=true)."""
    return _reduce(ctx)


@defop("detach", ["x"], kind="structural", differentiable=False)
def detach(ctx: Ctx):
    """Identity whose gradient is zero: stops the backward pass here."""
    return [(ctx.x().shape, ctx.x().dtype)]


def _reshape_back(b, n, g):
    return [b.one("reshape", [g[0]], {"shape": tuple(n.inputs[0].shape)}, n)], {}


def _concat_vjp(b, n, g):
    if len(n.inputs) == 1:
        return [g[0]], {}
    axis = n.attrs["axis"] % n.inputs[0].rank
    parts = b.emit("split", [g[0]], {"parts": tuple(v.shape[axis] for v in n.inputs), "axis": axis}, n)
    return list(parts), {}


def _split_vjp(b, n, g):
    g = [gi if gi is not None else b.one("zeros", [], {"shape": v.shape, "dtype": v.dtype}, n)
         for gi, v in zip(g, n.outputs)]
    return [b.one("concat", g, {"axis": n.attrs["axis"]}, n) if len(g) > 1 else g[0]], {}


@defop("slice_grad", ["g"], (Attr("index", "any"), Attr("shape", "dims")), kind="grad", differentiable=False)
def slice_grad(ctx: Ctx):
    """Gradient of slice: g placed into zeros of the input's shape."""
    return [(tuple(ctx.shape), ctx.x().dtype)]


@defop("sum_to", ["g"], (Attr("shape", "dims"),), kind="grad", differentiable=False)
def sum_to(ctx: Ctx):
    """Sum a gradient over the axes its forward operand was broadcast along."""
    return [(tuple(ctx.shape), ctx.x().dtype)]


@defop("fill", [], (Attr("shape", "dims"), Attr("value", "float"), Attr("dtype", "str", "f32")),
       kind="structural", differentiable=False)
def fill(ctx: Ctx):
    """A tensor filled with one value (the seed of a loss's gradient is its weight)."""
    return [(tuple(ctx.shape), ctx.dtype)]


@defop("zeros", [], (Attr("shape", "dims"), Attr("dtype", "str", "f32", choices=("f32", "f64", "i64"))),
       kind="structural", differentiable=False)
def zeros(ctx: Ctx):
    """A tensor of zeros, e.g. the initial state of a recurrence: zeros([N, H])."""
    return [(tuple(ctx.shape), ctx.dtype)]


@defop("embedding", ["ids"], (Attr("vocab", "int", check=positive), Attr("dim", "int", check=positive)),
       params=lambda ctx: {"weight": ((ctx.vocab, ctx.dim), "normal1", "weight")}, inits=("normal1",), vjp="kernel",
       ids=lambda ctx: {0: (ctx.vocab, None)})
def embedding(ctx: Ctx):
    """Look up a learned vector per integer id: [...] -> [..., dim]."""
    if ctx.x().dtype != "i64":
        ctx.fail(f"ids must be i64, got {ctx.x().dtype}", 0)
    return [((*ctx.x().shape, ctx.dim), "f32")]


@defop("one_hot", ["ids"], (Attr("classes", "int", check=positive),), differentiable=False,
       ids=lambda ctx: {0: (ctx.classes, None)})
def one_hot(ctx: Ctx):
    """Integer ids to one-hot float vectors."""
    if ctx.x().dtype != "i64":
        ctx.fail(f"ids must be i64, got {ctx.x().dtype}", 0)
    return [((*ctx.x().shape, ctx.classes), "f32")]


# ---- losses: each returns a scalar (mean over the batch)

def _scalar(ctx: Ctx):
    return [((), ctx.x().dtype)]


def _same_shape(ctx: Ctx):
    p, t = ctx.inputs[:2]
    if tuple(p.shape) != tuple(t.shape):
        ctx.fail("prediction and target must have the same shape", 0, 1)
    if len(ctx.inputs) > 2 and ctx.inputs[2] is not None:
        w = ctx.inputs[2]
        if tuple(w.shape) not in (tuple(p.shape), tuple(p.shape[:-1])):
            ctx.fail("the weight must have the prediction's shape, or that shape without its last axis", 0, 2)
        if not is_float(w.dtype):
            ctx.fail(f"the weight must be floating point, got {w.dtype}", 2)
    return _scalar(ctx)


# The point losses' reduction: sum(w * loss) over every element of pred (the weight of a
# row applies to each element of the row), divided by
#   elements  the number of elements of pred: torch's mean of w * loss (the weight=
#             of binary_cross_entropy_with_logits); unweighted, the plain mean;
#   rows      the number of rows (elements / the last axis): torchvision's box regression,
#             summed over a box's 4 numbers and divided by the RoIs or anchors in the batch;
#   weight    the sum of the weights over the elements: the mean over what is weighted
#             (pose: over the visible joints' coordinates); 0 where every weight is 0.
#   weight_rows  the sum of the weights, a row's counted once (a per-row weight's sum; per
#             element, that sum / the last axis): torchvision's RPN box loss, the positives'
#             deltas summed and divided by the sampled anchors (weight 1 on each of them).
# The weight gets no gradient.
_NORM = Attr("norm", "str", "elements", choices=("elements", "rows", "weight", "weight_rows"),
             doc="divide sum(weight * loss) by the element count, the row count, the sum of the weights, "
                 "or that sum with each row counted once")


@defop("cross_entropy", ["logits", "labels"], (Attr("ignore_index", "int", -1),), kind="loss",
       vjp="kernel", grad_wrt=(0,),
       ids=lambda ctx: {1: (ctx.inputs[0].shape[-1 if ctx.inputs[0].rank == 3 else 1], ctx.ignore_index)})
def cross_entropy(ctx: Ctx):
    """Softmax cross-entropy. logits [N, C] with labels [N]; [N, C, H, W] with [N, H, W]
    (per pixel); [N, T, C] with [N, T] (per step). Labels equal to ignore_index are skipped."""
    lg, lb = ctx.inputs
    if lb.dtype != "i64":
        ctx.fail(f"labels must be integer class ids (i64), got {lb.dtype}", 1,
                 hint="for soft or binary targets use bce or l2")
    if lg.rank == 3:    # sequence [N, T, C]
        want = lg.shape[:2]
    else:
        want = (lg.shape[0], *lg.shape[2:])
    if tuple(lb.shape) != tuple(want):
        ctx.fail(f"labels should have shape {fmt_shape(want)} for logits of shape {fmt_shape(lg.shape)}", 0, 1)
    return _scalar(ctx)


@defop("l2", ["pred", "target", "weight"], (_NORM,), kind="loss", optional_inputs=1, vjp="kernel",
       grad_wrt=(0,))
def l2(ctx: Ctx):
    """Mean squared error (the notes' L2 loss), optionally weighted per element or per row
    (a weight of 0 leaves an element out: pose's invisible joints)."""
    return _same_shape(ctx)


@defop("smooth_l1", ["pred", "target", "weight"], (Attr("beta", "float", 1.0, check=nonneg), _NORM),
       kind="loss", optional_inputs=1, vjp="kernel", grad_wrt=(0,))
def smooth_l1(ctx: Ctx):
    """Huber-style box regression loss of Fast R-CNN, optionally weighted (only positives count)."""
    return _same_shape(ctx)


@defop("bce", ["logits", "target", "weight"], (_NORM,), kind="loss", optional_inputs=1, vjp="kernel",
       grad_wrt=(0,))
def bce(ctx: Ctx):
    """Binary cross-entropy on logits (per-pixel masks, objectness), optionally weighted."""
    return _same_shape(ctx)


def _count(v):
    return None if v >= 0 else "must not be negative"


def _pad_vjp(b, n, g):
    """The gradient of zero-padding is the slice that drops the padding."""
    x = n.inputs[0]
    a = n.attrs["axis"] % x.rank
    index = ((None, None),) * a + ((n.attrs["before"], n.attrs["before"] + x.shape[a]),)
    return [b.one("slice", [g[0]], {"index": index}, n)], {}


@defop("pad", ["x"], (Attr("before", "int", check=_count), Attr("after", "int", check=_count),
                      Attr("axis", "int", 1)), kind="structural", vjp=_pad_vjp)
def pad(ctx: Ctx):
    """Zero-pad one axis (channels by default): `before` zeros in front, `after` behind.
    The parameter-free "option A" shortcut of CIFAR ResNets pads channels this way."""
    x = ctx.x()
    a = _axis(ctx, ctx.axis, x.rank)
    return [((*x.shape[:a], x.shape[a] + ctx.before + ctx.after, *x.shape[a + 1:]), x.dtype)]
