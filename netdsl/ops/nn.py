"""Layers of the CNN classics: convolution, pooling, normalisation, linear, dropout."""
from __future__ import annotations

from ..ir.dims import product
from .registry import Attr, Ctx, defop, nonneg, positive, prob, conv_out, need_rank, is_float

CONV_ATTRS = (
    Attr("c", "int", check=positive, doc="output channels"),
    Attr("k", "pair", check=positive, doc="kernel size"),
    Attr("s", "pair", 1, check=positive, doc="stride"),
    Attr("p", "pair", 0, check=nonneg, doc="zero padding"),
    Attr("d", "pair", 1, check=positive, doc="dilation"),
    Attr("groups", "int", 1, check=positive),
    Attr("bias", "bool", True),
)


def _float_input(ctx: Ctx, i: int = 0):
    if not is_float(ctx.inputs[i].dtype):
        ctx.fail(f"needs a floating-point tensor, got {ctx.inputs[i].dtype}", i)


def _check_groups(ctx: Ctx, cin):
    g = ctx.groups
    if isinstance(cin, int) and cin % g:
        ctx.fail(f"input channels {cin} are not divisible by groups={g}", 0)
    if ctx.c % g:
        ctx.fail(f"output channels c={ctx.c} are not divisible by groups={g}")


def _window(ctx: Ctx, H, W, k, s, p, d=(1, 1), ceil=False):
    ho, wo = conv_out(H, k[0], s[0], p[0], d[0], ceil), conv_out(W, k[1], s[1], p[1], d[1], ceil)
    if ho is None or wo is None:
        ctx.fail(f"window {k[0]}x{k[1]} (dilation {d[0]}x{d[1]}, padding {p[0]}x{p[1]}) "
                 f"is larger than the {H}x{W} input", 0,
                 hint="reduce the kernel or add padding, or check the input size")
    return ho, wo


def _conv_params(ctx: Ctx):
    cin = ctx.x().shape[1]
    kh, kw = ctx.k
    ps = {"weight": ((ctx.c, cin // ctx.groups, kh, kw), "kaiming_normal_fan_out", "weight")}
    if ctx.bias:
        ps["bias"] = ((ctx.c,), "zeros", "bias")
    return ps


def _conv_macs(ctx: Ctx):
    cin = ctx.x().shape[1]
    return product(ctx.outputs[0].shape) * (cin // ctx.groups) * ctx.k[0] * ctx.k[1]


@defop("conv", ["x"], CONV_ATTRS, params=_conv_params, inits=("kaiming_normal_fan_out", "zeros"),
       macs=_conv_macs, vjp="kernel")
def conv(ctx: Ctx):
    """2-D convolution over [N, C, H, W], with stride, padding, dilation and groups."""
    need_rank(ctx, 0, 4)
    _float_input(ctx)
    N, C, H, W = ctx.x().shape
    _check_groups(ctx, C)
    ho, wo = _window(ctx, H, W, ctx.k, ctx.s, ctx.p, ctx.d)
    return [((N, ctx.c, ho, wo), ctx.x().dtype)]


def _convt_params(ctx: Ctx):
    cin = ctx.x().shape[1]
    ps = {"weight": ((cin, ctx.c // ctx.groups, *ctx.k), "kaiming_uniform", "weight")}
    if ctx.bias:
        ps["bias"] = ((ctx.c,), "zeros", "bias")
    return ps


@defop("conv_transpose", ["x"], CONV_ATTRS + (Attr("output_padding", "pair", 0, check=nonneg),),
       params=_convt_params, inits=("kaiming_uniform", "zeros"),
       macs=lambda ctx: product(ctx.x().shape) * (ctx.c // ctx.groups) * ctx.k[0] * ctx.k[1], vjp="kernel")
def conv_transpose(ctx: Ctx):
    """Transpose convolution (learnable upsampling): the adjoint of conv."""
    need_rank(ctx, 0, 4)
    _float_input(ctx)
    N, C, H, W = ctx.x().shape
    _check_groups(ctx, C)
    op = ctx.output_padding
    if op[0] >= max(ctx.s[0], ctx.d[0]) or op[1] >= max(ctx.s[1], ctx.d[1]):
        ctx.fail("output_padding must be smaller than stride or dilation")
    out = [(size - 1) * s - 2 * p + d * (k - 1) + o + 1
           for size, s, p, d, k, o in zip((H, W), ctx.s, ctx.p, ctx.d, ctx.k, op)]
    return [((N, ctx.c, *out), ctx.x().dtype)]


def _linear_params(ctx: Ctx):
    ps = {"weight": ((ctx.out, ctx.x().shape[-1]), "kaiming_uniform", "weight")}
    if ctx.bias:
        ps["bias"] = ((ctx.out,), "fan_in_uniform", "bias")
    return ps


@defop("linear", ["x"], (Attr("out", "int", check=positive), Attr("bias", "bool", True)),
       params=_linear_params, inits=("kaiming_uniform", "fan_in_uniform"),
       macs=lambda ctx: product(ctx.x().shape) * ctx.out, vjp="kernel")
def linear(ctx: Ctx):
    """Fully connected layer over the last axis: [..., K] -> [..., out]."""
    _float_input(ctx)
    if ctx.x().rank < 2:
        ctx.fail("needs a tensor of rank 2 or more, [N, features]", 0)
    if not isinstance(ctx.x().shape[-1], int):
        ctx.fail(f"the feature axis must be a number, got {ctx.x().shape[-1]}", 0,
                 hint="flatten the input, or fix the symbolic size with --set")
    return [((*ctx.x().shape[:-1], ctx.out), ctx.x().dtype)]


def _bn_params(ctx: Ctx):
    C = ctx.x().shape[1]
    ps = {}
    if ctx.affine:
        ps["weight"] = ((C,), "zeros" if ctx.zero_init else "ones", "scale")
        ps["bias"] = ((C,), "zeros", "shift")
    ps["running_mean"] = ((C,), "zeros", "buffer")
    ps["running_var"] = ((C,), "ones", "buffer")
    return ps


@defop("bn", ["x"], (Attr("eps", "float", 1e-5, check=lambda v: None if v > 0 else "must be positive"),
                     Attr("momentum", "float", 0.1, check=prob),
                     Attr("affine", "bool", True),
                     Attr("zero_init", "bool", False, doc="start the scale at 0 (last norm of a residual block)")),
       params=_bn_params, inits=("zeros", "ones"), vjp="kernel")
def bn(ctx: Ctx):
    """Batch normalisation over axis 1 of [N, C] or [N, C, H, W]."""
    need_rank(ctx, 0, 2, 3, 4)
    _float_input(ctx)
    if not isinstance(ctx.x().shape[1], int):
        ctx.fail("the channel axis must be a number", 0)
    return [(ctx.x().shape, ctx.x().dtype)]


@defop("lrn", ["x"], (Attr("size", "int", 5, check=positive), Attr("alpha", "float", 1e-4),
                      Attr("beta", "float", 0.75), Attr("k", "float", 2.0)), vjp="kernel")
def lrn(ctx: Ctx):
    """Local response normalisation across channels (AlexNet's NORM layers)."""
    need_rank(ctx, 0, 4)
    _float_input(ctx)
    return [(ctx.x().shape, ctx.x().dtype)]


@defop("dropout", ["x"], (Attr("p", "float", 0.5, check=prob),), vjp="kernel")
def dropout(ctx: Ctx):
    """Inverted dropout in training, identity at inference."""
    _float_input(ctx)
    return [(ctx.x().shape, ctx.x().dtype)]


@defop("drop_path", ["x"], (Attr("p", "float", 0.1, check=prob),), vjp="kernel")
def drop_path(ctx: Ctx):
    """Stochastic depth: in training each sample zeroed with probability p, else scaled by 1/(1-p).
    Identity at inference; torchvision's stochastic_depth(mode="row"). Put it on a
    residual branch: y = x + drop_path(branch(x), 0.1)."""
    _float_input(ctx)
    if ctx.x().rank < 1:
        ctx.fail("needs a batch axis: [N, ...]", 0)
    return [(ctx.x().shape, ctx.x().dtype)]


POOL_ATTRS = (
    Attr("k", "pair", check=positive),
    Attr("s", "pair", 0, check=nonneg, doc="stride; 0 means the kernel size"),
    Attr("p", "pair", 0, check=nonneg),
    Attr("ceil", "bool", False, doc="round the output size up, as Caffe and GoogLeNet do"),
)


def _pool(ctx: Ctx):
    need_rank(ctx, 0, 4)
    _float_input(ctx)
    N, C, H, W = ctx.x().shape
    s = tuple(si or ki for si, ki in zip(ctx.s, ctx.k))
    ctx.attrs["s"] = s
    if ctx.p[0] * 2 > ctx.k[0] or ctx.p[1] * 2 > ctx.k[1]:
        ctx.fail(f"padding {ctx.p} is more than half the kernel {ctx.k}")
    ho, wo = _window(ctx, H, W, ctx.k, s, ctx.p, ceil=ctx.ceil)
    if ctx.ceil:   # the last window must start inside the input or left padding (as torch)
        ho -= int(isinstance(ho, int) and (ho - 1) * s[0] >= H + ctx.p[0])
        wo -= int(isinstance(wo, int) and (wo - 1) * s[1] >= W + ctx.p[1])
    return (N, C, ho, wo), ctx.x().dtype


@defop("maxpool", ["x"], POOL_ATTRS + (Attr("switches", "bool", False,
                                             doc="also return argmax positions for max_unpool"),),
       outputs=("y", "switches"), vjp="kernel")
def maxpool(ctx: Ctx):
    """Max pooling; with switches=true also returns where each maximum came from."""
    shape, dt = _pool(ctx)
    return [(shape, dt), (shape, "i64")] if ctx.switches else [(shape, dt)]


@defop("avgpool", ["x"], POOL_ATTRS, vjp="kernel")
def avgpool(ctx: Ctx):
    """Average pooling (padding counted, as torch's default)."""
    return [_pool(ctx)]


@defop("global_avgpool", ["x"], vjp="kernel")
def global_avgpool(ctx: Ctx):
    """Average over all positions: [N, C, H, W] -> [N, C, 1, 1]."""
    need_rank(ctx, 0, 4)
    N, C = ctx.x().shape[:2]
    return [((N, C, 1, 1), ctx.x().dtype)]


@defop("global_maxpool", ["x"], vjp="kernel")
def global_maxpool(ctx: Ctx):
    """Maximum over all positions: [N, C, H, W] -> [N, C, 1, 1]."""
    need_rank(ctx, 0, 4)
    N, C = ctx.x().shape[:2]
    return [((N, C, 1, 1), ctx.x().dtype)]


@defop("max_unpool", ["x", "switches"], POOL_ATTRS, vjp="kernel", grad_wrt=(0,))
def max_unpool(ctx: Ctx):
    """Max unpooling: put each value back where its pooling layer found the maximum."""
    need_rank(ctx, 0, 4)
    x, sw = ctx.inputs
    if sw.dtype != "i64":
        ctx.fail("the second input must be the switches of a maxpool(switches=true)", 1)
    if tuple(x.shape) != tuple(sw.shape):
        ctx.fail("values and switches must have the same shape", 0, 1)
    s = tuple(si or ki for si, ki in zip(ctx.s, ctx.k))
    ctx.attrs["s"] = s
    N, C, H, W = x.shape
    out = [(size - 1) * st - 2 * p + k for size, st, p, k in zip((H, W), s, ctx.p, ctx.k)]
    src = sw.producer
    if src is not None and src.op == "maxpool":
        # torch's output_size: the plane the switches index, an odd size's last row included
        out = list(src.inputs[0].shape[2:])
    return [((N, C, *out), x.dtype)]


@defop("upsample", ["x"], (Attr("scale", "int", 2, check=positive),
                           Attr("mode", "str", "nearest", choices=("nearest", "bilinear"))), vjp="kernel")
def upsample(ctx: Ctx):
    """Unpooling by repetition ("nearest", bed of nails' smooth cousin) or bilinear interpolation."""
    need_rank(ctx, 0, 4)
    N, C, H, W = ctx.x().shape
    return [((N, C, H * ctx.scale, W * ctx.scale), ctx.x().dtype)]


@defop("bed_of_nails", ["x"], (Attr("scale", "int", 2, check=positive),), vjp="kernel")
def bed_of_nails(ctx: Ctx):
    """Unpooling that puts each value in the top-left corner of its block, zeros elsewhere."""
    need_rank(ctx, 0, 4)
    N, C, H, W = ctx.x().shape
    return [((N, C, H * ctx.scale, W * ctx.scale), ctx.x().dtype)]


@defop("adaptive_avgpool", ["x"], (Attr("size", "pair", check=positive, doc="output height and width"),),
       vjp="kernel")
def adaptive_avgpool(ctx: Ctx):
    """Average pooling to a fixed output size, whatever the input size (torch's
    AdaptiveAvgPool2d): output cell i averages input rows floor(i*H/h) to ceil((i+1)*H/h).
    torchvision's AlexNet (6x6), VGG (7x7) and GoogLeNet's auxiliary heads (4x4) use it."""
    need_rank(ctx, 0, 4)
    _float_input(ctx)
    N, C, H, W = ctx.x().shape
    h, w = ctx.size
    if isinstance(H, int) and H < h or isinstance(W, int) and W < w:
        ctx.fail(f"cannot pool a {H}x{W} input up to {h}x{w}", 0,
                 hint="adaptive pooling only shrinks; use upsample to enlarge")
    return [((N, C, h, w), ctx.x().dtype)]
