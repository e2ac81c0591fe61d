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
