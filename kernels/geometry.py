"""Shapes of sliding-window operators, shared by the CPU and CUDA kernels (target-neutral)."""


def pair(v):
    """Normalise an int-or-pair attribute to a tuple of two ints."""
    if isinstance(v, (tuple, list)):
        a, b = v
        return int(a), int(b)
    return int(v), int(v)


def out_size(n, k, s, p, d):
    """Output length of a convolution along one axis."""
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def pool_out_size(n, k, s, p, ceil_mode):
    """torch's pooling_output_shape (dilation 1)."""
    out = (n + 2 * p - k + ((s - 1) if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= n + p:
        out -= 1  # the last window must start inside the input or left padding
    return out


def pool_geom(xshape, kernel_size, stride, pad, ceil_mode):
    """(k, s, p, OH, OW) of a pooling window over x[N, C, H, W]."""
    k = pair(kernel_size)
    s = pair(stride if stride is not None else kernel_size)
    p = pair(pad)
    if p[0] * 2 > k[0] or p[1] * 2 > k[1]:
        raise ValueError("pool: pad must be at most half the kernel size")
    return k, s, p, pool_out_size(xshape[2], k[0], s[0], p[0], ceil_mode), \
        pool_out_size(xshape[3], k[1], s[1], p[1], ceil_mode)


def patch_grid(xshape, k, s, p):
    """(kh, kw, sh, sw, ph, pw, Ho, Wo) of extract_patches over x[N, C, H, W]: one k x k
    window per output position at stride s over the input zero-padded by p."""
    (kh, kw), (sh, sw), (ph, pw) = pair(k), pair(s), pair(p)
    Ho, Wo = out_size(xshape[2], kh, sh, ph, 1), out_size(xshape[3], kw, sw, pw, 1)
    if Ho <= 0 or Wo <= 0:
        raise ValueError(f"extract_patches: a {kh}x{kw} window does not fit {tuple(xshape[2:])} padded by {(ph, pw)}")
    return kh, kw, sh, sw, ph, pw, Ho, Wo


class ConvShape:
    """One convolution's shapes and attributes; each target adds its blocking decisions."""

    def __init__(self, xshape, wshape, stride, pad, dilation, groups):
        self.N, self.C, self.H, self.W = xshape
        self.O, Cg, self.KH, self.KW = wshape
        self.G = int(groups)
        if self.C != Cg * self.G or self.O % self.G:
            raise ValueError(f"conv2d: x channels {self.C}, weight {wshape}, groups {groups}")
        self.s, self.p, self.d = pair(stride), pair(pad), pair(dilation)
        self.OH = out_size(self.H, self.KH, self.s[0], self.p[0], self.d[0])
        self.OW = out_size(self.W, self.KW, self.s[1], self.p[1], self.d[1])
        if self.OH <= 0 or self.OW <= 0:
            raise ValueError("conv2d: output would be empty")


def transpose_conv_shape(xshape, wshape, stride, pad, output_padding, dilation, groups):
    """Output shape of a transposed convolution x[N, Cin, H, W] with w[Cin, Cout/G, KH, KW]:
    the input shape of the convolution whose backward-data it is."""
    N, _, H, W = xshape
    G = int(groups)
    s, p, d, op = pair(stride), pair(pad), pair(dilation), pair(output_padding)
    if op[0] >= max(s[0], d[0]) or op[1] >= max(s[1], d[1]):
        raise ValueError("conv_transpose2d: inconsistent output_padding/stride")
    OH = (H - 1) * s[0] - 2 * p[0] + d[0] * (wshape[2] - 1) + op[0] + 1
    OW = (W - 1) * s[1] - 2 * p[1] + d[1] * (wshape[3] - 1) + op[1] + 1
    return (N, wshape[1] * G, OH, OW)
