"""extract_patches: every k x k window of an NCHW image (stride s, zero padding p) as its
own small image, and the adjoint that sums the windows back.

y[(n*Ho + oy)*Wo + ox, c, ky, kx] = x[n, c, oy*sh - ph + ky, ox*sw - pw + kx], 0 outside
the image: torch's F.unfold(x, k, padding=p, stride=s) with its columns made a batch.
The backward is col2im written as a gather: each input pixel sums the window elements
that read it, so one task owns each output and needs no atomics.
"""
from ..geometry import patch_grid
from . import as_float, kernel, njit, out_array, prange


def _fwd(x, y, kh, kw, sh, sw, ph, pw, Ho, Wo):
    N, C, H, W = x.shape
    zero = x.dtype.type(0)
    for r in prange(N * Ho * Wo):
        n = r // (Ho * Wo)
        oy = (r // Wo) % Ho
        ox = r % Wo
        for c in range(C):
            for ky in range(kh):
                iy = oy * sh - ph + ky
                for kx in range(kw):
                    ix = ox * sw - pw + kx
                    y[r, c, ky, kx] = x[n, c, iy, ix] if 0 <= iy < H and 0 <= ix < W else zero
    return y


@njit
def _first(i, s, p, k):
    """The first window (along one axis) that holds input i: o*s - p + k - 1 >= i."""
    t = i + p - k + 1
    return 0 if t <= 0 else (t + s - 1) // s


def _bwd(gy, gx, kh, kw, sh, sw, ph, pw, Ho, Wo):
    N, C, H, W = gx.shape
    for q in prange(N * C):
        n = q // C
        c = q % C
        for iy in range(H):
            oy0 = _first(iy, sh, ph, kh)
            oy1 = min(Ho, (iy + ph) // sh + 1)
            for ix in range(W):
                ox0 = _first(ix, sw, pw, kw)
                ox1 = min(Wo, (ix + pw) // sw + 1)
                acc = gx.dtype.type(0)
                for oy in range(oy0, oy1):
                    for ox in range(ox0, ox1):
                        acc += gy[(n * Ho + oy) * Wo + ox, c, iy + ph - oy * sh, ix + pw - ox * sw]
                gx[n, c, iy, ix] = acc
    return gx


_fwd = kernel(_fwd)
_bwd = kernel(_bwd)


def extract_patches(x, k, s=1, p=0, out=None):
    """x[N, C, H, W] -> [N*Ho*Wo, C, kh, kw], windows in (n, oy, ox) order."""
    x = as_float(x)
    g = patch_grid(x.shape, k, s, p)
    N, C = x.shape[:2]
    y = out_array(out, (N * g[6] * g[7], C, g[0], g[1]), x.dtype)
    _fwd(y.size, x, y, *g)
    return y


def extract_patches_backward(gy, xshape, k, s=1, p=0, out=None):
    """The adjoint: gx[n, c, i, j] = sum of gy over the window elements that read x[n, c, i, j]."""
    gy = as_float(gy)
    g = patch_grid(xshape, k, s, p)
    N, C = xshape[:2]
    want = (N * g[6] * g[7], C, g[0], g[1])
    if tuple(gy.shape) != want:
        raise ValueError(f"extract_patches_backward: gradient {gy.shape}, expected {want}")
    gx = out_array(out, tuple(xshape), gy.dtype)
    _bwd(gy.size, gy, gx, *g)
    return gx
