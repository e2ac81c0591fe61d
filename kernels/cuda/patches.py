"""extract_patches on the device: the twin of kernels/cpu/patches.py, one thread per
output element. The backward is a gather (each input pixel sums the window elements
that read it): no atomics, deterministic."""
from __future__ import annotations

from numba import cuda

from ..geometry import patch_grid
from . import device, empty, flat, kernel, launch


@kernel("aaiiiiiiiiiiii")
def _fwd(x, y, C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo, total):
    T = x.dtype.type
    for e in range(cuda.grid(1), total, cuda.gridsize(1)):
        kx = e % kw
        ky = (e // kw) % kh
        c = (e // (kw * kh)) % C
        r = e // (kw * kh * C)
        ox = r % Wo
        oy = (r // Wo) % Ho
        n = r // (Wo * Ho)
        iy = oy * sh - ph + ky
        ix = ox * sw - pw + kx
        v = T(0)
        if 0 <= iy < H and 0 <= ix < W:
            v = x[((n * C + c) * H + iy) * W + ix]
        y[e] = v


@device
def _first(i, s, p, k):
    """The first window (along one axis) that holds input i."""
    t = i + p - k + 1
    return 0 if t <= 0 else (t + s - 1) // s


@kernel("aaiiiiiiiiiiii")
def _bwd(gy, gx, C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo, total):
    T = gy.dtype.type
    for e in range(cuda.grid(1), total, cuda.gridsize(1)):
        ix = e % W
        iy = (e // W) % H
        c = (e // (W * H)) % C
        n = e // (W * H * C)
        acc = T(0)
        for oy in range(_first(iy, sh, ph, kh), min(Ho, (iy + ph) // sh + 1)):
            for ox in range(_first(ix, sw, pw, kw), min(Wo, (ix + pw) // sw + 1)):
                r = (n * Ho + oy) * Wo + ox
                acc += gy[((r * C + c) * kh + iy + ph - oy * sh) * kw + ix + pw - ox * sw]
        gx[e] = acc


def extract_patches(x, k, s=1, p=0):
    """x[N, C, H, W] -> [N*Ho*Wo, C, kh, kw], windows in (n, oy, ox) order."""
    N, C, H, W = x.shape
    g = patch_grid(x.shape, k, s, p)
    y = empty((N * g[6] * g[7], C, g[0], g[1]), x.dtype)
    launch(_fwd, y.size, flat(x), flat(y), C, H, W, *g, y.size)
    return y


def extract_patches_backward(gy, xshape, k, s=1, p=0):
    N, C, H, W = xshape
    g = patch_grid(xshape, k, s, p)
    gx = empty(tuple(xshape), gy.dtype)
    launch(_bwd, gx.size, flat(gy), flat(gx), C, H, W, *g, gx.size)
    return gx
