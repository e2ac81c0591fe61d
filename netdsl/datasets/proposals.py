"""Region proposals for R-CNN: selective search (Uijlings et al., IJCV 2013).

    boxes = selective_search(image)              # float32 [K, 4], x1, y1, x2, y2, best first

Each strategy (a colour space, a similarity set and a Felzenszwalb k) oversegments the
image with scikit-image's `felzenszwalb` (Felzenszwalb & Huttenlocher 2004), then merges
the two most similar neighbouring regions until one is left; every region of that
hierarchy is a box. The similarity is the sum of the chosen terms of section 3.2:
  c  colour: histogram intersection of 25-bin histograms per channel (L1-normalised)
  t  texture: histogram intersection of 10-bin histograms of Gaussian derivatives
     (sigma 1) in 8 orientations per channel
  s  size: 1 - (size_i + size_j) / size(image), so small regions merge first
  f  fill: 1 - (size(BB_ij) - size_i - size_j) / size(image), regions that fit merge first
A merged region's histograms are the size-weighted mean of its parts'. The boxes of all
strategies are ranked as section 3.4 does: the region a hierarchy merged last has
index 1, the one before it 2, ...; each index is multiplied by a uniform random number
(seeded), boxes are sorted by that value, duplicates after their first place dropped.

Boxes are in the continuous pixel coordinates of COCO (pixel (i, j) covers [j, j+1) x
[i, i+1)): a region whose pixels span columns a..b has x1 = a, x2 = b + 1.

The cache of a data set's proposals, `netdsl data proposals DIR`, is proposal_cache.py.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from ..errors import NetdslError

COLOUR_BINS = 25        # per channel (section 3.2)
TEXTURE_BINS = 10       # per orientation and channel
ORIENTATIONS = 8
SPACES = ("rgb", "hsv", "lab", "rgi", "h", "i")
SIMILARITY_TERMS = "ctsf"

# The paper's settings (section 5.2); k is Felzenszwalb's scale, also its minimum region size.
PRESETS = {
    "single": (("hsv:ctsf",), (100,)),
    "fast": (("hsv:ctsf", "hsv:tsf", "lab:ctsf", "lab:tsf"), (50, 100)),
    "quality": (tuple(f"{c}:{s}" for c in ("hsv", "lab", "rgi", "h", "i") for s in ("ctsf", "tsf", "f", "s")),
                (50, 100, 150, 300)),
}


@dataclass(frozen=True)
class Strategy:
    space: str      # one of SPACES
    terms: str      # a subset of "ctsf", in that order
    k: float        # Felzenszwalb's scale

    def __str__(self) -> str:
        return f"{self.space}:{self.terms}:{int(self.k) if self.k.is_integer() else self.k!r}"


def strategies_of(strategies="fast", k=None) -> list[Strategy]:
    """The strategies to run: a preset name (PRESETS) or SPACE:TERMS strings such as
    "hsv:ctsf" (a list, or one string joined by commas), each with every value of k
    (default: the preset's; 50 and 100 for a list). SPACE:TERMS:K fixes one k."""
    if isinstance(strategies, str) and strategies in PRESETS:
        names, preset_k = PRESETS[strategies]
    else:
        names = [s for s in strategies.split(",") if s.strip()] if isinstance(strategies, str) else list(strategies)
        preset_k = PRESETS["fast"][1]
        if not names or not all(isinstance(s, str) and ":" in s for s in names):
            raise NetdslError(f"selective search: unknown strategies {strategies!r}",
                              hint=f"a preset ({', '.join(PRESETS)}) or SPACE:TERMS[:K],..., e.g. hsv:ctsf,lab:tsf")
    ks = preset_k if k is None else (k,) if isinstance(k, (int, float)) and not isinstance(k, bool) else tuple(k)
    if not ks or not all(_scale(v) for v in ks):
        raise NetdslError(f"selective search: k must be positive numbers (Felzenszwalb's scale), got {k!r}")
    out = []
    for name in names:
        space, _, rest = name.strip().partition(":")
        terms, _, fixed = rest.partition(":")
        if space not in SPACES:
            raise NetdslError(f"selective search: unknown colour space '{space}' in '{name}'",
                              hint=f"one of {', '.join(SPACES)}")
        if not terms or any(t not in SIMILARITY_TERMS for t in terms) or len(set(terms)) != len(terms):
            raise NetdslError(f"selective search: '{name}': the similarity must be some of the letters c "
                              "(colour), t (texture), s (size), f (fill), each once, e.g. ctsf")
        terms = "".join(t for t in SIMILARITY_TERMS if t in terms)
        if fixed:
            try:
                own = float(fixed)
            except ValueError:
                own = None
            if not _scale(own):
                raise NetdslError(f"selective search: '{name}': k must be a positive number, got '{fixed}'")
            out.append(Strategy(space, terms, own))
        else:
            out += [Strategy(space, terms, float(v)) for v in ks]
    if len(set(out)) != len(out):
        raise NetdslError("selective search: a strategy is listed twice")
    return out


def _scale(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1e6


def selective_search(image, k=None, strategies="fast", max_boxes: int = 2000, seed: int = 0,
                     sigma: float = 0.8) -> np.ndarray:
    """float32 [K, 4] boxes (x1, y1, x2, y2), K <= max_boxes, ranked best first.

    image: [H, W, 3], uint8 or float in [0, 1]. strategies and k: see strategies_of;
    the same seed gives the same boxes. sigma: Felzenszwalb's Gaussian smoothing."""
    rgb = as_rgb(image)
    if not isinstance(max_boxes, int) or isinstance(max_boxes, bool) or max_boxes < 1:
        raise NetdslError(f"selective search: max_boxes must be a positive integer, got {max_boxes!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise NetdslError(f"selective search: seed must be an integer >= 0, got {seed!r}")
    if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not 0 <= sigma <= 100:
        raise NetdslError(f"selective search: sigma must be a number from 0 to 100, got {sigma!r}")
    boxes, values = [], []
    spaces, regions = {}, {}
    for n, s in enumerate(strategies_of(strategies, k)):
        if s.space not in spaces:
            spaces[s.space] = Channels(colour_space(rgb, s.space))
        if (s.space, s.k) not in regions:         # strategies that differ only in terms share these
            regions[s.space, s.k] = Regions(spaces[s.space], s.k, sigma)
        b = regions[s.space, s.k].group(s.terms)
        # section 3.4: the last merge has index 1; each index times a random number
        index = np.arange(len(b), 0, -1, dtype=np.float64)
        boxes.append(b)
        values.append(index * np.random.default_rng([seed, n]).random(len(b)))
    boxes, values = np.concatenate(boxes), np.concatenate(values)
    order = np.argsort(values, kind="stable")
    _, first = np.unique(boxes[order], axis=0, return_index=True)
    keep = order[np.sort(first)][:max_boxes]
    return boxes[keep].astype(np.float32)


def as_rgb(image) -> np.ndarray:
    """float64 [H, W, 3] in [0, 1] of a uint8 or float image; anything else is a NetdslError."""
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3:
        raise NetdslError(f"selective search needs an [H, W, 3] RGB image, got shape {list(a.shape)}")
    if a.shape[0] < 2 or a.shape[1] < 2:
        raise NetdslError(f"selective search needs an image of at least 2 x 2 pixels, got {a.shape[1]} x {a.shape[0]}")
    if a.dtype == np.uint8:
        return a.astype(np.float64) / 255.0
    if a.dtype.kind != "f":
        raise NetdslError(f"selective search needs a uint8 image or a float one in [0, 1], got {a.dtype}")
    if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
        raise NetdslError("selective search: a float image must hold finite values in [0, 1]",
                          hint="divide a 0..255 image by 255, or pass it as uint8")
    return a.astype(np.float64)


def colour_space(rgb: np.ndarray, space: str) -> np.ndarray:
    """float64 [H, W, C] in [0, 1]: the image in one of the paper's colour spaces."""
    from skimage import color
    if space == "rgb":
        return rgb
    if space in ("hsv", "h"):
        hsv = color.rgb2hsv(rgb)
        return hsv if space == "hsv" else hsv[..., :1]
    if space == "lab":
        lab = color.rgb2lab(rgb)    # L in [0, 100], a and b in [-128, 127]
        return np.clip(np.stack([lab[..., 0] / 100, (lab[..., 1] + 128) / 255, (lab[..., 2] + 128) / 255], -1), 0, 1)
    total = rgb.sum(-1, keepdims=True)
    if space == "i":
        return total / 3
    # rgI: normalised r and g (chromaticity), and intensity
    rg = np.divide(rgb[..., :2], total, out=np.full(rgb.shape[:2] + (2,), 1 / 3), where=total > 0)
    return np.concatenate([rg, total / 3], -1)


# ---------------------------------------------------------------- one strategy's hierarchy

class Channels:
    """An image in one colour space, with its texture maps made on first use."""

    def __init__(self, pixels: np.ndarray):
        self.pixels = pixels
        self._texture = None

    @property
    def texture(self) -> np.ndarray:
        if self._texture is None:
            self._texture = texture_maps(self.pixels)
        return self._texture


class Regions:
    """Felzenszwalb's regions of an image at scale k (also the minimum region size, as
    the paper's code has it), their sizes, boxes, neighbours and (on first use) histograms."""

    def __init__(self, image: Channels, k: float, sigma: float):
        from skimage.segmentation import felzenszwalb
        self.image = image
        labels = felzenszwalb(image.pixels, scale=k, sigma=sigma, min_size=int(k)).astype(np.int64)
        size = np.bincount(labels.ravel())
        if not size.all():      # numbered 0..R-1 without gaps, whatever felzenszwalb does
            labels = np.unique(labels, return_inverse=True)[1].reshape(labels.shape)
            size = np.bincount(labels.ravel())
        self.labels, self.count, self.size = labels, len(size), size.astype(np.float64)
        r = self.count
        self.box = region_boxes(self.labels, r)
        self.pairs = adjacent_pairs(self.labels)
        self._hist = {}

    def histograms(self, which: str) -> np.ndarray:
        if which not in self._hist:
            self._hist[which] = (histograms(self.image.pixels, self.labels, self.count, COLOUR_BINS) if which == "c"
                                 else histograms(self.image.texture, self.labels, self.count, TEXTURE_BINS))
        return self._hist[which]

    def group(self, terms: str) -> np.ndarray:
        """int64 [2R - 1, 4]: the boxes of every region of the hierarchy grouped by
        `terms`, in the order made: the R initial regions, then each merge."""
        return group(self.pairs, self.size, self.box, self.histograms("c") if "c" in terms else None,
                     self.histograms("t") if "t" in terms else None, terms, float(self.labels.size))


def region_boxes(labels: np.ndarray, r: int) -> np.ndarray:
    """int64 [r, 4]: each region's box, x2 and y2 one past its last pixel."""
    h, w = labels.shape
    ys, xs = np.mgrid[:h, :w]
    lab = labels.ravel()
    box = np.empty((r, 4), np.int64)
    box[:, 0] = np.full(r, w, np.int64)
    box[:, 1] = np.full(r, h, np.int64)
    np.minimum.at(box[:, 0], lab, xs.ravel())
    np.minimum.at(box[:, 1], lab, ys.ravel())
    box[:, 2:] = 0
    np.maximum.at(box[:, 2], lab, xs.ravel() + 1)
    np.maximum.at(box[:, 3], lab, ys.ravel() + 1)
    return box


def histograms(values: np.ndarray, labels: np.ndarray, r: int, bins: int) -> np.ndarray:
    """float64 [r, F * bins]: per region, a `bins`-bin histogram over [0, 1] of each of
    the F feature maps values[..., f], all of them together L1-normalised."""
    idx = np.minimum((values * bins).astype(np.int64), bins - 1)            # [H, W, F]
    f = values.shape[-1]
    flat = (labels[..., None] * f + np.arange(f)) * bins + idx               # region, feature, bin
    hist = np.bincount(flat.ravel(), minlength=r * f * bins).reshape(r, f * bins).astype(np.float64)
    return hist / hist.sum(1, keepdims=True)


def texture_maps(img: np.ndarray) -> np.ndarray:
    """float64 [H, W, 8 * C] in [0, 1], SIFT-like measurements: Gaussian derivatives
    (sigma 1) of each channel in 8 orientations, each kept where positive (opposite
    orientations differ in sign only), scaled by the channel's largest response so that
    all regions' histograms share their bins."""
    from scipy import ndimage
    theta = np.arange(ORIENTATIONS) * (2 * np.pi / ORIENTATIONS)
    maps = []
    for c in range(img.shape[2]):
        gy = ndimage.gaussian_filter(img[..., c], 1.0, order=(1, 0))
        gx = ndimage.gaussian_filter(img[..., c], 1.0, order=(0, 1))
        resp = np.maximum(gx[..., None] * np.cos(theta) + gy[..., None] * np.sin(theta), 0)
        top = resp.max()
        maps.append(resp / top if top > 0 else resp)
    return np.concatenate(maps, -1)


def adjacent_pairs(labels: np.ndarray) -> np.ndarray:
    """int64 [P, 2] (i < j): regions that touch, 8-connected like Felzenszwalb's graph."""
    pairs = []
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1, :], labels[1:, :]),
                 (labels[:-1, :-1], labels[1:, 1:]), (labels[:-1, 1:], labels[1:, :-1])):
        m = a != b
        pairs.append(np.stack([np.minimum(a[m], b[m]), np.maximum(a[m], b[m])], 1))
    return np.unique(np.concatenate(pairs).reshape(-1, 2), axis=0)


def group(pairs, size, box, colour, texture, terms: str, total: float) -> np.ndarray:
    """Hierarchical grouping (the paper's algorithm 1): merge the most similar pair of
    neighbours until one region is left; `total` is the image's size in pixels. Returns
    every region's box in the order made."""
    r = len(size)
    n = 2 * r - 1
    size = np.concatenate([size, np.zeros(n - r)])
    box = np.concatenate([box, np.zeros((n - r, 4), np.int64)])
    colour = None if colour is None else np.concatenate([colour, np.zeros((n - r, colour.shape[1]))])
    texture = None if texture is None else np.concatenate([texture, np.zeros((n - r, texture.shape[1]))])
    neighbours = [set() for _ in range(n)]
    for i, j in pairs.tolist():
        neighbours[i].add(j)
        neighbours[j].add(i)

    def similarity(i: int, js: np.ndarray) -> np.ndarray:
        sim = np.zeros(len(js))
        if colour is not None:
            sim += np.minimum(colour[i], colour[js]).sum(1)
        if texture is not None:
            sim += np.minimum(texture[i], texture[js]).sum(1)
        if "s" in terms:
            sim += 1 - (size[i] + size[js]) / total
        if "f" in terms:
            lo = np.minimum(box[i, :2], box[js, :2])
            hi = np.maximum(box[i, 2:], box[js, 2:])
            sim += 1 - (np.prod(hi - lo, 1) - size[i] - size[js]) / total
        return sim

    # a max-heap of (-similarity, i, j); pairs with a merged region are skipped when popped
    heap = []
    for i in range(r):
        js = np.array(sorted(j for j in neighbours[i] if j > i), np.int64)
        if len(js):
            heap += [(-v, i, j) for v, j in zip(similarity(i, js).tolist(), js.tolist())]
    heapq.heapify(heap)
    alive = np.zeros(n, bool)
    alive[:r] = True
    t = r
    while heap:
        _, i, j = heapq.heappop(heap)
        if not (alive[i] and alive[j]):
            continue
        size[t] = size[i] + size[j]
        box[t, :2] = np.minimum(box[i, :2], box[j, :2])
        box[t, 2:] = np.maximum(box[i, 2:], box[j, 2:])
        for h in (colour, texture):
            if h is not None:
                h[t] = (size[i] * h[i] + size[j] * h[j]) / size[t]
        alive[i] = alive[j] = False
        alive[t] = True
        nb = (neighbours[i] | neighbours[j]) - {i, j}
        for m in nb:
            neighbours[m] -= {i, j}
            neighbours[m].add(t)
        neighbours[t] = nb
        neighbours[i] = neighbours[j] = set()
        if nb:
            js = np.array(sorted(nb), np.int64)
            for v, m in zip(similarity(t, js).tolist(), js.tolist()):
                heapq.heappush(heap, (-v, m, t))
        t += 1
    return box[:t]
